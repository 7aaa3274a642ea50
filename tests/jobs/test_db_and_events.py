"""SQLite layer (migrations, transactions, atomic claim across connections) and the event bus."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from easel.domain import GenerationParams, JobNotFound, JobStatus
from easel.jobs.db import MIGRATIONS, Database
from easel.jobs.events import EventBus
from easel.jobs.queue import SqliteJobQueue
from easel.services import Services


def params(n: int = 0) -> GenerationParams:
    return GenerationParams(
        prompt=f"job {n}", model="m", num_inference_steps=1, width=64, height=64, seed=n
    )


def test_migrations_run_once_and_pragmas_hold(tmp_path: Path) -> None:
    db = Database(tmp_path / "easel.db")
    assert db.version == len(MIGRATIONS)
    db.close()
    again = Database(tmp_path / "easel.db")  # reopening applies nothing twice
    assert again.version == len(MIGRATIONS)
    assert again.query("PRAGMA journal_mode")[0][0] == "wal"
    assert again.query("PRAGMA foreign_keys")[0][0] == 1
    with pytest.raises(sqlite3.IntegrityError):  # foreign keys are enforced
        with again.transaction() as conn:
            conn.execute(
                "INSERT INTO events (job_id, type, data, created_at) VALUES ('none', 'x', '{}', '')"
            )


def test_a_version_1_database_keeps_every_job_and_image_after_migrating(tmp_path: Path) -> None:
    # a database as the first release wrote it: one job with an image, at schema version 1
    path = tmp_path / "easel.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    old = params(3).to_dict()
    del old["image"], old["input_hashes"]  # fields the first release did not have
    conn.execute(
        "INSERT INTO jobs (id, task, model, params, width, height, status, created_at)"
        " VALUES ('j1', 'txt2img', 'm', ?, 64, 64, 'succeeded', '2026-11-26T00:00:00+00:00')",
        (json.dumps(old),),
    )
    conn.execute(
        "INSERT INTO images VALUES ('j1-0', 'j1', 0, 3, '2026-11-26/j1-0.png', 64, 64, 'job 3',"
        " '2026-11-26T00:00:01+00:00')"
    )
    conn.commit()
    conn.close()

    db = Database(path)
    assert db.version == len(MIGRATIONS)
    job = SqliteJobQueue(db, max_queued=10, max_attempts=3).get("j1")
    assert job.params.prompt == "job 3" and job.params.image is None
    assert [(i.id, i.seed, i.kind, i.path) for i in job.images] == [
        ("j1-0", 3, "generated", "2026-11-26/j1-0.png")
    ]
    with db.transaction() as conn:  # uploads (no job) fit the rebuilt table
        conn.execute(
            "INSERT INTO images (id, kind, path, width, height, prompt, created_at)"
            " VALUES ('u1', 'upload', 'uploads/u1.png', 8, 8, '', '2026-12-06')"
        )


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    queue = SqliteJobQueue(Database(tmp_path / "easel.db"), max_queued=10, max_attempts=3)
    with pytest.raises(RuntimeError):
        with queue.db.transaction():
            queue.submit(params())
            raise RuntimeError("boom")
    assert queue.db.query("SELECT COUNT(*) FROM jobs")[0][0] == 0


def test_claim_is_atomic_across_connections(tmp_path: Path) -> None:
    """Two connections (as two processes would have) and four threads: each job claimed once."""
    path = tmp_path / "easel.db"
    queues = [SqliteJobQueue(Database(path), max_queued=1000, max_attempts=3) for _ in range(2)]
    submitted = {queues[0].submit(params(i)).id for i in range(200)}
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(queue: SqliteJobQueue) -> None:
        while (job := queue.claim()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer, args=(queues[i % 2],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(submitted)


def test_subscribe_gets_backlog_then_live_events_from_a_thread(services: Services) -> None:
    job = services.submit_job(GenerationParams(prompt="x", num_inference_steps=3))
    bus: EventBus = services.events

    previews = []

    async def follow() -> list[tuple[int, str]]:
        seen = []
        async for event in services.subscribe(job.id):
            seen.append((event.id, event.type))
            previews.append(event.data.get("preview", ""))
            if event.type == "queued":  # backlog delivered; now run the job in a worker thread
                threading.Thread(target=services.workers[0].run_once).start()
        return seen

    seen = asyncio.run(asyncio.wait_for(follow(), timeout=10))
    assert [t for _, t in seen] == [
        "queued",
        "started",
        "progress",
        "progress",
        "progress",
        "succeeded",
    ]
    assert [i for i, _ in seen] == sorted({i for i, _ in seen})
    assert [e.id for e in bus.history(job.id)] == [i for i, _ in seen]
    assert [p[:23] for p in previews if p] == ["data:image/jpeg;base64,"]  # live, at step 2
    assert not any("preview" in e.data for e in bus.history(job.id)), "dropped once finished"

    async def replay(after: int) -> list[int]:
        return [e.id async for e in services.subscribe(job.id, after)]

    assert asyncio.run(replay(seen[2][0])) == [i for i, _ in seen[3:]]


def test_final_status_and_final_event_commit_together(services: Services) -> None:
    """A crash between the two (here: the event write fails) leaves neither, so recovery
    requeues the job instead of leaving a succeeded job that SSE clients wait on forever."""
    job = services.submit_job(GenerationParams(prompt="x", num_inference_steps=2))
    publish = services.events.publish

    def crash_on_final(job_id, type, data=None):  # type: ignore[no-untyped-def]
        if type == "succeeded":
            raise RuntimeError("the process died here")
        return publish(job_id, type, data)

    services.events.publish = crash_on_final  # type: ignore[method-assign]
    assert services.workers[0].run_once()  # logged with the job id; the worker lives on
    services.events.publish = publish  # type: ignore[method-assign]
    assert services.get_job(job.id).status is JobStatus.RUNNING
    assert "succeeded" not in [e.type for e in services.events.history(job.id)]


def test_subscribe_ends_when_the_job_is_final_and_the_backlog_is_done(services: Services) -> None:
    job = services.submit_job(GenerationParams(prompt="x", num_inference_steps=2))
    services.workers[0].run_once()
    final_id = services.events.history(job.id)[-1].id
    # a job left final without a final event (a database written by an older version)
    broken = services.submit_job(GenerationParams(prompt="y", num_inference_steps=2))
    services.queue.claim()
    services.queue.finish(broken.id, JobStatus.SUCCEEDED)

    async def follow(job_id: str, after: int = 0) -> list[str]:
        events = services.subscribe(job_id, after)
        return [e.type async for e in events]

    # a client that saw the final event reconnects with its id: nothing more, and the end
    assert asyncio.run(asyncio.wait_for(follow(job.id, final_id), timeout=5)) == []
    assert asyncio.run(asyncio.wait_for(follow(broken.id), timeout=5)) == ["queued"]


def test_subscribe_past_every_id_still_ends_with_the_job(services: Services) -> None:
    job = services.submit_job(GenerationParams(prompt="x", num_inference_steps=2))

    async def follow() -> list[str]:
        events = services.subscribe(job.id, 2**63 - 1)  # a client sent an id from the future
        # the job runs once the subscriber waits on live events
        worker = threading.Timer(0.3, services.workers[0].run_once)
        worker.start()
        seen = [e.type async for e in events]
        worker.join()
        return seen

    assert asyncio.run(asyncio.wait_for(follow(), timeout=5)) == []


def test_subscribe_reads_nothing_until_iterated(services: Services) -> None:
    """The web UI calls subscribe() on the event loop: the job lookup happens in iteration's
    first step, off the loop, and an unknown job fails there."""
    events = services.subscribe("no-such-job")  # no database read here, so no error yet

    async def first() -> object:
        return await anext(events)

    with pytest.raises(JobNotFound):
        asyncio.run(first())
    assert services.events._subscribers == {}, "the failed subscriber is gone"
