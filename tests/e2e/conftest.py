"""A real server per module (tiny SD on CPU), reached over HTTP on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import Server, prepare_home


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_sd_path: Path) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("e2e") / "easel-home"
    prepare_home(home, tiny_sd_path)
    server = Server(home).start()
    yield server
    server.kill()


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as client:
        yield client
