"""Shared fixtures: every test gets its own EASEL_HOME; nothing touches the network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.fixtures_models"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Starlette's TestClient sends `Host: testserver`; the server answers loopback names only
os.environ.setdefault("EASEL_ALLOWED_HOSTS", '["testserver"]')


# modules that share one xdist worker, by the start of their path: the Ray modules (one Ray
# cluster per machine: `ray stop` ends them all), the UI modules (one server and browser, whose
# state, history and keys, runs on from module to module)
SAME_WORKER = {"tests/jobs/test_raypool": "ray", "tests/ui/": "ui"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (scripts/check: ``-n 2``) each module runs whole in one worker, in
    order, sharing its fixtures, and the modules SAME_WORKER names share one. (xdist's own
    ``--dist loadgroup`` split even a two-file example's group here: pytest 9.2, xdist 3.8.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return next((g for start, g in SAME_WORKER.items() if module.startswith(start)), module)

    return ByModule(config, log)


@pytest.fixture
def easel_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh EASEL_HOME for one test (also exported for subprocesses)."""
    home = tmp_path / "easel-home"
    home.mkdir()
    monkeypatch.setenv("EASEL_HOME", str(home))
    return home
