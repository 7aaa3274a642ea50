"""Small HTTP helpers for the end-to-end tests."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

FINAL = ("succeeded", "failed", "canceled")


def submit(api: httpx.Client, **body: Any) -> dict[str, Any]:
    response = api.post("/jobs", json={"prompt": "a red circle", **body})
    assert response.status_code == 202, response.text
    return response.json()


def wait_for(api: httpx.Client, job_id: str, until: Any, timeout: float = 90.0) -> dict[str, Any]:
    """Poll the job until ``until(job)`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting on job {job_id}: {job}")


def wait_final(api: httpx.Client, job_id: str, timeout: float = 90.0) -> dict[str, Any]:
    return wait_for(api, job_id, lambda j: j["status"] in FINAL, timeout)


def read_events(
    api: httpx.Client, job_id: str, *, last_event_id: int | None = None, stop_after: int = 0
) -> list[dict[str, Any]]:
    """Read a job's SSE stream; with ``stop_after`` disconnect after that many events."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    with api.stream("GET", f"/jobs/{job_id}/events", headers=headers, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                key, _, value = line.partition(": ")
                fields[key] = value
                continue
            if "event" in fields:
                events.append(
                    {"id": int(fields["id"]), "type": fields["event"], **json.loads(fields["data"])}
                )
                if stop_after and len(events) >= stop_after:
                    break
            fields = {}
    return events
