"""/api/v1/loras: the LoRAs generations may name (trained ones and files added)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from easel.api.deps import PrincipalDep, ServicesDep
from easel.api.schemas import ErrorBody, LoraPublic

router = APIRouter(prefix="/loras", tags=["loras"])
ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "Unknown LoRA"}}


@router.get("")
def list_loras(services: ServicesDep, principal: PrincipalDep) -> list[LoraPublic]:
    """The LoRAs the key may use, by name (the owner's additions and the key's own trained
    ones): family, base model, trigger word, rank, steps, source."""
    return [LoraPublic.of(record) for record in services.list_loras(principal)]


@router.get("/{name}", responses=ERRORS)
def get_lora(name: str, services: ServicesDep, principal: PrincipalDep) -> LoraPublic:
    """One LoRA."""
    return LoraPublic.of(services.get_lora(name, principal))
