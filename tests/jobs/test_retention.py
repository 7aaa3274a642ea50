"""Retention: old finished jobs and unused uploads are deleted, rows and files; everything live
stays (real SQLite and files, timestamps moved into the past with SQL)."""

from __future__ import annotations

import io
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from easel.api.app import create_app
from easel.config import Settings
from easel.domain import GenerationParams, InvalidParams, JobStatus
from easel.jobs.retention import RetentionPolicy, prune
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services

NOW = datetime.now(UTC)


def days_ago(days: float) -> str:
    return (NOW - timedelta(days=days)).isoformat(timespec="microseconds")


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def finished_job(services: Services, prompt: str, *, days: float) -> str:
    """A job run to success, then dated as finished ``days`` ago."""
    job = services.submit_job(GenerationParams(prompt=prompt, num_inference_steps=2))
    assert services.workers[0].run_once()
    assert services.get_job(job.id).status is JobStatus.SUCCEEDED
    with services.db.transaction() as conn:
        conn.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (days_ago(days), job.id))
    return job.id


def upload(services: Services, colour: tuple[int, int, int], *, days: float) -> str:
    record = services.upload_image(png(colour))
    with services.db.transaction() as conn:
        conn.execute("UPDATE images SET created_at = ? WHERE id = ?", (days_ago(days), record.id))
    return record.id


def files_of(services: Services, job_id: str) -> list[Path]:
    return [services.settings.images_dir / i.path for i in services.get_job(job_id).images]


def count(services: Services, sql: str, *args: object) -> int:
    return int(services.db.query(sql, args)[0][0])


def test_old_finished_jobs_and_unused_uploads_go_live_ones_stay(services: Services) -> None:
    # 1. what should go: an old finished job (with events and image files), an old upload
    old = finished_job(services, "old", days=40)
    old_files = files_of(services, old)
    assert old_files and all(p.is_file() for p in old_files)
    old_upload = upload(services, (1, 2, 3), days=10)
    old_upload_file = services.images.path(old_upload)

    # 2. what should stay: a recent job; an old job whose image a queued job edits; uploads a
    # queued (inpaint: image and mask) or running job uses; a recent upload; live jobs
    recent = finished_job(services, "recent", days=1)
    source = finished_job(services, "source of an edit", days=40)
    used_image = upload(services, (10, 20, 30), days=10)
    used_mask = upload(services, (255, 255, 255), days=10)
    used_by_running = upload(services, (40, 50, 60), days=10)
    fresh_upload = upload(services, (70, 80, 90), days=1)
    running = services.submit_job(
        GenerationParams(prompt="running", task="img2img", image=used_by_running, strength=0.5)
    )
    assert services.queue.claim() is not None  # now running (no worker runs it)
    queued_edit = services.submit_job(
        GenerationParams(
            prompt="edit", task="img2img", image=services.get_job(source).images[0].id, strength=0.5
        )
    )
    queued_inpaint = services.submit_job(
        GenerationParams(prompt="inpaint", task="inpaint", image=used_image, mask=used_mask)
    )
    with services.db.transaction() as conn:  # live jobs made long ago stay all the same
        conn.execute("UPDATE jobs SET created_at = ?", (days_ago(400),))
    source_files = files_of(services, source)
    kept_files = [
        *files_of(services, recent),
        *source_files,
        *(services.images.path(i) for i in (used_image, used_mask, used_by_running, fresh_upload)),
    ]
    freed = sum(p.stat().st_size for p in [*old_files, old_upload_file])

    counts = prune(services.db, services.settings.images_dir, NOW, RetentionPolicy(30, 7))

    assert (counts.jobs, counts.images, counts.uploads, counts.files) == (1, 1, 1, 2)
    assert counts.events == 5  # queued, started, 2 progress, succeeded
    assert counts.bytes == freed
    for table, column in (("jobs", "id"), ("events", "job_id"), ("images", "job_id")):
        assert count(services, f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", old) == 0
    assert count(services, "SELECT COUNT(*) FROM images WHERE id = ?", old_upload) == 0
    assert not any(p.exists() for p in [*old_files, old_upload_file])
    assert all(p.is_file() for p in kept_files)
    jobs = {j.id: j.status for j in services.list_jobs(limit=100)}
    assert jobs == {
        recent: JobStatus.SUCCEEDED,
        source: JobStatus.SUCCEEDED,
        running.id: JobStatus.RUNNING,
        queued_edit.id: JobStatus.QUEUED,
        queued_inpaint.id: JobStatus.QUEUED,
    }
    # once nothing live names the source job's image, that job goes too
    services.cancel_job(queued_edit.id)
    again = prune(services.db, services.settings.images_dir, NOW, RetentionPolicy(30, 7))
    assert (again.jobs, again.uploads) == (1, 0)
    assert not any(p.exists() for p in source_files)


def test_zero_keeps_everything(services: Services) -> None:
    job = finished_job(services, "ancient", days=3650)
    image = upload(services, (5, 5, 5), days=3650)
    before = sorted(p for p in services.settings.images_dir.rglob("*") if p.is_file())

    counts = prune(services.db, services.settings.images_dir, NOW, RetentionPolicy(0, 0))

    assert not counts and counts.files == 0
    assert services.get_job(job).images
    assert services.get_image(image)
    assert sorted(p for p in services.settings.images_dir.rglob("*") if p.is_file()) == before
    # each setting on its own: uploads only leaves jobs alone, and the other way round
    only_uploads = prune(services.db, services.settings.images_dir, NOW, RetentionPolicy(0, 1))
    assert (only_uploads.jobs, only_uploads.uploads) == (0, 1)
    only_jobs = prune(services.db, services.settings.images_dir, NOW, RetentionPolicy(1, 0))
    assert (only_jobs.jobs, only_jobs.uploads) == (1, 0)


def test_a_file_another_row_names_is_kept(services: Services) -> None:
    job = finished_job(services, "shared file", days=40)
    (path,) = files_of(services, job)
    relative = path.relative_to(services.settings.images_dir).as_posix()
    with services.db.transaction() as conn:  # a second row naming the same file
        conn.execute(
            "INSERT INTO images (id, kind, path, width, height, prompt, created_at)"
            " VALUES ('twin', 'upload', ?, 64, 64, '', ?)",
            (relative, days_ago(0)),
        )

    counts = prune(services.db, services.settings.images_dir, NOW, RetentionPolicy(30, 30))

    assert (counts.jobs, counts.images, counts.files) == (1, 1, 0)
    assert path.is_file() and services.images.path("twin") == path


def test_empty_day_folders_before_yesterday_are_removed(services: Services) -> None:
    root = services.settings.images_dir
    old_day, today = root / "2001-01-01", root / NOW.date().isoformat()
    for folder in (old_day, today, root / "uploads" / "2001-01-02"):
        folder.mkdir(parents=True, exist_ok=True)
    (root / "2001-01-03").mkdir()
    (root / "2001-01-03" / "keep.png").write_bytes(b"x")

    prune(services.db, root, NOW, RetentionPolicy(30, 0))

    assert not old_day.exists() and not (root / "uploads" / "2001-01-02").exists()
    assert today.is_dir(), "a worker may be about to write into today's folder"
    assert (root / "2001-01-03" / "keep.png").is_file()


def test_the_server_prunes_on_its_own_and_stops_promptly(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings.model_copy(update={"keep_jobs_days": 1.0, "prune_every_s": 0.05})
    services = build_services(settings, generator=StandInGenerator())
    assert services.pruner is not None
    caplog.set_level(logging.INFO, logger="easel.jobs.retention")
    with TestClient(create_app(services)) as client:
        job = client.post("/api/v1/jobs", json={"prompt": "x", "num_inference_steps": 1}).json()
        deadline = time.monotonic() + 10
        while client.get(f"/api/v1/jobs/{job['id']}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (image,) = client.get(f"/api/v1/jobs/{job['id']}").json()["images"]
        with services.db.transaction() as conn:
            conn.execute("UPDATE jobs SET finished_at = ?", (days_ago(2),))
        while client.get(f"/api/v1/jobs/{job['id']}").status_code != 404:
            assert time.monotonic() < deadline, "the pruner never deleted the old job"
            time.sleep(0.02)
        assert client.get(image["url"]).status_code == 404
        assert services.pruner.running and services.pruner.runs >= 2
        started = time.monotonic()
    assert time.monotonic() - started < 3, "shutdown waited on the pruner"
    assert not services.pruner.running
    assert any("pruned 1 jobs" in r.getMessage() for r in caplog.records)
    assert not list(settings.images_dir.rglob("*.png"))


def test_stop_does_not_wait_for_the_next_prune(settings: Settings) -> None:
    settings = settings.model_copy(update={"keep_uploads_days": 7.0, "prune_every_s": 3600.0})
    services = build_services(settings, generator=StandInGenerator())
    services.start()
    assert services.pruner is not None and services.pruner.running
    started = time.monotonic()
    services.stop()
    assert time.monotonic() - started < 2 and not services.pruner.running


def test_keeping_everything_starts_no_thread(services: Services) -> None:
    assert services.pruner is None  # the default settings: 0 days, keep forever


def test_settings_refuse_negative_days(easel_home: Path) -> None:
    with pytest.raises(ValueError, match="keep_jobs_days"):
        Settings(home=easel_home, keep_jobs_days=-1)
    with pytest.raises(ValueError, match="prune_every_s"):
        Settings(home=easel_home, prune_every_s=0)


def test_an_upload_pruned_while_a_job_is_submitted_refuses_the_job(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = upload(services, (3, 3, 3), days=10)
    check_pixels = services._check_pixels

    def prune_meanwhile(params: GenerationParams) -> None:
        """The pruner runs between the input check and the insert (the race)."""
        check_pixels(params)
        prune(services.db, services.settings.images_dir, NOW, RetentionPolicy(0, 7))

    monkeypatch.setattr(services, "_check_pixels", prune_meanwhile)
    with pytest.raises(InvalidParams) as refused:
        services.submit_job(GenerationParams(prompt="x", task="img2img", image=old, strength=0.5))

    assert refused.value.field == "image" and "upload it first" in refused.value.message
    assert count(services, "SELECT COUNT(*) FROM jobs") == 0, "no job naming a missing image"
