"""The Workers tab in a real browser against the real server (the bundled tiny-shapes model):
the worker goes busy with a job, shows its id and the loaded model, goes idle with one more job
done, and the tab stops asking once another tab is shown."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, Request, expect

from tests.ui.conftest import ServerProcess, save_doc_screenshot
from tests.ui.test_page import LONG_JOB

pytestmark = [pytest.mark.browser, pytest.mark.slow]

EVENT_ROUTE = re.compile(r"/gradio_api/(run|queue)/")  # where Gradio events are called
SHOT = {"x": 0, "y": 0, "width": 1280, "height": 300}
REFRESH_TIMEOUT_MS = 15_000  # a few of the tab's 3 s refreshes, on a loaded machine


def test_workers_tab_follows_the_worker(
    page: Page, ui_server: ServerProcess, artifacts: Path
) -> None:
    asked: list[str] = []  # the page's calls to Gradio's event routes

    def record(request: Request) -> None:
        if request.method == "POST" and EVENT_ROUTE.search(request.url):
            asked.append(request.url)

    page.on("request", record)
    page.locator("#tab-workers-button").click()
    row = page.locator('#workers tr[data-worker="cpu-0"]')
    expect(row).to_be_visible()
    expect(row.locator("td").nth(1)).to_have_text("cpu")
    done_before = int(row.locator(".easel-worker-done").inner_text())

    with ui_server.api() as api:
        job = api.post("/jobs", json=LONG_JOB | {"prompt": "a big yellow star"}).json()
        # no click: the tab refreshes itself while shown
        expect(row).to_have_attribute("data-state", "busy", timeout=REFRESH_TIMEOUT_MS)
        expect(row.locator(".easel-worker-job")).to_contain_text(job["id"][:8])
        expect(row.locator(".easel-worker-models")).to_have_text("tiny-shapes")
        expect(page.locator(".easel-workers-summary")).to_contain_text("1 running")
        # the tab is short: the top of the page, not the empty rest
        page.screenshot(path=artifacts / "workers.png", clip=SHOT)
        save_doc_screenshot(artifacts / "workers.png")
        api.delete(f"/jobs/{job['id']}")

    expect(row).to_have_attribute("data-state", "idle", timeout=REFRESH_TIMEOUT_MS)
    expect(row.locator(".easel-worker-job")).to_have_text("—")
    expect(row.locator(".easel-worker-done")).to_have_text(str(done_before + 1))
    expect(row.locator("td.num progress")).to_have_attribute("max", "100")

    # the refreshes came as event calls (the tab's opening, then the ticks); on another tab
    # the page stops asking
    assert sum("/run/predict" in url for url in asked) >= 2, asked
    page.locator("#tab-generate-button").click()
    page.locator("#prompt textarea").wait_for()
    time.sleep(0.5)  # the tab switch's own calls come first
    asked.clear()
    time.sleep(4)  # longer than the 3 s refresh
    assert not asked, asked
