"""A TestClient over create_app with started services (stand-in generator, real SQLite)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from easel.api.app import create_app
from easel.config import Settings
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services
from tests.jobs.conftest import settings  # noqa: F401  (shared fixture)


@pytest.fixture
def app_services(settings: Settings) -> Services:  # noqa: F811
    return build_services(settings, generator=StandInGenerator(seconds_per_step=0.005))


@pytest.fixture
def client(app_services: Services) -> Iterator[TestClient]:
    """The app with its lifespan running (workers started; stopped and drained at the end)."""
    with TestClient(create_app(app_services)) as client:
        yield client
