"""AUTOMATIC1111's API in process (TestClient, stand-in generator, real SQLite): the answer's
shape, the gate's and the body limit's errors in A1111's shape, and the pieces (sampler names,
masks, png-info's parser). tests/e2e/test_a1111.py drives the real server as the clients do."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from easel.api.a1111 import SamplerNotFound, mask_png, parse_infotext, pick_scheduler
from easel.api.app import create_app
from easel.config import Settings
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services

A1111_ERROR = {"error", "detail", "body", "errors"}


def png_b64(size: tuple[int, int] = (32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_txt2img_answers_as_a1111(client: TestClient, app_services: Services) -> None:
    body = {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32, "seed": 11,
            "batch_size": 2, "n_iter": 2, "sampler_name": "Euler a", "unknown": [1, 2]}  # fmt: skip
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert set(data) == {"images", "parameters", "info"} and len(data["images"]) == 4
    info = json.loads(data["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["sampler_name"] == "Euler a"
    assert "unknown" not in data["parameters"] and data["parameters"]["batch_size"] == 2
    job = app_services.get_job(info["job_id"])
    assert (job.params.num_images, job.params.scheduler) == (4, "euler_a")
    quiet = client.post("/sdapi/v1/txt2img", json={**body, "send_images": False}).json()
    assert quiet["images"] == [] and len(json.loads(quiet["info"])["infotexts"]) == 4


def test_gate_and_limits_answer_in_a1111_shape(settings: Settings) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 3000})
    services = build_services(small, generator=StandInGenerator())
    _, secret = services.create_key("slow", rate_per_minute=1)
    _, other = services.create_key("other")
    try:
        with TestClient(create_app(services)) as client:
            refused = client.get("/sdapi/v1/options")
            assert refused.status_code == 401 and refused.json()["error"] == "Unauthorized"
            assert A1111_ERROR <= set(refused.json())
            auth = ("user", secret)
            assert client.get("/sdapi/v1/options", auth=auth).status_code == 200
            limited = client.get("/sdapi/v1/options", auth=auth)
            assert limited.status_code == 429 and limited.json()["error"] == "QuotaExceeded"
            assert int(limited.headers["retry-after"]) > 0
            # an image over max_upload_bytes: 422 naming it; a body over the route's limit
            # (two such images in base64, and some): 413
            big = {"prompt": "a", "init_images": ["A" * 20000]}
            too_big = client.post("/sdapi/v1/img2img", json=big, auth=("user", other))
            assert too_big.status_code == 422 and too_big.json()["field"] == "init_images"
            assert "at most 3000 bytes" in too_big.json()["detail"]
            big = {"prompt": "a", "init_images": ["A" * 100_000]}
            too_big = client.post("/sdapi/v1/img2img", json=big, auth=("user", other))
            assert too_big.status_code == 413, too_big.text
            assert too_big.json()["error"] == "PayloadTooLarge"
            # Easel's own API keeps its shape
            assert client.get("/api/v1/jobs").json()["error"]["type"] == "Unauthorized"
    finally:
        services.stop()


def test_sampler_names_map_to_easel_schedulers() -> None:
    eps = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim")
    assert pick_scheduler("Euler a", None, eps) == "euler_a"
    assert pick_scheduler("DPM++ 2M Karras", None, eps) == "dpmpp_2m_karras"
    assert pick_scheduler("DPM++ 2M", "Karras", eps) == "dpmpp_2m_karras"
    assert pick_scheduler("dpm++ 2m", "automatic", eps) == "dpmpp_2m"
    assert pick_scheduler("k_euler", "Uniform", eps) == "euler"  # an alias, a schedule ignored
    assert pick_scheduler("Euler", "Karras", eps) == "euler"  # no Karras Euler in Easel
    assert pick_scheduler("DDIM", None, eps) == "ddim"
    assert pick_scheduler("Euler", None, ("flow_euler",)) == "flow_euler"
    assert pick_scheduler(None, "Karras", eps) is None  # the model's default
    with pytest.raises(SamplerNotFound) as raised:
        pick_scheduler("UniPC", None, eps)
    assert raised.value.status == 404 and raised.value.field == "sampler_name"


def test_masks_read_as_a1111_reads_them() -> None:
    def read(image: Image.Image, invert: bool = False) -> list[list[int]]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out = Image.open(io.BytesIO(mask_png(buffer.getvalue(), invert, max_pixels=1000)))
        return np.asarray(out).tolist()  # type: ignore[no-any-return]

    grey = Image.new("L", (4, 1), 0)
    grey.putdata([0, 100, 200, 255])
    assert read(grey) == [[0, 0, 255, 255]]  # rounded at 50 %
    assert read(grey, invert=True) == [[255, 255, 0, 0]]
    # transparency: the opaque part repaints (A1111), whatever the colour
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    assert read(rgba) == [[0, 255]]
    # fully opaque RGBA: its colours
    assert read(Image.new("RGBA", (1, 1), (255, 255, 255, 255))) == [[255]]


def test_infotext_parses_as_a1111_png_info() -> None:
    text = (
        "a cat, <lora:x:0.5>\nsecond line\nNegative prompt: dog\nSteps: 4, Sampler: DPM++ 2M, "
        'Schedule type: Karras, CFG scale: 5.0, Seed: 7, Size: 64x48, Model: tiny, Note: "a, b"'
    )
    found = parse_infotext(text)
    assert found["Prompt"] == "a cat, <lora:x:0.5>\nsecond line"
    assert found["Negative prompt"] == "dog"
    assert (found["Steps"], found["Sampler"], found["Schedule type"]) == ("4", "DPM++ 2M", "Karras")
    assert (found["Size-1"], found["Size-2"], found["Note"]) == ("64", "48", "a, b")
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


HOSTILE: list[tuple[str, str, bytes]] = [
    ("POST", "/sdapi/v1/txt2img", b'{"prompt": "\\ud800"}'),
    ("POST", "/sdapi/v1/txt2img", b'{"prompt": "a", "cfg_scale": NaN}'),
    ("POST", "/sdapi/v1/txt2img", b'{"prompt": "a", "cfg_scale": Infinity}'),
    ("POST", "/sdapi/v1/txt2img", b'{"prompt": "a", "seed": 1' + b"0" * 30 + b"}"),
    ("POST", "/sdapi/v1/txt2img", b'{"prompt": "a", "steps": 1' + b"0" * 5000 + b"}"),
    ("POST", "/sdapi/v1/txt2img", b'{"prompt": "a", "batch_size": -2, "n_iter": -2}'),
    ("POST", "/sdapi/v1/txt2img", b'{"prompt": "a", "width": true}'),
    ("POST", "/sdapi/v1/txt2img", b'{"prompt": ["a"]}'),
    ("POST", "/sdapi/v1/txt2img", b'{"prompt": "a", "sampler_name": "\\u0000"}'),
    (
        "POST",
        "/sdapi/v1/txt2img",
        b'{"prompt": "a", "override_settings": {"sd_model_checkpoint": 5}}',
    ),
    (
        "POST",
        "/sdapi/v1/txt2img",
        b'{"prompt": "a", "override_settings": {"sd_model_checkpoint": "/etc"}}',
    ),
    ("POST", "/sdapi/v1/txt2img", b'{"prompt": "a", "override_settings": []}'),
    ("POST", "/sdapi/v1/txt2img", b"null"),
    ("POST", "/sdapi/v1/txt2img", b"[]"),
    ("POST", "/sdapi/v1/txt2img", b"\xff\xfe"),
    ("POST", "/sdapi/v1/img2img", b'{"prompt": "a", "init_images": [5]}'),
    ("POST", "/sdapi/v1/img2img", b'{"prompt": "a", "init_images": ["data:image/png;base64"]}'),
    ("POST", "/sdapi/v1/img2img", b'{"prompt": "a", "init_images": ["\\u00e9\\u00e9"]}'),
    ("POST", "/sdapi/v1/img2img", b'{"prompt": "a", "init_images": ["iVBORw0KGgo="]}'),
    ("POST", "/sdapi/v1/img2img", b'{"prompt": "a", "init_images": [], "mask": "x"}'),
    ("POST", "/sdapi/v1/options", b'{"sd_model_checkpoint": ["tiny"]}'),
    ("POST", "/sdapi/v1/options", b'{"sd_model_checkpoint": "../../etc/passwd"}'),
    ("POST", "/sdapi/v1/options", b'{"sd_model_checkpoint": "\\ud800"}'),
    ("POST", "/sdapi/v1/options", b"null"),
    ("POST", "/sdapi/v1/png-info", b'{"image": 5}'),
    ("POST", "/sdapi/v1/png-info", b'{"image": ""}'),
    ("POST", "/sdapi/v1/png-info", b'{"image": "////"}'),
    ("GET", "/sdapi/v1/progress?skip_current_image=maybe", b""),
    ("DELETE", "/sdapi/v1/txt2img", b""),
    ("GET", "/sdapi/v1/memory", b""),
]


@pytest.mark.parametrize(("method", "path", "body"), HOSTILE)
def test_hostile_input_gets_a_4xx_in_a1111_shape(
    client: TestClient, method: str, path: str, body: bytes
) -> None:
    headers = {"content-type": "application/json"} if body else {}
    response = client.request(method, path, content=body, headers=headers)
    assert 400 <= response.status_code < 500, (body, response.text)
    error = response.json()
    assert A1111_ERROR <= set(error) and isinstance(error["error"], str), error
    assert "Traceback" not in response.text
