"""Who the page acts for. The API's gate (``easel.api.auth.AuthGate``) runs before every Gradio
route and leaves the request's principal in ``scope["state"]["principal"]``: a signed-in key
(session cookie, or a Bearer key from ``gradio_client``), or the keyless local user while no
key exists. Gradio takes its user name from :func:`page_user` (``auth_dependency``) and hands
it to every event as ``gr.Request.username``; each handler that touches owned things (jobs,
images, datasets, LoRAs) asks :func:`acting_for` for the principal and passes it to
``services``, as the REST routes do.

    async def generate(self, prompt: str, ..., request: gr.Request | None = None):
        principal = acting_for(self.services, request)
        job = self.services.submit_job(params, principal=principal)
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from easel.domain import LOCAL, Principal
from easel.services import Services

# Sees only what belongs to no key (the LoRAs the server's owner added): what the page is built
# with before anyone has opened it; each visitor's own choices replace it when the page loads.
ANYONE = Principal(key_id=None, name="anyone", scopes=frozenset())
# Gradio's file routes (``/gradio_api/file=PATH`` and its older ``/gradio_api/file/PATH``).
FILE_ROUTE = re.compile(r"/gradio_api/file[=/](?P<path>.*)")


def page_user(request: Request) -> str | None:
    """Gradio's ``auth_dependency``: the key id the gate found ("local" on a server without
    keys); None (Gradio answers 401) for a request that did not pass the gate."""
    principal: Any = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):
        return None
    return principal.key_id or principal.name


def acting_for(services: Services, request: gr.Request | None) -> Principal:
    """The principal a page event acts for: the signed-in key (read afresh, so a key revoked
    since the page opened is refused with Unauthorized), else the keyless local user. An event
    called without a request (a direct call in-process) counts as the local user, which only a
    server without keys admits."""
    username = getattr(request, "username", None) if request is not None else None
    return services.principal_for(username or LOCAL.name)


def signed_in_html(principal: Principal) -> str:
    """The line at the top of the page: who is signed in and a Sign out button (a POST form to
    ``/logout``); empty on a server without keys."""
    if principal.key_id is None:
        return ""
    return (
        '<div class="easel-account">Signed in as '
        f'<strong id="signed-in-name">{html.escape(principal.name)}</strong> · '
        '<form method="post" action="/logout">'
        '<button type="submit" id="sign-out">Sign out</button></form></div>'
    )


class PrivateImages:
    """ASGI middleware: Gradio's file routes never serve a file from the image store itself.

    Gradio needs the images folder in ``allowed_paths`` to take the stored PNGs the galleries
    show, but it always copies them into its cache (under a folder named by the file's salted
    SHA-256) and the page loads the copies. The folder itself would otherwise be readable by
    anyone signed in who knows an image id and the store's path (ids are 128-bit random, yet
    they travel: API URLs, logs, shared links): another key's image must come only through the
    API, which checks its owner."""

    def __init__(self, app: ASGIApp, *, images_dir: Path) -> None:
        self.app = app
        self.images_dir = images_dir.resolve()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.in_store(scope["path"]):
            response = PlainTextResponse("File not allowed.", status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def in_store(self, path: str) -> bool:
        match = FILE_ROUTE.search(path)
        if match is None:
            return False
        try:  # resolved as Gradio resolves it: relative to the working folder, links followed
            target = Path(os.path.abspath(match["path"])).resolve()
        except (OSError, ValueError):
            return False
        return target == self.images_dir or self.images_dir in target.parents
