"""API keys, web sessions and per-key request rates.

A key's secret is shown once, when it is made, and stored only as its SHA-256: the secret is
32 random bytes, so a fast hash is enough (nothing to brute-force) and a lookup by hash is one
indexed read. Revoking keeps the row (what the key owned keeps its owner id) and ends its
sessions. A web session is a random token in an HttpOnly cookie, stored hashed like a key.

    keys = KeyStore(db)
    record, secret = keys.create("alice", scopes=("generate",), rate_per_minute=60)
    keys.authenticate(secret).principal()      # -> Principal(key_id=record.id, ...)
"""

from __future__ import annotations

import builtins
import hashlib
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta

from easel.domain import SCOPES, InvalidParams, KeyNotFound, KeyRecord, NameTaken, QuotaExceeded
from easel.jobs.db import Database
from easel.jobs.queue import parse_time, utcnow

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a whole name (fullmatch)
MAX_LIMIT = 1_000_000  # the most rate_per_minute and max_jobs a key may be given
SECRET_PREFIX = "easel_"
MAX_SECRET_CHARS = 200  # longer than any secret we make: refused before hashing


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class KeyStore:
    """Keys and sessions in the database. Thread-safe (the database serialises)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # --- keys -----------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        scopes: tuple[str, ...] = ("generate",),
        rate_per_minute: int | None = None,
        max_jobs: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key and its secret (the only time the secret exists outside the caller).
        Raises InvalidParams naming the field (a malformed name, an unknown scope, a limit
        under 1), NameTaken (409) for the name of an active key."""
        if not NAME_RE.fullmatch(name):
            raise InvalidParams(
                "name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                f"digit (got {name!r})",
                field="name",
            )
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise InvalidParams(
                f"scopes must be some of {', '.join(SCOPES)} (got {', '.join(scopes) or 'none'})",
                field="scope",
            )
        for field, value in (("rate_per_minute", rate_per_minute), ("max_jobs", max_jobs)):
            if value is not None and (isinstance(value, bool) or not 1 <= value <= MAX_LIMIT):
                raise InvalidParams(
                    f"{field} must be a whole number from 1 to {MAX_LIMIT} (got {value!r})",
                    field=field,
                )
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        key_id = uuid.uuid4().hex
        ordered = tuple(s for s in SCOPES if s in scopes)
        try:
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO keys (id, name, hash, scopes, rate_per_minute, max_jobs,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        key_id,
                        name,
                        secret_hash(secret),
                        " ".join(ordered),
                        rate_per_minute,
                        max_jobs,
                        utcnow(),
                    ),
                )
        except sqlite3.IntegrityError:
            raise NameTaken(
                f"a key named {name!r} exists already; revoke it first or pick another name",
                field="name",
            ) from None
        return self.get(key_id), secret

    def get(self, key_id: str) -> KeyRecord:
        rows = self.db.query("SELECT * FROM keys WHERE id = ?", (key_id,))
        if not rows:
            raise InvalidParams(f"no key with id {key_id!r}", field="key")
        return _key(rows[0])

    def list(self, *, revoked: bool = False) -> builtins.list[KeyRecord]:
        """Active keys by name (with ``revoked``, revoked ones too)."""
        where = "" if revoked else " WHERE revoked_at IS NULL"
        return [_key(r) for r in self.db.query(f"SELECT * FROM keys{where} ORDER BY name, id")]

    def revoke(self, name: str) -> KeyRecord:
        """Revoke the active key called ``name`` and end its web sessions; KeyNotFound (404)
        when there is none."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):  # no key has such a name
            raise KeyNotFound(f"no active key named {name!r}", field="name")
        with self.db.transaction() as conn:
            row = conn.execute(
                "UPDATE keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL RETURNING id",
                (utcnow(), name),
            ).fetchone()
            if row is None:
                raise KeyNotFound(f"no active key named {name!r}", field="name")
            conn.execute("DELETE FROM sessions WHERE key_id = ?", (row[0],))
        return self.get(row[0])

    def any_made(self) -> bool:
        """Whether the server needs keys: true once a key was made, revoked ones included, so
        that revoking the last key closes the server rather than opening it to everyone."""
        return bool(self.db.query("SELECT 1 FROM keys LIMIT 1"))

    def authenticate(self, secret: str) -> KeyRecord | None:
        """The active key with this secret, or None."""
        if not secret or len(secret) > MAX_SECRET_CHARS:
            return None
        rows = self.db.query(
            "SELECT * FROM keys WHERE hash = ? AND revoked_at IS NULL", (secret_hash(secret),)
        )
        return _key(rows[0]) if rows else None

    # --- web sessions ---------------------------------------------------------------------------

    def start_session(self, key_id: str, *, days: float) -> str:
        """A new session token for the web UI's cookie, valid for ``days``."""
        token = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE expires_at < ?", (now.isoformat(),))
            conn.execute(
                "INSERT INTO sessions (hash, key_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (
                    secret_hash(token),
                    key_id,
                    now.isoformat(),
                    (now + timedelta(days=days)).isoformat(),
                ),
            )
        return token

    def session_key(self, token: str) -> KeyRecord | None:
        """The active key a live session token belongs to, or None."""
        if not token or len(token) > MAX_SECRET_CHARS:
            return None
        rows = self.db.query(
            "SELECT k.* FROM sessions s JOIN keys k ON k.id = s.key_id"
            " WHERE s.hash = ? AND s.expires_at > ? AND k.revoked_at IS NULL",
            (secret_hash(token), datetime.now(UTC).isoformat()),
        )
        return _key(rows[0]) if rows else None

    def end_session(self, token: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE hash = ?", (secret_hash(token),))


def _key(row: sqlite3.Row) -> KeyRecord:
    created = parse_time(row["created_at"])
    assert created is not None
    return KeyRecord(
        id=row["id"],
        name=row["name"],
        scopes=tuple(row["scopes"].split()),
        rate_per_minute=row["rate_per_minute"],
        max_jobs=row["max_jobs"],
        created_at=created,
        revoked_at=parse_time(row["revoked_at"]),
    )


class RateLimiter:
    """Requests per minute per key: a sliding window of the last minute's request times, in
    memory (a restart forgets it, which errs toward the client)."""

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, deque[float]] = {}

    def admit(self, key_id: str, per_minute: int | None) -> None:
        """Count one request, or raise QuotaExceeded (with the seconds until one is free)."""
        if per_minute is None:
            return
        now = time.monotonic()
        with self._lock:
            seen = self._seen.setdefault(key_id, deque())
            while seen and seen[0] <= now - self.WINDOW_S:
                seen.popleft()
            if len(seen) >= per_minute:
                wait = max(1, int(seen[0] + self.WINDOW_S - now) + 1)
                raise QuotaExceeded(
                    f"this key may make {per_minute} requests per minute; retry in {wait} s",
                    retry_after_s=wait,
                )
            seen.append(now)
