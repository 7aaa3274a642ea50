"""What previews cost: seconds per image with previews off and on, side by side in one run.

    .venv/bin/python bench/preview_cost.py [--repeats 3] [--sizes 256 512] [--steps 4]
        [--strip docs/img/previews-tiny-shapes.png] [--tiny]

Two models, each through ``Engine.generate`` with one shared ModelManager, so every condition
runs the same loaded pipeline:

  1. the bundled model (tiny-shapes, 64x64, its defaults: 8 steps, dpmpp_2m, guidance 2.5 for
     the first 5 steps). Its VAE has fitted linear factors and no tiny decoder.
  2. an SD1.5-architecture pipeline with random weights (bench/engine_overhead.py builds it: SD
     1.5's UNet and VAE configs) at each of ``--sizes``, ``--steps`` steps, dpmpp_2m, CFG 7.5.
     Its VAE is SD's, so previews are either the linear projection or, with a tiny decoder in
     the Hugging Face cache, TAESD: a random-weight ``AutoencoderTiny`` of TAESD's architecture
     (diffusers' defaults) is saved into a temporary cache as ``madebyollin/taesd`` for this.

Conditions: previews off (``preview_every=0``), on every step and every 2nd step, with the linear
projection (``preview_taesd=false``) and with TAESD; for the SD model also TAESD at full latent
resolution (``TAESD_MAX_LATENT`` lifted), the alternative the engine does not take. Each preview
is also encoded as the worker sends it (``jobs.worker.preview_data_url``: a 128-px JPEG), so
the cost is what a job pays. One warm-up image per condition, then ``--repeats`` rounds that run
every condition once each (interleaved). The table shows the minimum and median seconds per
image and the cost of previews two ways, in percent: the minimum's excess over "off" (end to
end, but noisy on a shared machine: a few percent is within the noise there), and the seconds
spent inside the preview path (``Previewer.__call__`` and the JPEG, clocked in each image) over
the image's seconds (median over the runs), which other processes' load barely moves.

``--strip PATH`` also saves a PNG of the bundled model's previews, step by step, for two prompts:
per prompt a row of what the old previews showed (the noisy latent x_t, linearly projected), a
row of the denoised estimate x0 that previews show now, each ending with the final image.
``--tiny`` swaps in a small UNet/VAE to check the script itself in seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderTiny
from PIL import Image

from easel.config import Settings
from easel.domain import GenerationParams, Progress
from easel.engine import preview
from easel.engine.generate import Engine
from easel.engine.preview import KNOWN_VAES, Previewer, latents_to_preview
from easel.engine.schedulers import make_scheduler
from easel.jobs.worker import preview_data_url
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_overhead import build_sd15_like  # noqa: E402  (a sibling script)

PROMPT = "a red circle and a blue square on a white background"
STRIP_PROMPTS = (PROMPT, "a big yellow star on a purple background")
SEED = 3

# condition name -> settings it changes (and whether TAESD runs at full latent resolution)
CONDITIONS: dict[str, dict[str, object]] = {
    "off": {"preview_every": 0},
    "linear, every step": {"preview_every": 1, "preview_taesd": False},
    "linear, every 2nd": {"preview_every": 2, "preview_taesd": False},
    "TAESD, every step": {"preview_every": 1},
    "TAESD, every 2nd": {"preview_every": 2},
    "TAESD full-res, every step": {"preview_every": 1, "full_res": True},
}


@dataclass
class Result:
    """One condition's runs: seconds per image, the seconds its previews took within each
    image (making them, then the worker's JPEG), previews per image."""

    seconds: list[float] = field(default_factory=list)
    preview_seconds: list[float] = field(default_factory=list)
    previews: int = 0


class PreviewClock:
    """Adds up the seconds spent making previews: wraps Previewer.__call__ (the engine's whole
    preview path: the estimate, the decode or projection, the resize) for this process."""

    def __init__(self) -> None:
        self.seconds = 0.0
        original = Previewer.__call__

        def timed_call(previewer: Previewer, *args: Any, **kwargs: Any) -> Image.Image:
            start = time.perf_counter()
            try:
                return original(previewer, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        Previewer.__call__ = timed_call  # type: ignore[method-assign]


def measure(
    models: ModelManager,
    params: GenerationParams,
    conditions: list[str],
    repeats: int,
    clock: PreviewClock,
) -> dict[str, Result]:
    """Each condition's images, timed in interleaved rounds after one warm-up each."""
    results = {name: Result() for name in conditions}
    runs: dict[str, Callable[[], None]] = {}
    for name in conditions:
        update = dict(CONDITIONS[name])
        full_res = bool(update.pop("full_res", False))
        engine = Engine(models, models.settings.model_copy(update=update))
        runs[name] = _run(engine, params, full_res, results[name], clock)
    for name, run in runs.items():  # warm-up: loads, traces, the tiny decoder's first use
        run()
        results[name].seconds.clear()
        results[name].preview_seconds.clear()
    for _ in range(repeats):
        for run in runs.values():
            run()
    return results


def _run(
    engine: Engine, params: GenerationParams, full_res: bool, result: Result, clock: PreviewClock
) -> Callable[[], None]:
    def on_progress(progress: Progress) -> None:
        if progress.preview is not None:
            start = time.perf_counter()
            preview_data_url(progress.preview)  # what the worker does with each preview
            clock.seconds += time.perf_counter() - start
            previews.append(1)

    previews: list[int] = []

    def run() -> None:
        previews.clear()
        limit = preview.TAESD_MAX_LATENT
        if full_res:
            preview.TAESD_MAX_LATENT = 1 << 16
        clock.seconds = 0.0
        start = time.perf_counter()
        try:
            engine.generate(params, on_progress=on_progress)
        finally:
            preview.TAESD_MAX_LATENT = limit
        result.seconds.append(time.perf_counter() - start)
        result.preview_seconds.append(clock.seconds)
        result.previews = len(previews)

    return run


def print_table(title: str, results: dict[str, Result]) -> None:
    base = min(results["off"].seconds)
    print(f"\n{title}\n")
    print(
        "| previews | per image | s/image min | s/image median | cost: min vs off "
        "| cost: preview time / image time (median) |"
    )
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        low, mid = min(result.seconds), statistics.median(result.seconds)
        if name == "off":
            cost = share = "—"
        else:
            cost = f"{(low / base - 1) * 100:+.1f} %"
            shares = [p / s for p, s in zip(result.preview_seconds, result.seconds, strict=True)]
            share = f"{statistics.median(shares) * 100:.1f} %"
        print(f"| {name} | {result.previews} | {low:.3f} | {mid:.3f} | {cost} | {share} |")
    for name, result in results.items():
        runs = ", ".join(
            f"{s:.3f} ({p * 1000:.0f} ms)"
            for s, p in zip(result.seconds, result.preview_seconds, strict=True)
        )
        print(f"  {name}: s/image (preview ms): {runs}")


def save_strip(models: ModelManager, path: Path) -> None:
    """Rows of x_t and x0 previews of the bundled model, step by step, then the final image."""
    pipe = models.get_pipeline("tiny-shapes").pipeline
    base = dict(pipe.scheduler.config)
    rows: list[list[Image.Image]] = []
    for prompt in STRIP_PROMPTS:
        pipe.scheduler = make_scheduler("dpmpp_2m", base)
        noisy, estimated, final = _both_previews(pipe, prompt)
        rows += [[*noisy, final], [*estimated, final]]
    tile, gap = 128, 4
    columns = len(rows[0])
    strip = Image.new("RGB", (columns * (tile + gap), len(rows) * (tile + gap) - gap), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            big = image.resize((tile, tile), Image.Resampling.NEAREST)
            # the final image stands apart from the previews
            strip.paste(
                big, (c * (tile + gap) + (gap if c == columns - 1 else 0), r * (tile + gap))
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path, optimize=True)
    print(f"saved {path}: rows x_t / x0 per prompt ({', '.join(STRIP_PROMPTS)}), 8 steps + final")


def _both_previews(
    pipe: Any, prompt: str
) -> tuple[list[Image.Image], list[Image.Image], Image.Image]:
    """Each step's x_t and x0 previews of one bundled-model image, and the image."""
    known = KNOWN_VAES["tiny-shapes"]
    factors, bias = torch.tensor(known.factors), torch.tensor(known.bias)
    previewer = Previewer(pipe, (64, 64))
    noisy: list[Image.Image] = []
    estimated: list[Image.Image] = []

    def step_end(pipe: Any, step: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        noisy.append(latents_to_preview(tensors["latents"], factors, (64, 64), bias=bias))
        estimated.append(previewer(pipe, tensors["latents"]))
        return {}

    final = pipe(
        prompt,
        num_inference_steps=8,
        guidance_scale=2.5,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(SEED),
        callback_on_step_end=step_end,
    ).images[0]
    return noisy, estimated, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=4, help="steps of the SD model")
    parser.add_argument("--strip", type=Path, help="save the bundled model's preview strip here")
    parser.add_argument("--tiny", action="store_true", help="small UNet/VAE: check the script")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # a tiny decoder of TAESD's architecture, in a cache of its own (random weights: the
        # cost is the architecture's)
        cache = Path(tmp) / "hf-cache"
        snapshot = cache / "models--madebyollin--taesd" / "snapshots" / ("0" * 40)
        torch.manual_seed(0)
        AutoencoderTiny().save_pretrained(snapshot)
        (cache / "models--madebyollin--taesd" / "refs").mkdir()
        (cache / "models--madebyollin--taesd" / "refs" / "main").write_text("0" * 40)
        os.environ["HF_HUB_CACHE"] = str(cache)

        settings = Settings(home=Path(tmp) / "home")
        models = ModelManager(settings, ModelCatalog(settings))
        clock = PreviewClock()
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, Easel dtype "
            f"{str(models.dtype).removeprefix('torch.')}; {args.repeats} interleaved rounds"
        )
        if args.strip:
            save_strip(models, args.strip)

        # 1. the bundled model: linear previews only (no tiny decoder for its VAE)
        bundled = GenerationParams(prompt=PROMPT, model="tiny-shapes", seed=SEED)
        linear = ["off", "linear, every step", "linear, every 2nd"]
        results = measure(models, bundled, linear, args.repeats * 3, clock)
        print_table("tiny-shapes (bundled), 64x64, 8 steps, dpmpp_2m", results)

        # 2. an SD1.5-architecture model at each size
        folder = build_sd15_like(Path(tmp) / "sd15-random", tiny=args.tiny)
        for size in args.sizes:
            params = GenerationParams(
                prompt=PROMPT,
                model=str(folder),
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                width=size,
                height=size,
                seed=SEED,
                scheduler="dpmpp_2m",
            )
            kind = "small UNet/VAE (--tiny)" if args.tiny else "SD1.5-architecture, random"
            results = measure(models, params, list(CONDITIONS), args.repeats, clock)
            print_table(f"{kind}, {size}x{size}, {args.steps} steps, dpmpp_2m, CFG 7.5", results)


if __name__ == "__main__":
    main()
