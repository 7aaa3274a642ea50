"""The page in a real browser against the real server: generate, watch, cancel, find it again.

Tests run in file order and share one server (the restart test comes last).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.ui.conftest import (
    ServerProcess,
    record_statuses,
    save_doc_screenshot,
    wait_until_done,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PROMPT = "a red circle and a blue square on a white background"
# Long enough to still run when the test acts on it (128×128 is tiny-shapes' largest size).
LONG_JOB = {"num_inference_steps": 150, "width": 128, "height": 128, "num_images": 4}
# More pictures for the History screenshot (each a fraction of a second).
MORE_PROMPTS = (
    "a big yellow star on a purple background",
    "a green triangle at the top and an orange cross at the bottom on a black background",
    "a white star and a red triangle on a blue background",
    "a big purple cross on a yellow background",
    "a black square and a yellow circle on a pink background",
)


def status(page: Page):  # type: ignore[no-untyped-def]
    return page.locator("#status .easel-status-text")


def set_number(page: Page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_generate_shows_queue_position_progress_and_the_image(
    page: Page, ui_server: ServerProcess, artifacts: Path
) -> None:
    record_statuses(page, "#status .easel-status-text")
    with ui_server.api() as api:
        # a long job ahead of ours, so ours waits in the queue first
        blocker = api.post("/jobs", json=LONG_JOB | {"prompt": "a big black star"})
        assert blocker.status_code == 202, blocker.text
        page.locator("#prompt textarea").fill(PROMPT)
        set_number(page, "count", 4)
        page.locator("#generate").click()
        expect(status(page)).to_contain_text(re.compile(r"Queued: position \d in the queue"))
        page.screenshot(path=artifacts / "generate-queued.png")
        api.delete(f"/jobs/{blocker.json()['id']}")
        expect(status(page)).to_contain_text("Done: 4 images", timeout=30_000)

    expect(page.locator("#result img").first).to_be_visible()
    statuses = page.evaluate("window.easelStatuses")
    assert any(s.startswith("Queued: position") for s in statuses), statuses
    assert any(re.match(r"Running: step [1-9]\d* of \d+", s) for s in statuses), statuses
    assert statuses[-1].startswith("Done: 4 images"), statuses
    info = page.locator("#result-info")
    expect(info).to_contain_text("Steps: 8")  # tiny-shapes' own defaults
    expect(info).to_contain_text("Guidance end: 0.67")
    expect(info).to_contain_text("Size: 64x64")
    expect(info).to_contain_text("Model: tiny-shapes")
    # the random seed that was used is reported in the seed field and in the parameters
    seed = int(page.locator("#seed input").input_value())
    expect(info).to_contain_text(f"Seed: {seed}")
    expect(info).to_contain_text(f"Seeds: {seed}, {seed + 1}, {seed + 2}, {seed + 3}")

    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=artifacts / "generate.png", full_page=True)
    save_doc_screenshot(artifacts / "generate.png")


def test_small_images_are_enlarged_without_blur(page: Page, ui_server: ServerProcess) -> None:
    page.locator("#tab-history-button").click()
    thumb = page.locator("#history img").first
    expect(thumb).to_be_visible()
    # a 64×64 picture fills a thumbnail several times its size, drawn with sharp pixels
    expect(thumb).to_have_class(re.compile(r"\beasel-upscaled\b"))
    assert thumb.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
    box = thumb.bounding_box()
    assert box is not None and min(box["width"], box["height"]) >= 128, box
    assert thumb.evaluate("img => img.naturalWidth") == 64


def test_cancel_stops_the_running_job(
    page: Page, ui_server: ServerProcess, artifacts: Path
) -> None:
    set_number(page, "steps", LONG_JOB["num_inference_steps"])
    set_number(page, "count", LONG_JOB["num_images"])
    page.locator("#size input").fill(f"{LONG_JOB['width']}x{LONG_JOB['height']}")
    page.locator("#size input").press("Enter")
    page.locator("#prompt textarea").fill("a job to cancel")
    page.locator("#generate").click()
    expect(status(page)).to_contain_text("Running: step", timeout=20_000)
    preview = page.locator("#preview img")
    expect(preview).to_be_visible()  # live previews while it runs, enlarged with sharp pixels
    expect(preview).to_have_class(re.compile(r"\beasel-upscaled\b"))
    page.screenshot(path=artifacts / "running.png")
    page.locator("#cancel").click()
    expect(status(page)).to_have_text("Canceled", timeout=15_000)
    page.screenshot(path=artifacts / "canceled.png")
    with ui_server.api() as api:
        (job,) = api.get("/jobs", params={"limit": 1}).json()
    assert job["params"]["prompt"] == "a job to cancel"
    assert job["status"] == "canceled"
    assert job["progress"]["step"] < job["progress"]["total"]


def test_bad_input_names_the_field(page: Page) -> None:
    page.locator("#size input").fill("100x64")
    page.locator("#size input").press("Enter")
    page.locator("#prompt textarea").fill("a blue square")
    page.locator("#generate").click()
    expect(page.get_by_text(re.compile(r"width must be a multiple of 8"))).to_be_visible()


def test_guidance_end_is_offered_only_where_the_model_can_end_guidance(page: Page) -> None:
    slider = page.locator("#guidance-end input[type=number]")
    expect(slider).to_have_value("0.67")  # tiny-shapes' default
    page.locator("#model input").click()
    page.get_by_role("option", name="z-image-turbo (not downloaded)").click()
    expect(page.locator("#guidance-end")).to_be_hidden()
    page.locator("#model input").click()
    page.get_by_role("option", name="tiny-shapes", exact=True).click()
    expect(slider).to_have_value("0.67")


def test_missing_model_shows_the_pull_command(page: Page) -> None:
    page.locator("#model input").click()
    page.get_by_role("option", name="sd-turbo (not downloaded)").click()
    expect(page.locator("#model-note")).to_contain_text("easel models pull sd-turbo")
    expect(page.locator("#generate")).to_be_disabled()
    # the size presets follow the model: SD-Turbo's 512 px, not tiny-shapes' 64 px
    expect(page.locator("#size input")).to_have_value("512×512 (1:1)")
    page.locator("#model input").click()
    page.get_by_role("option", name="tiny-shapes", exact=True).click()
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#size input")).to_have_value("64×64 (1:1)")


def test_a_server_without_keys_shows_no_sign_in_line(page: Page) -> None:
    # the page's load events have run (History's count comes from one, after the account's)
    page.locator("#tab-history-button").click()
    expect(page.locator("#history-count")).to_contain_text("image")
    expect(page.locator("#account")).to_be_hidden()
    expect(page.locator("#sign-out")).to_have_count(0)


def test_phone_width_does_not_break(browser, ui_server: ServerProcess, artifacts: Path) -> None:  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 400, "height": 860})
    page = context.new_page()
    page.goto(ui_server.url + "/")
    page.locator("#prompt textarea").wait_for()
    overflow = page.evaluate("document.documentElement.scrollWidth")
    page.screenshot(path=artifacts / "phone.png", full_page=True)
    for selector in ("#prompt", "#generate", "#cancel", "#status", "#result"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 400, selector
    page.locator("#tab-history-button").click()
    expect(page.locator("#history-count")).to_contain_text("image")
    history_overflow = page.evaluate("document.documentElement.scrollWidth")
    thumbs = page.locator("#history img")
    expect(thumbs.first).to_be_visible()
    for i in range(min(thumbs.count(), 6)):  # the first rows: none beyond the screen's edge
        box = thumbs.nth(i).bounding_box()
        assert box is not None and box["x"] + box["width"] <= 400, (i, box)
    page.screenshot(path=artifacts / "phone-history.png", full_page=True)
    context.close()
    assert overflow <= 400 and history_overflow <= 400


def test_history_survives_a_restart(page: Page, ui_server: ServerProcess, artifacts: Path) -> None:
    with ui_server.api() as api:
        jobs = [api.post("/jobs", json={"prompt": p}).json()["id"] for p in MORE_PROMPTS]
        for job_id in jobs:
            wait_until_done(api, job_id)
    ui_server.restart()
    page.goto(ui_server.url + "/")
    page.locator("#guidance-end input[type=number]").fill("0.3")  # Reuse must put it back
    page.locator("#guidance-end input[type=number]").press("Enter")
    page.locator("#tab-history-button").click()
    expect(page.locator("#history-count")).to_contain_text("image")
    expect(page.locator("#history img").first).to_be_visible()

    # click: its parameters (the newest image is the last prompt's)
    page.locator("#history img").first.click()
    expect(page.locator("#picked-info")).to_contain_text(MORE_PROMPTS[-1])
    expect(page.locator("#picked-info")).to_contain_text("Steps: 8")
    expect(page.locator("#reuse")).to_be_enabled()
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=artifacts / "history.png")
    save_doc_screenshot(artifacts / "history.png")

    # search by prompt keeps only the matching images; Reuse fills the Generate form
    page.locator("#search textarea, #search input").first.fill("blue square")
    page.locator("#search textarea, #search input").first.press("Enter")
    expect(page.locator("#history-count")).to_contain_text("4 images matching")
    page.locator("#history img").first.click()
    expect(page.locator("#picked-info")).to_contain_text(PROMPT)
    page.locator("#reuse").click()
    expect(page.locator("#prompt textarea")).to_have_value(PROMPT)
    expect(page.locator("#random-seed input")).not_to_be_checked()
    expect(page.locator("#guidance-end input[type=number]")).to_have_value("0.67")

    # a dropped PNG shows the parameters it carries
    # a generated image (images/<date>/), not an upload (images/uploads/), which carries none
    stored = next((ui_server.home / "images").glob("????-??-??/*.png"))
    page.locator("#tab-history-button").click()
    page.locator("#png-info input[type=file]").set_input_files(str(stored))
    expect(page.locator("#picked-info")).to_contain_text("Sampler:")
