"""Free space on the disk holding EASEL_HOME, checked before anything is written to it, and
what counts as the store failing (rather than a job or a request).

One :class:`DiskGuard` is built in ``build_services`` and asked before a job or a dataset is
accepted (``Services``: 507 ``DiskFull``), before the image store writes a file (a job whose
images no longer fit fails with the reason instead of filling the disk; an upload gets 507),
and by ``GET /api/v1/health``. A write that fails all the same (another program filled the
disk) is retried by the worker until the job's end is recorded (``Worker._end``); the API
answers such a failure with 503 ``StorageUnavailable``.

    guard = DiskGuard(settings.home, min_free_bytes=500 * MIB)
    guard.status().low      # True under 500 MiB free
    guard.check()           # raises DiskFull then, saying how much is free and the setting
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from easel.domain import DiskFull

MIB = 1024 * 1024


@dataclass(frozen=True)
class DiskStatus:
    free_bytes: int
    min_free_bytes: int

    @property
    def low(self) -> bool:
        return self.free_bytes < self.min_free_bytes


class DiskGuard:
    """Compares the free space under ``path`` with ``min_free_bytes`` (0 turns it off)."""

    def __init__(self, path: Path, min_free_bytes: int) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes

    def status(self) -> DiskStatus:
        # a statvfs call: cheap enough for every submit and every image written
        return DiskStatus(shutil.disk_usage(self.path).free, self.min_free_bytes)

    def check(self) -> None:
        """Raise DiskFull (507) when the free space is under the minimum."""
        status = self.status()
        if status.low:
            raise DiskFull(
                f"only {status.free_bytes // MIB} MiB free on the disk holding EASEL_HOME, "
                f"under min_free_disk_mb ({self.min_free_bytes // MIB} MiB); free some space "
                "(or lower EASEL_MIN_FREE_DISK_MB) and retry"
            )


# errno values that mean the store failed rather than the job (a job failing on one says so)
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` may be the store failing (a file or database write: disk full, I/O
    error, a locked, read-only or damaged database) rather than a bug: worth retrying later."""
    return isinstance(exc, OSError | sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def storage_failure(exc: BaseException) -> str | None:
    """What failed, in a few words, when ``exc`` is the store failing; None otherwise (an
    OSError such as a missing file is not the disk's fault).

        >>> storage_failure(OSError(errno.ENOSPC, "No space left on device"))
        'No space left on device (ENOSPC)'
    """
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return f"{exc.strerror} ({errno.errorcode[exc.errno]})"
    if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
        return f"database error: {exc}"
    return None
