"""Services wired with the stand-in generator and a real catalog entry (the tiny SD folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from easel.config import Settings
from easel.jobs.standin import StandInGenerator
from easel.models.catalog import ModelCatalog
from easel.services import Services, build_services
from tests.e2e.server import free_port

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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A real Ray cluster on this machine, as `ray start --head` makes one on a node; its address.
    8 logical CPUs: a test's two actors and another's own may overlap while one stops."""
    pytest.importorskip("ray")
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}", "--num-cpus=8", "--include-dashboard=false",
         "--object-store-memory=100000000", "--disable-usage-stats"],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "stop", "--force"],
            env=env,
            capture_output=True,
        )
