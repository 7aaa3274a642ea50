"""Webhooks: a job's end POSTed once, signed, from the outbox; retries, restarts, refusals
(real SQLite, a real receiver on loopback, the stand-in generator)."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from easel.config import Settings
from easel.domain import LOCAL, GenerationParams, InvalidParams, JobStatus
from easel.jobs.retention import RetentionPolicy, prune
from easel.jobs.standin import StandInGenerator
from easel.jobs.webhooks import WebhookPolicy, Webhooks, check_url, sign, verify
from easel.services import Services, build_services
from tests.webhook_receiver import Receiver

HOOKS = {"webhook_hosts": ["127.0.0.1"], "webhook_backoff_s": 0.05, "webhook_timeout_s": 2.0}
PARAMS = GenerationParams(prompt="a red circle", num_inference_steps=2)


@pytest.fixture
def hooked_settings(settings: Settings) -> Settings:
    return settings.model_copy(update=HOOKS)


@pytest.fixture
def hooked(hooked_settings: Settings) -> Iterator[Services]:
    """Services that call 127.0.0.1, not started: tests run jobs and sends themselves."""
    services = build_services(hooked_settings, generator=StandInGenerator())
    yield services
    services.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


def outbox(services: Services) -> Webhooks:
    assert services.webhooks is not None
    return services.webhooks


def send_until(services: Services, done: object, timeout: float = 10.0) -> None:
    """Run due sends (waiting out the test's short backoff) until ``done()`` holds."""
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, outbox(services).deliveries()
        outbox(services).send_due()
        time.sleep(0.01)


def test_a_finished_job_is_delivered_once_signed_with_its_keys_secret(
    hooked: Services, receiver: Receiver
) -> None:
    hooked.start()  # workers and the sender thread, as a server runs them
    job = hooked.submit_job(PARAMS, webhook=receiver.url)
    assert job.webhook == receiver.url

    (got,) = receiver.wait_delivered()
    secret = hooked.webhook_secret(LOCAL)
    assert got.signed_by(secret)
    assert not got.signed_by(secret + "x")
    done = hooked.get_job(job.id)
    assert got.job["id"] == job.id and got.job["status"] == "succeeded"
    assert [i["id"] for i in got.job["images"]] == [i.id for i in done.images]
    assert got.headers["easel-event"] == "job.succeeded"
    assert got.headers["content-type"] == "application/json"
    (delivery,) = outbox(hooked).deliveries(job.id)
    assert (delivery.id, delivery.status, delivery.attempts) == (got.delivery, "delivered", 1)
    # the URL is the job's, not a generation parameter: not in params, so not in the PNG
    assert "webhook" not in got.job["params"] and got.job["webhook"] == receiver.url


def test_failed_and_canceled_jobs_are_delivered_too(hooked: Services, receiver: Receiver) -> None:
    failing = hooked.submit_job(
        GenerationParams(prompt="a <fail> circle", num_inference_steps=2), webhook=receiver.url
    )
    canceled = hooked.submit_job(PARAMS, webhook=receiver.url)
    plain = hooked.submit_job(PARAMS)  # no webhook: nothing sent
    hooked.cancel_job(canceled.id)
    hooked.cancel_job(canceled.id)  # again: still one delivery
    while hooked.workers[0].run_once():
        pass
    assert hooked.get_job(plain.id).status is JobStatus.SUCCEEDED
    outbox(hooked).send_due()
    got = {r.job["id"]: r for r in receiver.delivered()}
    assert {i: r.headers["easel-event"] for i, r in got.items()} == {
        failing.id: "job.failed",
        canceled.id: "job.canceled",
    }
    assert got[failing.id].job["error"] and got[canceled.id].job["status"] == "canceled"
    assert len(outbox(hooked).deliveries()) == 2


def test_the_delivery_commits_with_the_jobs_end_or_not_at_all(hooked: Services) -> None:
    job = hooked.submit_job(PARAMS, webhook="http://127.0.0.1:9/hook")
    with pytest.raises(RuntimeError), hooked.db.transaction():
        hooked.cancel_job(job.id)
        assert len(outbox(hooked).deliveries()) == 1  # written, inside the transaction
        raise RuntimeError("the commit never happens")
    assert hooked.get_job(job.id).status is JobStatus.QUEUED
    assert outbox(hooked).deliveries() == []


def test_a_receiver_down_then_up_gets_it_once(hooked: Services) -> None:
    receiver = Receiver()  # not listening yet: connections are refused
    receiver.start()
    receiver.stop()
    job = hooked.submit_job(PARAMS, webhook=receiver.url)
    assert hooked.workers[0].run_once()
    send_until(hooked, lambda: outbox(hooked).deliveries()[0].attempts >= 2)
    (delivery,) = outbox(hooked).deliveries(job.id)
    assert delivery.status == "pending" and "ConnectError" in (delivery.last_error or "")
    receiver.start()  # the same port
    try:
        send_until(hooked, lambda: receiver.delivered())
        (got,) = receiver.wait_delivered()
        outbox(hooked).send_due()
        assert len(receiver.requests) == 1
        (delivery,) = outbox(hooked).deliveries(job.id)
        assert delivery.status == "delivered" and delivery.attempts >= 3
        assert got.delivery == delivery.id
    finally:
        receiver.stop()


def test_retries_back_off_then_give_up_logged(
    hooked_settings: Settings, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    settings = hooked_settings.model_copy(update={"webhook_attempts": 3})
    services = build_services(settings, generator=StandInGenerator())
    try:
        receiver.plan = [503] * 10
        services.submit_job(PARAMS, webhook=receiver.url)
        assert services.workers[0].run_once()
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="easel.jobs.webhooks"):
            send_until(services, lambda: outbox(services).deliveries()[0].status == "dead")
        # waits of 0.05 s then 0.1 s between the three tries
        assert time.monotonic() - started >= 0.15
        assert [r.status for r in receiver.requests] == [503, 503, 503]
        assert len({r.delivery for r in receiver.requests}) == 1  # one delivery, three tries
        (delivery,) = outbox(services).deliveries()
        assert (delivery.attempts, delivery.last_error) == (3, "HTTP 503")
        assert "given up after 3 tries: HTTP 503" in caplog.text
        outbox(services).send_due()
        assert len(receiver.requests) == 3
    finally:
        services.stop()
    assert WebhookPolicy(backoff_s=30).wait_after(1) == 30
    total = sum(WebhookPolicy(backoff_s=30).wait_after(n) for n in range(1, 8))
    assert 3000 < total < 4000  # the defaults: 8 tries over about an hour


def test_a_redirect_is_not_followed(hooked: Services, receiver: Receiver) -> None:
    receiver.redirect = "/elsewhere"
    hooked.submit_job(PARAMS, webhook=receiver.url)
    assert hooked.workers[0].run_once()
    outbox(hooked).send_due()
    assert [(r.path, r.status) for r in receiver.requests] == [("/hook", 302)]
    (delivery,) = outbox(hooked).deliveries()
    assert (delivery.status, delivery.last_error) == ("pending", "HTTP 302")


def test_pending_deliveries_resume_after_a_restart(
    hooked_settings: Settings, hooked: Services
) -> None:
    receiver = Receiver().start()
    receiver.stop()
    job = hooked.submit_job(PARAMS, webhook=receiver.url)
    assert hooked.workers[0].run_once()
    outbox(hooked).send_due()
    assert outbox(hooked).deliveries()[0].attempts == 1
    hooked.stop()

    receiver.start()
    again = build_services(hooked_settings, generator=StandInGenerator())
    try:
        again.start()
        (got,) = receiver.wait_delivered()
        assert got.job["id"] == job.id and got.signed_by(again.webhook_secret(LOCAL))
        assert outbox(again).deliveries()[0].status == "delivered"
    finally:
        again.stop()
        receiver.stop()


def test_webhooks_off_or_a_disallowed_url_is_refused_and_nothing_stored(
    settings: Settings, hooked: Services
) -> None:
    off = build_services(settings, generator=StandInGenerator())
    try:
        with pytest.raises(InvalidParams) as info:
            off.submit_job(PARAMS, webhook="http://127.0.0.1:9/hook")
        assert info.value.field == "webhook"
        assert "webhook_hosts" in info.value.message and "EASEL_WEBHOOK_HOSTS" in info.value.message
        assert off.list_jobs() == []
    finally:
        off.stop()
    for url, says in [
        ("http://example.com/hook", "not one this server calls"),
        ("http://127.0.0.2/hook", "not one this server calls"),
        ("ftp://127.0.0.1/hook", "http:// or https://"),
        ("http://user:pw@127.0.0.1/hook", "user name or password"),
        ("http://127.0.0.1:99999/hook", "out of range"),
        ("http://[::1/hook", "not a valid URL"),
        ("http://127.0.0.1/\x00", "U+0000"),
        ("http://127.0.0.1/" + "a" * 2100, "at most 2048"),
        ("/relative", "http:// or https://"),
    ]:
        with pytest.raises(InvalidParams) as info:
            hooked.submit_job(PARAMS, webhook=url)
        assert info.value.field == "webhook" and says in info.value.message, (url, info.value)
    assert hooked.list_jobs() == [] and outbox(hooked).deliveries() == []


def test_wildcards_reach_public_addresses_only_named_hosts_may_be_private() -> None:
    wild = WebhookPolicy(hosts=("*", "*.example.org"))
    assert wild.match("hooks.example.org") == "wildcard"
    assert check_url("https://8.8.8.8/x", wild)
    for private in ("127.0.0.1", "10.1.2.3", "[::1]", "169.254.169.254", "[::ffff:127.0.0.1]"):
        with pytest.raises(InvalidParams, match="not a public address"):
            check_url(f"http://{private}/x", wild)
    named = WebhookPolicy(hosts=("10.1.2.3", "::1", "hooks.internal"))
    assert named.match("10.1.2.3") == named.match("[0:0::1]") == "named"
    assert named.match("HOOKS.internal.") == "named"
    assert named.match("other.internal") is None
    assert WebhookPolicy(hosts=("*.example.org",)).match("example.org.evil.com") is None


def test_a_name_is_called_at_the_address_it_was_checked_at(
    hooked_settings: Settings, receiver: Receiver
) -> None:
    """Resolved once, checked, then connected to that address (no second lookup to rebind);
    a wildcard host resolving to loopback is given up at once."""
    settings = hooked_settings.model_copy(
        update={"webhook_hosts": ["hooks.example.test", "*.wild.test"]}
    )
    services = build_services(settings, generator=StandInGenerator())
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        asked.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    outbox(services)._resolve = resolve
    try:
        named = services.submit_job(
            PARAMS, webhook=f"http://hooks.example.test:{receiver.port}/hook"
        )
        wild = services.submit_job(PARAMS, webhook=f"http://a.wild.test:{receiver.port}/hook")
        while services.workers[0].run_once():
            pass
        outbox(services).send_due()
        (got,) = receiver.delivered()
        assert got.job["id"] == named.id
        assert got.headers["host"] == f"hooks.example.test:{receiver.port}"
        (refused,) = outbox(services).deliveries(wild.id)
        assert refused.status == "dead" and refused.attempts == 1
        assert "resolves to 127.0.0.1, which is not public" in (refused.last_error or "")
        assert sorted(asked) == ["a.wild.test", "hooks.example.test"]
    finally:
        services.stop()


def test_each_key_has_its_own_secret_and_the_setting_sets_them(
    hooked_settings: Settings, hooked: Services
) -> None:
    alice = hooked.keys.authenticate(hooked.create_key("alice")[1])
    bob = hooked.keys.authenticate(hooked.create_key("bob")[1])
    assert alice is not None and bob is not None
    secrets = {hooked.webhook_secret(p) for p in (LOCAL, alice.principal(), bob.principal())}
    assert len(secrets) == 3 and all(s.startswith("whsec_") for s in secrets)
    # kept in the database: the same after a restart
    first = hooked.webhook_secret(LOCAL)
    hooked.stop()
    again = build_services(hooked_settings, generator=StandInGenerator())
    try:
        assert again.webhook_secret(LOCAL) == first
    finally:
        again.stop()
    fixed = build_services(
        hooked_settings.model_copy(update={"webhook_secret": SecretStr("s3cret")}),
        generator=StandInGenerator(),
    )
    try:
        assert fixed.webhook_secret(LOCAL) != first
        assert fixed.webhook_secret(LOCAL) == outbox(fixed).secret_for(None)
    finally:
        fixed.stop()


def test_signatures_verify_as_the_docs_say() -> None:
    body = b'{"id":"x"}'
    header = sign("whsec_k", body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify("whsec_k", header, body, now=1_700_000_100)
    assert not verify("whsec_k", header, body + b" ", now=1_700_000_100)
    assert not verify("whsec_k", header, body, now=1_700_000_000 + 301)  # too old: a replay
    assert not verify("whsec_other", header, body, now=1_700_000_000)
    assert not verify("whsec_k", "v1=abc", body)


def test_retention_drops_finished_deliveries_keeps_pending_ones(
    hooked: Services, receiver: Receiver, tmp_path: Path
) -> None:
    delivered = hooked.submit_job(PARAMS, webhook=receiver.url)
    receiver.plan = [200, 503]
    pending = hooked.submit_job(PARAMS, webhook=receiver.url)
    while hooked.workers[0].run_once():
        pass
    outbox(hooked).send_due()
    status = {d.job_id: d.status for d in outbox(hooked).deliveries()}
    assert status == {delivered.id: "delivered", pending.id: "pending"}
    later = datetime.now(UTC) + timedelta(days=2)
    counts = prune(hooked.db, hooked.settings.images_dir, later, RetentionPolicy(1, 0))
    assert counts.jobs == 2
    assert [d.job_id for d in outbox(hooked).deliveries()] == [pending.id]
    outbox(hooked).send_due()  # still sent, though its job is gone
    time.sleep(0.06)
    outbox(hooked).send_due()
    assert outbox(hooked).deliveries()[0].status == "delivered"
    prune(hooked.db, hooked.settings.images_dir, later, RetentionPolicy(1, 0))
    assert outbox(hooked).deliveries() == []


def test_the_docs_verify_function_checks_real_deliveries(
    hooked: Services, receiver: Receiver
) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "WEBHOOKS.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(code, namespace)  # the snippet as a reader copies it
    docs_verify = namespace["verify"]
    hooked.submit_job(PARAMS, webhook=receiver.url)
    assert hooked.workers[0].run_once()
    outbox(hooked).send_due()
    (got,) = receiver.delivered()
    header, secret = got.headers["easel-signature"], hooked.webhook_secret(LOCAL)
    assert docs_verify(secret, header, got.body)  # type: ignore[operator]
    assert not docs_verify(secret, header, got.body.replace(b"succeeded", b"failed"))  # type: ignore[operator]
    assert not docs_verify("whsec_" + "0" * 64, header, got.body)  # type: ignore[operator]


def test_https_is_checked_against_the_name_though_the_address_is_pinned(
    hooked: Services, tmp_path: Path
) -> None:
    """The connection goes to the checked address, and TLS still checks the certificate
    against the URL's name (sent as SNI): a certificate for another name fails the try."""
    tls = pytest.importorskip("tests.tls_certs")
    server_context, client_context = tls.contexts(tmp_path, "hooks.example.test")
    receiver = Receiver(tls=server_context).start()
    policy = WebhookPolicy(
        hosts=("hooks.example.test", "other.example.test"), backoff_s=0.05, timeout_s=2.0
    )
    webhooks = Webhooks(
        hooked.db,
        hooked.queue,
        policy,
        transport=httpx.HTTPTransport(verify=client_context),
        resolve=lambda host, port: [ipaddress.ip_address("127.0.0.1")],
    )
    hooked.events.final_hooks[:] = [webhooks.enqueue]
    hooked.webhooks = webhooks
    try:
        good = hooked.submit_job(PARAMS, webhook=f"https://hooks.example.test:{receiver.port}/hook")
        bad = hooked.submit_job(PARAMS, webhook=f"https://other.example.test:{receiver.port}/hook")
        while hooked.workers[0].run_once():
            pass
        webhooks.send_due()
        (got,) = receiver.delivered()
        assert got.job["id"] == good.id
        (failed,) = webhooks.deliveries(bad.id)
        assert failed.status == "pending" and "certificate" in (failed.last_error or "").lower()
    finally:
        receiver.stop()


def test_an_end_the_start_up_recovery_records_is_delivered_too(
    hooked_settings: Settings, hooked: Services, receiver: Receiver
) -> None:
    """A job a crash left running, started max_attempts times: the next start fails it, and
    that end is delivered like any other."""
    job = hooked.submit_job(PARAMS, webhook=receiver.url)
    with hooked.db.transaction() as conn:  # as a worker leaves it when the process dies
        conn.execute(
            "UPDATE jobs SET status = 'running', attempts = ? WHERE id = ?",
            (hooked_settings.max_attempts, job.id),
        )
    hooked.stop()
    again = build_services(hooked_settings, generator=StandInGenerator())
    try:
        again.start()
        (got,) = receiver.wait_delivered()
        assert got.job["id"] == job.id and got.job["status"] == "failed"
        assert got.headers["easel-event"] == "job.failed"
    finally:
        again.stop()
