"""Session fixtures: each tiny pipeline is built once per test session and shared (read-only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import (
    make_tiny_flux,
    make_tiny_sd,
    make_tiny_sdxl,
    make_tiny_zimage,
    populate_hub_cache,
)

TINY_HUB_ID = "easel-tests/tiny-sd"


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


@pytest.fixture
def tiny_hub_cache(tiny_sd_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1) holding the tiny SD
    pipeline as hub repo ``TINY_HUB_ID`` ("easel-tests/tiny-sd"); returns the cache folder."""
    cache = tmp_path / "hf-cache"
    populate_hub_cache(cache, TINY_HUB_ID, tiny_sd_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache
