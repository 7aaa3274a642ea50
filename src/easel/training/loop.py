"""The pieces every training loop in Easel shares: step reports, checkpoints, the stage
bookkeeping (budget, progress bar, loss log, cancellation), optimizer, learning-rate schedule,
precision and the loss plot. The bundled model's recipe (`easel.training.tinyshapes`) and
`easel.training.lora` are built from them; each keeps its own loop, readable top to bottom.

Imports only torch, tqdm and matplotlib (for the plot), so training also runs as a script on a
bare GPU machine.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from easel.domain import Canceled, InvalidParams
from easel.models.hardware import cpu_has_native_bf16


class LoopConfig(Protocol):
    """What `StageRun` reads from a recipe's config."""

    log_every_seconds: float
    checkpoint_every_minutes: float


class PrecisionConfig(Protocol):
    bf16: bool


C = TypeVar("C", bound=PrecisionConfig)


@dataclass
class TrainStep:
    """What `on_step` receives after every optimisation step."""

    stage: str  # "vae", "unet" or "decoder"
    step: int
    loss: float
    lr: float
    elapsed_s: float
    fraction: float  # of the stage's budget (time or steps, whichever is further)


@dataclass
class StageLog:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    images_per_s: float = 0.0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def lr_factor(step: int, fraction: float, warmup_steps: int) -> float:
    """Linear warm-up over steps, then cosine decay to 10 % over the budget fraction."""
    warmup = min(1.0, (step + 1) / max(1, warmup_steps))
    return warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction))))


def prefetched(make: Callable[[], object], device: torch.device) -> Iterator:
    """Yield make() results endlessly. On CUDA the next one is prepared in a thread while the
    caller works; on the CPU one after the other, since a second thread of torch ops competes
    for the cores (a batch renders in 5 ms, yet the UNet stage on 2 cores ran at 1.05 it/s with
    the thread and 1.37 without; docs/TRAINING-LOG.md)."""
    if device.type != "cuda":
        while True:
            yield make()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(make)
        while True:
            result = future.result()
            future = pool.submit(make)
            yield result


class Checkpoints:
    """Step-stamped `<stage>-step000123.pt` files in one folder; keeps the newest few."""

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = folder, keep
        folder.mkdir(parents=True, exist_ok=True)

    def latest(self, stage: str) -> dict | None:
        files = sorted(self.folder.glob(f"{stage}-step*.pt"))
        if not files:
            return None
        try:
            # weights_only: tensors and plain containers, never arbitrary pickled objects, so a
            # file planted in the folder cannot run code
            state: dict = torch.load(files[-1], map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and torch errors alike: not a checkpoint we wrote
            raise InvalidParams(
                f"{files[-1]} is not a checkpoint Easel wrote ({type(exc).__name__}); remove it "
                "or train into a new --out folder",
                field="out",
            ) from None
        return state

    def save(self, stage: str, step: int, state: dict) -> None:
        path = self.folder / f"{stage}-step{step:07d}.pt"
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # a crash never leaves a half-written checkpoint
        for old in sorted(self.folder.glob(f"{stage}-step*.pt"))[: -self.keep]:
            old.unlink()

    def resume(self, stage: str, parts: dict[str, Any], log: StageLog) -> tuple[int, float]:
        """Load the stage's newest checkpoint into ``parts`` (name -> module or optimizer) and
        ``log``; returns (step, seconds spent), or (0, 0.0) when the stage has none."""
        if (state := self.latest(stage)) is None:
            return 0, 0.0
        if missing := sorted(set(parts) - set(state)):
            raise InvalidParams(
                f"the {stage} checkpoint in {self.folder} has no {', '.join(missing)}: it was "
                "written by an older recipe; train into a new --out folder",
                field="out",
            )
        for name, part in parts.items():
            part.load_state_dict(state[name])
        log.steps, log.losses = state["log_steps"], state["log_losses"]
        return state["step"], state["elapsed_s"]

    def save_stage(
        self, stage: str, step: int, parts: dict[str, Any], elapsed_s: float, log: StageLog
    ) -> None:
        """What `resume` reads back: every part's state, the step, the time spent, the log."""
        state = {name: part.state_dict() for name, part in parts.items()}
        state |= {"step": step, "elapsed_s": elapsed_s}
        self.save(stage, step, state | {"log_steps": log.steps, "log_losses": log.losses})


def adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel on CUDA and on the CPU, where it made a denoiser step on 2
    cores 5-9 % faster than the default foreach kernel (bench/training_step.py)."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def training_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernel for a denoiser training step. On the CPU the plain (math) kernel: the
    flash kernel's backward is slow for these short sequences (16 to 64 tokens), and the math
    kernel makes the step about 1.5x faster (bench/training_step.py, docs/BENCHMARKS.md).
    Sampling and the autoencoder (256 tokens) keep the default, which is as fast or faster there."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()


def save_loss_plot(
    logs: dict[str, StageLog],
    path: Path,
    extra: dict[str, list[tuple[int, float]]] | None = None,
) -> None:
    """One panel per stage: the loss per step, faint, and a moving average over it; ``extra``
    series (e.g. held-out losses) are drawn as points on the first panel, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.5))
    for axis, (stage, log) in zip(axes if len(logs) > 1 else [axes], logs.items(), strict=True):
        if log.losses:
            window = max(1, len(log.losses) // 100)
            smooth = [
                sum(log.losses[max(0, i - window) : i + 1])
                / len(log.losses[max(0, i - window) : i + 1])
                for i in range(len(log.losses))
            ]
            marker = "o" if len(log.losses) < 20 else None  # a line of one point draws nothing
            axis.plot(log.steps, log.losses, alpha=0.25, color="tab:blue", marker=marker)
            axis.plot(log.steps, smooth, color="tab:blue", marker=marker)
        else:
            axis.text(0.5, 0.5, "no steps yet", ha="center", va="center", transform=axis.transAxes)
        axis.set(title=f"{stage} loss", xlabel="step", yscale="log")
    first = axes[0] if len(logs) > 1 else axes
    for label, points in (extra or {}).items():
        if points:
            first.plot(*zip(*points, strict=True), "o-", color="tab:orange", label=label)
            first.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class StageRun:
    """The bookkeeping the stage loops share: the budget (time or steps, whichever is further
    along, over all sessions), the progress bar, the loss log, `on_step`, a throughput line,
    checkpoints on a clock and cancellation. A resumed stage goes on until its budget is spent;
    a finished one is skipped (``done`` from the start)."""

    def __init__(
        self,
        stage: str,
        config: LoopConfig,
        *,
        budget_s: float,
        max_steps: int,
        batch_size: int,
        step: int,
        elapsed_before: float,
        log: StageLog,
        on_step: Callable[[TrainStep], None] | None,
        is_canceled: Callable[[], bool] | None,
        checkpoint_every_steps: int | None = None,
    ):
        self.stage, self.config, self.log = stage, config, log
        self.checkpoint_every_steps = checkpoint_every_steps
        self.budget_s, self.max_steps, self.batch_size = budget_s, max_steps, batch_size
        self.on_step, self.is_canceled = on_step, is_canceled
        self.elapsed_before, self.first_step = elapsed_before, step
        self.start = self.last_log = self.last_checkpoint = time.monotonic()
        self.fraction = max(elapsed_before / budget_s, step / max_steps)
        self.progress = tqdm(
            desc=stage,
            unit="step",
            initial=step,
            total=max_steps if math.isinf(budget_s) else None,
            disable=self.done,
            mininterval=2.0,
        )

    @property
    def done(self) -> bool:
        return self.fraction >= 1.0

    def elapsed(self) -> float:
        """Seconds of this stage over all sessions."""
        return self.elapsed_before + time.monotonic() - self.start

    def record(self, step: int, loss: float, lr: float, save: Callable[[], None]) -> None:
        """After optimisation step ``step``: log, report, and checkpoint (``save``) when due or
        done; save and raise `Canceled` when ``is_canceled`` says so."""
        now = time.monotonic()
        elapsed = self.elapsed_before + now - self.start
        self.fraction = max(elapsed / self.budget_s, step / self.max_steps)
        self.log.steps.append(step)
        self.log.losses.append(loss)
        self.progress.update()
        postfix = {"loss": f"{loss:.4f}"}
        if not math.isinf(self.budget_s):  # a step budget shows its own ETA in the bar
            postfix["left"] = f"{max(0, self.budget_s - elapsed):.0f}s"
        self.progress.set_postfix(postfix)
        if self.on_step:
            self.on_step(TrainStep(self.stage, step, loss, lr, elapsed, self.fraction))
        if now - self.last_log >= self.config.log_every_seconds or self.done:
            self.log.images_per_s = report_throughput(
                self.stage, step - self.first_step, now - self.start, self.batch_size, self.log
            )
            self.last_log = now
        every = self.checkpoint_every_steps
        if (
            now - self.last_checkpoint >= self.config.checkpoint_every_minutes * 60
            or (every and step % every == 0)
            or self.done
        ):
            save()
            self.last_checkpoint = now
        if self.is_canceled and self.is_canceled():
            save()
            raise Canceled("training canceled")

    def close(self) -> None:
        self.progress.close()


def report_throughput(
    stage: str, steps: int, seconds: float, batch_size: int, log: StageLog
) -> float:
    """Print one throughput line (`steps` optimisation steps in `seconds`); returns images/s."""
    rate = steps / max(1e-9, seconds)
    recent = log.losses[-50:]
    tqdm.write(
        f"[{stage}] step {log.steps[-1]} loss {sum(recent) / len(recent):.4f} "
        f"{rate:.2f} it/s {rate * batch_size:.0f} images/s",
        file=sys.stdout,
    )
    return rate * batch_size


def with_native_precision(config: C, device: torch.device) -> C:
    """``config`` with bf16 autocast kept only where ``device`` computes bf16 natively: CUDA, or
    a CPU with AMX/AVX512-BF16, where it trains the autoencoder 1.7x faster than float32;
    emulated bf16 is slower than float32."""
    if not config.bf16 or device.type != "cpu":
        return config
    return replace(config, bf16=cpu_has_native_bf16())
