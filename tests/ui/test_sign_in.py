"""The page on a server with API keys, in a real browser: sign in with a key, see only the key's
own images, sign out.

Its own server (keys made in its EASEL_HOME before it starts): ``alice`` signs in on the page,
``bob`` makes an image over HTTP that alice's History must not show.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from easel.config import Settings
from easel.jobs.db import Database
from easel.jobs.keys import KeyStore
from tests.ui.conftest import ServerProcess, wait_until_done

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ALICE_PROMPT = "a red circle on a white background"
BOB_PROMPT = "a big purple cross on a yellow background"


class KeyedServer(ServerProcess):
    """The real server with two keys made beforehand; ``secrets`` maps name to key."""

    secrets: dict[str, str]


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedServer]:
    home = tmp_path_factory.mktemp("keyed-home")
    db = Database(Settings(home=home).db_path)
    try:  # what `easel keys create NAME` does
        store = KeyStore(db)
        secrets = {name: store.create(name)[1] for name in ("alice", "bob")}
    finally:
        db.close()
    server = KeyedServer(home, home / "server.log")
    server.secrets = secrets
    server.start()
    yield server
    server.stop()


def api_as(server: KeyedServer, name: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{server.url}/api/v1",
        headers={"Authorization": f"Bearer {server.secrets[name]}"},
        timeout=30,
    )


def sign_in(page: Page, key: str) -> None:
    page.locator("#key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def test_a_browser_signs_in_with_its_key_and_out_again(
    browser,  # type: ignore[no-untyped-def]
    keyed_server: KeyedServer,
    artifacts: Path,
) -> None:
    # bob's image, made over HTTP with his key: alice must never see it
    with api_as(keyed_server, "bob") as bob:
        made = bob.post("/jobs", json={"prompt": BOB_PROMPT})
        assert made.status_code == 202, made.text
        wait_until_done(bob, made.json()["id"])
        (bob_image,) = bob.get(f"/jobs/{made.json()['id']}").json()["images"]

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        # 1. the page sends a browser without a session to the sign-in page
        page.goto(keyed_server.url + "/")
        expect(page).to_have_url(re.compile(r"/login\?next=/$"))
        expect(page.locator("#key")).to_be_visible()
        page.screenshot(path=artifacts / "sign-in.png")

        # 2. a wrong key is refused with a message, and no cookie is set
        sign_in(page, "easel_not-a-key")
        expect(page.get_by_text("That key is not valid")).to_be_visible()
        assert context.cookies() == []

        # 3. the right key: the page, a session cookie scripts cannot read or other sites send
        sign_in(page, keyed_server.secrets["alice"])
        page.locator("#prompt textarea").wait_for()
        (cookie,) = context.cookies()
        assert cookie["name"] == "easel_session"
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""
        expect(page.locator("#signed-in-name")).to_have_text("alice")

        # 4. generate on the page: the job is alice's
        page.locator("#prompt textarea").fill(ALICE_PROMPT)
        page.locator("#generate").click()
        expect(page.locator("#status .easel-status-text")).to_contain_text(
            "Done: 1 image", timeout=45_000
        )
        expect(page.locator("#result img").first).to_be_visible()
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=artifacts / "signed-in.png")
        with api_as(keyed_server, "alice") as alice:
            (job,) = alice.get("/jobs").json()
        assert job["params"]["prompt"] == ALICE_PROMPT and job["owner"] is not None

        # 5. History shows alice's image only; bob's is not found even by its prompt
        page.locator("#tab-history-button").click()
        expect(page.locator("#history-count")).to_have_text("1 image")
        expect(page.locator("#history img")).to_have_count(1)
        expect(page.locator("#history")).to_contain_text(ALICE_PROMPT)
        expect(page.locator("#history")).not_to_contain_text(BOB_PROMPT)
        page.locator("#search textarea, #search input").first.fill("purple cross")
        page.locator("#search textarea, #search input").first.press("Enter")
        expect(page.locator("#history-count")).to_have_text("0 images matching “purple cross”")
        # nor can the page's file route hand out bob's stored PNG by its path
        (stored,) = (keyed_server.home / "images").rglob(f"{bob_image['id']}.png")
        leaked = page.request.get(f"{keyed_server.url}/gradio_api/file={stored}")
        assert leaked.status == 403, leaked.status

        # 6. sign out: back to the sign-in page, and the page is closed to this browser again
        page.locator("#sign-out").click()
        expect(page).to_have_url(re.compile(r"/login$"))
        assert context.cookies() == []
        page.goto(keyed_server.url + "/")
        expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    finally:
        context.close()
