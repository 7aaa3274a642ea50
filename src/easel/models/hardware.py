"""Facts about the machine that choose how models run (kept free of Easel's server-side imports,
so that `easel.training.tinyshapes.recipe` also runs as a script on a bare GPU machine)."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import sys
from functools import cache
from pathlib import Path

_LIBC = (
    ctypes.CDLL("libc.so.6")
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    else None
)


@cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (Intel AMX or AVX512-BF16).

    There, bf16 weights with channels_last run an SD-sized UNet about 4x faster than fp32;
    elsewhere bf16 is emulated and slower than fp32.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"amx_bf16", "avx512_bf16"})
    return False


def trim_heap() -> None:
    """Collect Python's cycles and hand glibc's freed heap pages back to the system (it keeps
    tensors below its adaptive mmap threshold for reuse), so that an unloaded model or a
    dropped copy really leaves the process."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def memory_bytes() -> int | None:
    """The memory this process may use: the machine's physical memory, or its cgroup's limit
    where that is lower (a container); None where neither can be read."""
    try:
        total: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    if limit.isdigit() and (total is None or int(limit) < total):
        return int(limit)
    return total
