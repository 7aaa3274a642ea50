"""A pixel-only judge of tiny-shapes images: background, objects, colour, shape, size, position.

It never looks at a model. It reads an RGB image, finds the solid background from the border,
separates objects by their colour distance from it, and judges each object's shape by fitting ideal
shape templates (position and scale from the object's moments, then refined, with a blur of the
template fitted too so that a soft but correct edge is not punished) and asking three questions:

1. does the best template cover the object almost exactly (soft IoU >= ``MIN_IOU``),
2. are its corners sharp: averaged over all its corners, is the area the object lacks there no
   more than a corner rounded by ``MAX_CORNER_ROUNDING`` of its radius would lack — this catches a
   square with rounded corners or a triangle with blunt tips, whose total area error is small but
   sits at every corner, and
3. is there no place where the object and the template disagree grossly (largest 3x3 mean
   residual <= ``MAX_LOCAL_RESIDUAL``): an extra arm, a bitten-off tip.

An object that fails any is ``"unknown"``: a three-armed blob is not a triangle. The tests hold
the thresholds to account on true renders, on true renders decoded by the model's VAE, and on
shapes that are only roughly right.

    >>> analysis = analyse(image)  # doctest: +SKIP
    >>> analysis.background, [(o.colour, o.shape, o.size, o.position) for o in analysis.objects]
    ('white', [('red', 'triangle', 'big', 'centre')])
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from easel.training.tinyshapes.data import COLOURS, POSITIONS, SHAPES, SIZES

UNKNOWN = "unknown"

# Thresholds, calibrated on three sets (see the tests): training-like renders (all pass), the same
# renders encoded and decoded by tiny-shapes' VAE (what a perfect denoiser would give; they should
# pass as far as the decoder keeps the shape) and deliberately wrong shapes (three-armed blobs,
# blunt triangles, squares with corners rounded to >= 25% of the half side, ellipses, four-point
# or blunt stars, short-armed crosses; all must fail at medium and big size, drawn sharp or decoded).
# A decoder's errors are local and random: a 1-2 px speck or bite here, a soft edge there; a wrong
# shape's are systematic: every corner is rounded. So the local test only catches gross errors (an
# extra arm, a bitten-off tip) and the corner test averages over all corners: VAE-decoded true
# shapes round corners by <= ~0.12 of the radius, a square rounded to 25% of its half side by
# >= 0.15 (medium and big). Below 1.5 px rounding is within rendering noise.
MIN_IOU = 0.92  # soft IoU of object vs best template
MAX_LOCAL_RESIDUAL = 0.3  # largest mean |object - template| over a 3x3 window
MAX_CORNER_ROUNDING = 0.14  # equivalent corner radius (see _corner_rounding), x object radius
# A 120-degree corner loses little area when rounded, so the radius read back from that area is
# noisy: true hexagons through tiny-shapes' VAE read up to ~0.22 of their radius at medium size.
# A rounder blob still reads as a circle, whose template then fits it better.
CORNER_ROUNDING = {"hexagon": 0.3}
MIN_CORNER_ROUNDING_PX = 1.5  # ... but at least this many px are tolerated
CORNER_REACH = 0.3  # corner error is summed within this x radius of each corner (or, if larger,
CORNER_REACH_PX = 2.5  # within this many px)
IGNORED_FRAME = 2  # px at the image border not judged: a decoder's convolutions see padding there
FOREGROUND_DISTANCE = 0.2  # RGB distance (0..1 per channel) from the background that is "object"
MIN_OBJECT_AREA = 0.004  # of the canvas (16 px at 64x64); smaller specks are noise
MAX_COLOUR_DISTANCE = 0.3  # farther than this from every named colour -> "unknown" colour
MAX_OBJECTS = 4  # components analysed per image, largest first
MIN_SOLID_BORDER = 0.7  # fraction of border pixels that must match the background colour
TEMPLATE_BLURS = (0.0, 0.5, 0.8, 1.1)  # px; Gaussian blurs tried on the template
SUPERSAMPLE = 4  # samples per pixel side when rasterising templates
NOISE_FLOOR = 0.2  # coverage below this counts as 0, above 1 - this as 1 (see _clean)


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image; ``shape``/``colour`` are ``"unknown"`` when nothing fits."""

    colour: str
    shape: str
    size: str
    position: str
    rgb: tuple[float, float, float]
    centre: tuple[float, float]  # px, the fitted template's centre (x right, y down)
    radius: float  # px, the fitted template's radius
    area: float  # px, soft (anti-aliased pixels count partly)
    iou: dict[str, float]  # best soft IoU per shape template
    residual: float  # largest local residual against the chosen (or best) template
    corner: float  # px, equivalent corner rounding against the chosen (or best) template


@dataclass(frozen=True)
class Analysis:
    """Everything the analyser saw in one image."""

    background: str
    background_rgb: tuple[float, float, float]
    objects: list[DetectedObject] = field(default_factory=list)


# --- shape templates (unit radius, centred on the origin, y down) -------------------------------


def _polygon_inside(vertices: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Even-odd point-in-polygon test, vectorised over arrays of points."""

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.zeros(x.shape, dtype=bool)
        for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
            crosses = (y1 > y) != (y2 > y)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_cross = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            result ^= crosses & (x < x_cross)
        return result

    return inside


def _regular_polygon(corners: int, radius: float, rotation: float = 0.0) -> np.ndarray:
    angles = rotation - math.pi / 2 + 2 * math.pi * np.arange(corners) / corners
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star_vertices(inner: float = 0.45, drop: float = 0.095) -> np.ndarray:
    outer = _regular_polygon(5, 1.0)
    inner_vertices = _regular_polygon(5, inner, rotation=math.pi / 5)
    return np.stack([outer, inner_vertices], axis=1).reshape(-1, 2) + [0.0, drop]


_H = math.sqrt(3) / 2
# The canonical geometry of each shape name, in units of the object's radius (the half extent in
# `data.SIZES`), centred on the object's position: what "a square" means in this world.
TEMPLATES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda x, y: x * x + y * y <= 1.0,
    "square": lambda x, y: (np.abs(x) <= 0.85) & (np.abs(y) <= 0.85),
    # equilateral, side 2, apex up, bounding box centred
    "triangle": _polygon_inside(np.array([[0.0, -_H], [1.0, _H], [-1.0, _H]])),
    # five points, outer radius 1, inner 0.45, moved down so the bounding box is centred
    "star": _polygon_inside(_star_vertices()),
    "cross": lambda x, y: (
        ((np.abs(x) <= 1.0) & (np.abs(y) <= 0.34)) | ((np.abs(x) <= 0.34) & (np.abs(y) <= 1.0))
    ),
    # not in the base model's world: the shape a LoRA is taught (tinyshapes.evaluate_lora),
    # judged only when asked for (analyse(image, shapes=...)); flat top, corners left and right
    "hexagon": _polygon_inside(_regular_polygon(6, 1.0, rotation=math.pi / 6)),
}
EXTRA_SHAPES = ("hexagon",)


# The convex corners of each shape (unit radius), where rounding or blunting shows, and their angle.
CORNERS: dict[str, np.ndarray] = {
    "circle": np.zeros((0, 2)),
    "square": np.array([[sx * 0.85, sy * 0.85] for sx in (-1, 1) for sy in (-1, 1)]),
    "triangle": np.array([[0.0, -_H], [1.0, _H], [-1.0, _H]]),
    "star": _star_vertices()[::2],
    "hexagon": _regular_polygon(6, 1.0, rotation=math.pi / 6),
    "cross": np.array(
        [
            [sx * a, sy * b]
            for sx in (-1, 1)
            for sy in (-1, 1)
            for a, b in ((1.0, 0.34), (0.34, 1.0))
        ]
    ),
}
CORNER_ANGLES = {
    "circle": math.pi,
    "square": math.pi / 2,
    "triangle": math.pi / 3,
    "star": math.pi / 5,
    "cross": math.pi / 2,
    "hexagon": 2 * math.pi / 3,
}

# Each template sampled once on a fine grid over [-1, 1]^2; rendering looks points up in it,
# which is much faster than testing polygons for every sample of every fit.
_GRID = 1024
_AXIS = (np.arange(_GRID) + 0.5) / (_GRID / 2) - 1.0
_MASKS = {name: inside(*np.meshgrid(_AXIS, _AXIS)) for name, inside in TEMPLATES.items()}


@dataclass(frozen=True)
class _TemplateMoments:
    area: float  # at unit radius
    centroid: tuple[float, float]  # offset of the area centroid from the template centre


def _moments(mask: np.ndarray) -> _TemplateMoments:
    ys, xs = np.nonzero(mask)
    return _TemplateMoments(
        area=float(mask.mean() * 4.0), centroid=(float(_AXIS[xs].mean()), float(_AXIS[ys].mean()))
    )


_MOMENTS = {name: _moments(mask) for name, mask in _MASKS.items()}


def render_template(
    shape: str, centre: tuple[float, float], radius: float, box: tuple[int, int, int, int]
) -> np.ndarray:
    """Anti-aliased coverage (0..1) of an ideal shape over the pixels of ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1)
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1)
    # sample positions -> cells of the fine grid; anything outside [-1, 1]^2 is outside the shape
    col = np.floor(((xs - centre[0]) / radius + 1.0) * (_GRID / 2)).astype(np.int64)
    row = np.floor(((ys - centre[1]) / radius + 1.0) * (_GRID / 2)).astype(np.int64)
    col_ok, row_ok = (col >= 0) & (col < _GRID), (row >= 0) & (row < _GRID)
    covered = _MASKS[shape][np.clip(row, 0, _GRID - 1)][:, np.clip(col, 0, _GRID - 1)]
    covered = covered & row_ok[:, None] & col_ok[None, :]
    return (
        covered.astype(np.float32)
        .reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE)
        .mean(axis=(1, 3))
    )


# --- small image helpers --------------------------------------------------------------------------


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image as float32 HxWx3 in 0..1."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def gaussian_blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (edges repeated); sigma in pixels."""
    if sigma <= 0:
        return array
    half = max(1, math.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    h, w = array.shape
    padded = np.pad(array, half, mode="edge")
    rows = sum(k * padded[i : i + h, :] for i, k in enumerate(kernel))
    return sum(k * rows[:, i : i + w] for i, k in enumerate(kernel))


def _clean(alpha: np.ndarray) -> np.ndarray:
    """Snap near-0 and near-1 coverage to 0 and 1, so pixel noise in flat areas does not count as
    shape error; applied alike to the object and to the templates it is compared with."""
    return np.clip((alpha - NOISE_FLOOR) / (1 - 2 * NOISE_FLOOR), 0.0, 1.0)


def _box_mean3(array: np.ndarray) -> np.ndarray:
    padded = np.pad(array, 1)
    h, w = array.shape
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as a boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        label = len(found) + 1
        labels[start] = label
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        queue.append((ny, nx))
        found.append(labels == label)
    return found


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        padded = np.pad(mask, 1)
        h, w = mask.shape
        mask = np.any(
            [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0
        )
    return mask


def nearest_colour(rgb: np.ndarray) -> tuple[str, float]:
    """The named colour closest to ``rgb`` (0..1) and its distance."""
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], dtype=np.float32) / 255.0
    distances = np.linalg.norm(table - rgb[None, :], axis=1)
    best = int(np.argmin(distances))
    return names[best], float(distances[best])


# --- template fitting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fit:
    iou: float
    residual: float
    corner: float
    centre: tuple[float, float]
    radius: float


def _iou(alpha: np.ndarray, template: np.ndarray) -> float:
    """Soft IoU of two coverage maps."""
    union = np.maximum(alpha, template).sum()
    return float(np.minimum(alpha, template).sum() / union) if union > 0 else 0.0


def _local_residual(alpha: np.ndarray, template: np.ndarray, weight: np.ndarray) -> float:
    """The largest mean |alpha - template| over any 3x3 window (``weight``: 0 where not judged):
    a bitten-off tip or an extra arm."""
    return float(_box_mean3(np.abs(alpha - template) * weight).max())


def _corner_rounding(
    shape: str,
    alpha: np.ndarray,
    template: np.ndarray,
    weight: np.ndarray,
    box: tuple[int, int, int, int],
    centre: np.ndarray,
    radius: float,
) -> float:
    """How rounded the object's corners are: the radius (px) that, rounding a corner of this
    shape's angle, would lose the area that the object lacks near its corners on average.

    Averaging over all corners is the point: a rounded square or blunt triangle misses area at
    every corner, while a decoder's 1-2 px specks and bites hit one corner and not the others.
    """
    corners = CORNERS[shape]
    if not len(corners):
        return 0.0
    yy, xx = np.mgrid[box[1] : box[3], box[0] : box[2]] + 0.5
    reach = max(CORNER_REACH_PX, CORNER_REACH * radius)
    deficits = []
    for cx, cy in centre + radius * corners:
        near = np.hypot(xx - cx, yy - cy) <= reach
        deficits.append(float(((template - alpha) * weight)[near].sum()))
    missing = max(float(np.mean(deficits)), 0.0)
    return math.sqrt(missing / _rounding_loss(CORNER_ANGLES[shape]))


def _rounding_loss(angle: float) -> float:
    """Area lost (in units of r^2) when a corner of ``angle`` radians is rounded with radius r."""
    return 1.0 / math.tan(angle / 2) - (math.pi - angle) / 2


def _fit_template(
    shape: str,
    alpha: np.ndarray,
    weight: np.ndarray,
    box: tuple[int, int, int, int],
    area: float,
    centroid: np.ndarray,
) -> _Fit:
    """Best soft IoU of ``shape`` against ``alpha`` over centre, radius and template blur, and the
    local and corner errors of that fit (``weight``: 0 on pixels not judged).

    Start from the moments (an ideal shape's area and centroid pin its radius and centre exactly;
    blurring preserves both), then refine by a shrinking pattern search, because a generated
    object's moments are only approximately those of its ideal shape.
    """
    moments = _MOMENTS[shape]
    radius = math.sqrt(area / moments.area)
    centre = centroid - radius * np.array(moments.centroid)

    def template(c: np.ndarray, r: float, sigma: float) -> np.ndarray:
        return gaussian_blur(render_template(shape, (c[0], c[1]), r, box), sigma)

    def evaluate(c: np.ndarray, r: float, sigma: float) -> float:
        # raw coverage here: snapping would hide a misplaced edge's faint row of pixels
        return _iou(alpha, template(c, r, sigma))

    sigma = max(TEMPLATE_BLURS, key=lambda s: evaluate(centre, radius, s))
    best = evaluate(centre, radius, sigma)
    if best >= MIN_IOU - 0.15:  # hopeless fits are not worth refining
        step = 0.5
        while step >= 0.125:
            improved = False
            for dx, dy, dr in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
                c = centre + step * np.array([dx, dy])
                r = radius * (1 + 0.06 * step * dr)
                value = evaluate(c, r, sigma)
                if value > best:
                    best, centre, radius, improved = value, c, r, True
            if not improved:
                step /= 2
    # the blur is a nuisance (a decoder's softness): each score takes the blur that suits it best
    templates = [template(centre, radius, s) for s in TEMPLATE_BLURS]
    iou = max(_iou(_clean(alpha), _clean(t)) for t in templates)
    residual = min(_local_residual(alpha, t, weight) for t in templates)
    corner = min(_corner_rounding(shape, alpha, t, weight, box, centre, radius) for t in templates)
    return _Fit(
        iou=iou,
        residual=residual,
        corner=corner,
        centre=(float(centre[0]), float(centre[1])),
        radius=radius,
    )


# --- the analyser ---------------------------------------------------------------------------------


def _background(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return np.median(border, axis=0)


def _border_is_solid(image: np.ndarray, background: np.ndarray) -> bool:
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    close = np.linalg.norm(border - background[None, :], axis=1) < FOREGROUND_DISTANCE
    return bool(close.mean() >= MIN_SOLID_BORDER)


def _nearest_size(radius: float, side: int) -> str:
    return min(SIZES, key=lambda name: abs(math.log(radius / (SIZES[name] * side))))


def _nearest_position(centre: tuple[float, float], side: int) -> str:
    x, y = centre[0] / side, centre[1] / side
    return min(POSITIONS, key=lambda n: (x - POSITIONS[n][0]) ** 2 + (y - POSITIONS[n][1]) ** 2)


def _analyse_object(
    image: np.ndarray,
    component: np.ndarray,
    background: np.ndarray,
    background_name: str,
    shapes: tuple[str, ...],
) -> DetectedObject | None:
    # 1. colour: the median of the pixels farthest from the background (the object's inside, not
    #    its anti-aliased rim, which mixes in the background)
    distance = np.linalg.norm(image - background, axis=2)
    inside = component & (distance >= 0.8 * np.percentile(distance[component], 90))
    rgb = np.median(image[inside], axis=0)
    colour, colour_distance = nearest_colour(rgb)
    # 2. soft mask: each pixel's position between background and object colour (anti-aliased rims
    #    count partly), only near this component so a neighbouring object does not leak in
    direction = rgb - background
    alpha = ((image - background) @ direction) / max(float(direction @ direction), 1e-6)
    alpha = np.clip(alpha, 0.0, 1.0) * _dilate(component, 2)
    area = float(alpha.sum())
    if area < MIN_OBJECT_AREA * alpha.size or colour == background_name:
        return None  # a speck, or a patch of background colour that noise pushed over the line
    # 3. shape: the best strict template fit, on a box around the object with room for blur
    ys, xs = np.nonzero(alpha > 0)
    h, w = alpha.shape
    margin = 4
    box = (
        max(0, xs.min() - margin),
        max(0, ys.min() - margin),
        min(w, xs.max() + 1 + margin),
        min(h, ys.max() + 1 + margin),
    )
    crop = alpha[box[1] : box[3], box[0] : box[2]]
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    centroid = np.array([(alpha * xx).sum() / area, (alpha * yy).sum() / area])
    # a decoder garbles the outermost pixels (its convolutions see padding there): not judged
    rows, cols = np.arange(box[1], box[3]), np.arange(box[0], box[2])
    weight = np.outer(
        (rows >= IGNORED_FRAME) & (rows < h - IGNORED_FRAME),
        (cols >= IGNORED_FRAME) & (cols < w - IGNORED_FRAME),
    ).astype(np.float32)
    fits = {shape: _fit_template(shape, crop, weight, box, area, centroid) for shape in shapes}
    best_shape = max(fits, key=lambda s: fits[s].iou)
    best = fits[best_shape]
    accepted = (
        best.iou >= MIN_IOU
        and best.residual <= MAX_LOCAL_RESIDUAL
        and best.corner
        <= max(
            MIN_CORNER_ROUNDING_PX,
            CORNER_ROUNDING.get(best_shape, MAX_CORNER_ROUNDING) * best.radius,
        )
    )
    # 4. size and position from the fitted template (for an unknown shape, the best guess)
    return DetectedObject(
        colour=colour if colour_distance <= MAX_COLOUR_DISTANCE else UNKNOWN,
        shape=best_shape if accepted else UNKNOWN,
        size=_nearest_size(best.radius, h),
        position=_nearest_position(best.centre, h),
        rgb=(float(rgb[0]), float(rgb[1]), float(rgb[2])),
        centre=best.centre,
        radius=best.radius,
        area=area,
        iou={shape: fit.iou for shape, fit in fits.items()},
        residual=best.residual,
        corner=best.corner,
    )


def analyse(image: Image.Image | np.ndarray, shapes: tuple[str, ...] = SHAPES) -> Analysis:
    """Find the background and every object in ``image`` and judge each object's attributes;
    an object's shape is the best of ``shapes`` (the base model's five unless told more)."""
    pixels = to_array(image)
    background = _background(pixels)
    name, distance = nearest_colour(background)
    if distance > MAX_COLOUR_DISTANCE or not _border_is_solid(pixels, background):
        name = UNKNOWN
    foreground = np.linalg.norm(pixels - background, axis=2) > FOREGROUND_DISTANCE
    # the largest few only: a noise image has hundreds of specks, and any count over two is wrong
    components = sorted(_components(foreground), key=lambda c: -int(c.sum()))[:MAX_OBJECTS]
    objects = [
        found
        for component in components
        if (found := _analyse_object(pixels, component, background, name, shapes)) is not None
    ]
    objects.sort(key=lambda o: o.centre[0] + o.centre[1])  # left before right, top before bottom
    bg = (float(background[0]), float(background[1]), float(background[2]))
    return Analysis(background=name, background_rgb=bg, objects=objects)
