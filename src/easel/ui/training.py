"""The Train tab: a dataset uploaded and checked, a ``train_lora`` job submitted through
``services`` like a generation, then followed live: the step, loss and ETA, the loss chart
(training loss per step, held-out loss at each sample step) and the sample images as they come.

    tab = train_tab(services)                     # inside a gr.Tab, in build_ui
    finished = wire_train(services, tab, demo)    # the Train click: chain .then() after a run

The job's events (see ``jobs.worker.Worker._train``): ``progress`` with step, total, loss, lr
and eta_seconds; ``progress`` with ``samples`` [{id, url, prompt}] and ``heldout_loss``; at the
end ``succeeded`` with the ``lora`` made. Following them is :func:`easel.ui.jobs.follow_job`,
shared with Generate and Edit.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from easel.domain import GenerationParams, InvalidParams, Principal
from easel.models.loras import TEXT_ENCODER_FAMILIES
from easel.services import ModelInfo, Services
from easel.ui import status
from easel.ui.access import acting_for
from easel.ui.forms import model_choices
from easel.ui.jobs import Waiting, follow_job, user_errors, waiting_now

# The trainer's defaults (easel.training.lora_config.LoraConfig; the UI may not import
# easel.training), shown in the form under a model's own (`form_defaults`). A test checks that
# they agree.
TRAINER_DEFAULTS: dict[str, Any] = {
    "steps": 600,
    "rank": 8,
    "learning_rate": 1e-3,
    "train_text_encoder": False,
    "prior_words": [],
}
TRAIN_TASK = "train_lora"
SERIES = {"training": "#2563eb", "held-out": "#f97316"}  # the loss chart's lines
DATASET_HINT = "Upload a .zip, or images with same-name .txt captions (cat.png + cat.txt)."


@dataclass
class TrainRun:
    """What the page shows of one training job so far: the loss curve and the samples."""

    losses: list[tuple[int, float, str]] = field(default_factory=list)  # step, loss, series
    samples: list[tuple[str, str]] = field(default_factory=list)  # (PNG, caption), newest first

    def add_loss(self, step: int, loss: float, series: str = "training") -> None:
        self.losses.append((step, loss, series))

    def add_samples(self, step: int, items: list[tuple[str, str]]) -> None:
        """A batch of samples made at ``step``: ``(PNG path, prompt)``, shown first."""
        self.samples = [(path, f"step {step} · {prompt}") for path, prompt in items] + self.samples

    def chart(self) -> pd.DataFrame | None:
        """The LinePlot's data: one row a point (step, loss, series); None (an empty chart)
        before the first point. Every series has a first row without a loss (not drawn): the
        plot fixes its colours on the first data it gets, and a series that came later (the
        held-out loss) would stay invisible."""
        if not self.losses:
            return None
        legend = [(0, math.nan, series) for series in SERIES]
        frame = pd.DataFrame(legend + self.losses, columns=["step", "loss", "series"])
        return frame.astype({"step": "int64", "loss": "float64", "series": "string"})


@dataclass
class TrainTab:
    """The Train tab's components, for wiring."""

    files: gr.File
    dataset_status: gr.HTML
    model: gr.Dropdown
    name: gr.Textbox
    trigger: gr.Textbox
    steps: gr.Number
    rank: gr.Number
    learning_rate: gr.Number
    prior_words: gr.Textbox
    train_text_encoder: gr.Checkbox
    run: gr.Button
    cancel: gr.Button
    progress: gr.HTML
    chart: gr.LinePlot
    samples: gr.Gallery
    result: gr.Markdown
    dataset: gr.State
    job: gr.State


def form_defaults(info: ModelInfo | None) -> dict[str, Any]:
    """The form's settings for a model: its training defaults (``ModelRecord.train_defaults``,
    e.g. tiny-shapes' prior words), else the trainer's."""
    own = info.record.train_defaults if info else {}
    return {key: own.get(key, value) for key, value in TRAINER_DEFAULTS.items()}


def text_encoder_trains(info: ModelInfo | None) -> bool:
    """Whether the model's text encoder can take a LoRA (a CLIP one): else the box is fixed."""
    return info is None or info.record.family in TEXT_ENCODER_FAMILIES


def words_text(words: list[str]) -> str:
    return ", ".join(words)


def parse_words(text: str | None) -> list[str]:
    """The prior words typed in the form: comma-separated, blanks dropped."""
    return [word.strip() for word in (text or "").split(",") if word.strip()]


def trainable(infos: list[ModelInfo]) -> list[ModelInfo]:
    """The models whose family can fit a LoRA (the ``train_lora`` task)."""
    return [i for i in infos if TRAIN_TASK in i.family.tasks]


def train_tab(services: Services) -> TrainTab:
    """The Train tab's layout (inside its ``gr.Tab``): dataset and settings on the left, the
    run (status, loss chart, samples, result) on the right."""
    models = trainable(services.list_models())
    default = services.settings.default_model
    ids = [i.record.id for i in models]
    available = [i.record.id for i in models if i.record.available]
    # the server's default model, else the first one here, else the first listed
    first = default if default in ids else next(iter(available or ids), None)
    first_info = next((i for i in models if i.record.id == first), None)
    shown = form_defaults(first_info)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            files = gr.File(
                label="Dataset: one .zip, or images with their .txt captions",
                file_count="multiple",
                file_types=[".zip", ".png", ".jpg", ".jpeg", ".webp", ".txt", ".jsonl"],
                height=160,
                elem_id="train-files",
            )
            dataset_status = gr.HTML(status.note_html(DATASET_HINT), elem_id="train-dataset")
            model = gr.Dropdown(
                choices=model_choices(models), value=first, label="Model", elem_id="train-model"
            )
            with gr.Row():
                name = gr.Textbox(
                    label="LoRA name",
                    placeholder="hexagon",
                    info="letters, digits, . _ -",
                    elem_id="train-name",
                )
                trigger = gr.Textbox(
                    label="Trigger word",
                    placeholder="sks",
                    info="put it in prompts to call it up",
                    elem_id="train-trigger",
                )
            with gr.Row():
                steps = gr.Number(
                    shown["steps"],
                    precision=0,
                    minimum=1,
                    label="Steps",
                    min_width=90,
                    elem_id="train-steps",
                )
                rank = gr.Number(
                    shown["rank"],
                    precision=0,
                    minimum=1,
                    label="Rank",
                    min_width=90,
                    elem_id="train-rank",
                )
                learning_rate = gr.Number(
                    shown["learning_rate"], minimum=0, step=0.0001, label="Learning rate",
                    min_width=90, elem_id="train-lr",
                )  # fmt: skip
            with gr.Row():
                prior_words = gr.Textbox(
                    words_text(shown["prior_words"]),
                    label="Keep apart from",
                    info="prior words: what the new thing must not change (comma-separated)",
                    scale=3,
                    elem_id="train-prior-words",
                )
                train_text_encoder = gr.Checkbox(
                    shown["train_text_encoder"],
                    label="Train text encoder",
                    interactive=text_encoder_trains(first_info),
                    scale=1,
                    elem_id="train-text-encoder",
                )
            with gr.Row():
                run = gr.Button("Train", variant="primary", elem_id="train-run")
                cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
        with gr.Column(scale=3, min_width=300):
            progress = gr.HTML(status.idle_html(), elem_id="train-status")
            chart = gr.LinePlot(
                None,
                x="step",
                y="loss",
                color="series",
                color_map=SERIES,
                title="Loss",
                x_title="step",
                y_title="loss",
                tooltip="all",
                height=240,
                show_label=False,
                elem_id="train-loss",
            )
            samples = gr.Gallery(
                label="Samples (newest first)",
                columns=4,
                height="fit-content",
                object_fit="contain",
                interactive=False,
                elem_id="train-samples",
            )
            result = gr.Markdown(elem_id="train-result")
    return TrainTab(
        files=files,
        dataset_status=dataset_status,
        model=model,
        name=name,
        trigger=trigger,
        steps=steps,
        rank=rank,
        learning_rate=learning_rate,
        prior_words=prior_words,
        train_text_encoder=train_text_encoder,
        run=run,
        cancel=cancel,
        progress=progress,
        chart=chart,
        samples=samples,
        result=result,
        dataset=gr.State(None),
        job=gr.State(None),
    )


def wire_train(services: Services, tab: TrainTab, demo: gr.Blocks) -> Any:
    """The tab's events; returns the Train click's event, to chain what follows a run."""
    ui = TrainHandlers(services)
    demo.load(ui.model_list, None, tab.model, api_visibility="private")  # pulled since start
    tab.files.change(
        ui.store_dataset, tab.files, [tab.dataset, tab.dataset_status], api_visibility="private"
    )
    settings = [tab.steps, tab.rank, tab.learning_rate, tab.train_text_encoder, tab.prior_words]
    tab.model.change(ui.model_settings, tab.model, settings, api_visibility="private")
    finished = tab.run.click(
        ui.train,
        [tab.dataset, tab.model, tab.name, tab.trigger, *settings],
        [tab.progress, tab.chart, tab.samples, tab.result, tab.job],
        api_visibility="private",
        concurrency_limit=None,  # the wait is in the Easel queue, not in Gradio's
        show_progress="hidden",
    )
    tab.cancel.click(ui.cancel, tab.job, None, api_visibility="private", queue=False)
    return finished


class TrainHandlers:
    """The Train tab's event handlers; each calls ``services``."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def model_list(self) -> Any:
        return gr.update(choices=model_choices(trainable(self.services.list_models())))

    def model_settings(self, model: str | None) -> tuple[Any, ...]:
        """The form's settings when the model changes: that model's training defaults."""
        info = next(
            (i for i in trainable(self.services.list_models()) if i.record.id == model), None
        )
        shown = form_defaults(info)
        return (
            shown["steps"],
            shown["rank"],
            shown["learning_rate"],
            gr.update(value=shown["train_text_encoder"], interactive=text_encoder_trains(info)),
            words_text(shown["prior_words"]),
        )

    def store_dataset(
        self, paths: list[str] | None, request: gr.Request | None = None
    ) -> tuple[str | None, str]:
        """Check and store the uploaded files as the signed-in key's dataset: (its id, the
        summary line); a refused upload gives (None, the reason) and a pop-up, and nothing is
        stored."""
        if not paths:
            return None, status.note_html(DATASET_HINT)
        files = [(Path(p).name, Path(p).read_bytes()) for p in paths]
        with user_errors("Dataset refused"):  # a revoked key, one without the train scope
            principal = acting_for(self.services, request)
            try:
                record = self.services.create_dataset(files, principal=principal)
            except InvalidParams as exc:  # the files: say why, and keep the page as it is
                gr.Warning(exc.message, title="Dataset refused")
                return None, status.refused_html(exc.message)
        return record.id, status.dataset_html(record.images, record.captions)

    async def train(
        self,
        dataset: str | None,
        model: str | None,
        name: str,
        trigger: str,
        steps: float | None = None,
        rank: float | None = None,
        learning_rate: float | None = None,
        train_text_encoder: bool | None = None,
        prior_words: str | None = None,
        request: gr.Request | None = None,
    ) -> AsyncIterator[tuple[Any, ...]]:
        """Submit a ``train_lora`` job and follow it: yields (status, loss chart, samples,
        result, job id); the last update is complete. Settings left None take the model's
        training defaults; ``prior_words`` is the form's comma-separated text ("": none)."""
        # 1. check the request and queue it (a bad field is an error naming it)
        with user_errors("Cannot train"):
            principal = acting_for(self.services, request)
            if not dataset:
                raise InvalidParams(
                    "dataset: upload one first (a .zip, or images with their .txt captions)",
                    field="dataset",
                )
            params = GenerationParams(
                prompt="",
                task=TRAIN_TASK,
                model=model or None,
                dataset=dataset,
                name=(name or "").strip(),
                trigger=(trigger or "").strip(),
                steps=None if steps is None else int(steps),
                rank=None if rank is None else int(rank),
                learning_rate=learning_rate,
                train_text_encoder=train_text_encoder,
                prior_words=None if prior_words is None else parse_words(prior_words),
            )
            job = await asyncio.to_thread(self.services.submit_job, params, principal=principal)
        # 2. follow it: the loss chart and the samples grow as the events come
        run, skip = TrainRun(), gr.skip()
        waiting = await waiting_now(self.services, job.id)
        yield waiting.html, run.chart(), [], "", job.id
        async for event in follow_job(self.services, job.id):
            if isinstance(event, Waiting):
                yield event.html, skip, skip, skip, skip
            elif event.type == "started":
                yield status.started_html(), skip, skip, skip, skip
            elif event.type == "progress" and "samples" in event.data:
                step = event.data["step"]
                if event.data.get("heldout_loss") is not None:
                    run.add_loss(step, event.data["heldout_loss"], "held-out")
                samples = event.data["samples"]
                items = [(self._path(s["id"], principal), s["prompt"]) for s in samples]
                run.add_samples(step, items)
                yield skip, run.chart(), run.samples, skip, skip
            elif event.type == "progress":
                data = event.data
                run.add_loss(data["step"], data["loss"])
                html = status.training_html(
                    data["step"], data["total"], data["loss"], data.get("eta_seconds")
                )
                yield html, run.chart(), skip, skip, skip
            elif event.type == "canceled":
                yield status.canceled_html(), run.chart(), run.samples, "", None
            elif event.type == "failed":
                html = status.failed_html(event.data["error"])
                yield html, run.chart(), run.samples, "", None
                raise gr.Error(event.data["error"], title="Training failed")
            elif event.type == "succeeded":
                # 3. say which LoRA was made, and where to use it
                lora = event.data["lora"]
                html = status.trained_html(lora["id"], lora.get("steps"), event.data.get("seconds"))
                note = made_note(lora["id"], job.params.trigger, job.model)
                yield html, run.chart(), run.samples, note, None

    def cancel(self, job_id: str | None, request: gr.Request | None = None) -> None:
        """Cancel this page's training job: it stops at its next step (keeping a checkpoint)."""
        if job_id:
            with user_errors("Cannot cancel"):
                self.services.cancel_job(job_id, acting_for(self.services, request))

    def _path(self, image_id: str, principal: Principal) -> str:
        return str(self.services.image_path(image_id, principal))


def made_note(lora: str, trigger: str | None, model: str) -> str:
    """The line under a finished run: the LoRA made, and how to use it."""
    word = f" and put **{trigger}** in the prompt" if trigger else ""
    return (
        f"**LoRA `{lora}` is ready.** It now appears in the **LoRAs** pickers of Generate and "
        f"Edit (for {model} and models of its family): pick it there{word}."
    )
