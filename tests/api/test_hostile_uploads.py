"""Hostile uploads over HTTP: decompression bombs (PNG, JPEG, WebP), truncated and malformed
files, polyglots, metadata bombs and chunk floods, each refused with a 422 naming the field, in
well under a second, in bounded memory, storing nothing; as input images (POST /api/v1/images)
and inside a dataset zip (POST /api/v1/datasets). Every file is built here, byte by byte.

Memory is measured two ways around each request: tracemalloc's peak (Python objects: bodies,
metadata strings) and the growth of the process's peak RSS (C buffers such as decoded pixels,
which tracemalloc does not see; a decoded bomb would push it up by hundreds of MB)."""

from __future__ import annotations

import io
import random
import resource
import struct
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from easel.imaging import MAX_JPEG_SCANS, MAX_METADATA_BYTES, MAX_METADATA_CHUNKS
from easel.services import Services
from tests.test_datasets import CAPTIONED, zip_bytes

SECONDS = 0.5  # per refused request
MEMORY = 64 << 20  # bytes: tracemalloc peak, and peak-RSS growth


# --- building files -----------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def flat(size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.new("RGB", size, (200, 30, 30))


def noisy(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Random pixels: they compress badly, so a file cut in half is cut mid-data."""
    return Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3))


def chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk: length, type, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with(before_idat: bytes = b"", before_iend: bytes = b"") -> bytes:
    """A valid 32x32 PNG with extra chunks after IHDR and before IEND."""
    data = encode(flat())
    ihdr_end = 8 + 25
    iend = data.rindex(b"\x00\x00\x00\x00IEND")
    return data[:ihdr_end] + before_idat + data[ihdr_end:iend] + before_iend + data[iend:]


def png_header_bomb(side: int) -> bytes:
    """An RGB PNG whose header claims side x side pixels, with a few rows of tiny zlib IDAT."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (3 * 64 + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def deflated(text_bytes: int) -> bytes:
    """zlib data inflating to ``text_bytes`` bytes of "a" (about 1 kB per MB), made a MB at a
    time so the test never holds the text itself."""
    packer, block = zlib.compressobj(9), b"a" * (1 << 20)
    parts = [packer.compress(block) for _ in range(text_bytes >> 20)]
    return b"".join([*parts, packer.compress(block[: text_bytes % (1 << 20)]), packer.flush()])


def ztxt(text_bytes: int, key: bytes = b"k") -> bytes:
    """A zTXt chunk inflating to ``text_bytes`` bytes."""
    return chunk(b"zTXt", key + b"\0\0" + deflated(text_bytes))


def itxt_compressed(text_bytes: int) -> bytes:
    """A compressed iTXt chunk: keyword, flag 1, method 0, empty language and translation."""
    return chunk(b"iTXt", b"k\0\x01\x00\0\0" + deflated(text_bytes))


def jpeg_sof_bomb(side: int) -> bytes:
    """A 16x16 JPEG whose frame header (SOF0) is rewritten to claim side x side."""
    data = bytearray(encode(flat((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, side, side)  # after length and precision
    return bytes(data)


def jpeg_with_segments(marker: int, count: int, size: int = 65535) -> bytes:
    """A JPEG with ``count`` APPn (or COM) segments of ``size`` bytes after its SOI."""
    body = (b"Exif\0\0" if marker == 0xE1 else b"") + b"\0" * (size - 2)
    segment = bytes([0xFF, marker]) + struct.pack(">H", size) + body[: size - 2]
    data = encode(flat((16, 16)), "JPEG")
    return data[:2] + segment * count + data[2:]


def jpeg_scan_flood(scans: int) -> bytes:
    """A progressive JPEG with its first scan header repeated ``scans`` times."""
    data = encode(noisy((32, 32)), "JPEG", progressive=True)
    sos = data.index(b"\xff\xda")
    (length,) = struct.unpack_from(">H", data, sos + 2)
    eoi = data.rindex(b"\xff\xd9")
    return data[:eoi] + (data[sos : sos + 2 + length] + b"\x00\x01\x02") * scans + data[eoi:]


def riff_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + (b"\0" if len(body) % 2 else b"")


def riff(*chunks: bytes) -> bytes:
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_bitstream(kind: bytes, **options: object) -> bytearray:
    """The VP8 or VP8L chunk body of a 16x16 WebP made by Pillow (a simple file: one chunk)."""
    data = encode(flat((16, 16)), "WEBP", **options)
    assert data[12:16] == kind
    (length,) = struct.unpack_from("<I", data, 16)
    return bytearray(data[20 : 20 + length])


def vp8x(width: int, height: int, flags: int = 0) -> bytes:
    """A VP8X (extended format) chunk: flags, then the canvas size minus one in 24 bits each."""
    size = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return riff_chunk(b"VP8X", bytes([flags, 0, 0, 0]) + size)


def webp_canvas_bomb(side: int) -> bytes:
    return riff(vp8x(side, side), riff_chunk(b"VP8 ", bytes(webp_bitstream(b"VP8 "))))


def webp_lossless_bomb(side: int) -> bytes:
    """A VP8L bitstream whose header (14-bit width and height minus one) claims side x side."""
    body = webp_bitstream(b"VP8L", lossless=True)
    bits = int.from_bytes(body[1:5], "little") & ~((1 << 28) - 1)
    body[1:5] = (bits | (side - 1) | (side - 1) << 14).to_bytes(4, "little")
    return riff(riff_chunk(b"VP8L", bytes(body)))


def webp_lossy_bomb(side: int) -> bytes:
    """A VP8 key frame whose header (after the start code) claims side x side."""
    body = webp_bitstream(b"VP8 ")
    struct.pack_into("<HH", body, 6, side, side)
    return riff(riff_chunk(b"VP8 ", bytes(body)))


def webp_with(kind: bytes, body: bytes) -> bytes:
    """A 16x16 extended WebP carrying a metadata chunk (EXIF flag set)."""
    image = riff_chunk(b"VP8 ", bytes(webp_bitstream(b"VP8 ")))
    return riff(vp8x(16, 16, flags=0x08), image, riff_chunk(kind, body))


def a_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("index.html", "<script>alert(document.cookie)</script>")
    return buffer.getvalue()


HTML = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"
SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<script>alert(1)</script><rect width="64" height="64" fill="red"/></svg>'
)
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << >>\n%%EOF\n"


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], bytes]
    says: str  # in the refusal's message
    content_type: str = "image/png"


PIXELS = "pixels (got"
TRUNCATED = "is damaged or truncated"
APPENDED = "bytes after the end of the"
METADATA = f"more than {MAX_METADATA_BYTES} bytes of metadata"
INFLATES = "inflates to more than"

CASES = [
    # decompression bombs: the header claims billions of pixels
    Case("PNG 60000x60000 header, tiny IDAT", lambda: png_header_bomb(60_000), PIXELS),
    Case("JPEG SOF 65000x65000", lambda: jpeg_sof_bomb(65_000), PIXELS, "image/jpeg"),
    Case("WebP VP8X canvas 16383x16383", lambda: webp_canvas_bomb(16_383), PIXELS, "image/webp"),
    Case("WebP lossless 16384x16384", lambda: webp_lossless_bomb(16_384), PIXELS, "image/webp"),
    Case("WebP lossy 16383x16383", lambda: webp_lossy_bomb(16_383), PIXELS, "image/webp"),
    Case(f"JPEG {MAX_JPEG_SCANS * 2} scans", lambda: jpeg_scan_flood(MAX_JPEG_SCANS * 2), "scans"),
    # truncated (cut mid-data) and malformed
    Case("PNG cut mid-IDAT", lambda: encode(noisy())[:6000], TRUNCATED),
    Case("PNG cut mid-header", lambda: encode(noisy())[:20], TRUNCATED),
    Case("PNG without IEND", lambda: encode(noisy())[:-12], TRUNCATED),
    Case("JPEG cut mid-scan", lambda: encode(noisy(), "JPEG")[:1500], TRUNCATED, "image/jpeg"),
    Case("JPEG cut in its headers", lambda: encode(noisy(), "JPEG")[:300], TRUNCATED),
    Case("WebP cut mid-data", lambda: encode(noisy(), "WEBP")[:1500], TRUNCATED, "image/webp"),
    Case("WebP with a damaged EXIF", lambda: webp_with(b"EXIF", b"\0" * 100), TRUNCATED),
    Case("random bytes named .png", lambda: random.Random(1).randbytes(5000), "not a PNG, JPEG"),
    Case("empty", lambda: b"", "not a PNG, JPEG"),
    # polyglots: one file that is two things
    Case("PNG with a ZIP appended", lambda: encode(flat()) + a_zip(), APPENDED),
    Case("PNG with HTML appended", lambda: encode(flat()) + HTML, APPENDED),
    Case("WebP with HTML appended", lambda: encode(flat(), "WEBP") + HTML, APPENDED),
    Case("GIF", lambda: encode(flat(), "GIF"), "(got GIF)"),
    Case("SVG as image/png", lambda: SVG, "(got text: HTML, SVG or XML)"),
    Case("HTML as image/png", lambda: HTML, "(got text: HTML, SVG or XML)"),
    Case("PDF", lambda: PDF, "(got PDF)"),
    # metadata bombs and chunk floods
    Case("PNG 8 MB tEXt", lambda: png_with(chunk(b"tEXt", b"k\0" + b"a" * 8_000_000)), METADATA),
    Case("PNG zTXt inflating to 100 MB", lambda: png_with(ztxt(100_000_000)), INFLATES),
    Case("PNG zTXt bomb after IDAT", lambda: png_with(before_iend=ztxt(100_000_000)), INFLATES),
    Case("PNG iTXt inflating to 100 MB", lambda: png_with(itxt_compressed(100_000_000)), INFLATES),
    Case(
        "PNG 60 zTXt of 1 MB each",
        lambda: png_with(b"".join(ztxt(1_000_000, b"k%d" % i) for i in range(60))),
        METADATA,
    ),
    Case("JPEG 150 APP1 (EXIF) of 64 kB", lambda: jpeg_with_segments(0xE1, 150), METADATA),
    Case("JPEG 5000 COM segments", lambda: jpeg_with_segments(0xFE, 5000, 4), "metadata chunks"),
    Case("WebP 8 MB EXIF", lambda: webp_with(b"EXIF", b"Exif\0\0" + b"\0" * 8_000_000), METADATA),
    Case(
        f"PNG {MAX_METADATA_CHUNKS * 5} tEXt",
        lambda: png_with(chunk(b"tEXt", b"k\0v") * MAX_METADATA_CHUNKS * 5),
        "metadata chunks",
    ),
    Case("PNG 300000 empty chunks", lambda: png_with(chunk(b"zzZz", b"") * 300_000), "chunks"),
    Case("JPEG 5 MB of fill bytes", lambda: b"\xff\xd8" + b"\xff" * 5_000_000, TRUNCATED),
    Case("JPEG 100000 RST markers", lambda: b"\xff\xd8" + b"\xff\xd0" * 100_000, "chunks"),
    Case(
        "PNG 100000 empty IDAT",
        lambda: png_with(chunk(b"IDAT", b"") * 100_000),
        "more than 65536 chunks",
    ),
]


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Measured:
    response: Any  # the TestClient's response
    seconds: float
    peak_bytes: int  # tracemalloc
    rss_growth: int  # bytes the process's peak RSS grew by


def measure(send: Callable[[], Any]) -> Measured:
    """Send three times (a refused request changes nothing): timed alone twice, keeping the
    faster (a bomb's work is paid on every send; a pause of the loaded 2-core CI machine
    seldom twice), then under tracemalloc, which slows Python several times over."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    seconds = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        response = send()
        seconds = min(seconds, time.perf_counter() - started)
    tracemalloc.start()
    try:
        again = send()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert again.status_code == response.status_code
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return Measured(response, seconds, peak, rss_growth)


def stored_images(services: Services) -> tuple[int, list[Path]]:
    count = services.db.query("SELECT COUNT(*) FROM images")[0][0]
    return count, [p for p in services.settings.images_dir.rglob("*") if p.is_file()]


def stored_datasets(services: Services) -> tuple[int, list[Path]]:
    count = services.db.query("SELECT COUNT(*) FROM datasets")[0][0]
    root = services.settings.datasets_dir
    return count, list(root.iterdir()) if root.exists() else []


def check_refused(measured: Measured, field: str, says: str) -> None:
    response = measured.response
    assert response.status_code in (413, 422), response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    assert says in error["message"], error["message"]
    assert measured.seconds < SECONDS, f"{measured.seconds:.2f} s"
    assert measured.peak_bytes < MEMORY, f"tracemalloc peak {measured.peak_bytes >> 20} MB"
    assert measured.rss_growth < MEMORY, f"RSS grew {measured.rss_growth >> 20} MB"


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_hostile_image_upload_is_refused_fast_and_stores_nothing(
    client: TestClient, app_services: Services, case: Case
) -> None:
    data = case.make()
    assert len(data) < app_services.settings.max_upload_bytes  # refused for what it is
    measured = measure(
        lambda: client.post(
            "/api/v1/images", files={"file": ("upload.png", data, case.content_type)}
        )
    )
    check_refused(measured, "file", case.says)
    assert measured.response.json()["error"]["message"].startswith("file ")
    assert stored_images(app_services) == (0, [])


def test_ordinary_files_with_metadata_still_upload(
    client: TestClient, app_services: Services
) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° to show upright
    workflow = b"prompt\0" + b'{"nodes": []}' * 20_000  # a ComfyUI-sized text chunk, 260 kB
    uploads = {
        "PNG with text": png_with(chunk(b"tEXt", workflow) + ztxt(500_000)),
        "progressive JPEG with EXIF": encode(noisy(), "JPEG", progressive=True, exif=exif),
        "lossless WebP": encode(noisy(), "WEBP", lossless=True),
        "animated PNG": encode(noisy(), "PNG", save_all=True, append_images=[flat((64, 64))]),
        "WebP with EXIF": encode(noisy(), "WEBP", exif=exif),
        # bytes after a JPEG's end are allowed (phones append a video to motion photos)...
        "JPEG with HTML appended": encode(noisy(), "JPEG") + HTML,
    }
    sizes = {}
    for what, data in uploads.items():
        response = client.post("/api/v1/images", files={"file": ("x", data, "image/png")})
        assert response.status_code == 201, (what, response.text)
        sizes[what] = (response.json()["width"], response.json()["height"])
        # ...and never kept: the stored file is the decoded pixels as PNG
        assert HTML not in client.get(response.json()["url"]).content
    assert sizes["progressive JPEG with EXIF"] == (64, 64)
    assert stored_images(app_services)[0] == len(uploads)


DATASET_CASES = [
    c
    for c in CASES
    if c.name
    in (
        "PNG 60000x60000 header, tiny IDAT",
        "JPEG SOF 65000x65000",
        "WebP VP8X canvas 16383x16383",
        "PNG cut mid-IDAT",
        "JPEG cut mid-scan",
        "PNG with a ZIP appended",
        "SVG as image/png",
        "PNG zTXt inflating to 100 MB",
        "JPEG 150 APP1 (EXIF) of 64 kB",
        "PNG 300000 empty chunks",
    )
]


@pytest.mark.parametrize("case", DATASET_CASES, ids=[c.name for c in DATASET_CASES])
def test_a_hostile_image_in_a_dataset_zip_is_refused_by_name_and_stores_nothing(
    client: TestClient, app_services: Services, case: Case
) -> None:
    archive = zip_bytes({**CAPTIONED, "zebra.png": case.make(), "zebra.txt": "a zebra"})
    measured = measure(lambda: client.post("/api/v1/datasets", files={"file": ("ds.zip", archive)}))
    check_refused(measured, "dataset", case.says)
    assert measured.response.json()["error"]["message"].startswith("zebra.png ")
    assert stored_datasets(app_services) == (0, [])
