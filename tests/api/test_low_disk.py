"""Low disk over HTTP: under EASEL_MIN_FREE_DISK_MB new work gets 507 and stores nothing, and
health says so; a write that fails all the same (the disk filled after the check) gets 503."""

from __future__ import annotations

import errno
import io
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from easel.config import Settings
from easel.services import Services


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No disk has this much free (2^40 MiB = 1 EiB): the real free space is low."""
    return settings.model_copy(update={"min_free_disk_mb": 2**40})


def stored(services: Services) -> tuple[int, int, list[str]]:
    """Job rows, image rows, and every file under images/ and datasets/."""
    jobs = services.db.query("SELECT COUNT(*) FROM jobs")[0][0]
    images = services.db.query("SELECT COUNT(*) FROM images")[0][0]
    home = services.settings
    files = [
        str(p) for d in (home.images_dir, home.datasets_dir) if d.exists() for p in d.rglob("*")
    ]
    return jobs, images, files


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_low_disk_refuses_new_work_with_507_and_health_says_so(
    client: TestClient, app_services: Services
) -> None:
    health = client.get("/api/v1/health").json()
    assert health["status"] == "degraded"
    assert health["disk"]["low"] is True and health["disk"]["free_bytes"] > 0
    assert health["disk"]["min_free_bytes"] == 2**60

    job = client.post("/api/v1/jobs", json={"prompt": "a red circle", "num_inference_steps": 2})
    assert job.status_code == 507
    error = job.json()["error"]
    assert error["type"] == "DiskFull"
    assert "MiB free on the disk holding EASEL_HOME" in error["message"]
    assert "min_free_disk_mb" in error["message"]
    assert str(app_services.settings.home) not in error["message"]  # no path to a client
    upload = client.post("/api/v1/images", files={"file": ("x.png", png(), "image/png")})
    assert upload.status_code == 507 and upload.json()["error"]["type"] == "DiskFull"
    dataset = client.post("/api/v1/datasets", files={"file": ("d.zip", b"PK\x05\x06" + b"\0" * 18)})
    assert dataset.status_code == 507 and dataset.json()["error"]["type"] == "DiskFull"
    assert stored(app_services) == (0, 0, [])

    app_services.disk.min_free_bytes = 0  # space was freed (here: the check is off)
    assert client.get("/api/v1/health").json()["status"] == "ok"
    assert client.post("/api/v1/jobs", json={"prompt": "a red circle"}).status_code == 202


def test_a_write_failing_anyway_gets_503_and_stores_nothing(
    client: TestClient, app_services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    app_services.disk.min_free_bytes = 0
    real = app_services.events.publish

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(app_services.events, "publish", full)
    response = client.post("/api/v1/jobs", json={"prompt": "a red circle"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "30"
    assert response.json()["error"] == {
        "type": "StorageUnavailable",
        "message": "the server could not write to its disk (No space left on device (ENOSPC)); "
        "the request changed nothing, retry later",
        "field": None,
    }
    assert stored(app_services) == (0, 0, [])
    monkeypatch.setattr(app_services.events, "publish", real)
    assert client.post("/api/v1/jobs", json={"prompt": "a red circle"}).status_code == 202
