"""AUTOMATIC1111's API (/sdapi/v1) against the real server (tiny SD on CPU, keys made before it
starts), called over HTTP as its clients call it: SillyTavern's flow (options, model switch,
progress polling, txt2img, png-info) with its whole request body, Open WebUI's (options posted
back whole, sd-models, txt2img with batch_size 2, HTTP Basic with the key as the password), an
inpaint that keeps the unmasked pixels, /interrupt stopping a running job (only the caller's),
and bad input answered in A1111's error shape, never a 5xx."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from easel.config import Settings
from easel.imaging import band
from easel.jobs.db import Database
from easel.jobs.keys import KeyStore
from easel.models.catalog import ModelCatalog
from tests.e2e.server import TINY_DEFAULTS, Server, prepare_home

pytestmark = pytest.mark.slow
A1111_ERROR = {"error", "detail", "body", "errors"}


@dataclass
class A1111:
    server: Server
    secrets: dict[str, str]  # key name -> secret

    def client(self, name: str) -> httpx.Client:
        """A client as SillyTavern and Open WebUI make one: HTTP Basic, the key as password."""
        return httpx.Client(
            base_url=self.server.url + "/sdapi/v1", auth=("user", self.secrets[name]), timeout=60
        )


@pytest.fixture(scope="module")
def a1111(tmp_path_factory: pytest.TempPathFactory, tiny_sd_path: Path) -> Iterator[A1111]:
    home = tmp_path_factory.mktemp("a1111") / "easel-home"
    prepare_home(home, tiny_sd_path)  # model "tiny", the server's default
    ModelCatalog(Settings(home=home)).add("tiny-b", str(tiny_sd_path), defaults=TINY_DEFAULTS)
    db = Database(Settings(home=home).db_path)
    keys = KeyStore(db)
    secrets = {name: keys.create(name)[1] for name in ("tavern", "webui", "other")}
    db.close()
    server = Server(home).start()
    yield A1111(server, secrets)
    server.kill()


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def idle(client: httpx.Client, timeout: float = 30) -> dict[str, Any]:
    """SillyTavern's wait after a model switch: poll /progress until nothing runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get("/progress").json()
        if state["progress"] == 0 and state["state"]["job_count"] == 0:
            return dict(state)
        time.sleep(0.05)
    raise AssertionError(f"still busy: {state}")


def a1111_error(response: httpx.Response, status: int, field: str | None = None) -> str:
    assert response.status_code == status, (status, response.text)
    body = response.json()
    assert A1111_ERROR <= set(body) and isinstance(body["error"], str), body
    assert body["detail"] and body["errors"] == body["detail"], body
    if field is not None:
        assert body["field"] == field, body
    return str(body["detail"])


def test_sillytavern_flow(a1111: A1111) -> None:
    with a1111.client("tavern") as st, a1111.client("webui") as other:
        # connect: what SillyTavern's "Connect" reads
        assert st.get("/options").json()["sd_model_checkpoint"] == "tiny"
        titles = [m["title"] for m in st.get("/sd-models").json()]
        assert {"tiny", "tiny-b"} <= set(titles)
        samplers = [s["name"] for s in st.get("/samplers").json()]
        assert {"Euler a", "Euler", "DPM++ 2M", "DDIM"} <= set(samplers)
        assert "karras" in [s["name"] for s in st.get("/schedulers").json()]
        assert [u["name"] for u in st.get("/upscalers").json()] == ["None"]
        assert st.get("/latent-upscale-modes").json() == [] == st.get("/sd-vae").json()
        # switch the model (its set-model: POST, then poll progress until idle)
        assert st.post("/options", json={"sd_model_checkpoint": "tiny-b"}).status_code == 200
        assert idle(st)["current_image"] is None
        assert st.get("/options").json()["sd_model_checkpoint"] == "tiny-b"
        assert other.get("/options").json()["sd_model_checkpoint"] == "tiny"  # per key
        # generate with the body its /api/sd/generate forwards (settings, url, auth and all)
        body = {
            "url": "http://127.0.0.1:7860",
            "auth": "user:secret",
            "prompt": "a red circle, masterpiece",
            "negative_prompt": "blurry",
            "sampler_name": "DDIM",
            "scheduler": "normal",  # SillyTavern's default: taken as Automatic
            "steps": 3,
            "cfg_scale": 7,
            "width": 64,
            "height": 64,
            "restore_faces": False,
            "enable_hr": False,
            "hr_upscaler": "None",
            "hr_scale": 2.0,
            "denoising_strength": 0.7,
            "hr_second_pass_steps": 0,
            "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True,
            "clip_skip": 1,
            "save_images": True,
            "send_images": True,
            "do_not_save_grid": False,
            "do_not_save_samples": False,
        }
        response = st.post("/txt2img", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        (image,) = answer["images"]
        assert decode(image).size == (64, 64)
        info = json.loads(answer["info"])
        assert info["prompt"] == body["prompt"] and info["sd_model_name"] == "tiny-b"
        assert info["all_seeds"] == [info["seed"]] and info["sampler_name"] == "DDIM"
        assert answer["parameters"]["steps"] == 3
        # the job is the key's, in the one queue
        jobs = httpx.get(
            a1111.server.url + f"/api/v1/jobs/{info['job_id']}",
            headers={"Authorization": f"Bearer {a1111.secrets['tavern']}"},
        ).json()
        assert (jobs["status"], jobs["model"]) == ("succeeded", "tiny-b")
        assert other.get("/progress").json()["state"]["job_count"] == 0
        # png-info of the result gives the parameters back
        read = st.post("/png-info", json={"image": "data:image/png;base64," + image}).json()
        assert read["info"] == info["infotexts"][0]
        parameters = read["parameters"]
        assert parameters["Prompt"] == body["prompt"]
        assert parameters["Negative prompt"] == "blurry"
        assert parameters["Seed"] == str(info["seed"]) and parameters["Steps"] == "3"
        assert (parameters["Size-1"], parameters["Size-2"]) == ("64", "64")
        assert (parameters["Sampler"], parameters["Model"]) == ("DDIM", "tiny-b")
        assert read["items"]["easel"]["seed"] == info["seed"]


def test_open_webui_flow(a1111: A1111) -> None:
    auth = "Basic " + base64.b64encode(f"open-webui:{a1111.secrets['webui']}".encode()).decode()
    headers = {"authorization": auth}  # exactly as Open WebUI builds it
    with httpx.Client(base_url=a1111.server.url, headers=headers, timeout=60) as webui:
        # set_image_model: read the options, post them back whole with another checkpoint
        options = webui.get("/sdapi/v1/options").json()
        options["sd_model_checkpoint"] = "tiny-b"
        webui.post("/sdapi/v1/options", json=options).raise_for_status()
        assert webui.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-b"
        models = [
            {"id": m["title"], "name": m["model_name"]}
            for m in webui.get("/sdapi/v1/sd-models").json()
        ]
        assert {"id": "tiny", "name": "tiny"} in models
        # image_generations: n images as batch_size
        data = {
            "prompt": "a blue square",
            "batch_size": 2,
            "width": 64,
            "height": 64,
            "steps": 2,
            "negative_prompt": "",
        }
        res = webui.post("/sdapi/v1/txt2img", json=data).json()
        assert len(res["images"]) == 2
        first, second = (np.asarray(decode(i).convert("RGB")) for i in res["images"])
        assert first.shape == (64, 64, 3) and not np.array_equal(first, second)
        info = json.loads(res["info"])
        assert info["all_seeds"] == [info["seed"], info["seed"] + 1]
        assert len(info["infotexts"]) == 2 and "Model: tiny-b" in info["infotexts"][1]


def test_img2img_with_a_mask_keeps_the_unmasked_pixels(a1111: A1111) -> None:
    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, (x * y) % 256], -1).astype(np.uint8)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 32, 40))  # white: repaint
    body = {
        "prompt": "a green triangle",
        "init_images": [png_b64(Image.fromarray(pixels, "RGB"))],
        "mask": png_b64(mask),
        "mask_blur": 4,
        "inpainting_fill": 1,
        "inpaint_full_res": False,
        "inpainting_mask_invert": 0,
        "denoising_strength": 0.9,
        "steps": 3,
        "seed": 5,
    }
    with a1111.client("tavern") as st:
        response = st.post("/img2img", json=body)
        assert response.status_code == 200, response.text
        (image,) = response.json()["images"]
        out = np.asarray(decode(image).convert("RGB"))
        outside = np.asarray(band(mask, 4)) == 0
        assert out.shape == (64, 64, 3) and np.array_equal(out[outside], pixels[outside])
        assert not np.array_equal(out, pixels)  # the masked part was repainted
        info = json.loads(response.json()["info"])
        assert info["denoising_strength"] == 0.9 and "Task: inpaint" in info["infotexts"][0]
        assert response.json()["parameters"]["init_images"] is None  # not echoed back
        # inverted: the white part is kept
        inverted = st.post("/img2img", json={**body, "inpainting_mask_invert": 1})
        out = np.asarray(decode(inverted.json()["images"][0]).convert("RGB"))
        inside = np.asarray(band(Image.eval(mask, lambda v: 255 - v), 4)) == 0
        assert np.array_equal(out[inside], pixels[inside])
        # no mask: img2img of the whole picture
        plain = st.post("/img2img", json={**body, "mask": None, "width": 32, "height": 32})
        assert plain.status_code == 200, plain.text
        assert decode(plain.json()["images"][0]).size == (32, 32)


def test_interrupt_stops_the_callers_running_job_only(a1111: A1111) -> None:
    with a1111.client("tavern") as st, a1111.client("other") as other:
        answers: list[httpx.Response] = []
        body = {"prompt": "slow", "steps": 150, "width": 128, "height": 128, "seed": 1}
        thread = threading.Thread(target=lambda: answers.append(st.post("/txt2img", json=body)))
        thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            progress = st.get("/progress").json()
            if progress["state"]["sampling_step"] >= 2:
                break
            time.sleep(0.02)
        assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 150
        assert 0 < progress["progress"] < 1 and progress["eta_relative"] >= 0
        assert other.get("/progress").json()["state"]["job_count"] == 0  # not another key's
        assert other.post("/interrupt").json() == {}  # cancels nothing of tavern's
        step = progress["state"]["sampling_step"]
        assert st.get("/progress").json()["state"]["sampling_step"] >= step
        assert st.post("/interrupt").json() == {}
        thread.join(30)
        (answer,) = answers
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])
        assert answer.json()["images"] == [] and info["interrupted"] is True
        job = httpx.get(
            a1111.server.url + f"/api/v1/jobs/{info['job_id']}",
            headers={"Authorization": f"Bearer {a1111.secrets['tavern']}"},
        ).json()
        assert job["status"] == "canceled" and job["progress"]["step"] < 150
        idle(st)


def test_bad_input_answers_in_a1111_shape(a1111: A1111) -> None:
    tiny = png_b64(Image.new("RGB", (64, 64), (9, 9, 9)))
    other_size = png_b64(Image.new("L", (32, 64), 255))
    with a1111.client("other") as client:
        assert "prompt" in a1111_error(client.post("/txt2img", json={}), 422, "prompt")
        a1111_error(client.post("/txt2img", json={"prompt": "a", "width": 1024}), 422, "width")
        a1111_error(client.post("/txt2img", json={"prompt": "a", "steps": "x"}), 422, "steps")
        detail = a1111_error(client.post("/txt2img", json={"prompt": "a", "steps": 999}), 422)
        assert detail.startswith("steps")  # as A1111 names it, not num_inference_steps
        a1111_error(
            client.post("/txt2img", json={"prompt": "a", "batch_size": 0}), 422, "batch_size"
        )
        unknown = {"prompt": "a", "sampler_name": "DPM++ SDE"}
        assert "Sampler not found" in a1111_error(
            client.post("/txt2img", json=unknown), 404, "sampler_name"
        )
        missing = {"prompt": "a", "override_settings": {"sd_model_checkpoint": "nope"}}
        a1111_error(client.post("/txt2img", json=missing), 404, "sd_model_checkpoint")
        a1111_error(
            client.post("/options", json={"sd_model_checkpoint": "nope"}),
            404,
            "sd_model_checkpoint",
        )
        a1111_error(client.post("/options", json=["not", "a", "dict"]), 422)
        edit = {"prompt": "a", "init_images": [tiny], "mask": other_size}
        assert "size" in a1111_error(client.post("/img2img", json=edit), 422, "mask")
        a1111_error(client.post("/img2img", json={"prompt": "a"}), 422, "init_images")
        for bad in ("%%% not base64", base64.b64encode(b"not an image").decode(), "http://x/y"):
            a1111_error(
                client.post("/img2img", json={"prompt": "a", "init_images": [bad]}),
                422,
                "init_images",
            )
        a1111_error(client.post("/png-info", json={"image": "bm90IGFuIGltYWdl"}), 422, "image")
        malformed = client.post(
            "/txt2img", content=b"{", headers={"content-type": "application/json"}
        )
        a1111_error(malformed, 400)
        a1111_error(client.get("/cmd-flags"), 404)  # a route Easel does not serve
        text = {"prompt": "a\x00b"}
        a1111_error(client.post("/txt2img", json=text), 422, "prompt")
        assert client.get("/progress").json()["state"]["job_count"] == 0  # nothing queued
        uploads = httpx.get(
            a1111.server.url + "/api/v1/images?kind=upload",
            headers={"Authorization": f"Bearer {a1111.secrets['other']}"},
        )
        assert uploads.json() == []  # nor stored: a refused edit's images are gone too
    with httpx.Client(base_url=a1111.server.url + "/sdapi/v1", timeout=30) as stranger:
        a1111_error(stranger.get("/options"), 401, "authorization")
        a1111_error(stranger.post("/txt2img", json={"prompt": "a"}), 401)
