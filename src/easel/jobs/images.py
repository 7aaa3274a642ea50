"""Stored images: PNG files under ``Settings.images_dir``, one row each in SQLite.

Generated and uploaded images share one id space, so a job names its inputs by id whichever
they are. A generated image's id is ``<job id>-<index>``, so storing a job's images again (after
a crash between writing them and finishing the job) overwrites the same files and rows instead
of duplicating; an upload's id is a fresh random one, its file a PNG of the decoded pixels.
"""

from __future__ import annotations

import builtins
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from PIL import Image

from easel.domain import EaselError, ImageRecord
from easel.jobs.db import Database
from easel.jobs.disk import DiskGuard
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
        seed: int | None,
        png: bytes,
        width: int,
        height: int,
        prompt: str,
        kind: str = "generated",
    ) -> ImageRecord: ...

    def discard(self, job_id: str) -> None: ...

    def load(self, image_id: str) -> Image.Image: ...


class DiskImageStore:
    """PNG files in ``root/<YYYY-MM-DD>/<id>.png`` with their rows in the database."""

    def __init__(self, db: Database, root: Path, disk: DiskGuard | None = None) -> None:
        self.db = db
        self.root = root
        self.disk = disk  # checked before each file is written (DiskFull when space is low)

    def save(
        self,
        *,
        job_id: str,
        index: int,
        seed: int | None,
        png: bytes,
        width: int,
        height: int,
        prompt: str,
        kind: str = "generated",
    ) -> ImageRecord:
        """Write the PNG (atomically: temp file + rename) and its row; returns the record.
        ``kind`` is "generated", or "sample" for a training job's validation images; the
        image belongs to the job's owner."""
        image_id = f"{job_id}-{index}"
        created = utcnow()
        relative = f"{created[:10]}/{image_id}.png"
        with self._write(relative, png), self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO images (id, job_id, kind, idx, seed, path, width, height,"
                " prompt, created_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
                " (SELECT owner FROM jobs WHERE id = ?))",
                (
                    image_id,
                    job_id,
                    kind,
                    index,
                    seed,
                    relative,
                    width,
                    height,
                    prompt,
                    created,
                    job_id,
                ),
            )
        return self.get(image_id)

    def save_upload(
        self, image: Image.Image, *, png: bytes, sha256: str, owner: str | None = None
    ) -> ImageRecord:
        """Store a checked, decoded input image (``imaging.decode_image``) as ``png``, owned
        by the key ``owner``."""
        image_id = uuid.uuid4().hex
        created = utcnow()
        relative = f"uploads/{created[:10]}/{image_id}.png"
        with self._write(relative, png), self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO images (id, job_id, kind, path, width, height, prompt, sha256,"
                " created_at, owner) VALUES (?, NULL, 'upload', ?, ?, ?, '', ?, ?, ?)",
                (image_id, relative, image.width, image.height, sha256, created, owner),
            )
        return self.get(image_id)

    def load(self, image_id: str) -> Image.Image:
        """The decoded pixels of a stored image (RGB, or RGBA for an upload with alpha)."""
        with Image.open(self.path(image_id)) as image:
            image.load()
            return image.convert("RGBA" if "A" in image.getbands() else "RGB")

    @contextmanager
    def _write(self, relative: str, data: bytes) -> Iterator[None]:
        """Write a file atomically (temp file + rename) for the block that stores its row;
        if that block fails (the database is full too), the file goes again: no file is
        left without a row, nor half a file."""
        if self.disk is not None:
            self.disk.check()
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_suffix(".tmp")
        try:
            temp.write_bytes(data)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)  # a full disk must not also collect half files
            raise
        try:
            yield
        except BaseException:
            target.unlink(missing_ok=True)
            raise

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

    def list(
        self,
        query: str | None = None,
        limit: int = 50,
        kind: str | None = None,
        owner: str | None = None,
    ) -> builtins.list[ImageRecord]:
        """Images newest first; ``query`` keeps those whose prompt contains it (any case),
        ``kind`` ("generated" or "upload") those of one kind, ``owner`` those of one key."""
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if query:
            escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append("prompt LIKE ? ESCAPE '\\'")
            args.append(f"%{escaped}%")
        if kind:
            where.append("kind = ?")
            args.append(kind)
        sql = "SELECT * FROM images" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self.db.query(sql + " ORDER BY created_at DESC, idx LIMIT ?", (*args, limit))
        return [image_record(r) for r in rows]
