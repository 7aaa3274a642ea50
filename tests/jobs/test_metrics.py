"""Worker status and Prometheus metrics in the embedded mode: stand-in jobs and real tiny-engine
jobs run by the worker (real SQLite), then the worker's status and ``Metrics.render()`` parsed
with prometheus_client's own parser."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from easel.config import Settings
from easel.domain import GenerationParams
from easel.imaging import png_bytes
from easel.jobs.metrics import DURATION_BUCKETS, Metrics
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services

Labels = tuple[tuple[str, str], ...]


def samples(text: bytes) -> dict[tuple[str, Labels], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def value(scrape: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    return scrape[name, tuple(sorted(labels.items()))]


def job(prompt: str = "a red circle", **fields: object) -> GenerationParams:
    return GenerationParams(
        prompt=prompt, num_inference_steps=2, width=32, height=32, seed=1, **fields
    )  # type: ignore[arg-type]


def test_stand_in_jobs_show_in_status_and_metrics(services: Services) -> None:
    worker = services.workers[0]
    fresh = worker.status()
    assert (fresh.state, fresh.job, fresh.jobs_done, fresh.models) == ("idle", None, 0, [])
    assert fresh.pid > 0 and fresh.node and fresh.device == "cpu"

    ids = [services.submit_job(job(p)).id for p in ("one", "two", "three <fail>")]
    for _ in ids:
        assert worker.run_once()
    queued = [services.submit_job(job("later")).id for _ in range(2)]

    status = worker.status()
    assert (status.state, status.job, status.jobs_done) == ("idle", None, 3)
    assert 0 < status.busy_s <= status.up_s and 0 < status.busy_ratio <= 1
    assert services.worker_statuses()[0].busy_s == status.busy_s  # idle: no busy time added

    scrape = samples(services.metrics.render())
    duration = "easel_job_duration_seconds_count"
    assert value(scrape, duration, model="tiny", task="txt2img", status="succeeded") == 2
    assert value(scrape, duration, model="tiny", task="txt2img", status="failed") == 1
    assert value(scrape, "easel_queue_wait_seconds_count", model="tiny", task="txt2img") == 3
    # every bucket from 50 ms to an hour, then +Inf holding all three
    buckets = [
        labels
        for name, labels in scrape
        if name == "easel_queue_wait_seconds_bucket" and ("le", "+Inf") not in labels
    ]
    assert len(buckets) == len(DURATION_BUCKETS)
    counts = {"queued": 2, "running": 0, "succeeded": 2, "failed": 1, "canceled": 0}
    for state, count in counts.items():
        assert value(scrape, "easel_queue_jobs", state=state) == count, state
    assert value(scrape, "easel_worker_jobs_total", worker="cpu-0") == 3
    assert value(scrape, "easel_worker_state", worker="cpu-0", state="idle") == 1
    assert value(scrape, "easel_worker_state", worker="cpu-0", state="busy") == 0
    assert value(scrape, "easel_worker_up", worker="cpu-0") == 1
    ratio = value(scrape, "easel_worker_busy_ratio", worker="cpu-0")
    assert 0 < ratio <= 1
    assert not [name for name, _ in scrape if name.startswith("easel_model_load")]
    assert all(services.get_job(i).status == "queued" for i in queued)


class GatedGenerator(StandInGenerator):
    """The stand-in, held at its start until ``gate`` opens (``entered`` says it got there)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def generate(self, params, **kwargs):  # type: ignore[no-untyped-def,override]
        self.entered.set()
        assert self.gate.wait(30)
        return super().generate(params, **kwargs)


@pytest.fixture
def gated(settings: Settings) -> Iterator[tuple[Services, GatedGenerator]]:
    generator = GatedGenerator()
    services = build_services(settings, generator=generator)
    yield services, generator
    generator.gate.set()
    services.stop()


def test_a_running_job_shows_as_busy(gated: tuple[Services, GatedGenerator]) -> None:
    services, generator = gated
    worker = services.workers[0]
    running = services.submit_job(job("held"))
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    try:
        assert generator.entered.wait(10)
        status = worker.status()  # from this thread, while the worker's runs the job
        assert (status.state, status.job) == ("busy", running.id)
        scrape = samples(services.metrics.render())
        assert value(scrape, "easel_queue_jobs", state="running") == 1
        assert value(scrape, "easel_worker_state", worker="cpu-0", state="busy") == 1
        assert value(scrape, "easel_worker_busy_seconds_total", worker="cpu-0") > 0
    finally:
        generator.gate.set()
        thread.join(10)
    assert worker.status().state == "idle" and worker.status().jobs_done == 1
    services.stop()  # a worker that was never started: stopped at once
    assert worker.status().state == "stopped"


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # as two apps in one process: no duplicate names
    assert b"easel_job_duration_seconds" in first.render()
    assert first.registry is not second.registry


def test_a_real_engine_counts_one_load_for_two_jobs_and_none_for_from_pipe(
    settings: Settings,
) -> None:
    """Two txt2img jobs and an img2img job (a pipeline derived with from_pipe) of one tiny
    real model: one load from disk, three jobs, the model listed as loaded."""
    services = build_services(settings.model_copy(update={"cpu_graphs": False}))
    try:
        worker = services.workers[0]
        from PIL import Image

        image = services.upload_image(png_bytes(Image.new("RGB", (32, 32), (200, 30, 30))))
        for params in (
            job("a red circle"),
            job("a blue square"),
            job("a red circle", task="img2img", image=image.id, strength=0.5),
        ):
            submitted = services.submit_job(params)
            assert worker.run_once()
            assert services.get_job(submitted.id).status == "succeeded", submitted.id

        status = worker.status()
        assert status.models == ["tiny"]
        assert status.loads == {"tiny": 1}
        assert status.load_seconds["tiny"] > 0
        assert status.jobs_done == 3

        scrape = samples(services.metrics.render())
        assert value(scrape, "easel_model_loads_total", worker="cpu-0", model="tiny") == 1
        seconds = value(scrape, "easel_model_load_seconds_total", worker="cpu-0", model="tiny")
        assert seconds == pytest.approx(status.load_seconds["tiny"])
        assert value(scrape, "easel_worker_models_loaded", worker="cpu-0") == 1
        duration = "easel_job_duration_seconds_count"
        for task, count in (("txt2img", 2), ("img2img", 1)):
            assert value(scrape, duration, model="tiny", task=task, status="succeeded") == count
    finally:
        services.stop()
