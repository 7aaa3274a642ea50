"""`easel backup PATH`: the copy opens as an EASEL_HOME with the same jobs, images (identical
bytes), keys, LoRAs and datasets; bad targets are refused with one line and exit code 2."""

from __future__ import annotations

import io
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from PIL import Image

from easel.cli import main
from easel.config import Settings
from easel.domain import GenerationParams
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services
from tests.jobs.conftest import services, settings  # noqa: F401  (shared fixtures)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (9, 99, 199)).save(buffer, format="PNG")
    return buffer.getvalue()


def fill(services: Services) -> str:  # noqa: F811
    """Two finished jobs (three images), an upload, a key, a LoRA and a dataset (its id)."""
    for n in (1, 2):
        services.submit_job(
            GenerationParams(prompt=f"job {n}", num_images=n, num_inference_steps=1)
        )
        assert services.workers[0].run_once()
    services.upload_image(png())
    services.create_key("alice")
    loras = services.settings.loras_dir
    loras.mkdir()
    (loras / "ink.safetensors").write_bytes(b"weights")
    (loras / "ink.json").write_text('{"family": "sd"}')
    (loras / ".ink2.safetensors.partial").write_bytes(b"half")  # a LoRA being written
    files = [("a.png", png()), ("a.txt", b"a blue box"), ("b.png", png()), ("b.txt", b"again")]
    return services.create_dataset(files).id


def test_backup_opens_as_a_home_with_everything(
    services: Services,  # noqa: F811
    easel_home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dataset = fill(services)
    target = tmp_path / "backups" / "first"

    code, out, err = run(["backup", str(target)], capsys)

    assert code == 0, err
    assert out.startswith("backed up 2 jobs, 4 images, 2 LoRA files, 1 dataset to ")
    assert f"EASEL_HOME={target}" in out and not err
    assert not list(target.glob("easel.db-*")), "one self-contained database file"
    with closing(sqlite3.connect(target / "easel.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert (target / "models.toml").read_bytes() == (easel_home / "models.toml").read_bytes()
    assert not (target / "loras" / ".ink2.safetensors.partial").exists()
    assert target.stat().st_mode & 0o077 == 0, "the keys' hashes are for the owner only"

    restored = build_services(Settings(home=target), generator=StandInGenerator())
    try:
        jobs = restored.list_jobs(limit=100)
        images = restored.list_images(limit=100)
        assert sorted(j.id for j in jobs) == sorted(j.id for j in services.list_jobs(limit=100))
        assert len(images) == 4 and {i.kind for i in images} == {"generated", "upload"}
        for image in images:
            assert restored.image_bytes(image.id) == services.image_bytes(image.id)
        assert [k.name for k in restored.list_keys()] == ["alice"]
        assert [r.id for r in restored.list_loras()] == ["ink"]
        assert [d.id for d in restored.list_datasets()] == [dataset]
        assert restored.get_job(jobs[0].id).images, "jobs keep their images"
    finally:
        restored.stop()


def test_an_image_file_gone_before_the_copy_is_left_out_with_its_row(
    services: Services,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fill(services)
    gone = services.list_images(limit=1)[0]
    services.images.path(gone.id).unlink()  # as if pruned after the snapshot

    code, out, err = run(["backup", str(tmp_path / "copy")], capsys)

    assert code == 0 and "3 images" in out
    assert "note: 1 image" in err
    with closing(sqlite3.connect(tmp_path / "copy" / "easel.db")) as conn:
        ids = {row[0] for row in conn.execute("SELECT id FROM images")}
        paths = [row[0] for row in conn.execute("SELECT path FROM images")]
    assert gone.id not in ids and len(ids) == 3
    assert all((tmp_path / "copy" / "images" / p).is_file() for p in paths)


def test_bad_targets_are_refused_before_anything_is_written(
    services: Services,  # noqa: F811
    easel_home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fill(services)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    before = sorted(easel_home.rglob("*"))
    cases = {
        easel_home / "backups": "is inside EASEL_HOME",
        easel_home: "is inside EASEL_HOME",
        easel_home / "images" / ".." / "x": "is inside EASEL_HOME",
        full: "is not empty",
        a_file: "is a file",
    }
    for target, message in cases.items():
        code, out, err = run(["backup", str(target)], capsys)
        assert code == 2 and not out, target
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert sorted(easel_home.rglob("*")) == before
    assert [p.name for p in full.iterdir()] == ["notes.txt"]
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    assert run(["backup", str(tmp_path / "empty")], capsys)[0] == 0


def test_no_database_no_backup(
    easel_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["backup", str(tmp_path / "copy")], capsys)
    assert code == 2 and "nothing to back up" in err
    assert not (tmp_path / "copy").exists()
