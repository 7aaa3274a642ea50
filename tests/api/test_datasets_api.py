"""Training datasets over HTTP: uploads as one zip or as files, listed and read back; every bad
or hostile upload refused with a 422 naming the reason, storing nothing anywhere."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from easel.services import Services
from tests.test_datasets import CAPTIONED, png, symlink_zip, zip_bomb, zip_bytes  # noqa: F401

URL = "/api/v1/datasets"


def as_files(files: dict[str, bytes | str]) -> list[tuple[str, tuple[str, bytes]]]:
    return [
        ("files", (name, data.encode() if isinstance(data, str) else data))
        for name, data in files.items()
    ]


def leftovers(services: Services) -> list[Path]:
    root = services.settings.datasets_dir
    return list(root.iterdir()) if root.exists() else []


def test_a_zip_is_stored_listed_and_read_back(client: TestClient, app_services: Services) -> None:
    response = client.post(URL, files={"file": ("cats.zip", zip_bytes(CAPTIONED))})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body == {
        "id": body["id"],
        "url": f"{URL}/{body['id']}",
        "images": 2,
        "captions": 2,
        "missing_captions": [],
    }
    assert response.headers["location"] == body["url"]
    assert app_services.dataset_path(body["id"]) == app_services.settings.datasets_dir / body["id"]
    listed = client.get(URL).json()
    assert [d["id"] for d in listed] == [body["id"]] and listed[0]["bytes"] > 0
    detail = client.get(body["url"]).json()
    assert detail["items"] == [
        {"file": "cat.png", "caption": "a red cat", "width": 16, "height": 12},
        {"file": "dog.png", "caption": "a blue dog", "width": 16, "height": 12},
    ]
    # what the trainer reads
    dataset = app_services.load_dataset(body["id"])
    assert [i.image.name for i in dataset.items] == ["cat.png", "dog.png"]


def test_files_with_missing_captions(client: TestClient, app_services: Services) -> None:
    files = as_files({**CAPTIONED, "bird.png": png()})
    response = client.post(URL, files=files)
    assert response.status_code == 422
    error = response.json()["error"]
    assert (
        error["field"] == "dataset"
        and "1 of 3 images have no caption: bird.png" in error["message"]
    )
    assert leftovers(app_services) == []
    response = client.post(URL, files=files, data={"allow_missing_captions": "true"})
    assert response.status_code == 201, response.text
    assert response.json()["missing_captions"] == ["bird.png"]
    assert response.json()["captions"] == 2


def test_more_than_a_thousand_files_in_one_upload(client: TestClient) -> None:
    files = {f"{i:03d}.png": png() for i in range(510)} | {f"{i:03d}.txt": "x" for i in range(510)}
    response = client.post(URL, files=as_files(files))
    assert response.status_code == 201, response.text
    assert response.json()["images"] == 510


@pytest.mark.parametrize(
    ("what", "expected"),
    [
        ("non-image named .png", "zebra.png is not a PNG, JPEG or WebP image"),
        ("../evil.txt", "goes up a folder (..)"),
        ("absolute path", "is an absolute path"),
        ("symlink member", "symbolic link (b.png)"),
        ("1 GiB bomb", f"at most {512 << 20} are allowed"),
    ],
)
def test_hostile_zips_are_refused_and_leave_nothing(
    client: TestClient,
    app_services: Services,
    zip_bomb: Path,  # noqa: F811
    tmp_path: Path,
    what: str,
    expected: str,
) -> None:
    evil = f"/tmp/easel-evil-{uuid.uuid4().hex}"
    payloads = {
        "non-image named .png": lambda: zip_bytes(
            {**CAPTIONED, "zebra.png": b"text" * 50, "zebra.txt": "z"}
        ),
        "../evil.txt": lambda: zip_bytes({**CAPTIONED, "../evil.txt": "pwned"}),
        "absolute path": lambda: zip_bytes({**CAPTIONED, evil: "pwned"}),
        "symlink member": lambda: symlink_zip(),
        "1 GiB bomb": lambda: zip_bomb.read_bytes(),
    }
    response = client.post(URL, files={"file": ("ds.zip", payloads[what]())})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "InvalidParams" and error["field"] == "dataset"
    assert expected in error["message"], error["message"]
    assert leftovers(app_services) == []
    home = app_services.settings.home
    assert [p for p in home.parent.rglob("*evil*")] == [] and not Path(evil).exists()
    assert client.get(URL).json() == []


def test_bad_requests_name_the_field(client: TestClient, app_services: Services) -> None:
    cases = [
        ({}, {}, "file"),
        ({"files": ("a.zip", zip_bytes(CAPTIONED))}, {"allow_missing_captions": "maybe"}, None),
    ]
    for files, data, field in cases:
        response = client.post(URL, files=files or None, data=data)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == (field or "allow_missing_captions")
    both = [("file", ("a.zip", zip_bytes(CAPTIONED))), *as_files(CAPTIONED)]
    response = client.post(URL, files=both)
    assert response.status_code == 422 and "either one zip" in response.json()["error"]["message"]
    response = client.post(URL, json={"file": "cats.zip"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "file"
    app_services.settings.max_dataset_upload_bytes = 1000
    response = client.post(URL, files={"file": ("a.zip", zip_bytes({"a.png": b"\0" * 5000}))})
    assert response.status_code in (413, 422)
    assert leftovers(app_services) == []


def test_unknown_datasets_are_404(client: TestClient) -> None:
    for dataset_id in ("0" * 32, "nope", "..", "%2e%2e%2fimages"):
        response = client.get(f"{URL}/{dataset_id}")
        assert response.status_code == 404, dataset_id
        assert response.json()["error"]["type"] in ("DatasetNotFound", "HTTPError")
    assert client.get(f"{URL}/{'0' * 32}").json()["error"]["type"] == "DatasetNotFound"
