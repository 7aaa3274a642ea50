"""The Edit tab without a browser: the mask built from the editor's layers, the request each
task sends, and the edit handler end to end on the stand-in generator."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from easel.config import Settings
from easel.domain import TASK_SPECS, InvalidParams
from easel.imaging import png_bytes, repaint_mask
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services
from easel.ui.app import _Handlers
from easel.ui.editing import (
    EDIT_TASKS,
    EditForm,
    brush_size,
    default_strength,
    mask_from_layers,
    opaque,
    task_controls,
)

SIZE = (64, 48)


def layer(size: tuple[int, int] = SIZE) -> Image.Image:
    """An empty editor layer (the canvas exports RGBA, 0 under no paint)."""
    return Image.new("RGBA", size, (0, 0, 0, 0))


def picture(size: tuple[int, int] = SIZE) -> Image.Image:
    image = Image.new("RGBA", size, (255, 255, 255, 255))
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(220, 30, 30, 255))
    return image


@pytest.fixture
def generator() -> StandInGenerator:
    return StandInGenerator()


@pytest.fixture
def services(easel_home: Path, generator: StandInGenerator) -> Iterator[Services]:
    services = build_services(Settings(home=easel_home), generator=generator)
    yield services
    services.stop()


# --- the mask ---------------------------------------------------------------------------------


def test_any_paint_in_any_layer_is_repaint() -> None:
    first, second = layer(), layer()
    ImageDraw.Draw(first).rectangle((10, 5, 19, 14), fill=(255, 42, 138, 153))  # see-through
    second.putpixel((50, 40), (0, 0, 0, 1))  # a faint edge pixel, black: still paint
    mask = mask_from_layers(SIZE, [first, None, second])

    assert mask.mode == "L" and mask.size == SIZE  # the background's size, not the canvas's
    values = np.asarray(mask)
    assert set(np.unique(values)) == {0, 255}
    assert values[5:15, 10:20].min() == 255 and values[40, 50] == 255
    assert (values == 255).sum() == 10 * 10 + 1
    # what the engine reads from it: the same pixels
    assert np.array_equal(np.asarray(repaint_mask(mask)), values)


def test_a_layer_of_another_size_is_scaled_to_the_picture() -> None:
    big = layer((128, 96))  # a canvas twice the picture's size
    ImageDraw.Draw(big).rectangle((0, 0, 63, 47), fill=(255, 255, 255, 255))  # its top-left
    values = np.asarray(mask_from_layers(SIZE, [big]))
    assert values[:24, :32].min() == 255 and values[24:, :].max() == 0 and values[:, 32:].max() == 0


@pytest.mark.parametrize("layers", [[], [None], [layer(), layer()]])
def test_nothing_painted_names_the_mask(layers: list[Image.Image | None]) -> None:
    with pytest.raises(InvalidParams, match="nothing is painted") as caught:
        mask_from_layers(SIZE, layers)
    assert caught.value.field == "mask"


def test_opaque_pictures_lose_their_alpha_and_transparent_ones_keep_it() -> None:
    assert opaque(picture()).mode == "RGB"
    see_through = picture()
    see_through.putpixel((0, 0), (0, 0, 0, 0))
    assert opaque(see_through).mode == "RGBA"


# --- the controls and the request ---------------------------------------------------------------


def test_the_tasks_and_their_controls_come_from_the_task_table() -> None:
    assert EDIT_TASKS == ("img2img", "inpaint", "outpaint", "style")
    assert task_controls("inpaint") == {
        "strength": True, "mask_blur": True, "only_masked": True, "outpaint": False,
        "style_strength": False, "mask": True, "style_image": False,
    }  # fmt: skip
    outpaint = task_controls("outpaint")
    assert outpaint["outpaint"] and outpaint["mask_blur"] and not outpaint["only_masked"]
    style = task_controls("style")
    assert style["style_image"] and style["style_strength"] and not style["mask"]
    assert [k for k, shown in task_controls("img2img").items() if shown] == ["strength"]
    with pytest.raises(InvalidParams, match="task must be one of img2img") as caught:
        task_controls("txt2img")
    assert caught.value.field == "task"


def test_defaults_follow_the_task_and_the_model(services: Services) -> None:
    defaults = services.model_info("tiny-shapes").defaults
    assert default_strength("inpaint", defaults) == 1.0
    assert default_strength("style", defaults) == 0.3
    assert default_strength("img2img", defaults) == defaults["strength"] == 0.75
    assert brush_size(64, 64) == 3 and brush_size(1024, 768) == 38 and brush_size(8, 8) == 2


def test_each_task_sends_only_its_own_fields_and_the_queue_takes_them(services: Services) -> None:
    form = EditForm(
        task="inpaint",
        prompt="a blue circle on a white background",
        strength=0.9,
        mask_blur=2,
        only_masked=True,
        outpaint={"left": 0, "top": 0, "right": 16, "bottom": 0},
        style_strength=0.5,
        seed=7,
    )
    image = services.upload_image(png_bytes(picture().convert("RGB"))).id
    mask = services.upload_image(png_bytes(Image.new("L", SIZE, 255))).id
    style = services.upload_image(png_bytes(Image.new("RGB", (32, 32), "purple"))).id
    inputs = {
        "img2img": {"image": image},
        "inpaint": {"image": image, "mask": mask},
        "outpaint": {"image": image},
        "style": {"image": image, "style_image": style},
    }
    for task in EDIT_TASKS:
        params = dataclasses.replace(form, task=task).params(inputs[task])
        used = set(TASK_SPECS[task].fields)
        for name in ("strength", "mask_blur", "only_masked", "outpaint", "style_strength"):
            assert (getattr(params, name) is not None) == (name in used), (task, name)
        job = services.submit_job(params)  # every field it sends is one the task accepts
        assert job.task == task and job.params.seed == 7


# --- the handler ------------------------------------------------------------------------------


def run_edit(ui: _Handlers, *args: Any) -> list[tuple[Any, ...]]:
    """Every update of the edit handler, run on its own event loop in a thread (Playwright's
    sync API keeps a loop running in this one when the browser tests ran first)."""

    async def collect() -> list[tuple[Any, ...]]:
        return [update async for update in ui.edit(*args)]

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, collect()).result()


def test_edit_stores_the_picture_and_the_painted_mask_and_follows_the_job(
    services: Services, generator: StandInGenerator
) -> None:
    services.start()
    ui = _Handlers(services)
    painted = layer()
    ImageDraw.Draw(painted).ellipse((20, 10, 35, 25), fill=(255, 42, 138, 153))
    editor = {"background": picture(), "layers": [painted], "composite": None}

    updates = run_edit(
        ui, editor, "inpaint", "a green triangle on a white background", "", None, 1.0, 4, False
    )

    gallery, seed, info, html, _, job_id = updates[-1]
    assert "Done: 1 image" in html and job_id is None
    assert len(gallery) == 1 and f"Seed: {seed}" in info
    (job,) = services.list_jobs()
    assert job.task == "inpaint" and job.params.only_masked is False and job.params.outpaint is None
    # the generator got the picture (alpha dropped, pixels kept) and the stroke as the mask
    inputs = generator.last_inputs
    assert inputs is not None and inputs.image is not None and inputs.mask is not None
    assert np.array_equal(np.asarray(inputs.image), np.asarray(picture().convert("RGB")))
    expected = np.asarray(painted.getchannel("A")) > 0
    assert np.array_equal(np.asarray(repaint_mask(inputs.mask)) > 0, expected)
    # the stand-in draws flat colour: what is checked here is what went in, and that the
    # result reached the gallery; the browser test checks a real model's paste-back


def test_edit_without_a_picture_says_what_to_do(services: Services) -> None:
    import gradio as gr

    ui = _Handlers(services)
    with pytest.raises(gr.Error, match="upload a picture to edit"):
        run_edit(ui, None, "img2img", "a cat")
    with pytest.raises(gr.Error, match="nothing is painted"):
        run_edit(ui, {"background": picture(), "layers": [layer()]}, "inpaint", "a cat")
    assert services.list_jobs() == []
    assert services.list_images(kind="upload") == []  # refused before anything was stored


def test_style_without_a_picture_stores_only_the_reference(
    services: Services, tmp_path: Path
) -> None:
    services.start()
    reference = tmp_path / "reference.jpg"
    Image.new("RGB", (40, 40), "purple").save(reference)

    updates = run_edit(
        _Handlers(services), None, "style", "a red circle on a white background", "", None,
        0.6, 4, False, 0, 0, 0, 0, str(reference), 0.5,
    )  # fmt: skip

    assert "Done: 1 image" in updates[-1][3]
    (job,) = services.list_jobs()
    assert job.task == "style" and job.params.image is None and job.params.mask is None
    assert job.params.style_strength == 0.5 and job.params.mask_blur is None
    assert job.params.style_image is not None
    assert services.get_image(job.params.style_image).width == 40  # the JPEG, checked and stored
