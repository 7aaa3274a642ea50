"""`easel backup` while the real server runs jobs (tiny SD on CPU): each copy is a consistent
EASEL_HOME whose every job and image has its file, byte for byte."""

from __future__ import annotations

import io
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from PIL import Image

from easel.cli import main
from easel.config import Settings
from easel.jobs.standin import StandInGenerator
from easel.services import build_services
from tests.e2e.helpers import FINAL, submit, wait_final
from tests.e2e.server import Server

pytestmark = pytest.mark.slow


def check_copy(copy: Path, live_images: Path) -> tuple[int, set[str]]:
    """Open the copy as an EASEL_HOME; every image it lists has the live file's bytes.
    Returns the number of images and the statuses of its jobs."""
    with closing(sqlite3.connect(copy / "easel.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    restored = build_services(Settings(home=copy), generator=StandInGenerator())
    try:
        jobs = restored.list_jobs(limit=1000)
        images = restored.list_images(limit=1000)
        for job in jobs:
            job = restored.get_job(job.id)
            if job.status.value == "succeeded":
                assert len(job.images) == job.params.num_images, job.id
        for image in images:
            assert restored.image_bytes(image.id) == (live_images / image.path).read_bytes()
        return len(images), {j.status.value for j in jobs}
    finally:
        restored.stop()


def test_backups_taken_while_jobs_run_are_complete(
    server: Server,
    api: httpx.Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EASEL_HOME", str(server.home))
    upload = api.post("/images", files={"file": ("x.png", _png(), "image/png")})
    assert upload.status_code == 201
    jobs = [
        submit(api, prompt=f"shape {i}", num_inference_steps=4, num_images=2, seed=i)
        for i in range(8)
    ]
    statuses: set[str] = set()
    for n in range(3):
        _wait_until_some_done(api, [j["id"] for j in jobs], done=2 * n + 1)
        copy = tmp_path / f"copy-{n}"
        code = main(["backup", str(copy)])
        out, err = capsys.readouterr()
        assert code == 0, err
        images, seen = check_copy(copy, server.home / "images")
        assert f"{images} images" in out and images >= 3
        statuses |= seen
    assert statuses & {"queued", "running"}, "the backups were taken while jobs were waiting"
    for job in jobs:
        assert wait_final(api, job["id"], timeout=120)["status"] == "succeeded"
    # refused inside the served home, even while it runs
    assert main(["backup", str(server.home / "copy")]) == 2
    assert "inside EASEL_HOME" in capsys.readouterr().err


def _wait_until_some_done(api: httpx.Client, ids: list[str], *, done: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        statuses = [api.get(f"/jobs/{i}").json()["status"] for i in ids]
        if sum(s in FINAL for s in statuses) >= done:
            return
        time.sleep(0.05)
    raise AssertionError(f"jobs did not finish: {statuses}")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()
