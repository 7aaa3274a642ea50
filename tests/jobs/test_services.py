"""Submitting, scheduling, running and cancelling jobs through Services (stand-in generator)."""

from __future__ import annotations

import time

import pytest

from easel.domain import (
    EaselError,
    GenerationParams,
    InvalidParams,
    JobNotFound,
    JobStatus,
    ModelNotFound,
    QueueFull,
)
from easel.engine.metadata import read_metadata
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services


def submit(services: Services, prompt: str = "a red circle", priority: int = 0, **kw):
    return services.submit_job(
        GenerationParams(prompt=prompt, num_inference_steps=4, **kw), priority=priority
    )


def job_rows(services: Services) -> int:
    return services.db.query("SELECT COUNT(*) FROM jobs")[0][0]


def test_submit_resolves_params_and_queues(services: Services) -> None:
    job = submit(services, seed=7)
    assert job.status is JobStatus.QUEUED
    assert job.model == "tiny" and job.params.width == 64 and job.params.seed == 7
    assert services.job_position(job.id) == 1
    assert services.job_eta(job.id) is None  # no speed measured yet
    assert [e.type for e in services.events.history(job.id)] == ["queued"]


def test_run_once_stores_images_with_metadata(services: Services) -> None:
    job = submit(services, seed=3, num_images=2)
    assert services.workers[0].run_once()
    done = services.get_job(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 1
    assert [i.seed for i in done.images] == [3, 4]
    meta = read_metadata(services.image_bytes(done.images[1].id))
    assert meta["easel"]["seed"] == 4 and meta["easel"]["prompt"] == "a red circle"
    types = [e.type for e in services.events.history(job.id)]
    assert types == ["queued", "started"] + ["progress"] * 4 + ["succeeded"]
    steps = [e.data["step"] for e in services.events.history(job.id) if e.type == "progress"]
    assert steps == [1, 2, 3, 4]
    assert services.workers[0].run_once() is False


def test_priority_then_fifo_and_positions(services: Services) -> None:
    low = submit(services, "low")
    first = submit(services, "first")
    high = submit(services, "high", priority=5)
    second = submit(services, "second")
    assert [services.job_position(j.id) for j in (high, low, first, second)] == [1, 2, 3, 4]
    assert services.workers[0].run_once()
    assert services.get_job(high.id).status is JobStatus.SUCCEEDED
    assert [services.job_position(j.id) for j in (low, first, second)] == [1, 2, 3]
    while services.workers[0].run_once():
        pass
    done = sorted(services.list_jobs(), key=lambda j: j.started_at or j.created_at)
    assert [j.params.prompt for j in done] == ["high", "low", "first", "second"]


def test_a_job_read_carries_its_position_from_the_same_snapshot(services: Services) -> None:
    # Status and position come from one SQL statement: a reader can never see a `queued` job
    # without a position because a worker claimed it between two reads (seen once in e2e).
    jobs = [submit(services, f"job {i}") for i in range(3)]
    assert [services.get_job(j.id).position for j in jobs] == [1, 2, 3]
    listed = {j.id: j.position for j in services.list_jobs(status=JobStatus.QUEUED)}
    assert listed == {jobs[0].id: 1, jobs[1].id: 2, jobs[2].id: 3}
    assert services.workers[0].run_once()
    first = services.get_job(jobs[0].id)
    assert first.status is JobStatus.SUCCEEDED and first.position is None
    assert [services.get_job(j.id).position for j in jobs[1:]] == [1, 2]


def test_eta_after_a_measured_job(services: Services) -> None:
    submit(services)
    services.workers[0].run_once()
    a, b = submit(services), submit(services)
    eta_a, eta_b = services.job_eta(a.id), services.job_eta(b.id)
    assert eta_a is not None and eta_b is not None and eta_b == pytest.approx(2 * eta_a)


def test_cancel_queued_job_never_starts(services: Services) -> None:
    job = submit(services)
    assert services.cancel_job(job.id).status is JobStatus.CANCELED
    assert services.workers[0].run_once() is False
    assert [e.type for e in services.events.history(job.id)] == ["queued", "canceled"]


def test_cancel_running_job_stops_at_next_step(services: Services) -> None:
    job = submit(services)
    other = submit(services)
    worker = services.workers[0]
    seen = []

    def cancel_at_step_two(progress) -> None:  # the user presses cancel while step 2 runs
        seen.append(progress.step)
        if progress.step == 2:
            services.cancel_job(job.id)

    original = worker._report_progress
    worker._report_progress = lambda j, p: (original(j, p), cancel_at_step_two(p))  # type: ignore[method-assign]
    worker.run_once()
    assert seen == [1, 2]
    assert services.get_job(job.id).status is JobStatus.CANCELED
    worker._report_progress = original  # type: ignore[method-assign]
    assert worker.run_once()  # the worker is healthy: the next job succeeds
    assert services.get_job(other.id).status is JobStatus.SUCCEEDED


def test_failure_is_recorded_and_worker_continues(services: Services) -> None:
    bad = submit(services, "<fail> please")
    good = submit(services)
    services.workers[0].run_once()
    failed = services.get_job(bad.id)
    assert failed.status is JobStatus.FAILED and "stand-in failure" in (failed.error or "")
    services.workers[0].run_once()
    assert services.get_job(good.id).status is JobStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 5000}, "prompt"),
        ({"width": 100}, "width"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"scheduler": "nope"}, "scheduler"),
        ({"task": "paint"}, "task"),
        ({"task": "img2img"}, "image"),  # needs an input image
        ({"task": "inpaint", "image": "no-such-id"}, "image"),  # not a stored image
        ({"priority": 1000}, "priority"),
    ],
)
def test_invalid_params_name_the_field_and_store_nothing(
    services: Services, kwargs: dict, field: str
) -> None:
    priority = kwargs.pop("priority", 0)
    params = {"prompt": "ok", "num_inference_steps": 4} | kwargs
    with pytest.raises(InvalidParams) as err:
        services.submit_job(GenerationParams(**params), priority=priority)
    assert err.value.field == field
    if field == "task":
        assert "txt2img" in err.value.message, "names the allowed value"
    assert job_rows(services) == 0


def test_unknown_model_and_job(services: Services) -> None:
    with pytest.raises(ModelNotFound):
        submit(services, model="no-such-model")
    with pytest.raises(JobNotFound):
        services.get_job("nope")
    assert job_rows(services) == 0


def test_queue_full(services: Services) -> None:
    services.queue.max_queued = 2
    submit(services), submit(services)
    with pytest.raises(QueueFull):
        submit(services)
    assert job_rows(services) == 2
    assert services.retry_after_s() >= 1


def test_recovery_requeues_then_fails_after_max_attempts(services: Services) -> None:
    job = submit(services)
    for attempt in range(1, services.settings.max_attempts + 1):
        claimed = services.queue.claim()  # a worker starts it, then the process dies
        assert claimed is not None and claimed.attempts == attempt
        (recovered,) = services.queue.recover()
        expected = (
            JobStatus.FAILED if attempt == services.settings.max_attempts else JobStatus.QUEUED
        )
        assert recovered.status is expected
    assert "interrupted 3 times" in (services.get_job(job.id).error or "")


def test_a_job_canceled_while_running_stays_canceled_after_a_crash(services: Services) -> None:
    job = submit(services)
    assert services.queue.claim() is not None  # a worker starts it
    services.cancel_job(job.id)  # the user cancels; the process dies before the next step
    services.start()  # the next start-up
    canceled = services.get_job(job.id)
    assert canceled.status is JobStatus.CANCELED and canceled.finished_at is not None
    last = services.events.history(job.id)[-1]
    assert (last.type, last.data) == ("canceled", {"while": "running"})
    assert services.workers[0].run_once() is False, "it never runs again"


def test_a_second_server_on_the_same_home_is_refused(services: Services, settings) -> None:
    services.start()
    second = build_services(settings, generator=StandInGenerator())
    with pytest.raises(
        EaselError, match=f"another Easel server is using EASEL_HOME={settings.home}"
    ):
        second.start()
    services.stop()  # releases EASEL_HOME
    second.start()
    second.stop()


def test_finish_leaves_a_job_another_process_recovered(services: Services) -> None:
    job = submit(services)
    assert services.queue.claim() is not None  # this process runs it ...
    services.queue.recover()  # ... and another one's start-up puts it back in the queue
    assert services.queue.finish(job.id, JobStatus.SUCCEEDED) is None
    assert services.get_job(job.id).status is JobStatus.QUEUED


def test_drained_jobs_also_stop_after_max_attempts(services: Services) -> None:
    """The limit holds whichever way a job went back: here, drained at every shutdown."""
    job = submit(services)
    for attempt in range(1, services.settings.max_attempts + 1):
        claimed = services.queue.claim()
        assert claimed is not None and claimed.attempts == attempt
        services.queue.set_progress(job.id, 2, 4)
        after = services.queue.finish(job.id, JobStatus.QUEUED)  # what a drain does
        assert after is not None
        if attempt < services.settings.max_attempts:
            assert (after.status, after.step, after.started_at) == (JobStatus.QUEUED, 0, None)
    assert after.status is JobStatus.FAILED and "interrupted 3 times" in (after.error or "")
    assert services.queue.claim() is None


def test_a_job_that_fails_partway_keeps_no_images_and_no_temp_files(services: Services) -> None:
    job = submit(services, num_images=2)
    # image 1 cannot be renamed into place: a folder sits where its file goes
    day = services.images.root / job.created_at.strftime("%Y-%m-%d")
    (day / f"{job.id}-1.png").mkdir(parents=True)
    assert services.workers[0].run_once()
    assert services.get_job(job.id).status is JobStatus.FAILED
    assert services.get_job(job.id).images == [] and services.list_images() == []
    assert [p.name for p in day.iterdir()] == [f"{job.id}-1.png"], "image 0 and the .tmp gone"


def test_list_and_search_images(services: Services) -> None:
    submit(services, "a red circle")
    submit(services, "a blue 100%_square")
    while services.workers[0].run_once():
        pass
    assert [i.prompt for i in services.list_images()] == ["a blue 100%_square", "a red circle"]
    assert [i.prompt for i in services.list_images("RED")] == ["a red circle"]
    assert [i.prompt for i in services.list_images("100%_")] == ["a blue 100%_square"]
    assert services.list_images("%") == services.list_images("100%")


def test_drain_requeues_a_job_that_outlasts_the_timeout(settings) -> None:
    slow = build_services(settings, generator=StandInGenerator(seconds_per_step=0.02))
    job = slow.submit_job(GenerationParams(prompt="long", num_inference_steps=150))
    quick = slow.submit_job(GenerationParams(prompt="next", num_inference_steps=1))
    slow.start()
    while slow.get_job(job.id).step < 2:
        time.sleep(0.01)
    started = time.monotonic()
    slow.workers[0].stop(drain_timeout_s=0.1)
    assert time.monotonic() - started < 2, "stops at the next step after the timeout"
    drained = slow.get_job(job.id)
    assert drained.status is JobStatus.QUEUED and drained.attempts == 1
    assert drained.started_at is None and drained.step == 0, "waits like a fresh job"
    assert slow.get_job(quick.id).status is JobStatus.QUEUED, "no new claims while draining"
    assert slow.events.history(job.id)[-1].type == "requeued"
    slow.stop()


def test_drain_lets_a_short_job_finish(settings) -> None:
    services = build_services(settings, generator=StandInGenerator(seconds_per_step=0.02))
    job = services.submit_job(GenerationParams(prompt="short", num_inference_steps=10))
    services.start()
    while services.get_job(job.id).status is JobStatus.QUEUED:
        time.sleep(0.01)
    services.workers[0].stop(drain_timeout_s=10)
    assert services.get_job(job.id).status is JobStatus.SUCCEEDED
    services.stop()


def test_an_unwritable_image_folder_fails_the_job_not_the_worker(
    services: Services, tmp_path
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the images folder should be")
    real_root, services.images.root = services.images.root, blocked
    job = submit(services)
    assert services.workers[0].run_once()
    failed = services.get_job(job.id)
    assert failed.status is JobStatus.FAILED
    assert (failed.error or "").startswith("internal error: NotADirectoryError")
    services.images.root = real_root
    retry = submit(services)
    assert services.workers[0].run_once()
    assert services.get_job(retry.id).status is JobStatus.SUCCEEDED
