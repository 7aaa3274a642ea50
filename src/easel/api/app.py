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
from easel.api.auth import install_auth
from easel.api.errors import install_error_handlers
from easel.api.limits import BodySizeLimit
from easel.api.routers import datasets, images, jobs, keys, loras, models, system
from easel.services import Services

API_PREFIX = "/api/v1"

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
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        # an upload's multipart framing adds a few hundred bytes to the file
        paths={
            f"{API_PREFIX}/images": settings.max_upload_bytes + 65536,
            # a few hundred bytes of framing for each of up to thousands of files
            f"{API_PREFIX}/datasets": settings.max_dataset_upload_bytes + 2_000_000,
        },
    )
    install_auth(app, services)  # outside the body limit: no body is read for a stranger
    install_error_handlers(app, services)
    for module in (system, models, jobs, images, datasets, loras, keys):
        app.include_router(module.router, prefix=API_PREFIX)
    if mount_ui is not None:
        mount_ui(app, services)
    return app
