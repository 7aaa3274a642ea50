"""How close bench/compare.py's engines run to this CPU's arithmetic ceiling (issue 33).

    .venv/bin/python bench/cpu_roofline.py [SIZE ...] [--steps 4] [--calls FILE]

Three measurements, then a table:

1. The arithmetic of one image of compare.py's pipeline (its SD 1.5-class model, 4 steps of
   Euler with classifier-free guidance: 8 UNet forwards, one VAE decode, two text encodes),
   counted by torch's FlopCounterMode on a float32 pipeline call with diffusers' plain attention
   processor (so attention counts as the two batched matrix products it is). The count does
   not depend on the dtype or the engine: every engine in compare.py does this arithmetic.
2. The CPU's attainable rate: the best of bf16 and float32 matrix products through torch
   (oneDNN), square sizes 1024–4096, and a bf16 3×3 convolution of the UNet's first level
   (320 channels, 64×64, batch 2, channels_last); each the fastest of ``--repeats`` calls.
3. The seconds per image compare.py recorded (``--calls``, its ``calls.jsonl``; default: the
   newest record under ~/.cache/easel/bench): the fastest call per engine and size.

The table gives each engine's achieved rate (the image's FLOP over its seconds) and that as a
share of the best bf16 rate measured here, then the rate that issue 33's goals (0.8 × OpenVINO's
time, a quarter of diffusers' fp32 time) would take. An engine near that ceiling can only get
much faster by doing less arithmetic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import LABELS, bare, machine, model_folder  # noqa: E402


def pipeline_flops(folder: Path, size: int, steps: int) -> dict[str, float]:
    """FLOP of one image at ``size``, in all and per module (UNet, VAE, text encoder)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.vae.set_attn_processor(AttnProcessor())
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        bare(pipe, steps)(size)
    counts = counter.get_flop_counts()
    parts = {
        "unet": "UNet2DConditionModel",
        "vae": "Decoder",  # vae.decode calls the decoder, not AutoencoderKL.forward
        "text": "CLIPTextModel",
    }
    flops = {"total": float(counter.get_total_flops())}
    for part, module in parts.items():
        flops[part] = float(sum(counts.get(module, {}).values()))
    return flops


def best_seconds(fn: Any, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks and packs its kernel on the first call
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def attainable(repeats: int) -> dict[str, float]:
    """FLOP/s of this CPU's best matrix products and the UNet's first-level convolution."""
    import torch

    rates: dict[str, float] = {}
    with torch.inference_mode():
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            best = 0.0
            for n in (1024, 2048, 4096):
                a = torch.randn(n, n, dtype=dtype)
                b = torch.randn(n, n, dtype=dtype)
                best = max(best, 2 * n**3 / best_seconds(lambda a=a, b=b: a @ b, repeats))
            rates[f"matmul {name}"] = best
        conv = torch.nn.Conv2d(320, 320, 3, padding=1).to(
            torch.bfloat16, memory_format=torch.channels_last
        )
        x = torch.randn(2, 320, 64, 64, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        flop = 2 * 2 * 320 * 320 * 9 * 64 * 64
        rates["conv3x3 bf16"] = flop / best_seconds(lambda: conv(x), repeats)
    return rates


def newest_calls(cache: Path) -> Path | None:
    found = sorted(cache.glob("sd15-random-*-runs/*/calls.jsonl"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[256, 512], metavar="SIZE")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per product")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/easel/bench")
    parser.add_argument("--calls", type=Path, help="compare.py's calls.jsonl (default: newest)")
    args = parser.parse_args()

    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    print(f"machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    folder = model_folder(args.cache, tiny=False)
    calls_file = args.calls or newest_calls(args.cache)
    calls = []
    if calls_file is not None and calls_file.exists():
        calls = [json.loads(line) for line in calls_file.read_text().splitlines() if line]
        dates = sorted(c["at"] for c in calls)
        print(f"times: {calls_file} ({len(calls)} calls, {dates[0]} – {dates[-1]})")

    rates = attainable(args.repeats)
    print("\nattainable (best of the products measured here):\n")
    print("| product | GFLOP/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate / 1e9:.0f} |")
    ceiling = max(rate for name, rate in rates.items() if "bf16" in name)

    for size in args.sizes:
        flops = pipeline_flops(folder, size, args.steps)
        parts = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in flops.items() if k != "total")
        print(f"\n{size}²: {flops['total'] / 1e9:.0f} GFLOP per image ({parts})")
        print(f"  at the best bf16 rate above: {flops['total'] / ceiling:.2f} s per image\n")
        print("| engine | s/image | GFLOP/s | share of the best bf16 rate |\n|---|---|---|---|")
        fastest: dict[str, float] = {}
        for engine, label in LABELS.items():
            times = [c["seconds"] for c in calls if c["size"] == size and c["engine"] == engine]
            if times:
                fastest[engine] = min(times)
                rate = flops["total"] / fastest[engine]
                print(
                    f"| {label} | {fastest[engine]:.2f} | {rate / 1e9:.0f} | {rate / ceiling:.0%} |"
                )
        # issue 33's goals as the rate each would take (the same arithmetic, done faster)
        goals = {"0.8 × OpenVINO's time": ("openvino", 0.8), "diffusers fp32 / 4": ("fp32", 0.25)}
        for goal, (engine, factor) in goals.items():
            if engine in fastest:
                rate = flops["total"] / (fastest[engine] * factor)
                print(
                    f"| *goal: {goal}* | {fastest[engine] * factor:.2f} | {rate / 1e9:.0f} "
                    f"| {rate / ceiling:.0%} |"
                )


if __name__ == "__main__":
    main()
