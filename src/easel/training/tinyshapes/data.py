"""Synthetic captioned scenes for the bundled `tiny-shapes` model.

A scene is typed data (`Scene` of `ShapeObject`s on a background colour); its caption is derived
from it by a small grammar with synonyms and word-order variety, and `render` draws a batch of scenes
in one vectorised torch call (CPU or CUDA), anti-aliased through signed distance functions.
`parse_prompt` maps a canonical prompt back to the scene it asks for (the evaluator and the tests
use it). Combinations listed in `HELD_OUT` never appear in training data.

Only torch, numpy and PIL are imported here: the training machine has nothing else.

Example::

    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(4)]
    images = render(scenes)                       # (4, 3, 64, 64) floats in [0, 1]
    captions = [caption(s, rng) for s in scenes]  # "a small red star on the left, white background"
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 64

# Well separated RGB values: the evaluator tells them apart by nearest colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (250, 220, 30),
    "orange": (250, 140, 20),
    "purple": (130, 40, 180),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "pink": (250, 150, 200),
    "cyan": (40, 220, 230),
    "brown": (120, 70, 30),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Half extent of an object's bounding box, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.11, "medium": 0.18, "big": 0.25}
# Object centre (x, y) as fractions of the image side; y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "centre": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
}
# Two objects sit on opposite sides, small or medium, so they never overlap.
PAIR_POSITIONS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
PAIR_SIZES: tuple[str, ...] = ("small", "medium")

# (colour, shape, background) combinations kept out of training, for evaluation only.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "white"),
    ("blue", "square", "yellow"),
    ("green", "triangle", "black"),
    ("yellow", "star", "blue"),
    ("purple", "cross", "white"),
    ("orange", "circle", "gray"),
    ("pink", "square", "black"),
    ("cyan", "triangle", "purple"),
    ("white", "star", "red"),
    ("brown", "cross", "cyan"),
    ("black", "triangle", "orange"),
    ("gray", "star", "green"),
    ("red", "square", "cyan"),
    ("blue", "triangle", "white"),
    ("yellow", "cross", "brown"),
    ("green", "star", "pink"),
)

# Words the captions use for each attribute; the first is the canonical one.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLOURS} | {"gray": ("gray", "grey")}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium",),
    "big": ("big", "large"),
}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "on the top"),
    "bottom": ("at the bottom", "on the bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
TEMPLATES: tuple[str, ...] = (
    "{objects} on {background} background",  # canonical
    "{objects} against {background} background",
    "{background} background with {objects}",
    "{objects}, {background} background",
)


@dataclass(frozen=True)
class ShapeObject:
    """One object: what it is, its colour, size and where it sits."""

    shape: str
    colour: str
    size: str = "medium"
    position: str = "centre"


@dataclass(frozen=True)
class Scene:
    """One or two objects on a solid background; the caption and the image both derive from it."""

    objects: tuple[ShapeObject, ...]
    background: str

    def combos(self) -> list[tuple[str, str, str]]:
        """(colour, shape, background) of each object, the unit `HELD_OUT` is written in."""
        return [(o.colour, o.shape, self.background) for o in self.objects]


def is_held_out(scene: Scene) -> bool:
    """True when any object of the scene is a held-out (colour, shape, background) combination."""
    return any(combo in HELD_OUT for combo in scene.combos())


# --- sampling -----------------------------------------------------------------------------------


def sample_scene(rng: random.Random, *, two_object_rate: float = 0.4) -> Scene:
    """A random training scene: never held out, object colours distinct from each other and the
    background."""
    while True:
        background = rng.choice(list(COLOURS))
        if rng.random() < two_object_rate:
            first, second = rng.sample([c for c in COLOURS if c != background], 2)
            positions = rng.choice(PAIR_POSITIONS)
            objects: tuple[ShapeObject, ...] = (
                ShapeObject(rng.choice(SHAPES), first, rng.choice(PAIR_SIZES), positions[0]),
                ShapeObject(rng.choice(SHAPES), second, rng.choice(PAIR_SIZES), positions[1]),
            )
        else:
            colour = rng.choice([c for c in COLOURS if c != background])
            position = "centre" if rng.random() < 0.4 else rng.choice(list(POSITIONS))
            objects = (ShapeObject(rng.choice(SHAPES), colour, rng.choice(list(SIZES)), position),)
        scene = Scene(objects, background)
        if not is_held_out(scene):
            return scene


# The shapes `training_scene` redraws objects in: stars and crosses twice as likely.
HARD_SHAPES = (*SHAPES, "star", "cross")


def training_scene(rng: random.Random, hard_share: float) -> Scene:
    """A training scene; with probability ``hard_share`` its objects become small, in a shape
    drawn from `HARD_SHAPES` (colours, positions and the background stay): small stars and
    crosses are what the models lose first. Never held out. A share of 0 draws exactly the
    scenes `sample_scene` does."""
    scene = sample_scene(rng)
    if hard_share <= 0 or rng.random() >= hard_share:
        return scene
    while True:
        objects = tuple(
            ShapeObject(rng.choice(HARD_SHAPES), o.colour, "small", o.position)
            for o in scene.objects
        )
        if not is_held_out(hard := Scene(objects, scene.background)):
            return hard


# --- captions -----------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(obj: ShapeObject, rng: random.Random | None, *, mention_position: bool) -> str:
    def pick(words: tuple[str, ...]) -> str:
        return words[0] if rng is None else rng.choice(words)

    words = []
    # Medium is the unmarked size: captions usually leave it out, like "centre" for one object.
    if obj.size != "medium" or (rng is not None and rng.random() < 0.2):
        words.append(pick(SIZE_WORDS[obj.size]))
    # a shape outside the vocabulary (a LoRA's trigger word) is named as given
    words += [pick(COLOUR_WORDS[obj.colour]), pick(SHAPE_WORDS.get(obj.shape, (obj.shape,)))]
    text = f"{_article(words[0])} {' '.join(words)}"
    if mention_position:
        text += " " + pick(POSITION_WORDS[obj.position])
    return text


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """The scene's caption: canonical when `rng` is None, otherwise a random grammar variant.

    Canonical captions leave out what is implied: a medium size, the centre position of a single
    object, and left/right for two objects (the first named is on the left).
    """
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        mention = obj.position != "centre" or (rng is not None and rng.random() < 0.2)
        objects = _describe(obj, rng, mention_position=mention)
    else:
        mention = scene.objects[0].position != "left" or (rng is not None and rng.random() < 0.5)
        objects = " and ".join(_describe(o, rng, mention_position=mention) for o in scene.objects)
    template = TEMPLATES[0] if rng is None else rng.choice(TEMPLATES)
    background = COLOUR_WORDS[scene.background]
    bg_word = background[0] if rng is None else rng.choice(background)
    if not template.startswith("{objects}, "):
        bg_word = f"{_article(bg_word)} {bg_word}"
    return template.format(objects=objects, background=bg_word)


def corpus_words() -> list[str]:
    """Every word any caption can contain (the tokenizer keeps each as one token)."""
    phrases = [*TEMPLATES, "a an and"]
    for table in (COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS, POSITION_WORDS):
        phrases += [w for words in table.values() for w in words]
    text = " ".join(phrases).replace("{objects}", " ").replace("{background}", " ")
    return sorted(set(re.findall(r"[a-z]+|[^\sa-z]", text)))


# --- parsing ------------------------------------------------------------------------------------


class PromptError(ValueError):
    """A prompt outside the caption grammar."""


def _alternatives(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {word: key for key, words in table.items() for word in words}


_COLOUR_OF = _alternatives(COLOUR_WORDS)
_SHAPE_OF = _alternatives(SHAPE_WORDS)
_SIZE_OF = _alternatives(SIZE_WORDS)
_POSITION_OF = _alternatives(POSITION_WORDS)


def _group(name: str, words: dict[str, str]) -> str:
    return f"(?P<{name}>" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + ")"


_OBJECT_RE = re.compile(
    r"an? (?:" + _group("size", _SIZE_OF) + " )?" + _group("colour", _COLOUR_OF) + " "
    + _group("shape", _SHAPE_OF) + "(?: " + _group("position", _POSITION_OF) + ")?$"
)  # fmt: skip
_BACKGROUND_RES = [
    re.compile(r"^(?P<objects>.+) (?:on|against) an? (?P<background>\w+) background$"),
    re.compile(r"^an? (?P<background>\w+) background with (?P<objects>.+)$"),
    re.compile(r"^(?P<objects>.+), (?P<background>\w+) background$"),
]


def parse_prompt(prompt: str) -> Scene:
    """The scene a caption-grammar prompt asks for, with implied defaults filled in.

    >>> parse_prompt("a big red circle on the left on a white background").objects[0].size
    'big'

    Raises `PromptError` naming the part it could not read.
    """
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    match = next((m for r in _BACKGROUND_RES if (m := r.match(text))), None)
    if match is None:
        raise PromptError(f"no '... on a <colour> background' in prompt {prompt!r}")
    if match["background"] not in _COLOUR_OF:
        raise PromptError(f"unknown background colour {match['background']!r}")
    background = _COLOUR_OF[match["background"]]
    parts = match["objects"].split(" and ")
    if len(parts) > 2:
        raise PromptError(f"at most two objects per prompt (got {len(parts)})")
    objects = []
    for index, part in enumerate(parts):
        found = _OBJECT_RE.match(part)
        if found is None:
            raise PromptError(f"cannot read object {part!r}: expected 'a [size] <colour> <shape>'")
        default_position = "centre" if len(parts) == 1 else ("left", "right")[index]
        objects.append(
            ShapeObject(
                shape=_SHAPE_OF[found["shape"]],
                colour=_COLOUR_OF[found["colour"]],
                size=_SIZE_OF[found["size"]] if found["size"] else "medium",
                position=_POSITION_OF[found["position"]] if found["position"] else default_position,
            )
        )
    return Scene(tuple(objects), background)


# --- rendering ----------------------------------------------------------------------------------


def _box(x: torch.Tensor, y: torch.Tensor, half_w: float, half_h: float) -> torch.Tensor:
    dx, dy = x.abs() - half_w, y.abs() - half_h
    outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _triangle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Equilateral, apex up, side 2, its bounding box centred on the origin (Inigo Quilez's sdf).
    k = math.sqrt(3.0)
    y = -y + 1 / (2 * k)  # to y-up, shifted so the bounding box (not the centroid) is centred
    x = x.abs() - 1.0
    y = y + 1.0 / k
    fold = x + k * y > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - x.clamp(-2.0, 0.0)
    return -torch.sqrt(x * x + y * y) * torch.sign(y)


def _star(x: torch.Tensor, y: torch.Tensor, inner: float = 0.45) -> torch.Tensor:
    # Five-pointed star, one point up, outer radius 1 (Inigo Quilez's sdStar5), y flipped to y-up.
    k1x, k1y = 0.809016994375, -0.587785252292
    y = -y + 0.095  # centre the bounding box (points reach 1 up, 0.81 down)
    x = x.abs()
    d = (k1x * x + k1y * y).clamp(min=0)
    x, y = x - 2 * d * k1x, y - 2 * d * k1y
    d = (-k1x * x + k1y * y).clamp(min=0)
    x, y = x + 2 * d * k1x, y - 2 * d * k1y
    x = x.abs()
    y = y - 1.0
    bax, bay = -inner * k1y, inner * k1x - 1.0
    h = ((x * bax + y * bay) / (bax * bax + bay * bay)).clamp(0.0, 1.0)
    return torch.sqrt((x - bax * h) ** 2 + (y - bay * h) ** 2) * torch.sign(y * bax - x * bay)


def _cross(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.minimum(_box(x, y, 1.0, 0.34), _box(x, y, 0.34, 1.0))


def _circle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x * x + y * y) - 1.0


def _square(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _box(x, y, 0.85, 0.85)


# Signed distance (in object radii, negative inside) for each shape, in `SHAPES` order.
_DISTANCE_FUNCTIONS = (_circle, _square, _triangle, _star, _cross)


def _object_row(obj: ShapeObject | None, size: int) -> list[float]:
    if obj is None:
        return [0, 0, 0, 0, size / 2, size / 2, 1, 0]
    x, y = POSITIONS[obj.position]
    r = SIZES[obj.size] * size
    return [SHAPES.index(obj.shape), *COLOURS[obj.colour], x * size, y * size, r, 1]


def render(
    scenes: list[Scene],
    *,
    size: int = IMAGE_SIZE,
    device: str | torch.device = "cpu",
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw `scenes` as a float tensor (B, 3, size, size) in [0, 1] on `device`.

    `jitter` moves each object by up to that many pixels and scales it by up to 4 % (training data
    uses a little, so the model does not learn a single exact pixel pattern per attribute).
    """
    count = len(scenes)
    slots = max(len(s.objects) for s in scenes)
    # One row per object slot; an absent second object is a fully transparent medium circle.
    padded = [list(s.objects) + [None] * (slots - len(s.objects)) for s in scenes]
    rows = [[_object_row(obj, size) for obj in objects] for objects in padded]
    table = torch.tensor(rows, dtype=torch.float32)  # (B, slots, 8)
    shape_id, colour, centre = table[..., 0].long(), table[..., 1:4], table[..., 4:6]
    radius, present = table[..., 6], table[..., 7]
    background = torch.tensor([COLOURS[s.background] for s in scenes], dtype=torch.float32)
    if jitter:
        centre += (torch.rand(count, slots, 2, generator=generator) * 2 - 1) * jitter
        radius *= 1 + (torch.rand(count, slots, generator=generator) * 2 - 1) * 0.04
    shape_id, colour, centre, radius, present, background = (
        t.to(device) for t in (shape_id, colour, centre, radius, present, background)
    )
    # Pixel centres, then every object's frame: (B, slots, H, W) in units of its radius.
    grid = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    x = (grid.view(1, 1, 1, size) - centre[..., 0, None, None]) / radius[..., None, None]
    y = (grid.view(1, 1, size, 1) - centre[..., 1, None, None]) / radius[..., None, None]
    distance = torch.empty(count, slots, size, size, device=device)
    for index, distance_to in enumerate(_DISTANCE_FUNCTIONS):
        chosen = shape_id == index
        distance[chosen] = distance_to(x[chosen], y[chosen])
    # Coverage of a pixel by the shape, from the distance in pixels: a one-pixel anti-aliased edge.
    alpha = (0.5 - distance * radius[..., None, None]).clamp(0, 1) * present[..., None, None]
    image = background[:, :, None, None].expand(count, 3, size, size)
    for j in range(slots):
        a = alpha[:, j, None]
        image = image * (1 - a) + colour[:, j, :, None, None] * a
    return image / 255.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] to PIL images."""
    array = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


@dataclass
class Batch:
    """Training images in [-1, 1] on the device and their captions."""

    images: torch.Tensor
    captions: list[str]
    scenes: list[Scene]


class SceneStream:
    """Endless random training batches, rendered on `device`, never containing `HELD_OUT`."""

    def __init__(
        self,
        seed: int = 0,
        device: str | torch.device = "cpu",
        jitter: float = 1.0,
        hard_share: float = 0.0,
    ):
        self.rng = random.Random(seed)
        self.hard_share = hard_share  # of scenes redrawn small, stars and crosses likeliest
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device
        self.jitter = jitter

    def batch(self, batch_size: int) -> Batch:
        scenes = [training_scene(self.rng, self.hard_share) for _ in range(batch_size)]
        captions = [caption(s, self.rng) for s in scenes]
        images = render(scenes, device=self.device, jitter=self.jitter, generator=self.generator)
        return Batch(images * 2 - 1, captions, scenes)

    def mosaics(self, count: int) -> torch.Tensor:
        """`count` images tiled 2x2 from 32x32 crops of rendered scenes, each crop around one
        object of its scene (up to 4 px off centre): four objects' edges in one image, at
        their true size. No caption fits them; they are for the autoencoder, whose errors are
        at edges, while most of a plain scene is flat background it learns early."""
        half = IMAGE_SIZE // 2
        tiles = []
        batch = self.batch(4 * count)
        for image, scene in zip(batch.images, batch.scenes, strict=True):
            x, y = POSITIONS[self.rng.choice(scene.objects).position]
            left, top = (
                min(max(int(c * IMAGE_SIZE) + self.rng.randint(-4, 4) - half // 2, 0), half)
                for c in (x, y)
            )
            tiles.append(image[:, top : top + half, left : left + half])
        grid = torch.stack(tiles).view(count, 2, 2, 3, half, half)  # (image, row, column, ...)
        return grid.permute(0, 3, 1, 4, 2, 5).reshape(count, 3, IMAGE_SIZE, IMAGE_SIZE)

    def autoencoder_images(self, count: int, mosaic_share: float) -> torch.Tensor:
        """`count` images in [-1, 1] for the autoencoder: plain scenes, and `mosaic_share` of
        them mosaics."""
        mosaics = round(count * mosaic_share)
        images = [self.batch(count - mosaics).images] if mosaics < count else []
        if mosaics:
            images.append(self.mosaics(mosaics))
        return torch.cat(images)
