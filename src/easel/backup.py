"""``easel backup PATH``: a consistent copy of EASEL_HOME, taken while the server runs.

The database is copied with SQLite's online backup API, which reads one snapshot (a single read
transaction; in WAL mode the server keeps writing meanwhile). Then the image files that snapshot
names are copied: an image's file is written before its row commits, so every row in the
snapshot had its file. One deleted after the snapshot (pruned, or a failed job's discarded
image) is left out of the copy with its row, so the copy never names a file it lacks. LoRAs,
datasets and models.toml follow as they are; model weights do not (models.toml names them by
path or hub id).

A copy is a complete EASEL_HOME: restoring means pointing ``EASEL_HOME`` at it.

    >>> summary = backup(Settings(), Path("/backups/easel-2025-06-01"))  # doctest: +SKIP
    >>> summary.jobs, summary.images
    (120, 342)
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from easel.config import Settings
from easel.domain import EaselError
from easel.jobs.db import inspect_database

UNFINISHED = (".partial", ".tmp")  # the suffixes of files and folders still being written


@dataclass
class BackupSummary:
    """What :func:`backup` copied."""

    target: Path
    jobs: int
    images: int  # image files copied (generated, uploads, training samples)
    left_out: int  # images whose file was deleted after the snapshot (not in the copy)
    lora_files: int
    datasets: int
    bytes: int  # everything written, the database included


def backup(settings: Settings, target: Path) -> BackupSummary:
    """Copy ``settings.home`` into ``target`` (a new or empty folder outside it).

    Raises EaselError when there is no database, when ``target`` is inside EASEL_HOME, is a
    file or a folder with something in it, or when the copy fails its integrity check.
    """
    # 1. check the source and the target
    source_db = settings.db_path
    # not SQLite, damaged or newer: the same line the server gives (its copy would fail too)
    if inspect_database(source_db) is None:  # no file, or a zero-length one
        raise EaselError(
            f"no database at {source_db}: nothing to back up (is EASEL_HOME set?)", field="home"
        )
    check_target(settings.home, target)
    try:
        return _copy_home(settings, target)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise EaselError(f"backup failed: {where}{exc.strerror or exc}", field="path") from exc
    except sqlite3.Error as exc:
        raise EaselError(f"backup failed: the database: {exc}", field="path") from exc


def _copy_home(settings: Settings, target: Path) -> BackupSummary:
    target.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds the keys' hashes

    # 2. snapshot the database
    copy_db = target / "easel.db"
    _snapshot(settings.db_path, copy_db)

    # 3. copy the images the snapshot names; drop the rows of files deleted since
    conn = sqlite3.connect(copy_db)
    try:
        copied, missing, written = 0, [], 0
        for image_id, relative in conn.execute("SELECT id, path FROM images").fetchall():
            try:
                written += _copy_file(settings.images_dir / relative, target / "images" / relative)
                copied += 1
            except FileNotFoundError:
                missing.append(image_id)
        with conn:
            conn.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in missing])
        (jobs,) = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()

        # 4. check the copy
        result = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
        if result != ["ok"]:
            raise EaselError(f"the copied database failed its integrity check: {result[:3]}")
    finally:
        conn.close()
    written += copy_db.stat().st_size

    # 5. LoRAs, datasets and the catalog additions, as they are now
    lora_files, lora_bytes = _copy_tree(settings.loras_dir, target / "loras")
    _, dataset_bytes = _copy_tree(settings.datasets_dir, target / "datasets")
    datasets = sum(1 for p in (target / "datasets").glob("*/dataset.json"))
    if settings.user_models_file.is_file():
        written += _copy_file(settings.user_models_file, target / "models.toml")
    return BackupSummary(
        target=target,
        jobs=jobs,
        images=copied,
        left_out=len(missing),
        lora_files=lora_files,
        datasets=datasets,
        bytes=written + lora_bytes + dataset_bytes,
    )


def check_target(home: Path, target: Path) -> None:
    """Refuse a target inside EASEL_HOME (it would copy itself, and a restore would nest
    homes), a file, or a folder with anything in it (a backup never overwrites)."""
    home, resolved = home.resolve(), target.resolve()
    if resolved == home or home in resolved.parents:
        raise EaselError(
            f"{target} is inside EASEL_HOME ({home}); back up to a folder outside it",
            field="path",
        )
    if resolved.exists() and not resolved.is_dir():
        raise EaselError(f"{target} is a file; give a new or empty folder", field="path")
    if resolved.is_dir() and any(resolved.iterdir()):
        raise EaselError(
            f"{target} is not empty; give a new or empty folder (a backup never overwrites)",
            field="path",
        )


def _snapshot(source: Path, target: Path) -> None:
    """SQLite's online backup of ``source`` into ``target``, all pages in one step: one read
    transaction, so one consistent state (copying page batches instead would restart each time
    the server commits)."""
    src = sqlite3.connect(source, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _copy_file(source: Path, target: Path) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    return target.stat().st_size


def _copy_tree(source: Path, target: Path) -> tuple[int, int]:
    """Copy a folder's files (files, bytes), leaving out work in progress: a LoRA or dataset
    still being written (``*.partial``, ``*.tmp``), or a file that vanishes meanwhile."""
    files = size = 0
    for folder, dirs, names in os.walk(source):
        dirs[:] = [d for d in dirs if not d.endswith(UNFINISHED)]
        for name in names:
            if name.endswith(UNFINISHED):
                continue
            path = Path(folder, name)
            try:
                size += _copy_file(path, target / path.relative_to(source))
                files += 1
            except FileNotFoundError:
                continue
    return files, size
