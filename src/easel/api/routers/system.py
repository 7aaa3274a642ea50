"""/api/v1/health and /api/v1/queue."""

from __future__ import annotations

from fastapi import APIRouter

from easel import __version__
from easel.api.deps import PrincipalDep, ServicesDep
from easel.api.schemas import DiskPublic, Health, QueuePublic

router = APIRouter(tags=["system"])


@router.get("/health")
def health(services: ServicesDep) -> Health:
    """Liveness: the server answers, how many workers it runs, and whether its disk has room
    (``status`` is ``degraded`` when it has not: new jobs get 507)."""
    disk = services.disk_status()
    return Health(
        status="degraded" if disk.low else "ok",
        version=__version__,
        workers=services.worker_count(),
        disk=DiskPublic(
            free_bytes=disk.free_bytes, min_free_bytes=disk.min_free_bytes, low=disk.low
        ),
    )


@router.get("/queue")
def queue(services: ServicesDep, principal: PrincipalDep) -> QueuePublic:
    """Job counts by status (every key's) and the key's jobs running now."""
    return QueuePublic.of(services.queue_summary(principal), workers=services.worker_count())
