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
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps, UnidentifiedImageError

from easel.domain import OUTPAINT_SIDES, InvalidParams

FORMATS = ("PNG", "JPEG", "WEBP")  # what uploads may be (PIL's format names)
CROP_PADDING = 32  # pixels of context around the mask that an "only masked" crop keeps


def decode_image(data: bytes, *, field: str, max_pixels: int) -> Image.Image:
    """Decode a PNG, JPEG or WebP into an RGB or RGBA image (JPEG orientation applied).

    The header is read first: a non-image, another format, or more than ``max_pixels`` pixels
    is refused before any pixel is decoded, so a decompression bomb costs microseconds and no
    memory. Raises InvalidParams(field=field) naming the problem.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # parses the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidParams(
            f"{field} has more than {max_pixels} pixels (a decompression bomb?)", field=field
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidParams(
            f"{field} is not a PNG, JPEG or WebP image (it could not be read as one)", field=field
        ) from None
    if image.format not in FORMATS:
        raise InvalidParams(f"{field} must be PNG, JPEG or WebP (got {image.format})", field=field)
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InvalidParams(
            f"{field} must have at most {max_pixels} pixels (got {width}×{height} = "
            f"{width * height})",
            field=field,
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidParams(f"{field} is damaged or truncated ({exc})", field=field) from None
    upright = ImageOps.exif_transpose(image)
    has_alpha = upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info
    return upright.convert("RGBA" if has_alpha else "RGB")


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
