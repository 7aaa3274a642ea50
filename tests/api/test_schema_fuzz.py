"""Schemathesis over the app's own /openapi.json (every operation, in process over ASGI, with a
valid admin key): no 5xx, and every answer matches what its operation documents (status code,
content type, headers, body schema), for valid and for invalid requests. Bounded and
derandomized: a few seconds, the same cases on every run.

Each operation runs as a Hypothesis test over ``operation.as_strategy()`` rather than through
``schemathesis.pytest`` (whose ``parametrize`` needs pytest's ``Function._nodeid``, gone in
pytest 9)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans

from easel.api.app import create_app
from easel.config import Settings
from easel.jobs.standin import StandInGenerator
from easel.services import build_services

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.negative_data_rejection,
]
EXAMPLES = 25  # per operation, valid and invalid requests together


@pytest.fixture
def loaded(settings: Settings) -> Iterator[tuple[Any, dict[str, str]]]:
    """The schema as the app serves it, fetched with an admin key (the docs need one once keys
    exist), and that key's header. Loading starts the app's lifespan (recovery, the workers:
    valid jobs run on the stand-in generator); it ends with the test."""
    services = build_services(settings, generator=StandInGenerator())
    _, secret = services.create_key("fuzz-admin-q7", scopes=("admin",))
    auth = {"Authorization": f"Bearer {secret}"}
    try:
        yield (
            schemathesis.openapi.from_asgi(
                "/openapi.json", create_app(services), headers=dict(auth)
            ),
            auth,
        )
    finally:
        shutdown_lifespans()  # services.stop(): drain the workers, close the database


@pytest.mark.timeout(120)
def test_every_operation_matches_its_schema(loaded: tuple[Any, dict[str, str]]) -> None:
    schema, auth = loaded
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /api/v1/jobs", "GET /api/v1/keys", "GET /api/v1/images/{image_id}"} <= labels
    assert len(operations) >= 18, labels
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    for operation in operations:
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

        @given(case=cases)
        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            response = case.call_and_validate(headers=auth, checks=CHECKS)
            statuses[response.status_code] += 1

        # every operation's failures, not the first one's only
        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    # the requests reached the routes (not all refused at the gate or by validation)
    assert statuses[200] and statuses[201] and statuses[422], statuses
    assert not statuses[401] and not statuses[500], statuses
