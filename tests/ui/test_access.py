"""Who the page acts for, without a browser: Gradio's user from the gate's principal, the
principal a page event acts for, the signed-in line, and the image store kept off Gradio's
file route (the browser test, ``test_sign_in.py``, signs in for real)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pytest
from starlette.requests import Request

from easel.config import Settings
from easel.domain import LOCAL, Unauthorized
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services
from easel.ui.access import PrivateImages, acting_for, page_user, signed_in_html


@pytest.fixture
def services(easel_home: Path) -> Iterator[Services]:
    services = build_services(Settings(home=easel_home), generator=StandInGenerator())
    yield services
    services.stop()


def request_with(state: dict | None) -> Request:
    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    if state is not None:
        scope["state"] = state
    return Request(scope)


def test_gradio_user_is_the_gates_principal(services: Services) -> None:
    record, _ = services.create_key("alice")
    assert page_user(request_with({"principal": record.principal()})) == record.id
    assert page_user(request_with({"principal": services.keyless_principal()})) == "local"
    assert page_user(request_with({})) is None  # not through the gate: Gradio answers 401
    assert page_user(request_with(None)) is None


def test_events_act_for_the_signed_in_key_until_it_is_revoked(services: Services) -> None:
    assert acting_for(services, None) == services.keyless_principal()  # no key exists yet
    record, _ = services.create_key("alice")
    principal = acting_for(services, gr.Request(username=record.id))
    assert principal.key_id == record.id and principal.name == "alice"
    with pytest.raises(Unauthorized):  # keys exist now: the keyless user is no one
        acting_for(services, gr.Request(username="local"))
    with pytest.raises(Unauthorized):
        acting_for(services, None)
    services.revoke_key("alice")
    with pytest.raises(Unauthorized, match="sign in again"):
        acting_for(services, gr.Request(username=record.id))


def test_signed_in_line_names_the_key_and_is_absent_without_keys(services: Services) -> None:
    record, _ = services.create_key("alice")
    line = signed_in_html(record.principal())
    assert "Signed in as" in line and ">alice<" in line
    assert '<form method="post" action="/logout">' in line
    assert signed_in_html(LOCAL) == ""


def test_the_image_store_is_not_served_by_gradio(tmp_path: Path) -> None:
    store = tmp_path / "images"
    (store / "2026-01-01").mkdir(parents=True)
    gate = PrivateImages(lambda *_: None, images_dir=store)  # type: ignore[arg-type,return-value]
    png = store / "2026-01-01" / "0123.png"
    assert gate.in_store(f"/gradio_api/file={png}")
    assert gate.in_store(f"/gradio_api/file={store}/../images/2026-01-01/0123.png")
    assert gate.in_store(f"/ui/gradio_api/file={png}")  # mounted under a path
    assert gate.in_store(f"/gradio_api/file/{png}")  # the older route
    assert not gate.in_store(f"/gradio_api/file={tmp_path}/gradio/abc/0123.png")  # the cache
    assert not gate.in_store("/api/v1/images/0123.png")
