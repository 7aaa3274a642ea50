"""train_lora through the real server (tiny SD on CPU, over HTTP on loopback): a SIGKILL while it
trains costs only the steps since its last checkpoint, and a cancel stops it at the next step,
keeping a checkpoint and publishing nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_train_api import TRAIN, dataset_zip
from tests.e2e.helpers import read_events, wait_final, wait_for
from tests.e2e.server import Server, prepare_home

pytestmark = pytest.mark.slow

# about 0.1 s a step on one core: long enough to stop mid-run; a checkpoint every 12 steps
LONG = {**TRAIN, "steps": 120}


def start_training(api: httpx.Client, **changes: Any) -> dict[str, Any]:
    response = api.post("/datasets", files={"file": ("squares.zip", dataset_zip())})
    assert response.status_code == 201, response.text
    response = api.post("/jobs", json={**LONG, "dataset": response.json()["id"], **changes})
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def checkpoint_steps(home: Path, job_id: str) -> list[int]:
    folder = home / "training" / job_id / "checkpoints"
    return sorted(int(p.stem.removeprefix("lora-step")) for p in folder.glob("lora-step*.pt"))


def wait_until(condition: Any, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigkill_while_training_resumes_from_the_last_checkpoint(
    tmp_path: Path, tiny_sd_path: Path
) -> None:
    home = tmp_path / "easel-home"
    prepare_home(home, tiny_sd_path)
    server = Server(home).start()
    try:
        with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
            job = start_training(api)
            wait_until(lambda: checkpoint_steps(home, job["id"]))
        server.kill()
        saved = checkpoint_steps(home, job["id"])
        assert 0 < saved[-1] < 120, saved  # killed mid-run, after a checkpoint

        server = Server(home).start()
        with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
            final = wait_final(api, job["id"], timeout=180)
            assert final["status"] == "succeeded", final["error"]
            assert final["attempts"] == 2 and final["progress"] == {"step": 120, "total": 120}
            events = read_events(api, job["id"])
            types = [e["type"] for e in events]
            assert types.count("requeued") == 1 and types.count("started") == 2, types
            restarted = types.index("requeued")
            steps = [
                e["step"] for e in events[restarted:] if e["type"] == "progress" and "loss" in e
            ]
            assert steps[0] == saved[-1] + 1 and steps[-1] == 120, (saved, steps)
            # the samples before the kill (step 0) and after it (100, 120) are the job's images
            samples = [s["id"] for e in events if "samples" in e for s in e["samples"]]
            assert [e["step"] for e in events if "samples" in e] == [0, 100, 120]
            assert [i["id"] for i in events[-1]["images"]] == samples
            assert events[-1]["lora"] == {
                "id": "square",
                "url": "/api/v1/loras/square",
                "steps": 120,
            }
            (lora,) = api.get("/loras").json()
            assert (lora["id"], lora["job_id"], lora["steps"]) == ("square", job["id"], 120)
        assert checkpoint_steps(home, job["id"])[-1] == 120
        assert (home / "loras" / "square.safetensors").is_file()
    finally:
        server.kill()


def test_cancel_while_training_keeps_a_checkpoint_and_publishes_nothing(
    server: Server, api: httpx.Client
) -> None:
    job = start_training(api, steps=2000, name="canceled")
    running = wait_for(api, job["id"], lambda j: j["progress"]["step"] >= 3)
    asked = time.monotonic()
    assert api.delete(f"/jobs/{job['id']}").status_code == 200
    final = wait_final(api, job["id"])
    assert final["status"] == "canceled" and time.monotonic() - asked < 30
    saved = checkpoint_steps(server.home, job["id"])
    # saved at the step it stopped at, a few steps (0.1 s each) after the one the DELETE saw
    assert saved and saved[-1] == final["progress"]["step"], (saved, final["progress"])
    assert 0 <= saved[-1] - running["progress"]["step"] <= 20, (running["progress"], saved)
    events = read_events(api, job["id"])
    assert events[-1]["type"] == "canceled" and events[-1]["while"] == "running"
    assert api.get("/loras").json() == []
    assert not (server.home / "loras" / "canceled.safetensors").exists()
