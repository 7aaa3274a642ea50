"""Start the real server (``python -m easel serve``) in a subprocess on a free loopback port."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from easel.config import Settings
from easel.models.catalog import ModelCatalog

# the tiny SD makes 64x64 images; let requests go from 32 to 128 px like tiny-shapes
TINY_DEFAULTS = {"width": 64, "height": 64, "min_size": 32, "max_size": 128}


def free_port() -> int:
    """A loopback port free now, for a server to bind soon after. Drawn from 20000–31999:
    below the kernel's ephemeral range (32768 up), from which every outgoing connection takes
    its local port, so that no client's connection takes it in between, and above Ray's worker
    ports (10002–19999), which `ray start --head` refuses as its own; and from this
    pytest-xdist worker's own slice, so that no other worker's server takes it."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    low = 20_000 + (worker % 4) * 3_000
    while True:
        port = random.randrange(low, low + 3_000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def prepare_home(home: Path, tiny_sd_path: Path) -> None:
    """An EASEL_HOME whose catalog has model ``tiny`` (what ``easel models add`` writes)."""
    home.mkdir(parents=True, exist_ok=True)
    ModelCatalog(Settings(home=home)).add("tiny", str(tiny_sd_path), defaults=TINY_DEFAULTS)


class Server:
    """One server process over ``home``; ``start()`` waits until /api/v1/health answers."""

    def __init__(
        self,
        home: Path,
        *,
        drain_timeout_s: float = 30.0,
        env: dict[str, str] | None = None,
        ui: bool = False,
    ) -> None:
        self.home = home
        self.env = env or {}  # more EASEL_* settings
        self.ui = ui  # also the web UI (slower to start)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.drain_timeout_s = drain_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.log = home / "server.log"

    def start(self, timeout: float = 90.0) -> Server:
        env = {
            **os.environ,
            "EASEL_HOME": str(self.home),
            "EASEL_DEFAULT_MODEL": "tiny",
            "EASEL_DEVICE": "cpu",
            "EASEL_DRAIN_TIMEOUT_S": str(self.drain_timeout_s),
            "OMP_NUM_THREADS": "1",  # the build machine has 2 cores shared with the test runner
            **self.env,
        }
        command = [sys.executable, "-m", "easel", "serve", "--port", str(self.port)]
        if not self.ui:
            command.append("--no-ui")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/api/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server did not start: {self.log.read_text()[-3000:]}")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain) and wait for the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the process dies mid-work, like a crash or power loss."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
