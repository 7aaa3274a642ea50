"""Does a model edit pictures as asked? Edit held-out pictures, judge the pixels, report the scores.

`evaluate_editing` runs each row of `MEASURES` (inpaint, outpaint, img2img, style) through the
real engine, as `easel generate --image ...` does, on pictures `data.render` draws of the held-out
(colour, shape, background) combinations of `data.HELD_OUT`, and has the evaluator's pixel
analyser (`analyser`) read what came out:

    >>> report = evaluate_editing("tiny-shapes", out=Path("eval/editing"))  # doctest: +SKIP
    >>> report.summaries["inpaint"].rates["asked object in the mask"]        # doctest: +SKIP
    0.92

A measure is a row: the task, how its cases are made, how a result is judged (named checks, each
true or false), and the share of cases each check should pass (``None``: shown, not a target).
Case k of every measure uses seed ``seed + k``, so measures on the same cases (plain and
only-masked inpainting) are paired image by image.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from easel.config import Settings
from easel.domain import GenerationParams, InputImages, InvalidParams
from easel.imaging import band, grow_canvas, image_grid
from easel.models.catalog import ModelCatalog
from easel.models.params import TASK_STRENGTH
from easel.training.tinyshapes.analyser import Analysis, analyse, nearest_colour
from easel.training.tinyshapes.data import (
    COLOURS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    caption,
    render,
    to_pil,
)
from easel.training.tinyshapes.evaluate import HELD_OUT_VARIANTS, describe, judge

SIDE = 64  # the model's native size, and the size the analyser is calibrated at
PER_COMBO = 3  # cases per held-out combination: 48 per measure
MASK_MARGIN = 3 / SIDE  # an inpainting mask reaches this far (3 px at 64) beyond the object's box
# Outpainting layouts: where the object sits and which border is cut away and painted again. In
# the first four the crop cuts the object, so the model must finish it; in the rest it does not.
OUTPAINT_LAYOUTS: tuple[tuple[str, str, dict[str, int]], ...] = (
    ("medium", "left", {"left": 16}),
    ("medium", "top", {"top": 16}),
    ("medium", "right", {"right": 16}),
    ("medium", "bottom", {"bottom": 16}),
    ("big", "centre", {"left": 8, "top": 8, "right": 8, "bottom": 8}),
    ("medium", "centre", {"left": 16, "right": 16}),
    ("small", "centre", {"top": 16, "bottom": 16}),
    ("medium", "centre", {"left": 16, "top": 16}),
)

# the checks, by name
OBJECT_IN_MASK = "asked object in the mask"
UNCHANGED = "unchanged beyond the band"
BORDER = "background colour in the new border"
WHOLE = "whole picture as prompted"
KEPT = "input kept"
FOLLOWS = "new prompt followed"
STYLED = "content's shape in the reference's colours"


@dataclass(frozen=True)
class EditCase:
    """One edit to make and judge: the request beyond prompt, task and seed (``params``), the
    input pictures, the scene the input shows (``source``; for style, the content) and the
    scene the result should show (``wanted``)."""

    prompt: str
    source: Scene
    wanted: Scene
    image: Image.Image
    params: dict[str, Any] = field(default_factory=dict)
    mask: Image.Image | None = None
    style_image: Image.Image | None = None
    region: tuple[float, float, float, float] | None = None  # the mask's box, fractions of a side
    # False: the edit is given no ``image`` (style from the prompt alone); ``image`` still shows
    # the scene asked for, in the grids
    use_image: bool = True


@dataclass(frozen=True)
class EditJudgement:
    """One result against its case: each check's verdict and what the analyser saw."""

    measure: str
    prompt: str
    seed: int
    checks: dict[str, bool]
    seen: str


@dataclass(frozen=True)
class MeasureSummary:
    cases: int
    rates: dict[str, float]  # check -> share of cases that pass it
    targets: dict[str, float | None]  # check -> the share wanted (None: shown only)
    description: str


@dataclass
class EditingReport:
    """What `evaluate_editing` measured, per measure and per case."""

    model: str
    steps: int
    guidance_scale: float
    guidance_end: float
    seed: int
    device: str
    summaries: dict[str, MeasureSummary]
    seconds: float
    judgements: list[EditJudgement] = field(default_factory=list)


# --- the cases ------------------------------------------------------------------------------------


def _picture(scene: Scene, side: int = SIDE) -> Image.Image:
    return to_pil(render([scene], size=side))[0]


def _variant(index: int, k: int, per_combo: int) -> tuple[str, str]:
    """(size, position) of the k-th case of held-out combination ``index``: all twelve variants
    come round in turn."""
    return HELD_OUT_VARIANTS[(index * per_combo + k) % len(HELD_OUT_VARIANTS)]


def _single(shape: str, colour: str, size: str, position: str, background: str) -> Scene:
    return Scene((ShapeObject(shape, colour, size, position),), background)


def object_box(obj: ShapeObject, margin: float = MASK_MARGIN) -> tuple[float, float, float, float]:
    """The object's bounding box grown by ``margin`` (left, top, right, bottom; fractions)."""
    x, y = POSITIONS[obj.position]
    half = SIZES[obj.size] + margin
    return x - half, y - half, x + half, y + half


def box_mask(box: tuple[float, float, float, float], side: int) -> Image.Image:
    """A binary "L" mask, 255 on the pixels whose centres lie in ``box`` (fractions)."""
    centres = (np.arange(side) + 0.5) / side
    cols = (centres >= box[0]) & (centres <= box[2])
    rows = (centres >= box[1]) & (centres <= box[3])
    return Image.fromarray((np.outer(rows, cols) * 255).astype(np.uint8), "L")


def inpaint_cases(per_combo: int, seed: int, *, side: int = SIDE, **params: Any) -> list[EditCase]:
    """Replace an object: a seen object on a held-out combination's background, masked (its box
    and 3 px more), and the prompt asks for the held-out object in its place. ``side``: the
    picture's size; ``params``: request fields (``only_masked``, ``width``...)."""
    rng = random.Random(seed)
    cases = []
    for index, (colour, shape, background) in enumerate(HELD_OUT):
        for k in range(per_combo):
            size, position = _variant(index, k, per_combo)
            while True:  # the object to replace: another shape and colour, itself seen
                old_shape = rng.choice([s for s in SHAPES if s != shape])
                old_colour = rng.choice([c for c in COLOURS if c not in (colour, background)])
                if (old_colour, old_shape, background) not in HELD_OUT:
                    break
            source = _single(old_shape, old_colour, size, position, background)
            wanted = _single(shape, colour, size, position, background)
            box = object_box(wanted.objects[0])
            cases.append(
                EditCase(
                    prompt=caption(wanted),
                    source=source,
                    wanted=wanted,
                    image=_picture(source, side),
                    mask=box_mask(box, side),
                    region=box,
                    params=params,
                )
            )
    return cases


def outpaint_cases(per_combo: int, seed: int) -> list[EditCase]:
    """Paint a cut-away border again: a held-out scene cropped by 8 or 16 px on some sides
    (`OUTPAINT_LAYOUTS`, half of them through the object), outpainted back to 64 px."""
    cases = []
    for index, (colour, shape, background) in enumerate(HELD_OUT):
        for k in range(per_combo):
            size, position, sides = OUTPAINT_LAYOUTS[(index * per_combo + k) % 8]
            scene = _single(shape, colour, size, position, background)
            left, top = sides.get("left", 0), sides.get("top", 0)
            right, bottom = SIDE - sides.get("right", 0), SIDE - sides.get("bottom", 0)
            cases.append(
                EditCase(
                    prompt=caption(scene),
                    source=scene,
                    wanted=scene,
                    image=_picture(scene).crop((left, top, right, bottom)),
                    params={"outpaint": sides},
                )
            )
    return cases


def img2img_cases(
    per_combo: int, seed: int, *, strength: float, new_prompt: bool
) -> list[EditCase]:
    """Redraw a held-out picture at ``strength``, with its own caption or with that of another
    held-out combination (another colour, shape and background; the same size and place)."""
    rng = random.Random(seed)
    cases = []
    for index, (colour, shape, background) in enumerate(HELD_OUT):
        others = [
            combo
            for combo in HELD_OUT
            if combo[0] != colour and combo[1] != shape and combo[2] != background
        ]
        for k in range(per_combo):
            size, position = _variant(index, k, per_combo)
            source = _single(shape, colour, size, position, background)
            new_colour, new_shape, new_background = rng.choice(others)
            new = _single(new_shape, new_colour, size, position, new_background)
            wanted = new if new_prompt else source
            cases.append(
                EditCase(
                    prompt=caption(wanted),
                    source=source,
                    wanted=wanted,
                    image=_picture(source),
                    params={"strength": strength},
                )
            )
    return cases


def style_cases(
    per_combo: int,
    seed: int,
    *,
    prompt: str = "shape",
    task: str = "style",
    with_content: bool = True,
) -> list[EditCase]:
    """Restyle a held-out picture (the content) after a reference of another shape, colours and
    layout: wanted is the content's object in the reference's object and background colours.
    ``prompt``: "shape" names only the content's shape ("a circle": the colours must come from
    the reference), "wanted" captions the wanted scene, "content" the content as it is. With
    ``task`` "img2img" the reference is left out (what the style transfer adds); with
    ``with_content`` False the content picture is not given (a new picture from the prompt)."""
    rng = random.Random(seed)
    cases = []
    for index, (colour, shape, background) in enumerate(HELD_OUT):
        for k in range(per_combo):
            size, position = _variant(index, k, per_combo)
            content = _single(shape, colour, size, position, background)
            while True:
                ref_colour, ref_background = rng.sample(list(COLOURS), 2)
                if not {ref_colour, ref_background} & {colour, background}:
                    break
            reference = _single(
                rng.choice([s for s in SHAPES if s != shape]),
                ref_colour,
                rng.choice(list(SIZES)),
                rng.choice(list(POSITIONS)),
                ref_background,
            )
            wanted = _single(shape, ref_colour, size, position, ref_background)
            styled = task == "style"
            cases.append(
                EditCase(
                    prompt=f"a {shape}"
                    if prompt == "shape"
                    else caption(wanted if prompt == "wanted" else content),
                    source=content,
                    wanted=wanted,
                    image=_picture(content),
                    style_image=_picture(reference) if styled else None,
                    params={} if styled else {"strength": TASK_STRENGTH["style"]},
                    use_image=with_content,
                )
            )
    return cases


# --- judging --------------------------------------------------------------------------------------


def reads_as(scene: Scene, analysis: Analysis) -> bool:
    """The analyser sees ``scene``'s objects in their shapes and colours, on its background, and
    nothing else (size and place are not asked)."""
    checks = judge(caption(scene), scene, analysis).checks
    return all(all(checks[name]) for name in ("shape", "colour", "background", "count"))


def unchanged_beyond_band(
    original: Image.Image, result: Image.Image, mask: Image.Image, blur: int
) -> bool:
    """Every pixel farther than ``blur`` px from ``mask`` is the original's, bit for bit."""
    keep = np.asarray(band(mask, blur)) == 0
    before = np.asarray(original.convert("RGB"))[keep]
    return bool(np.array_equal(before, np.asarray(result.convert("RGB"))[keep]))


def _at_side(image: Image.Image) -> Image.Image:
    # the analyser is calibrated at 64 px; a box filter averages as anti-aliasing does
    return image if image.size == (SIDE, SIDE) else image.resize((SIDE, SIDE), Image.Resampling.BOX)


def judge_inpaint(
    case: EditCase, result: Image.Image, blur: int
) -> tuple[dict[str, bool], Analysis]:
    assert case.mask is not None and case.region is not None
    analysis = analyse(_at_side(result))
    asked = case.wanted.objects[0]
    left, top, right, bottom = case.region
    in_mask = any(
        o.shape == asked.shape
        and o.colour == asked.colour
        and left <= o.centre[0] / SIDE <= right
        and top <= o.centre[1] / SIDE <= bottom
        for o in analysis.objects
    )
    unchanged = unchanged_beyond_band(case.image, result, case.mask, blur)
    return {OBJECT_IN_MASK: in_mask, UNCHANGED: unchanged}, analysis


def judge_outpaint(
    case: EditCase, result: Image.Image, blur: int
) -> tuple[dict[str, bool], Analysis]:
    canvas, mask = grow_canvas(case.image, case.params["outpaint"])
    border = np.asarray(mask) > 0
    pixels = np.asarray(result.convert("RGB"), dtype=np.float32)[border] / 255.0
    colour, _ = nearest_colour(np.median(pixels, axis=0))
    analysis = analyse(result)
    checks = {
        BORDER: colour == case.wanted.background,
        UNCHANGED: unchanged_beyond_band(canvas, result, mask, blur),
        WHOLE: judge(case.prompt, case.wanted, analysis).all_right,
    }
    return checks, analysis


def judge_kept(case: EditCase, result: Image.Image, blur: int) -> tuple[dict[str, bool], Analysis]:
    analysis = analyse(result)
    return {KEPT: reads_as(case.source, analysis)}, analysis


def judge_redrawn(
    case: EditCase, result: Image.Image, blur: int
) -> tuple[dict[str, bool], Analysis]:
    analysis = analyse(result)
    checks = {FOLLOWS: reads_as(case.wanted, analysis), KEPT: reads_as(case.source, analysis)}
    return checks, analysis


def judge_styled(
    case: EditCase, result: Image.Image, blur: int
) -> tuple[dict[str, bool], Analysis]:
    analysis = analyse(result)
    return {STYLED: reads_as(case.wanted, analysis)}, analysis


# --- the measures ---------------------------------------------------------------------------------

Judge = Callable[[EditCase, Image.Image, int], tuple[dict[str, bool], Analysis]]


@dataclass(frozen=True)
class Measure:
    """One row of `MEASURES`: a task, its cases (``cases(per_combo, seed)``), how a result is
    judged, and the share of cases each check should pass (``None``: reported only)."""

    name: str
    task: str
    cases: Callable[[int, int], list[EditCase]]
    judge: Judge
    targets: dict[str, float | None]
    description: str


MEASURES: tuple[Measure, ...] = (
    Measure(
        "inpaint",
        "inpaint",
        inpaint_cases,
        judge_inpaint,
        {OBJECT_IN_MASK: 0.8, UNCHANGED: 1.0},
        "64-px pictures; a seen object masked (its box + 3 px) and the prompt asks for a "
        "held-out one in its place",
    ),
    Measure(
        "inpaint, only masked",
        "inpaint",
        partial(inpaint_cases, only_masked=True),
        judge_inpaint,
        {OBJECT_IN_MASK: 0.8, UNCHANGED: 1.0},
        "the same cases with only_masked (at 64 px its 32-px padding spans the picture)",
    ),
    Measure(
        "inpaint 128 px, at 64 px",
        "inpaint",
        partial(inpaint_cases, side=128, width=SIDE, height=SIDE),
        judge_inpaint,
        {OBJECT_IN_MASK: 0.8, UNCHANGED: 1.0},
        "the same scenes drawn at 128 px, the model working at 64 px (width/height 64): "
        "the whole picture scaled down",
    ),
    Measure(
        "inpaint 128 px, at 64 px, only masked",
        "inpaint",
        partial(inpaint_cases, side=128, width=SIDE, height=SIDE, only_masked=True),
        judge_inpaint,
        {OBJECT_IN_MASK: 0.8, UNCHANGED: 1.0},
        "as above with only_masked: a crop around the mask scaled to 64 px",
    ),
    Measure(
        "inpaint 128 px, default size",
        "inpaint",
        partial(inpaint_cases, side=128),
        judge_inpaint,
        {OBJECT_IN_MASK: 0.8, UNCHANGED: 1.0},
        "the 128-px pictures at the size an edit defaults to: their aspect at the model's "
        "default area (64 px here)",
    ),
    Measure(
        "outpaint",
        "outpaint",
        outpaint_cases,
        judge_outpaint,
        {BORDER: 0.8, UNCHANGED: 1.0, WHOLE: None},
        "held-out scenes cropped by 8-16 px on one to four sides (half through the object), "
        "outpainted back to 64 px with their caption",
    ),
    Measure(
        "img2img 0.3, own caption",
        "img2img",
        partial(img2img_cases, strength=0.3, new_prompt=False),
        judge_kept,
        {KEPT: 0.8},
        "held-out pictures redrawn at strength 0.3 with their own caption",
    ),
    Measure(
        "img2img 0.9, new caption",
        "img2img",
        partial(img2img_cases, strength=0.9, new_prompt=True),
        judge_redrawn,
        {FOLLOWS: 0.8, KEPT: None},
        "the same pictures at strength 0.9 with another held-out combination's caption "
        "(other colour, shape and background)",
    ),
    Measure(
        "img2img 0.3, new caption",
        "img2img",
        partial(img2img_cases, strength=0.3, new_prompt=True),
        judge_redrawn,
        {KEPT: None, FOLLOWS: None},
        "the new captions at strength 0.3",
    ),
    Measure(
        "style",
        "style",
        style_cases,
        judge_styled,
        {STYLED: 0.7},
        "held-out content, a reference of another shape, colours and layout; the prompt names "
        "only the content's shape (\"a circle\"); the engine's strengths",
    ),
    Measure(
        "style, no content image",
        "style",
        partial(style_cases, with_content=False),
        judge_styled,
        {STYLED: None},
        "the same prompts and references without the content picture: a new picture of the "
        "named shape in the reference's colours (size and place not asked)",
    ),
    Measure(
        "style, wanted caption",
        "style",
        partial(style_cases, prompt="wanted"),
        judge_styled,
        {STYLED: None},
        "the same, the prompt captioning the wanted picture (colours included)",
    ),
    Measure(
        "style, content's caption",
        "style",
        partial(style_cases, prompt="content"),
        judge_styled,
        {STYLED: None},
        "the same, the prompt captioning the content as it is",
    ),
    Measure(
        "img2img, shape-only caption, no reference",
        "img2img",
        partial(style_cases, task="img2img"),
        judge_styled,
        {STYLED: None},
        "the style cases' content and prompt through img2img at the style strength, no "
        "reference: what the colour transfer adds",
    ),
)


# --- the evaluation -------------------------------------------------------------------------------


def evaluate_editing(
    model: str,
    *,
    measures: list[str] | None = None,
    per_combo: int = PER_COMBO,
    limit: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_end: float | None = None,
    seed: int = 0,
    device: str | None = None,
    out: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EditingReport:
    """Run the ``measures`` (names in `MEASURES`; default all) on ``model`` through the engine,
    judge each result, report. ``per_combo`` cases per held-out combination, at most ``limit``
    per measure; ``steps``/``guidance_scale``/``guidance_end`` default to the model's. With
    ``out``, writes report.json, report.md, grid.png (the first cases of each measure) and
    grid-<measure>.png (all its cases) there. ``on_progress(done, total)`` after each image.
    """
    from easel.engine.generate import Engine  # torch and diffusers load here
    from easel.models.loader import ModelManager

    started = time.perf_counter()
    # 1. the cases of each measure
    unknown = set(measures or ()) - {m.name for m in MEASURES}
    if unknown:
        raise InvalidParams(
            f"measures: unknown {', '.join(sorted(unknown))}; choose from "
            f"{', '.join(m.name for m in MEASURES)}",
            field="measures",
        )
    chosen = [m for m in MEASURES if measures is None or m.name in measures]
    cases = {m.name: m.cases(per_combo, seed)[:limit] for m in chosen}
    total = sum(map(len, cases.values()))
    # 2. the engine, as `easel generate` builds it, on a tiny-shapes style model
    settings = Settings() if device is None else Settings(device=device)
    catalog = ModelCatalog(settings)
    record = catalog.get(model)
    if record.family != "sd":
        raise InvalidParams(
            f"model must be a Stable Diffusion 1.x/2.x style model like tiny-shapes "
            f"(got a {record.family} model)",
            field="model",
        )
    engine = Engine(ModelManager(settings, catalog), settings)
    # 3. each case through the engine (case k with seed + k), judged as it comes
    judgements: list[EditJudgement] = []
    results: dict[str, list[Image.Image]] = {}
    resolved: GenerationParams | None = None
    for measure in chosen:
        results[measure.name] = []
        for k, case in enumerate(cases[measure.name]):
            params = GenerationParams(
                prompt=case.prompt,
                model=model,
                task=measure.task,
                seed=seed + k,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                guidance_end=guidance_end,
                image="image.png" if case.use_image else None,
                mask="mask.png" if case.mask is not None else None,
                style_image="style.png" if case.style_image is not None else None,
                **case.params,
            )
            inputs = InputImages(
                image=case.image if case.use_image else None,
                mask=case.mask,
                style_image=case.style_image,
            )
            generated = engine.generate(params, inputs=inputs)
            resolved = generated.params
            image = generated.images[0]
            checks, analysis = measure.judge(case, image, resolved.mask_blur or 0)
            judgements.append(
                EditJudgement(measure.name, case.prompt, seed + k, checks, describe(analysis))
            )
            results[measure.name].append(image)
            if on_progress is not None:
                on_progress(len(judgements), total)
    if resolved is None:
        raise InvalidParams("no cases to run (limit 0?)", field="limit")
    # 4. the scores
    report = EditingReport(
        model=record.id,
        steps=resolved.num_inference_steps or 0,
        guidance_scale=float(resolved.guidance_scale or 0.0),
        guidance_end=float(resolved.guidance_end or 1.0),
        seed=seed,
        device=f"{engine.models.device}, {str(engine.models.dtype).removeprefix('torch.')}",
        summaries={
            m.name: summarise(m, [j for j in judgements if j.measure == m.name]) for m in chosen
        },
        seconds=time.perf_counter() - started,
        judgements=judgements,
    )
    # 5. the report and the grids
    if out is not None:
        write_report(report, chosen, cases, results, Path(out))
    return report


def summarise(measure: Measure, judgements: list[EditJudgement]) -> MeasureSummary:
    count = len(judgements)
    rates = {
        name: sum(j.checks[name] for j in judgements) / count if count else float("nan")
        for name in measure.targets
    }
    return MeasureSummary(count, rates, dict(measure.targets), measure.description)


# --- output ---------------------------------------------------------------------------------------


def write_report(
    report: EditingReport,
    measures: list[Measure],
    cases: dict[str, list[EditCase]],
    results: dict[str, list[Image.Image]],
    out: Path,
) -> None:
    """report.json, report.md, grid.png (four cases of each measure) and grid-<measure>.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    (out / "report.md").write_text(format_markdown(report))
    strips: dict[str, list[Image.Image]] = {}
    for measure in measures:
        verdicts = [j for j in report.judgements if j.measure == measure.name]
        headline = next(iter(measure.targets))
        strips[measure.name] = [
            case_strip(case, image, j.checks[headline])
            for case, image, j in zip(
                cases[measure.name], results[measure.name], verdicts, strict=True
            )
        ]
        slug = measure.name.replace(",", "").replace("'", "").replace(" ", "-")
        image_grid(strips[measure.name], columns=4).save(out / f"grid-{slug}.png")
    labels = {}
    for measure in measures:
        headline = next(iter(measure.targets))
        rate = report.summaries[measure.name].rates[headline]
        labels[measure.name] = f"{measure.name}: {headline} {_pct(rate)}"
    overview = {name: tiles[:4] for name, tiles in strips.items()}
    labelled_rows(overview, labels).save(out / "grid.png")


def _pct(value: float) -> str:
    return "—" if value != value else f"{100 * value:.1f} %"  # nan -> dash


def format_markdown(report: EditingReport, *, list_wrong: bool = True) -> str:
    """One table of every measure's checks against their targets, then the failed cases."""
    lines = [
        f"# Editing evaluation of `{report.model}`",
        "",
        f"{report.steps} steps, guidance {report.guidance_scale:g} (ending after "
        f"{report.guidance_end:g} of the steps), seeds from {report.seed} (case k: seed + k), "
        f"{report.device}; {report.seconds:.0f} s.",
        "",
        "| measure | check | target | result | cases | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, summary in report.summaries.items():
        for check, target in summary.targets.items():
            rate = summary.rates[check]
            passed = round(rate * summary.cases) if rate == rate else 0
            wanted = "—" if target is None else f"{'' if target == 1 else '≥ '}{100 * target:.0f} %"
            met = "" if target is None else ("yes" if rate >= target - 1e-9 else "**no**")
            lines.append(
                f"| {name} | {check} | {wanted} | {_pct(rate)} ({passed}) | {summary.cases} "
                f"| {met} |"
            )
    lines += ["", "## Measures", ""]
    lines += [f"- **{name}**: {s.description}." for name, s in report.summaries.items()]
    if list_wrong:
        wrong = []
        for j in report.judgements:
            targets = report.summaries[j.measure].targets
            failed = [c for c, ok in j.checks.items() if not ok and targets[c] is not None]
            if failed:
                wrong.append(
                    f"- {j.measure}, seed {j.seed}: `{j.prompt}` — failed {', '.join(failed)}; "
                    f"saw: {j.seen}"
                )
        lines += ["", "## Failed checks (those with a target)", "", *(wrong or ["(none)"])]
    return "\n".join(lines) + "\n"


TILE = 128  # px per picture in the grids: 64-px pictures twice, 128-px ones as they are


def _tile(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST)


def input_view(case: EditCase) -> list[Image.Image]:
    """The inputs as a person would see them: the mask tinted magenta, an outpainting's new
    border as a grey checkerboard, a style reference beside its content."""
    if case.mask is not None:
        pixels = np.asarray(case.image.convert("RGB"), dtype=np.float32)
        inside = (np.asarray(case.mask) > 0)[..., None]
        tinted = np.where(inside, 0.55 * pixels + 0.45 * np.array([255, 0, 255]), pixels)
        return [_tile(Image.fromarray(tinted.round().astype(np.uint8)))]
    if "outpaint" in case.params:
        canvas, mask = grow_canvas(case.image, case.params["outpaint"])
        yy, xx = np.mgrid[: canvas.height, : canvas.width]
        checker = np.where(((yy // 4 + xx // 4) % 2)[..., None] == 0, 110, 170).astype(np.uint8)
        border = (np.asarray(mask) > 0)[..., None]
        shown = np.where(border, np.repeat(checker, 3, axis=2), np.asarray(canvas))
        return [_tile(Image.fromarray(shown.astype(np.uint8)))]
    # a style case without a content picture shows a blank where the content would be
    content = case.image if case.use_image else Image.new("RGB", case.image.size, (128,) * 3)
    views = [_tile(content)]
    if case.style_image is not None:
        views.append(_tile(case.style_image))
    return views


def case_strip(case: EditCase, result: Image.Image, ok: bool) -> Image.Image:
    """Inputs, then the result, framed green with a tick (passed the headline check) or red
    with a cross, in a strip of their own so that the mark hides no pixel."""
    tiles = [*input_view(case), _tile(result)]
    colour = (40, 160, 60) if ok else (210, 40, 40)
    strip = Image.new("RGB", (len(tiles) * (TILE + 4) + 4, TILE + 24), colour)
    for index, tile in enumerate(tiles):
        strip.paste(tile, (4 + index * (TILE + 4), 20))
    draw = ImageDraw.Draw(strip)
    x, y = strip.width - 20, 3
    if ok:
        draw.line([(x, y + 7), (x + 4, y + 12), (x + 12, y + 1)], fill="white", width=3)
    else:
        draw.line([(x + 1, y + 1), (x + 11, y + 11)], fill="white", width=3)
        draw.line([(x + 1, y + 11), (x + 11, y + 1)], fill="white", width=3)
    return strip


def labelled_rows(rows: dict[str, list[Image.Image]], labels: dict[str, str]) -> Image.Image:
    """One row of strips per measure under its label (strips of a row are the same size)."""
    gap, label_height = 6, 20
    widths = [sum(s.width + gap for s in strips) for strips in rows.values()]
    heights = [max((s.height for s in strips), default=0) for strips in rows.values()]
    sheet = Image.new(
        "RGB", (max(widths) + gap, sum(h + label_height for h in heights) + gap), "white"
    )
    draw = ImageDraw.Draw(sheet)
    y = gap
    for (name, strips), height in zip(rows.items(), heights, strict=True):
        draw.text((gap, y + 3), labels[name], fill="black", font=ImageFont.load_default(14))
        x, y = gap, y + label_height
        for strip in strips:
            sheet.paste(strip, (x, y))
            x += strip.width + gap
        y += height
    return sheet
