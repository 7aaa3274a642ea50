"""Errors as typed JSON (``{"error": {"type", "message", "field"}}``), never a traceback."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

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


def error_response(
    status: int, type_: str, message: str, field: str | None = None, **headers: str
) -> JSONResponse:
    body = {"error": {"type": type_, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers or None)


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
        return error_response(exc.status, type(exc).__name__, exc.message, exc.field, **headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(
                400, "MalformedJSON", f"request body is not valid JSON: {first['msg']}"
            )
        # loras[0].id, as the services name a field in a list
        parts = [p for p in first["loc"] if p not in ("body", "query", "path", "header")]
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
        if not field:  # the body as a whole (missing, or not an object)
            return error_response(
                422, "InvalidRequest", f"request body must be a JSON object ({first['msg']})"
            )
        if first["type"] == "extra_forbidden":
            message = f"{field} is not a known field"
        elif first["type"] == "missing":
            message = f"{field} is required"
        else:
            message = f"{field}: {first['msg']} (got {first.get('input')!r})"
        return error_response(422, "InvalidParams", message, field)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the methods of one route of the path
            headers["Allow"] = allowed_methods(request)
        return error_response(exc.status_code, "HTTPError", str(exc.detail), **headers)

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
            **{"Retry-After": str(STORAGE_RETRY_AFTER_S)},
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "InternalError", "internal error; see the server log")
