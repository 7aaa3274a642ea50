"""Editing through the real server: upload, inpaint, outpaint, follow the events, read the PNG
back (tiny SD on CPU, over HTTP on loopback)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from easel.engine.metadata import read_metadata
from easel.imaging import band
from tests.e2e.helpers import read_events, submit, wait_final

pytestmark = pytest.mark.slow


def upload(api: httpx.Client, image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    response = api.post("/images", files={"file": ("in.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 201, response.text
    image_id: str = response.json()["id"]
    return image_id


def result(api: httpx.Client, job: dict) -> tuple[np.ndarray, bytes]:
    (image,) = job["images"]
    png = api.get(image["url"].removeprefix("/api/v1")).content
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), png


def test_inpaint_and_outpaint_over_http_keep_the_input_beyond_the_band(api: httpx.Client) -> None:
    y, x = np.mgrid[0:64, 0:80]
    pixels = np.stack([x * 3, y * 4, (x + y) % 256], -1).astype(np.uint8)
    picture = Image.fromarray(pixels, "RGB")
    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (50, 10, 70, 40))
    image_id, mask_id = upload(api, picture), upload(api, mask)

    job = submit(api, task="inpaint", prompt="a blue square", image=image_id, mask=mask_id,
                 num_inference_steps=3, seed=4)  # fmt: skip
    done = wait_final(api, job["id"])
    assert done["status"] == "succeeded", done
    out, png = result(api, done)
    outside = np.asarray(band(mask, 4)) == 0
    assert out.shape == (64, 80, 3) and np.array_equal(out[outside], pixels[outside])
    stored = read_metadata(png)["easel"]
    assert (stored["task"], stored["image"], stored["mask"]) == ("inpaint", image_id, mask_id)
    types = [e["type"] for e in read_events(api, job["id"])]
    assert types[0] == "queued" and "progress" in types and types[-1] == "succeeded"

    job = submit(api, task="outpaint", prompt="grey", image=image_id,
                 outpaint={"top": 16}, num_inference_steps=3, seed=4)  # fmt: skip
    done = wait_final(api, job["id"])
    assert done["status"] == "succeeded", done
    out, _ = result(api, done)
    assert out.shape == (80, 80, 3)
    assert np.array_equal(out[16 + 4 :], pixels[4:]), "the original below the blend band"
