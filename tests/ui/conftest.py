"""Browser-test harness: the real server in a subprocess on a free loopback port, and headless
Chromium (the Debian package) driven by Playwright.

The server runs ``python -m easel.api.server`` with its own EASEL_HOME and the real default
model: the bundled ``tiny-shapes`` (64×64, 8 steps, a fraction of a second per image on a CPU),
so the screenshots show real pictures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import free_port

CHROMIUM = "/usr/bin/chromium"
# the flags that work on the build machines (see the project's machine notes)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "ui"
DOC_IMAGES = ROOT / "docs" / "img"
START_TIMEOUT_S = 90


class ServerProcess:
    """``python -m easel.api.server`` on a free loopback port; ``restart()`` keeps EASEL_HOME."""

    def __init__(self, home: Path, log_path: Path) -> None:
        self.home = home
        self.log_path = log_path
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if k != "EASEL_DEFAULT_MODEL"},
            "EASEL_HOME": str(self.home),
            "EASEL_PORT": str(self.port),
            "EASEL_HOST": "127.0.0.1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            # one torch thread: with a second one, sharing the CPU with the browser makes every
            # step wait at OpenMP barriers (many times slower on a 2-core machine)
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "HF_HUB_OFFLINE": "1",
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "easel.api.server"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self._wait_ready()

    def stop(self) -> None:
        """SIGTERM (the server drains), then wait for it to exit."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=f"{self.url}/api/v1", timeout=30)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early; log:\n{self.log_path.read_text()}")
            try:
                # the page, or (once keys exist) the gate sending a browser to sign in
                page = httpx.get(f"{self.url}/", headers={"Accept": "text/html"}, timeout=2)
                if page.status_code in (200, 303):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(
            f"server not ready in {START_TIMEOUT_S} s; log:\n{self.log_path.read_text()}"
        )


def record_statuses(page, selector: str) -> None:  # type: ignore[no-untyped-def]
    """Start keeping every text the status line at ``selector`` shows, in order, in
    ``window.easelStatuses`` (a MutationObserver misses no quick change)."""
    page.evaluate(
        """(selector) => {
  window.easelStatuses = [];
  const record = () => {
    const el = document.querySelector(selector);
    const text = el ? el.textContent : null;
    if (text && window.easelStatuses.at(-1) !== text) window.easelStatuses.push(text);
  };
  new MutationObserver(record).observe(document.body,
    {subtree: true, childList: true, characterData: true});
  record();
}""",
        selector,
    )


def save_doc_screenshot(shot: Path) -> None:
    """Copy a screenshot into docs/img/ when it is missing there or EASEL_UPDATE_SCREENSHOTS=1."""
    target = DOC_IMAGES / shot.name
    if os.environ.get("EASEL_UPDATE_SCREENSHOTS") == "1" or not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target)


def wait_until_done(api: httpx.Client, job_id: str, timeout_s: float = 60) -> None:
    """Poll the REST API until the job ends; it must have succeeded."""
    deadline = time.monotonic() + timeout_s
    while (job := api.get(f"/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "succeeded", job


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The real server with its default model (the bundled tiny-shapes), shared by the UI tests."""
    home = tmp_path_factory.mktemp("ui-home")
    server = ServerProcess(home, home / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def browser() -> Iterator[object]:
    """Headless Chromium from the Debian package (Playwright cannot download one here). For the
    UI package only: Playwright's sync API keeps an event loop running in the thread, where the
    asyncio.run of tests that a pytest-xdist worker runs after these would fail."""
    if not Path(CHROMIUM).exists():
        # CI must run the browser tests (scripts/setup --dev installs chromium there); a developer
        # machine without it skips them with the command to fix that.
        message = f"{CHROMIUM} missing: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, ui_server: ServerProcess):  # type: ignore[no-untyped-def]
    """A fresh desktop-size tab on the page, fully loaded."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.goto(ui_server.url + "/")
    tab.locator("#prompt textarea").wait_for()
    yield tab
    context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go (gitignored); kept after the run."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
