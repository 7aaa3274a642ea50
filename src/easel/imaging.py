"""Input images for editing: checked decoding of uploads, masks, and the pixel geometry of
inpainting and outpainting (paste-back, crops, grown canvases).

PIL and NumPy only, so the API, the CLI and the engine share one set of rules:

    image = decode_image(data, field="file", max_pixels=16_777_216)   # raises InvalidParams
    mask = repaint_mask(decode_image(mask_bytes, field="mask", ...))   # 255 = repaint
    soft = feather(mask, 4)                                            # 0 beyond 4 px of it
    result = Image.composite(generated, image, soft)                   # the rest: identical

Masks follow AUTOMATIC1111 (white = repaint, black = keep) and OpenAI (an RGBA mask whose
alpha is 0 where to repaint); a mask is made binary at 50 %.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps, PngImagePlugin

from easel.domain import OUTPAINT_SIDES, InvalidParams

FORMATS = ("PNG", "JPEG", "WEBP")  # what uploads may be (PIL's format names)
CROP_PADDING = 32  # pixels of context around the mask that an "only masked" crop keeps
# What a file may carry besides its pixels. Real photos and generated images hold tens of kB of
# metadata (EXIF, XMP, an ICC profile, a workflow as PNG text); a file with megabytes of it, or
# thousands of chunks, is built to exhaust a parser
MAX_METADATA_BYTES = 4 << 20  # in all; PNG text and profiles counted decompressed
MAX_METADATA_CHUNKS = 1000  # chunks or segments other than pixel data (libpng's default limit)
MAX_CHUNKS = 65536  # of any kind: a PNG of 8 kB IDAT chunks (libpng's size) this long is 512 MB
# progressive JPEG scans: encoders write about 10; each one is another pass over every
# coefficient, so thousands of them keep a decoder busy for minutes (libjpeg-turbo's advisory)
MAX_JPEG_SCANS = 100

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PIXEL_CHUNKS = (b"IDAT", b"fdAT")
_WEBP_PIXEL_CHUNKS = (b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF")
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length: TEM, RST0..7
_JPEG_MARKER = re.compile(rb"\xff+([^\xff])")
_OTHER_FORMATS = (  # first bytes -> name, for the refusal's message only
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x00\x00\x01\x00", "ICO"),
)


def decode_image(data: bytes, *, field: str, max_pixels: int) -> Image.Image:
    """Decode a PNG, JPEG or WebP into an RGB or RGBA image (JPEG orientation applied).

    Nothing is trusted before it is checked, cheapest first. The file's own structure is walked
    (its chunks or segments, never its pixels): the format is told by the first bytes, the size
    read from the header, and a file is refused that is cut short, has bytes after its end (a
    PNG or WebP with a zip or a page appended), carries more than MAX_METADATA_BYTES of metadata
    (PNG text counted decompressed, so a zTXt bomb is not inflated) or more than
    MAX_METADATA_CHUNKS / MAX_CHUNKS chunks, or more than MAX_JPEG_SCANS scans. So a
    decompression bomb costs microseconds and no memory. Only then does Pillow (its PNG, JPEG
    and WebP parsers only) read the header and decode. JPEG data after the image's end is
    allowed (phones append a video to "motion" photos); only the decoded pixels are kept.
    Raises InvalidParams(field=field) naming the problem.
    """
    # 1. the container, walked without decoding
    check_structure(data, field, max_pixels)
    # 2. the header
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)  # parses the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidParams(
            f"{field} has more than {max_pixels} pixels (a decompression bomb?)", field=field
        ) from None
    except Exception:  # Pillow raises many kinds for a hostile header; all mean "not one"
        raise InvalidParams(
            f"{field} is not a PNG, JPEG or WebP image (it could not be read as one)", field=field
        ) from None
    if image.format not in FORMATS:
        raise InvalidParams(f"{field} must be PNG, JPEG or WebP (got {image.format})", field=field)
    _check_size(field, *image.size, max_pixels)
    # 3. the pixels, and the EXIF orientation (parsed here: it may be damaged too)
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:  # OSError for truncation, SyntaxError for bad EXIF, ...
        raise InvalidParams(f"{field} is damaged or truncated ({exc})", field=field) from None
    has_alpha = upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info
    return upright.convert("RGBA" if has_alpha else "RGB")


def _check_size(field: str, width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InvalidParams(
            f"{field} must have at most {max_pixels} pixels (got {width}×{height} = "
            f"{width * height})",
            field=field,
        )


@dataclass
class _Walk:
    """The running counts of one file's structure check, against the limits above."""

    field: str
    max_pixels: int
    chunks: int = 0
    metadata_chunks: int = 0
    metadata_bytes: int = 0

    def size(self, width: int, height: int) -> None:
        _check_size(self.field, width, height, self.max_pixels)

    def count(self, *, metadata: int | None = None) -> None:
        """One more chunk; ``metadata`` is its size when it is not pixel data."""
        self.chunks += 1
        if self.chunks > MAX_CHUNKS:
            raise self.refuse(f"has more than {MAX_CHUNKS} chunks")
        if metadata is not None:
            self.metadata(metadata)

    def metadata(self, size: int) -> None:
        """One more metadata chunk of ``size`` bytes (already counted as a chunk)."""
        self.metadata_chunks += 1
        self.metadata_bytes += size
        if self.metadata_chunks > MAX_METADATA_CHUNKS:
            raise self.refuse(f"has more than {MAX_METADATA_CHUNKS} metadata chunks")
        if self.metadata_bytes > MAX_METADATA_BYTES:
            raise self.refuse(
                f"has more than {MAX_METADATA_BYTES} bytes of metadata (text, EXIF, XMP, "
                "colour profile); strip it (save the pixels again) and upload that"
            )

    def refuse(self, what: str) -> InvalidParams:
        return InvalidParams(f"{self.field} {what}", field=self.field)

    def truncated(self, what: str) -> InvalidParams:
        return self.refuse(f"is damaged or truncated ({what})")


def check_structure(data: bytes, field: str, max_pixels: int) -> None:
    """Step 1 of :func:`decode_image` alone: the file's container walked without decoding
    (format, header size, truncation, trailing bytes, metadata and chunk counts); raises
    InvalidParams(field=field). For readers that want only a file's metadata."""
    walk = _Walk(field, max_pixels)
    if data.startswith(_PNG_SIGNATURE):
        _walk_png(data, walk)
    elif data.startswith(b"\xff\xd8\xff"):
        _walk_jpeg(data, walk)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        _walk_webp(data, walk)
    else:
        other = next((name for magic, name in _OTHER_FORMATS if data.startswith(magic)), None)
        if other is None and data[:256].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
            other = "text: HTML, SVG or XML"
        if other is not None:
            raise walk.refuse(f"must be PNG, JPEG or WebP (got {other})")
        raise walk.refuse("is not a PNG, JPEG or WebP image (it could not be read as one)")


def _name(kind: bytes) -> str:
    """A chunk type as text: ``b"zTXt"`` -> ``zTXt`` (odd bytes escaped)."""
    return kind.decode("ascii", "backslashreplace").strip() or repr(kind)


def _walk_png(data: bytes, walk: _Walk) -> None:
    """Chunks from IHDR to IEND: lengths inside the file, text and profiles not inflating past
    the limits, nothing after IEND."""
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 12 > len(data):
            raise walk.truncated("a chunk runs past the end of the file")
        length, kind = struct.unpack_from(">I4s", data, pos)
        body, end = pos + 8, pos + 12 + length
        if end > len(data):
            raise walk.truncated(f"its {_name(kind)} chunk runs past the end of the file")
        if pos == len(_PNG_SIGNATURE):
            if kind != b"IHDR" or length != 13:
                raise walk.truncated("it does not start with its IHDR header")
            walk.size(*struct.unpack_from(">II", data, body))
        if kind in _PNG_PIXEL_CHUNKS:
            walk.count()
        else:
            walk.count(metadata=_png_metadata_bytes(data, kind, body, body + length, walk))
        pos = end
        if kind == b"IEND":
            break
    if pos < len(data):
        raise walk.refuse(
            f"has {len(data) - pos} bytes after the end of the PNG (another file hidden in "
            "it?); save the image again and upload that"
        )


def _png_metadata_bytes(data: bytes, kind: bytes, body: int, end: int, walk: _Walk) -> int:
    """The size of the chunk at ``data[body:end]``, decompressed for compressed text (zTXt,
    iTXt) and profiles (iCCP): inflated here at most to Pillow's per-chunk limit, never beyond.
    Found with offsets, not slices, so no chunk is copied."""
    start = -1
    nul = data.find(b"\0", body, min(body + 80, end))  # keywords are 1-79 bytes
    if nul >= 0 and kind in (b"zTXt", b"iCCP"):
        start = nul + 2  # keyword, NUL, compression method
    elif nul >= 0 and kind == b"iTXt" and nul + 2 < end and data[nul + 1] == 1:  # compressed
        # then method, language tag, NUL, translated keyword, NUL, text
        language = data.find(b"\0", nul + 3, end)
        start = data.find(b"\0", language + 1, end) + 1 if language >= 0 else -1
    if start <= 0 or start > end:
        return end - body
    limit = PngImagePlugin.MAX_TEXT_CHUNK
    try:
        inflated = len(zlib.decompressobj().decompress(memoryview(data)[start:end], limit + 1))
    except zlib.error as exc:
        raise walk.truncated(f"its {_name(kind)} chunk: {exc}") from None
    if inflated > limit:
        raise walk.refuse(
            f"has a metadata chunk ({_name(kind)}) that inflates to more than {limit} bytes "
            "(a decompression bomb?)"
        )
    return inflated


def _walk_jpeg(data: bytes, walk: _Walk) -> None:
    """Segments from SOI to the first scan: lengths inside the file, one frame header (its size),
    APPn and COM metadata within the limits; then the number of scans up to EOI."""
    pos, frame = 2, False
    while True:
        marker_at = _JPEG_MARKER.match(data, pos)  # fill bytes (0xFF) may come before one
        if marker_at is None:
            raise walk.truncated(f"no JPEG marker at byte {pos}")
        marker, pos = marker_at[1][0], marker_at.end()
        walk.count()
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9 or pos + 2 > len(data):
            raise walk.truncated("it ends before its image data")
        (length,) = struct.unpack_from(">H", data, pos)
        end = pos + length
        if length < 2 or end > len(data):
            raise walk.truncated("a segment runs past the end of the file")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn, not DHT/JPG/DAC
            if length < 7:
                raise walk.truncated("its frame header is too short")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            walk.size(width, height)
            frame = True
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            walk.metadata(length)
        pos = end
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
    if not frame:
        raise walk.truncated("it has no frame header")
    # in entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so these
    # byte pairs are markers
    end = data.find(b"\xff\xd9", pos)
    scans = 1 + data.count(b"\xff\xda", pos, end if end >= 0 else len(data))
    if scans > MAX_JPEG_SCANS:
        raise walk.refuse(f"has {scans} scans, more than the {MAX_JPEG_SCANS} allowed")


def _walk_webp(data: bytes, walk: _Walk) -> None:
    """RIFF chunks: the RIFF length is the file's, each chunk inside it, the canvas and frame
    sizes within the pixel limit, metadata (EXIF, XMP, ICCP, unknown) within the limits."""
    (size,) = struct.unpack_from("<I", data, 4)
    end = 8 + size
    if end < 20:  # "WEBP" and one chunk header at least
        raise walk.truncated("its RIFF header is damaged")
    if end > len(data):
        raise walk.truncated(f"its RIFF header says {end} bytes, the file has {len(data)}")
    if end < len(data):
        raise walk.refuse(
            f"has {len(data) - end} bytes after the end of the WebP (another file hidden in "
            "it?); save the image again and upload that"
        )
    pos = 12
    while pos < end:
        if pos + 8 > end:
            raise walk.truncated("a chunk runs past the end of the file")
        kind, length = struct.unpack_from("<4sI", data, pos)
        body = pos + 8
        if body + length > end:
            raise walk.truncated(f"its {_name(kind)} chunk runs past the end of the file")
        if kind == b"VP8X" and length >= 10:
            width = int.from_bytes(data[body + 4 : body + 7], "little") + 1
            walk.size(width, int.from_bytes(data[body + 7 : body + 10], "little") + 1)
        elif kind == b"VP8 " and length >= 10:
            width, height = struct.unpack_from("<HH", data, body + 6)
            walk.size(width & 0x3FFF, height & 0x3FFF)
        elif kind == b"VP8L" and length >= 5:
            bits = int.from_bytes(data[body + 1 : body + 5], "little")
            walk.size((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        walk.count(metadata=None if kind in _WEBP_PIXEL_CHUNKS else length)
        pos = body + length + (length & 1)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixel_hash(image: Image.Image) -> str:
    """First 16 hex digits of the sha256 of the decoded pixels (mode, size, bytes): the same
    for a picture saved again in another format without loss."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:16]


def repaint_mask(mask: Image.Image) -> Image.Image:
    """A binary "L" mask, 255 where to repaint: alpha 0 where the mask has transparency,
    else white (luminance at least 50 %)."""
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8), "L")
    grey = np.asarray(mask.convert("L"))
    return Image.fromarray(np.where(grey >= 128, 255, 0).astype(np.uint8), "L")


def feather(mask: Image.Image, blur: int) -> Image.Image:
    """``mask`` (binary "L") faded out over ``blur`` pixels around it: 255 on the mask (a thin
    brush stroke is repainted fully, not blended away), falling to exactly 0 more than
    ``blur`` pixels (Chebyshev distance) from it, so compositing with it leaves every pixel
    beyond that band untouched."""
    if blur <= 0:
        return mask.copy()
    return ImageChops.lighter(mask, mask.filter(ImageFilter.BoxBlur(blur)))


def band(mask: Image.Image, blur: int) -> Image.Image:
    """The pixels an edit with this mask and blur may change (255): the mask grown by at most
    ``blur`` pixels, exactly where :func:`feather` is above 0. (A box blur costs the same at
    any radius; a max filter of side 2 × blur + 1 took a second for 16 px at 1024².)"""
    return feather(mask, blur).point(lambda value: 255 if value else 0)


def paste_back(
    original: Image.Image, generated: Image.Image, mask: Image.Image, blur: int
) -> Image.Image:
    """``generated`` where ``mask`` is, feathered over ``blur`` pixels, ``original`` elsewhere
    (bit for bit). ``generated`` is resized to the original's size first when it differs."""
    if generated.size != original.size:
        generated = generated.resize(original.size, Image.Resampling.LANCZOS)
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), feather(mask, blur))


@dataclass(frozen=True)
class Box:
    left: int
    top: int
    right: int
    bottom: int

    @property
    def size(self) -> tuple[int, int]:
        return self.right - self.left, self.bottom - self.top

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.right, self.bottom


def mask_crop(mask: Image.Image, aspect: float, padding: int = CROP_PADDING) -> Box:
    """The region an "only masked" inpaint works on: the mask's bounding box with ``padding``
    pixels of context, widened (within the image) to the ``aspect`` (width / height) of the
    resolution the model runs at, so the crop scales without distortion where the image allows.
    """
    box = mask.getbbox()
    if box is None:
        raise InvalidParams("mask marks nothing to repaint (it is all black)", field="mask")
    width, height = mask.size
    left, top = max(box[0] - padding, 0), max(box[1] - padding, 0)
    right, bottom = min(box[2] + padding, width), min(box[3] + padding, height)
    # grow the shorter side towards the aspect ratio, centred, clamped to the image
    w, h = right - left, bottom - top
    if w / h < aspect:
        left, right = _grow(left, right, round(h * aspect), width)
    else:
        top, bottom = _grow(top, bottom, round(w / aspect), height)
    return Box(left, top, right, bottom)


def _grow(low: int, high: int, want: int, limit: int) -> tuple[int, int]:
    want = min(want, limit)
    extra = want - (high - low)
    low = max(low - extra // 2, 0)
    high = min(low + want, limit)
    return high - want, high


def grow_canvas(image: Image.Image, sides: dict[str, int]) -> tuple[Image.Image, Image.Image]:
    """Outpainting's start: ``image`` on a canvas grown by ``sides`` pixels, the new border
    filled by repeating the edge pixels (a hint of colour for inpainting models), and the mask
    of that border (255 = paint)."""
    left, top, right, bottom = (sides.get(s, 0) for s in OUTPAINT_SIDES)
    pixels = np.asarray(image.convert("RGB"))
    grown = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(grown.shape[:2], 255, dtype=np.uint8)
    mask[top : top + pixels.shape[0], left : left + pixels.shape[1]] = 0
    return Image.fromarray(grown, "RGB"), Image.fromarray(mask, "L")


def image_grid(images: list[Image.Image], columns: int = 8) -> Image.Image:
    """Tile equally sized images into one grid image."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
