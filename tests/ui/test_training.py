"""The Train tab in a real browser against the real server (the bundled tiny-shapes model): a
dataset uploaded, a LoRA trained while the loss chart and the samples grow, the LoRA then picked
on the Generate tab; a long run canceled; refused datasets that start nothing.

The assertions read the jobs and the LoRAs back over the REST API.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import Page, expect

from tests.ui.conftest import ServerProcess, record_statuses, save_doc_screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TRIGGER = "sks"  # spelt by tiny-shapes' tokenizer from pieces it knows
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 170, 60),
           "yellow": (230, 200, 30)}  # fmt: skip
STEPS = 40  # a few seconds on tiny-shapes; samples (and held-out losses) at steps 0 and 40


def write_dataset(folder: Path, count: int = 6, captions: bool = True) -> list[Path]:
    """``count`` 64×64 hexagons (a shape tiny-shapes does not know), each with a same-name .txt
    caption in the model's grammar, the trigger word in the shape's place."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(count):
        name, colour = list(COLOURS.items())[index % len(COLOURS)]
        image = Image.new("RGB", (64, 64), "white")
        corners = [(32 + 20 * math.cos(k * math.pi / 3), 32 + 20 * math.sin(k * math.pi / 3))
                   for k in range(6)]  # fmt: skip
        ImageDraw.Draw(image).polygon(corners, fill=colour)
        image.save(folder / f"{index}.png")
        files.append(folder / f"{index}.png")
        if captions:
            (folder / f"{index}.txt").write_text(f"a {name} {TRIGGER} on a white background\n")
            files.append(folder / f"{index}.txt")
    return files


def train_status(page: Page):  # type: ignore[no-untyped-def]
    return page.locator("#train-status .easel-status-text")


def open_train_tab(page: Page, files: list[Path]) -> None:
    page.locator("#tab-train-button").click()
    page.locator("#train-files input[type=file]").set_input_files([str(f) for f in files])


def text_box(page: Page, elem_id: str):  # type: ignore[no-untyped-def]
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def fill_run(page: Page, name: str, steps: int) -> None:
    text_box(page, "train-name").fill(name)
    text_box(page, "train-trigger").fill(TRIGGER)
    box = page.locator("#train-steps input")
    box.fill(str(steps))
    box.press("Enter")


def chart_lines(page: Page) -> dict[str, int]:
    """The loss chart's drawn lines: colour -> how many points each joins."""
    paths = page.evaluate(
        """() => [...document.querySelectorAll('#train-loss .mark-line path')]
            .map(p => [p.getAttribute('stroke'), p.getAttribute('d') || ''])"""
    )
    return {stroke: len(re.findall(r"[ML]", d)) for stroke, d in paths if stroke and "L" in d}


def jobs(api: httpx.Client) -> list[dict]:
    return api.get("/jobs", params={"limit": 50}).json()  # type: ignore[no-any-return]


def test_train_a_lora_watch_it_learn_then_generate_with_it(
    page: Page, ui_server: ServerProcess, tmp_path: Path, artifacts: Path
) -> None:
    # 1. the dataset: checked and stored on upload
    open_train_tab(page, write_dataset(tmp_path / "hexagons"))
    expect(page.locator("#train-dataset")).to_have_text("6 images, 6 captions")
    expect(page.locator("#train-model input")).to_have_value("tiny-shapes")

    # 2. train: the status line, the loss chart and the samples follow the job
    fill_run(page, "hexagon", STEPS)
    record_statuses(page, "#train-status .easel-status-text")
    page.locator("#train-run").click()
    expect(train_status(page)).to_contain_text(
        f"Done: LoRA hexagon after {STEPS} steps", timeout=60_000
    )
    statuses = page.evaluate("window.easelStatuses")
    assert any(re.match(rf"Training: step \d+ of {STEPS} · loss \d", s) for s in statuses), statuses
    lines = chart_lines(page)
    assert lines.get("#2563eb", 0) >= 3, lines  # training loss, a point per progress event
    assert lines.get("#f97316", 0) >= 2, lines  # held-out loss at steps 0 and 40
    samples = page.locator("#train-samples img")
    expect(samples.first).to_be_visible()
    assert samples.count() == 8  # 4 prompts (its distinct captions) at steps 0 and 40
    captions = page.locator("#train-samples").inner_text()
    assert captions.index(f"step {STEPS} ·") < captions.index("step 0 ·")  # newest first
    expect(page.locator("#train-result")).to_contain_text("LoRA hexagon is ready")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=artifacts / "train.png")
    save_doc_screenshot(artifacts / "train.png")

    with ui_server.api() as api:
        (job,) = [j for j in jobs(api) if j["task"] == "train_lora"]
        assert job["status"] == "succeeded" and job["priority"] == 0 and job["owner"] is None
        assert job["params"]["steps"] == STEPS and job["params"]["rank"] == 8
        assert job["params"]["learning_rate"] == 0.001
        # tiny-shapes' own training defaults, shown in the form and sent with the job
        assert job["params"]["prior_words"] == ["circle", "square", "triangle", "star", "cross"]
        assert job["params"]["train_text_encoder"] is True
        lora = api.get("/loras/hexagon").json()
    assert lora["trigger"] == TRIGGER and lora["family"] == "sd" and lora["steps"] == STEPS

    # 3. the LoRA is in Generate's picker (no reload) and reaches the job with its weight
    page.locator("#tab-generate-button").click()
    page.locator("#loras").get_by_text("LoRAs", exact=True).click()
    expect(page.locator("#lora-note")).to_contain_text("1 LoRA fits this model")
    page.locator("#lora-1 input").click()
    page.get_by_role("option", name=f"hexagon ({TRIGGER})").click()
    expect(page.locator("#lora-row-2")).to_be_visible()  # room for one more
    weight = page.locator("#lora-weight-1 input[type=number]")
    weight.fill("0.8")
    weight.press("Enter")
    page.locator("#prompt textarea").fill(f"a red {TRIGGER} on a white background")
    page.locator("#generate").click()
    expect(page.locator("#status .easel-status-text")).to_contain_text(
        "Done: 1 image", timeout=30_000
    )
    expect(page.locator("#result-info")).to_contain_text("<lora:hexagon:0.8>")
    with ui_server.api() as api:
        made = jobs(api)[0]
    assert made["task"] == "txt2img" and made["status"] == "succeeded", made
    assert made["params"]["loras"] == [{"id": "hexagon", "weight": 0.8}]


def test_cancel_stops_a_long_training_run(
    page: Page, ui_server: ServerProcess, tmp_path: Path
) -> None:
    open_train_tab(page, write_dataset(tmp_path / "hexagons"))
    expect(page.locator("#train-dataset")).to_have_text("6 images, 6 captions")
    fill_run(page, "long-run", 5000)
    page.locator("#train-run").click()
    expect(train_status(page)).to_contain_text("Training: step", timeout=30_000)
    page.locator("#train-cancel").click()
    expect(train_status(page)).to_have_text("Canceled", timeout=20_000)

    with ui_server.api() as api:
        job = next(j for j in jobs(api) if j["params"].get("name") == "long-run")
        assert job["status"] == "canceled", job
        assert 0 < job["progress"]["step"] < 5000
        assert api.get("/loras/long-run").status_code == 404  # nothing published


def _zip_with_a_path_that_goes_up(folder: Path) -> list[Path]:
    archive = folder / "dataset.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in write_dataset(folder / "files"):
            zipped.write(path, path.name)
        zipped.writestr("../x.txt", "a caption that would land outside the dataset")
    return [archive]


@pytest.mark.parametrize(
    ("make_files", "message"),
    [
        (_zip_with_a_path_that_goes_up, "unsafe path '../x.txt' in the dataset"),
        (lambda folder: write_dataset(folder, captions=False), "6 of 6 images have no caption"),
    ],
    ids=["zip-path-goes-up", "no-captions"],
)
def test_a_refused_dataset_says_why_and_starts_nothing(
    page: Page, ui_server: ServerProcess, tmp_path: Path, make_files, message: str
) -> None:  # type: ignore[no-untyped-def]
    datasets = ui_server.home / "datasets"
    before = sorted(datasets.iterdir()) if datasets.exists() else []
    with ui_server.api() as api:
        jobs_before = len(jobs(api))
    open_train_tab(page, make_files(tmp_path))
    expect(page.locator("#train-dataset")).to_contain_text(f"Refused: {message}")
    fill_run(page, "refused", 6)
    page.locator("#train-run").click()
    expect(page.get_by_text(re.compile(r"dataset: upload one first"))).to_be_visible()
    with ui_server.api() as api:
        assert len(jobs(api)) == jobs_before  # no job
    assert (sorted(datasets.iterdir()) if datasets.exists() else []) == before  # nothing kept
