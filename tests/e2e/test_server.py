"""The real server over HTTP: concurrency, ordering, SSE, cancel, bad input (tiny SD on CPU)."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.e2e.helpers import read_events, submit, wait_final, wait_for
from tests.e2e.server import Server

pytestmark = pytest.mark.slow


def total_jobs(api: httpx.Client) -> int:
    return sum(api.get("/queue").json()["counts"].values())


def test_fifty_jobs_from_ten_threads_each_run_once(server: Server, api: httpx.Client) -> None:
    barrier = threading.Barrier(10)

    def client_thread(n: int) -> list[str]:
        with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as own:
            barrier.wait()  # all ten threads submit at the same moment
            return [
                submit(own, prompt=f"shape {n}-{i}", num_inference_steps=1, seed=n * 10 + i)["id"]
                for i in range(5)
            ]

    with ThreadPoolExecutor(10) as pool:
        ids = [job_id for batch in pool.map(client_thread, range(10)) for job_id in batch]
    assert len(set(ids)) == 50
    image_ids = set()
    for job_id in ids:
        job = wait_final(api, job_id, timeout=180)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        types = [e["type"] for e in read_events(api, job_id)]
        assert types.count("started") == 1 and types[-1] == "succeeded"
        (image,) = job["images"]
        png = api.get(image["url"].removeprefix("/api/v1"))
        assert png.status_code == 200
        assert Image.open(io.BytesIO(png.content)).size == (64, 64)
        image_ids.add(image["id"])
    assert len(image_ids) == 50


def test_priorities_reorder_and_positions_shrink(api: httpx.Client) -> None:
    blocker = submit(api, prompt="blocker", num_inference_steps=12)
    wait_for(api, blocker["id"], lambda j: j["status"] == "running")
    lows = [submit(api, prompt=f"low {i}", num_inference_steps=2) for i in range(4)]
    high = submit(api, prompt="urgent", num_inference_steps=2, priority=5)
    positions = [api.get(f"/jobs/{j['id']}").json()["position"] for j in (high, *lows)]
    assert positions == [1, 2, 3, 4, 5]
    last_seen = []
    while (job := api.get(f"/jobs/{lows[-1]['id']}").json())["status"] == "queued":
        if not last_seen or last_seen[-1] != job["position"]:
            last_seen.append(job["position"])
        time.sleep(0.02)
    assert last_seen == sorted(last_seen, reverse=True) and len(last_seen) >= 2, last_seen
    done = [wait_final(api, j["id"]) for j in (blocker, high, *lows)]
    starts = [j["started_at"] for j in done]
    assert starts == sorted(starts), "blocker, then the high-priority job, then the rest in order"


def test_events_in_order_and_replay_after_reconnect(api: httpx.Client) -> None:
    job = submit(api, num_inference_steps=6, seed=3)
    first = read_events(api, job["id"], stop_after=3)  # disconnect mid-run
    rest = read_events(api, job["id"], last_event_id=first[-1]["id"])
    events = first + rest
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids)), "no event twice, none out of order"
    assert ids == [e["id"] for e in read_events(api, job["id"])], "replay misses nothing"
    types = [e["type"] for e in events]
    assert types == ["queued", "started"] + ["progress"] * 6 + ["succeeded"]
    assert [e["step"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4, 5, 6]
    assert events[-1]["images"][0]["seed"] == 3


def test_cancel_queued_and_running(api: httpx.Client) -> None:
    running = submit(api, prompt="long", num_inference_steps=150)
    waiting = submit(api, prompt="waiting", num_inference_steps=2)
    wait_for(api, running["id"], lambda j: j["progress"]["step"] >= 1)
    assert api.delete(f"/jobs/{waiting['id']}").json()["status"] == "canceled"
    api.delete(f"/jobs/{running['id']}")
    stopped = wait_final(api, running["id"], timeout=30)
    assert stopped["status"] == "canceled" and stopped["progress"]["step"] < 150
    assert api.get(f"/jobs/{waiting['id']}").json()["started_at"] is None
    assert [e["type"] for e in read_events(api, waiting["id"])] == ["queued", "canceled"]
    after = submit(api, num_inference_steps=1)
    assert wait_final(api, after["id"])["status"] == "succeeded", "the worker is healthy"


def test_bad_input_is_rejected_with_the_field_named(server: Server, api: httpx.Client) -> None:
    before = total_jobs(api)
    malformed = api.post(
        "/jobs", content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    cases = [
        ({"prompt": "x", "model": "no-such-model"}, 404, "model"),
        ({"prompt": "x", "task": "sculpt"}, 422, "task"),
        ({"prompt": "x", "width": 65}, 422, "width"),
        ({"prompt": "x", "guidance_scale": 1000}, 422, "guidance_scale"),
        ({"prompt": "x", "num_inference_steps": "many"}, 422, "num_inference_steps"),
    ]
    for body, status, field in cases:
        response = api.post("/jobs", json=body)
        assert response.status_code == status, response.text
        assert response.json()["error"]["field"] == field
    oversize = api.post(
        "/jobs",
        content=b'{"prompt": "' + b"x" * 2_000_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert oversize.status_code == 413
    assert total_jobs(api) == before, "no row for a rejected request"
