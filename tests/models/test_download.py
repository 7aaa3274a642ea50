"""``pull`` fails fast and in one line where there is no network."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from easel.config import Settings
from easel.domain import EaselError, ModelNotAvailable, ModelNotFound
from easel.models.catalog import ModelCatalog
from easel.models.download import pull


@pytest.fixture
def catalog(easel_home: Path) -> ModelCatalog:
    return ModelCatalog(Settings(home=easel_home))


def test_unreachable_hub_fails_fast(catalog: ModelCatalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailable, match="127.0.0.1 is unreachable") as info:
        pull(catalog, "sdxl-turbo", progress=False)
    assert time.perf_counter() - start < 2
    assert "stabilityai/sdxl-turbo" in info.value.message and "\n" not in info.value.message


def test_offline_pull_does_not_even_import_torch(easel_home: Path) -> None:
    code = (
        "import sys\n"
        "from easel.config import Settings\n"
        "from easel.models.catalog import ModelCatalog\n"
        "from easel.models.download import pull\n"
        "try:\n"
        "    pull(ModelCatalog(Settings()), 'flux-schnell')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "EASEL_HOME": str(easel_home), "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.split() == ["ModelNotAvailable", "False"]


def test_pull_accepts_any_hub_id_but_not_unknown_names(
    catalog: ModelCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match="someone/model"):
        pull(catalog, "someone/model")
    with pytest.raises(ModelNotFound, match="did you mean sdxl"):
        pull(catalog, "sdxl-trubo")


def test_pull_of_local_model_is_refused(catalog: ModelCatalog, tiny_sd_path: Path) -> None:
    with pytest.raises(EaselError, match="local model"):
        pull(catalog, str(tiny_sd_path))
