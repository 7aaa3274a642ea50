"""train_lora jobs over HTTP with the real worker, engine and trainer on a tiny SD (64 px, 8
steps): a dataset upload, the job's events (loss, learning rate, ETA, samples, held-out loss), the
LoRA listed and used by a generation; every bad request refused naming the field, storing nothing;
one LoRA name trained by one job at a time."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from easel.api.app import create_app
from easel.config import Settings
from easel.models.catalog import ModelCatalog
from easel.models.loras import LoraCatalog
from easel.services import Services, build_services
from tests.api.test_editing_api import encode
from tests.api.test_jobs_api import parse_sse, rows, wait_for
from tests.api.test_loras_api import _lora
from tests.test_datasets import zip_bytes

# steps 8 and a high learning rate: the LoRA changes the pixels within the test's few seconds;
# num_inference_steps is the denoising steps of the job's sample images
TRAIN: dict[str, Any] = {
    "task": "train_lora",
    "model": "tiny",
    "name": "square",
    "trigger": "zq",
    "steps": 8,
    "rank": 4,
    "learning_rate": 0.05,
    "num_inference_steps": 2,
    "seed": 3,
}


def dataset_zip(count: int = 6, size: int = 64) -> bytes:
    """``count`` orange squares on blue, captioned with the trigger word (6 images: one is held
    out for the held-out loss)."""
    files: dict[str, bytes | str] = {}
    for i in range(count):
        image = Image.new("RGB", (size, size), (30, 70, 230))
        image.paste((250, 140, 20), (size // 4 + i, size // 4, 3 * size // 4, 3 * size // 4))
        files[f"{i}.png"] = encode(image)
        files[f"{i}.txt"] = "a zq square"
    return zip_bytes(files)


def post_dataset(client: TestClient) -> str:
    response = client.post("/api/v1/datasets", files={"file": ("squares.zip", dataset_zip())})
    assert response.status_code == 201, response.text
    dataset_id: str = response.json()["id"]
    return dataset_id


def wait_final(client: TestClient, job_id: str) -> dict[str, Any]:
    """The job once final (two minutes' patience: other work may share the cores)."""
    final = ("succeeded", "failed", "canceled")
    job: dict[str, Any] = wait_for(client, job_id, lambda j: j["status"] in final, timeout=120)
    return job


def pixels(client: TestClient, job: dict[str, Any]) -> np.ndarray:
    (image,) = job["images"]
    return np.asarray(Image.open(io.BytesIO(client.get(image["url"]).content)).convert("RGB"))


@pytest.fixture
def trainer_services(settings: Settings) -> Iterator[Services]:
    """Services with the real engine and LoRA trainer on the CPU (model ``tiny``), on one
    thread as the end-to-end server runs: two threads on two cores that other work shares
    made these tests 25 times slower."""
    settings.device = "cpu"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_services(settings)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def trainer_client(trainer_services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(trainer_services)) as client:
        yield client


def test_a_train_job_publishes_a_lora_that_generations_use(
    trainer_client: TestClient, trainer_services: Services
) -> None:
    client = trainer_client
    dataset = post_dataset(client)
    response = client.post("/api/v1/jobs", json={**TRAIN, "dataset": dataset})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["task"] == "train_lora" and job["progress"] == {"step": 0, "total": 8}
    assert job["params"]["steps"] == 8 and job["params"]["rank"] == 4

    events = parse_sse(client.get(f"/api/v1/jobs/{job['id']}/events").text)
    types = [e["type"] for e in events]
    assert types[:2] == ["queued", "started"] and types[-1] == "succeeded", events
    steps = [e for e in events if e["type"] == "progress" and "loss" in e]
    assert steps[0]["step"] == 1 and steps[-1]["step"] == 8, steps
    for event in steps:
        assert event["total"] == 8 and event["loss"] > 0 and event["lr"] > 0
    assert "eta_seconds" not in steps[0] and all("eta_seconds" in e for e in steps[1:])
    # samples before the first step (the base model) and after the last, with a held-out loss
    samples = [e for e in events if e["type"] == "progress" and "samples" in e]
    assert [e["step"] for e in samples] == [0, 8], samples
    assert all(e["heldout_loss"] > 0 for e in samples)
    for event in samples:
        for sample in event["samples"]:
            served = client.get(sample["url"])
            assert served.status_code == 200 and served.headers["content-type"] == "image/png"
            assert sample["prompt"] == "a zq square"
    done = events[-1]
    assert done["lora"] == {"id": "square", "url": "/api/v1/loras/square", "steps": 8}
    assert [i["id"] for i in done["images"]] == [s["id"] for e in samples for s in e["samples"]]
    final = wait_final(client, job["id"])
    assert final["status"] == "succeeded" and final["progress"] == {"step": 8, "total": 8}
    run = trainer_services.settings.home / "training" / job["id"]
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == ["lora-step0000008.pt"]
    config = json.loads((run / "config.json").read_text())  # the samples at the job's 2 steps
    assert (config["sample_steps"], config["checkpoint_every"]) == (2, 10)

    (lora,) = client.get("/api/v1/loras").json()
    assert lora["id"] == "square" and lora["family"] == "sd" and lora["source"] == "trained"
    assert (lora["base_model"], lora["trigger"], lora["job_id"]) == ("tiny", "zq", job["id"])
    assert (lora["rank"], lora["steps"]) == (4, 8)
    for file in ("square.json", "square.loss.png", "square.samples.png"):
        assert (trainer_services.settings.loras_dir / file).is_file(), file

    # the same seed with and without the LoRA
    common = {"prompt": "a zq square", "seed": 1, "num_inference_steps": 2}
    plain = client.post("/api/v1/jobs", json=common).json()
    styled = client.post(
        "/api/v1/jobs", json={**common, "loras": [{"id": "square", "weight": 1.0}]}
    )
    assert styled.status_code == 202, styled.text
    plain, styled = wait_final(client, plain["id"]), wait_final(client, styled.json()["id"])
    assert plain["status"] == styled["status"] == "succeeded", (plain["error"], styled["error"])
    difference = np.abs(pixels(client, plain).astype(int) - pixels(client, styled).astype(int))
    assert difference.mean() > 0.5, difference.mean()


def test_bad_train_requests_name_the_field_and_store_nothing(
    client: TestClient, app_services: Services
) -> None:
    dataset = post_dataset(client)
    _lora(app_services.settings, "taken", "sd")
    good = {**TRAIN, "dataset": dataset}
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"dataset": None}, 422, "dataset"),
        ({"name": None}, 422, "name"),
        ({"trigger": None}, 422, "trigger"),
        ({"dataset": "0" * 32}, 404, "dataset"),
        ({"dataset": "../images"}, 404, "dataset"),
        ({"steps": 0}, 422, "steps"),
        ({"rank": 1000}, 422, "rank"),
        ({"learning_rate": -1}, 422, "learning_rate"),
        ({"name": "taken"}, 422, "name"),
        ({"name": "a/b"}, 422, "name"),
        ({"trigger": "two words"}, 422, "trigger"),
        ({"strength": 0.5}, 422, "strength"),
        ({"image": "x"}, 422, "image"),
        ({"loras": [{"id": "taken"}]}, 422, "loras"),
        ({"model": "no-such-model"}, 404, "model"),
        ({"prior_words": ["circle", "ZQ"]}, 422, "prior_words"),  # the trigger
        ({"prior_words": ["x"] * 17}, 422, "prior_words"),
        ({"prior_words": [" "]}, 422, "prior_words"),
        ({"prior_words": "circle"}, 422, "prior_words"),
        ({"train_text_encoder": "yes"}, 422, "train_text_encoder"),
    ]
    for change, status, field in cases:
        body = {k: v for k, v in (good | change).items() if v is not None}
        response = client.post("/api/v1/jobs", json=body)
        assert response.status_code == status, (change, response.text)
        error = response.json()["error"]
        assert error["field"] == field and field in error["message"], (change, error)
    # and the training fields are refused on other tasks rather than ignored
    for name, value in (("dataset", dataset), ("trigger", "zq"), ("steps", 8),
                        ("prior_words", ["circle"]), ("train_text_encoder", True)):  # fmt: skip
        response = client.post("/api/v1/jobs", json={"prompt": "a cat", name: value})
        assert response.status_code == 422, (name, response.text)
        assert response.json()["error"]["field"] == name
    assert rows(app_services) == 0
    assert not (app_services.settings.home / "training").exists()


def test_a_job_takes_the_models_training_defaults_where_the_request_is_silent(
    client: TestClient, app_services: Services, tiny_flux_path: Path
) -> None:
    dataset = post_dataset(client)
    base = {"task": "train_lora", "model": "tiny-shapes", "dataset": dataset, "trigger": "sks"}
    own = app_services.catalog.get("tiny-shapes").train_defaults
    response = client.post("/api/v1/jobs", json={**base, "name": "hexagon"})
    assert response.status_code == 202, response.text
    params = response.json()["params"]  # what the worker will train with, stored with the job
    assert params["prior_words"] == own["prior_words"] == ["circle", "square", "triangle",
                                                           "star", "cross"]  # fmt: skip
    assert (params["steps"], params["train_text_encoder"]) == (own["steps"], True)
    given = {**base, "name": "plain", "prior_words": [], "train_text_encoder": False, "steps": 5}
    response = client.post("/api/v1/jobs", json=given)
    assert response.status_code == 202, response.text
    params = response.json()["params"]
    assert (params["prior_words"], params["train_text_encoder"], params["steps"]) == ([], False, 5)
    assert (response.json()["params"]["export_scale"], own["export_scale"]) == (1.05, 1.05)
    # a text-encoder LoRA needs a CLIP encoder: refused at submit for Flux, not when it runs
    ModelCatalog(app_services.settings).add("flux", str(tiny_flux_path))
    response = client.post(
        "/api/v1/jobs", json={**base, "model": "flux", "name": "f", "train_text_encoder": True}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "train_text_encoder" and "not flux" in error["message"]


def test_one_lora_name_is_trained_by_one_job_at_a_time(
    trainer_client: TestClient, trainer_services: Services
) -> None:
    client = trainer_client
    body = {**TRAIN, "dataset": post_dataset(client)}
    # a generation at the model's size first: its speed per denoising step is now known, and
    # says nothing of a training step's, so a train job's ETA stays unknown (null)
    generation = client.post("/api/v1/jobs", json={"prompt": "x", "num_inference_steps": 1})
    assert wait_final(client, generation.json()["id"])["status"] == "succeeded"
    first = client.post("/api/v1/jobs", json=body).json()
    assert first["eta_seconds"] is None and first["progress"] == {"step": 0, "total": 8}
    # while the first is queued or running, a second job for the name is refused at submit
    second = client.post("/api/v1/jobs", json=body)
    assert second.status_code == 422, second.text
    error = second.json()["error"]
    assert error["field"] == "name" and first["id"] in error["message"], error
    assert wait_final(client, first["id"])["status"] == "succeeded"
    # once it has succeeded, the name is a LoRA's
    third = client.post("/api/v1/jobs", json=body)
    assert third.status_code == 422 and "exists already" in third.json()["error"]["message"]
    assert rows(trainer_services) == 2  # the generation and the first
    # a canceled (or failed) job frees the name
    body = {**body, "name": "other"}
    canceled = client.post("/api/v1/jobs", json=body).json()
    client.delete(f"/api/v1/jobs/{canceled['id']}")
    assert wait_final(client, canceled["id"])["status"] == "canceled"
    again = client.post("/api/v1/jobs", json=body)
    assert again.status_code == 202, again.text
    client.delete(f"/api/v1/jobs/{again.json()['id']}")
    wait_final(client, again.json()["id"])


def test_a_name_taken_while_training_fails_the_job_and_keeps_the_other_lora(
    trainer_client: TestClient, trainer_services: Services
) -> None:
    client = trainer_client
    job = client.post("/api/v1/jobs", json={**TRAIN, "dataset": post_dataset(client)}).json()
    # e.g. `easel loras add FILE --name square` while the job trains
    _lora(trainer_services.settings, "square", "sd", source="added")
    before = LoraCatalog(trainer_services.settings).path_for("square").read_bytes()
    final = wait_final(client, job["id"])
    assert final["status"] == "failed", final
    assert "square" in final["error"] and "exists already" in final["error"], final["error"]
    run = trainer_services.settings.home / "training" / job["id"]
    assert str(run / "square.safetensors") in final["error"]  # the trained file is kept there
    assert (run / "square.safetensors").is_file()
    (lora,) = client.get("/api/v1/loras").json()
    assert lora["source"] == "added" and lora["job_id"] is None
    assert LoraCatalog(trainer_services.settings).path_for("square").read_bytes() == before
