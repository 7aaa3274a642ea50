"""The Edit tab in a real browser against the real server (the bundled tiny-shapes model): a
picture sent from Generate or History or uploaded, a mask painted with the mouse, the edit job,
and its result.

The assertions read the job back over the REST API: its task, its stored inputs (the sent
picture unchanged, the painted mask) and the result's pixels (repainted inside the mask, the
input's own outside its blur band).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import Page, expect

from easel.imaging import band
from tests.ui.conftest import (
    ServerProcess,
    record_statuses,
    save_doc_screenshot,
    wait_until_done,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SOURCE_PROMPT = "a red circle on a white background"
EDIT_PROMPT = "a green triangle on a white background"
# a stroke across the picture's middle, in screen pixels from the canvas centre (a 64×64
# picture is drawn about 5.6× enlarged: this is about 21×6 picture pixels)
STROKE = [(-60 + 10 * i, -20 + 3 * i) for i in range(13)]


def edit_status(page: Page):  # type: ignore[no-untyped-def]
    return page.locator("#edit-status .easel-status-text")


def wait_for_picture(page: Page) -> None:
    """Until the editor shows its picture: it zooms a small one to fill the canvas (the zoom
    label reads over 100 %, from 45 % while empty)."""
    expect(page.locator("#edit-image")).to_contain_text(re.compile(r"\b[1-9]\d{2,}%"))


def paint(page: Page, stroke: list[tuple[int, int]]) -> None:
    """One brush stroke with the mouse through ``stroke`` (offsets from the canvas centre)."""
    box = page.locator("#edit-image canvas").first.bounding_box()
    assert box is not None
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx + stroke[0][0], cy + stroke[0][1])
    page.mouse.down()
    for dx, dy in stroke[1:]:
        page.mouse.move(cx + dx, cy + dy)
    page.mouse.up()


def set_number(page: Page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def latest_job(api: httpx.Client) -> dict:
    (job,) = api.get("/jobs", params={"limit": 1}).json()
    return job  # type: ignore[no-any-return]


def stored(api: httpx.Client, image_id: str) -> Image.Image:
    response = api.get(f"/images/{image_id}")
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def test_inpaint_repaints_the_painted_stroke(
    page: Page, ui_server: ServerProcess, artifacts: Path
) -> None:
    # 1. a picture made on the Generate tab, sent to Edit with its prompt
    page.locator("#prompt textarea").fill(SOURCE_PROMPT)
    page.locator("#generate").click()
    expect(page.locator("#status .easel-status-text")).to_contain_text(
        "Done: 1 image", timeout=30_000
    )
    page.locator("#send-to-edit").click()
    expect(page.locator("#edit-prompt textarea")).to_have_value(SOURCE_PROMPT)
    expect(page.locator("#edit-task input[value=inpaint]")).to_be_checked()  # the default
    wait_for_picture(page)
    with ui_server.api() as api:
        source = latest_job(api)
    assert source["task"] == "txt2img" and source["status"] == "succeeded"

    # 2. paint a stroke and repaint it: status line, progress, then the result
    paint(page, STROKE)
    page.locator("#edit-prompt textarea").fill(EDIT_PROMPT)
    record_statuses(page, "#edit-status .easel-status-text")
    page.locator("#edit-run").click()
    expect(edit_status(page)).to_contain_text("Done: 1 image", timeout=30_000)
    expect(page.locator("#edit-result img").first).to_be_visible()
    expect(page.locator("#edit-result-info")).to_contain_text("Task: inpaint")
    statuses = page.evaluate("window.easelStatuses")
    assert any(re.match(r"Running: step [1-9]\d* of 8", s) for s in statuses), statuses
    assert statuses[-1].startswith("Done: 1 image"), statuses
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=artifacts / "edit.png")
    save_doc_screenshot(artifacts / "edit.png")

    # 3. the job: an inpaint of the sent picture, with the stroke as its mask
    with ui_server.api() as api:
        job = latest_job(api)
        assert job["id"] != source["id"]
        assert job["task"] == "inpaint" and job["status"] == "succeeded", job
        assert job["params"]["prompt"] == EDIT_PROMPT
        picture = stored(api, job["params"]["image"])
        mask = stored(api, job["params"]["mask"])
        (result_record,) = job["images"]
        result = stored(api, result_record["id"])
        original = stored(api, source["images"][0]["id"])
    assert np.array_equal(pixels(picture), pixels(original))  # sent without loss
    painted = pixels(mask)[..., 0]
    assert set(np.unique(painted)) == {0, 255}  # binary: paint anywhere is "repaint"
    box = mask.getbbox()
    assert box is not None and painted.sum() // 255 >= 30, box
    # the stroke's place: across the middle, wider than high, far from the edges
    left, top, right, bottom = box
    assert 8 <= left < 32 < right <= 56 and 16 <= top < bottom <= 48, box
    assert right - left > bottom - top, box
    # the result: the input's own pixels beyond the mask's blur band, new ones inside it
    assert result.size == picture.size == (64, 64)
    keep = ~(np.asarray(band(mask.convert("L"), job["params"]["mask_blur"])) > 0)
    assert np.array_equal(pixels(result)[keep], pixels(picture)[keep])
    assert (pixels(result)[painted > 0] != pixels(picture)[painted > 0]).any()


def test_nothing_painted_is_refused_with_a_message(page: Page, ui_server: ServerProcess) -> None:
    # a History picture, sent to Edit
    with ui_server.api() as api:
        made = api.post("/jobs", json={"prompt": SOURCE_PROMPT})
        assert made.status_code == 202, made.text
        wait_until_done(api, made.json()["id"])
    page.locator("#tab-history-button").click()
    page.locator("#history img").first.click()
    expect(page.locator("#history-send-to-edit")).to_be_enabled()
    page.locator("#history-send-to-edit").click()
    expect(page.locator("#tab-edit-button")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#edit-prompt textarea")).to_have_value(SOURCE_PROMPT)  # from its PNG
    wait_for_picture(page)
    with ui_server.api() as api:
        before = latest_job(api)["id"]
        uploads = len(api.get("/images", params={"kind": "upload", "limit": 500}).json())
        page.locator("#edit-run").click()
        expect(page.get_by_text(re.compile(r"mask: nothing is painted"))).to_be_visible()
        assert latest_job(api)["id"] == before  # no job
        # and nothing stored: the mask is checked before the picture is uploaded
        assert len(api.get("/images", params={"kind": "upload", "limit": 500}).json()) == uploads


def test_outpaint_grows_an_uploaded_picture(
    page: Page, ui_server: ServerProcess, tmp_path: Path
) -> None:
    upload = tmp_path / "square.png"
    picture = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(picture).rectangle((16, 16, 47, 47), fill=(30, 80, 220))
    picture.save(upload)

    page.locator("#tab-edit-button").click()
    # the editor sets up its canvas once its tab shows (its zoom label appears); a file given
    # before that is dropped
    expect(page.locator("#edit-image")).to_contain_text(re.compile(r"\d+%"))
    page.locator("#edit-image input[type=file]").set_input_files(str(upload))
    wait_for_picture(page)
    # the task's controls follow its row of TASK_SPECS
    expect(page.locator("#edit-outpaint")).to_be_hidden()
    page.locator("#edit-task").get_by_text("outpaint", exact=True).click()
    expect(page.locator("#edit-outpaint")).to_be_visible()
    expect(page.locator("#edit-only-masked")).to_be_hidden()
    expect(page.locator("#edit-task-note")).to_contain_text("grow the canvas")
    set_number(page, "edit-outpaint-right", 16)
    page.locator("#edit-prompt textarea").fill("a yellow star on a white background")
    page.locator("#edit-run").click()
    expect(edit_status(page)).to_contain_text("Done: 1 image", timeout=30_000)

    with ui_server.api() as api:
        job = latest_job(api)
        assert job["task"] == "outpaint" and job["status"] == "succeeded", job
        assert job["params"]["outpaint"] == {"left": 0, "top": 0, "right": 16, "bottom": 0}
        assert job["params"]["mask"] is None
        assert np.array_equal(pixels(stored(api, job["params"]["image"])), pixels(picture))
        result = stored(api, job["images"][0]["id"])
    assert result.size == (80, 64)
    # the picture itself is kept beyond the blur band at its new right edge
    blur = job["params"]["mask_blur"]
    kept = (0, 0, 64 - blur, 64)
    assert np.array_equal(pixels(result.crop(kept)), pixels(picture.crop(kept)))
