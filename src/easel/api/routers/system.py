"""/api/v1/health and /api/v1/queue."""

from __future__ import annotations

from fastapi import APIRouter

from easel import __version__
from easel.api.deps import PrincipalDep, ServicesDep
from easel.api.schemas import Health, QueuePublic

router = APIRouter(tags=["system"])


@router.get("/health")
def health(services: ServicesDep) -> Health:
    """Liveness: the server answers and how many workers it runs."""
    return Health(version=__version__, workers=len(services.workers))


@router.get("/queue")
def queue(services: ServicesDep, principal: PrincipalDep) -> QueuePublic:
    """Job counts by status (every key's) and the key's jobs running now."""
    return QueuePublic.of(services.queue_summary(principal), workers=len(services.workers))
