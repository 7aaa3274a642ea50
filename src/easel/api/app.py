"""The FastAPI app: ``create_app(services)`` builds it; nothing is created at import time.

app = create_app(build_services(Settings()))      # REST API under /api/v1, docs at /docs
app = create_app(services, mount_ui=mount_ui)     # plus the web UI at /
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from easel import __version__
from easel.api import a1111, openai
from easel.api.auth import install_auth
from easel.api.errors import install_error_handlers
from easel.api.limits import BodySizeLimit, DeclaredBodyLimit
from easel.api.routers import (
    datasets,
    images,
    jobs,
    keys,
    loras,
    models,
    system,
    webhooks,
    workers,
)
from easel.api.schemas import state_limits
from easel.api.streams import StreamSlots
from easel.config import Settings
from easel.services import Services

API_PREFIX = "/api/v1"
# paths of JSON and upload APIs: bodies counted as they arrive (BodySizeLimit); the rest (the
# web UI) must declare their length (DeclaredBodyLimit)
API_PATHS = ("/api/", "/v1/", "/sdapi/")
UI_UPLOAD_PATH = "/gradio_api/upload"  # the web UI's (Gradio's) upload route

MountUI = Callable[[FastAPI, Services], Any]


def create_app(services: Services, *, mount_ui: MountUI | None = None) -> FastAPI:
    """The HTTP app over ``services``. Its lifespan starts the services (recovery, workers) and
    stops them (drain). ``mount_ui(app, services)``, when given, runs last: it mounts at ``/``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.start()
        try:
            yield
        finally:
            await asyncio.to_thread(services.stop)  # drain may take drain_timeout_s

    app = FastAPI(
        title="Easel",
        version=__version__,
        description="Self-hosted image generation: one durable job queue behind every interface.",
        lifespan=lifespan,
    )
    app.state.services = services
    settings = services.settings
    app.state.streams = StreamSlots(
        total=settings.max_streams, per_client=settings.max_streams_per_client
    )
    # run on the loop when the server stops, after the drain: each ends long-lived streams
    # (easel.api.graceful); the web UI adds its own
    app.state.on_stopping = [services.events.stop_streams]
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        prefix=API_PATHS,
        # an upload's multipart framing adds a few hundred bytes to the file
        paths={
            f"{API_PREFIX}/images": settings.max_upload_bytes + 65536,
            # a few hundred bytes of framing for each of up to thousands of files
            f"{API_PREFIX}/datasets": settings.max_dataset_upload_bytes + 2_000_000,
            # OpenAI's edits: an image and a mask; variations: an image
            "/v1/images/edits": 2 * settings.max_upload_bytes + 65536,
            "/v1/images/variations": settings.max_upload_bytes + 65536,
            # AUTOMATIC1111's: base64 images in JSON (img2img: an image and a mask)
            **a1111.body_limits(settings),
        },
        timeout_s=settings.request_timeout_s,
    )
    # the rest (the web UI): a declared length, at most max_body_bytes; its upload route takes
    # what the API's two upload routes take (the training tab uploads whole datasets)
    app.add_middleware(
        DeclaredBodyLimit,
        max_bytes=settings.max_body_bytes,
        skip_prefix=API_PATHS,
        paths={UI_UPLOAD_PATH: ui_upload_bytes(settings) + 2_000_000},
    )
    install_auth(app, services)  # outside the body limit: no body is read for a stranger
    install_error_handlers(app, services)
    state_limits(app, services)  # the OpenAPI document states this server's limits
    for module in (system, models, jobs, images, datasets, loras, keys, webhooks, workers):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(workers.metrics_router)  # /metrics, where Prometheus looks
    app.include_router(openai.router)  # OpenAI's Images API under /v1 (not in /openapi.json)
    a1111.install(app)  # AUTOMATIC1111's API under /sdapi/v1
    if mount_ui is not None:
        mount_ui(app, services)
    return app


def ui_upload_bytes(settings: Settings) -> int:
    """The largest file the web UI accepts: an input image or a whole dataset."""
    return max(settings.max_upload_bytes, settings.max_dataset_upload_bytes)
