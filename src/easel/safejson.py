"""JSON from files Easel did not write, read with its size, nesting and item count bounded
before it is parsed.

A model folder's ``model_index.json`` and ``easel.json``, a ``.safetensors`` header, a LoRA's
record, a dataset's ``metadata.jsonl`` and manifest, a PNG's ``easel`` chunk: any of them may be
crafted. Python's ``json`` parses recursively (50,000 nested ``[`` raise RecursionError) and
builds a Python object per value (``[{},{},...]`` takes some 30 times its size in memory), so
each is checked first, in linear time and without building anything:

    data = read_json_bounded(folder / "model_index.json", field="model")   # InvalidParams
    row = loads_bounded(line, what="metadata.jsonl line 3", field="dataset")

Every failure (too large, nested too deep, too many items, not UTF-8, not JSON, unreadable) is
an InvalidParams naming ``field``, with a message that names ``what`` and the limit.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from array import array
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO

from easel.domain import InvalidParams

# Configuration files (model_index.json, easel.json, a LoRA's record) are a few kB
MAX_CONFIG_BYTES = 1 << 20
# nesting: Easel's own files nest 4 deep, a safetensors header 3; serde_json, which the
# safetensors crate parses headers with, stops at 128
MAX_DEPTH = 64
# strings, plus values separated by commas, plus arrays and objects: a safetensors header has
# about ten per tensor, so a million is 100,000 tensors (large checkpoints have a few thousand)
MAX_ITEMS = 1_000_000

_NOT_BACKSLASH = re.compile(rb"[^\\]")
_CHUNK = 1 << 16  # bytes _check_shape looks at in one go
_PIECE = 4096  # brackets it follows the depth of in one go
_KEEP_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")  # the bytes to delete
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # as signed bytes: +1 in, -1 out


def loads_bounded(
    data: bytes | str,
    *,
    what: str,
    field: str,
    max_bytes: int | None = MAX_CONFIG_BYTES,
    max_depth: int = MAX_DEPTH,
    max_items: int = MAX_ITEMS,
) -> Any:
    """``data`` (UTF-8 bytes, or text) parsed as JSON once its size, nesting depth and item count
    are within the limits (``max_bytes=None``: the caller bounded the size);
    InvalidParams(field=``field``) naming ``what`` otherwise."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if max_bytes is not None and len(raw) > max_bytes:
        raise InvalidParams(
            f"{what} is {len(raw)} bytes; at most {max_bytes} are read", field=field
        )
    reason = _check_shape(raw, max_depth, max_items)
    if reason is not None:
        raise InvalidParams(f"{what} {reason}", field=field)
    try:
        text = data if isinstance(data, str) else raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidParams(
            f"{what} is not UTF-8 text (byte {exc.start} is not valid UTF-8)", field=field
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidParams(
            f"{what} is not JSON ({exc.msg}, line {exc.lineno} column {exc.colno})", field=field
        ) from None
    except (ValueError, RecursionError, MemoryError) as exc:
        # an integer of more than 4300 digits; the others cannot happen after _check_shape
        # but must never become a 500
        raise InvalidParams(f"{what} cannot be parsed ({exc})", field=field) from None


def read_json_bounded(
    path: Path,
    *,
    field: str,
    what: str | None = None,
    max_bytes: int = MAX_CONFIG_BYTES,
    max_depth: int = MAX_DEPTH,
    max_items: int = MAX_ITEMS,
) -> Any:
    """The JSON file at ``path``, read only when it is at most ``max_bytes`` long (the size is
    taken before reading); InvalidParams(field=``field``) for a missing, unreadable, oversized
    or malformed file."""
    what = what or str(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise InvalidParams(
                    f"{what} is {size} bytes; at most {max_bytes} are read", field=field
                )
            data = f.read(size + 1)  # never more than it was when measured
            if len(data) > size:
                raise InvalidParams(f"{what} changed while it was read", field=field)
    except OSError as exc:
        raise InvalidParams(
            f"{what} cannot be read ({exc.strerror or type(exc).__name__})", field=field
        ) from None
    return loads_bounded(
        data, what=what, field=field, max_bytes=max_bytes, max_depth=max_depth, max_items=max_items
    )


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; OSError otherwise. Opening does not
    block on a FIFO (a plain ``open`` waits for a writer forever), and nothing is read from a
    device such as /dev/zero."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_shape(raw: bytes, max_depth: int, max_items: int) -> str | None:
    """Why ``raw`` may not be handed to ``json.loads`` (too deep, too many items), or None.

    Linear, at C speed, a megabyte at a time (so its memory does not grow with ``raw``): escaped
    backslashes and quotes are dropped (left to right, as a JSON parser pairs them), which
    leaves every string as ``"..."`` with no quote inside; brackets and commas are then counted
    outside strings. Exact for valid JSON; on invalid JSON the parser stops at the first byte
    where the two readings differ, before any nesting the count has not seen.
    """
    inside = False  # in a string at the start of the chunk
    depth = quotes = items = 0
    start, size = 0, len(raw)
    while start < size:
        end = min(start + _CHUNK, size)
        if raw[end - 1] == 0x5C:  # a run of backslashes stays in one chunk
            after = _NOT_BACKSLASH.search(raw, end)
            end = after.start() if after else size
        parts = raw[start:end].replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')
        quotes += len(parts) - 1
        outside = b"".join(parts[1 if inside else 0 :: 2])
        inside ^= len(parts) % 2 == 0
        del parts
        brackets = outside.translate(None, _KEEP_BRACKETS)
        items += brackets.count(b"[") + brackets.count(b"{") + outside.count(b",")
        if items + quotes // 2 > max_items:
            return f"has more than {max_items} items (strings, values, arrays and objects)"
        for at in range(0, len(brackets), _PIECE):  # pieces: a deep one stops at its first
            piece = brackets[at : at + _PIECE]
            opens = piece.count(b"[") + piece.count(b"{")
            if depth + opens > max_depth:  # otherwise it cannot get deeper than allowed here
                steps = array("b", piece.translate(_STEPS))
                if max(accumulate(steps, initial=depth)) > max_depth:
                    return f"nests deeper than {max_depth} levels"
                depth += sum(steps)
            else:
                depth += 2 * opens - len(piece)
        start = end
    return None
