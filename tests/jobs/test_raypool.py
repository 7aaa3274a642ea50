"""Workers as Ray actors on a real local Ray cluster (`ray start --head`, two CPU actors): model
affinity read from /metrics, a worker killed with SIGKILL mid-job, a cancel reaching an actor."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from easel.config import Settings
from easel.domain import JobStatus
from easel.jobs.db import Database
from easel.jobs.queue import SqliteJobQueue
from easel.models.catalog import ModelCatalog
from easel.services import Services, build_services
from tests.e2e.server import Server, prepare_home
from tests.jobs.conftest import TINY_DEFAULTS
from tests.jobs.ray_helpers import params, ready, until, wait_jobs


@pytest.fixture(scope="module")
def engines(
    ray_cluster: str, tmp_path_factory: pytest.TempPathFactory, tiny_sd_path: Path
) -> Iterator[Services]:
    """Started services whose two actors run real Engines on two catalog models (shared by
    the tests of this module, in order: actors take seconds to start)."""
    easel_home = tmp_path_factory.mktemp("easel-home")
    catalog = ModelCatalog(Settings(home=easel_home))
    for name in ("tiny-a", "tiny-b"):
        catalog.add(name, str(tiny_sd_path), defaults=TINY_DEFAULTS)
    services = build_services(
        Settings(
            home=easel_home,
            default_model="tiny-a",
            ray_address=ray_cluster,
            ray_workers=2,
            ray_cpus_per_worker=1,
            preview_every=0,
        )
    )
    services.start()
    ready(services)
    yield services
    services.stop()


def loads(services: Services) -> dict[tuple[str, str], float]:
    """(worker, model) -> loads, as /metrics reports them."""
    text = services.metrics.render().decode()
    return {
        (s.labels["worker"], s.labels["model"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "easel_model_loads_total"
    }


def test_forty_jobs_over_two_models_load_each_model_once_per_worker(engines: Services) -> None:
    ids = [
        engines.submit_job(params("tiny-a" if i % 2 else "tiny-b", seed=i)).id for i in range(40)
    ]
    engines.wakeup.set()
    wait_jobs(engines, ids)
    jobs = [engines.queue.get(i) for i in ids]
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED] * 40
    assert all(len(j.images) == 1 for j in jobs)
    counted = loads(engines)
    assert counted, "the workers' loads are in /metrics"
    assert max(counted.values()) == 1, counted  # no worker loaded a model twice
    done = {s.id: s.jobs_done for s in engines.worker_statuses() if s.id.startswith("ray-")}
    assert sum(done.values()) == 40 and min(done.values()) > 0, done  # both actors worked


def test_a_killed_worker_loses_no_job_and_doubles_no_image(engines: Services) -> None:
    # slow enough to be killed mid-run: 64 px, 60 steps
    victim_job = engines.submit_job(params("tiny-a", seed=7, steps=60, size=64)).id
    others = [engines.submit_job(params("tiny-b", seed=i)).id for i in range(4)]
    engines.wakeup.set()
    until(lambda: engines.queue.get(victim_job).step >= 3, 60, "the job's third step")
    (running,) = [s for s in engines.worker_statuses() if s.job == victim_job]
    os.kill(running.pid, signal.SIGKILL)

    wait_jobs(engines, [victim_job, *others])
    job = engines.queue.get(victim_job)
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 2
    assert len(job.images) == 1  # the retry wrote its image once
    assert all(engines.queue.get(i).status is JobStatus.SUCCEEDED for i in others)
    events = [e.type for e in engines.events.history(victim_job)]
    assert events.count("requeued") == 1 and events[-1] == "succeeded"
    # the pool replaced the dead actor: two again, the new one in another process
    ready(engines)
    pids = {s.pid for s in engines.worker_statuses() if s.id.startswith("ray-")}
    assert len(pids) == 2 and running.pid not in pids


def test_sigterm_drains_and_stops_every_actor(
    ray_cluster: str, tmp_path: Path, tiny_sd_path: Path
) -> None:
    """`easel serve --ray ADDRESS` as a real process: workers over HTTP, then SIGTERM mid-job:
    the job goes back to the queue and no actor process of the server is left."""
    home = tmp_path / "home"
    prepare_home(home, tiny_sd_path)
    server = Server(
        home,
        drain_timeout_s=0.5,
        env={
            "EASEL_RAY_ADDRESS": ray_cluster,
            "EASEL_RAY_WORKERS": "2",
            "EASEL_RAY_CPUS_PER_WORKER": "1",
        },
    ).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as api:

            def ray_workers() -> list[dict[str, object]]:
                workers = api.get("/api/v1/workers").json()
                return [w for w in workers if str(w["id"]).startswith("ray-")]

            until(lambda: [w["state"] for w in ray_workers()] == ["idle", "idle"], 60, "actors")
            pids = [int(w["pid"]) for w in ray_workers()]  # type: ignore[call-overload]
            job = api.post(
                "/api/v1/jobs",
                json={"prompt": "a red circle", "num_inference_steps": 150, "width": 64,
                      "height": 64, "seed": 3},
            ).json()  # fmt: skip
            until(lambda: api.get(f"/api/v1/jobs/{job['id']}").json()["progress"]["step"] >= 2,
                  60, "the job to run")  # fmt: skip
        assert server.terminate() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    finally:
        server.kill()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    until(lambda: all(gone(pid) for pid in pids), 15, "the actors' processes to end")
    settings = Settings(home=home)
    db = Database(settings.db_path)
    try:
        record = SqliteJobQueue(db, max_queued=10, max_attempts=3).get(job["id"])
    finally:
        db.close()
    assert record.status is JobStatus.QUEUED  # drained back to the queue, not lost
