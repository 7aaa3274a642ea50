"""/api/v1/models: the catalog with defaults, limits, availability and loaded state."""

from __future__ import annotations

from fastapi import APIRouter

from easel.api.deps import ServicesDep
from easel.api.schemas import ModelPublic

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(services: ServicesDep) -> list[ModelPublic]:
    """Every catalog model: id, family, tasks, defaults, limits, available locally, loaded."""
    return [ModelPublic.of(info) for info in services.list_models()]
