"""Uploads and editing jobs over HTTP: what is accepted, and every bad input refused with a 4xx
that names the field, storing nothing (stand-in generator, real SQLite and files)."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from easel.jobs.standin import StandInGenerator
from easel.services import Services
from tests.api.test_jobs_api import rows, wait_final


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def picture(size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, (200, 30, 30))


def png_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side × side black pixels: ~100 kB that decodes to side² bytes."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def upload(client: TestClient, data: bytes, name: str = "x.png") -> dict:
    response = client.post("/api/v1/images", files={"file": (name, data, "image/png")})
    assert response.status_code == 201, response.text
    return response.json()


def stored(services: Services) -> tuple[int, list[Path]]:
    images = services.db.query("SELECT COUNT(*) FROM images")[0][0]
    return images, [p for p in services.settings.images_dir.rglob("*") if p.is_file()]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_an_upload_is_stored_once_and_served(client: TestClient, fmt: str) -> None:
    body = upload(client, encode(picture((80, 48)), fmt), f"x.{fmt.lower()}")
    assert (body["width"], body["height"]) == (80, 48)
    served = client.get(body["url"])
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(served.content)).size == (80, 48)
    listed = client.get("/api/v1/images", params={"kind": "upload"}).json()
    assert [i["id"] for i in listed] == [body["id"]] and listed[0]["job_id"] is None


def test_bad_uploads_are_refused_and_leave_nothing(
    client: TestClient, app_services: Services
) -> None:
    whole = encode(picture())
    cases = {
        "truncated PNG": whole[: len(whole) // 2],
        "text named .png": b"just some text, not an image\n" * 10,
        "GIF": encode(picture(), "GIF"),
        "empty": b"",
    }
    for what, data in cases.items():
        response = client.post("/api/v1/images", files={"file": ("x.png", data, "image/png")})
        assert response.status_code == 422, what
        assert response.json()["error"]["field"] == "file", what
    missing = client.post("/api/v1/images", files={"other": ("x.png", whole, "image/png")})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "file"
    app_services.settings.max_upload_bytes = 1000
    too_big = client.post("/api/v1/images", files={"file": ("x.png", b"\0" * 80_000)})
    assert too_big.status_code in (413, 422)
    assert stored(app_services) == (0, [])


def test_a_decompression_bomb_is_refused_fast_in_little_memory(
    client: TestClient, app_services: Services
) -> None:
    bomb = png_bomb(30_000)  # 900 million pixels
    assert len(bomb) < 2_000_000
    tracemalloc.start()
    started = time.perf_counter()
    response = client.post("/api/v1/images", files={"file": ("bomb.png", bomb, "image/png")})
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert response.status_code == 422, response.text
    assert "pixels" in response.json()["error"]["message"]
    assert seconds < 1.0 and peak < 50_000_000  # never decoded (that would take 900 MB)
    assert stored(app_services) == (0, [])


def test_an_edit_job_gets_its_inputs(client: TestClient, app_services: Services) -> None:
    image = upload(client, encode(picture()))
    mask_image = Image.new("L", (64, 64), 0)
    mask_image.paste(255, (32, 0, 64, 64))
    mask = upload(client, encode(mask_image))
    response = client.post(
        "/api/v1/jobs",
        json={
            "task": "inpaint",
            "prompt": "a blue square",
            "image": image["id"],
            "mask": mask["id"],
        },
    )
    assert response.status_code == 202, response.text
    job = wait_final(client, response.json()["id"])
    assert job["status"] == "succeeded" and job["task"] == "inpaint"
    assert job["params"]["strength"] == 1.0 and job["params"]["mask_blur"] == 4
    generator = app_services.workers[0].generator
    assert isinstance(generator, StandInGenerator) and generator.last_inputs is not None
    assert np.array_equal(np.asarray(generator.last_inputs.image), np.asarray(picture()))
    assert generator.last_inputs.mask is not None and generator.last_inputs.mask.size == (64, 64)


def test_bad_edit_requests_name_the_field_and_queue_nothing(
    client: TestClient, app_services: Services
) -> None:
    image = upload(client, encode(picture()))["id"]
    small = upload(client, encode(picture((32, 32))))["id"]
    cases = [
        ({"task": "img2img"}, "image"),
        ({"task": "img2img", "image": "no-such-image"}, "image"),
        ({"task": "img2img", "image": image, "strength": 0}, "strength"),
        ({"task": "img2img", "image": image, "strength": 1.5}, "strength"),
        ({"task": "inpaint", "image": image}, "mask"),
        ({"task": "inpaint", "image": image, "mask": small}, "mask"),
        ({"task": "outpaint", "image": image, "outpaint": {"right": 100}}, "outpaint"),
        ({"task": "outpaint", "image": image, "outpaint": {"middle": 8}}, "outpaint"),
        ({"task": "outpaint", "image": image, "outpaint": {"left": 0}}, "outpaint"),
        ({"task": "style", "image": image}, "style_image"),
        ({"task": "txt2img", "mask": image}, "mask"),  # a field the task does not use
        ({"task": "img2img", "image": image, "mask_blur": 100}, "mask_blur"),
    ]
    for body, field in cases:
        response = client.post("/api/v1/jobs", json={"prompt": "x", **body})
        assert response.status_code == 422, (body, response.text)
        error = response.json()["error"]
        assert error["field"] == field and field in error["message"], (body, error)
    assert rows(app_services) == 0
