"""A webhook receiver on loopback for tests: a real HTTP server in a thread that records every
request and answers as told (statuses planned ahead, then 200; or a redirect)."""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from easel.jobs.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, verify


@dataclass(frozen=True)
class Received:
    """One request the receiver got, and what it answered."""

    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    status: int

    @property
    def delivery(self) -> str:
        return self.headers[DELIVERY_HEADER.lower()]

    @property
    def job(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    def signed_by(self, secret: str) -> bool:
        return verify(secret, self.headers.get(SIGNATURE_HEADER.lower(), ""), self.body)


class Receiver:
    """``start()`` listens on 127.0.0.1 (on ``port``, or a free one); ``stop()`` closes the
    port (connections are refused then). ``plan``: statuses to answer first, in order;
    ``redirect``: answer 302 to this path instead (which records like any other); ``tls``: a
    server context, to answer https."""

    def __init__(self, port: int = 0, *, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.tls = tls
        self.requests: list[Received] = []
        self.plan: list[int] = []
        self.redirect: str | None = None
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    status = receiver.plan.pop(0) if receiver.plan else 200
                    redirect = receiver.redirect if self.path == "/hook" else None
                    if redirect:
                        status = 302
                    receiver.requests.append(
                        Received(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            status,
                        )
                    )
                self.send_response(status)
                if redirect:
                    self.send_header("Location", redirect)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def delivered(self) -> list[Received]:
        """The requests answered with a 2xx."""
        with self._lock:
            return [r for r in self.requests if 200 <= r.status < 300]

    def wait_delivered(self, count: int = 1, timeout: float = 20.0) -> list[Received]:
        """Wait until ``count`` requests were answered 2xx; then a moment more, so that a
        duplicate would show."""
        deadline = time.monotonic() + timeout
        while len(self.delivered()) < count:
            assert time.monotonic() < deadline, f"no delivery in {timeout} s: {self.requests}"
            time.sleep(0.02)
        time.sleep(0.3)
        return self.delivered()
