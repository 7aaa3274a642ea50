"""OpenAI's Images API under /v1 over HTTP (TestClient, stand-in generator, real SQLite): the
answers' shapes, options mapped to jobs (model names, quality, size, formats), streaming events,
and every bad input answered in OpenAI's error shape with the status its SDK expects. The
official client against a real server: tests/e2e/test_openai.py."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from easel.api.app import create_app
from easel.config import Settings
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services

GEN = "/v1/images/generations"
PROMPT = {"prompt": "a red circle", "num_inference_steps": 4}  # the stand-in: 5 ms a step


def png(size: tuple[int, int] = (64, 64), colour: tuple[int, ...] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA" if len(colour) == 4 else "RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(item: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def openai_error(response: Any, status: int, code: str, param: str | None = None) -> str:
    """Assert OpenAI's error shape; return the message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code, error
    assert error["param"] == param, error
    kind = "requests" if status == 429 else "server_error" if status >= 500 else None
    assert error["type"] == (kind or "invalid_request_error"), error
    message: str = error["message"]
    assert message
    return message


def last_job(client: TestClient) -> dict[str, Any]:
    job: dict[str, Any] = client.get("/api/v1/jobs", params={"limit": 1}).json()[0]
    return job


def events(response: Any) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of a Server-Sent Events body."""
    found = []
    for block in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            found.append((lines["event"], json.loads(lines["data"])))
    return found


def test_generate_answers_b64_json_and_urls(client: TestClient) -> None:
    response = client.post(GEN, json={**PROMPT, "n": 2, "seed": 5, "size": "48x32"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "48x32" and body["output_format"] == "png"
    assert body["background"] == "opaque" and body["quality"] == "medium"
    assert isinstance(body["created"], int)
    usage = body["usage"]
    assert usage["input_tokens_details"] == {"text_tokens": 3, "image_tokens": 0}
    assert usage["output_tokens"] == 2 * 3 * 2  # 16×16 patches of two 48×32 images
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    first, second = (decoded(item) for item in body["data"])
    assert first.size == second.size == (48, 32)
    assert first.getpixel((0, 0)) != second.getpixel((0, 0)), "seeds 5 and 6 differ"
    assert first.info["parameters"].startswith("a red circle")  # the stored PNG, metadata too
    job = last_job(client)
    assert (job["params"]["seed"], job["params"]["num_images"]) == (5, 2)

    response = client.post(GEN, json={**PROMPT, "response_format": "url"})
    (item,) = response.json()["data"]
    assert set(item) == {"url"} and item["url"].startswith("http://testserver/api/v1/images/")
    image = client.get(item["url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


@pytest.mark.parametrize(("fmt", "pillow"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_format_and_compression(client: TestClient, fmt: str, pillow: str) -> None:
    sizes = []
    for compression in (100, 10):
        body = client.post(
            GEN, json={**PROMPT, "seed": 1, "output_format": fmt, "output_compression": compression}
        ).json()
        assert body["output_format"] == fmt
        (item,) = body["data"]
        assert decoded(item).format == pillow
        sizes.append(len(item["b64_json"]))
    assert sizes[1] <= sizes[0]


def test_quality_model_names_and_catalog_ids(client: TestClient) -> None:
    steps = {}
    for quality in ("low", "auto", "high", "hd", "standard"):
        body = {"prompt": "a red circle", "quality": quality, "size": "32x32"}
        assert client.post(GEN, json=body).status_code == 200
        steps[quality] = last_job(client)["params"]["num_inference_steps"]
    # the tiny model's default is 25 steps
    assert steps == {"low": 12, "auto": 25, "high": 50, "hd": 50, "standard": 25}
    assert client.post(GEN, json={**PROMPT, "quality": "high"}).status_code == 200
    assert last_job(client)["params"]["num_inference_steps"] == 4  # Easel's own wins

    for name in ("dall-e-3", "gpt-image-1", "tiny", None):
        response = client.post(GEN, json={**PROMPT, "model": name})
        assert response.status_code == 200, (name, response.text)
        assert last_job(client)["model"] == "tiny"

    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert {"id": "tiny", "object": "model", "created": 0, "owned_by": "user"} in models["data"]
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    openai_error(client.get("/v1/models/nope"), 404, "model_not_found", "model")


BAD_GENERATIONS = [
    ({"n": 1}, "missing_required_parameter", "prompt"),
    ({"prompt": "   "}, "invalid_value", "prompt"),
    ({"prompt": "x\x00y"}, "invalid_value", "prompt"),
    ({**PROMPT, "size": "big"}, "invalid_value", "size"),
    ({**PROMPT, "size": "4096x4096"}, "invalid_value", "size"),  # past the model's 128 px
    ({**PROMPT, "size": "33x64"}, "invalid_value", "size"),  # not a multiple of 8
    ({**PROMPT, "n": 0}, "invalid_value", "n"),
    ({**PROMPT, "n": "two"}, "invalid_type", "n"),
    ({**PROMPT, "n": 10, "size": "128x128"}, "invalid_value", "n"),  # past the tiny's batch
    ({**PROMPT, "quality": "ultra"}, "invalid_value", "quality"),
    ({**PROMPT, "output_format": "gif"}, "invalid_value", "output_format"),
    ({**PROMPT, "output_compression": 101}, "invalid_value", "output_compression"),
    ({**PROMPT, "background": "transparent"}, "invalid_value", "background"),
    ({**PROMPT, "partial_images": 4}, "invalid_value", "partial_images"),
    ({**PROMPT, "response_format": "file"}, "invalid_value", "response_format"),
    ({**PROMPT, "frobnicate": 1}, "unknown_parameter", "frobnicate"),
    ({**PROMPT, "scheduler": "nope"}, "invalid_value", "scheduler"),
]


def test_bad_generations_answer_openai_errors_and_store_nothing(client: TestClient) -> None:
    for body, code, param in BAD_GENERATIONS:
        openai_error(client.post(GEN, json=body), 400, code, param)
    openai_error(
        client.post(GEN, json={**PROMPT, "model": "sdxl-9"}), 404, "model_not_found", "model"
    )
    openai_error(
        client.post(GEN, content=b"{not json", headers={"Content-Type": "application/json"}),
        400,
        "invalid_json",
    )
    openai_error(client.post(GEN, json=["a list"]), 400, "invalid_request")
    openai_error(client.get("/v1/nothing"), 404, "not_found")
    openai_error(client.get(GEN), 405, "method_not_allowed")
    assert client.get("/api/v1/jobs").json() == []


HOSTILE = [
    b'{"prompt": "a", "\\ud800": 1}',  # a lone surrogate in a parameter's name
    b'{"prompt": "a", "size": "\\ud800x1"}',
    b'{"prompt": "a", "model": "\\u0000"}',
    b'{"prompt": "a", "guidance_scale": 1e999}',  # infinity, which json.loads makes of it
    b'{"prompt": "a", "n": NaN}',
    b'{"prompt": "a", "n": ' + b"9" * 5000 + b"}",  # past Python's int() digit limit
    b"[" * 100_000,  # deeper than the JSON parser recurses
    b"\xff\xfe",
]


def test_hostile_bodies_get_400_in_openai_shape(client: TestClient) -> None:
    for body in HOSTILE:
        response = client.post(GEN, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (body[:40], response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert client.get("/api/v1/jobs").json() == []


def test_a_failed_job_is_an_error_not_to_retry(client: TestClient) -> None:
    response = client.post(GEN, json={**PROMPT, "prompt": "<fail>"})
    message = openai_error(response, 500, "job_failed")
    assert "stand-in failure" in message and response.headers["x-should-retry"] == "false"


def test_a_job_canceled_while_the_request_waits_answers_409(slow_client: TestClient) -> None:
    client = slow_client
    answer: list[Any] = []
    body = {**PROMPT, "num_inference_steps": 50}  # 2 s of 40 ms steps
    waiting = threading.Thread(target=lambda: answer.append(client.post(GEN, json=body)))
    waiting.start()
    deadline = time.monotonic() + 10
    while not (jobs := client.get("/api/v1/jobs").json()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.delete(f"/api/v1/jobs/{jobs[0]['id']}").status_code == 200
    waiting.join(10)
    openai_error(answer[0], 409, "job_canceled")
    assert answer[0].headers["x-should-retry"] == "false"


@pytest.fixture
def slow_client(settings: Settings) -> Any:
    """Steps of 40 ms: the stream subscribes long before the job's last preview (a finished
    job's stored previews are dropped, so a stream that came late would find none)."""
    services = build_services(settings, generator=StandInGenerator(seconds_per_step=0.04))
    with TestClient(create_app(services)) as client:
        yield client


def test_streaming_sends_partial_images_then_completed(slow_client: TestClient) -> None:
    client = slow_client
    body = {**PROMPT, "stream": True, "partial_images": 2, "n": 2, "size": "32x32"}
    response = client.post(GEN, json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    found = events(response)
    kinds = [kind for kind, _ in found]
    # previews at steps 2 and 4 of 4: partial 0 from a third of the run, 1 from two thirds
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"] * 2
    for index, (kind, data) in enumerate(found[:2]):
        assert data["type"] == kind and data["partial_image_index"] == index
        assert decoded(data).size == (32, 32)
    for kind, data in found[2:]:
        assert data["type"] == kind and data["size"] == "32x32" and data["quality"] == "medium"
        assert decoded(data).format == "PNG" and data["usage"]["output_tokens"] == 8

    # none asked: the completed events alone (the image itself, even if a URL was asked);
    # a failed job: an error event
    body = {**PROMPT, "stream": True, "response_format": "url", "output_format": "jpeg"}
    ((kind, data),) = events(client.post(GEN, json=body))
    assert kind == "image_generation.completed" and decoded(data).format == "JPEG"
    ((kind, data),) = events(client.post(GEN, json={**PROMPT, "prompt": "<fail>", "stream": True}))
    assert kind == "error" and data["error"]["code"] == "job_failed"


def test_edits_inpaint_with_the_mask_or_img2img_without(
    client: TestClient, app_services: Services
) -> None:
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # alpha 0: repaint
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    files = [("image[]", ("in.png", png(), "image/png")), ("mask", ("m.png", buffer.getvalue()))]
    data = {"prompt": "a blue square", "num_inference_steps": "4", "n": "1"}
    response = client.post("/v1/images/edits", files=files, data=data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["input_tokens_details"]["image_tokens"] == 2 * 16  # image and mask
    job = last_job(client)
    assert job["task"] == "inpaint" and job["params"]["strength"] == 1.0
    inputs = app_services.workers[0].generator.last_inputs  # type: ignore[attr-defined]
    assert inputs.mask.mode == "RGBA" and inputs.mask.getpixel((20, 20))[3] == 0

    files = {"image": ("in.png", png(), "image/png")}
    streamed = client.post("/v1/images/edits", files=files, data={**data, "stream": "true"})
    assert [k for k, _ in events(streamed)] == ["image_edit.completed"]
    assert last_job(client)["task"] == "img2img"


def test_bad_edits_answer_openai_errors(client: TestClient) -> None:
    edits = "/v1/images/edits"
    data = {"prompt": "a blue square"}
    image = ("image", ("in.png", png(), "image/png"))
    bad_size = client.post(edits, files=[image], data={**data, "size": "big"})
    openai_error(bad_size, 400, "invalid_value", "size")
    assert client.get("/api/v1/images").json() == [], "checked before the image is stored"
    cases = [
        ([("mask", ("m.png", png()))], data, "missing_required_parameter", "image"),
        ([image], {}, "missing_required_parameter", "prompt"),
        ([image, ("image[]", ("b.png", png()))], data, "invalid_value", "image"),
        ([("image", ("x.png", b"not an image"))], data, "invalid_value", "image"),
        ([image, ("mask", ("m.png", png((32, 32))))], data, "invalid_value", "mask"),
        ([image], {**data, "n": "lots"}, "invalid_type", "n"),
        ([image, ("other", ("o.png", png()))], data, "unknown_parameter", "other"),
    ]
    for files, fields, code, param in cases:
        openai_error(client.post(edits, files=files, data=fields), 400, code, param)
    openai_error(client.post(edits, json=data), 400, "invalid_request")
    assert client.get("/api/v1/jobs").json() == []


def test_variations_reuse_the_prompt_an_easel_image_carries(client: TestClient) -> None:
    made = client.post(GEN, json={**PROMPT, "prompt": "a green triangle"}).json()
    original = base64.b64decode(made["data"][0]["b64_json"])
    response = client.post(
        "/v1/images/variations",
        files={"image": ("v.png", original, "image/png")},
        data={"n": "2", "num_inference_steps": "4", "response_format": "url"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["revised_prompt"] for item in body["data"]] == ["a green triangle"] * 2
    job = last_job(client)
    assert (job["task"], job["params"]["prompt"], job["params"]["num_images"]) == (
        "img2img",
        "a green triangle",
        2,
    )
    plain = client.post(
        "/v1/images/variations",
        files={"image": ("v.png", png(), "image/png")},
        data={"num_inference_steps": "4"},
    )
    assert plain.json()["data"][0]["revised_prompt"] == "a picture like this one"


@pytest.fixture
def keyed(settings: Settings) -> Any:
    services = build_services(settings, generator=StandInGenerator(seconds_per_step=0.005))
    _, secret = services.create_key("webui", scopes=("generate",), rate_per_minute=3)
    _, trainer = services.create_key("trainer", scopes=("train",))
    with TestClient(create_app(services)) as client:
        yield client, secret, trainer


def test_the_gate_answers_in_openai_shape(keyed: Any) -> None:
    client, secret, trainer = keyed
    message = openai_error(client.post(GEN, json=PROMPT), 401, "invalid_api_key")
    assert "API key" in message
    wrong = {"Authorization": "Bearer easel_wrong"}
    openai_error(client.get("/v1/models", headers=wrong), 401, "invalid_api_key")
    refused = client.post(GEN, json=PROMPT, headers={"Authorization": f"Bearer {trainer}"})
    openai_error(refused, 403, "missing_scope")
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.post(GEN, json=PROMPT, headers=headers).status_code == 200
    for _ in range(2):
        client.get("/v1/models", headers=headers)
    limited = client.get("/v1/models", headers=headers)
    openai_error(limited, 429, "rate_limit_exceeded")
    assert int(limited.headers["retry-after"]) >= 1
    # Easel's own API keeps its shape
    assert client.get("/api/v1/jobs").json()["error"]["type"] == "Unauthorized"
