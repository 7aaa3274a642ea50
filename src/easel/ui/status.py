"""The status line above the results: queue position and ETA, then a progress bar, then the end.

Pure functions returning small HTML snippets (ids and classes are what the browser tests read).
"""

from __future__ import annotations

import html


def queued_html(position: int | None, eta_seconds: float | None) -> str:
    """While the job waits: where it is in the queue and roughly when it will be done."""
    where = f"position {position} in the queue" if position else "about to start"
    return _line("queued", f"Queued: {where} · {_eta(eta_seconds)}")


def started_html() -> str:
    """The job left the queue; the first step may wait for the model to load."""
    return _line("running", "Running: starting (loading the model if needed)")


def running_html(step: int, total: int, eta_seconds: float | None) -> str:
    """While the job runs: step count, a progress bar and the refined ETA."""
    percent = round(100 * step / total) if total else 0
    text = f"Running: step {step} of {total} · {_eta(eta_seconds)}"
    bar = (
        f'<progress id="easel-progress" value="{step}" max="{max(total, 1)}" '
        f'aria-label="generation progress">{percent}%</progress>'
    )
    return _line("running", text, bar)


def training_html(step: int, total: int, loss: float | None, eta_seconds: float | None) -> str:
    """While a training job runs: step count, the step's loss, a progress bar and the ETA."""
    percent = round(100 * step / total) if total else 0
    shown_loss = f" · loss {loss:.4f}" if loss is not None else ""
    text = f"Training: step {step} of {total}{shown_loss} · {_eta(eta_seconds, 'yet')}"
    bar = (
        f'<progress id="easel-train-progress" value="{step}" max="{max(total, 1)}" '
        f'aria-label="training progress">{percent}%</progress>'
    )
    return _line("running", text, bar)


def trained_html(lora: str, steps: int | None, seconds: float | None) -> str:
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    after = f" after {steps} steps" if steps is not None else ""
    return _line("succeeded", f"Done: LoRA {lora}{after}{took}")


def dataset_html(images: int, captions: int) -> str:
    """An accepted dataset: what it holds."""
    return _line("succeeded", f"{_count(images, 'image')}, {_count(captions, 'caption')}")


def refused_html(error: str) -> str:
    """A refused dataset: the checker's message, which says what to change."""
    return _line("failed", f"Refused: {error}")


def done_html(count: int, seconds: float | None) -> str:
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    noun = "image" if count == 1 else "images"
    return _line("succeeded", f"Done: {count} {noun}{took}")


def failed_html(error: str) -> str:
    return _line("failed", f"Failed: {error}")


def canceled_html() -> str:
    return _line("canceled", "Canceled")


def idle_html() -> str:
    return _line("idle", "Ready")


def note_html(text: str) -> str:
    """A neutral line: what to do next."""
    return _line("idle", text)


def _eta(seconds: float | None, known: str = "until a first job of this size has run") -> str:
    if seconds is None:
        return f"ETA unknown {known}"
    if seconds < 60:
        return f"ETA ~{max(seconds, 0.0):.0f} s"
    return f"ETA ~{seconds / 60:.0f} min"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _line(state: str, text: str, extra: str = "") -> str:
    return (
        f'<div class="easel-status" data-state="{state}">'
        f'<span class="easel-status-text">{html.escape(text)}</span>{extra}</div>'
    )
