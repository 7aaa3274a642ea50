"""PNG provenance: both chunks written, read back, and every parameter round-trips."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from easel.domain import GenerationParams, InvalidParams
from easel.engine.metadata import (
    A1111_SAMPLERS,
    format_a1111,
    parse_a1111,
    parse_png,
    read_metadata,
    to_png_bytes,
)


def _params(**overrides: object) -> GenerationParams:
    values: dict[str, object] = dict(
        prompt="a red circle, on grey: big",
        model="tiny-shapes",
        negative_prompt="blurry, dark",
        num_inference_steps=4,
        guidance_scale=5.5,
        width=64,
        height=48,
        seed=7,
        num_images=3,
        scheduler="dpmpp_2m_karras",
    )
    values.update(overrides)
    return GenerationParams(**values)  # type: ignore[arg-type]


def test_a1111_text_looks_like_automatic1111() -> None:
    text = format_a1111(_params(num_images=1))
    assert text.splitlines() == [
        "a red circle, on grey: big",
        "Negative prompt: blurry, dark",
        "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 7, "
        "Size: 64x48, Model: tiny-shapes, Version: easel 0.1.0",
    ]


@pytest.mark.parametrize("scheduler", sorted(A1111_SAMPLERS))
def test_a1111_round_trips_every_parameter(scheduler: str) -> None:
    params = _params(
        num_images=1,
        scheduler=scheduler,
        model="/models/my, odd: model",
        prompt="line one\nline two",
        negative_prompt="no\nthanks",
        task="img2img",
        strength=0.6,
        guidance_end=0.67,
    )
    parsed = parse_a1111(format_a1111(params))
    assert GenerationParams.from_dict(parsed) == params


def test_png_carries_both_chunks_for_each_image() -> None:
    params = _params()
    image = Image.new("RGB", (64, 48), (200, 10, 10))
    data = to_png_bytes(image, params, index=2)
    meta = read_metadata(data)
    assert meta["easel"] == {**params.to_dict(), "seed": 9, "num_images": 1}
    assert "Seed: 9," in meta["parameters"]
    assert parse_png(data) == GenerationParams(**{**params.to_dict(), "seed": 9, "num_images": 1})
    assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == (200, 10, 10)


def test_parse_png_falls_back_to_a1111_text(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, "
        "Size: 512x512, Model hash: abc, Model: sd15",
    )
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    params = parse_png(path)
    assert (params.prompt, params.negative_prompt, params.scheduler) == ("a cat", "dog", "euler_a")
    assert (params.num_inference_steps, params.guidance_scale, params.seed) == (20, 7.0, 3)
    assert (params.width, params.height, params.model) == (512, 512, "sd15")
    assert parse_a1111(read_metadata(path)["parameters"])["extra"] == {"Model hash": "abc"}


@pytest.mark.parametrize(
    "source, message",
    [
        (b"not an image", "not a readable"),
        ("/nonexistent/x.png", "not found"),
    ],
)
def test_unreadable_images_raise_invalid_params(source: object, message: str) -> None:
    with pytest.raises(InvalidParams, match=message) as err:
        read_metadata(source)  # type: ignore[arg-type]
    assert err.value.field == "image"


def test_image_without_parameters_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(InvalidParams, match="no generation parameters"):
        parse_png(path)
