"""The docs keep up with the code: every setting in docs/CONFIG.md, every route in docs/API.md."""

from __future__ import annotations

from pathlib import Path

from easel.api.app import create_app
from easel.config import Settings
from easel.jobs.standin import StandInGenerator
from easel.services import build_services

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_setting_is_in_config_md() -> None:
    text = (DOCS / "CONFIG.md").read_text()
    missing = [name for name in Settings.model_fields if f"`EASEL_{name.upper()}`" not in text]
    assert not missing, f"document these settings in docs/CONFIG.md: {missing}"


def test_every_route_is_in_api_md(easel_home: Path) -> None:
    services = build_services(Settings(home=easel_home), generator=StandInGenerator())
    try:
        paths = create_app(services).openapi()["paths"]
        routes = [(method.upper(), path) for path, ops in paths.items() for method in ops]
    finally:
        services.stop()
    assert len(routes) >= 10
    text = (DOCS / "API.md").read_text()
    missing = [f"{m} {p}" for m, p in routes if f"| `{m}` | `{p}` |" not in text]
    assert not missing, f"document these routes in docs/API.md: {missing}"
