"""Errors as typed JSON (``{"error": {"type", "message", "field"}}``), never a traceback."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from easel.domain import EaselError, QueueFull, QuotaExceeded, Unauthorized
from easel.jobs.disk import storage_failure
from easel.services import Services

log = logging.getLogger(__name__)
STORAGE_RETRY_AFTER_S = 30  # a full disk or an I/O error is not over in a second


A1111_PREFIX = "/sdapi/"  # AUTOMATIC1111's API (easel.api.a1111)
OPENAI_PREFIX = "/v1/"  # OpenAI's Images API (easel.api.openai)
# Easel's error type -> OpenAI's ``code`` (any other: the type in snake_case, model_not_found)
OPENAI_CODES = {
    "InvalidParams": "invalid_value",
    "MalformedJSON": "invalid_json",
    "InvalidRequest": "invalid_request",
    "Unauthorized": "invalid_api_key",
    "Forbidden": "missing_scope",
    "QuotaExceeded": "rate_limit_exceeded",
    "QueueFull": "queue_full",
    "PayloadTooLarge": "payload_too_large",
}
# OpenAI says 400 for any bad field (Easel: 422); 409 (a model not downloaded) and 411 would
# make the SDK retry the request, or raise a generic error
OPENAI_STATUS = {422: 400, 409: 400, 411: 400}


def error_status(path: str, status: int) -> int:
    """The status an error answers with on ``path``: Easel's, unless the protocol there says
    another for it (OpenAI's SDK raises BadRequestError for 400, not for 422)."""
    return OPENAI_STATUS.get(status, status) if path.startswith(OPENAI_PREFIX) else status


def openai_error(status: int, type_: str, message: str, field: str | None) -> dict[str, Any]:
    """OpenAI's error object for ``status`` (already mapped by :func:`error_status`): ``type``
    is ``invalid_request_error`` for a client's mistake, ``requests`` past a rate (as OpenAI's
    own 429s say), ``server_error`` for the server's; ``param`` names a request parameter."""
    kind = (
        "requests"
        if status == 429
        else "server_error"
        if status >= 500
        else "invalid_request_error"
    )
    code = OPENAI_CODES.get(type_) or re.sub(r"(?<!^)(?=[A-Z])", "_", type_).lower()
    if type_ == "HTTPError":  # Starlette's: an unknown path (404) or method (405)
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "invalid_request")
    param = None if field == "authorization" else field
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_body(
    path: str, status: int, type_: str, message: str, field: str | None
) -> dict[str, Any]:
    """An error's JSON in the shape of the protocol ``path`` belongs to, so that each kind of
    client reads its own (the one place that decides; the auth gate's answers use it too):

    - ``/sdapi/``: AUTOMATIC1111's, ``{"error": TYPE, "detail": MESSAGE, "body": "",
      "errors": MESSAGE}`` (plus Easel's ``field``, named as A1111 names it);
    - ``/v1/``: OpenAI's, ``{"error": {"message", "type", "param", "code"}}`` (``status`` as
      :func:`error_status` maps it);
    - anything else: Easel's, ``{"error": {"type", "message", "field"}}``.
    """
    if path.startswith(OPENAI_PREFIX):
        return openai_error(status, type_, message, field)
    if path.startswith(A1111_PREFIX):
        return {"error": type_, "detail": message, "body": "", "errors": message, "field": field}
    return {"error": {"type": type_, "message": message, "field": field}}


def error_response(
    status: int,
    type_: str,
    message: str,
    field: str | None = None,
    *,
    path: str = "",
    **headers: str,
) -> JSONResponse:
    """An error answer for a request to ``path``, in that protocol's shape (``error_body``)."""
    status = error_status(path, status)
    body = error_body(path, status, type_, message, field)
    return JSONResponse(body, status_code=status, headers=headers or None)


def path_of(request: Request) -> str:
    return str(request.scope.get("path", ""))


def allowed_methods(request: Request) -> str:
    """Every method some route of the request's path takes (RFC 9110's ``Allow``)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route_methods
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI, services: Services) -> None:
    """Map EaselError subclasses, request validation and HTTP errors to typed JSON."""

    @app.exception_handler(EaselError)
    async def easel_error(request: Request, exc: EaselError) -> JSONResponse:
        headers = {}
        if isinstance(exc, QuotaExceeded):
            headers["Retry-After"] = str(exc.retry_after_s)
        elif isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = 'Bearer realm="easel"'
        elif isinstance(exc, QueueFull):  # a database read: off the event loop (STYLE rule 5)
            headers["Retry-After"] = str(await asyncio.to_thread(services.retry_after_s))
        return error_response(
            exc.status, type(exc).__name__, exc.message, exc.field, path=path_of(request), **headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(
                400,
                "MalformedJSON",
                f"request body is not valid JSON: {first['msg']}",
                path=path_of(request),
            )
        # loras[0].id, as the services name a field in a list
        parts = [p for p in first["loc"] if p not in ("body", "query", "path", "header")]
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
        if not field:  # the body as a whole (missing, or not an object)
            return error_response(
                422,
                "InvalidRequest",
                f"request body must be a JSON object ({first['msg']})",
                path=path_of(request),
            )
        if first["type"] == "extra_forbidden":
            message = f"{field} is not a known field"
        elif first["type"] == "missing":
            message = f"{field} is required"
        else:
            message = f"{field}: {first['msg']} (got {first.get('input')!r})"
        return error_response(422, "InvalidParams", message, field, path=path_of(request))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the methods of one route of the path
            headers["Allow"] = allowed_methods(request)
        return error_response(
            exc.status_code, "HTTPError", str(exc.detail), path=path_of(request), **headers
        )

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def storage_error(request: Request, exc: Exception) -> JSONResponse:
        # a write failed all the same (the disk filled after the DiskFull check): its
        # transaction rolled back and its file was removed, so the request changed nothing
        reason = storage_failure(exc)
        if reason is None:
            return await internal_error(request, exc)
        log.warning("could not store %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503,
            "StorageUnavailable",
            f"the server could not write to its disk ({reason}); the "
            "request changed nothing, retry later",
            path=path_of(request),
            **{"Retry-After": str(STORAGE_RETRY_AFTER_S)},
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500, "InternalError", "internal error; see the server log", path=path_of(request)
        )
