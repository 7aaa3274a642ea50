"""Generated images: PNG files under ``Settings.images_dir``, one row each in SQLite.

An image's id is ``<job id>-<index>``, so storing a job's images again (after a crash between
writing them and finishing the job) overwrites the same files and rows instead of duplicating.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Protocol

from easel.domain import EaselError, ImageRecord
from easel.jobs.db import Database
from easel.jobs.queue import image_record, utcnow


class ImageNotFound(EaselError):
    status = 404


class ImageStore(Protocol):
    """The image store's seam (STYLE rule 2): what a worker needs from it."""

    def save(
        self,
        *,
        job_id: str,
        index: int,
        seed: int,
        png: bytes,
        width: int,
        height: int,
        prompt: str,
    ) -> ImageRecord: ...

    def discard(self, job_id: str) -> None: ...


class DiskImageStore:
    """PNG files in ``root/<YYYY-MM-DD>/<id>.png`` with their rows in the database."""

    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = root

    def save(
        self,
        *,
        job_id: str,
        index: int,
        seed: int,
        png: bytes,
        width: int,
        height: int,
        prompt: str,
    ) -> ImageRecord:
        """Write the PNG (atomically: temp file + rename) and its row; returns the record."""
        image_id = f"{job_id}-{index}"
        created = utcnow()
        relative = f"{created[:10]}/{image_id}.png"
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_suffix(".tmp")
        try:
            temp.write_bytes(png)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)  # a full disk must not also collect half files
            raise
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO images (id, job_id, idx, seed, path, width, height, prompt,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (image_id, job_id, index, seed, relative, width, height, prompt, created),
            )
        return self.get(image_id)

    def discard(self, job_id: str) -> None:
        """Delete a job's images, rows and files: a job that failed partway (image 2 of 3 could
        not be written) lists none of them."""
        with self.db.transaction() as conn:
            paths = conn.execute(
                "DELETE FROM images WHERE job_id = ? RETURNING path", (job_id,)
            ).fetchall()
        for (path,) in paths:
            (self.root / path).unlink(missing_ok=True)

    def get(self, image_id: str) -> ImageRecord:
        rows = self.db.query("SELECT * FROM images WHERE id = ?", (image_id,))
        if not rows:
            raise ImageNotFound(f"no image with id {image_id!r}", field="image_id")
        return image_record(rows[0])

    def path(self, image_id: str) -> Path:
        """The PNG file of an image; raises ImageNotFound when the row or the file is gone."""
        path = self.root / self.get(image_id).path
        if not path.is_file():
            raise ImageNotFound(f"the file of image {image_id!r} is missing", field="image_id")
        return path

    def list(self, query: str | None = None, limit: int = 50) -> builtins.list[ImageRecord]:
        """Images newest first; ``query`` keeps those whose prompt contains it (any case)."""
        if query:
            pattern = (
                "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            )
            rows = self.db.query(
                "SELECT * FROM images WHERE prompt LIKE ? ESCAPE '\\'"
                " ORDER BY created_at DESC, idx LIMIT ?",
                (pattern, limit),
            )
        else:
            rows = self.db.query(
                "SELECT * FROM images ORDER BY created_at DESC, idx LIMIT ?", (limit,)
            )
        return [image_record(r) for r in rows]
