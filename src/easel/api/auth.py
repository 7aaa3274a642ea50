"""Who may ask what: one ASGI gate in front of every route (the API, the drop-in protocols, the
docs and the web UI), and the web UI's sign-in page.

For each HTTP request the gate
1. answers only Host names it serves (a DNS-rebinding page gets 400);
2. refuses a state-changing request (POST, PUT, PATCH, DELETE) from another web origin (403):
   a page elsewhere cannot make a visitor's browser submit jobs or uploads here;
3. finds the principal: ``Authorization: Bearer KEY`` (or HTTP Basic with the key as the
   password, as Open WebUI sends to AUTOMATIC1111 servers), else the web UI's session cookie
   (whose state-changing requests must also carry a same-origin ``Origin``/``Referer``), else
   the keyless local user while no key exists; counts the request against the key's rate;
4. puts it in ``scope["state"]["principal"]`` for the routes (``deps.PrincipalDep``), or
   answers 401 (a browser asking for a page is sent to ``/login``) or 429 with Retry-After.

``/api/v1/health`` and the sign-in page are open to everyone.
"""

from __future__ import annotations

import asyncio
import base64
import html
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from easel.api.errors import error_response
from easel.domain import EaselError, Principal, QuotaExceeded
from easel.services import Services

SESSION_COOKIE = "easel_session"
PUBLIC_PATHS = frozenset({"/api/v1/health", "/login", "/logout"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# paths of machine clients: never redirected to the sign-in page
API_PREFIXES = ("/api/", "/v1/", "/sdapi/", "/mcp", "/metrics", "/openapi.json")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def allowed_hosts(services: Services) -> frozenset[str] | None:
    """Host names (without port) the server answers: the loopback names (a rebinding page
    cannot send those), the bound address and ``settings.allowed_hosts``; None: any (bound to
    every interface with no list set, which needs keys)."""
    settings = services.settings
    wildcard = settings.host in WILDCARD_HOSTS
    if wildcard and not settings.allowed_hosts:
        return None
    names = LOOPBACK_NAMES | {h.lower() for h in settings.allowed_hosts}
    return names if wildcard else names | {settings.host.strip("[]").lower()}


def host_name(value: str) -> str:
    """``example.org:7860`` -> ``example.org``; ``[::1]:7860`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser ``Origin`` (or a ``Referer`` URL) names the host the request came to."""
    try:
        return urlsplit(origin).netloc.lower() == host.strip().lower()
    except ValueError:
        return False


def basic_password(value: str) -> str | None:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8 once decoded
        return None
    return decoded.partition(":")[2] or None


def credentials(headers: dict[str, str]) -> tuple[str | None, str | None]:
    """(API key from Authorization, session token from the cookie)."""
    key = None
    auth = headers.get("authorization", "")
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() == "bearer":
        key = value.strip() or None
    elif scheme.lower() == "basic":
        key = basic_password(value.strip())
    elif auth:
        key = auth  # malformed: fails as a wrong key, never as no key
    token = None
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE:
            token = value or None
    return key, token


def error(scope: Scope, status: int, type_: str, message: str, **headers: str) -> JSONResponse:
    """The gate's answer, in the shape of the path's protocol (``errors.error_body``)."""
    return error_response(status, type_, message, "authorization", path=scope["path"], **headers)


class AuthGate:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app: ASGIApp, *, services: Services) -> None:
        self.app = app
        self.services = services
        self.hosts = allowed_hosts(services)  # settings are fixed while the app runs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        verdict = await self.check(scope)
        if isinstance(verdict, Response):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await verdict(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = verdict
        await self.app(scope, receive, send)

    async def check(self, scope: Scope) -> Principal | Response:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return error(
                scope,
                400,
                "InvalidHost",
                f"this server does not answer for host {host_name(host)!r} (settings: "
                "allowed_hosts)",
            )
        method = scope.get("method", "GET")
        origin = headers.get("origin")
        cors = self.services.settings.cors_origins
        if (
            method not in SAFE_METHODS
            and origin is not None
            and not same_origin(origin, host)
            and origin not in cors
        ):
            return error(scope, 403, "CrossOrigin", f"requests from origin {origin!r} are refused")
        path = scope["path"]
        if path in PUBLIC_PATHS:
            return self.services.keyless_principal()
        key, token = credentials(headers)
        try:
            if key is not None or token is None:
                return await asyncio.to_thread(self.services.authenticate, key)
            # what the page does counts against the key's rate; loading the page does not
            count = method not in SAFE_METHODS or path.startswith(API_PREFIXES)
            principal = await asyncio.to_thread(self.services.session_principal, token, count=count)
        except QuotaExceeded as exc:
            return error(
                scope, 429, "QuotaExceeded", exc.message, **{"Retry-After": str(exc.retry_after_s)}
            )
        except EaselError as exc:
            return self.unauthorized(scope, headers, exc.message)
        if principal is None:  # a stale cookie: as if there were none
            try:
                return await asyncio.to_thread(self.services.authenticate, None)
            except EaselError as exc:
                return self.unauthorized(scope, headers, exc.message)
        if method not in SAFE_METHODS:
            referer = headers.get("referer")
            if not (origin or referer) or not same_origin(origin or referer or "", host):
                return error(
                    scope,
                    403,
                    "CrossOrigin",
                    "a request signed in by cookie must come from this server's pages "
                    "(same Origin)",
                )
        return principal

    @staticmethod
    def unauthorized(scope: Scope, headers: dict[str, str], message: str) -> Response:
        path = scope["path"]
        wants_page = (
            scope.get("method") == "GET"
            and not path.startswith(API_PREFIXES)
            and "text/html" in headers.get("accept", "")
        )
        if wants_page:
            return RedirectResponse(f"/login?next={path if path.startswith('/') else '/'}", 303)
        return error(
            scope, 401, "Unauthorized", message, **{"WWW-Authenticate": 'Bearer realm="easel"'}
        )


# --- the sign-in page ---------------------------------------------------------------------------

router = APIRouter(include_in_schema=False)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Easel: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; display: grid; place-items: center; min-height: 90vh;
       background: #f6f6f4; color: #222; }}
form {{ background: white; padding: 2rem; border-radius: 8px; box-shadow: 0 1px 4px #0002;
        width: min(26rem, 90vw); }}
h1 {{ font-size: 1.3rem; margin-top: 0; }}
input {{ width: 100%; box-sizing: border-box; padding: .6rem; font-size: 1rem; margin: .5rem 0 1rem; }}
button {{ padding: .6rem 1.2rem; font-size: 1rem; }}
.error {{ color: #b00020; }}
</style></head>
<body><form method="post" action="/login">
<h1>Easel</h1>
<p>This server needs an API key. Ask its owner for one (<code>easel keys create NAME</code>).</p>
{error}
<label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{next}">
<button type="submit">Sign in</button>
</form></body></html>
"""


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path on this server only (no ``//host`` or scheme)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@router.get("/login")
def login_page(next: str = "/") -> HTMLResponse:  # noqa: A002 - the query parameter's name
    return HTMLResponse(PAGE.format(error="", next=html.escape(safe_next(next))))


@router.post("/login")
def login(request: Request, key: str = Form(""), next: str = Form("/")) -> Response:  # noqa: A002
    """Check the key and set the session cookie (HttpOnly, SameSite=Strict)."""
    services = services_of(request)
    try:
        token = services.start_session(key.strip())
    except EaselError:
        page = PAGE.format(
            error='<p class="error">That key is not valid (unknown or revoked).</p>',
            next=html.escape(safe_next(next)),
        )
        return HTMLResponse(page, status_code=401)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(services.settings.session_days * 86400),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    """End the session and forget the cookie."""
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        services_of(request).end_session(token)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def document_auth(app: FastAPI) -> None:
    """State the gate in the OpenAPI schema: a bearer key on every operation but health, and
    the answers the gate may give (401, 429; 403 on state-changing ones), so clients, the
    docs' Authorize button and schema fuzzers know them."""
    original = app.openapi
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from `easel keys create` (needed once a key exists; "
            "HTTP Basic with the key as the password works too)",
        }
        for path, operations in schema["paths"].items():
            if path in PUBLIC_PATHS:
                continue
            for method, operation in operations.items():
                # or none: a server without keys answers without one
                operation["security"] = [{"apiKey": []}, {}]
                answers = operation.setdefault("responses", {})
                answers.setdefault(
                    "401", {"description": "No key, or an unknown or revoked one", "content": error}
                )
                answers.setdefault(
                    "429",
                    {
                        "description": "The key's rate or job quota; see Retry-After",
                        "content": error,
                    },
                )
                if method.upper() not in SAFE_METHODS:
                    answers.setdefault(
                        "403",
                        {"description": "Missing scope, or another web origin", "content": error},
                    )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_auth(app: FastAPI, services: Services) -> None:
    """The gate (outermost but CORS), the sign-in routes, and the gate in the OpenAPI schema."""
    app.include_router(router)
    document_auth(app)
    app.add_middleware(AuthGate, services=services)
    if services.settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=services.settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            expose_headers=["Retry-After", "Location"],
        )
