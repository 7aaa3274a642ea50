"""Does a LoRA teach tiny-shapes a shape it has never seen? The dataset and the judge.

The base model knows five shapes. `make_dataset` draws a sixth, a hexagon (the analyser's own
template, so "a hexagon" means what the judge checks), in seven of its twelve colours,
captioned in the model's grammar with a trigger word in the shape's place: "a big red sks on the
left on a white background". `evaluate_lora` then asks the model with the LoRA for the trigger in
colours and on backgrounds that appear in none of the training images, and counts the images
whose one object the analyser reads as a hexagon (it chooses among all six shapes). As a control
it scores the usual prompts (`evaluate`) with and without the LoRA: what the model knew should
survive it.

    python -m easel.training.tinyshapes.evaluate_lora dataset data/hexagons   # 20 images
    easel train lora data/hexagons --name hexagon --trigger sks
    python -m easel.training.tinyshapes.evaluate_lora prior prior64.txt       # or, with a prior:
    easel train lora data/hexagons --name hexagon --trigger sks \
        --prior-prompts-file prior64.txt --prior-images 64
    easel eval tiny-shapes --lora hexagon                                      # this judge
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from easel.config import Settings
from easel.domain import InvalidParams
from easel.engine.guidance import end_guidance_args
from easel.imaging import image_grid
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager
from easel.models.loras import LoraCatalog
from easel.models.params import defaults_for
from easel.training.tinyshapes.analyser import EXTRA_SHAPES, SHAPES, analyse, render_template
from easel.training.tinyshapes.data import (
    COLOURS,
    IMAGE_SIZE,
    SIZES,
    Scene,
    ShapeObject,
    caption,
    sample_scene,
)
from easel.training.tinyshapes.data import POSITIONS as SCENE_POSITIONS
from easel.training.tinyshapes.evaluate import _round_trip, evaluate

SHAPE = "hexagon"
PRIOR_SEED = 123  # of `prior_prompts`' scenes; the control's come from evaluate's seed 0
TRIGGER = "sks"  # spelt by tiny-shapes' tokenizer from known pieces ("zq" is not: its q is unknown)
# the dataset's colours, for the shape and the background alike (seven colours, not four: with
# four the LoRA tied the shape to them more: 42.5 against 35 % in new colours, attention-only
# LoRA; docs/TRAINING-LOG.md)
TRAIN_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "gray")
# in no training image, neither as the shape's colour nor as a background
NEW_COLOURS = ("purple", "orange", "cyan", "pink", "brown")
DATASET_SIZES = ("medium", "big")  # a small hexagon is 14 px across: too close to a disc to judge
POSITIONS = tuple(SCENE_POSITIONS)  # centre, left, right, top, bottom


def describe(colour: str, size: str, position: str, background: str, word: str) -> str:
    """A caption in the base model's canonical grammar, ``word`` in the shape's place."""
    return caption(Scene((ShapeObject(word, colour, size, position),), background))


def draw(colour: str, size: str, position: str, background: str, rng: random.Random) -> Image.Image:
    """The shape as the analyser's template draws it (anti-aliased), at the base model's sizes
    and positions, moved by up to a pixel as its training scenes are."""
    side = IMAGE_SIZE
    x, y = SCENE_POSITIONS[position]
    centre = (x * side + rng.uniform(-1, 1), y * side + rng.uniform(-1, 1))
    alpha = render_template(SHAPE, centre, SIZES[size] * side, (0, 0, side, side))[..., None]
    pixels = np.array(COLOURS[background]) * (1 - alpha) + np.array(COLOURS[colour]) * alpha
    return Image.fromarray(pixels.round().astype(np.uint8))


def make_dataset(folder: Path, count: int = 20, seed: int = 0, trigger: str = TRIGGER) -> Path:
    """``count`` images with same-name .txt captions in ``folder`` (a dataset for
    ``easel train lora``): training colours and backgrounds only."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        colour = TRAIN_COLOURS[index % len(TRAIN_COLOURS)]
        background = rng.choice([c for c in TRAIN_COLOURS if c != colour])
        size, position = rng.choice(DATASET_SIZES), rng.choice(POSITIONS)
        draw(colour, size, position, background, rng).save(folder / f"{index:03d}.png")
        caption = describe(colour, size, position, background, trigger)
        (folder / f"{index:03d}.txt").write_text(caption + "\n")
    return folder


def prior_prompts(count: int = 64, seed: int = PRIOR_SEED) -> list[str]:
    """Captions of random training scenes: what the model does well, as a LoRA's prior. The
    seed is not one the judge's control uses (its scenes come from `default_scenes`)."""
    rng = random.Random(seed)
    return [caption(sample_scene(rng)) for _ in range(count)]


@dataclass
class LoraCase:
    prompt: str
    colour: str
    background: str
    size: str
    position: str
    shape: str = ""  # what the analyser read ("" for no object, "2 objects", ...)
    colour_seen: str = ""
    background_seen: str = ""

    @property
    def shape_right(self) -> bool:
        return self.shape == SHAPE

    @property
    def all_right(self) -> bool:
        return self.shape_right and (self.colour_seen, self.background_seen) == (
            self.colour,
            self.background,
        )


@dataclass
class LoraReport:
    model: str
    lora: str
    weight: float
    shape_rate: float  # images whose one object is the new shape
    all_right_rate: float  # ... in the asked colour, on the asked background
    base_shape_rate: float  # the same prompts without the LoRA (what the trigger alone does)
    # true drawings of the same cases through the model's VAE: the judge's ceiling (what a
    # perfect denoiser would score)
    decoded_shape_rate: float
    plain_with_lora: float | None  # `evaluate`'s all-right rate on its usual prompts, with it
    plain_without: float | None  # ... and without it
    seconds: float
    cases: list[LoraCase] = field(default_factory=list)


def new_cases(count: int, seed: int) -> list[LoraCase]:
    """Prompts for the shape in new colours on new backgrounds, each pair once before repeats."""
    rng = random.Random(seed)
    pairs = [(c, b) for c in NEW_COLOURS for b in NEW_COLOURS if c != b]
    rng.shuffle(pairs)
    cases = []
    for index in range(count):
        colour, background = pairs[index % len(pairs)]
        size, position = DATASET_SIZES[index % 2], POSITIONS[(index // 2) % len(POSITIONS)]
        prompt = describe(colour, size, position, background, TRIGGER)
        cases.append(LoraCase(prompt, colour, background, size, position))
    return cases


def _read(case: LoraCase, image: Image.Image) -> None:
    analysis = analyse(image, SHAPES + EXTRA_SHAPES)
    case.background_seen = analysis.background
    if len(analysis.objects) == 1:
        case.shape, case.colour_seen = analysis.objects[0].shape, analysis.objects[0].colour
    else:
        case.shape = f"{len(analysis.objects)} objects"


def evaluate_lora(
    model: str,
    lora: str,
    *,
    weight: float = 1.0,
    count: int = 40,
    control: int | None = 8,
    seed: int = 0,
    out: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> LoraReport:
    """Render ``count`` prompts for the new shape with the LoRA ``lora`` (a name in
    EASEL_HOME/loras) at ``weight`` and judge them; the same prompts without it; and, unless
    ``control`` is None, `evaluate`'s usual prompts (``control`` per group) with and without it.
    With ``out``: report.json and grid.png (with the LoRA above, without below)."""
    started = time.perf_counter()
    # 1. the model and the LoRA
    settings = Settings()
    manager = ModelManager(settings, ModelCatalog(settings))
    loaded = manager.get_pipeline(model, "txt2img")
    if loaded.family.name != "sd":
        raise InvalidParams("model must be tiny-shapes or a model like it", field="model")
    record = LoraCatalog(settings).get(lora)
    defaults = defaults_for(loaded.record, loaded.family)
    pipe, cases = loaded.pipeline, new_cases(count, seed)
    total = 2 * count

    # 2. the new shape, with the LoRA and without (same seeds)
    def render(with_lora: bool, done: int) -> list[Image.Image]:
        manager.use_loras(loaded.record, [(record, weight)] if with_lora else [])
        images = []
        for index, case in enumerate(cases):
            generator = torch.Generator().manual_seed(seed + index)
            images += pipe(
                case.prompt,
                num_inference_steps=defaults["num_inference_steps"],
                guidance_scale=defaults["guidance_scale"],
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
                generator=generator,
                **end_guidance_args(defaults["guidance_end"]),
            ).images
            if on_progress:
                on_progress(done + index + 1, total)
        return images

    with_lora = render(True, 0)
    for case, image in zip(cases, with_lora, strict=True):
        _read(case, image)
    without = render(False, count)
    base_cases = new_cases(count, seed)  # the same prompts, read afresh
    for case, image in zip(base_cases, without, strict=True):
        _read(case, image)

    rng = random.Random(seed)
    truth = [draw(c.colour, c.size, c.position, c.background, rng) for c in cases]
    decoded_cases = new_cases(count, seed)
    for case, image in zip(decoded_cases, _round_trip(pipe, truth, 16), strict=True):
        _read(case, image)

    # 3. the control: what the model knew, with the LoRA on and off
    plain_with = plain_without = None
    if control is not None:
        common = {"limit": control, "seed": seed}
        plain_with = evaluate(model, loras=[(lora, weight)], **common).generated.all_right["all"]
        plain_without = evaluate(model, **common).generated.all_right["all"]

    def rate(values: list[bool]) -> float:
        return sum(values) / len(values)

    report = LoraReport(
        model=loaded.record.id,
        lora=lora,
        weight=weight,
        shape_rate=rate([c.shape_right for c in cases]),
        all_right_rate=rate([c.all_right for c in cases]),
        base_shape_rate=rate([c.shape_right for c in base_cases]),
        decoded_shape_rate=rate([c.shape_right for c in decoded_cases]),
        plain_with_lora=plain_with,
        plain_without=plain_without,
        seconds=time.perf_counter() - started,
        cases=cases,
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(asdict(report), indent=2))
        columns = min(count, 10)
        rows = [
            with_lora[i : i + columns] + without[i : i + columns] for i in range(0, count, columns)
        ]
        image_grid([im for row in rows for im in row], columns=columns).save(out / "grid.png")
    return report


def format_markdown(report: LoraReport) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    lines = [
        f"LoRA {report.lora} (weight {report.weight}) on {report.model}, "
        f"{len(report.cases)} prompts of the new shape in new colours and backgrounds:",
        "",
        "| measure | with the LoRA | without |",
        "|---|---|---|",
        f"| the object is a {SHAPE} | {pct(report.shape_rate)} | {pct(report.base_shape_rate)} |",
        f"| ... for true drawings through the VAE (the judge's ceiling) | "
        f"{pct(report.decoded_shape_rate)} | |",
        f"| ... in the asked colour and background | {pct(report.all_right_rate)} | |",
        f"| usual prompts, all right | {pct(report.plain_with_lora)} | "
        f"{pct(report.plain_without)} |",
        "",
        f"({report.seconds:.0f} s)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m easel.training.tinyshapes.evaluate_lora", description=__doc__
    )
    commands = parser.add_subparsers(dest="command", required=True)
    dataset = commands.add_parser("dataset", help="write the hexagon dataset")
    dataset.add_argument("folder", type=Path)
    dataset.add_argument("--count", type=int, default=20)
    dataset.add_argument("--seed", type=int, default=0)
    prior = commands.add_parser(
        "prior", help="write prompts of the model's usual scenes, for --prior-prompts-file"
    )
    prior.add_argument("file", type=Path)
    prior.add_argument("--count", type=int, default=64)
    prior.add_argument("--seed", type=int, default=PRIOR_SEED)
    args = parser.parse_args(argv)
    if args.command == "prior":
        args.file.write_text("\n".join(prior_prompts(args.count, args.seed)) + "\n")
        print(f"wrote {args.count} prompts to {args.file}")
        return 0
    folder = make_dataset(args.folder, args.count, args.seed)
    print(f"wrote {args.count} images with captions to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
