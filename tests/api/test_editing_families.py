"""Every editing task on a tiny real model of every family, over HTTP: upload the inputs, queue
the job, let the real engine run it, read the PNG back (TestClient, real SQLite and workers)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from easel.api.app import create_app
from easel.config import Settings
from easel.imaging import band
from easel.models.catalog import ModelCatalog
from easel.services import build_services
from tests.api.test_editing_api import encode, upload
from tests.api.test_jobs_api import wait_final
from tests.engine.test_generate import FAMILY_FIXTURES

# 64 px work size for every family (their own defaults are 512-1024 px: slow for tests)
SMALL = {"width": 64, "height": 64, "min_size": 32, "max_size": 128, "num_inference_steps": 3}


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[TestClient]:
    settings = Settings(home=tmp_path_factory.mktemp("families-home"), preview_every=0)
    catalog = ModelCatalog(settings)
    for family, fixture in FAMILY_FIXTURES.items():
        catalog.add(f"tiny-{family}", str(request.getfixturevalue(fixture)), defaults=SMALL)
    with TestClient(create_app(build_services(settings))) as client:
        yield client


def picture() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8), "RGB")


@pytest.mark.parametrize("family", list(FAMILY_FIXTURES))
def test_every_task_over_http(client: TestClient, family: str) -> None:
    image = upload(client, encode(picture()))["id"]
    mask_image = Image.new("L", (64, 64), 0)
    mask_image.paste(255, (36, 8, 60, 40))
    mask = upload(client, encode(mask_image))["id"]
    reference = upload(client, encode(Image.new("RGB", (64, 64), (30, 200, 60))))["id"]
    requests = {
        "img2img": {"image": image, "strength": 0.7},
        "inpaint": {"image": image, "mask": mask},
        "outpaint": {"image": image, "outpaint": {"right": 16}},
        "style": {"image": image, "style_image": reference, "strength": 0.5},
    }
    for task, fields in requests.items():
        response = client.post(
            "/api/v1/jobs",
            json={"task": task, "model": f"tiny-{family}", "prompt": "a cat", "seed": 1, **fields},
        )
        assert response.status_code == 202, response.text
        job = wait_final(client, response.json()["id"])
        assert job["status"] == "succeeded", (task, job["error"])
        (result,) = job["images"]
        out = Image.open(io.BytesIO(client.get(result["url"]).content)).convert("RGB")
        assert out.size == ((80, 64) if task == "outpaint" else (64, 64)), task
        if task == "inpaint":
            outside = np.asarray(band(mask_image, 4)) == 0
            assert np.array_equal(np.asarray(out)[outside], np.asarray(picture())[outside])
