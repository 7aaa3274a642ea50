"""Shared fixtures: every test gets its own EASEL_HOME; nothing touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures_models"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Starlette's TestClient sends `Host: testserver`; the server answers loopback names only
os.environ.setdefault("EASEL_ALLOWED_HOSTS", '["testserver"]')


@pytest.fixture
def easel_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh EASEL_HOME for one test (also exported for subprocesses)."""
    home = tmp_path / "easel-home"
    home.mkdir()
    monkeypatch.setenv("EASEL_HOME", str(home))
    return home
