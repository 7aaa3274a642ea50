"""Keys over HTTP (TestClient, stand-in generator, real SQLite): every route refuses a request
without a key, with a wrong key, for another key's object and without the scope it needs, and
does nothing then; Basic auth and revocation; rate and job quotas under a burst of threads; owners
taking turns in the queue; Host, Origin, cookie and CORS rules; model paths only for admins; the
keys API and `easel keys` / `easel serve`'s refusal to leave loopback without keys."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from starlette.routing import Mount

from easel.api.app import create_app
from easel.api.errors import OPENAI_CODES
from easel.api.server import check_binding
from easel.cli import main
from easel.config import Settings
from easel.domain import EaselError, LoraRecord
from easel.jobs.keys import KeyStore
from easel.jobs.standin import StandInGenerator
from easel.models.loras import LoraCatalog
from easel.services import Services, build_services
from tests.fixtures_models import TINY_HUB_ID
from tests.test_datasets import CAPTIONED, png, zip_bytes

JOB = {"prompt": "a red circle", "num_inference_steps": 1, "width": 32, "height": 32}
PATH_JOB = {**JOB, "width": 64, "height": 64}  # a path takes the family's limits (64 px and up)
Response = Any  # what TestClient answers (an httpx2.Response)
WRONG = "easel_" + "x" * 43  # shaped like a secret, never made


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@dataclass
class Server:
    """An app over unstarted services (no worker runs, so nothing queued moves unless a test
    says so) with keys: alice and bob (generate, train), gen (generate), train (train), root
    (admin), victim (generate; for revoking)."""

    services: Services
    client: TestClient
    secrets: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)

    def headers(self, name: str) -> dict[str, str]:
        return bearer(self.secrets[name])

    def add_key(self, name: str, *scopes: str, **limits: Any) -> str:
        record, secret = self.services.create_key(name, scopes=scopes, **limits)
        self.secrets[name], self.ids[name] = secret, record.id
        return secret


def make_server(settings: Settings, *, keys: bool = True) -> Server:
    services = build_services(settings, generator=StandInGenerator())
    server = Server(services, TestClient(create_app(services)))
    if keys:
        server.add_key("alice", "generate", "train")
        server.add_key("bob", "generate", "train")
        server.add_key("gen", "generate")
        server.add_key("train", "train")
        server.add_key("root", "admin")
        server.add_key("victim", "generate")
    return server


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    server = make_server(settings)
    yield server
    server.client.close()
    server.services.stop()


def snapshot(services: Services) -> tuple[Any, ...]:
    """Everything a request could change: rows of every owned table, job states, keys,
    sessions, events, and the files under EASEL_HOME."""
    q = services.db.query
    home = services.settings.home
    files = sorted(
        (str(p.relative_to(home)), p.stat().st_size)
        for p in home.rglob("*")
        if p.is_file() and not p.name.startswith(("easel.db", "easel.lock"))
    )
    return (
        [tuple(r) for r in q("SELECT id, status, attempts, owner FROM jobs ORDER BY id")],
        [tuple(r) for r in q("SELECT id, owner FROM images ORDER BY id")],
        [tuple(r) for r in q("SELECT id, owner FROM datasets ORDER BY id")],
        [tuple(r) for r in q("SELECT id, revoked_at FROM keys ORDER BY id")],
        q("SELECT COUNT(*) FROM sessions")[0][0],
        q("SELECT COUNT(*) FROM events")[0][0],
        files,
    )


# --- the route matrix ---------------------------------------------------------------------------


@dataclass
class World:
    """alice's things, made over HTTP with her key (plus a LoRA she trained)."""

    server: Server
    upload: str  # an uploaded image
    done_job: str  # a finished job (its events stream ends)
    image: str  # done_job's image
    queued_job: str  # a job that stays queued
    dataset: str
    lora: str
    victim: str = "victim"  # a key's name (for the keys routes)
    model: str = "tiny"  # a catalog model (for /v1/models/{model})


@pytest.fixture
def world(server: Server) -> World:
    client, alice = server.client, server.headers("alice")
    upload = client.post("/api/v1/images", headers=alice, files={"file": ("a.png", png())})
    assert upload.status_code == 201, upload.text
    done = client.post("/api/v1/jobs", headers=alice, json=JOB).json()
    assert server.services.workers[0].run_once()  # runs that job, here, now
    finished = client.get(f"/api/v1/jobs/{done['id']}", headers=alice).json()
    assert finished["status"] == "succeeded", finished
    queued = client.post("/api/v1/jobs", headers=alice, json=JOB)
    assert queued.status_code == 202, queued.text
    dataset = client.post(
        "/api/v1/datasets", headers=alice, files={"file": ("d.zip", zip_bytes(CAPTIONED))}
    )
    assert dataset.status_code == 201, dataset.text
    loras = LoraCatalog(server.services.settings)
    loras.folder.mkdir(parents=True, exist_ok=True)
    loras.path_for("alices").write_bytes(b"stand-in weights (never read)")
    loras.save_record(
        LoraRecord(id="alices", path="", family="sd", owner=server.ids["alice"], base_model="tiny")
    )
    return World(
        server,
        upload=upload.json()["id"],
        done_job=done["id"],
        image=finished["images"][0]["id"],
        queued_job=queued.json()["id"],
        dataset=dataset.json()["id"],
        lora="alices",
    )


Kwargs = Callable[[World], dict[str, Any]]


def nothing(world: World) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Call:
    """How to call a route as alice (or root for admin routes), and what it answers then.

    ``path``: path parameter -> the World attribute (alice's object) that fills it.
    ``scope``: the scope the route needs beyond a valid key (None: any key).
    ``others``: how another key's objects show: "path" (404, as a missing id), "list" (none of
    alice's ids in the answer), "body" (requests naming alice's objects in the body answer as
    if they did not exist), None (the route has no owned objects).
    """

    ok: int
    path: dict[str, str] = field(default_factory=dict)
    kwargs: Kwargs = nothing
    scope: str | None = None
    others: str | None = None


def job_refs(world: World) -> list[tuple[dict[str, Any], str, str, dict[str, Any]]]:
    """Job bodies that name alice's upload, LoRA and dataset: (body, her id, an id that names
    nothing, the body with that id instead)."""
    refs = []
    for real, fake, make in (
        (world.upload, FAKE_ID, lambda ref: {**JOB, "task": "img2img", "image": ref}),
        (world.lora, "nolora", lambda ref: {**JOB, "loras": [{"id": ref}]}),
        (
            world.dataset,
            FAKE_ID,
            lambda ref: {"task": "train_lora", "dataset": ref, "name": "x", "trigger": "zq"},
        ),
    ):
        refs.append((make(real), real, fake, make(fake)))
    return refs


ROUTES: dict[tuple[str, str], Call] = {
    ("GET", "/openapi.json"): Call(200),
    ("GET", "/docs"): Call(200),
    ("GET", "/docs/oauth2-redirect"): Call(200),
    ("GET", "/redoc"): Call(200),
    ("GET", "/api/v1/queue"): Call(200, others="list"),
    ("GET", "/api/v1/models"): Call(200),
    ("POST", "/api/v1/jobs"): Call(
        202, kwargs=lambda w: {"json": JOB}, scope="generate", others="body"
    ),
    ("GET", "/api/v1/jobs"): Call(200, others="list"),
    ("GET", "/api/v1/jobs/{job_id}"): Call(200, {"job_id": "queued_job"}, others="path"),
    ("DELETE", "/api/v1/jobs/{job_id}"): Call(200, {"job_id": "queued_job"}, others="path"),
    ("GET", "/api/v1/jobs/{job_id}/events"): Call(200, {"job_id": "done_job"}, others="path"),
    ("GET", "/api/v1/images"): Call(200, others="list"),
    ("POST", "/api/v1/images"): Call(
        201, kwargs=lambda w: {"files": {"file": ("b.png", png())}}, scope="generate"
    ),
    ("GET", "/api/v1/images/{image_id}"): Call(200, {"image_id": "image"}, others="path"),
    ("POST", "/api/v1/datasets"): Call(
        201, kwargs=lambda w: {"files": {"file": ("e.zip", zip_bytes(CAPTIONED))}}, scope="train"
    ),
    ("GET", "/api/v1/datasets"): Call(200, others="list"),
    ("GET", "/api/v1/datasets/{dataset_id}"): Call(200, {"dataset_id": "dataset"}, others="path"),
    ("GET", "/api/v1/loras"): Call(200, others="list"),
    ("GET", "/api/v1/loras/{name}"): Call(200, {"name": "lora"}, others="path"),
    ("GET", "/api/v1/keys"): Call(200, scope="admin"),
    ("POST", "/api/v1/keys"): Call(201, kwargs=lambda w: {"json": {"name": "made"}}, scope="admin"),
    ("DELETE", "/api/v1/keys/{name}"): Call(200, {"name": "victim"}, scope="admin"),
    ("GET", "/api/v1/webhooks/secret"): Call(200),  # the asking key's own
    # every worker, for any key; the id of a running job only for its owner (and admins)
    ("GET", "/api/v1/workers"): Call(200, others="list"),
    ("GET", "/metrics"): Call(200, scope="admin"),  # every key's jobs counted
    # AUTOMATIC1111's API (easel.api.a1111): no worker runs here, so a generation is called
    # with a size the services refuse after the scope check (422 proves the route is reached;
    # tests/e2e/test_a1111.py runs real ones)
    ("GET", "/sdapi/v1/options"): Call(200),
    ("POST", "/sdapi/v1/options"): Call(
        200, kwargs=lambda w: {"json": {"sd_model_checkpoint": "tiny", "sd_vae": "Automatic"}}
    ),
    ("GET", "/sdapi/v1/sd-models"): Call(200),
    ("GET", "/sdapi/v1/samplers"): Call(200),
    ("GET", "/sdapi/v1/schedulers"): Call(200),
    ("GET", "/sdapi/v1/upscalers"): Call(200),
    ("GET", "/sdapi/v1/latent-upscale-modes"): Call(200),
    ("GET", "/sdapi/v1/sd-vae"): Call(200),
    ("POST", "/sdapi/v1/txt2img"): Call(
        422, kwargs=lambda w: {"json": {"prompt": "a", "width": 8}}, scope="generate"
    ),
    ("POST", "/sdapi/v1/img2img"): Call(
        422,
        kwargs=lambda w: {"json": {"prompt": "a", "init_images": [b64png()], "width": 8}},
        scope="generate",
    ),
    ("GET", "/sdapi/v1/progress"): Call(200, others="list"),  # the key's jobs only
    ("POST", "/sdapi/v1/interrupt"): Call(200),  # the key's running jobs only
    ("POST", "/sdapi/v1/skip"): Call(200),
    ("POST", "/sdapi/v1/png-info"): Call(200, kwargs=lambda w: {"json": {"image": b64png()}}),
    # OpenAI's Images API (easel.api.openai): a generation waits for its job, so it is called
    # with a size the services refuse after the scope check (400: the route is reached;
    # tests/e2e/test_openai.py runs real ones with the openai client)
    ("POST", "/v1/images/generations"): Call(
        400, kwargs=lambda w: {"json": {"prompt": "a", "size": "8x8"}}, scope="generate"
    ),
    ("POST", "/v1/images/edits"): Call(
        400,
        kwargs=lambda w: {
            "files": {"image": ("a.png", png())},
            "data": {"prompt": "a", "size": "8x8"},
        },
        scope="generate",
    ),
    ("POST", "/v1/images/variations"): Call(
        400,
        kwargs=lambda w: {"files": {"image": ("a.png", png())}, "data": {"size": "8x8"}},
        scope="generate",
    ),
    ("GET", "/v1/models"): Call(200),
    ("GET", "/v1/models/{model}"): Call(200, {"model": "model"}),
}
# open to everyone; checked in test_public_routes_need_no_key
PUBLIC = {("GET", "/api/v1/health"), ("GET", "/login"), ("POST", "/login"), ("POST", "/logout")}
# a key that lacks the scope (every key has one scope at least)
LACKS = {"generate": "train", "train": "gen", "admin": "alice"}
# ids like alice's that name nothing
FAKES = {"lora": "nolora"}
FAKE_ID = "0" * 32


def b64png() -> str:
    return base64.b64encode(png()).decode()


def error_type(response: Response) -> str:
    """An error's type in its protocol's shape (``easel.api.errors.error_body``): Easel's
    ``error.type``; A1111's ``error``, a string; OpenAI's ``error.code``, as
    ``OPENAI_CODES`` names Easel's types."""
    error = response.json()["error"]
    if isinstance(error, str):
        return error
    if "code" in error:
        return {code: kind for kind, code in OPENAI_CODES.items()}.get(error["code"], "?")
    return str(error["type"])


def app_routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, HEAD aside (a GET route answers it)."""
    found = []
    for route in iter_route_contexts(client.app.routes):  # type: ignore[attr-defined]
        if isinstance(route.original_route, Mount) or not route.methods:
            found.append(("*", str(route.path)))  # a mount (e.g. the web UI): needs a row too
            continue
        found += [(m, str(route.path)) for m in sorted(route.methods) if m != "HEAD"]
    return found


def url(world: World, path: str, call: Call, *, fake: bool = False) -> str:
    """The route's path with alice's objects (``fake``: ids that name nothing) filled in."""
    values = {
        name: FAKES.get(attr, FAKE_ID) if fake else getattr(world, attr)
        for name, attr in call.path.items()
    }
    return path.format(**values)


def same_as_missing(a: Response, b: Response, real: str, fake: str) -> None:
    """``a`` (another key's object ``real``) answers exactly as ``b`` (a missing ``fake``)."""
    assert (a.status_code, a.headers.get("content-type")) == (
        b.status_code,
        b.headers.get("content-type"),
    ), (a.text, b.text)
    assert a.text.replace(real, "ID") == b.text.replace(fake, "ID")


def test_every_route_refuses_strangers_and_does_nothing(world: World) -> None:
    routes = app_routes(world.server.client)
    unknown = sorted(set(routes) - set(ROUTES) - PUBLIC)
    assert not unknown, f"routes with no row in ROUTES (how to call them) nor in PUBLIC: {unknown}"
    assert not set(ROUTES) - set(routes), "ROUTES names routes the app no longer has"
    checked = [(m, p) for m, p in routes if (m, p) not in PUBLIC]
    for method, path in checked:
        check_route(world, method, path, ROUTES[method, path])
    assert len(checked) == len(ROUTES) >= 21


def check_route(world: World, method: str, path: str, call: Call) -> None:
    server = world.server
    label = f"{method} {path}"

    def send(headers: dict[str, str], *, fake: bool = False, **kwargs: Any) -> Response:
        target = url(world, path, call, fake=fake)
        return server.client.request(
            method, target, headers=headers, **(kwargs or call.kwargs(world))
        )

    cases: list[tuple[str, dict[str, str], int]] = [
        ("no key", {}, 401),
        ("wrong key", bearer(WRONG), 401),
        ("malformed Authorization", {"Authorization": "Token abc"}, 401),
    ]
    if call.scope is not None:
        cases.append((f"lacks {call.scope}", server.headers(LACKS[call.scope]), 403))
    for name, headers, status in cases:
        before = snapshot(server.services)
        response = send(headers)
        assert response.status_code == status, (label, name, response.text)
        assert error_type(response) == {401: "Unauthorized", 403: "Forbidden"}[status], label
        if status == 401:
            assert response.headers["www-authenticate"].startswith("Bearer"), label
        assert snapshot(server.services) == before, f"{label} ({name}) changed something"

    bob = server.headers("bob")
    if call.others == "path":  # as if alice's object did not exist
        before = snapshot(server.services)
        theirs, missing = send(bob), send(bob, fake=True)
        assert theirs.status_code == 404, (label, theirs.text)
        (attr,) = call.path.values()
        same_as_missing(theirs, missing, getattr(world, attr), FAKES.get(attr, FAKE_ID))
        assert snapshot(server.services) == before, f"{label} (bob) changed something"
    elif call.others == "list":  # none of alice's things
        listed = send(bob)
        assert listed.status_code == 200, label
        for attr in ("upload", "done_job", "image", "queued_job", "dataset"):
            assert getattr(world, attr) not in listed.text, (label, attr)
        assert f'"{world.lora}"' not in listed.text, label
    elif call.others == "body":  # naming alice's things answers as naming nothing
        for body, real, fake, faked in job_refs(world):
            before = snapshot(server.services)
            theirs, missing = send(bob, json=body), send(bob, json=faked)
            assert 400 <= theirs.status_code < 500, (label, body, theirs.text)
            same_as_missing(theirs, missing, real, fake)
            assert snapshot(server.services) == before, f"{label} {body} changed something"

    # the call as its owner (root for admin routes) works: the row in ROUTES is right
    done = send(server.headers("root" if call.scope == "admin" else "alice"))
    assert done.status_code == call.ok, (label, done.text)


def test_public_routes_need_no_key(server: Server) -> None:
    client = server.client
    assert client.get("/api/v1/health").json()["status"] == "ok"
    assert client.get("/login").status_code == 200
    before = snapshot(server.services)
    refused = client.post("/login", data={"key": WRONG}, follow_redirects=False)
    assert refused.status_code == 401 and "set-cookie" not in refused.headers
    assert client.post("/logout", follow_redirects=False).status_code == 303
    assert snapshot(server.services) == before


def test_docs_need_a_key_once_keys_exist(server: Server) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert server.client.get(path).status_code == 401, path
        assert server.client.get(path, headers=server.headers("gen")).status_code == 200, path
    # a browser asking for the page is sent to sign in
    page = server.client.get("/docs", headers={"Accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/docs"


# --- keyless, Basic, revocation -----------------------------------------------------------------


@pytest.fixture
def model_link(tiny_sd_path: Path, tmp_path: Path) -> Path:
    """A path to the tiny SD folder that is not the catalog entry's source (so only a caller
    allowed to name paths can use it)."""
    link = tmp_path / "models" / "sd"
    link.parent.mkdir()
    link.symlink_to(tiny_sd_path, target_is_directory=True)
    return link


def test_keyless_loopback_server_works_then_a_key_closes_it(
    settings: Settings, model_link: Path
) -> None:
    server = make_server(settings, keys=False)
    try:
        client = server.client
        for method, path in ROUTES:  # every read without an id, the keys API included
            if method == "GET" and "{" not in path:
                assert client.get(path).status_code == 200, path
        assert client.get("/api/v1/jobs").json() == []
        job = client.post("/api/v1/jobs", json={**PATH_JOB, "model": str(model_link)})
        assert job.status_code == 202, job.text
        assert client.get("/openapi.json").status_code == 200
        server.add_key("first", "generate")
        refused = client.get("/api/v1/jobs")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Bearer realm="easel"'
        assert client.get("/api/v1/health").status_code == 200
        # the job made before keys existed belongs to nobody: only an admin sees it
        assert client.get("/api/v1/jobs", headers=server.headers("first")).json() == []
        # revoking the last key does not open the server again
        server.services.revoke_key("first")
        assert client.get("/api/v1/jobs").status_code == 401
        assert client.post("/api/v1/jobs", json=JOB).status_code == 401
    finally:
        server.services.stop()


def test_keyless_server_off_loopback_takes_no_model_paths(
    settings: Settings, model_link: Path
) -> None:
    server = make_server(settings.model_copy(update={"host": "0.0.0.0"}), keys=False)
    try:
        refused = server.client.post("/api/v1/jobs", json={**PATH_JOB, "model": str(model_link)})
        assert refused.status_code == 404 and refused.json()["error"]["field"] == "model"
        assert server.client.post("/api/v1/jobs", json=JOB).status_code == 202  # catalog id
    finally:
        server.services.stop()


def test_basic_auth_and_revocation_at_once(server: Server) -> None:
    client, secret = server.client, server.secrets["victim"]
    assert client.get("/api/v1/jobs", auth=("open-webui", secret)).status_code == 200
    assert client.get("/api/v1/jobs", auth=("", secret)).status_code == 200
    assert client.get("/api/v1/jobs", auth=(secret, "")).status_code == 401  # user, no password
    assert client.get("/api/v1/jobs", auth=("x", WRONG)).status_code == 401
    server.services.revoke_key("victim")
    for kwargs in ({"auth": ("x", secret)}, {"headers": bearer(secret)}):
        response = client.get("/api/v1/jobs", **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 401, kwargs
        assert "revoked" in response.json()["error"]["message"]


# --- quotas and fairness ------------------------------------------------------------------------


def burst(count: int, request: Callable[[], Response]) -> list[Response]:
    """``count`` requests from as many threads, released together."""
    gate = threading.Barrier(count)
    results: list[Any] = [RuntimeError("not run")] * count

    def run(i: int) -> None:
        gate.wait()
        try:
            results[i] = request()
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    return results


def test_rate_limit_under_a_burst(server: Server) -> None:
    secret = server.add_key("limited", "generate", rate_per_minute=10)
    responses = burst(30, lambda: server.client.get("/api/v1/jobs", headers=bearer(secret)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 10 + [429] * 20
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"]["type"] == "QuotaExceeded"
            assert response.headers["retry-after"].isdigit()
            assert 1 <= int(response.headers["retry-after"]) <= 61
    # another key is not slowed by it
    assert server.client.get("/api/v1/jobs", headers=server.headers("alice")).status_code == 200


def test_job_quota_under_a_burst(server: Server) -> None:
    secret = server.add_key("three", "generate", max_jobs=3)
    responses = burst(
        12, lambda: server.client.post("/api/v1/jobs", headers=bearer(secret), json=JOB)
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [202] * 3 + [429] * 9, [r.text for r in responses]
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"]["type"] == "QuotaExceeded"
            assert int(response.headers["retry-after"]) >= 1
    mine = server.services.db.query(
        "SELECT COUNT(*) FROM jobs WHERE owner = ?", (server.ids["three"],)
    )
    assert mine[0][0] == 3
    # a key without a quota is not held back by it
    alice = server.headers("alice")
    responses = burst(6, lambda: server.client.post("/api/v1/jobs", headers=alice, json=JOB))
    assert [r.status_code for r in responses] == [202] * 6
    # a finished job frees a place
    job = server.client.get("/api/v1/jobs", headers=bearer(secret)).json()[0]
    server.client.delete(f"/api/v1/jobs/{job['id']}", headers=bearer(secret))
    again = server.client.post("/api/v1/jobs", headers=bearer(secret), json=JOB)
    assert again.status_code == 202, again.text


def test_two_keys_take_turns(server: Server) -> None:
    client, services = server.client, server.services
    alice, bob = server.headers("alice"), server.headers("bob")
    hers = [client.post("/api/v1/jobs", headers=alice, json=JOB).json()["id"] for _ in range(20)]
    his = client.post("/api/v1/jobs", headers=bob, json=JOB).json()["id"]
    assert client.get(f"/api/v1/jobs/{his}", headers=bob).json()["position"] == 2
    assert client.get(f"/api/v1/jobs/{hers[1]}", headers=alice).json()["position"] == 3
    assert client.get(f"/api/v1/jobs/{hers[-1]}", headers=alice).json()["position"] == 21
    # and so they start, with the workers running
    services.start()
    deadline = time.monotonic() + 30
    while services.queue.summary().counts.get("succeeded", 0) < 21:
        assert time.monotonic() < deadline, services.queue.summary()
        time.sleep(0.02)
    rows = services.db.query("SELECT id FROM jobs ORDER BY started_at, seq")
    order = [r[0] for r in rows]
    assert len(order) == 21 and order[:3] == [hers[0], his, hers[1]], order


# --- hosts, origins, cookies, CORS --------------------------------------------------------------


def test_rebinding_host_refused(server: Server) -> None:
    before = snapshot(server.services)
    evil = {**server.headers("alice"), "Host": "evil.example"}
    for method, path, kwargs in (
        ("GET", "/api/v1/jobs", {}),
        ("POST", "/api/v1/jobs", {"json": JOB}),
        ("GET", "/api/v1/health", {}),
        ("POST", "/login", {"data": {"key": server.secrets["alice"]}}),
    ):
        response = server.client.request(method, path, headers=evil, **kwargs)
        assert response.status_code == 400, (method, path, response.text)
        assert response.json()["error"]["type"] == "InvalidHost"
    assert snapshot(server.services) == before
    # the names it does serve
    for host in ("testserver", "localhost:7860", "127.0.0.1", "[::1]:7860"):
        ok = server.client.get("/api/v1/jobs", headers={**server.headers("alice"), "Host": host})
        assert ok.status_code == 200, host


@pytest.mark.parametrize(
    ("bound", "listed", "answered", "refused"),
    [
        ("192.0.2.7", [], ["192.0.2.7:7860", "localhost"], ["evil.example", "easel.example.org"]),
        ("192.0.2.7", ["easel.example.org"], ["192.0.2.7:7860", "easel.example.org"], ["evil.x"]),
        ("0.0.0.0", ["easel.example.org"], ["easel.example.org", "[::1]:7860"], ["0.0.0.0"]),
        ("0.0.0.0", [], ["anything.example", "192.0.2.7"], []),  # any: keys are required then
    ],
)
def test_hosts_answered(
    settings: Settings, bound: str, listed: list[str], answered: list[str], refused: list[str]
) -> None:
    server = make_server(settings.model_copy(update={"host": bound, "allowed_hosts": listed}))
    try:
        alice = server.headers("alice")
        for host in answered:
            response = server.client.get("/api/v1/jobs", headers={**alice, "Host": host})
            assert response.status_code == 200, (host, response.text)
        for host in refused:
            response = server.client.get("/api/v1/jobs", headers={**alice, "Host": host})
            assert response.status_code == 400, host
    finally:
        server.services.stop()


def test_cross_origin_and_cookie_posts(server: Server) -> None:
    before = snapshot(server.services)
    alice = server.headers("alice")
    foreign = server.client.post(
        "/api/v1/jobs", headers={**alice, "Origin": "https://evil.example"}, json=JOB
    )
    assert foreign.status_code == 403 and foreign.json()["error"]["type"] == "CrossOrigin"
    assert snapshot(server.services) == before
    # a key from a script with no Origin (not a browser) is fine
    assert server.client.post("/api/v1/jobs", headers=alice, json=JOB).status_code == 202

    # a browser: no lifespan (the services stay unstarted), its own cookie jar
    browser = TestClient(server.client.app)
    signed_in = browser.post(
        "/login", data={"key": server.secrets["alice"], "next": "/"}, follow_redirects=False
    )
    assert signed_in.status_code == 303
    cookie = signed_in.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert browser.get("/api/v1/jobs").status_code == 200  # a read needs no Origin
    before = snapshot(server.services)
    for headers in ({}, {"Origin": "https://evil.example"}, {"Referer": "https://evil.x/"}):
        refused = browser.post("/api/v1/jobs", headers=headers, json=JOB)
        assert refused.status_code == 403, (headers, refused.text)
    assert snapshot(server.services) == before
    for headers in ({"Origin": "http://testserver"}, {"Referer": "http://testserver/jobs"}):
        accepted = browser.post("/api/v1/jobs", headers=headers, json=JOB)
        assert accepted.status_code == 202, (headers, accepted.text)
    # signed out, the cookie is worth nothing
    browser.post("/logout", headers={"Origin": "http://testserver"})
    assert browser.get("/api/v1/jobs").status_code == 401


def test_cors_closed_by_default(server: Server) -> None:
    origin = {"Origin": "https://app.example"}
    response = server.client.get("/api/v1/jobs", headers={**server.headers("alice"), **origin})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    preflight = server.client.options(
        "/api/v1/jobs", headers={**origin, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_open_for_a_configured_origin(settings: Settings) -> None:
    server = make_server(settings.model_copy(update={"cors_origins": ["https://app.example"]}))
    try:
        alice, origin = server.headers("alice"), {"Origin": "https://app.example"}
        response = server.client.get("/api/v1/jobs", headers={**alice, **origin})
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        preflight = server.client.options(
            "/api/v1/jobs",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        posted = server.client.post("/api/v1/jobs", headers={**alice, **origin}, json=JOB)
        assert posted.status_code == 202, posted.text
        other = {"Origin": "https://evil.example"}
        assert (
            server.client.post("/api/v1/jobs", headers={**alice, **other}, json=JOB).status_code
            == 403
        )
        response = server.client.get("/api/v1/jobs", headers={**alice, **other})
        assert "access-control-allow-origin" not in response.headers
    finally:
        server.services.stop()


# --- model paths --------------------------------------------------------------------------------


def test_model_paths_and_hub_ids_only_for_admins(
    server: Server, model_link: Path, tiny_hub_cache: Path, tmp_path: Path
) -> None:
    client, alice = server.client, server.headers("alice")
    before = snapshot(server.services)
    pairs = [  # (exists on this machine, does not)
        (str(model_link), str(tmp_path / "models" / "nope")),
        (TINY_HUB_ID, "easel-tests/absent"),
        (str(model_link.parent / ".." / "models" / "sd"), "../../models/nope"),
    ]
    for real, fake in pairs:
        there = client.post("/api/v1/jobs", headers=alice, json={**PATH_JOB, "model": real})
        absent = client.post("/api/v1/jobs", headers=alice, json={**PATH_JOB, "model": fake})
        assert there.status_code == absent.status_code == 404, there.text
        assert there.json()["error"]["field"] == "model"
        same_as_missing(there, absent, real, fake)
    assert snapshot(server.services) == before
    root = server.headers("root")
    for model in (str(model_link), TINY_HUB_ID):
        accepted = client.post("/api/v1/jobs", headers=root, json={**PATH_JOB, "model": model})
        assert accepted.status_code == 202, (model, accepted.text)


# --- admin --------------------------------------------------------------------------------------


def test_admin_sees_everyones_work(server: Server) -> None:
    client, root = server.client, server.headers("root")
    made = {}
    for name in ("alice", "bob"):
        headers = server.headers(name)
        made[name] = (
            client.post("/api/v1/jobs", headers=headers, json=JOB).json()["id"],
            client.post("/api/v1/images", headers=headers, files={"file": ("a.png", png())}).json()[
                "id"
            ],
        )
    jobs = {j["id"] for j in client.get("/api/v1/jobs", headers=root).json()}
    images = {i["id"] for i in client.get("/api/v1/images", headers=root).json()}
    for job, image in made.values():
        assert job in jobs and image in images
        assert client.get(f"/api/v1/jobs/{job}", headers=root).status_code == 200
        assert client.get(f"/api/v1/images/{image}", headers=root).status_code == 200
    # each of them sees their own only
    alices = {j["id"] for j in client.get("/api/v1/jobs", headers=server.headers("alice")).json()}
    assert alices == {made["alice"][0]}
    canceled = client.delete(f"/api/v1/jobs/{made['bob'][0]}", headers=root).json()
    assert canceled["status"] == "canceled"


def test_keys_over_http(server: Server) -> None:
    client, root = server.client, server.headers("root")
    created = client.post(
        "/api/v1/keys",
        headers=root,
        json={"name": "carol", "scopes": ["generate"], "max_jobs": 2, "rate_per_minute": 100},
    )
    assert created.status_code == 201, created.text
    carol = created.json()
    assert carol["secret"].startswith("easel_") and carol["scopes"] == ["generate"]
    assert carol["max_jobs"] == 2 and carol["revoked_at"] is None
    listed = client.get("/api/v1/keys", headers=root)
    assert "carol" in [k["name"] for k in listed.json()]
    assert carol["secret"] not in listed.text and "secret" not in listed.json()[0]
    theirs = bearer(carol["secret"])
    assert client.get("/api/v1/jobs", headers=theirs).json() == []
    assert client.post("/api/v1/jobs", headers=theirs, json=JOB).status_code == 202
    for method, path, kwargs in (
        ("GET", "/api/v1/keys", {}),
        ("POST", "/api/v1/keys", {"json": {"name": "dave"}}),
        ("DELETE", "/api/v1/keys/alice", {}),
    ):
        response = client.request(method, path, headers=theirs, **kwargs)
        assert response.status_code == 403, (method, path)
    taken = client.post("/api/v1/keys", headers=root, json={"name": "carol"})
    assert taken.status_code == 409 and taken.json()["error"]["field"] == "name"
    bad = client.post("/api/v1/keys", headers=root, json={"name": "e", "scopes": ["root"]})
    assert bad.status_code == 422 and bad.json()["error"]["field"].startswith("scopes")
    revoked = client.delete("/api/v1/keys/carol", headers=root)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert client.get("/api/v1/jobs", headers=theirs).status_code == 401
    assert client.delete("/api/v1/keys/carol", headers=root).status_code == 404
    names = [k["name"] for k in client.get("/api/v1/keys?revoked=true", headers=root).json()]
    assert "carol" in names


# --- the CLI ------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_keys(easel_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["keys", "list"], capsys)
    assert code == 0 and out.startswith("no keys")
    argv = ["keys", "create", "alice", "--scope", "generate", "--scope", "train"]
    code, out, err = run_cli([*argv, "--max-jobs", "2", "--rate-per-minute", "30"], capsys)
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("easel_") and "\n" not in secret and "shown this once" in err
    code, out, err = run_cli(["keys", "list"], capsys)
    assert "alice" in out and "generate,train" in out and secret not in out
    code, out, err = run_cli(["keys", "list", "--json"], capsys)
    (listed,) = json.loads(out)
    assert listed["name"] == "alice" and listed["max_jobs"] == 2 and secret not in out
    assert "hash" not in listed
    code, out, err = run_cli(["keys", "create", "alice"], capsys)
    assert code == 2 and "exists already" in err
    code, out, err = run_cli(["keys", "create", "bob", "--max-jobs", "0"], capsys)
    assert code == 2 and "max_jobs" in err
    code, out, err = run_cli(["keys", "create", "bob", "--scope", "root"], capsys)
    assert code == 2 and "--scope" in err

    # the server takes the secret the CLI printed
    settings = Settings()
    services = build_services(settings, generator=StandInGenerator())
    try:
        client = TestClient(create_app(services))
        assert client.get("/api/v1/jobs").status_code == 401
        assert client.get("/api/v1/jobs", headers=bearer(secret)).status_code == 200
        code, out, err = run_cli(["keys", "revoke", "alice"], capsys)
        assert code == 0 and "revoked" in out
        assert client.get("/api/v1/jobs", headers=bearer(secret)).status_code == 401
    finally:
        services.stop()
    code, out, err = run_cli(["keys", "revoke", "alice"], capsys)
    assert code == 2 and "no active key" in err
    code, out, err = run_cli(["keys", "list"], capsys)
    assert out.startswith("no active keys")
    code, out, err = run_cli(["keys", "list", "--revoked"], capsys)
    assert "alice" in out


def test_serve_refuses_to_leave_loopback_without_keys(
    easel_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    def no_server(*args: object, **kwargs: object) -> None:
        raise AssertionError("a server was started")

    monkeypatch.setattr(uvicorn.Server, "run", no_server)
    code, out, err = run_cli(["serve", "--host", "0.0.0.0", "--no-ui"], capsys)
    assert code == 2 and "--insecure" in err and "easel keys create" in err
    wide = Settings(host="0.0.0.0")
    with pytest.raises(EaselError, match="--insecure"):
        check_binding(wide, insecure=False)
    check_binding(wide, insecure=True)
    check_binding(Settings(host="127.0.0.1"), insecure=False)
    check_binding(Settings(host="::1"), insecure=False)
    # with a key it goes on
    from easel.jobs.db import Database

    db = Database(wide.db_path)
    try:
        KeyStore(db).create("admin-" + uuid.uuid4().hex[:6], scopes=("admin",))
    finally:
        db.close()
    check_binding(wide, insecure=False)
