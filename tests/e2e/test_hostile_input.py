"""Hostile input against the real server (tiny SD on CPU, keys made before it starts; raw
sockets where a client library would refuse to send the bytes): unpaired surrogates, NUL and
control characters in every text field of a job (the fields are read from JobCreate, so new
ones are covered), of a key and of a dataset (captions, file names, zip member names); odd bytes
in every header the server reads; oversized query strings and paths. Each gets a 4xx (naming
the field where there is one), never a 5xx; nothing is stored for it (no job, image, dataset,
key or file); and the server answers as before afterwards."""

from __future__ import annotations

import io
import json
import socket
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from easel.api.schemas import JobCreate, KeyCreate, LoraUse
from easel.config import Settings
from easel.jobs.db import Database
from easel.jobs.keys import KeyStore
from tests.e2e.helpers import submit, wait_final
from tests.e2e.server import Server, prepare_home

pytestmark = pytest.mark.slow

# JSON string tokens the server must refuse in any text field: a lone high and a lone low
# surrogate, a reversed pair, NUL, ESC, DEL and BEL
BAD_TEXT = (
    b'"a \\ud800 b"',
    b'"\\udfff"',
    b'"x\\udc00\\ud800"',
    b'"nul \\u0000 byte"',
    b'"esc \\u001b[31m red"',
    b'"del \\u007f"',
    b'"bell \\u0007"',
)
# header values with bytes no header should hold, or more of them than any needs
ODD_BYTES = (
    b"\xb2",
    b"\xff\xfe\xfd",
    b"\xc3\xa9t\xc3\xa9",
    b"\xed\xa0\x80",  # a surrogate, UTF-8 encoded
    b"\x1b[31m",
    b"\x7f",
    b"a\x00b",
    b"0" * 5000,
    b"9" * 5000,
    b"a" * 7000,
)


@dataclass
class Hostile:
    server: Server
    admin: httpx.Client
    key: str  # the admin key's secret
    job_id: str  # a finished job (its events end after the backlog)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, tiny_sd_path: Path) -> Iterator[Hostile]:
    home = tmp_path_factory.mktemp("hostile-input") / "easel-home"
    prepare_home(home, tiny_sd_path)
    db = Database(Settings(home=home).db_path)
    _, secret = KeyStore(db).create("root", scopes=("admin",))
    db.close()
    server = Server(home).start()
    headers = {"Authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=server.url + "/api/v1", headers=headers, timeout=30) as admin:
        job = submit(admin, width=32, height=32, num_inference_steps=1)
        wait_final(admin, job["id"])
        yield Hostile(server, admin, secret, job["id"])
    server.kill()


@pytest.fixture
def unchanged(hostile: Hostile) -> Iterator[None]:
    """The test stores nothing: the same jobs, images, datasets, keys and files after it, and
    the server still answers a plain request."""
    before, logged = snapshot(hostile), hostile.server.log.stat().st_size
    yield
    assert snapshot(hostile) == before
    assert hostile.admin.get("/jobs").status_code == 200
    assert hostile.admin.get("/health").json()["status"] == "ok"
    with hostile.server.log.open("rb") as log:
        log.seek(logged)
        written = log.read().decode(errors="replace")
    assert "Traceback" not in written, written[-3000:]


def snapshot(hostile: Hostile) -> dict[str, Any]:
    admin, home = hostile.admin, hostile.server.home
    listed = {
        name: sorted(item.get("id") or item["name"] for item in admin.get(path).json())
        for name, path in (
            ("jobs", "/jobs?limit=500"),
            ("images", "/images?limit=500"),
            ("datasets", "/datasets"),
            ("keys", "/keys?revoked=true"),
        )
    }
    files = sorted(
        str(p.relative_to(home))
        for folder in ("images", "datasets", "loras")
        if (home / folder).exists()
        for p in (home / folder).rglob("*")
    )
    return {**listed, "files": files}


# --- raw HTTP -----------------------------------------------------------------------------------


def raw(
    server: Server,
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
    *,
    host: bytes | None = None,
    length: bool = True,
) -> tuple[int, bytes]:
    """Send exactly these bytes (HTTP/1.1, then close) and return (status, the whole answer);
    status 0 when the server closed without one."""
    lines = [method.encode() + b" " + target + b" HTTP/1.1"]
    lines.append(b"Host: " + (host if host is not None else f"127.0.0.1:{server.port}".encode()))
    lines += [name + b": " + value for name, value in headers]
    if length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, answer


def error_field(answer: bytes) -> str | None:
    body = answer.split(b"\r\n\r\n", 1)[1]
    return json.loads(body)["error"]["field"]


def bearer(hostile: Hostile) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {hostile.key}".encode())]


def post_json(hostile: Hostile, path: str, body: bytes) -> tuple[int, bytes]:
    headers = [*bearer(hostile), (b"Content-Type", b"application/json")]
    return raw(hostile.server, "POST", path.encode(), headers, body)


def text_fields(model: type[Any]) -> list[str]:
    """The model's fields that take text (a string, or a string or null), by its schema."""
    properties = model.model_json_schema()["properties"]
    return [
        name
        for name, schema in properties.items()
        if any(branch.get("type") == "string" for branch in schema.get("anyOf", [schema]))
    ]


def multipart(files: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """(Content-Type, body) of a form with these (raw file name, bytes) as ``files``: the name
    as it is (httpx would percent-encode control characters)."""
    boundary = b"hostile-boundary-36"
    parts = [
        b'--%s\r\nContent-Disposition: form-data; name="files"; filename="%s"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n%s\r\n" % (boundary, name, data)
        for name, data in files
    ]
    return b"multipart/form-data; boundary=" + boundary, b"".join(parts) + b"--%s--\r\n" % boundary


# --- text in JSON bodies ------------------------------------------------------------------------


def test_job_text_fields_refuse_surrogates_and_control_characters(
    hostile: Hostile, unchanged: None
) -> None:
    fields = text_fields(JobCreate)
    assert {"prompt", "negative_prompt", "model", "scheduler", "image", "trigger"} <= set(fields)
    for field in fields:
        for bad in BAD_TEXT:
            body = b'{"prompt": "a red circle", "%s": %s}' % (field.encode(), bad)
            if field == "prompt":
                body = b'{"prompt": %s}' % bad
            status, answer = post_json(hostile, "/api/v1/jobs", body)
            assert status == 422 and error_field(answer) == field, (field, bad, answer[-400:])
    for bad in BAD_TEXT:  # a key of an object
        body = b'{"prompt": "x", "task": "outpaint", "image": "i", "outpaint": {%s: 8}}' % bad
        status, answer = post_json(hostile, "/api/v1/jobs", body)
        assert status == 422 and error_field(answer) == "outpaint", answer[-400:]
    for field in text_fields(LoraUse):  # inside a list of objects
        for bad in BAD_TEXT:
            body = b'{"prompt": "x", "loras": [{"%s": %s}]}' % (field.encode(), bad)
            status, answer = post_json(hostile, "/api/v1/jobs", body)
            assert status == 422 and error_field(answer) == f"loras[0].{field}", answer[-400:]


def test_key_text_fields_refuse_surrogates_and_control_characters(
    hostile: Hostile, unchanged: None
) -> None:
    assert text_fields(KeyCreate) == ["name"]
    for bad in BAD_TEXT:
        status, answer = post_json(hostile, "/api/v1/keys", b'{"name": %s}' % bad)
        assert status == 422 and error_field(answer) == "name", (bad, answer[-400:])
        status, answer = post_json(hostile, "/api/v1/keys", b'{"name": "k", "scopes": [%s]}' % bad)
        assert status == 422 and error_field(answer).startswith("scopes"), answer[-400:]
    for name in (b"%00", b"%ED%A0%80", b"a%0Ab", b"%1B", b"x" * 300):
        status, _ = raw(hostile.server, "DELETE", b"/api/v1/keys/" + name, bearer(hostile))
        assert status == 404, name


def test_a_surrogate_prompt_is_refused_and_the_job_list_still_answers(
    hostile: Hostile, unchanged: None
) -> None:
    """Issue 36's first finding: it was stored, and GET /api/v1/jobs then answered 500."""
    for field in ("prompt", "negative_prompt"):
        body = b'{"prompt": "ok", "%s": "a \\ud800 circle"}' % field.encode()
        status, answer = post_json(hostile, "/api/v1/jobs", body)
        assert status == 422 and error_field(answer) == field
        assert b"U+D800" in answer
        assert hostile.admin.get("/jobs").status_code == 200


# --- datasets -----------------------------------------------------------------------------------


def png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, format="PNG")
    return out.getvalue()


def zip_with_name(raw_name: bytes, data: bytes, others: dict[str, bytes]) -> bytes:
    """A zip whose one member's name is ``raw_name`` as it is, flagged UTF-8 (zipfile would
    encode a str): written under a placeholder of the same length, then patched."""
    placeholder = "~" * len(raw_name)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, content in others.items():
            archive.writestr(name, content)
        info = zipfile.ZipInfo(placeholder)
        info.flag_bits |= 0x800
        archive.writestr(info, data)
    return out.getvalue().replace(placeholder.encode(), raw_name)


def upload(hostile: Hostile, files: list[tuple[str, bytes]]) -> httpx.Response:
    return hostile.admin.post("/datasets", files=[("files", (n, d)) for n, d in files])


def test_dataset_text_refuses_surrogates_and_control_characters(
    hostile: Hostile, unchanged: None
) -> None:
    images = [("a.png", png("red")), ("b.png", png("blue"))]
    cases: list[tuple[str, httpx.Response]] = []
    for caption in (b"a \x00 b", b"esc \x1b[0m", b"\x7f", b"bad utf-8 \xed\xa0\x80"):
        files = [*images, ("a.txt", caption), ("b.txt", b"fine")]
        cases.append((f"caption {caption!r}", upload(hostile, files)))
    for bad in BAD_TEXT:  # JSON escapes in metadata.jsonl: the text and the file name
        text = b'{"file_name": "a.png", "text": %s}\n{"file_name": "b.png", "text": "ok"}\n' % bad
        cases.append(
            (f"metadata text {bad!r}", upload(hostile, [*images, ("metadata.jsonl", text)]))
        )
        name = b'{"file_name": %s, "text": "t"}\n' % bad
        cases.append(
            (f"metadata name {bad!r}", upload(hostile, [*images, ("metadata.jsonl", name)]))
        )
    others = {"a.png": png("red"), "a.txt": b"red", "b.txt": b"blue"}
    for raw_name in (b"\xed\xa0\x80.png", b"b\x01.png", b"\xff\xfe.png"):
        archive = zip_with_name(raw_name, png("blue"), others)
        response = hostile.admin.post("/datasets", files={"file": ("set.zip", archive)})
        cases.append((f"zip member {raw_name!r}", response))
    for what, response in cases:
        assert response.status_code == 422, (what, response.text)
        assert response.json()["error"]["field"] == "dataset", (what, response.text)
    for raw_name in (b"a\x00.png", b"a\x1b.png", b"\xed\xa0\x80.png", b"\xff.png"):
        content_type, body = multipart([(raw_name, png("red")), (b"b.png", png("blue"))])
        headers = [*bearer(hostile), (b"Content-Type", content_type)]
        status, answer = raw(hostile.server, "POST", b"/api/v1/datasets", headers, body)
        assert 400 <= status < 500, (raw_name, answer[-400:])
        if status == 422:
            assert error_field(answer) == "dataset"


# --- headers ------------------------------------------------------------------------------------


def test_odd_bytes_in_every_header_the_server_reads(hostile: Hostile, unchanged: None) -> None:
    server, events = hostile.server, f"/api/v1/jobs/{hostile.job_id}/events".encode()
    job = b'{"prompt": "from a hostile header"}'
    json_type = (b"Content-Type", b"application/json")
    statuses: dict[tuple[str, bytes], int] = {}
    for value in ODD_BYTES:
        tries = {
            # a key that is no key: 401, however it is spelled
            "authorization": raw(server, "GET", b"/api/v1/jobs", [(b"Authorization", value)]),
            "authorization-bearer": raw(
                server, "GET", b"/api/v1/jobs", [(b"Authorization", b"Bearer " + value)]
            ),
            "authorization-basic": raw(
                server, "GET", b"/api/v1/jobs", [(b"Authorization", b"Basic " + value)]
            ),
            "cookie": raw(server, "GET", b"/api/v1/jobs", [(b"Cookie", b"easel_session=" + value)]),
            "cookie-post": raw(
                server, "POST", b"/api/v1/jobs", [(b"Cookie", value), json_type], job
            ),
            "last-event-id": raw(
                server, "GET", events, [*bearer(hostile), (b"Last-Event-ID", value)]
            ),
            "host": raw(server, "GET", b"/api/v1/jobs", bearer(hostile), host=value),
            "origin": raw(
                server,
                "POST",
                b"/api/v1/jobs",
                [*bearer(hostile), (b"Origin", value), json_type],
                job,
            ),
            "content-type": raw(
                server, "POST", b"/api/v1/jobs", [*bearer(hostile), (b"Content-Type", value)], job
            ),
            "content-length": raw(
                server,
                "POST",
                b"/api/v1/jobs",
                [*bearer(hostile), json_type, (b"Content-Length", value)],
                job,
                length=False,
            ),
        }
        for header, (status, answer) in tries.items():
            statuses[(header, value[:8])] = status
            assert 400 <= status < 500, (header, value[:20], answer[:600])
    # what each header gets, where the server (not the HTTP parser) reads it
    for value in (b"\xb2", b"0" * 5000, b"\xc3\xa9t\xc3\xa9"):
        assert statuses[("authorization-bearer", value[:8])] == 401
        assert statuses[("host", value[:8])] == 400
        assert statuses[("origin", value[:8])] == 403
        assert statuses[("last-event-id", value[:8])] == 422


def test_last_event_id_must_be_an_event_id(hostile: Hostile, unchanged: None) -> None:
    """Issue 36: "²" (which str.isdigit() accepts) and 5,000 zeros answered 500."""
    path = f"/jobs/{hostile.job_id}/events"
    for value in ("²", "0" * 5000, "-1", "1e3", "9" * 20, "١٢"):
        response = hostile.admin.get(path, headers={"Last-Event-ID": value.encode()})
        assert response.status_code == 422, (value[:10], response.text[:300])
        assert response.json()["error"]["field"] == "last_event_id"
    events = hostile.admin.get(path, headers={"Last-Event-ID": "0"})
    assert events.status_code == 200 and "event: succeeded" in events.text


# --- query strings and paths --------------------------------------------------------------------


def test_oversized_query_strings_and_paths(hostile: Hostile, unchanged: None) -> None:
    server = hostile.server
    long_q = hostile.admin.get("/images", params={"q": "x" * 60_000})
    assert long_q.status_code == 422 and long_q.json()["error"]["field"] == "q"
    for q in ("%00", "a%1Bb", "%7F"):
        status, answer = raw(server, "GET", b"/api/v1/images?q=" + q.encode(), bearer(hostile))
        assert status == 422 and error_field(answer) == "q", answer[-300:]
    # a surrogate cannot arrive in a URL: its UTF-8 bytes decode to U+FFFD
    status, _ = raw(server, "GET", b"/api/v1/images?q=%ED%A0%80", bearer(hostile))
    assert status == 200
    many = b"&".join([b"limit=1"] * 10_000)
    for target in (
        b"/api/v1/jobs?" + many,
        b"/api/v1/images?" + b"&".join([b"q=a"] * 10_000),
        b"/api/v1/jobs?status=" + b"s" * 60_000,
        b"/api/v1/jobs/" + b"a" * 100_000,
        b"/api/v1/images/" + b"%00" * 30_000,
        b"/api/v1/loras/" + b"%ED%A0%80" * 10_000,
        b"/" + b"x" * 100_000,
    ):
        status, answer = raw(server, "GET", target, bearer(hostile))
        assert 400 <= status < 500 or status == 200, (target[:40], answer[:300])
    for name in (b"%00", b"a%0A", b"..%2F..%2Fetc%2Fpasswd", b"%ED%A0%80"):
        status, _ = raw(server, "GET", b"/api/v1/loras/" + name, bearer(hostile))
        assert status == 404, name
