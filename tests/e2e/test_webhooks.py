"""Webhooks against the real server: a job's end reaches a receiver on loopback exactly once,
signed, though the server is killed between the job's end and the delivery."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.helpers import submit, wait_final
from tests.e2e.server import Server, free_port, prepare_home
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.slow

HOOKS = {
    "EASEL_WEBHOOK_HOSTS": '["127.0.0.1"]',
    "EASEL_WEBHOOK_BACKOFF_S": "0.5",
    "EASEL_WEBHOOK_TIMEOUT_S": "2",
}


def tries(home: Path, job_id: str) -> int:
    """How many tries the server has counted for the job's delivery (read-only, beside it)."""
    with sqlite3.connect(f"file:{home / 'easel.db'}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT attempts FROM webhook_deliveries WHERE job_id = ?", (job_id,)
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_delivery_survives_a_kill_between_the_jobs_end_and_its_send(
    tmp_path: Path, tiny_sd_path: Path
) -> None:
    home = tmp_path / "easel-home"
    prepare_home(home, tiny_sd_path)
    receiver = Receiver(port=free_port())  # down: its port refuses connections
    server = Server(home, env=HOOKS).start()
    try:
        with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
            # a host outside webhook_hosts: refused at submit, nothing stored
            refused = api.post(
                "/jobs", json={"prompt": "a red circle", "webhook": "http://example.com/hook"}
            )
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["field"] == "webhook"
            assert api.get("/jobs").json() == []

            job = submit(api, num_inference_steps=2, width=32, height=32, webhook=receiver.url)
            assert job["webhook"] == receiver.url
            assert wait_final(api, job["id"])["status"] == "succeeded"
            deadline = time.monotonic() + 20
            while tries(home, job["id"]) < 1:  # the first try failed on the closed port
                assert time.monotonic() < deadline
                time.sleep(0.02)
        server.kill()  # the job has ended; its delivery has not been made

        receiver.start()
        server = Server(home, env=HOOKS).start()
        with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
            secret = api.get("/webhooks/secret").json()["secret"]
            (got,) = receiver.wait_delivered(timeout=30)
            time.sleep(1.0)  # a second delivery would show now
            assert len(receiver.requests) == 1
            assert got.signed_by(secret)
            assert got.headers["easel-event"] == "job.succeeded"
            assert got.job == api.get(f"/jobs/{job['id']}").json()  # what GET shows
            assert json.loads(got.body)["status"] == "succeeded"
    finally:
        server.kill()
        receiver.stop()
