"""Dynamic batching in the queue and the worker: compatible jobs claimed together, run in shared
pipeline calls by the real engine (a tiny SD), each with its own events, images and cancel."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from easel.config import CPU_MAX_BATCH, Settings
from easel.domain import GenerationParams, JobRecord, JobStatus
from easel.engine.generate import Engine
from easel.jobs.events import JobEvent
from easel.jobs.standin import StandInGenerator
from easel.models.catalog import ModelCatalog
from easel.services import Services, build_services
from tests.jobs.conftest import TINY_DEFAULTS


def _params(**overrides: Any) -> GenerationParams:
    values: dict[str, Any] = dict(prompt="a red circle", num_inference_steps=3, seed=1)
    values.update(overrides)
    return GenerationParams(**values)


# --- the queue's claim of compatible jobs -------------------------------------------------------


@pytest.fixture
def queued(services: Services) -> Services:
    """Services with the stand-in generator (the queue is what these tests look at)."""
    return services


def _claim_lead(services: Services) -> JobRecord:
    job = services.queue.claim()
    assert job is not None
    return job


def test_claim_compatible_takes_the_front_of_the_queue_in_order(queued: Services) -> None:
    lead = queued.submit_job(_params(seed=1))
    same = [queued.submit_job(_params(seed=s, prompt=f"p{s}")) for s in (2, 3)]
    other = queued.submit_job(_params(seed=4, num_inference_steps=4))
    after = queued.submit_job(_params(seed=5))  # compatible, but behind the other kind
    assert _claim_lead(queued).id == lead.id
    taken = queued.queue.claim_compatible(queued.queue.get(lead.id), 8)
    assert [j.id for j in taken] == [j.id for j in same]
    assert all(j.status is JobStatus.RUNNING and j.attempts == 1 for j in taken)
    # the job of another kind is next, then the one behind it: nothing was skipped
    assert queued.queue.position(other.id) == 1 and queued.queue.position(after.id) == 2
    assert queued.queue.claim_compatible(queued.queue.get(lead.id), 8) == []


def test_claim_compatible_counts_images_and_never_skips_a_higher_priority_job(
    queued: Services,
) -> None:
    lead = queued.submit_job(_params(seed=1))
    two = queued.submit_job(_params(seed=2, num_images=2))
    three = queued.submit_job(_params(seed=3, num_images=3))
    _claim_lead(queued)
    lead = queued.queue.get(lead.id)
    # room for 3 more images: the 2-image job joins, the 3-image one does not fit and ends it
    assert [j.id for j in queued.queue.claim_compatible(lead, 3)] == [two.id]
    urgent = queued.submit_job(_params(seed=4, width=128), priority=5)
    assert queued.queue.claim_compatible(lead, 8) == []  # the urgent job of another kind leads
    assert queued.queue.position(urgent.id) == 1 and queued.queue.position(three.id) == 2


def test_jobs_that_never_batch_claim_nothing(queued: Services) -> None:
    lead = queued.submit_job(_params(seed=1))
    queued.submit_job(_params(seed=2))
    job = _claim_lead(queued)
    assert job.id == lead.id
    style = GenerationParams.from_dict({**job.params.to_dict(), "task": "style"})
    as_style = JobRecord(**{**job.__dict__, "params": style})
    assert queued.queue.claim_compatible(as_style, 8) == []
    assert queued.queue.claim_compatible(job, 0) == []


def test_batching_is_on_by_default_on_the_cpu_only(tmp_path: Path) -> None:
    # the CPU's default rests on tests/engine/test_batching.py's pixel checks, which no GPU
    # has run yet; a value set applies everywhere
    assert Settings(home=tmp_path).batch_limit("cpu") == CPU_MAX_BATCH > 1
    assert Settings(home=tmp_path).batch_limit("cuda:0") == 1
    assert Settings(home=tmp_path, max_batch=2).batch_limit("cuda:0") == 2
    assert Settings(home=tmp_path, max_batch=1).batch_limit("cpu") == 1


def test_a_worker_with_a_one_at_a_time_generator_does_not_batch(queued: Services) -> None:
    # the stand-in has no generate_batch: its worker claims jobs one by one as before
    assert isinstance(queued.workers[0].generator, StandInGenerator)
    assert queued.workers[0].max_batch == 1
    first = queued.submit_job(_params(seed=1))
    second = queued.submit_job(_params(seed=2))
    queued.workers[0].run_once()
    assert queued.get_job(first.id).status is JobStatus.SUCCEEDED
    assert queued.get_job(second.id).status is JobStatus.QUEUED


# --- the worker, with the real engine -----------------------------------------------------------


@pytest.fixture
def engine_services(easel_home: Path, tiny_sd_path: Path) -> Iterator[Services]:
    settings = Settings(
        home=easel_home,
        default_model="tiny",
        preview_every=2,
        cpu_graphs=False,  # tracing each batch shape would cost seconds
        max_batch=4,
    )
    ModelCatalog(settings).add("tiny", str(tiny_sd_path), defaults=TINY_DEFAULTS)
    services = build_services(settings)
    yield services
    services.stop()


def _engine(services: Services) -> Engine:
    engine = services.workers[0].generator
    assert isinstance(engine, Engine)
    return engine


def _stored_pixels(services: Services, job: JobRecord) -> list[np.ndarray]:
    return [np.asarray(services.images.load(i.id)) for i in services.get_job(job.id).images]


def _solo_pixels(services: Services, job: JobRecord) -> list[np.ndarray]:
    result = _engine(services).generate(services.get_job(job.id).params)
    return [np.asarray(i) for i in result.images]


def _events(services: Services, jobs: list[JobRecord]) -> list[JobEvent]:
    """The jobs' events in the order they were published."""
    return sorted((e for j in jobs for e in services.events.history(j.id)), key=lambda e: e.id)


def _unet_batches(services: Services) -> list[int]:
    pipe = _engine(services).models.get_pipeline("tiny").pipeline
    sizes: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    return sizes


def test_a_worker_runs_compatible_jobs_together_each_as_if_alone(
    engine_services: Services,
) -> None:
    services = engine_services
    jobs = [
        services.submit_job(_params(seed=1)),
        services.submit_job(_params(seed=2, prompt="a blue square", num_images=2)),
        services.submit_job(_params(seed=3, prompt="green")),
        services.submit_job(_params(seed=4, num_inference_steps=2)),  # another kind: waits
    ]
    batches = _unet_batches(services)
    speeds: list[tuple[str, float]] = []
    record_speed = services.queue.record_speed

    def spy(job: JobRecord, device: str, seconds: float) -> None:
        speeds.append((job.id, seconds))
        record_speed(job, device, seconds)

    services.queue.record_speed = spy  # type: ignore[method-assign]
    assert services.workers[0].run_once()

    assert batches == [8] * 3  # the first three: four images in one call of 3 steps
    assert services.get_job(jobs[3].id).status is JobStatus.QUEUED
    for job in jobs[:3]:
        done = services.get_job(job.id)
        assert done.status is JobStatus.SUCCEEDED
        events = services.events.history(job.id)
        types = [e.type for e in events]
        assert types == ["queued", "started", "progress", "progress", "progress", "succeeded"]
        assert events[1].data["batch"] == 3
        steps = [e.data["step"] for e in services.events.history(job.id) if e.type == "progress"]
        per_step = done.params.num_images
        assert steps == [per_step, 2 * per_step, 3 * per_step]
        assert [i.seed for i in done.images] == [done.params.seed + i for i in range(per_step)]
        for stored, alone in zip(
            _stored_pixels(services, job), _solo_pixels(services, job), strict=True
        ):
            assert np.array_equal(stored, alone)
    # each job's speed is its share of the call: a quarter per image, not the whole call
    shares = dict(speeds)
    assert set(shares) == {j.id for j in jobs[:3]}
    assert shares[jobs[1].id] == pytest.approx(2 * shares[jobs[0].id], rel=0.25)

    mark = len(batches)
    assert services.workers[0].run_once()  # then the other kind, alone
    assert batches[mark:] == [2, 2]
    assert services.get_job(jobs[3].id).status is JobStatus.SUCCEEDED


def test_a_cancel_inside_a_batch_stops_only_that_job(engine_services: Services) -> None:
    services = engine_services
    steps = 4
    jobs = [services.submit_job(_params(seed=s, num_inference_steps=steps)) for s in (1, 2, 3)]
    victim = jobs[1]
    publish = services.events.publish

    def cancel_on_first_progress(job_id, type, data=None):  # type: ignore[no-untyped-def]
        event = publish(job_id, type, data)
        if job_id == victim.id and type == "progress" and data["step"] == 1:
            services.cancel_job(victim.id)
        return event

    services.events.publish = cancel_on_first_progress  # type: ignore[method-assign]
    batches = _unet_batches(services)
    assert services.workers[0].run_once()
    services.events.publish = publish  # type: ignore[method-assign]

    assert services.get_job(victim.id).status is JobStatus.CANCELED
    assert services.get_job(victim.id).images == []
    events = _events(services, jobs)
    canceled = next(i for i, e in enumerate(events) if e.type == "canceled")
    # canceled at the next step end, at once: before the others' second step
    assert [(e.job_id, e.data.get("step")) for e in events[canceled + 1 :] if e.type == "progress"][
        :2
    ] == [(jobs[0].id, 2), (jobs[2].id, 2)]
    assert not [e for e in events[canceled + 1 :] if e.job_id == victim.id]
    assert batches == [6] * steps  # the others' call went on to the end
    for job in (jobs[0], jobs[2]):
        assert services.get_job(job.id).status is JobStatus.SUCCEEDED
        assert np.array_equal(_stored_pixels(services, job)[0], _solo_pixels(services, job)[0])


def test_the_batch_window_waits_for_jobs_that_come_soon(
    engine_services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = engine_services
    worker = services.workers[0]
    monkeypatch.setattr(worker, "batch_window_s", 2.0)
    first = services.submit_job(_params(seed=1))
    batches = _unet_batches(services)
    late: list[JobRecord] = []

    def submit_later() -> None:
        time.sleep(0.2)
        late.append(services.submit_job(_params(seed=2)))
        late.append(services.submit_job(_params(seed=3)))
        late.append(services.submit_job(_params(seed=4)))  # the fourth image: the batch is full

    waited: list[float] = []
    batch_for = worker._batch_for

    def timed(job: JobRecord) -> list[JobRecord]:
        started = time.monotonic()
        found = batch_for(job)
        waited.append(time.monotonic() - started)
        return found

    monkeypatch.setattr(worker, "_batch_for", timed)
    thread = threading.Thread(target=submit_later)
    thread.start()
    assert worker.run_once()
    thread.join()
    # the three that came 0.2 s later joined; the window closed once the batch was full
    assert batches == [8] * 3
    assert 0.2 <= waited[0] < 1.5
    for job in (first, *late):
        assert services.get_job(job.id).status is JobStatus.SUCCEEDED
