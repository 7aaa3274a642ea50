"""/api/v1/keys: API keys, for admin keys only (the CLI's `easel keys` does the same locally)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from easel.api.deps import PrincipalDep, ServicesDep
from easel.api.schemas import ErrorBody, KeyCreate, KeyCreated, KeyPublic
from easel.services import Services


def require_admin(services: ServicesDep, principal: PrincipalDep) -> None:
    Services.require(principal, "admin")


router = APIRouter(prefix="/keys", tags=["keys"], dependencies=[Depends(require_admin)])
ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorBody, "description": "Not an admin key"},
    422: {"model": ErrorBody, "description": "Malformed name, unknown scope, limit out of range"},
}


@router.get("", responses=ERRORS)
def list_keys(services: ServicesDep, revoked: bool = False) -> list[KeyPublic]:
    """Active keys by name (``revoked=true``: revoked ones too); never their secrets."""
    return [KeyPublic.of(k) for k in services.list_keys(revoked=revoked)]


@router.post(
    "",
    status_code=201,
    responses={
        **ERRORS,
        400: {"model": ErrorBody, "description": "Malformed JSON"},
        409: {"model": ErrorBody, "description": "An active key has that name"},
    },
)
def create_key(body: KeyCreate, services: ServicesDep) -> KeyCreated:
    """Make a key; the response holds its secret, shown this once (stored only hashed)."""
    record, secret = services.create_key(
        body.name,
        scopes=tuple(body.scopes),
        rate_per_minute=body.rate_per_minute,
        max_jobs=body.max_jobs,
    )
    return KeyCreated(**KeyPublic.of(record).model_dump(), secret=secret)


@router.delete(
    "/{name}", responses={**ERRORS, 404: {"model": ErrorBody, "description": "No active key"}}
)
def revoke_key(name: str, services: ServicesDep) -> KeyPublic:
    """Revoke the active key ``name``: it stops working at once, its sessions end; what it
    made keeps its owner (admins still see it)."""
    return KeyPublic.of(services.revoke_key(name))
