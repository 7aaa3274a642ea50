"""Request body limits, as plain ASGI middleware.

:class:`BodySizeLimit` (the API): checks ``Content-Length`` up front and also counts the bytes
actually received, so a client that sends a chunked body or lies about the length is cut off
too (413); the body must arrive within ``timeout_s`` (an upload's parts: no pause longer than
that), else 408. The body is buffered (API bodies are small JSON; uploads, allowed more on
their own paths, are a few MB) and replayed to the app.

:class:`DeclaredBodyLimit` (everything else: the web UI's routes, Gradio's upload route among
them): a body must declare its length, no larger than the path's limit (411, 413). The server
then never reads more than that, so the body can stream through to the app unbuffered.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from easel.api.errors import error_body, error_status


class BodySizeLimit:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        prefix: str | tuple[str, ...] = "/api/",
        paths: dict[str, int] | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.prefix = prefix  # one path prefix, or several (the API, the drop-in protocols)
        self.paths = paths or {}  # exact paths with a limit of their own (uploads)
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        upload = scope["path"].rstrip("/") in self.paths
        limit = self.paths.get(scope["path"].rstrip("/"), self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and _exceeds(declared, limit):
            await self._reject(scope, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            # an ordinary body: all of it in timeout_s; an upload: no pause longer than that
            wait = self.timeout_s if upload else deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except TimeoutError:
                await _send_error(
                    scope,
                    send,
                    408,
                    "RequestTimeout",
                    f"the request body did not arrive within {self.timeout_s:g} s "
                    "(settings: request_timeout_s)",
                )
                return
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._reject(scope, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send, limit: int) -> None:
        await _send_error(
            scope, send, 413, "PayloadTooLarge", f"request body is larger than {limit} bytes"
        )


class DeclaredBodyLimit:
    """Outside ``skip_prefix``: a request body must come with ``Content-Length`` (a chunked
    one gets 411) of at most its path's limit (413); the HTTP parser then reads no more than
    that. ``paths`` maps path prefixes to their own limits (the UI's upload route)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        skip_prefix: str | tuple[str, ...] = "/api/",
        paths: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.skip_prefix = skip_prefix
        self.paths = paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.skip_prefix):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if b"transfer-encoding" in headers:
            await _send_error(
                scope,
                send,
                411,
                "LengthRequired",
                "a request body here must state its Content-Length",
            )
            return
        path = scope["path"]
        limit = next((n for p, n in self.paths.items() if path.startswith(p)), self.max_bytes)
        if declared is not None and (not declared.isdigit() or _exceeds(declared, limit)):
            await _send_error(
                scope, send, 413, "PayloadTooLarge", f"request body is larger than {limit} bytes"
            )
            return
        await self.app(scope, receive, send)


def _exceeds(declared: bytes, limit: int) -> bool:
    """Whether a Content-Length of ASCII digits states more than ``limit`` bytes, read without
    int() of thousands of digits (Python refuses more than 4300: that was a 500)."""
    digits = declared.lstrip(b"0")
    return len(digits) > len(str(limit)) or int(digits or b"0") > limit


async def _send_error(scope: Scope, send: Send, status: int, type_: str, message: str) -> None:
    """A typed JSON error in the shape of the path's protocol, closing the connection (the
    rest of the body is never read)."""
    status = error_status(scope["path"], status)
    body = json.dumps(error_body(scope["path"], status, type_, message, None)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
