"""Mask geometry for inpainting and outpainting (easel.imaging, PIL and NumPy only)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from easel.domain import InvalidParams
from easel.imaging import band, feather, grow_canvas, mask_crop, paste_back, repaint_mask


def square_mask(size: int = 64, box: tuple[int, int, int, int] = (20, 20, 30, 30)) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


@pytest.mark.parametrize("blur", [0, 1, 4, 9])
def test_the_band_is_the_mask_grown_by_the_blur_and_all_the_feather_touches(blur: int) -> None:
    mask = square_mask()
    grown = np.asarray(band(mask, blur)) > 0
    ys, xs = np.nonzero(grown)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (20 - blur, 29 + blur, 20 - blur, 29 + blur)
    soft = np.asarray(feather(mask, blur))
    assert np.array_equal(soft > 0, grown), "the feather is zero exactly outside the band"
    assert (soft[20:30, 20:30] == 255).all() and soft[0, 0] == 0, "the mask itself: full"


def test_paste_back_keeps_every_pixel_beyond_the_band() -> None:
    original = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    generated = Image.new("RGB", (32, 32), (0, 255, 0))  # another size: resized first
    mask = square_mask()
    out = np.asarray(paste_back(original, generated, mask, 3))
    outside = np.asarray(band(mask, 3)) == 0
    assert np.array_equal(out[outside], np.asarray(original)[outside])
    assert tuple(out[25, 25]) == (0, 255, 0)


def test_white_or_transparent_marks_what_to_repaint() -> None:
    white = square_mask()
    rgba = Image.new("RGBA", (64, 64), (10, 10, 10, 255))
    rgba.paste((10, 10, 10, 0), (20, 20, 30, 30))
    opaque_rgba = white.convert("RGBA")  # no transparency: read by brightness
    for mask in (white, rgba, opaque_rgba, white.convert("RGB")):
        assert np.array_equal(np.asarray(repaint_mask(mask)), np.asarray(white))


def test_an_only_masked_crop_has_the_work_aspect_and_stays_inside() -> None:
    mask = square_mask(200, (180, 10, 195, 20))
    box = mask_crop(mask, aspect=2.0)
    assert box.size[0] == 2 * box.size[1]
    assert 0 <= box.left and box.right <= 200 and 0 <= box.top and box.bottom <= 200
    assert box.left <= 180 - 32 and box.right >= 195  # the mask and its context
    with pytest.raises(InvalidParams, match="marks nothing"):
        mask_crop(Image.new("L", (64, 64), 0), aspect=1.0)


def test_a_grown_canvas_holds_the_image_and_masks_the_border() -> None:
    image = Image.new("RGB", (40, 30), (200, 0, 0))
    canvas, mask = grow_canvas(image, {"left": 5, "top": 0, "right": 7, "bottom": 3})
    assert canvas.size == mask.size == (52, 33)
    pixels, marks = np.asarray(canvas), np.asarray(mask)
    assert (marks[0:30, 5:45] == 0).all() and marks.sum() == 255 * (52 * 33 - 40 * 30)
    assert (pixels == (200, 0, 0)).all(), "the border repeats the edge"
