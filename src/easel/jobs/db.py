"""The SQLite database behind the queue, the image store and the event log.

One connection per :class:`Database`, guarded by a lock: SQLite serialises writers anyway, and
every statement here is a few microseconds, so one connection is simpler than a pool and never
sees ``database is locked`` from itself. Other processes (``easel`` CLI commands) get WAL's
concurrent readers and wait up to ``busy_timeout`` for the writer.

    >>> db = Database(tmp_path / "easel.db")  # doctest: +SKIP
    >>> with db.transaction() as conn:
    ...     conn.execute("UPDATE jobs SET priority = 1 WHERE id = ?", (job_id,))
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Numbered migrations: MIGRATIONS[n - 1] takes the schema from version n - 1 to n
# (``PRAGMA user_version``). Append new ones; never edit a released one.
MIGRATIONS: list[str] = [
    # 1: jobs, their images, their events, and measured speed for ETAs
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- submission order (FIFO within a priority)
        id TEXT NOT NULL UNIQUE,
        task TEXT NOT NULL,
        model TEXT NOT NULL,
        params TEXT NOT NULL,                    -- JSON of the resolved GenerationParams
        width INTEGER NOT NULL,                  -- copied from params: the ETA lookup key
        height INTEGER NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        owner TEXT,
        status TEXT NOT NULL CHECK (status IN
            ('queued', 'running', 'succeeded', 'failed', 'canceled')),
        attempts INTEGER NOT NULL DEFAULT 0,     -- times a worker started it
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER NOT NULL DEFAULT 0,  -- steps * num_images (steps count on)
        error TEXT,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT
    );
    CREATE INDEX jobs_waiting ON jobs (status, priority DESC, seq);
    CREATE INDEX jobs_owner ON jobs (owner);

    CREATE TABLE images (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,                    -- position within the job's result
        seed INTEGER NOT NULL,
        path TEXT NOT NULL,                      -- relative to Settings.images_dir
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (job_id, idx)
    );
    CREATE INDEX images_created ON images (created_at);

    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,    -- the SSE id: increases across restarts
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        type TEXT NOT NULL,
        data TEXT NOT NULL,                      -- JSON
        created_at TEXT NOT NULL
    );
    CREATE INDEX events_job ON events (job_id, id);

    CREATE TABLE step_timings (
        model TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        device TEXT NOT NULL,
        seconds_per_step REAL NOT NULL,          -- exponential moving average
        samples INTEGER NOT NULL,
        PRIMARY KEY (model, width, height, device)
    );
    """,
    # 2: uploaded images share the images table (and its id space) with generated ones: job_id
    # becomes optional, `kind` tells them apart, uploads record their pixel hash. SQLite cannot
    # relax NOT NULL in place, so the table is rebuilt with every row kept.
    """
    CREATE TABLE images_v2 (
        id TEXT PRIMARY KEY,
        job_id TEXT REFERENCES jobs (id) ON DELETE CASCADE,  -- NULL for uploads
        kind TEXT NOT NULL DEFAULT 'generated' CHECK (kind IN ('generated', 'upload')),
        idx INTEGER NOT NULL DEFAULT 0,
        seed INTEGER,                            -- NULL for uploads
        path TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        sha256 TEXT,                             -- imaging.pixel_hash of an upload
        created_at TEXT NOT NULL,
        UNIQUE (job_id, idx)
    );
    INSERT INTO images_v2 (id, job_id, kind, idx, seed, path, width, height, prompt, created_at)
        SELECT id, job_id, 'generated', idx, seed, path, width, height, prompt, created_at
        FROM images;
    DROP TABLE images;
    ALTER TABLE images_v2 RENAME TO images;
    CREATE INDEX images_created ON images (created_at);
    CREATE INDEX images_kind ON images (kind, created_at)
    """,
    # 3: a training job's validation images are kind 'sample' (the history lists only
    # 'generated'); widening a CHECK means rebuilding the table again, every row kept.
    """
    CREATE TABLE images_v3 (
        id TEXT PRIMARY KEY,
        job_id TEXT REFERENCES jobs (id) ON DELETE CASCADE,  -- NULL for uploads
        kind TEXT NOT NULL DEFAULT 'generated'
            CHECK (kind IN ('generated', 'upload', 'sample')),
        idx INTEGER NOT NULL DEFAULT 0,
        seed INTEGER,                            -- NULL for uploads and samples
        path TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        sha256 TEXT,                             -- imaging.pixel_hash of an upload
        created_at TEXT NOT NULL,
        UNIQUE (job_id, idx)
    );
    INSERT INTO images_v3 SELECT id, job_id, kind, idx, seed, path, width, height, prompt,
        sha256, created_at FROM images;
    DROP TABLE images;
    ALTER TABLE images_v3 RENAME TO images;
    CREATE INDEX images_created ON images (created_at);
    CREATE INDEX images_kind ON images (kind, created_at)
    """,
    # 4: API keys (only a hash of each secret), web UI sessions, datasets' and images' owners
    # (a generated image belongs to its job's key, an upload to the key that sent it)
    """
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,                     -- what jobs, images, datasets record as owner
        name TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,               -- sha256 of the secret
        scopes TEXT NOT NULL,                    -- space-separated: generate train admin
        rate_per_minute INTEGER,                 -- NULL: no limit
        max_jobs INTEGER,                        -- queued + running at once (NULL: no limit)
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE UNIQUE INDEX keys_active_name ON keys (name) WHERE revoked_at IS NULL;
    -- each owner's last start: the queue's turn order reads it on every claim and position
    CREATE INDEX jobs_owner_started ON jobs (owner, started_at);

    CREATE TABLE sessions (
        hash TEXT PRIMARY KEY,                   -- sha256 of the cookie's token
        key_id TEXT NOT NULL REFERENCES keys (id) ON DELETE CASCADE,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL
    );

    -- who uploaded each dataset (the files are EASEL_HOME/datasets/<id>). One made before
    -- this has no row and belongs to no key, so only admin keys see it.
    CREATE TABLE datasets (
        id TEXT PRIMARY KEY,
        owner TEXT,
        created_at TEXT NOT NULL
    );

    ALTER TABLE images ADD COLUMN owner TEXT;
    UPDATE images SET owner = (SELECT owner FROM jobs WHERE jobs.id = images.job_id)
        WHERE job_id IS NOT NULL;
    CREATE INDEX images_owner ON images (owner, created_at)
    """,
]


class Database:
    """One SQLite file, migrated on open, with a :meth:`transaction` context manager."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves in transaction()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable on crash
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute("PRAGMA busy_timeout = 5000")
        self.migrate()

    @property
    def version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Apply the migrations this file has not seen yet, each in its own transaction."""
        for number in range(self.version + 1, len(MIGRATIONS) + 1):
            with self.transaction() as conn:
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the block as one write transaction: committed on success, rolled back on error.

        ``BEGIN IMMEDIATE`` takes the write lock up front, so a read-then-write inside the block
        (count queued jobs, then insert) cannot race another process. A nested call on the
        same thread joins the outer transaction (so a job row and its first event commit together).
        """
        with self._lock:
            if self._conn.in_transaction:
                yield self._conn
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        """Run one read statement and return all rows."""
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
