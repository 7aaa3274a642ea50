"""What the Generate form shows for a model: choices, limits and defaults. Pure Python, no Gradio.

The form follows the model's family limits with the catalog entry's overrides applied (both
come from ``services.list_models()``), so the sliders never offer a value the queue rejects.

    >>> form = model_form(info)              # info: a ModelInfo from services.list_models()
    >>> form.sizes[0], form.size
    ('512×512 (1:1)', '512×512 (1:1)')
    >>> parse_size("768×512 (3:2)")
    (768, 512)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from easel.domain import InvalidParams, ModelRecord
from easel.services import ModelInfo

# Aspect ratios offered as size presets (in the spirit of the Z-Image-Turbo demo's list), each at
# the model's default pixel count; a ratio is left out when a side falls outside the model's range
# or when rounding the sides to the size multiple would bend it by more than RATIO_TOLERANCE
# (small models: at 64 px, multiples of 8 cannot make every ratio).
ASPECT_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 1),
    (4, 3),
    (3, 4),
    (3, 2),
    (2, 3),
    (16, 9),
    (9, 16),
    (21, 9),
    (9, 21),
)
# A second, larger base (like the demo's 1024 and 1280 rows) when the model allows it.
LARGER_BASE = 1.25
RATIO_TOLERANCE = 0.05

_SIZE = re.compile(r"^\s*(\d+)\s*[x×X*]\s*(\d+)")


@dataclass(frozen=True)
class ModelForm:
    """Limits and defaults of the Generate form for one model."""

    model: str
    available: bool
    sizes: list[str]
    size: str
    steps: int
    max_steps: int
    guidance: float
    guidance_range: tuple[float, float]
    guidance_end: float  # share of the steps that use guidance (1: all)
    ends_guidance_early: bool  # whether the family allows guidance_end < 1 (else no control)
    schedulers: tuple[str, ...]
    scheduler: str
    max_images: int
    note: str  # markdown shown under the model dropdown


def model_form(info: ModelInfo) -> ModelForm:
    """The form for one model: size presets, slider ranges and the defaults to preselect."""
    record, family, defaults = info.record, info.family, info.defaults
    width, height = int(defaults["width"]), int(defaults["height"])
    sizes = size_presets(width, height, family.size_multiple, family.min_size, family.max_size)
    return ModelForm(
        model=record.id,
        available=record.available,
        sizes=sizes,
        size=format_size(width, height),
        steps=int(defaults["num_inference_steps"]),
        max_steps=family.max_steps,
        guidance=float(defaults["guidance_scale"]),
        guidance_range=family.guidance_range,
        guidance_end=float(defaults["guidance_end"]),
        ends_guidance_early=family.ends_guidance_early,
        schedulers=family.schedulers,
        scheduler=str(defaults["scheduler"]),
        max_images=family.max_images,
        note=model_note(record),
    )


def model_note(record: ModelRecord) -> str:
    """One line under the dropdown: what the model is, or how to fetch it when it is missing."""
    if record.available:
        return f"**{record.id}** · {record.family} · {record.description}".rstrip(" ·")
    return (
        f"**{record.id}** is not on this machine. Fetch it with "
        f"`easel models pull {record.id}`, then reload this page."
    )


def model_choices(infos: list[ModelInfo]) -> list[tuple[str, str]]:
    """Dropdown choices ``(label, id)``; models without weights here are marked as such."""
    return [(_model_label(i.record), i.record.id) for i in infos]


def _model_label(record: ModelRecord) -> str:
    return record.id if record.available else f"{record.id} (not downloaded)"


def size_presets(width: int, height: int, multiple: int, min_size: int, max_size: int) -> list[str]:
    """Labels like ``"768×512 (3:2)"``: every aspect ratio at the default pixel count, then at a
    larger one, each side rounded to ``multiple`` and kept within ``[min_size, max_size]``; the
    default size comes first."""
    presets = [format_size(width, height)]
    for scale in (1.0, LARGER_BASE):
        area = width * height * scale * scale
        for a, b in ASPECT_RATIOS:
            w = _round_to(math.sqrt(area * a / b), multiple)
            h = _round_to(math.sqrt(area * b / a), multiple)
            fits = min_size <= min(w, h) and max(w, h) <= max_size
            true_ratio = abs(math.log((w * b) / (h * a))) <= math.log1p(RATIO_TOLERANCE)
            if fits and true_ratio and not any(p.startswith(f"{w}×{h} ") for p in presets):
                presets.append(format_size(w, h, ratio=(a, b)))
    return presets


def format_size(width: int, height: int, ratio: tuple[int, int] | None = None) -> str:
    """``"768×512 (3:2)"``: the size and its aspect ratio (the nominal one when a preset was
    rounded from it, else the exact reduced ratio)."""
    if ratio is None:
        d = math.gcd(width, height)
        ratio = (width // d, height // d)
    return f"{width}×{height} ({ratio[0]}:{ratio[1]})"


def parse_size(text: str) -> tuple[int, int]:
    """``(width, height)`` from a preset label or a typed ``"WIDTHxHEIGHT"``."""
    match = _SIZE.match(text or "")
    if match is None:
        raise InvalidParams(
            f"size must look like 512x512 (width x height in pixels), got {text!r}", field="size"
        )
    return int(match[1]), int(match[2])


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)
