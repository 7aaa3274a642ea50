"""Services wired with the stand-in generator and a real catalog entry (the tiny SD folder)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from easel.config import Settings
from easel.jobs.standin import StandInGenerator
from easel.models.catalog import ModelCatalog
from easel.services import Services, build_services

# the tiny SD makes 64x64 images; let requests go from 32 to 128 px like tiny-shapes
TINY_DEFAULTS = {"width": 64, "height": 64, "min_size": 32, "max_size": 128}


@pytest.fixture
def settings(easel_home: Path, tiny_sd_path: Path) -> Settings:
    """Settings for one test with model ``tiny`` (the session's tiny SD) as the default."""
    settings = Settings(home=easel_home, default_model="tiny", preview_every=2)
    ModelCatalog(settings).add("tiny", str(tiny_sd_path), defaults=TINY_DEFAULTS)
    return settings


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    """Services that are built but not started: tests drive workers with run_once()."""
    services = build_services(settings, generator=StandInGenerator())
    yield services
    services.stop()
