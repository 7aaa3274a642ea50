"""`easel mcp`: the official `mcp` client drives `python -m easel mcp` over stdio, once with its
own queue on EASEL_HOME (the tiny SD model, the real engine) and once in front of a real server
with an API key. Every generation is a job in the home's durable queue; bad input is a tool
error naming the field, and the session goes on."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, ImageContent, TextContent
from PIL import Image

from easel.config import Settings
from easel.domain import InvalidParams
from easel.jobs.db import Database
from easel.jobs.keys import KeyStore
from easel.mcp_server import read_image_arg
from tests.e2e.server import Server, prepare_home

TOOLS = {"list_models", "generate_image", "edit_image", "get_job", "get_job_images", "cancel_job"}
LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1 << 20}


def _params(home: Path, **env: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "easel", "mcp"],
        env={
            "EASEL_HOME": str(home),
            "EASEL_DEFAULT_MODEL": "tiny",
            "EASEL_DEVICE": "cpu",
            "OMP_NUM_THREADS": "1",  # 2 cores, shared with the test runner
            "HF_HUB_OFFLINE": "1",
            **env,
        },
    )


def _session(params: StdioServerParameters, body: Callable[[Client], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        async with Client(params, read_timeout_seconds=120) as client:
            return await body(client)

    return anyio.run(run)


def _pngs(result: CallToolResult) -> list[Image.Image]:
    blocks = [b for b in result.content if isinstance(b, ImageContent)]
    assert all(b.mime_type == "image/png" for b in blocks)
    images: list[Image.Image] = [Image.open(io.BytesIO(base64.b64decode(b.data))) for b in blocks]
    assert all(i.format == "PNG" for i in images)
    return images


def _text(result: CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


def _png_bytes(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, tiny_sd_path: Path) -> Path:
    home = tmp_path_factory.mktemp("mcp") / "easel-home"
    prepare_home(home, tiny_sd_path)
    return home


# --- the tools' input images, without a process ---------------------------------------------------


def test_image_arguments_take_ids_base64_data_urls_and_paths(tmp_path: Path) -> None:
    png = _png_bytes((8, 8), (255, 0, 0))
    path = tmp_path / "in.png"
    path.write_bytes(png)
    b64 = base64.b64encode(png).decode()
    image_id = "0123456789abcdef0123456789abcdef"
    assert read_image_arg(image_id, "image", allow_files=True, **LIMITS) == image_id
    assert read_image_arg(b64, "image", allow_files=True, **LIMITS) == png
    url = "data:image/png;base64," + b64
    assert read_image_arg(url, "image", allow_files=True, **LIMITS) == png
    assert read_image_arg(str(path), "image", allow_files=True, **LIMITS) == png


@pytest.mark.parametrize(
    ("value", "allow_files", "says"),
    [
        ("{secret}", True, "not a PNG, JPEG or WebP"),  # a file that is not an image
        ("{png}", False, "file paths are turned off"),
        ("/no/such/file.png", True, "cannot read /no/such/file.png"),
        ("not an image at all!", True, "must be an Easel image id, a file path"),
        ("data:image/png,abc", True, "data URL must be"),
        ("{folder}", True, "is not a regular file"),
    ],
)
def test_bad_image_arguments_name_the_field_and_never_echo_the_bytes(
    tmp_path: Path, value: str, allow_files: bool, says: str
) -> None:
    secret = tmp_path / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nhunter2\n")
    png = tmp_path / "in.png"
    png.write_bytes(_png_bytes((8, 8), (0, 0, 255)))
    value = value.format(secret=secret, png=png, folder=tmp_path)
    with pytest.raises(InvalidParams) as caught:
        read_image_arg(value, "mask", allow_files=allow_files, **LIMITS)
    assert says in caught.value.message
    assert caught.value.field == "mask"
    assert "hunter2" not in caught.value.message


def test_module_loads_neither_torch_nor_mcp() -> None:
    # `easel --help` imports it for every command; `mcp` is an optional extra
    code = (
        "import json, sys; import easel.cli; "
        "print(json.dumps([m for m in ('torch', 'diffusers', 'mcp') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_without_the_mcp_extra_one_line_and_exit_2(easel_home: Path) -> None:
    code = (
        "import sys; sys.modules['mcp'] = None; "  # as if not installed: import mcp fails
        "from easel.cli import main; sys.exit(main(['mcp']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: `easel mcp` needs the MCP extra: pip install 'easel[mcp]'"


# --- its own queue on EASEL_HOME -----------------------------------------------------------------


@pytest.mark.slow
def test_local_session_generates_edits_and_reports_bad_input(home: Path, tmp_path: Path) -> None:
    mask = tmp_path / "mask.png"  # the right half repainted
    picture = Image.new("L", (48, 32), 0)
    picture.paste(255, (24, 0, 48, 32))
    picture.save(mask)

    async def body(client: Client) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS
        # 1. the catalog
        models = await client.call_tool("list_models", {})
        assert not models.is_error
        tiny = next(m for m in models.structured_content["models"] if m["id"] == "tiny")
        assert tiny["available"] and "inpaint" in tiny["tasks"]
        # 2. bad input: a tool error that names the field; the process goes on
        unknown = await client.call_tool("generate_image", {"prompt": "x", "model": "nope"})
        assert unknown.is_error and unknown.structured_content["error"]["field"] == "model"
        assert _text(unknown).startswith("ModelNotFound: ")
        too_big = await client.call_tool(
            "generate_image", {"prompt": "x", "model": "tiny", "width": 4096}
        )
        assert too_big.is_error and too_big.structured_content["error"]["field"] == "width"
        assert "InvalidParams" in _text(too_big) and "128" in _text(too_big)
        wrong_type = await client.call_tool("generate_image", {"prompt": "x", "width": "wide"})
        assert wrong_type.is_error and "width" in _text(wrong_type)
        no_job = await client.call_tool("get_job", {"job_id": "../keys"})
        assert no_job.is_error and no_job.structured_content["error"]["field"] == "job_id"
        # 3. a generation: a PNG of the requested size
        made = await client.call_tool(
            "generate_image",
            {"prompt": "a red circle", "width": 48, "height": 32, "steps": 2, "seed": 7},
        )
        assert not made.is_error, _text(made)
        assert [i.size for i in _pngs(made)] == [(48, 32)]
        job = made.structured_content
        assert job["status"] == "succeeded" and job["images"][0]["seed"] == 7
        seen["txt2img"] = job["job_id"]
        # 4. an inpaint: the input by id, the mask by path; the output has the input's size
        edited = await client.call_tool(
            "edit_image",
            {
                "prompt": "a blue square",
                "image": job["images"][0]["id"],
                "mask": str(mask),
                "steps": 2,
                "seed": 3,
            },
        )
        assert not edited.is_error, _text(edited)
        assert edited.structured_content["task"] == "inpaint"
        assert [i.size for i in _pngs(edited)] == [(48, 32)]
        seen["inpaint"] = edited.structured_content["job_id"]
        wrong_mask = await client.call_tool(
            "edit_image",
            {
                "prompt": "x",
                "image": job["images"][0]["id"],
                "mask": base64.b64encode(_png_bytes((16, 16), (255, 255, 255))).decode(),
            },
        )
        assert wrong_mask.is_error and wrong_mask.structured_content["error"]["field"] == "mask"
        # 5. the job read back: status, then the same pixels
        status = await client.call_tool("get_job", {"job_id": seen["txt2img"]})
        assert status.structured_content["status"] == "succeeded" and not _pngs(status)
        again = await client.call_tool("get_job_images", {"job_id": seen["txt2img"]})
        assert [i.tobytes() for i in _pngs(again)] == [i.tobytes() for i in _pngs(made)]
        return seen

    seen = _session(_params(home), body)
    # the jobs are rows in the home's durable queue, as from the API
    db = Database(Settings(home=home).db_path)
    try:
        rows = {row[0]: row[1] for row in db.query("SELECT id, status FROM jobs")}
        assert {task: rows[job_id] for task, job_id in seen.items()} == {
            "txt2img": "succeeded",
            "inpaint": "succeeded",
        }
    finally:
        db.close()


# --- in front of a running server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[tuple[Server, str, str]]:
    db = Database(Settings(home=home).db_path)
    record, secret = KeyStore(db).create("agent")
    db.close()
    server = Server(home).start()
    yield server, record.id, secret
    server.kill()


@pytest.mark.slow
def test_remote_session_makes_jobs_of_the_servers_key(server: tuple[Server, str, str]) -> None:
    easel, key_id, secret = server
    red = "data:image/png;base64," + base64.b64encode(_png_bytes((40, 32), (200, 0, 0))).decode()

    async def body(client: Client) -> list[str]:
        made = await client.call_tool(
            "generate_image", {"prompt": "a red circle", "width": 32, "height": 40, "steps": 1}
        )
        assert not made.is_error, _text(made)
        assert [i.size for i in _pngs(made)] == [(32, 40)]
        # an upload (base64) then img2img, at the size asked for
        edited = await client.call_tool(
            "edit_image",
            {"prompt": "a circle", "image": red, "steps": 2, "width": 40, "height": 32},
        )
        assert not edited.is_error, _text(edited)
        assert edited.structured_content["task"] == "img2img"
        assert [i.size for i in _pngs(edited)] == [(40, 32)]
        # the server's errors come back in its words
        bad = await client.call_tool("generate_image", {"prompt": "x", "height": 8})
        assert bad.is_error and bad.structured_content["error"]["field"] == "height"
        return [made.structured_content["job_id"], edited.structured_content["job_id"]]

    url = {"EASEL_URL": easel.url}
    job_ids = _session(_params(easel.home, **url, EASEL_KEY=secret), body)
    # the server's jobs, owned by the key
    with httpx.Client(headers={"Authorization": f"Bearer {secret}"}, timeout=30) as api:
        for job_id in job_ids:
            job = api.get(f"{easel.url}/api/v1/jobs/{job_id}").json()
            assert (job["status"], job["owner"]) == ("succeeded", key_id)

    async def refused(client: Client) -> CallToolResult:
        return await client.call_tool("list_models", {})

    wrong_key = _session(_params(easel.home, **url, EASEL_KEY="easel_wrong"), refused)
    assert wrong_key.is_error and _text(wrong_key).startswith("Unauthorized: ")


@pytest.mark.slow
def test_local_mode_beside_a_server_on_the_home_says_to_use_its_url(
    server: tuple[Server, str, str],
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "easel", "mcp"],
        env={**os.environ, **(_params(server[0].home).env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: another Easel server is using EASEL_HOME=")
    assert "EASEL_URL=" in last
    assert done.stdout == ""  # nothing on the protocol's channel
