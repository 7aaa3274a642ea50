"""Fault injection: the disk fills (or the database fails) while a job writes its images, its
events or its final status. Real SQLite, the stand-in generator, a real event stream: each job
ends exactly once, with exactly one final event that ends its stream, and no file is left
without a row."""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from easel.config import Settings
from easel.domain import DiskFull, GenerationParams, JobStatus
from easel.jobs import worker as worker_module
from easel.jobs.events import FINAL_EVENTS, JobEvent
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services

DISK_FULL = "could not store the job's work: No space left on device (ENOSPC)"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "RECORD_RETRY_S", (0.01, 0.05))


def enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


class Faults:
    """Stands in for ``real``: the calls numbered in ``fail`` (from 1) raise ``error()``
    instead of running; the others run ``real``."""

    def __init__(
        self,
        real: Callable[..., Any],
        fail: range | set[int],
        error: Callable[[], BaseException] = enospc,
    ) -> None:
        self.real, self.fail, self.error = real, fail, error
        self.calls = self.raised = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls in self.fail:
            self.raised += 1
            raise self.error()
        return self.real(*args, **kwargs)


def submit(services: Services, prompt: str = "a red circle", **kw: Any) -> str:
    kw.setdefault("num_inference_steps", 4)
    return services.submit_job(GenerationParams(prompt=prompt, width=32, height=32, **kw)).id


def run_and_follow(services: Services, job_ids: list[str], runs: int) -> dict[str, list[JobEvent]]:
    """Subscribe to each job's event stream, run ``runs`` jobs in a worker thread meanwhile,
    and return what each stream gave once it ended by itself (a stream that never ends fails
    the test after 20 s)."""

    async def main() -> dict[str, list[JobEvent]]:
        async def follow(job_id: str) -> list[JobEvent]:
            return [event async for event in services.subscribe(job_id)]

        streams = [asyncio.create_task(follow(job_id)) for job_id in job_ids]
        await asyncio.sleep(0.05)  # subscribed (a later one would read the backlog anyway)
        await asyncio.to_thread(lambda: [services.workers[0].run_once() for _ in range(runs)])
        return dict(zip(job_ids, await asyncio.gather(*streams), strict=True))

    return asyncio.run(asyncio.wait_for(main(), timeout=20))


def assert_ended_once(services: Services, job_id: str, stream: list[JobEvent]) -> JobStatus:
    """The job is final, with exactly one final event (of its status), which ended its stream."""
    status = services.get_job(job_id).status
    assert status.final, f"job {job_id} is stranded {status}"
    history = services.events.history(job_id)
    finals = [e for e in history if e.type in FINAL_EVENTS]
    assert [e.type for e in finals] == [str(status)]
    assert stream and stream[-1].id == finals[0].id, "the stream ends with the final event"
    assert [e.id for e in stream] == [e.id for e in history], "the stream saw what was stored"
    return status


def assert_files_match_rows(services: Services) -> None:
    """Every PNG under images/ has its row and every row its file; no temp files."""
    root = services.images.root
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    rows = {r[0] for r in services.db.query("SELECT path FROM images")}
    assert files == rows


def committed_status(services: Services, job_id: str) -> str:
    """The job's status as another connection (another process) reads it: committed only."""
    with closing(sqlite3.connect(services.settings.db_path)) as other:
        return str(other.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])


def test_disk_full_while_writing_an_image_fails_the_job_and_leaves_no_file(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(services, num_images=3)
    real_write = Path.write_bytes
    temp_writes = 0

    def filling_disk(path: Path, data: bytes) -> int:
        nonlocal temp_writes
        temp_writes += path.suffix == ".tmp"
        if temp_writes == 2:  # the first image is written, the second finds the disk full
            real_write(path, data[: len(data) // 2])  # as a filling disk leaves it
            raise enospc()
        return real_write(path, data)

    monkeypatch.setattr(Path, "write_bytes", filling_disk)

    streams = run_and_follow(services, [job_id], runs=1)

    assert temp_writes == 2
    assert assert_ended_once(services, job_id, streams[job_id]) is JobStatus.FAILED
    assert services.get_job(job_id).error == DISK_FULL
    assert streams[job_id][-1].data == {"error": DISK_FULL}
    assert services.get_job(job_id).images == []  # the first image went with the failure
    assert_files_match_rows(services)
    assert not any(services.images.root.rglob("*.*")), "no image, no half file, no temp file"
    # the worker goes on: the disk has room again
    again = submit(services, num_images=3)
    assert services.workers[0].run_once()
    assert services.get_job(again).status is JobStatus.SUCCEEDED
    assert len(services.get_job(again).images) == 3
    assert_files_match_rows(services)


def test_event_writes_failing_fail_the_job_once_its_failure_can_be_recorded(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """The "started" event cannot be written, then neither can the "failed" one (3 times): the
    worker retries until it is, and the stream ends with it."""
    job_id = submit(services)
    publish = Faults(services.events.publish, fail=range(1, 5))
    services.events.publish = publish  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="easel.jobs.worker")

    streams = run_and_follow(services, [job_id], runs=1)

    assert publish.raised == 4
    assert assert_ended_once(services, job_id, streams[job_id]) is JobStatus.FAILED
    assert services.get_job(job_id).error == DISK_FULL
    assert [e.type for e in streams[job_id]] == ["queued", "failed"]
    retries = [r.getMessage() for r in caplog.records if "could not record its end" in r.message]
    assert len(retries) == 3 and all(job_id in m for m in retries), retries
    assert committed_status(services, job_id) == "failed"
    ok = submit(services)
    assert services.workers[0].run_once()
    assert services.get_job(ok).status is JobStatus.SUCCEEDED


class FailingCommits:
    """The database's connection, whose COMMIT fails (as SQLite's does when the disk is full)
    ``times`` times once ``armed``; everything else goes to the real connection."""

    def __init__(self, conn: sqlite3.Connection, times: int) -> None:
        self.conn, self.left, self.armed, self.failed = conn, times, False, 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.armed and self.left:
            self.left -= 1
            self.failed += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_a_failing_final_commit_is_retried_and_the_job_succeeds(services: Services) -> None:
    """The images are stored, then the commit of "succeeded" fails 3 times: the job stays
    running (no stream sees a final event that was taken back) until the 4th commit, then
    ends succeeded with its images; the connection is not left inside a transaction."""
    job_id = submit(services, num_images=2)
    conn = FailingCommits(services.db._conn, times=3)
    services.db._conn = conn  # type: ignore[assignment]
    real_finish = services.queue.finish
    seen_while_failing: list[str] = []

    def finish(*args: Any, **kwargs: Any) -> Any:
        if conn.armed:
            seen_while_failing.append(committed_status(services, job_id))
        conn.armed = True
        return real_finish(*args, **kwargs)

    services.queue.finish = finish  # type: ignore[method-assign]

    streams = run_and_follow(services, [job_id], runs=1)

    assert conn.failed == 3
    assert seen_while_failing == ["running"] * 3
    assert assert_ended_once(services, job_id, streams[job_id]) is JobStatus.SUCCEEDED
    assert committed_status(services, job_id) == "succeeded"
    job = services.get_job(job_id)
    assert len(job.images) == 2 and all(services.images.path(i.id).is_file() for i in job.images)
    assert_files_match_rows(services)
    services.queue.finish = real_finish  # type: ignore[method-assign]
    ok = submit(services)
    assert services.workers[0].run_once()
    assert committed_status(services, ok) == "succeeded"


def test_recording_a_failure_is_retried_until_the_queue_takes_it(services: Services) -> None:
    """The job fails by itself, and recording that fails 3 times (the disk is full): it ends
    failed with its own reason, once."""
    job_id = submit(services, prompt="a <fail> circle")
    services.queue.finish = Faults(services.queue.finish, fail=range(1, 4))  # type: ignore[method-assign]

    streams = run_and_follow(services, [job_id], runs=1)

    assert assert_ended_once(services, job_id, streams[job_id]) is JobStatus.FAILED
    assert services.get_job(job_id).error == (
        "internal error: RuntimeError: stand-in failure requested by the prompt"
    )


def test_a_really_full_database_strands_no_job(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """Real SQLITE_FULL: the database may grow no more pages (``max_page_count``) while a job
    writes its progress events; its failure is recorded (at once when the small "failed"
    event still fits a page, else once the database may grow again)."""
    job_id = submit(services, num_inference_steps=24)
    services.db.query("VACUUM")  # no free pages left (the migrations freed some)
    (pages,) = services.db.query("PRAGMA page_count")[0]
    services.db.query(f"PRAGMA max_page_count = {pages}")
    caplog.set_level(logging.WARNING, logger="easel.jobs.worker")

    def free_space_later() -> None:  # once the worker retries recording (or is done)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not services.get_job(job_id).status.final:
            if any("could not record its end" in r.message for r in list(caplog.records)):
                break
            time.sleep(0.01)
        services.db.query("PRAGMA max_page_count = 1073741823")

    freer = threading.Thread(target=free_space_later)
    freer.start()
    streams = run_and_follow(services, [job_id], runs=1)
    freer.join()

    assert assert_ended_once(services, job_id, streams[job_id]) is JobStatus.FAILED
    assert services.get_job(job_id).error == (
        "could not store the job's work: database error: database or disk is full"
    )
    assert_files_match_rows(services)


def test_a_job_whose_images_no_longer_fit_fails_saying_so(services: Services) -> None:
    """The disk went under min_free_disk_mb after the job was accepted: its images are not
    written, it fails with the DiskFull message."""
    job_id = submit(services)
    services.disk.min_free_bytes = 2**62
    streams = run_and_follow(services, [job_id], runs=1)
    assert assert_ended_once(services, job_id, streams[job_id]) is JobStatus.FAILED
    error = services.get_job(job_id).error or ""
    assert "MiB free on the disk holding EASEL_HOME" in error and "min_free_disk_mb" in error
    assert not any(services.images.root.rglob("*.*"))
    with pytest.raises(DiskFull):  # and new jobs are refused, nothing stored
        submit(services)
    assert services.db.query("SELECT COUNT(*) FROM jobs")[0][0] == 1


def test_many_jobs_under_intermittent_faults_all_end_once(services: Services) -> None:
    """Every third event write fails for a while: two submits are refused (their "queued" event
    could not be written) and leave no row; with the worker thread running, every job that was
    accepted ends exactly once, and its stream with it."""
    publish = Faults(services.events.publish, fail=set(range(6, 24, 3)))
    services.events.publish = publish  # type: ignore[method-assign]
    accepted = []
    for n in range(10):
        try:
            accepted.append(submit(services, prompt=f"job {n}", num_inference_steps=2))
        except OSError:
            pass  # refused: not acknowledged
    assert len(accepted) == 8  # calls 6 and 9 failed
    assert services.db.query("SELECT COUNT(*) FROM jobs")[0][0] == 8

    async def follow_all() -> dict[str, list[JobEvent]]:
        async def follow(job_id: str) -> list[JobEvent]:
            return [event async for event in services.subscribe(job_id)]

        streams = asyncio.gather(*(follow(j) for j in accepted))
        await asyncio.sleep(0.05)
        services.start()  # the worker thread
        return dict(zip(accepted, await streams, strict=True))

    streams = asyncio.run(asyncio.wait_for(follow_all(), timeout=30))
    outcomes = [assert_ended_once(services, j, streams[j]) for j in accepted]
    assert JobStatus.SUCCEEDED in outcomes and JobStatus.FAILED in outcomes, outcomes
    for job_id in accepted:
        job = services.get_job(job_id)
        if job.status is JobStatus.FAILED:
            assert job.error == DISK_FULL and job.images == []
        else:
            assert len(job.images) == 1
    assert_files_match_rows(services)


def test_a_store_that_stays_broken_leaves_the_job_to_the_next_start(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker retries recording until a drain gives up on it; the job stays `running` in
    the database, and the next start requeues it and runs it to the end."""
    quick = settings.model_copy(update={"drain_timeout_s": 0.1})
    services = build_services(quick, generator=StandInGenerator())
    job_id = submit(services)
    services.events.publish = Faults(services.events.publish, fail=range(1, 2**31))  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="easel.jobs.worker")
    services.start()
    deadline = time.monotonic() + 10
    while not any("could not record its end" in r.message for r in list(caplog.records)):
        assert time.monotonic() < deadline, "the worker never retried"
        time.sleep(0.01)
    services.stop()
    assert committed_status(services, job_id) == "running"
    assert any("left for the start-up recovery" in r.message for r in caplog.records)

    again = build_services(quick, generator=StandInGenerator())
    try:
        again.start()  # requeues it; the worker runs it
        streams = asyncio.run(asyncio.wait_for(_follow(again, job_id), timeout=10))
        assert assert_ended_once(again, job_id, streams) is JobStatus.SUCCEEDED
        assert [e.type for e in streams][:2] == ["queued", "requeued"]
    finally:
        again.stop()


async def _follow(services: Services, job_id: str) -> list[JobEvent]:
    return [event async for event in services.subscribe(job_id)]
