"""The web page: a Gradio Blocks app that is a client of ``services``, like the REST API.

Every Generate, Edit or Train click becomes a job in the Easel queue (the source of truth);
Gradio's own queue only carries the page's events. The generate and edit handlers submit the
job, then follow the job's events alike (position and ETA while it waits, steps and previews
while it runs, images at the end; ``easel.ui.jobs``). Edit stores its input pictures (and the
mask painted on the picture) with ``services.upload_image`` and names them by id in the job.
The Train tab is ``easel.ui.training``; the LoRA pickers of Generate and Edit ``easel.ui.loras``.

    app = create_app(services)           # the REST API
    mount_ui(app, services)              # the page at "/" on the same FastAPI app

The generate endpoint is public as ``/generate``: ``Client(url).predict("a red circle",
api_name="/generate")`` returns the result gallery first (every other input has a default).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI
from gradio.routes import App
from PIL import Image
from starlette.routing import Mount

from easel.domain import (
    OUTPAINT_SIDES,
    EaselError,
    GenerationParams,
    InvalidParams,
    JobRecord,
    Principal,
)
from easel.imaging import png_bytes
from easel.models.params import MAX_MASK_BLUR
from easel.services import ModelInfo, Services
from easel.ui import status
from easel.ui.access import ANYONE, PrivateImages, acting_for, page_user, signed_in_html
from easel.ui.editing import (
    EDIT_TASKS,
    MIN_BRUSH,
    EditForm,
    brush_size,
    default_strength,
    default_value,
    edit_spec,
    mask_from_layers,
    opaque,
    task_controls,
    task_note,
)
from easel.ui.forms import ModelForm, format_size, model_choices, model_form, parse_size
from easel.ui.jobs import Waiting, follow_job, user_errors, waiting_now
from easel.ui.loras import LoraPicker, lora_picker, picked_loras, refresh_event, wire_picker
from easel.ui.training import train_tab, wire_train
from easel.ui.workers import CSS as WORKERS_CSS
from easel.ui.workers import wire_workers, workers_view

HISTORY_LIMIT = 200  # images shown in the History tab (newest first)
EDIT_TASK = "inpaint"  # the Edit tab's task when the page opens
BRUSH_COLOR = ("#ff2a8a", 0.6)  # what the mask is painted with: any paint marks it
# Gradio serves what the page shows (copies of stored PNGs, every live preview) from its own file
# cache: every 10 minutes drop the files older than an hour, so a long-running server does not
# fill the temp folder (the images themselves stay in EASEL_HOME/images).
CACHE_CLEANUP = (600, 3600)

CSS = """
.easel-status { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; min-height: 1.6rem; }
.easel-status progress { flex: 1 1 12rem; height: .8rem; }
.easel-status[data-state="failed"] { color: var(--error-text-color); }
#result-info pre, #result-info code, #picked-info pre, #picked-info code,
#edit-result-info pre, #edit-result-info code {
  white-space: pre-wrap !important; overflow-wrap: anywhere; }
#preview img, #edit-preview img { width: 100%; height: 100%; object-fit: contain; }
img.easel-upscaled { image-rendering: pixelated; }
#account { position: absolute; top: .6rem; right: 1rem; width: auto; z-index: 1;
  background: none; border-width: 0; box-shadow: none; }  /* top right, beside the title */
.easel-account { display: flex; gap: .4rem; align-items: center; font-size: .9rem; }
.easel-account form { display: inline; margin: 0; }
.easel-account button { font: inherit; padding: .15rem .6rem; cursor: pointer;
  border: 1px solid var(--border-color-primary); border-radius: var(--radius-sm);
  background: var(--button-secondary-background-fill); }
@media (max-width: 640px) {  /* Gradio's grid keeps >= 100 px columns: too wide for 400 px */
  #history .grid-container, #train-samples .grid-container {
    grid-template-columns: repeat(3, minmax(0, 1fr)); } }
"""

# Small images (a 64×64 model's pictures, the live previews) are shown larger than they are:
# enlarge them with sharp pixels instead of a blur. Only enlarged ones: big pictures shrunk into
# thumbnails keep the smooth filter (pixelated shrinking would alias them).
HEAD = """<script>
const easelSharp = new ResizeObserver((entries) => {
  for (const { target: img, contentRect: box } of entries) {
    if (!img.isConnected) { easelSharp.unobserve(img); continue; }
    const scale = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
    img.classList.toggle("easel-upscaled", scale > 1);
  }
});
document.addEventListener("load", (event) => {
  if (event.target instanceof HTMLImageElement) easelSharp.observe(event.target);
}, true);
</script>"""


def build_ui(services: Services) -> gr.Blocks:
    """The Blocks app: the Generate, Edit, History and Train tabs, wired to ``services``."""
    ui = _Handlers(services)
    form = ui.first_form()
    with gr.Blocks(title="Easel", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown("# Easel", elem_id="easel-title")
        account = gr.HTML(visible=False, elem_id="account")  # who is signed in, and Sign out
        with gr.Tabs(elem_id="easel-tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="tab-generate") as generate_tab:
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=300):
                        prompt = gr.Textbox(
                            label="Prompt",
                            lines=3,
                            placeholder="a red circle and a blue square on a white background",
                            elem_id="prompt",
                        )
                        negative = gr.Textbox("", label="Negative prompt", elem_id="negative")
                        model = gr.Dropdown(
                            choices=model_choices(ui.models()),
                            value=form.model,
                            label="Model",
                            elem_id="model",
                        )
                        note = gr.Markdown(form.note, elem_id="model-note")
                        with gr.Row():
                            size = gr.Dropdown(
                                choices=form.sizes,
                                value=form.size,
                                label="Size (width × height)",
                                allow_custom_value=True,
                                elem_id="size",
                            )
                            scheduler = gr.Dropdown(
                                choices=list(form.schedulers),
                                value=form.scheduler,
                                label="Scheduler",
                            )
                        with gr.Row():
                            steps = gr.Slider(
                                1,
                                form.max_steps,
                                value=form.steps,
                                step=1,
                                label="Steps",
                                elem_id="steps",
                            )
                            guidance = gr.Slider(
                                *form.guidance_range, value=form.guidance, step=0.1,
                                label="Guidance",
                            )  # fmt: skip
                            guidance_end = gr.Slider(
                                0.05, 1, value=form.guidance_end, step=0.01,
                                label="Guidance end",
                                info="share of the steps that use guidance (1: all); "
                                "unguided steps run faster",
                                visible=form.ends_guidance_early, elem_id="guidance-end",
                            )  # fmt: skip
                        with gr.Row():
                            seed = gr.Number(
                                value=0, precision=0, minimum=0, label="Seed", elem_id="seed"
                            )
                            random_seed = gr.Checkbox(
                                value=True, label="Random seed", elem_id="random-seed"
                            )
                        count = gr.Slider(
                            1, form.max_images, value=1, step=1, label="Images", elem_id="count"
                        )
                        loras = lora_picker(services, form.model)
                        with gr.Row():
                            generate = gr.Button(
                                "Generate",
                                variant="primary",
                                interactive=form.available,
                                elem_id="generate",
                            )
                            cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    with gr.Column(scale=3, min_width=300):
                        progress = gr.HTML(status.idle_html(), elem_id="status")
                        preview = gr.Image(
                            label="Preview",
                            interactive=False,
                            height=256,
                            visible=False,  # shown while a job runs
                            elem_id="preview",
                        )
                        gallery = gr.Gallery(
                            label="Result",
                            columns=2,  # one image spans the column; 2 or more two abreast
                            height="fit-content",  # every image whole, none cropped or scrolled
                            object_fit="contain",
                            interactive=False,  # an input of Send to Edit, not an upload box
                            elem_id="result",
                        )
                        result_info = gr.Markdown(elem_id="result-info")
                        send_result = gr.Button("Send to Edit", size="sm", elem_id="send-to-edit")
                job = gr.State(None)  # id of this page's current job, for Cancel
                shown = gr.State(0)  # index of the result opened in the gallery
            with gr.Tab("Edit", id="edit", elem_id="tab-edit") as edit_tab:
                edit = _edit_tab(ui, form)
            with gr.Tab("History", id="history", elem_id="tab-history") as history_tab:
                with gr.Row():
                    search = gr.Textbox(
                        label="Search prompts", placeholder="circle", scale=3, elem_id="search"
                    )
                    refresh = gr.Button("Refresh", scale=1, size="md", elem_id="refresh")
                history_count = gr.Markdown(elem_id="history-count")
                history = gr.Gallery(
                    label="History (newest first)",
                    columns=6,  # three on a phone (CSS)
                    fit_columns=False,
                    height=440,  # two rows on a desktop
                    object_fit="contain",
                    allow_preview=False,
                    elem_id="history",
                )
                history_ids = gr.State([])
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3, min_width=300):
                        picked_info = gr.Markdown(
                            "Click an image, or drop a PNG below, to see its parameters.",
                            elem_id="picked-info",
                        )
                        with gr.Row():
                            reuse = gr.Button(
                                "Reuse", variant="primary", interactive=False, elem_id="reuse"
                            )
                            send_picked = gr.Button(
                                "Send to Edit", interactive=False, elem_id="history-send-to-edit"
                            )
                    with gr.Column(scale=2, min_width=300):
                        png = gr.File(
                            label="Drop a PNG to read its parameters",
                            file_types=[".png"],
                            type="binary",
                            elem_id="png-info",
                        )
                picked = gr.State(None)  # parameters of the clicked or dropped image
                picked_path = gr.State(None)  # the clicked image's PNG, for Send to Edit
            with gr.Tab("Train", id="train", elem_id="tab-train") as training_tab:
                train = train_tab(services)
            with gr.Tab("Workers", id="workers", elem_id="tab-workers") as workers_tab:
                workers = workers_view()

        form_fields = [size, steps, guidance, guidance_end, scheduler, count, note, generate]
        model.input(ui.on_model, model, form_fields, api_visibility="private")
        generate.click(
            ui.generate,
            [prompt, negative, model, size, steps, guidance, scheduler, seed, random_seed, count]
            # added later, after the others, so that API clients' positional calls keep working
            + [guidance_end, *loras.inputs],
            [gallery, seed, result_info, progress, preview, job],
            api_name="generate",
            concurrency_limit=None,  # every page waits on the Easel queue, not on Gradio's
            show_progress="hidden",
        )
        cancel.click(ui.cancel, job, None, api_visibility="private", queue=False)

        history_outputs = [history, history_ids, history_count]
        search.submit(ui.history, search, history_outputs, api_visibility="private")
        refresh.click(ui.history, search, history_outputs, api_visibility="private")
        tabs.select(ui.history, search, history_outputs, api_visibility="private")
        picked_outputs = [picked_info, picked, reuse, picked_path, send_picked]
        history.select(ui.pick, history_ids, picked_outputs, api_visibility="private")
        png.upload(ui.read_png, png, picked_outputs, api_visibility="private")
        reuse.click(
            ui.reuse,
            picked,
            [prompt, negative, model, seed, random_seed, count, *form_fields, tabs],
            api_visibility="private",
        )
        demo.load(ui.account, None, account, api_visibility="private", queue=False)
        demo.load(ui.history, search, history_outputs, api_visibility="private")
        demo.load(ui.model_list, None, model, api_visibility="private")  # pulled since start

        _wire_edit(ui, edit)
        wire_workers(
            services,
            workers,
            shown=workers_tab.select,
            hidden=[t.select for t in (generate_tab, edit_tab, history_tab, training_tab)],
        )
        # the LoRA pickers follow their model, and re-read the LoRA folder when their tab is
        # shown, when the page loads and after a training run
        trained = wire_train(services, train, demo)
        for picker, picker_model, tab in (
            (loras, model, generate_tab),
            (edit.loras, edit.model, edit_tab),
        ):
            wire_picker(services, picker, picker_model)
            reread = refresh_event(services, picker, picker_model)
            tab.select(*reread, api_visibility="private")
            demo.load(*reread, api_visibility="private")
            trained = trained.then(*reread, api_visibility="private")
        # Send to Edit: open the tab first, then load the picture (an image editor that gets
        # its picture while its tab is hidden may stay blank)
        to_edit = gr.State(None)  # the PNG on its way to the Edit tab
        loaded = [edit.editor, edit.prompt, edit.negative]
        for button, inputs, handler in (
            (send_result, [gallery, shown], ui.send_result),
            (edit.again, [edit.gallery, edit.shown], ui.send_result),
            (send_picked, [picked_path], ui.send_picked),
        ):
            button.click(handler, inputs, [to_edit, tabs], api_visibility="private").success(
                ui.load_into_editor, to_edit, loaded, api_visibility="private"
            )
        for results, index in ((gallery, shown), (edit.gallery, edit.shown)):
            results.select(_selected, None, index, api_visibility="private", queue=False)
            results.change(lambda: 0, None, index, api_visibility="private", queue=False)
        demo.load(ui.model_list, None, edit.model, api_visibility="private")
    return demo


@dataclass
class _EditTab:
    """The Edit tab's components, for wiring."""

    editor: gr.ImageEditor
    task: gr.Radio
    task_note: gr.Markdown
    prompt: gr.Textbox
    negative: gr.Textbox
    model: gr.Dropdown
    note: gr.Markdown
    strength: gr.Slider
    mask_blur: gr.Slider
    only_masked: gr.Checkbox
    outpaint: gr.Row
    sides: list[gr.Number]  # left, top, right, bottom
    style_image: gr.Image
    style_strength: gr.Slider
    seed: gr.Number
    random_seed: gr.Checkbox
    loras: LoraPicker
    run: gr.Button
    cancel: gr.Button
    progress: gr.HTML
    preview: gr.Image
    gallery: gr.Gallery
    info: gr.Markdown
    again: gr.Button
    job: gr.State
    shown: gr.State


def _edit_tab(ui: _Handlers, form: ModelForm) -> _EditTab:
    """The Edit tab's layout (inside its ``gr.Tab``): the picture with its painted mask and the
    task's controls on the left, the job's status and results on the right."""
    task = EDIT_TASK
    shown = task_controls(task)
    strength = default_strength(task, ui.services.model_info(form.model, ANYONE).defaults)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            editor = gr.ImageEditor(
                label="Picture (for inpaint: paint over what to repaint)",
                type="pil",
                image_mode="RGBA",  # the layers' alpha is the mask
                sources=["upload", "clipboard"],
                transforms=(),  # no crop or resize: the mask must match the picture
                layers=False,  # one paint layer: the mask
                format="png",
                height=420,
                elem_id="edit-image",
                **_editor_tools(None),
            )
            task_choice = gr.Radio(
                choices=list(EDIT_TASKS), value=task, label="Task", elem_id="edit-task"
            )
            note_for_task = gr.Markdown(task_note(task), elem_id="edit-task-note")
            prompt = gr.Textbox(
                label="Prompt",
                lines=2,
                placeholder="what the painted area (or the whole picture) should show",
                elem_id="edit-prompt",
            )
            negative = gr.Textbox("", label="Negative prompt", elem_id="edit-negative")
            model = gr.Dropdown(
                choices=model_choices(ui.models()),
                value=form.model,
                label="Model",
                elem_id="edit-model",
            )
            note = gr.Markdown(form.note, elem_id="edit-model-note")
            strength_slider = gr.Slider(
                0.01, 1, value=strength, step=0.01, label="Strength",
                info="how much may change (1: the painted area is drawn afresh)",
                visible=shown["strength"], elem_id="edit-strength",
            )  # fmt: skip
            with gr.Row():
                mask_blur = gr.Slider(
                    0, MAX_MASK_BLUR, value=default_value("mask_blur"), step=1,
                    label="Mask blur (px)", visible=shown["mask_blur"], elem_id="edit-mask-blur",
                )  # fmt: skip
                only_masked = gr.Checkbox(
                    value=False,
                    label="Only masked",
                    info="repaint a crop around the mask at the model's size",
                    visible=shown["only_masked"],
                    elem_id="edit-only-masked",
                )
            with gr.Row(visible=shown["outpaint"], elem_id="edit-outpaint") as outpaint:
                sides = [
                    gr.Number(
                        value=0,
                        precision=0,
                        minimum=0,
                        label=f"{side.title()} (px)",
                        min_width=80,
                        elem_id=f"edit-outpaint-{side}",
                    )
                    for side in OUTPAINT_SIDES
                ]
            with gr.Row():
                style_image = gr.Image(
                    label="Style reference",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    height=160,
                    visible=shown["style_image"],
                    elem_id="edit-style-image",
                )
                style_strength = gr.Slider(
                    0, 1, value=default_value("style_strength"), step=0.01,
                    label="Style strength", info="how much of the reference's colours",
                    visible=shown["style_strength"], elem_id="edit-style-strength",
                )  # fmt: skip
            with gr.Row():
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="edit-seed")
                random_seed = gr.Checkbox(
                    value=True, label="Random seed", elem_id="edit-random-seed"
                )
            loras = lora_picker(ui.services, form.model, prefix="edit-")
            with gr.Row():
                run = gr.Button(
                    "Edit", variant="primary", interactive=form.available, elem_id="edit-run"
                )
                cancel = gr.Button("Cancel", variant="stop", elem_id="edit-cancel")
        with gr.Column(scale=2, min_width=300):
            progress = gr.HTML(status.idle_html(), elem_id="edit-status")
            preview = gr.Image(
                label="Preview",
                interactive=False,
                height=256,
                visible=False,  # shown while a job runs
                elem_id="edit-preview",
            )
            gallery = gr.Gallery(
                label="Result",
                columns=1,
                height="fit-content",
                object_fit="contain",
                interactive=False,
                elem_id="edit-result",
            )
            info = gr.Markdown(elem_id="edit-result-info")
            again = gr.Button("Edit this result", size="sm", elem_id="edit-again")
    return _EditTab(
        editor=editor,
        task=task_choice,
        task_note=note_for_task,
        prompt=prompt,
        negative=negative,
        model=model,
        note=note,
        strength=strength_slider,
        mask_blur=mask_blur,
        only_masked=only_masked,
        outpaint=outpaint,
        sides=sides,
        style_image=style_image,
        style_strength=style_strength,
        seed=seed,
        random_seed=random_seed,
        loras=loras,
        run=run,
        cancel=cancel,
        progress=progress,
        preview=preview,
        gallery=gallery,
        info=info,
        again=again,
        job=gr.State(None),
        shown=gr.State(0),
    )


def _wire_edit(ui: _Handlers, tab: _EditTab) -> None:
    """The Edit tab's own events (Send to Edit is wired with the other tabs' buttons)."""
    task_outputs = [
        tab.task_note,
        tab.strength,
        tab.mask_blur,
        tab.only_masked,
        tab.outpaint,
        tab.style_image,
        tab.style_strength,
    ]
    tab.task.input(ui.on_edit_task, [tab.task, tab.model], task_outputs, api_visibility="private")
    tab.model.input(
        ui.on_edit_model, [tab.model, tab.task], [tab.note, tab.run, tab.strength],
        api_visibility="private",
    )  # fmt: skip
    # (hidden progress: a "processing" veil over the canvas would swallow the first strokes)
    tab.editor.upload(
        ui.on_edit_upload, tab.editor, tab.editor, api_visibility="private",
        queue=False, show_progress="hidden",
    )  # fmt: skip
    tab.run.click(
        ui.edit,
        [tab.editor, tab.task, tab.prompt, tab.negative, tab.model, tab.strength, tab.mask_blur]
        + [tab.only_masked, *tab.sides, tab.style_image, tab.style_strength, tab.seed]
        + [tab.random_seed, *tab.loras.inputs],
        [tab.gallery, tab.seed, tab.info, tab.progress, tab.preview, tab.job],
        api_visibility="private",
        concurrency_limit=None,  # every page waits on the Easel queue, not on Gradio's
        show_progress="hidden",
    )
    tab.cancel.click(ui.cancel, tab.job, None, api_visibility="private", queue=False)


def _editor_tools(size: tuple[int, int] | None) -> dict[str, Any]:
    """The editor's brush and eraser, sized for a picture of ``size`` (the smallest before one
    is loaded). Any colour marks the mask; a see-through one keeps the picture visible under
    the paint."""
    radius = brush_size(*size) if size else MIN_BRUSH
    return {
        "brush": gr.Brush(colors=[BRUSH_COLOR], color_mode="fixed", default_size=radius),
        "eraser": gr.Eraser(default_size=radius),
    }


def _selected(evt: gr.SelectData) -> int:
    return int(evt.index)


def mount_ui(app: FastAPI, services: Services, path: str = "/") -> FastAPI:
    """Mount the page on ``app`` at ``path``; call it after the API's routes and its gate
    (``easel.api.auth``) are added: the page acts for the principal the gate found."""
    images_dir = services.settings.images_dir.resolve()
    images_dir.mkdir(parents=True, exist_ok=True)
    # Galleries take the stored PNGs (allowed_paths), which Gradio copies into its cache for the
    # page; its file route must not serve the store itself, where ids would be the only guard.
    app.add_middleware(PrivateImages, images_dir=images_dir)
    gr.mount_gradio_app(
        app,
        build_ui(services),
        path=path,
        auth_dependency=page_user,  # every Gradio route: the gate's principal, else 401
        allowed_paths=[str(images_dir)],
        footer_links=["api"],
        run_history=False,  # Easel's History tab is the record; keep nothing in the browser
        # per file: an input image, or a dataset's zip (the request as a whole is held to
        # about the same by easel.api.limits.DeclaredBodyLimit)
        max_file_size=max(
            services.settings.max_upload_bytes, services.settings.max_dataset_upload_bytes
        ),
        css=CSS + WORKERS_CSS,
        head=HEAD,
    )
    # each open page holds a heartbeat stream; when the server stops, end them (Gradio's stop
    # event) rather than leave uvicorn to cut them after its grace period
    gradio_app = next(
        r.app for r in reversed(app.routes) if isinstance(r, Mount) and isinstance(r.app, App)
    )
    on_stopping = getattr(app.state, "on_stopping", None)  # set by easel.api.app.create_app
    if on_stopping is not None:
        on_stopping.append(gradio_app.stop_event.set)
    return app


class _Handlers:
    """The page's event handlers; each calls ``services`` and returns values for components."""

    def __init__(self, services: Services) -> None:
        self.services = services

    # --- models ---------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Catalog models, plus the default model when it is a path outside the catalog."""
        infos = self.services.list_models()
        default = self.services.settings.default_model
        if all(info.record.id != default for info in infos):
            with contextlib.suppress(EaselError):
                infos.insert(0, self.services.model_info(default, ANYONE))
        return infos

    def model_list(self) -> Any:
        return gr.update(choices=model_choices(self.models()))

    def form(self, model_id: str, principal: Principal) -> ModelForm:
        return model_form(self.services.model_info(model_id, principal))

    def first_form(self) -> ModelForm:
        """The form the page opens with: the default model's, else the first catalog model's
        (a mistyped EASEL_DEFAULT_MODEL must not keep the page from loading)."""
        try:
            return self.form(self.services.settings.default_model, ANYONE)
        except EaselError:
            return model_form(self.services.list_models()[0])

    def on_model(self, model_id: str, request: gr.Request | None = None) -> tuple[Any, ...]:
        """The picked model's size presets, slider ranges and defaults."""
        with user_errors():
            return _form_updates(self.form(model_id, acting_for(self.services, request)))

    def account(self, request: gr.Request | None = None) -> Any:
        """The "Signed in as NAME · Sign out" line; hidden on a server without keys."""
        with user_errors():
            line = signed_in_html(acting_for(self.services, request))
        return gr.update(value=line, visible=bool(line))

    # --- generate -------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        model: str | None = None,
        size: str | None = None,
        steps: float | None = None,
        guidance: float | None = None,
        scheduler: str | None = None,
        seed: float | None = None,
        random_seed: bool = True,
        count: float = 1,
        guidance_end: float | None = None,
        lora_1: str | None = None,
        lora_weight_1: float | None = 1.0,
        lora_2: str | None = None,
        lora_weight_2: float | None = 1.0,
        lora_3: str | None = None,
        lora_weight_3: float | None = 1.0,
        lora_4: str | None = None,
        lora_weight_4: float | None = 1.0,
        request: gr.Request | None = None,
    ) -> AsyncIterator[tuple[Any, ...]]:
        """Submit a job and follow it: yields (gallery, seed, info, status, preview, job id).

        ``lora_i``/``lora_weight_i`` are the LoRA picker's rows (a LoRA's name, "" for none).
        The last update is complete (no skipped outputs): it is what API clients receive.
        """
        # 1. check the request and queue it (a bad field is an error naming it)
        with user_errors("Cannot generate"):
            principal = acting_for(self.services, request)
            width, height = parse_size(size) if size else (None, None)
            params = GenerationParams(
                prompt=prompt,
                model=model or None,
                negative_prompt=negative_prompt or "",
                num_inference_steps=_int(steps),
                guidance_scale=guidance,
                guidance_end=guidance_end,
                width=width,
                height=height,
                seed=None if random_seed else _int(seed),
                num_images=_int(count) or 1,
                scheduler=scheduler or None,
                loras=picked_loras(
                    [lora_1, lora_2, lora_3, lora_4],
                    [lora_weight_1, lora_weight_2, lora_weight_3, lora_weight_4],
                ),
            )
            job = await asyncio.to_thread(self.services.submit_job, params, principal=principal)
        # 2. follow it until it ends
        async for update in self._show_job(job, principal, failed_title="Generation failed"):
            yield update

    async def _show_job(
        self, job: JobRecord, principal: Principal, failed_title: str
    ) -> AsyncIterator[tuple[Any, ...]]:
        """Follow a submitted job for the page (Generate and Edit alike): yields (gallery, seed,
        info, status, preview, job id), ending with a complete update; a failed job ends with
        an error pop-up titled ``failed_title``."""
        # 1. show the seed it will use and where it waits
        waiting = await waiting_now(self.services, job.id)
        yield [], job.params.seed, "", waiting.html, gr.skip(), job.id
        # 2. follow its events until it ends
        skip, no_preview = gr.skip(), gr.update(value=None, visible=False)
        async for event in follow_job(self.services, job.id):
            if isinstance(event, Waiting):
                yield skip, skip, skip, event.html, skip, skip
            elif event.type == "started":
                yield skip, skip, skip, status.started_html(), skip, skip
            elif event.type == "progress":
                eta = await asyncio.to_thread(self.services.job_eta, job.id)
                html = status.running_html(event.data["step"], event.data["total"], eta)
                shown = (
                    gr.update(value=_data_url_image(event.data["preview"]), visible=True)
                    if "preview" in event.data
                    else skip
                )
                yield skip, skip, skip, html, shown, skip
            elif event.type == "canceled":
                yield [], job.params.seed, "", status.canceled_html(), no_preview, None
            elif event.type == "failed":
                html = status.failed_html(event.data["error"])
                yield [], job.params.seed, "", html, no_preview, None
                raise gr.Error(event.data["error"], title=failed_title)
            elif event.type == "succeeded":
                # 3. show the stored images with their parameters
                done = await asyncio.to_thread(self.services.get_job, job.id, principal)
                items, info = await asyncio.to_thread(self._results, done, principal)
                html = status.done_html(len(items), event.data.get("seconds"))
                yield items, job.params.seed, info, html, no_preview, None

    def cancel(self, job_id: str | None, request: gr.Request | None = None) -> None:
        """Cancel this page's job: a queued one never starts, a running one stops at its next
        step; the generate handler shows the outcome when the job's event arrives."""
        if job_id:
            with user_errors("Cannot cancel"):
                self.services.cancel_job(job_id, acting_for(self.services, request))

    def _results(self, job: JobRecord, principal: Principal) -> tuple[list[tuple[str, str]], str]:
        """Gallery items (stored PNG, caption) and the parameters of the first image."""
        path = self.services.image_path
        items = [(str(path(i.id, principal)), f"seed {i.seed}") for i in job.images]
        if not job.images:
            return items, ""
        png = self.services.image_bytes(job.images[0].id, principal)
        info = self.services.read_image_info(png)
        seeds = ", ".join(str(i.seed) for i in job.images)
        return items, f"**Seeds:** {seeds}\n\n```text\n{info['parameters']}\n```"

    # --- edit -----------------------------------------------------------------------------------

    async def edit(
        self,
        editor: dict[str, Any] | None,
        task: str,
        prompt: str,
        negative_prompt: str = "",
        model: str | None = None,
        strength: float | None = None,
        mask_blur: float | None = None,
        only_masked: bool = False,
        left: float | None = 0,
        top: float | None = 0,
        right: float | None = 0,
        bottom: float | None = 0,
        style_image: str | None = None,
        style_strength: float | None = None,
        seed: float | None = None,
        random_seed: bool = True,
        lora_1: str | None = None,
        lora_weight_1: float | None = 1.0,
        lora_2: str | None = None,
        lora_weight_2: float | None = 1.0,
        lora_3: str | None = None,
        lora_weight_3: float | None = 1.0,
        lora_4: str | None = None,
        lora_weight_4: float | None = 1.0,
        request: gr.Request | None = None,
    ) -> AsyncIterator[tuple[Any, ...]]:
        """Store the inputs, submit the edit and follow it: yields what ``generate`` yields."""
        # 1. check the request, store its input images by id and queue it
        with user_errors("Cannot edit"):
            principal = acting_for(self.services, request)
            form = EditForm(
                task=task,
                prompt=prompt,
                negative_prompt=negative_prompt or "",
                model=model or None,
                strength=strength,
                mask_blur=_int(mask_blur),
                only_masked=bool(only_masked),
                outpaint={
                    side: _int(value) or 0
                    for side, value in zip(OUTPAINT_SIDES, (left, top, right, bottom), strict=True)
                },
                style_strength=style_strength,
                seed=None if random_seed else _int(seed),
                loras=picked_loras(
                    [lora_1, lora_2, lora_3, lora_4],
                    [lora_weight_1, lora_weight_2, lora_weight_3, lora_weight_4],
                ),
            )
            params = await asyncio.to_thread(
                self._edit_params, form, editor, style_image, principal
            )
            job = await asyncio.to_thread(self.services.submit_job, params, principal=principal)
        # 2. follow it until it ends
        async for update in self._show_job(job, principal, failed_title="Edit failed"):
            yield update

    def _edit_params(
        self,
        form: EditForm,
        editor: dict[str, Any] | None,
        style_path: str | None,
        principal: Principal,
    ) -> GenerationParams:
        """The job's request: the editor's picture (and, for inpaint, the mask painted on it)
        and the style reference stored through ``upload_image`` and named by id."""
        spec = edit_spec(form.task)
        editor = editor or {}
        background: Image.Image | None = editor.get("background")
        if background is None and "image" in spec.inputs:
            raise InvalidParams(
                "image: upload a picture to edit, or send one here from Generate or History",
                field="image",
            )
        images: dict[str, Image.Image] = {}
        if background is not None:  # every edit task takes it (style: optional content)
            images["image"] = opaque(background)
            if "mask" in spec.image_fields:  # checked before anything is stored
                images["mask"] = mask_from_layers(background.size, editor.get("layers") or [])
        upload = self.services.upload_image
        ids = {name: upload(png_bytes(im), principal).id for name, im in images.items()}
        if "style_image" in spec.image_fields and style_path:
            data = Path(style_path).read_bytes()
            ids["style_image"] = upload(data, principal).id
        return form.params(ids)

    def on_edit_task(
        self, task: str, model_id: str | None, request: gr.Request | None = None
    ) -> tuple[Any, ...]:
        """Show the controls the task uses, with its default strength: updates for (task note,
        strength, mask blur, only masked, outpaint sides, style image, style strength)."""
        with user_errors():
            shown = task_controls(task)
            info = self.services.model_info(
                model_id or self.services.settings.default_model,
                acting_for(self.services, request),
            )
        return (
            task_note(task),
            gr.update(visible=shown["strength"], value=default_strength(task, info.defaults)),
            gr.update(visible=shown["mask_blur"]),
            gr.update(visible=shown["only_masked"]),
            gr.update(visible=shown["outpaint"]),
            gr.update(visible=shown["style_image"]),
            gr.update(visible=shown["style_strength"]),
        )

    def on_edit_model(
        self, model_id: str, task: str, request: gr.Request | None = None
    ) -> tuple[Any, ...]:
        """The picked model's note, whether Edit can run, and its strength for the task."""
        with user_errors():
            info = self.services.model_info(model_id, acting_for(self.services, request))
        form = model_form(info)
        return (
            form.note,
            gr.update(interactive=form.available),
            gr.update(value=default_strength(task, info.defaults)),
        )

    def on_edit_upload(self, editor: dict[str, Any] | None) -> Any:
        """A brush sized for the uploaded picture (Gradio's default is a fixed 25 px)."""
        background = (editor or {}).get("background")
        return gr.update(**_editor_tools(background.size)) if background is not None else gr.skip()

    def send_result(
        self, items: list[tuple[str, str | None]] | None, index: int
    ) -> tuple[str, Any]:
        """Send the shown result (the one opened in the gallery, else the first) to Edit:
        (its PNG, the Edit tab opened); ``load_into_editor`` follows."""
        if not items:
            raise gr.Error("There is no result to edit yet.")
        return items[min(index, len(items) - 1)][0], gr.Tabs(selected="edit")

    def send_picked(self, path: str | None) -> tuple[str, Any]:
        """Send the History image that was clicked to Edit (as ``send_result``)."""
        if not path:
            raise gr.Error("Pick an image first.")
        return path, gr.Tabs(selected="edit")

    def load_into_editor(self, path: str) -> tuple[Any, ...]:
        """Updates for (editor, edit prompt, edit negative prompt): the picture as the editor's
        background with nothing painted, a brush sized for it, and its prompts when its PNG
        carries Easel's parameters."""
        png = Path(path).read_bytes()
        with Image.open(io.BytesIO(png)) as image:
            size = image.size
        params: dict[str, Any] = {}
        with contextlib.suppress(EaselError):
            params = self.services.read_image_info(png).get("easel") or {}
        editor = {"background": path, "layers": [], "composite": path}
        return (
            gr.update(value=editor, **_editor_tools(size)),
            params.get("prompt", gr.skip()),
            params.get("negative_prompt", gr.skip()),
        )

    # --- history --------------------------------------------------------------------------------

    def history(
        self, query: str | None, request: gr.Request | None = None
    ) -> tuple[list[tuple[str, str]], list[str], str]:
        """The signed-in key's stored images (an admin key's: everyone's), newest first,
        optionally only prompts containing ``query``."""
        with user_errors():
            principal = acting_for(self.services, request)
        # what jobs made; an edit's uploaded inputs and masks are no pictures to browse
        records = self.services.list_images(
            query or None, limit=HISTORY_LIMIT, kind="generated", principal=principal
        )
        items, ids = [], []
        for record in records:
            with contextlib.suppress(EaselError):  # a file deleted by hand: leave it out
                path = self.services.image_path(record.id, principal)
                items.append((str(path), _caption(record.prompt)))
                ids.append(record.id)
        found = f"{len(ids)} image{'s' if len(ids) != 1 else ''}"
        if query:
            found += f" matching “{query}”"
        return items, ids, found

    def pick(
        self, ids: list[str], evt: gr.SelectData, request: gr.Request | None = None
    ) -> tuple[Any, ...]:
        """Parameters of the clicked History image, and its file for Send to Edit: updates for
        (info, parameters, Reuse, path, Send to Edit)."""
        with user_errors():
            path = self.services.image_path(ids[evt.index], acting_for(self.services, request))
            png = path.read_bytes()
        return *self._describe(png), str(path), gr.update(interactive=True)

    def read_png(self, data: bytes | None) -> tuple[Any, ...]:
        """Parameters stored in a dropped PNG (A1111 ``parameters`` and Easel's exact JSON)."""
        nothing_to_send = (None, gr.update(interactive=False))
        if not data:
            return "", None, gr.update(interactive=False), *nothing_to_send
        return *self._describe(data), *nothing_to_send

    def _describe(self, png: bytes) -> tuple[str, dict | None, Any]:
        try:
            info = self.services.read_image_info(png)
        except EaselError as exc:
            return f"**Cannot read this file:** {exc.message}", None, gr.update(interactive=False)
        text = info.get("parameters")
        params = info.get("easel")
        if text is None and params is None:
            message = "This image carries no generation parameters."
            return message, None, gr.update(interactive=False)
        shown = f"```text\n{text}\n```" if text else ""
        if params is None:
            shown += "\n\nOnly the A1111 text is present; Reuse needs Easel's parameters."
        return shown, params, gr.update(interactive=params is not None)

    def reuse(self, params: dict | None, request: gr.Request | None = None) -> tuple[Any, ...]:
        """Fill the Generate form with an image's parameters (its own seed, fixed) and open it."""
        if not params:
            raise gr.Error("Pick an image first.")
        model = params.get("model") or self.services.settings.default_model
        with user_errors("Cannot reuse"):
            form = self.form(model, acting_for(self.services, request))
        size = format_size(int(params["width"]), int(params["height"]))
        preset = next((s for s in form.sizes if s.split()[0] == size.split()[0]), None)
        sizes = form.sizes if preset else [size, *form.sizes]
        return (
            params.get("prompt", ""),
            params.get("negative_prompt", ""),
            model,
            params.get("seed"),
            False,
            1,
            gr.update(choices=sizes, value=preset or size),
            gr.update(maximum=form.max_steps, value=params.get("num_inference_steps")),
            gr.update(
                minimum=form.guidance_range[0],
                maximum=form.guidance_range[1],
                value=params.get("guidance_scale"),
            ),
            # an image from before guidance_end existed used guidance on every step
            _guidance_end_update(form, params.get("guidance_end", 1.0)),
            gr.update(choices=list(form.schedulers), value=params.get("scheduler")),
            gr.update(maximum=form.max_images, value=1),
            form.note,
            gr.update(interactive=form.available),
            gr.Tabs(selected="generate"),
        )


def _form_updates(form: ModelForm) -> tuple[Any, ...]:
    """Updates for (size, steps, guidance, guidance_end, scheduler, count, note, generate) from a
    model's form."""
    return (
        gr.update(choices=form.sizes, value=form.size),
        gr.update(maximum=form.max_steps, value=form.steps),
        gr.update(
            minimum=form.guidance_range[0], maximum=form.guidance_range[1], value=form.guidance
        ),
        _guidance_end_update(form, form.guidance_end),
        gr.update(choices=list(form.schedulers), value=form.scheduler),
        gr.update(maximum=form.max_images, value=1),
        form.note,
        gr.update(interactive=form.available),
    )


def _guidance_end_update(form: ModelForm, value: float | None) -> Any:
    """The guidance-end slider: shown only for families that can end guidance early; elsewhere
    it stays at 1 (guidance on every step), the only value they accept."""
    if not form.ends_guidance_early:
        return gr.update(value=1.0, visible=False)
    return gr.update(value=form.guidance_end if value is None else value, visible=True)


def _data_url_image(url: str) -> Image.Image:
    """A preview sent as ``data:image/jpeg;base64,...`` in a progress event."""
    return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))


def _caption(prompt: str, limit: int = 60) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)
