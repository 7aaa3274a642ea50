"""Event streams at shutdown and under caps, without a server: the bus ends subscriptions with
``server-stopping`` after what was already published, slots are counted per key or address,
and the middlewares' answers to slow, chunked and oversized bodies (the real server's side of
these is tests/e2e/test_hostile_server.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fastapi.testclient import TestClient

from easel.api.routers.jobs import sse_format
from easel.api.streams import RETRY_AFTER_S, StreamSlots, client_of
from easel.domain import LOCAL, GenerationParams, Principal, QuotaExceeded, ServerBusy
from easel.jobs.events import JobEvent, stopping_event
from easel.services import Services


def test_stop_streams_ends_each_subscription_after_the_events_before_it(
    app_services: Services,
) -> None:
    services = app_services  # not started: nothing runs the jobs
    running = services.submit_job(GenerationParams(prompt="x", num_inference_steps=2))
    waiting = services.submit_job(GenerationParams(prompt="y", num_inference_steps=2))

    async def follow(job_id: str, ready: asyncio.Event) -> list[str]:
        seen = []
        async for event in services.subscribe(job_id):
            seen.append(event.type)
            if event.type == "queued":
                ready.set()
        return seen

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        ready = [asyncio.Event(), asyncio.Event()]
        tasks = [
            asyncio.ensure_future(follow(job.id, flag))
            for job, flag in zip((running, waiting), ready, strict=True)
        ]
        for flag in ready:
            await flag.wait()

        def publish_then_stop() -> None:  # as a drain does: from another thread
            services.events.publish(running.id, "requeued", {"reason": "server stopping"})
            services.events.stop_streams()

        threading.Thread(target=publish_then_stop).start()
        first, second = await asyncio.gather(*tasks)
        # a stream opened after the stop gets its backlog, then the stop at once
        late = [e.type async for e in services.subscribe(waiting.id)]
        return first, second, late

    try:
        first, second, late = asyncio.run(asyncio.wait_for(scenario(), timeout=10))
    finally:
        services.stop()
    assert first == ["queued", "requeued", "server-stopping"]
    assert second == ["queued", "server-stopping"]
    assert late == ["queued", "server-stopping"]


def test_server_stopping_is_sent_without_an_id() -> None:
    """A client's Last-Event-ID stays at the job's last stored event for its reconnect."""
    text = sse_format(stopping_event("job1"))
    assert text.startswith("event: server-stopping\ndata: {")
    assert "\nid:" not in text and '"job_id": "job1"' in text
    stored = JobEvent(id=7, job_id="job1", type="queued", created_at="2025-01-01T00:00:00+00:00")
    assert sse_format(stored).startswith("id: 7\nevent: queued\n")


def test_slots_per_client_and_in_total() -> None:
    slots = StreamSlots(total=3, per_client=2)
    alice = client_of(Principal(key_id="k1", name="alice", scopes=frozenset()), "10.0.0.1")
    bob = client_of(Principal(key_id="k2", name="bob", scopes=frozenset()), "10.0.0.1")
    assert alice != bob  # keys count apart, whatever address they come from
    assert client_of(LOCAL, "10.0.0.1") != client_of(LOCAL, "10.0.0.2")  # keyless: by address
    held = [slots.take(alice), slots.take(alice)]
    with pytest.raises(QuotaExceeded) as per_client:
        slots.take(alice)
    assert per_client.value.status == 429 and per_client.value.retry_after_s == RETRY_AFTER_S
    held.append(slots.take(bob))
    with pytest.raises(ServerBusy) as total:
        slots.take(bob)
    assert total.value.status == 503 and "max_streams" in total.value.message
    held[0].release()
    held[0].release()  # a second release gives nothing back twice
    assert slots.open == 2
    slots.take(alice)
    with pytest.raises(ServerBusy):
        slots.take(bob)


def test_bodies_outside_the_api_must_state_a_bounded_length(client: TestClient) -> None:
    chunked = client.post(
        "/gradio_api/upload",
        content=iter([b"--x\r\n"]),  # a generator body goes out chunked
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert chunked.status_code == 411 and chunked.json()["error"]["type"] == "LengthRequired"
    settings = client.app.state.services.settings  # type: ignore[attr-defined]
    big = client.post("/anything", content=b"x" * (settings.max_body_bytes + 1))
    assert big.status_code == 413 and big.json()["error"]["type"] == "PayloadTooLarge"
    assert client.get("/api/v1/health").status_code == 200
