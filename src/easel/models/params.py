"""Turn a partial request into a complete, validated one for a given model.

Pure Python (no torch). Every check names the field and the allowed values, so the CLI,
API and UI can show the message as is.

    >>> p = resolve_params(GenerationParams(prompt="a cat"), record, get_family("sd"))
    >>> p.width, p.num_inference_steps, p.seed is not None
    (512, 25, True)
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from easel.domain import GenerationParams, InvalidParams, ModelRecord
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
    params: GenerationParams, record: ModelRecord, family: Family
) -> GenerationParams:
    """A copy of ``params`` with every field concrete and checked against the family's limits.

    ``None`` fields take the model's defaults, a missing seed is drawn at random, and
    ``model`` becomes the record's id. Raises InvalidParams(field=...) on the first bad field.
    """
    family = effective_family(record, family)
    defaults = defaults_for(record, family)
    values = params.to_dict()
    for key, default in defaults.items():
        if values.get(key) is None:
            values[key] = default
    values["model"] = record.id
    if values["seed"] is None:
        values["seed"] = random.randint(0, MAX_SEED)
    if values["task"] == "txt2img":
        values["strength"] = None  # only image-to-image tasks use it

    _check_prompt(values)
    _check_task(values["task"], family)
    for name in ("width", "height"):
        _check_size(name, values[name], family)
    _check_int("num_inference_steps", values["num_inference_steps"], 1, family.max_steps)
    _check_number("guidance_scale", values["guidance_scale"], *family.guidance_range)
    check_guidance_end(values["guidance_end"], family)
    _check_int("num_images", values["num_images"], 1, family.max_images)
    _check_int("seed", values["seed"], 0, MAX_SEED)
    if values["scheduler"] not in family.schedulers:
        raise InvalidParams(
            f"scheduler must be one of {', '.join(family.schedulers)} "
            f"for {family.name} models (got {values['scheduler']!r})",
            field="scheduler",
        )
    if values["strength"] is not None:
        _check_number("strength", values["strength"], 0.0, 1.0)
        if values["strength"] == 0:
            raise InvalidParams("strength must be above 0 and at most 1 (got 0)", field="strength")
    values["guidance_scale"] = float(values["guidance_scale"])
    values["guidance_end"] = float(values["guidance_end"])
    return GenerationParams.from_dict(values)


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
    _check_number("guidance_end", value, 0.0, 1.0)
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


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise InvalidParams(
            f"{name} must be a whole number between {low} and {high} (got {value!r})", field=name
        )


def _check_number(name: str, value: Any, low: float, high: float) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not low <= value <= high:
        raise InvalidParams(
            f"{name} must be a number between {low:g} and {high:g} (got {value!r})", field=name
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
