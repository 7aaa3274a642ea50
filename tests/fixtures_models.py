"""Session fixtures: each tiny pipeline is built once per test session and shared (read-only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_flux, make_tiny_sd, make_tiny_sdxl, make_tiny_zimage


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny StableDiffusionPipeline (64x64 default output)."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny StableDiffusionXLPipeline (64x64 default output)."""
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny-models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_zimage_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny ZImagePipeline (pass height/width: the family default is 1024)."""
    return make_tiny_zimage(tmp_path_factory.mktemp("tiny-models") / "tiny-zimage")


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny FluxPipeline (pass height/width: the family default is 1024)."""
    return make_tiny_flux(tmp_path_factory.mktemp("tiny-models") / "tiny-flux")
