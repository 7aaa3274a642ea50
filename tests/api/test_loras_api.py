"""/api/v1/loras and the ``loras`` field of a job: listed, checked (422 naming the field),
stored with the job's resolved params."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from easel.config import Settings
from easel.domain import LoraRecord
from easel.models.loras import LoraCatalog


def _lora(settings: Settings, name: str, family: str, **fields: object) -> None:
    """A LoRA record with a small stand-in weights file (the stand-in generator never reads it)."""
    loras = LoraCatalog(settings)
    path = loras.path_for(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"unet.x.to_k.lora_A.weight": torch.zeros(4, 8)}, path)
    loras.save_record(LoraRecord(id=name, path="", family=family, **fields))  # type: ignore[arg-type]


@pytest.fixture
def with_loras(settings: Settings) -> Settings:
    _lora(settings, "ink", "sd", trigger="zkz", rank=4, steps=200, base_model="tiny")
    _lora(settings, "paper", "sd", source="added")
    _lora(settings, "flux-style", "flux")
    return settings


def test_loras_are_listed_and_read_one_by_one(with_loras: Settings, client: TestClient) -> None:
    listed = client.get("/api/v1/loras").json()
    assert [x["id"] for x in listed] == ["flux-style", "ink", "paper"]
    ink = client.get("/api/v1/loras/ink").json()
    assert ink["family"] == "sd" and ink["trigger"] == "zkz" and ink["rank"] == 4
    assert ink["steps"] == 200 and ink["base_model"] == "tiny" and ink["source"] == "trained"
    assert ink["created_at"] and "path" not in ink
    missing = client.get("/api/v1/loras/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "LoraNotFound"


def test_a_job_takes_loras_with_weights(with_loras: Settings, client: TestClient) -> None:
    body = {"prompt": "a cat", "loras": [{"id": "ink", "weight": 0.6}, {"id": "paper"}]}
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["params"]["loras"] == [
        {"id": "ink", "weight": 0.6},
        {"id": "paper", "weight": 1.0},
    ]


@pytest.mark.parametrize(
    ("loras", "field", "message"),
    [
        ([{"id": "nope"}], "loras[0].id", "unknown LoRA 'nope'"),
        ([{"id": "ink"}, {"id": "flux-style"}], "loras[1].id", "is for flux models"),
        ([{"id": "ink", "weight": 5}], "loras[0].weight", "between -4 and 4"),
        ([{"id": "ink"}, {"id": "ink"}], "loras[1].id", "listed twice"),
        ([{"id": "ink"}] * 9, "loras", "at most 8"),
        ([{"id": "ink", "scale": 1}], "loras[0].scale", "not a known field"),
        ([{"id": "ink", "weight": "lots"}], "loras[0].weight", "valid number"),
    ],
)
def test_bad_loras_are_422_naming_the_field(
    with_loras: Settings, client: TestClient, loras: list[object], field: str, message: str
) -> None:
    response = client.post("/api/v1/jobs", json={"prompt": "a cat", "loras": loras})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and message in error["message"]
    assert client.get("/api/v1/jobs").json() == []
