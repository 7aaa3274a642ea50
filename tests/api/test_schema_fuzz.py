"""Schemathesis with every check (the CLI's ``--checks all``) and every phase (examples,
coverage, fuzzing, stateful) over the app's own /openapi.json, in process over ASGI with an
admin key: no 5xx, every answer as its operation documents it (status, content type, headers,
body, ``Allow``), negative data refused, schema-valid data accepted, a cancelled job's links
followed. Bounded and derandomized: a fixed seed, 25 examples an operation and phase, ~15 s.

The schema states the real limits (``schemas.state_limits``), so the valid jobs the fuzzer
makes reach the queue (a hundred of them, ~12 of 14 in the fuzzing phase); edits mostly stop at
their image ids, which must exist. Where the schema cannot say what the server checks, a check
is told so below:
  - POST /api/v1/jobs: which fields a task needs, a model's own limits, image, dataset and
    LoRA ids that must exist; POST /api/v1/images and /datasets: the uploaded bytes must be
    images. A schema-valid body may get a 422 naming the field (never a 5xx).
  - DELETE /api/v1/jobs/{id} cancels: the job stays readable (DESIGN.md), so use_after_free
    does not apply to reading a job.
The fuzzer may revoke the key it uses (DELETE /api/v1/keys/{name} with a name from GET
/api/v1/keys): the auth provider then makes a new admin key, as an operator would."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES
from schemathesis.engine import Status, events, from_schema
from schemathesis.python.asgi import shutdown_lifespans

from easel.api.app import create_app
from easel.config import Settings
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services

SEED = 36
EXAMPLES = 25  # per operation and phase, valid and invalid requests together
CONTENT_CHECKED = ["POST /api/v1/jobs", "POST /api/v1/images", "POST /api/v1/datasets"]


def config() -> SchemathesisConfig:
    load_all_checks()
    names = set(CHECKS.get_all_names())
    assert {"positive_data_acceptance", "use_after_free", "allow_header_conformance"} <= names
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "generation": {"max-examples": EXAMPLES, "deterministic": True, "mode": "all"},
            "checks": {"enabled": True, **{name: {"enabled": True} for name in names}},
            "phases": {
                phase: {"enabled": True}
                for phase in ("examples", "coverage", "fuzzing", "stateful")
            },
            "operations": [
                {
                    "include-name": CONTENT_CHECKED,
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": [*POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES, 422]
                        }
                    },
                },
                {
                    "include-path-regex": r"^/api/v1/jobs/\{job_id\}",
                    "include-method": "GET",
                    "checks": {"use_after_free": {"enabled": False}},
                },
            ],
        }
    )


@pytest.fixture
def fuzzed(settings: Settings) -> Iterator[tuple[Any, Services]]:
    """The schema as the app serves it (its lifespan runs: recovery, workers on the stand-in
    generator, so valid jobs run) with an auth provider that always has a live admin key."""
    services = build_services(settings, generator=StandInGenerator(seconds_per_step=0.001))
    secret = services.create_key("fuzz-admin", scopes=("admin",))[1]
    app = create_app(services)
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=config(), headers={"Authorization": f"Bearer {secret}"}
    )
    made = [secret]

    @schema.auth(refresh_interval=None)
    class AdminKey:
        def get(self, case: Any, ctx: Any) -> str:
            if services.keys.authenticate(made[-1]) is None:  # the fuzzer revoked it
                made.append(services.create_key(f"fuzz-admin-{len(made)}", scopes=("admin",))[1])
            return made[-1]

        def set(self, case: Any, data: str, ctx: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    try:
        yield schema, services
    finally:
        shutdown_lifespans()  # services.stop(): drain the workers, close the database


@pytest.mark.timeout(180)
def test_every_check_over_every_operation(fuzzed: tuple[Any, Services]) -> None:
    schema, services = fuzzed
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert {"POST /api/v1/jobs", "GET /api/v1/keys", "GET /api/v1/images/{image_id}"} <= labels
    failures: list[str] = []
    errors: list[str] = []
    statuses: Counter[tuple[str, int]] = Counter()
    for event in from_schema(schema).execute():
        if isinstance(event, events.NonFatalError | events.FatalError):
            errors.append(f"{event.__class__.__name__}: {getattr(event, 'label', '')} {event}")
        if not isinstance(event, events.ScenarioFinished):
            continue
        recorder = event.recorder
        for interaction in recorder.interactions.values():
            if interaction.response is not None:
                request = interaction.request
                path = request.uri.split("testserver", 1)[-1].split("?")[0]
                label = f"{request.method} {'/'.join(path.split('/')[:4])}"
                statuses[(label, interaction.response.status_code)] += 1
        for case_id, checks in recorder.checks.items():
            for check in checks:
                if check.status == Status.FAILURE and check.failure_info is not None:
                    failure = check.failure_info.failure
                    case = recorder.cases[case_id].value
                    failures.append(
                        f"{recorder.label} [{check.name}] {failure.title}: {failure.message}\n"
                        f"  {case.method} {case.formatted_path} query={case.query} "
                        f"body={str(case.body)[:300]}"
                    )
    assert not errors, "\n".join(errors)
    assert not failures, "\n\n".join(failures)
    codes = Counter(code for (_, code) in statuses.elements())
    assert not [code for code in codes if code >= 500], statuses
    assert not codes[401], statuses  # the requests passed the gate (the provider's key)
    # fuzzing reached the routes and the queue, not only the validation in front of them
    assert statuses[("POST /api/v1/jobs", 202)] >= 30, statuses
    assert codes[200] and codes[201] and codes[422] and codes[405], statuses
    assert services.list_jobs(limit=500), "no job was stored"
