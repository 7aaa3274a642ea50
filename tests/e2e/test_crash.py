"""Durability: SIGKILL mid-job and SIGTERM drain, against the real server on loopback."""

from __future__ import annotations

import io
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.helpers import read_events, submit, wait_final, wait_for
from tests.e2e.server import Server, prepare_home

pytestmark = pytest.mark.slow


def pixels(api: httpx.Client, job: dict) -> np.ndarray:
    (image,) = job["images"]
    png = api.get(image["url"].removeprefix("/api/v1")).content
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_sigkill_while_running_loses_and_duplicates_nothing(
    tmp_path: Path, tiny_sd_path: Path
) -> None:
    home = tmp_path / "easel-home"
    prepare_home(home, tiny_sd_path)
    server = Server(home).start()
    try:
        with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
            victim = submit(api, prompt="interrupted", num_inference_steps=8, seed=1234)
            waiting = [submit(api, prompt=f"waiting {i}", num_inference_steps=2) for i in range(3)]
            wait_for(api, victim["id"], lambda j: j["progress"]["step"] >= 1)
        server.kill()

        server = Server(home).start()
        with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
            done = {j["id"]: wait_final(api, j["id"]) for j in (victim, *waiting)}
            assert all(j["status"] == "succeeded" for j in done.values()), done
            assert done[victim["id"]]["attempts"] == 2
            assert [done[j["id"]]["attempts"] for j in waiting] == [1, 1, 1]
            assert "requeued" in [e["type"] for e in read_events(api, victim["id"])]
            images = api.get("/images").json()
            assert len(images) == 4 and len({i["id"] for i in images}) == 4, "no duplicates"
            # the interrupted job's pixels equal an uninterrupted run with the same seed
            fresh = wait_final(
                api, submit(api, prompt="interrupted", num_inference_steps=8, seed=1234)["id"]
            )
            np.testing.assert_array_equal(pixels(api, done[victim["id"]]), pixels(api, fresh))
    finally:
        server.kill()


def test_sigterm_drains_and_requeues_the_running_job(tmp_path: Path, tiny_sd_path: Path) -> None:
    home = tmp_path / "easel-home"
    prepare_home(home, tiny_sd_path)
    server = Server(home, drain_timeout_s=0.5).start()
    try:
        with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
            long = submit(api, prompt="long", num_inference_steps=150)
            queued = submit(api, prompt="next", num_inference_steps=1)
            wait_for(api, long["id"], lambda j: j["progress"]["step"] >= 1)
        # uvicorn re-raises SIGTERM after its graceful shutdown, hence -SIGTERM
        assert server.terminate(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log.read_text()

        server = Server(home).start()
        with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
            requeued = api.get(f"/jobs/{long['id']}").json()
            assert requeued["status"] in ("queued", "running") and requeued["attempts"] <= 2
            api.delete(f"/jobs/{long['id']}")  # no need to wait for 150 steps
            assert wait_final(api, queued["id"])["status"] == "succeeded"
            events = read_events(api, long["id"])
            assert [e["type"] for e in events[:2]] == ["queued", "started"]
            # put back by the drain itself, not by the next start's crash recovery
            requeued = [e["reason"] for e in events if e["type"] == "requeued"]
            assert requeued == ["server stopping"], requeued
    finally:
        server.kill()
