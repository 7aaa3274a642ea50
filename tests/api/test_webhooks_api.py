"""Webhooks over HTTP: the `webhook` field, its refusals, the delivered JSON is GET's, and
each key's secret (TestClient, stand-in generator, a receiver on loopback)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from easel.api.app import create_app
from easel.config import Settings
from easel.domain import LOCAL
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services
from tests.webhook_receiver import Receiver

HOOKS = {"webhook_hosts": ["127.0.0.1"], "webhook_backoff_s": 0.05, "webhook_timeout_s": 2.0}
JOB = {"prompt": "a red circle", "num_inference_steps": 2}


@pytest.fixture
def app_services(settings: Settings) -> Services:
    """The API's services, allowed to call 127.0.0.1 (overrides tests/api/conftest.py's)."""
    return build_services(
        settings.model_copy(update=HOOKS), generator=StandInGenerator(seconds_per_step=0.005)
    )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


@pytest.mark.parametrize("status", ["succeeded", "failed", "canceled"])
def test_the_delivery_is_the_jobs_json_as_get_shows_it(
    client: TestClient, app_services: Services, receiver: Receiver, status: str
) -> None:
    prompt = {"failed": "a <fail> circle", "canceled": "a long one"}.get(status, "a red circle")
    steps = 100 if status == "canceled" else 2
    body = {**JOB, "prompt": prompt, "num_inference_steps": steps, "webhook": receiver.url}
    made = client.post("/api/v1/jobs", json=body)
    assert made.status_code == 202, made.text
    assert made.json()["webhook"] == receiver.url
    job_id = made.json()["id"]
    if status == "canceled":
        assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 200
    (got,) = receiver.wait_delivered()
    shown = client.get(f"/api/v1/jobs/{job_id}").json()
    assert shown["status"] == status
    assert got.job == shown
    assert list(got.job) == list(shown)  # same fields, same order
    assert got.signed_by(app_services.webhook_secret(LOCAL))


def test_a_disallowed_webhook_is_a_422_naming_it_and_nothing_is_stored(
    client: TestClient, app_services: Services
) -> None:
    for url in ["http://example.com/hook", "file:///etc/passwd", "http://127.0.0.1:0/"]:
        response = client.post("/api/v1/jobs", json={**JOB, "webhook": url})
        assert response.status_code == 422, (url, response.text)
        assert response.json()["error"]["field"] == "webhook", url
    response = client.post("/api/v1/jobs", json={**JOB, "webhook": 5})
    assert response.status_code == 422 and "webhook" in response.text
    assert client.get("/api/v1/jobs").json() == []
    assert app_services.webhooks is not None and app_services.webhooks.deliveries() == []


def test_webhooks_are_off_by_default(settings: Settings) -> None:
    services = build_services(settings, generator=StandInGenerator())
    with TestClient(create_app(services)) as client:
        response = client.post("/api/v1/jobs", json={**JOB, "webhook": "http://127.0.0.1/"})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["field"] == "webhook" and "EASEL_WEBHOOK_HOSTS" in error["message"]
        secret = client.get("/api/v1/webhooks/secret").json()
        assert secret["enabled"] is False


def test_each_key_reads_its_own_secret(client: TestClient, app_services: Services) -> None:
    keyless = client.get("/api/v1/webhooks/secret")
    assert keyless.status_code == 200 and keyless.headers["cache-control"] == "no-store"
    assert keyless.json() == {
        "secret": app_services.webhook_secret(LOCAL),
        "owner": None,
        "enabled": True,
    }
    alice, bob = (app_services.create_key(name)[1] for name in ("alice", "bob"))
    got = {
        name: client.get(
            "/api/v1/webhooks/secret", headers={"Authorization": f"Bearer {secret}"}
        ).json()
        for name, secret in (("alice", alice), ("bob", bob))
    }
    assert got["alice"]["secret"] != got["bob"]["secret"]
    assert got["alice"]["owner"] != got["bob"]["owner"]
    assert client.get("/api/v1/webhooks/secret").status_code == 401  # keys exist now
