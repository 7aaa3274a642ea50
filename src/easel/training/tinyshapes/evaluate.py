"""Does a model draw what the prompt asks? Render prompts, judge the pixels, report the scores.

`evaluate` renders the held-out (colour, shape, background) combinations of `data.HELD_OUT` and a
set of seen scenes through the model's real pipeline, has the pixel-only analyser
(`analyser`) read each image, and compares what it saw with the prompt's scene:

    >>> report = evaluate("tiny-shapes", out=Path("eval"))  # doctest: +SKIP
    >>> report.generated.all_right["held-out single"]        # doctest: +SKIP
    0.94

The same judge reads real renders of the same scenes (`data.render`), so every report also shows
how far the analyser itself can be trusted, and a Fréchet distance between the analyser's feature
vectors of generated and real images (with the distance between two real sets as its floor).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from easel.config import Settings
from easel.domain import InvalidParams
from easel.engine.guidance import end_guidance_args
from easel.imaging import image_grid
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager
from easel.models.loras import LoraCatalog
from easel.models.params import check_guidance_end, defaults_for
from easel.training.tinyshapes.analyser import Analysis, DetectedObject, analyse
from easel.training.tinyshapes.data import (
    COLOURS,
    HELD_OUT,
    PAIR_POSITIONS,
    PAIR_SIZES,
    SHAPES,
    PromptError,
    Scene,
    ShapeObject,
    caption,
    is_held_out,
    parse_prompt,
    render,
    sample_scene,
    to_pil,
)

OBJECT_ATTRIBUTES = ("colour", "shape", "size", "position")
ATTRIBUTES = (*OBJECT_ATTRIBUTES, "background", "count")
GROUPS = ("held-out single", "held-out two", "seen single", "seen two")
# Size/position variants of each held-out combination; the first is the canonical prompt.
HELD_OUT_VARIANTS = (
    ("medium", "centre"),
    ("big", "centre"),
    ("small", "left"),
    ("medium", "right"),
    ("big", "top"),
    ("small", "bottom"),
    ("big", "left"),
    ("small", "centre"),
    ("medium", "top"),
    ("big", "bottom"),
    ("small", "right"),
    ("medium", "left"),
)
VARIANTS_PER_COMBO = 4
PAIRS_PER_COMBO = 2
SEEN_SINGLE = 48
SEEN_TWO = 32


@dataclass(frozen=True)
class Judgement:
    """One image against its prompt: each check's verdict, one per expected object for object
    attributes (in the prompt's order), one per image for background and object count."""

    prompt: str
    group: str
    shapes: list[str]  # the prompt's shapes, in its order
    checks: dict[str, list[bool]]
    all_right: bool
    seen: str  # what the analyser saw, in words


@dataclass(frozen=True)
class Summary:
    """Scores over a set of judgements; fractions in 0..1."""

    images: dict[str, int]  # group -> number of images
    all_right: dict[str, float]  # group (and "all") -> images with every attribute right
    attributes: dict[str, dict[str, float]]  # "held-out" | "seen" | "all" -> attribute -> accuracy
    shapes: dict[
        str, dict[str, float]
    ]  # shape -> objects, shape right, all object attributes right


@dataclass
class EvalReport:
    """What `evaluate` measured. `generated`: the model's images. `real`: the analyser on true
    renders of the same scenes (its own accuracy). `decoded`: those renders encoded and decoded by
    the model's VAE, the best the model can do if its denoiser were perfect."""

    model: str
    steps: int
    guidance_scale: float
    guidance_end: float
    seed: int
    size: int
    generated: Summary
    real: Summary
    decoded: Summary
    frechet_distance: float  # generated vs real, on the analyser's feature vectors
    frechet_floor: float  # real vs real (another jitter draw): the distance of a perfect model
    seconds: float
    judgements: list[Judgement] = field(default_factory=list)


# --- the prompt set -------------------------------------------------------------------------------


def default_scenes(seed: int = 0) -> list[tuple[str, Scene]]:
    """(group, scene) pairs: every held-out combination alone in a few sizes and places and beside
    a seen object, then random seen scenes of one and two objects. Deterministic for a seed."""
    rng = random.Random(seed)
    scenes: list[tuple[str, Scene]] = []
    for index, (colour, shape, background) in enumerate(HELD_OUT):
        variants = [HELD_OUT_VARIANTS[0]] + [
            HELD_OUT_VARIANTS[1 + (index * (VARIANTS_PER_COMBO - 1) + k) % 11]
            for k in range(VARIANTS_PER_COMBO - 1)
        ]
        for size, position in variants:
            scenes.append(
                (
                    "held-out single",
                    Scene((ShapeObject(shape, colour, size, position),), background),
                )
            )
    for colour, shape, background in HELD_OUT:
        for _ in range(PAIRS_PER_COMBO):
            scenes.append(("held-out two", _pair_with(ShapeObject(shape, colour), background, rng)))
    for _ in range(SEEN_SINGLE):
        scenes.append(("seen single", sample_scene(rng, two_object_rate=0.0)))
    for _ in range(SEEN_TWO):
        scenes.append(("seen two", sample_scene(rng, two_object_rate=1.0)))
    return scenes


def _pair_with(held: ShapeObject, background: str, rng: random.Random) -> Scene:
    """A two-object scene: ``held`` beside a random seen object, in either order."""
    while True:
        other = ShapeObject(
            rng.choice(SHAPES),
            rng.choice([c for c in COLOURS if c not in (background, held.colour)]),
        )
        if (other.colour, other.shape, background) not in HELD_OUT:
            break
    pair = [held, other]
    rng.shuffle(pair)
    positions = rng.choice(PAIR_POSITIONS)
    objects = tuple(
        ShapeObject(o.shape, o.colour, rng.choice(PAIR_SIZES), position)
        for o, position in zip(pair, positions, strict=True)
    )
    return Scene(objects, background)


def _group_of(scene: Scene) -> str:
    return ("held-out" if is_held_out(scene) else "seen") + (
        " single" if len(scene.objects) == 1 else " two"
    )


# --- judging --------------------------------------------------------------------------------------


def judge(prompt: str, scene: Scene, analysis: Analysis, group: str | None = None) -> Judgement:
    """Compare what the analyser saw with the scene the prompt asks for.

    Expected objects are matched to found ones in the way that gets the most attributes right;
    an expected object with no match gets every object attribute wrong, and any missing or extra
    object fails the ``count`` check (so the image is not "all right").
    """
    found = analysis.objects
    options: list[DetectedObject | None] = [*found, *([None] * len(scene.objects))]
    best: list[list[bool]] = []
    for chosen in itertools.permutations(options, len(scene.objects)):
        verdicts = [_object_checks(e, d) for e, d in zip(scene.objects, chosen, strict=True)]
        if not best or sum(map(sum, verdicts)) > sum(map(sum, best)):
            best = verdicts
    checks = {attr: [v[i] for v in best] for i, attr in enumerate(OBJECT_ATTRIBUTES)}
    checks["background"] = [analysis.background == scene.background]
    checks["count"] = [len(found) == len(scene.objects)]
    return Judgement(
        prompt=prompt,
        group=group or _group_of(scene),
        shapes=[o.shape for o in scene.objects],
        checks=checks,
        all_right=all(all(v) for v in checks.values()),
        seen=describe(analysis),
    )


def _object_checks(expected: ShapeObject, found: DetectedObject | None) -> list[bool]:
    if found is None:
        return [False] * len(OBJECT_ATTRIBUTES)
    return [getattr(expected, a) == getattr(found, a) for a in OBJECT_ATTRIBUTES]


def describe(analysis: Analysis) -> str:
    """The analysis in prompt-like words, e.g. "big red circle centre; white background"."""
    objects = [f"{o.size} {o.colour} {o.shape} {o.position}" for o in analysis.objects]
    return "; ".join([*objects, f"{analysis.background} background"])


def summarise(judgements: list[Judgement]) -> Summary:
    """Accuracies per group, per attribute and per shape."""

    def rate(values: list[bool]) -> float:
        return sum(values) / len(values) if values else float("nan")

    images = {g: sum(j.group == g for j in judgements) for g in GROUPS}
    all_right = {g: rate([j.all_right for j in judgements if j.group == g]) for g in GROUPS}
    all_right["all"] = rate([j.all_right for j in judgements])
    attributes = {}
    for kind in ("held-out", "seen", "all"):
        chosen = [j for j in judgements if kind == "all" or j.group.startswith(kind)]
        attributes[kind] = {a: rate([v for j in chosen for v in j.checks[a]]) for a in ATTRIBUTES}
    shapes = {}
    for shape in SHAPES:
        verdicts = [
            [j.checks[a][i] for a in OBJECT_ATTRIBUTES]
            for j in judgements
            for i, s in enumerate(j.shapes)
            if s == shape
        ]
        shapes[shape] = {
            "objects": len(verdicts),
            "shape": rate([v[1] for v in verdicts]),
            "all": rate([all(v) for v in verdicts]),
        }
    return Summary(images=images, all_right=all_right, attributes=attributes, shapes=shapes)


# --- distribution distance ------------------------------------------------------------------------


def features(analysis: Analysis, size: int) -> np.ndarray:
    """A fixed-length vector per image: background colour, object count, and for the first two
    objects their colour, centre, radius and fit to every shape template (zeros when absent)."""
    vector = [*analysis.background_rgb, len(analysis.objects) / 2]
    for slot in range(2):
        if slot < len(analysis.objects):
            o = analysis.objects[slot]
            vector += [*o.rgb, o.centre[0] / size, o.centre[1] / size, o.radius / size]
            vector += [o.iou[s] for s in SHAPES]
        else:
            vector += [0.0] * (6 + len(SHAPES))
    return np.array(vector, dtype=np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (as in FID):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")  # no covariance from a single image
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^1/2) = tr((S_a^1/2 S_b S_a^1/2)^1/2), whose argument is symmetric PSD
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    cross = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


# --- the evaluation -------------------------------------------------------------------------------


def evaluate(
    model: str,
    *,
    prompts: list[str] | None = None,
    limit: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_end: float | None = None,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 16,
    out: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    loras: list[tuple[str, float]] | None = None,
) -> EvalReport:
    """Render prompts through ``model`` (catalog id or diffusers folder), judge them, report.

    ``prompts`` are canonical captions (default: `default_scenes`); ``limit`` keeps the first N
    of each group. ``steps``/``guidance_scale``/``guidance_end`` default to the model's (a
    trained folder's are in its easel.json). Image i uses seed ``seed + i``. With ``out``,
    writes report.json, report.md and grid.png there. ``loras`` ((name, weight) pairs from
    EASEL_HOME/loras) are applied to the model first.
    ``on_progress(done, total)`` is called after each batch.
    """
    started = time.perf_counter()
    # 1. the prompts and the scenes they ask for
    if prompts is None:
        chosen = default_scenes(seed)
        pairs = [(g, caption(s), s) for g, s in chosen]
    else:
        try:
            pairs = [(_group_of(s), p, s) for p in prompts for s in [parse_prompt(p)]]
        except PromptError as exc:
            raise InvalidParams(f"prompts: {exc}", field="prompts") from exc
    if limit is not None:
        pairs = [p for g in GROUPS for p in [q for q in pairs if q[0] == g][:limit]]
    if not pairs:
        raise InvalidParams("prompts must hold at least one prompt", field="prompts")
    # 2. the model, with its defaults
    settings = Settings() if device is None else Settings(device=device)
    manager = ModelManager(settings, ModelCatalog(settings))
    loaded = manager.get_pipeline(model, "txt2img")
    if loras:
        catalog = LoraCatalog(settings)
        manager.use_loras(loaded.record, [(catalog.get(name), w) for name, w in loras])
    if loaded.family.name != "sd":
        raise InvalidParams(
            f"model must be a Stable Diffusion 1.x/2.x style model like tiny-shapes "
            f"(got a {loaded.family.name} model)",
            field="model",
        )
    # the model's own defaults (a trained folder carries its recipe's in easel.json)
    defaults = defaults_for(loaded.record, loaded.family)
    steps = steps or defaults["num_inference_steps"]
    guidance = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    guidance_end = defaults["guidance_end"] if guidance_end is None else guidance_end
    check_guidance_end(guidance_end, loaded.family)
    # the model's native size (the scenes scale with it)
    pipe = loaded.pipeline
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    # 3. generate, in batches, one seed per image so results do not depend on the batch size
    images: list[Image.Image] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        generators = [
            torch.Generator(loaded.device).manual_seed(seed + start + i) for i in range(len(batch))
        ]
        result = pipe(
            prompt=[p for _, p, _ in batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=generators,
            **end_guidance_args(guidance_end),  # as the engine does: scores of what users get
        )
        images += result.images
        if on_progress is not None:
            on_progress(len(images), len(pairs))
    # 4. real renders of the same scenes (two jitter draws: the reference and the floor)
    scenes = [s for _, _, s in pairs]
    real = _real_images(scenes, size, seed)
    real_again = _real_images(scenes, size, seed + 1)
    decoded = _round_trip(pipe, real, batch_size)
    # 5. judge everything with the pixel analyser
    analyses = [analyse(image) for image in images]
    real_analyses = [analyse(image) for image in real]

    def judged(analysed: list[Analysis]) -> list[Judgement]:
        return [judge(p, s, a, g) for (g, p, s), a in zip(pairs, analysed, strict=True)]

    judgements = judged(analyses)
    gen_features = np.stack([features(a, size) for a in analyses])
    real_features = np.stack([features(a, size) for a in real_analyses])
    again_features = np.stack([features(analyse(image), size) for image in real_again])
    report = EvalReport(
        model=loaded.record.id,
        steps=steps,
        guidance_scale=guidance,
        guidance_end=guidance_end,
        seed=seed,
        size=size,
        generated=summarise(judgements),
        real=summarise(judged(real_analyses)),
        decoded=summarise(judged([analyse(image) for image in decoded])),
        frechet_distance=frechet_distance(gen_features, real_features),
        frechet_floor=frechet_distance(again_features, real_features),
        seconds=time.perf_counter() - started,
        judgements=judgements,
    )
    # 6. write the report and the sample grid
    if out is not None:
        write_report(report, images, Path(out))
    return report


def _real_images(scenes: list[Scene], size: int, seed: int) -> list[Image.Image]:
    # the training data's jitter, so "real" means what the model was trained to draw
    generator = torch.Generator().manual_seed(seed)
    return to_pil(render(scenes, size=size, jitter=1.0, generator=generator))


@torch.no_grad()
def _round_trip(
    pipe: StableDiffusionPipeline, images: list[Image.Image], batch_size: int
) -> list[Image.Image]:
    """``images`` encoded and decoded by the pipeline's VAE (latent mean, no sampling)."""
    decoded: list[Image.Image] = []
    for start in range(0, len(images), batch_size):
        batch = pipe.image_processor.preprocess(images[start : start + batch_size])
        batch = batch.to(pipe.device, pipe.vae.dtype)
        latents = pipe.vae.encode(batch).latent_dist.mode()
        decoded += pipe.image_processor.postprocess(pipe.vae.decode(latents).sample)
    return decoded


# --- output ---------------------------------------------------------------------------------------


def write_report(report: EvalReport, images: list[Image.Image], out: Path) -> None:
    """report.json (everything, per image too), report.md (tables) and grid.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    (out / "report.md").write_text(format_markdown(report))
    marked_grid(images, [j.all_right for j in report.judgements]).save(out / "grid.png")


def _pct(value: float) -> str:
    return "—" if value != value else f"{100 * value:.1f}%"  # nan -> dash


def format_markdown(report: EvalReport, *, list_wrong: bool = True) -> str:
    """The report as Markdown tables (generated vs the analyser on real renders), then the
    prompts whose image was not all right (unless ``list_wrong`` is false)."""
    gen, real, dec = report.generated, report.real, report.decoded
    lines = [
        f"# Evaluation of `{report.model}`",
        "",
        f"{sum(gen.images.values())} prompts, {report.steps} steps, guidance "
        f"{report.guidance_scale} (ending after {report.guidance_end:g} of the steps), "
        f"{report.size}x{report.size}, seeds from {report.seed}; "
        f"{report.seconds:.0f} s.",
        "",
        "## All attributes right",
        "",
        "Columns: the model's images; true renders of the same scenes (the analyser's own "
        "accuracy); those renders through the model's VAE (the ceiling a perfect denoiser "
        "would reach).",
        "",
        "| prompts | images | generated | real renders | real through VAE |",
        "|---|---|---|---|---|",
    ]
    for group in [*GROUPS, "all"]:
        count = sum(gen.images.values()) if group == "all" else gen.images[group]
        lines.append(
            f"| {group} | {count} | {_pct(gen.all_right[group])} "
            f"| {_pct(real.all_right[group])} | {_pct(dec.all_right[group])} |"
        )
    lines += ["", "## Per attribute", ""]
    lines.append("| attribute | held-out | seen | real renders | real through VAE |")
    lines.append("|---|---|---|---|---|")
    for attr in ATTRIBUTES:
        lines.append(
            f"| {attr} | {_pct(gen.attributes['held-out'][attr])} "
            f"| {_pct(gen.attributes['seen'][attr])} | {_pct(real.attributes['all'][attr])} "
            f"| {_pct(dec.attributes['all'][attr])} |"
        )
    lines += ["", "## Per shape (all prompts)", "", "| shape | objects | shape right | all right |"]
    lines.append("|---|---|---|---|")
    for shape, row in gen.shapes.items():
        lines.append(f"| {shape} | {row['objects']} | {_pct(row['shape'])} | {_pct(row['all'])} |")
    lines += [
        "",
        f"Fréchet distance on the analyser's features, generated vs real: "
        f"{report.frechet_distance:.4f} (real vs real: {report.frechet_floor:.4f}).",
    ]
    if list_wrong:
        wrong = [j for j in report.judgements if not j.all_right]
        lines += ["", "## Wrong images", ""]
        lines += [f"- `{j.prompt}` — saw: {j.seen}" for j in wrong] or ["(none)"]
    return "\n".join(lines) + "\n"


def marked_grid(images: list[Image.Image], right: list[bool], columns: int = 8) -> Image.Image:
    """Images scaled 2x, each framed green with a tick above it when all right, red with a cross
    if not (the mark sits in a strip of its own, so it hides no pixel)."""
    tiles = []
    for image, ok in zip(images, right, strict=True):
        scaled = image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST)
        colour = (40, 160, 60) if ok else (210, 40, 40)
        tile = Image.new("RGB", (scaled.width + 8, scaled.height + 24), colour)
        tile.paste(scaled, (4, 20))
        draw = ImageDraw.Draw(tile)
        x, y = tile.width // 2 - 6, 3
        if ok:
            draw.line([(x, y + 7), (x + 4, y + 12), (x + 12, y + 1)], fill="white", width=3)
        else:
            draw.line([(x + 1, y + 1), (x + 11, y + 11)], fill="white", width=3)
            draw.line([(x + 1, y + 11), (x + 11, y + 1)], fill="white", width=3)
        tiles.append(tile)
    return image_grid(tiles, columns=min(columns, len(tiles)))
