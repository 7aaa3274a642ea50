"""Retention: delete finished jobs and unused uploads once they are older than the settings
allow, rows first, then their files.

What goes (``RetentionPolicy``, from ``Settings.keep_jobs_days`` and ``keep_uploads_days``;
0 keeps forever):

- a job that finished (succeeded, failed, canceled) more than ``keep_jobs_days`` ago, with its
  events, its images (generated and training samples), rows and PNG files, and its webhook
  delivery once that is delivered or given up;
- an uploaded input image stored more than ``keep_uploads_days`` ago.

What stays, whatever its age: queued and running jobs, and every image a queued or running job
names as an input (``image``, ``mask``, ``style_image``). A finished job one of whose images a
live job names stays whole until that job is done, since its images' rows go with it (ON DELETE
CASCADE). Datasets, LoRAs and the speed measurements are never touched.

    >>> counts = prune(db, settings.images_dir, datetime.now(UTC), RetentionPolicy(30, 7))
    >>> counts.jobs, counts.files  # doctest: +SKIP
    (12, 31)

The server runs :class:`Pruner`, a thread that calls :func:`prune` every ``prune_every_s``
seconds (``Services.start``/``stop`` start and stop it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from easel.domain import IMAGE_FIELDS
from easel.jobs.db import Database

log = logging.getLogger(__name__)

FINISHED = "('succeeded', 'failed', 'canceled')"
# Ids of the images queued and running jobs name as inputs (the params JSON holds image ids
# under the request's field names), as a CTE ``live (image_id)``.
LIVE_INPUTS = (
    "WITH live (image_id) AS ("
    + " UNION ".join(
        f"SELECT json_extract(params, '$.{name}') FROM jobs WHERE status IN ('queued', 'running')"
        for name in IMAGE_FIELDS
    )
    + ") "
)
BATCH = 200  # jobs or uploads per transaction: a long prune never holds the write lock long
# the webhook deliveries of deleted jobs, once delivered or given up: one still being tried
# outlives its job (it holds the job's JSON) and goes with a later prune
DONE_DELIVERIES = (
    "DELETE FROM webhook_deliveries WHERE status != 'pending'"
    " AND job_id NOT IN (SELECT id FROM jobs)"
)


@dataclass(frozen=True)
class RetentionPolicy:
    """How long finished jobs and uploads are kept, in days (0: forever)."""

    keep_jobs_days: float = 0.0
    keep_uploads_days: float = 0.0

    @property
    def active(self) -> bool:
        """Whether there is anything to prune at all."""
        return self.keep_jobs_days > 0 or self.keep_uploads_days > 0


@dataclass
class PruneCounts:
    """What one :func:`prune` deleted."""

    jobs: int = 0
    events: int = 0
    images: int = 0  # a deleted job's generated and sample images
    uploads: int = 0
    files: int = 0  # PNG files removed from disk
    bytes: int = 0  # their size

    def add(self, other: PruneCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def __bool__(self) -> bool:
        return self.jobs > 0 or self.uploads > 0


def prune(
    db: Database,
    images_root: Path,
    now: datetime,
    policy: RetentionPolicy,
    *,
    stop: threading.Event | None = None,
) -> PruneCounts:
    """Delete what ``policy`` no longer keeps at time ``now`` (timezone-aware); returns counts.

    Works in batches of :data:`BATCH`, each one transaction that deletes rows, followed by the
    files of those rows. ``stop``, when set, ends the work between batches (what is deleted
    stays deleted; the rest waits for the next prune).
    """
    counts = PruneCounts()
    steps: list[tuple[Callable[[Database, str], tuple[PruneCounts, list[str]]], str]] = []
    if policy.keep_jobs_days > 0:
        steps.append((_prune_jobs, _cutoff(now, policy.keep_jobs_days)))
    if policy.keep_uploads_days > 0:
        steps.append((_prune_uploads, _cutoff(now, policy.keep_uploads_days)))
    for step, cutoff in steps:
        while stop is None or not stop.is_set():
            batch, paths = step(db, cutoff)
            _remove_files(db, images_root, paths, batch)
            counts.add(batch)
            if not batch:
                break
    _remove_empty_days(images_root, now.astimezone(UTC).date() - timedelta(days=1))
    return counts


def _cutoff(now: datetime, days: float) -> str:
    """``now - days`` as the ISO text the tables store (``queue.utcnow``'s format)."""
    return (now - timedelta(days=days)).astimezone(UTC).isoformat(timespec="microseconds")


def _prune_jobs(db: Database, cutoff: str) -> tuple[PruneCounts, list[str]]:
    """One transaction: up to BATCH finished jobs older than ``cutoff`` with their events and
    images; returns the counts and the deleted images' paths."""
    with db.transaction() as conn:
        ids = [
            row[0]
            for row in conn.execute(
                LIVE_INPUTS + f"SELECT id FROM jobs WHERE status IN {FINISHED}"
                " AND finished_at < ? AND NOT EXISTS (SELECT 1 FROM images i JOIN live"
                " ON live.image_id = i.id WHERE i.job_id = jobs.id)"
                " ORDER BY finished_at LIMIT ?",
                (cutoff, BATCH),
            )
        ]
        if not ids:
            conn.execute(DONE_DELIVERIES)
            return PruneCounts(), []
        marks = ", ".join("?" * len(ids))
        paths = [
            row[0]
            for row in conn.execute(
                f"DELETE FROM images WHERE job_id IN ({marks}) RETURNING path", ids
            )
        ]
        events = conn.execute(f"DELETE FROM events WHERE job_id IN ({marks})", ids).rowcount
        conn.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
        conn.execute(DONE_DELIVERIES)
    return PruneCounts(jobs=len(ids), events=events, images=len(paths)), paths


def _prune_uploads(db: Database, cutoff: str) -> tuple[PruneCounts, list[str]]:
    """One transaction: up to BATCH uploads older than ``cutoff`` that no live job names."""
    with db.transaction() as conn:
        paths = [
            row[0]
            for row in conn.execute(
                LIVE_INPUTS + "DELETE FROM images WHERE id IN (SELECT id FROM images"
                " WHERE kind = 'upload' AND created_at < ?"
                " AND id NOT IN (SELECT image_id FROM live WHERE image_id IS NOT NULL)"
                " ORDER BY created_at LIMIT ?) RETURNING path",
                (cutoff, BATCH),
            )
        ]
    return PruneCounts(uploads=len(paths)), paths


def _remove_files(db: Database, root: Path, paths: list[str], counts: PruneCounts) -> None:
    """Unlink the deleted rows' files, except any a remaining row still names."""
    if not paths:
        return
    marks = ", ".join("?" * len(paths))
    rows = db.query(f"SELECT path FROM images WHERE path IN ({marks})", tuple(paths))
    named = {row[0] for row in rows}
    for relative in paths:
        if relative in named:
            continue
        path = root / relative
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue  # already gone (a job that failed to write it)
        counts.files += 1
        counts.bytes += size


def _remove_empty_days(root: Path, before: date) -> None:
    """Remove empty day folders (``YYYY-MM-DD``, also under ``uploads/``) dated before
    ``before``: a worker writes only into today's, so an older one cannot be re-filled while
    this removes it."""
    for parent in (root, root / "uploads"):
        if not parent.is_dir():
            continue
        for folder in parent.iterdir():
            try:
                dated = date.fromisoformat(folder.name)
            except ValueError:
                continue
            if dated < before and folder.is_dir():
                try:
                    os.rmdir(folder)
                except OSError:
                    pass  # not empty


class Pruner:
    """A daemon thread that prunes at start and then every ``every_s`` seconds until
    :meth:`stop`."""

    def __init__(
        self, db: Database, images_root: Path, policy: RetentionPolicy, every_s: float
    ) -> None:
        self.db = db
        self.images_root = images_root
        self.policy = policy
        self.every_s = every_s
        self.runs = 0  # prunes completed (tests and health checks read it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="easel-pruner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to end (between batches) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the pruner did not stop within %.0f s", timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run_once(self) -> PruneCounts:
        counts = prune(self.db, self.images_root, datetime.now(UTC), self.policy, stop=self._stop)
        if counts:
            log.info(
                "pruned %d jobs (%d events, %d images) and %d uploads; %d files, %d bytes freed",
                counts.jobs,
                counts.events,
                counts.images,
                counts.uploads,
                counts.files,
                counts.bytes,
            )
        self.runs += 1
        return counts

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # a full disk or a locked database must not end the thread
                log.exception("pruning failed; trying again in %g s", self.every_s)
            if self._stop.wait(self.every_s):
                break
