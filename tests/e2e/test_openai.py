"""The official ``openai`` client against a real server (tiny SD on CPU, one API key, over HTTP
on loopback): generations, an edit with an alpha mask that keeps the unmasked pixels,
variations, streamed partial images, and the SDK's own exceptions for bad requests."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from easel.config import Settings
from easel.imaging import band, repaint_mask
from easel.jobs.db import Database
from easel.jobs.keys import KeyStore
from easel.models.catalog import ModelCatalog
from tests.e2e.server import TINY_DEFAULTS, Server

pytestmark = pytest.mark.slow


@dataclass
class DropIn:
    server: Server
    client: OpenAI
    secret: str


@pytest.fixture(scope="module")
def dropin(tmp_path_factory: pytest.TempPathFactory, tiny_sd_path: Path) -> Iterator[DropIn]:
    home = tmp_path_factory.mktemp("openai") / "easel-home"
    home.mkdir()
    settings = Settings(home=home)
    defaults = {**TINY_DEFAULTS, "num_inference_steps": 4}
    ModelCatalog(settings).add("tiny", str(tiny_sd_path), defaults=defaults)
    db = Database(settings.db_path)
    _, secret = KeyStore(db).create("webui", scopes=("generate",))
    db.close()
    server = Server(home).start()
    # no retries: a refused request must raise at once, and a test must not make a job twice
    client = OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0, timeout=60)
    yield DropIn(server, client, secret)
    client.close()
    server.kill()


def pixels(b64_json: str | None) -> np.ndarray:
    assert b64_json is not None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_json))).convert("RGB"))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_generate_two_images_as_b64_json_and_as_urls(dropin: DropIn) -> None:
    result = dropin.client.images.generate(
        model="gpt-image-1", prompt="a red circle", n=2, size="64x64", extra_body={"seed": 3}
    )
    assert result.size == "64x64" and result.usage is not None and result.data is not None
    first, second = (pixels(image.b64_json) for image in result.data)
    assert first.shape == second.shape == (64, 64, 3)
    assert not np.array_equal(first, second), "seeds 3 and 4 made the same image"

    result = dropin.client.images.generate(
        model="tiny", prompt="a red circle", size="32x32", response_format="url"
    )
    assert result.data is not None and result.data[0].url is not None
    url = result.data[0].url
    assert url.startswith(dropin.server.url + "/api/v1/images/")
    fetched = httpx.get(url, headers={"Authorization": f"Bearer {dropin.secret}"})
    assert Image.open(io.BytesIO(fetched.content)).size == (32, 32)
    models = [m.id for m in dropin.client.models.list()]
    assert "tiny" in models


def test_edit_with_an_alpha_mask_keeps_the_unmasked_pixels(dropin: DropIn) -> None:
    y, x = np.mgrid[0:64, 0:64]
    original = np.stack([x * 4, y * 4, (x + y) % 256], -1).astype(np.uint8)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (20, 12, 44, 36))  # alpha 0: edit here (OpenAI's convention)
    result = dropin.client.images.edit(
        image=("in.png", png_bytes(Image.fromarray(original)), "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt="a blue square",
        extra_body={"seed": 4},
    )
    assert result.data is not None
    edited = pixels(result.data[0].b64_json)
    outside = np.asarray(band(repaint_mask(mask), 4)) == 0  # beyond the 4 px blend band
    assert edited.shape == (64, 64, 3)
    assert np.array_equal(edited[outside], original[outside])
    assert not np.array_equal(edited[~outside], original[~outside]), "the masked part changed"

    events = list(
        dropin.client.images.edit(
            image=("in.png", png_bytes(Image.fromarray(original)), "image/png"),
            prompt="a blue square",
            stream=True,
        )
    )
    assert [e.type for e in events][-1] == "image_edit.completed"


def test_variation_of_an_image(dropin: DropIn) -> None:
    picture = Image.new("RGB", (64, 64), (40, 160, 90))
    result = dropin.client.images.create_variation(
        image=("v.png", png_bytes(picture), "image/png"), n=1, response_format="b64_json"
    )
    assert result.data is not None and len(result.data) == 1
    assert pixels(result.data[0].b64_json).shape == (64, 64, 3)


def test_streaming_sends_partial_images_then_the_image(dropin: DropIn) -> None:
    stream = dropin.client.images.generate(
        prompt="a red circle",
        size="64x64",
        stream=True,
        partial_images=2,
        extra_body={"num_inference_steps": 8},  # previews at steps 2, 4, 6 and 8
    )
    events = list(stream)
    types = [e.type for e in events]
    assert types[-1] == "image_generation.completed", types
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert len(partials) >= 1, types
    assert [p.partial_image_index for p in partials] == list(range(len(partials)))
    assert pixels(partials[0].b64_json).shape == (64, 64, 3)
    assert pixels(events[-1].b64_json).shape == (64, 64, 3)


def test_bad_requests_raise_the_sdks_exceptions(dropin: DropIn) -> None:
    client = dropin.client
    for size in ("4096x4096", "banana"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="a red circle", size=size)
        assert caught.value.param == "size" and caught.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="")
    assert caught.value.param == "prompt"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(prompt="a red circle", model="no-such-model")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            image=("in.png", png_bytes(Image.new("RGB", (64, 64))), "image/png"),
            mask=("mask.png", png_bytes(Image.new("RGBA", (32, 32))), "image/png"),
            prompt="a blue square",
        )
    assert caught.value.param == "mask"
    stranger = OpenAI(base_url=dropin.server.url + "/v1", api_key="easel_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        stranger.images.generate(prompt="a red circle")
    assert refused.value.code == "invalid_api_key"
    stranger.close()
    # the SDK will not send a request without a key: plain HTTP, the answer it would read
    keyless = httpx.post(dropin.server.url + "/v1/images/generations", json={"prompt": "a"})
    assert keyless.status_code == 401
    assert keyless.json()["error"]["code"] == "invalid_api_key"
