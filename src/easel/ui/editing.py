"""What the Edit tab needs besides Gradio: the editor's painted layers as a mask, the controls each
task shows, the request it sends, and the brush size for a picture. PIL and NumPy only (no
Gradio, no torch).

    mask = mask_from_layers(background.size, value["layers"])   # "L", 255 = repaint
    controls = task_controls("outpaint")                        # {"outpaint": True, ...}
    params = EditForm(task="inpaint", prompt="a cat").params({"image": id1, "mask": id2})

The tasks and the fields each one uses come from ``domain.TASK_SPECS``: the tab reads the row
instead of testing ``task == ...``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from easel.domain import TASK_SPECS, GenerationParams, InvalidParams, TaskSpec
from easel.models.params import TASK_DEFAULTS, TASK_STRENGTH

# Every task that takes an input image (all but txt2img), in the table's order.
EDIT_TASKS: tuple[str, ...] = tuple(name for name, spec in TASK_SPECS.items() if spec.image_fields)
# The Edit tab's optional controls, each shown only for the tasks whose row names the field.
CONTROLS: tuple[str, ...] = ("strength", "mask_blur", "only_masked", "outpaint", "style_strength")
# The brush's radius is this share of the image's shorter side (Gradio's own default is a fixed
# 25 px: a blot that covers most of a 64×64 picture).
BRUSH_SHARE = 1 / 20
MIN_BRUSH = 2


@dataclass(frozen=True)
class EditForm:
    """The Edit tab's fields as typed values, every control included; :meth:`params` keeps
    the ones the task uses."""

    task: str
    prompt: str
    negative_prompt: str = ""
    model: str | None = None
    strength: float | None = None
    mask_blur: int | None = None
    only_masked: bool = False
    outpaint: dict[str, int] = field(default_factory=dict)  # pixels per side
    style_strength: float | None = None
    seed: int | None = None  # None: a random one
    loras: list[dict[str, Any]] | None = None  # [{"id", "weight"}] from the LoRA picker

    def params(self, images: Mapping[str, str]) -> GenerationParams:
        """The job's request with the stored input images (field -> image id). The controls
        the task's row does not name stay unset: the queue refuses a field a task ignores,
        and a hidden control's value is not the user's choice."""
        spec = edit_spec(self.task)
        fields: dict[str, Any] = {n: getattr(self, n) for n in CONTROLS if n in spec.fields}
        fields.update(images)
        return GenerationParams(
            prompt=self.prompt,
            model=self.model,
            task=self.task,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            loras=self.loras,
            **fields,
        )


def edit_spec(task: str) -> TaskSpec:
    """The TASK_SPECS row of an editing task; InvalidParams(field="task") for any other."""
    if task not in EDIT_TASKS:
        raise InvalidParams(
            f"task must be one of {', '.join(EDIT_TASKS)} (got {task!r})", field="task"
        )
    return TASK_SPECS[task]


def mask_from_layers(size: tuple[int, int], layers: Sequence[Image.Image | None]) -> Image.Image:
    """The inpainting mask from an image editor's layers: 255 (repaint) wherever any layer has
    paint (alpha above 0, whatever its colour), 0 elsewhere, as an "L" image of ``size`` (the
    background's width and height).

    A layer of another size (a canvas that was not the picture's size) is scaled to ``size``
    with nearest-neighbour sampling, so the mask stays binary. Raises InvalidParams(field="mask")
    when nothing is painted: an inpaint with an empty mask would return the input unchanged.
    """
    painted = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != size:
            alpha = alpha.resize(size, Image.Resampling.NEAREST)
        painted |= np.asarray(alpha) > 0
    if not painted.any():
        raise InvalidParams(
            "mask: nothing is painted; paint the area to repaint on the image with the brush",
            field="mask",
        )
    return Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), "L")


def opaque(image: Image.Image) -> Image.Image:
    """``image`` without its alpha channel when every pixel is opaque (the editor hands back
    RGBA even for an RGB picture); a picture with real transparency keeps it."""
    if image.mode == "RGBA" and image.getchannel("A").getextrema()[0] == 255:
        return image.convert("RGB")
    return image


def task_controls(task: str) -> dict[str, bool]:
    """Which optional controls the task uses (``CONTROLS`` -> shown), plus ``"mask"`` (the brush
    matters) and ``"style_image"`` (the reference upload), read from its TASK_SPECS row."""
    spec = edit_spec(task)
    shown = {name: name in spec.fields for name in CONTROLS}
    shown["mask"] = "mask" in spec.image_fields
    shown["style_image"] = "style_image" in spec.image_fields
    return shown


def default_strength(task: str, model_defaults: Mapping[str, Any]) -> float:
    """The strength the queue would pick for ``task`` on a model with these request defaults
    (``ModelInfo.defaults``): the task's own (inpaint and outpaint 1, style 0.3), else the
    model's img2img strength."""
    if task in TASK_STRENGTH:
        return TASK_STRENGTH[task]
    return float(model_defaults["strength"])  # every family sets one


def default_value(name: str) -> Any:
    """The queue's default for an editing field no model sets (``mask_blur``, ``style_strength``)."""
    return TASK_DEFAULTS[name]


def task_note(task: str) -> str:
    """The line under the task choice: the task's description from its TASK_SPECS row."""
    note = f"**{task}**: {edit_spec(task).description}"
    if task_controls(task)["mask"]:
        note += " (here the mask is what you paint on the picture, in any colour)"
    return note


def brush_size(width: int, height: int) -> int:
    """The brush's radius in image pixels for a picture of this size (3 px at 64×64, 51 px at
    1024×1024)."""
    return max(MIN_BRUSH, round(min(width, height) * BRUSH_SHARE))
