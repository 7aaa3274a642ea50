"""Resident memory of a worker that switches between two models again and again.

    .venv/bin/python bench/model_switch_memory.py [--switches 50] [--width 160] [--tiny]

AUTOMATIC1111 users report gigabytes leaked per model switch. This builds two SD-architecture
pipelines with random weights (the UNet at ``--width`` base channels: 320 is SD 1.5's, 160 a
quarter of its parameters), saves them as diffusers folders, and gives the real ModelManager a
memory budget that holds only one, so every switch evicts one model and loads the other from disk,
as a worker with little memory does. Each switch also makes one 1-step 64 px image. It prints the
resident set size (VmRSS) after each switch and checks the goal of issue 34: the process stays
within the baseline (a worker that has run once and holds no model) plus 1.2x the larger model's
size.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

from easel.config import Settings
from easel.domain import GenerationParams
from easel.engine.generate import Engine
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_overhead import build_sd15_like  # noqa: E402 - its text encoder and tokenizer

MIB = 1024**2


def rss_bytes(kind: str = "VmRSS") -> int:
    """Resident bytes of this process: all (VmRSS), or anonymous memory only (RssAnon: not
    the pages of mapped files, which the kernel can drop)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {kind} in /proc/self/status")


def build(path: Path, width: int, seed: int) -> Path:
    """An SD-architecture pipeline with random weights: SD 1.5's UNet layout at ``width`` base
    channels, a small VAE, the text encoder and tokenizer of bench/engine_overhead.py."""
    build_sd15_like(path, tiny=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        attention_head_dim=8,
    )
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.unet = unet
    pipe.vae = AutoencoderKL(
        block_out_channels=(64, 128),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    pipe.save_pretrained(path)
    return path


def generate(engine: Engine, model: str, seed: int) -> None:
    params = GenerationParams(prompt="a red circle", model=model, num_inference_steps=1, seed=seed)
    engine.generate(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=50)
    parser.add_argument("--width", type=int, default=160, help="UNet base channels (SD 1.5: 320)")
    parser.add_argument("--tiny", action="store_true", help="width 32 and 6 switches: a check")
    args = parser.parse_args()
    width, switches = (32, 6) if args.tiny else (args.width, args.switches)

    with tempfile.TemporaryDirectory() as tmp:
        # built in a child process, so that this one holds no model before the baseline
        folders = [Path(tmp) / f"model-{i}" for i in range(2)]
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.starmap(build, [(folder, width, i) for i, folder in enumerate(folders)])
        settings = Settings(home=Path(tmp) / "home", preview_every=0, cpu_graphs=False)
        catalog = ModelCatalog(settings)
        for i, folder in enumerate(folders):
            catalog.add(f"m{i}", str(folder), defaults={"width": 64, "height": 64})
        # a budget that holds one model but not two (sizes from the weight files' headers)
        estimate = ModelManager(settings, catalog).estimate_bytes(catalog.get("m0"))
        settings = settings.model_copy(update={"model_cache_gb": 1.5 * estimate / 1024**3})
        engine = Engine(ModelManager(settings, catalog), settings)
        # the baseline: a worker that has run once (torch's thread pools, kernels and
        # allocator arenas exist) and holds no model
        generate(engine, "m0", 0)
        size = engine.models.memory_bytes()  # the larger: both have the same layout
        first = rss_bytes()
        engine.models.unload("m0")
        gc.collect()
        baseline = rss_bytes()
        bound = baseline + 1.2 * size
        print(f"RSS with the first model loaded and run: {first / MIB:.0f} MiB")
        print(f"model size {size / MIB:.0f} MiB; baseline RSS {baseline / MIB:.0f} MiB;")
        print(f"bound (baseline + 1.2 x model) {bound / MIB:.0f} MiB\n")
        print("| switch | model | seconds | RSS MiB | over baseline MiB | of it file-backed MiB |")
        print("|---|---|---|---|---|---|")
        peak = 0
        for switch in range(1, switches + 1):
            model = f"m{switch % 2}"
            started = time.perf_counter()
            generate(engine, model, switch)
            rss = rss_bytes()
            peak = max(peak, rss)
            if switch <= 4 or switch % 10 == 0 or switch == switches:
                print(
                    f"| {switch} | {model} | {time.perf_counter() - started:.2f} | "
                    f"{rss / MIB:.0f} | {(rss - baseline) / MIB:.0f} | "
                    f"{rss_bytes('RssFile') / MIB:.0f} |"
                )
            assert engine.models.loaded() == [model], engine.models.loaded()  # one at a time
        verdict = "within" if peak <= bound else "OVER"
        print(
            f"\npeak RSS after a switch {peak / MIB:.0f} MiB = baseline + "
            f"{(peak - baseline) / size:.2f} x model: {verdict} the bound (1.2 x)"
        )


if __name__ == "__main__":
    main()
