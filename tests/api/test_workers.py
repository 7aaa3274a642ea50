"""GET /api/v1/workers and GET /metrics over HTTP (TestClient with the app's lifespan: the
worker thread runs; stand-in generator, real SQLite): who sees which job id, the Prometheus
text parsed by prometheus_client, the admin scope, the workers' states through a drain."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from fastapi.testclient import TestClient

from easel.api.app import create_app
from easel.config import Settings
from easel.services import Services, build_services
from tests.api.test_auth import JOB, bearer
from tests.api.test_jobs_api import wait_final
from tests.jobs.test_metrics import GatedGenerator, samples, value

T = TypeVar("T")


def eventually(read: Callable[[], T], ok: Callable[[T], bool], timeout_s: float = 5) -> T:
    """``read()`` once ``ok`` holds for it (or the last read, failing, after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not ok(got := read()):
        assert time.monotonic() < deadline, got
        time.sleep(0.01)
    return got


@pytest.fixture
def gated_app(settings: Settings) -> Iterator[tuple[TestClient, Services, GatedGenerator]]:
    generator = GatedGenerator()
    services = build_services(settings, generator=generator)
    with TestClient(create_app(services)) as client:
        yield client, services, generator
        generator.gate.set()


def test_workers_and_metrics_keyless(
    gated_app: tuple[TestClient, Services, GatedGenerator],
) -> None:
    client, services, generator = gated_app
    generator.gate.set()  # jobs run straight through
    ids = [client.post("/api/v1/jobs", json=JOB).json()["id"] for _ in range(2)]
    for job_id in ids:
        assert wait_final(client, job_id)["status"] == "succeeded"

    # the worker's books close just after a job's end is recorded (which clients see first)
    (worker,) = eventually(
        lambda: client.get("/api/v1/workers").json(), lambda w: w[0]["jobs_done"] == 2
    )
    assert worker["id"] == "cpu-0" and worker["device"] == "cpu"
    assert worker["state"] == "idle" and worker["job"] is None
    assert worker["jobs_done"] == 2 and worker["models"] == [] and worker["loads"] == {}
    assert 0 < worker["busy_ratio"] <= 1 and worker["pid"] > 0 and worker["node"]

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    scrape = samples(response.content)
    labels = {"model": "tiny", "task": "txt2img"}
    assert value(scrape, "easel_job_duration_seconds_count", **labels, status="succeeded") == 2
    assert value(scrape, "easel_queue_wait_seconds_count", **labels) == 2
    assert value(scrape, "easel_queue_jobs", state="succeeded") == 2
    assert value(scrape, "easel_worker_jobs_total", worker="cpu-0") == 2


def test_a_job_id_shows_to_its_owner_and_admins_only(
    gated_app: tuple[TestClient, Services, GatedGenerator],
) -> None:
    client, services, generator = gated_app
    secrets = {
        name: services.create_key(name, scopes=scopes)[1]
        for name, scopes in (("alice", ("generate",)), ("bob", ("generate",)), ("root", ("admin",)))
    }
    job = client.post("/api/v1/jobs", json=JOB, headers=bearer(secrets["alice"]))
    assert job.status_code == 202, job.text
    assert generator.entered.wait(10)

    def seen_by(name: str) -> dict:
        response = client.get("/api/v1/workers", headers=bearer(secrets[name]))
        assert response.status_code == 200, response.text
        (worker,) = response.json()
        return worker

    for name, shown in (("alice", job.json()["id"]), ("root", job.json()["id"]), ("bob", None)):
        worker = seen_by(name)  # bob: busy, but with whose job is not his business
        assert (worker["state"], worker["job"]) == ("busy", shown), name

    # metrics: admin keys only (they count every key's jobs); Prometheus sends a bearer token
    assert client.get("/metrics").status_code == 401
    refused = client.get("/metrics", headers=bearer(secrets["alice"]))
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "Forbidden"
    scrape = samples(client.get("/metrics", headers=bearer(secrets["root"])).content)
    assert value(scrape, "easel_queue_jobs", state="running") == 1
    assert value(scrape, "easel_worker_state", worker="cpu-0", state="busy") == 1
    generator.gate.set()
    client.headers.update(bearer(secrets["alice"]))
    assert wait_final(client, job.json()["id"])["status"] == "succeeded"
    done = eventually(lambda: seen_by("alice"), lambda w: w["jobs_done"] == 1)
    assert (done["state"], done["job"]) == ("idle", None)


def test_workers_through_a_drain(settings: Settings) -> None:
    """idle while serving, stopping while a drain waits on its job, stopped after."""
    generator = GatedGenerator()
    services = build_services(
        settings.model_copy(update={"drain_timeout_s": 5}), generator=generator
    )
    with TestClient(create_app(services)) as client:
        assert client.get("/api/v1/workers").json()[0]["state"] == "idle"
        client.post("/api/v1/jobs", json=JOB)
        assert generator.entered.wait(10)
        drain = services.workers[0]
        stopper = threading.Thread(target=drain.stop, args=(5,))
        stopper.start()
        deadline = time.monotonic() + 5
        while (state := drain.status().state) != "stopping" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state == "stopping"
        generator.gate.set()
        stopper.join(10)
        assert client.get("/api/v1/workers").json()[0]["state"] == "stopped"
        scrape = samples(client.get("/metrics").content)
        assert value(scrape, "easel_worker_up", worker="cpu-0") == 0
        assert value(scrape, "easel_worker_state", worker="cpu-0", state="stopped") == 1


def test_openapi_documents_both(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    workers = paths["/api/v1/workers"]["get"]["responses"]["200"]["content"]
    assert workers["application/json"]["schema"]["type"] == "array"
    assert (
        "text/plain; version=0.0.4; charset=utf-8"
        in (paths["/metrics"]["get"]["responses"]["200"]["content"])
    )
