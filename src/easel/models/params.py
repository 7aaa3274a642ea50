"""Turn a partial request into a complete, validated one for a given model.

Pure Python (no torch). Every check names the field and the allowed values, so the CLI,
API and UI can show the message as is.

    >>> p = resolve_params(GenerationParams(prompt="a cat"), record, get_family("sd"))
    >>> p.width, p.num_inference_steps, p.seed is not None
    (512, 25, True)
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from typing import Any, Protocol

from easel.domain import (
    IMAGE_FIELDS,
    OUTPAINT_SIDES,
    TASK_SPECS,
    GenerationParams,
    InvalidParams,
    LoraNotFound,
    LoraRecord,
    ModelRecord,
    TaskSpec,
)
from easel.models.families import LIMIT_FIELDS, Family

MAX_SEED = 2**32 - 1
# keys of Family.defaults / ModelRecord.defaults that are GenerationParams fields
PARAM_DEFAULTS = (
    "num_inference_steps",
    "guidance_scale",
    "guidance_end",
    "width",
    "height",
    "scheduler",
    "strength",
)
# editing fields' defaults where neither the family nor the model sets one
TASK_DEFAULTS: dict[str, Any] = {"mask_blur": 4, "only_masked": False, "style_strength": 1.0}
# per task: a default strength in place of the model's (which is img2img's). Inpainting with an
# ordinary UNet repaints from pure noise in the mask (1.0); style redraws its recoloured content
# lightly (on tiny-shapes 0.3 kept the reference's colours in 90 % of held-out cases, 0.45 in
# 81 %, 0.6 in 42 %: docs/TRAINING-LOG.md, "Editing").
TASK_STRENGTH = {"inpaint": 1.0, "outpaint": 1.0, "style": 0.3}
MAX_MASK_BLUR = 64
MAX_LORAS = 8  # LoRAs in one request
LORA_WEIGHT_RANGE = (-4.0, 4.0)


class LoraLookup(Protocol):
    """What resolve_params asks of the LoRA catalog (``models.loras.LoraCatalog``)."""

    def get(self, name: str) -> LoraRecord: ...


def effective_family(record: ModelRecord, family: Family) -> Family:
    """``family`` with the record's limit overrides applied (e.g. tiny-shapes' 32..128 px)."""
    overrides = {k: record.defaults[k] for k in LIMIT_FIELDS if k in record.defaults}
    return dataclasses.replace(family, **overrides) if overrides else family


def defaults_for(record: ModelRecord, family: Family) -> dict[str, Any]:
    """Request defaults for this model: the family's, overridden by the catalog entry's."""
    merged = {k: family.defaults[k] for k in PARAM_DEFAULTS if k in family.defaults}
    merged.update({k: record.defaults[k] for k in PARAM_DEFAULTS if k in record.defaults})
    return merged


def resolve_params(
    params: GenerationParams,
    record: ModelRecord,
    family: Family,
    input_sizes: Mapping[str, tuple[int, int]] | None = None,
    *,
    loras: LoraLookup | None = None,
) -> GenerationParams:
    """A copy of ``params`` with every field concrete and checked against the family's limits.

    ``None`` fields take the model's defaults, a missing seed is drawn at random, and
    ``model`` becomes the record's id. Fields the task does not use must be unset (see
    ``domain.TASK_SPECS``). ``input_sizes`` (image field -> (width, height)) lets an edit's
    size default to its input's and checks that a mask matches its image. ``loras`` finds
    the LoRAs ``params.loras`` names (each must exist and fit the model's family). Raises
    InvalidParams(field=...) on the first bad field.
    """
    family = effective_family(record, family)
    values = params.to_dict()
    _check_task(values["task"], family)
    spec = TASK_SPECS[values["task"]]
    _check_unused_fields(values, spec)
    defaults = {**TASK_DEFAULTS, **defaults_for(record, family)}
    if spec.name in TASK_STRENGTH:
        defaults["strength"] = TASK_STRENGTH[spec.name]
    for key, default in defaults.items():
        used = key in spec.fields or key not in (*TASK_DEFAULTS, "strength")
        if used and values.get(key) is None:
            values[key] = default
    values["model"] = record.id
    if values["seed"] is None:
        values["seed"] = random.randint(0, MAX_SEED)
    size_given = params.width is not None or params.height is not None
    _check_inputs(values, spec, family, input_sizes or {}, size_given)

    if spec.kind == "generate":  # a training job's prompts are its dataset's captions
        _check_prompt(values)
    for name in ("width", "height"):
        _check_size(name, values[name], family)
    check_int("num_inference_steps", values["num_inference_steps"], 1, family.max_steps)
    check_number("guidance_scale", values["guidance_scale"], *family.guidance_range)
    check_guidance_end(values["guidance_end"], family)
    check_int("num_images", values["num_images"], 1, family.max_images)
    check_int("seed", values["seed"], 0, MAX_SEED)
    if values["scheduler"] not in family.schedulers:
        raise InvalidParams(
            f"scheduler must be one of {', '.join(family.schedulers)} "
            f"for {family.name} models (got {values['scheduler']!r})",
            field="scheduler",
        )
    if values["strength"] is not None:
        check_number("strength", values["strength"], 0.0, 1.0)
        if values["strength"] == 0:
            raise InvalidParams("strength must be above 0 and at most 1 (got 0)", field="strength")
        # diffusers runs int(steps × strength) of the steps; none would return the input. A
        # default strength (style's 0.3 at a turbo model's 1-4 steps) rises to one step.
        steps = values["num_inference_steps"]
        if params.strength is None and _is_int(steps) and steps >= 1:
            values["strength"] = max(values["strength"], math.ceil(1000 / steps) / 1000)
        if int(values["num_inference_steps"] * values["strength"]) < 1:
            raise InvalidParams(
                f"strength × num_inference_steps must reach one step (got {values['strength']!r}"
                f" × {values['num_inference_steps']}); raise either",
                field="strength",
            )
    if values["style_strength"] is not None:
        check_number("style_strength", values["style_strength"], 0.0, 1.0)
    if values["mask_blur"] is not None:
        check_int("mask_blur", values["mask_blur"], 0, MAX_MASK_BLUR)
    if values["only_masked"] is not None and not isinstance(values["only_masked"], bool):
        raise InvalidParams(
            f"only_masked must be true or false (got {values['only_masked']!r})",
            field="only_masked",
        )
    values["loras"] = _check_loras(values["loras"], record, family, loras)
    values["guidance_scale"] = float(values["guidance_scale"])
    values["guidance_end"] = float(values["guidance_end"])
    return GenerationParams.from_dict(values)


def fit_size(width: int, height: int, family: Family, area: int) -> tuple[int, int]:
    """The size a model works at for an input of ``width`` × ``height``: the input's aspect at
    ``area`` pixels (the model's default size: a model draws best near what it was trained
    at, so a larger input is worked on smaller and a smaller one larger), within the family's
    limits, each side a multiple of ``family.size_multiple``."""
    step = family.size_multiple
    scale = (area / (width * height)) ** 0.5
    scale = max(scale, family.min_size / min(width, height))
    scale = min(scale, family.max_size / max(width, height))  # the max wins for odd shapes

    def side(value: int) -> int:
        snapped = round(value * scale / step) * step
        return min(max(snapped, family.min_size), family.max_size)

    return side(width), side(height)


def canvas_size(size: tuple[int, int], outpaint: Mapping[str, int] | None) -> tuple[int, int]:
    """The image's size after outpainting adds ``outpaint`` pixels on each side."""
    sides = outpaint or {}
    return (
        size[0] + sides.get("left", 0) + sides.get("right", 0),
        size[1] + sides.get("top", 0) + sides.get("bottom", 0),
    )


def _check_unused_fields(values: dict[str, Any], spec: TaskSpec) -> None:
    """Refuse a field only other tasks use (editing inputs, training settings), rather than
    ignore it; and LoRAs on a training job, which trains on the base model alone."""
    specific = dict.fromkeys(
        (*IMAGE_FIELDS, *(f for s in TASK_SPECS.values() for f in (*s.image_fields, *s.fields)))
    )
    for name in specific:
        if values.get(name) is not None and name not in (*spec.image_fields, *spec.fields):
            users = [t for t, s in TASK_SPECS.items() if name in (*s.image_fields, *s.fields)]
            raise InvalidParams(
                f"{name} is not used by task {spec.name}; it is used by {', '.join(users)}",
                field=name,
            )
    if spec.kind == "train" and values.get("loras"):
        raise InvalidParams(
            f"loras is not used by task {spec.name}: it trains on the base model alone",
            field="loras",
        )


def _check_inputs(
    values: dict[str, Any],
    spec: TaskSpec,
    family: Family,
    sizes: Mapping[str, tuple[int, int]],
    size_given: bool,
) -> None:
    """Input image references, outpaint sides, and the size an edit works at: the input's
    (grown by outpaint), fitted to the family's limits, unless the request gave one."""
    for name in spec.inputs:
        if not values.get(name):
            raise InvalidParams(f"{name} is required for task {spec.name}", field=name)
    for name in spec.image_fields:
        if values.get(name) is not None and not isinstance(values[name], str):
            raise InvalidParams(f"{name} must be an image id (got {values[name]!r})", field=name)
    if spec.name == "outpaint":
        values["outpaint"] = _check_outpaint(values["outpaint"], family)
    size = sizes.get("image")
    if size is None:
        return
    if "mask" in sizes and sizes["mask"] != size:
        raise InvalidParams(
            f"mask must be the size of image ({size[0]}×{size[1]}; got "
            f"{sizes['mask'][0]}×{sizes['mask'][1]})",
            field="mask",
        )
    canvas = canvas_size(size, values.get("outpaint"))
    if spec.name == "outpaint" and max(canvas) > family.max_size:
        raise InvalidParams(
            f"outpaint grows the {size[0]}×{size[1]} image to {canvas[0]}×{canvas[1]}; each "
            f"side must stay at most {family.max_size} for {family.name} models",
            field="outpaint",
        )
    if not size_given:  # width and height hold the model's defaults
        area = values["width"] * values["height"]
        values["width"], values["height"] = fit_size(*canvas, family, area)


def _check_outpaint(value: Any, family: Family) -> dict[str, int]:
    allowed = ", ".join(OUTPAINT_SIDES)
    if not isinstance(value, dict) or not set(value) <= set(OUTPAINT_SIDES):
        raise InvalidParams(
            f"outpaint must be an object with pixels to add on any of {allowed} (got {value!r})",
            field="outpaint",
        )
    sides = {side: value.get(side, 0) for side in OUTPAINT_SIDES}
    for side, pixels in sides.items():
        check_int(f"outpaint.{side}", pixels, 0, family.max_size)
    if not any(sides.values()):
        raise InvalidParams("outpaint must add pixels on at least one side", field="outpaint")
    return sides


def _check_loras(
    value: Any, record: ModelRecord, family: Family, lookup: LoraLookup | None
) -> list[dict[str, Any]] | None:
    """``[{"id", "weight"}, ...]`` with float weights (a missing weight is 1.0); None for no
    LoRAs. Each must exist, fit the model's family and appear once, with a finite weight."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise InvalidParams(
            f'loras must be a list of {{"id": NAME, "weight": W}} (got {value!r})', field="loras"
        )
    if len(value) > MAX_LORAS:
        raise InvalidParams(
            f"at most {MAX_LORAS} LoRAs per request (got {len(value)})", field="loras"
        )
    low, high = LORA_WEIGHT_RANGE
    resolved: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        where = f"loras[{index}]"
        if not isinstance(item, dict) or set(item) - {"id", "weight"} or "id" not in item:
            raise InvalidParams(
                f'{where} must be {{"id": NAME, "weight": W}} (got {item!r})', field=where
            )
        name, weight = item["id"], item.get("weight", 1.0)
        if not isinstance(name, str) or any(r["id"] == name for r in resolved):
            problem = "is listed twice" if isinstance(name, str) else "must be a LoRA name"
            raise InvalidParams(f"{where}.id: {name!r} {problem}", field=f"{where}.id")
        number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not number or not math.isfinite(weight) or not low <= weight <= high:
            raise InvalidParams(
                f"{where}.weight must be a number between {low:g} and {high:g} (got {weight!r})",
                field=f"{where}.weight",
            )
        if lookup is None:
            raise InvalidParams("LoRAs cannot be used here", field=f"{where}.id")
        try:
            lora = lookup.get(name)
        except LoraNotFound as exc:  # a bad field of the request, not a missing resource
            raise InvalidParams(f"{where}.id: {exc.message}", field=f"{where}.id") from None
        if lora.family != family.name:
            raise InvalidParams(
                f"{where}.id: LoRA {name!r} is for {lora.family} models; model {record.id} is "
                f"a {family.name} model",
                field=f"{where}.id",
            )
        resolved.append({"id": name, "weight": float(weight)})
    return resolved


def _check_prompt(values: dict[str, Any]) -> None:
    prompt = values["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidParams("prompt must not be empty", field="prompt")
    if not isinstance(values["negative_prompt"], str):
        raise InvalidParams("negative_prompt must be text", field="negative_prompt")


def _check_task(task: str, family: Family) -> None:
    if task not in family.tasks:
        raise InvalidParams(
            f"task must be one of {', '.join(family.tasks)} for {family.name} models "
            f"(got {task!r})",
            field="task",
        )


def check_guidance_end(value: Any, family: Family) -> None:
    """Raise InvalidParams unless 0 < ``value`` <= 1, and 1 where ``family`` cannot end
    guidance early (also used by `easel eval`, which takes the value outside a request)."""
    check_number("guidance_end", value, 0.0, 1.0)
    if value == 0:
        raise InvalidParams(
            "guidance_end must be above 0 and at most 1 (got 0); for no guidance at all, "
            "set guidance_scale to 0",
            field="guidance_end",
        )
    if value < 1 and not family.ends_guidance_early:
        raise InvalidParams(
            f"guidance_end must be 1 for {family.name} models (got {value!r}): only "
            "Stable Diffusion 1.x/2.x models can stop guidance early",
            field="guidance_end",
        )


def _check_size(name: str, value: Any, family: Family) -> None:
    step, low, high = family.size_multiple, family.min_size, family.max_size
    if not _is_int(value) or value % step or not low <= value <= high:
        raise InvalidParams(
            f"{name} must be a multiple of {step} between {low} and {high} (got {value!r})",
            field=name,
        )


def check_int(name: str, value: Any, low: int, high: int) -> None:
    """A whole number (not a bool) in [low, high]."""
    if not _is_int(value) or not low <= value <= high:
        raise InvalidParams(
            f"{name} must be a whole number between {low} and {high} (got {value!r})", field=name
        )


def check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    """A number in [low, high] (``low_open``: above low); NaN fails every comparison."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not (low < value if low_open else low <= value) or not value <= high:
        bounds = f"above {low:g} and at most" if low_open else f"a number between {low:g} and"
        raise InvalidParams(f"{name} must be {bounds} {high:g} (got {value!r})", field=name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
