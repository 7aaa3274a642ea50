"""How route handlers get the services: the app holds them (set once by create_app)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from easel.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
