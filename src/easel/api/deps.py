"""How route handlers get the services (set once by create_app) and the request's principal
(set by the auth gate, ``easel.api.auth``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from easel.domain import Principal
from easel.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_principal(request: Request) -> Principal:
    """Who the request acts for. The gate runs before every route, so this is always set; a
    route mounted without the gate would fail here loudly rather than run unchecked."""
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):
        raise RuntimeError("no principal on the request: is the auth gate installed?")
    return principal


ServicesDep = Annotated[Services, Depends(get_services)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
