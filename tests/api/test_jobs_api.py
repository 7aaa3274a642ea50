"""The HTTP API over TestClient: routes, schemas, typed errors, SSE (stand-in generator)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest
from fastapi.testclient import TestClient

from easel.services import Services


def wait_for(client: TestClient, job_id: str, until, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting on job {job_id}: {job}")


def wait_final(client: TestClient, job_id: str) -> dict:
    return wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed", "canceled"))


def rows(services: Services) -> int:
    return services.db.query("SELECT COUNT(*) FROM jobs")[0][0]


def parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
        )
        if "event" in fields:
            events.append(
                {"id": int(fields["id"]), "type": fields["event"], **json.loads(fields["data"])}
            )
    return events


def test_health_models_queue(client: TestClient) -> None:
    assert client.get("/api/v1/health").json()["status"] == "ok"
    models = {m["id"]: m for m in client.get("/api/v1/models").json()}
    assert models["tiny"]["available"] is True and models["tiny"]["defaults"]["width"] == 64
    assert models["tiny"]["limits"]["max_size"] == 128
    assert models["sdxl"]["available"] is False
    queue = client.get("/api/v1/queue").json()
    assert queue["counts"]["queued"] == 0 and queue["workers"] == 1


def test_submit_get_image_roundtrip(client: TestClient) -> None:
    created = client.post(
        "/api/v1/jobs", json={"prompt": "a red circle", "seed": 7, "num_inference_steps": 3}
    )
    assert created.status_code == 202, created.text
    job = created.json()
    assert created.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert job["params"]["seed"] == 7 and job["params"]["width"] == 64
    done = wait_final(client, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert done["progress"] == {"step": 3, "total": 3}
    assert done["finished_at"].endswith("Z")  # ISO 8601, UTC
    (image,) = done["images"]
    png = client.get(image["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    listed = client.get("/api/v1/images", params={"q": "RED"}).json()
    assert [i["id"] for i in listed] == [image["id"]]
    assert client.get("/api/v1/jobs", params={"status": "succeeded"}).json()[0]["id"] == job["id"]


def test_events_stream_and_replay(client: TestClient) -> None:
    job = client.post("/api/v1/jobs", json={"prompt": "x", "num_inference_steps": 4}).json()
    events = parse_sse(client.get(f"/api/v1/jobs/{job['id']}/events").text)
    types = [e["type"] for e in events]
    assert types == ["queued", "started"] + ["progress"] * 4 + ["succeeded"]
    assert [e["step"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4]
    assert events[-1]["images"][0]["url"].startswith("/api/v1/images/")
    # times read like the job's own: ISO 8601 with Z
    iso_z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
    assert iso_z.fullmatch(job["created_at"])
    assert all(iso_z.fullmatch(e["created_at"]) for e in events), events[0]["created_at"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)
    replay = parse_sse(
        client.get(f"/api/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": str(ids[2])}).text
    )
    assert [e["id"] for e in replay] == ids[3:]


def test_event_ids_beyond_sqlite_integers_are_422(client: TestClient) -> None:
    job = client.post("/api/v1/jobs", json={"prompt": "x", "num_inference_steps": 1}).json()
    wait_final(client, job["id"])
    url = f"/api/v1/jobs/{job['id']}/events"
    too_big, largest = str(2**63), str(2**63 - 1)
    for response, field in (
        (client.get(url, params={"after": too_big}), "after"),
        (client.get(url, headers={"Last-Event-ID": too_big}), "last_event_id"),
    ):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == field and largest in error["message"]
    top = client.get(url, params={"after": largest})
    assert top.status_code == 200 and "event:" not in top.text  # nothing after the largest id


def test_cancel_queued_and_running(client: TestClient, app_services: Services) -> None:
    slow = {"prompt": "slow", "num_inference_steps": 150}
    running = client.post("/api/v1/jobs", json=slow).json()
    waiting = client.post("/api/v1/jobs", json=slow).json()
    wait_for(client, running["id"], lambda j: j["progress"]["step"] >= 2)
    assert client.get(f"/api/v1/jobs/{waiting['id']}").json()["position"] == 1
    canceled = client.delete(f"/api/v1/jobs/{waiting['id']}").json()
    assert canceled["status"] == "canceled" and canceled["position"] is None
    client.delete(f"/api/v1/jobs/{running['id']}")
    stopped = wait_final(client, running["id"])
    assert stopped["status"] == "canceled" and stopped["progress"]["step"] < 150
    assert wait_final(client, waiting["id"])["started_at"] is None
    after = client.post("/api/v1/jobs", json={"prompt": "after"}).json()
    assert wait_final(client, after["id"])["status"] == "succeeded"  # worker healthy


def test_priority_reorders_waiting_jobs(client: TestClient) -> None:
    blocker = client.post("/api/v1/jobs", json={"prompt": "b", "num_inference_steps": 150}).json()
    wait_for(client, blocker["id"], lambda j: j["status"] == "running")
    low = client.post("/api/v1/jobs", json={"prompt": "low"}).json()
    high = client.post("/api/v1/jobs", json={"prompt": "high", "priority": 10}).json()
    assert client.get(f"/api/v1/jobs/{high['id']}").json()["position"] == 1
    assert client.get(f"/api/v1/jobs/{low['id']}").json()["position"] == 2
    done = [wait_final(client, j["id"]) for j in (blocker, low, high)]
    assert done[2]["started_at"] < done[1]["started_at"]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"prompt": "x", "width": 100}, 422, "width"),
        ({"prompt": "x", "num_inference_steps": 0}, 422, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": "lots"}, 422, "guidance_scale"),
        ({"prompt": "x", "guidance_end": 0}, 422, "guidance_end"),
        ({"prompt": "x", "guidance_end": 2}, 422, "guidance_end"),
        ({"prompt": "x", "task": "paint"}, 422, "task"),
        ({"prompt": "x", "task": "img2img"}, 422, "image"),  # needs an input image
        ({"prompt": "x", "task": "inpaint", "image": "nope", "mask": "nope"}, 422, "image"),
        ({"prompt": "x", "strength": 0.5}, 422, "strength"),  # only img2img would use it
        ({"prompt": "x", "colour": "red"}, 422, "colour"),
        ({"prompt": ""}, 422, "prompt"),
        ({}, 422, "prompt"),
        ({"prompt": "x", "priority": 101}, 422, "priority"),
        ({"prompt": "x", "num_images": 3}, 422, "num_images"),  # over the pixel budget
        ({"prompt": "x", "model": "no-such-model"}, 404, "model"),
        ({"prompt": "x", "model": "sdxl"}, 409, "model"),
    ],
)
def test_bad_requests_name_the_field_and_store_nothing(
    client: TestClient, app_services: Services, body: dict, status: int, field: str
) -> None:
    app_services.settings.max_pixels_per_job = 64 * 64 * 2
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and field in error["message"]
    assert rows(app_services) == 0


def test_malformed_json_and_oversize_body(client: TestClient, app_services: Services) -> None:
    bad = client.post(
        "/api/v1/jobs", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "MalformedJSON"
    huge = json.dumps({"prompt": "x" * (app_services.settings.max_body_bytes + 1)})
    big = client.post("/api/v1/jobs", content=huge, headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["type"] == "PayloadTooLarge"

    def chunks():  # no Content-Length: the streamed size is counted
        for _ in range(20):
            yield b"x" * 100_000

    streamed = client.post(
        "/api/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert rows(app_services) == 0


def test_queue_full_gives_429_with_retry_after(client: TestClient, app_services: Services) -> None:
    app_services.queue.max_queued = 1
    client.post("/api/v1/jobs", json={"prompt": "a", "num_inference_steps": 150})
    client.post("/api/v1/jobs", json={"prompt": "b", "num_inference_steps": 150})
    full = client.post("/api/v1/jobs", json={"prompt": "c"})
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["type"] == "QueueFull"


def test_retry_after_is_computed_off_the_event_loop(
    client: TestClient, app_services: Services
) -> None:
    """The QueueFull handler is async: its database read must not run on the loop's thread."""
    threads_with_a_loop = []
    retry_after_s = app_services.retry_after_s

    def recording() -> int:
        try:
            asyncio.get_running_loop()
            threads_with_a_loop.append(threading.current_thread().name)
        except RuntimeError:  # no loop running in this thread: good
            pass
        return retry_after_s()

    app_services.retry_after_s = recording  # type: ignore[method-assign]
    app_services.queue.max_queued = 0
    full = client.post("/api/v1/jobs", json={"prompt": "c"})
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert threads_with_a_loop == []


def test_unknown_job_and_image_are_404(client: TestClient) -> None:
    for url in ("/api/v1/jobs/nope", "/api/v1/jobs/nope/events", "/api/v1/images/nope"):
        response = client.get(url)
        assert response.status_code == 404 and response.json()["error"]["field"]
    assert client.delete("/api/v1/jobs/nope").status_code == 404
    assert client.get("/api/v1/nothing").json()["error"]["type"] == "HTTPError"


def test_openapi_lists_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}/events", "/api/v1/queue"} <= set(paths)
    assert client.get("/docs").status_code == 200
