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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from easel.domain import EaselError

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
    # 5: webhooks. A job's URL is a column, not a field of its params: it is no generation
    # setting and must not reach the PNG metadata. The outbox (easel.jobs.webhooks) gets its
    # row in the transaction that records the job's end; it names the job without a foreign
    # key, so a delivery still due outlives a job that retention deletes.
    """
    ALTER TABLE jobs ADD COLUMN webhook TEXT;

    CREATE TABLE webhook_deliveries (
        id TEXT PRIMARY KEY,                     -- the Easel-Delivery header (same on retries)
        job_id TEXT NOT NULL UNIQUE,             -- one delivery per job: its end
        owner TEXT,                              -- the job's key: whose secret signs it
        url TEXT NOT NULL,
        event TEXT NOT NULL,                     -- job.succeeded, job.failed, job.canceled
        body TEXT NOT NULL,                      -- the job's JSON at its end, sent as is
        status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,     -- tries made (counted before each)
        next_at REAL NOT NULL,                   -- Unix time the next try is due
        last_error TEXT,
        created_at TEXT NOT NULL,
        finished_at TEXT                         -- delivered or given up
    );
    CREATE INDEX webhook_due ON webhook_deliveries (status, next_at);

    -- the server secret the keys' signing secrets derive from, made on first use (a backup
    -- carries it). The webhook_secret setting, when set, is used instead.
    CREATE TABLE webhook_secret (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        secret TEXT NOT NULL,
        created_at TEXT NOT NULL
    )
    """,
]


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
# what to do about a database that cannot be opened as it is: the CLI prints it on one line
RECOVER = (
    "move it away, then restore EASEL_HOME from a backup made with `easel backup` (or point "
    "EASEL_HOME at the backup), or start a new, empty queue with `easel serve --fresh-db`"
)


class DatabaseUnusable(EaselError):
    """``easel.db`` cannot be used as it is: not SQLite, damaged, newer than this code, or not
    readable and writable. The message says what is wrong and what to do (HTTP 503)."""

    status = 503


def inspect_database(path: Path, *, quick_check: bool = True) -> int | None:
    """Check the database file at ``path`` without changing it, before anything opens it for
    writing: None when there is none yet (no file, or a zero-length one, which SQLite takes as
    empty), else its schema version (``PRAGMA user_version``; 0 is SQLite without Easel's
    tables). ``quick_check`` reads every page (``PRAGMA quick_check``: seconds for a
    gigabyte). Raises :class:`DatabaseUnusable`.

        >>> inspect_database(Settings().db_path)  # doctest: +SKIP
        5
    """
    # 1. the file: there, a regular file, starting with SQLite's header
    try:
        if not path.exists():
            return None
        if not path.is_file():
            raise DatabaseUnusable(f"{path} is not a file; {RECOVER}", field="home")
        with path.open("rb") as handle:
            header = handle.read(100)
    except OSError as exc:
        raise DatabaseUnusable(
            f"cannot read {path}: {exc.strerror}; make EASEL_HOME and easel.db readable and "
            "writable by this user",
            field="home",
        ) from None
    wal = path.with_name(path.name + "-wal")
    if not header and not (wal.is_file() and wal.stat().st_size):
        return None
    if not header.startswith(SQLITE_MAGIC):
        raise DatabaseUnusable(
            f"{path} is not an SQLite database (it starts with {header[:16]!r}); {RECOVER}",
            field="home",
        )
    # 2. its pages, read-only. Without a -wal file no connection is open, and immutable=1
    # opens it without making -wal and -shm files; with one, mode=ro reads what it holds.
    mode = "ro" if wal.exists() else "ro&immutable=1"
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode={mode}", uri=True)
    except sqlite3.Error as exc:
        raise _unusable(path, exc) from None
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")] if quick_check else []
    except sqlite3.Error as exc:
        raise _unusable(path, exc) from None
    finally:
        conn.close()
    if problems and problems != ["ok"]:
        first = problems[0].replace("*** in database main ***", "").strip().splitlines()
        detail = _truncation(path, header) or f"PRAGMA quick_check: {first[0] if first else '?'}"
        raise DatabaseUnusable(f"{path} is damaged ({detail}); {RECOVER}", field="home")
    # 3. a schema this code knows
    if version > len(MIGRATIONS):
        raise DatabaseUnusable(
            f"{path} was written by a newer Easel (schema version {version}; this one knows up "
            f"to {len(MIGRATIONS)}); upgrade Easel, or restore a backup this version made",
            field="home",
        )
    return version


def _truncation(path: Path, header: bytes) -> str | None:
    """A note like "truncated: N of M bytes" when the file is shorter than its header says."""
    if len(header) < 100:
        return f"truncated: {len(header)} bytes, shorter than SQLite's header"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # the page count is valid only while the change counter matches "version-valid-for"
    valid = header[24:28] == header[92:96]
    size = path.stat().st_size
    if valid and size < pages * page_size:
        return f"truncated: {size} of {pages * page_size} bytes"
    return None


def _unusable(path: Path, exc: sqlite3.Error) -> DatabaseUnusable:
    """The one-line message for an error SQLite gave while opening ``path``."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith("SQLITE_READONLY"):
        problem = (
            f"cannot write {path} (read-only); make EASEL_HOME and the files in it writable by "
            "this user"
        )
    elif name.startswith("SQLITE_CANTOPEN"):
        problem = (
            f"cannot open {path}; make EASEL_HOME and the files in it readable and writable "
            "by this user"
        )
    elif name.startswith("SQLITE_FULL"):
        problem = f"the disk holding {path} is full; free some space and start again"
    elif name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        detail = _truncation(path, _head(path)) or f"SQLite: {exc}"
        problem = f"{path} is damaged ({detail}); {RECOVER}"
    else:
        problem = f"cannot use {path}: {exc}"
    return DatabaseUnusable(problem, field="home")


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(100)
    except OSError:
        return b""


class Database:
    """One SQLite file, migrated on open, with a :meth:`transaction` context manager."""

    def __init__(self, path: Path) -> None:
        """Open the database at ``path`` (made, with its folder, when missing) and migrate it.
        Raises :class:`DatabaseUnusable`, before writing anything, when the file is not
        SQLite, is newer than this code, or cannot be read and written (``check_home`` in
        easel.services also reads every page first)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnusable(
                f"cannot create {path.parent}: {exc.strerror}; create it, or set EASEL_HOME to "
                "a folder this user can write",
                field="home",
            ) from None
        inspect_database(path, quick_check=False)
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0  # 1 inside transaction() (nested calls join it)
        self._after_commit: list[Callable[[], None]] = []
        # isolation_level=None: we issue BEGIN/COMMIT ourselves in transaction()
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:  # a folder this user cannot write
            raise _unusable(path, exc) from None
        try:
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable on crash
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA busy_timeout = 5000")
            self.migrate()
        except sqlite3.Error as exc:  # read-only file, damaged page, disk full
            self._conn.close()
            raise _unusable(path, exc) from None

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
            if self._depth:
                yield self._conn
                return
            if self._conn.in_transaction:  # a failed COMMIT or ROLLBACK left one open
                self._conn.execute("ROLLBACK")
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
                # a COMMIT can fail too (disk full, I/O error): then nothing of the block
                # happened, and the connection must not stay inside it (depth, not
                # in_transaction, says whether a call is nested)
                self._conn.execute("COMMIT")
            except BaseException:
                self._after_commit.clear()
                if self._conn.in_transaction:
                    with suppress(sqlite3.Error):  # the next transaction retries it
                        self._conn.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0
            callbacks, self._after_commit = self._after_commit, []
            for callback in callbacks:
                callback()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the current transaction has committed; never if it rolls
        back. For what others must not see before it is durable (live events)."""
        with self._lock:
            assert self._depth, "after_commit is for use inside transaction()"
            self._after_commit.append(callback)

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        """Run one read statement and return all rows."""
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
