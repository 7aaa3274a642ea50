"""CPU levers for the SD1.5-architecture pipeline, each measured (issue 33, item 1).

    .venv/bin/python bench/cpu_levers.py [--size 256] [--levers eager compile ...] [--repeats 3]

Loads bench/compare.py's SD1.5-architecture folder (random weights, built there on first use) as
Easel runs it on a CPU with native bf16 (bf16 weights, UNet and VAE in channels_last), and for
each lever times, after its warm-up: one image (4 steps Euler, CFG 7.5: text encoder, 4 UNet
calls at batch 2, VAE decode), and separately the text encoder, one UNet call and the VAE decode,
in CPU-seconds of this process (best of ``--repeats``; run it with OMP_NUM_THREADS=1 on a shared
machine: one thread's CPU time is the work, little changed by others' load), the whole image also
in wall-clock seconds.
It prints the warm-up (compile) time and the PSNR of the lever's image against the eager one.

Levers (``--levers``):
  eager            the current path (the reference)
  fp32             fp32 weights, contiguous (diffusers' default)
  compile          torch.compile(unet), inductor, freezing on (weights folded as constants)
  compile-nofreeze torch.compile(unet) without freezing
  compile-autotune torch.compile(unet, mode="max-autotune") with freezing (C++ GEMM templates)
  compile-vae      compile (freezing) of the UNet and of the VAE decoder
  sdpa-math        eager, but attention through the math backend instead of the flash kernel

Before each timed call the script waits until the CPUs are ``--idle`` idle (shared machine).
Set TORCHINDUCTOR_CACHE_DIR to a fixed folder and run a compile lever twice to see what the
persistent caches (FX graph cache, AOTAutograd cache) save on a second start.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import GUIDANCE, PROMPT, SEED, model_folder, wait_for_idle  # noqa: E402

LEVERS = [
    "eager",
    "fp32",
    "compile",
    "compile-nofreeze",
    "compile-autotune",
    "compile-vae",
    "sdpa-math",
]


def load(folder: Path, dtype: torch.dtype) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if dtype == torch.bfloat16:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def psnr(a: Any, b: Any) -> float:
    x, y = (np.asarray(i, dtype=np.float64) for i in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


IDLE = (0.9, 300.0)  # before each timed call: wait for CPUs this idle, at most this long


def best(fn: Callable[[], Any], repeats: int) -> float:
    """The fewest CPU-seconds of ``repeats`` calls (this process's; with one thread, the work
    itself, little changed by other processes' load); the wall-clock minimum goes to WALL."""
    times, cpu = [], []
    for _ in range(repeats):
        wait_for_idle(*IDLE)
        begin, cpu_begin = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - begin)
        cpu.append(time.process_time() - cpu_begin)
    WALL.append(min(times))
    return min(cpu)


WALL: list[float] = []


def measure(lever: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One lever: the first image (warm-up, compile), then the best of ``args.repeats``."""
    import torch._inductor.config as inductor_config

    size = args.size
    dtype = torch.float32 if lever == "fp32" else torch.bfloat16
    pipe = load(folder, dtype)
    inductor_config.freezing = lever in ("compile", "compile-autotune", "compile-vae")
    if lever.startswith("compile"):
        mode = "max-autotune" if lever == "compile-autotune" else None
        pipe.unet = torch.compile(pipe.unet, mode=mode)
        if lever == "compile-vae":
            pipe.vae.decoder = torch.compile(pipe.vae.decoder)

    def image() -> Any:
        return pipe(
            PROMPT,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images[0]

    kernels = contextlib.nullcontext()
    if lever == "sdpa-math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = sdpa_kernel([SDPBackend.MATH])
    with kernels, torch.no_grad():
        wait_for_idle(*IDLE)
        begin = time.perf_counter()
        first = image()
        warmup = time.perf_counter() - begin
        seconds = best(image, args.repeats)
        wall = WALL[-1]
        # the parts, on inputs shaped as the pipeline's
        embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
        context = torch.cat([negative, embeds])
        latents = torch.randn(2, 4, size // 8, size // 8, dtype=dtype)
        if dtype == torch.bfloat16:
            latents = latents.to(memory_format=torch.channels_last)
        timestep = torch.tensor(500.0)
        text = best(lambda: pipe.encode_prompt(PROMPT, "cpu", 1, True), args.repeats)
        unet = best(lambda: pipe.unet(latents, timestep, context), args.repeats)
        vae = best(lambda: pipe.vae.decode(latents[:1]), args.repeats)
    return {
        "lever": lever,
        "image": first,
        "warmup": warmup,
        "seconds": seconds,
        "wall": wall,
        "text": text,
        "unet": unet,
        "vae": vae,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--levers", nargs="+", default=["eager", "compile"], choices=LEVERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/easel/bench")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--idle", type=float, default=0.9, help="wait for CPUs this idle before each timed call"
    )
    args = parser.parse_args()
    global IDLE
    IDLE = (args.idle, 300.0)

    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    folder = model_folder(args.cache, args.tiny)
    size = args.size
    print(
        f"{folder.name}, {size}x{size}, {args.steps} steps, CFG {GUIDANCE}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; TORCHINDUCTOR_CACHE_DIR="
        f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR', '(default)')}; load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    reference = None
    rows = []
    for lever in args.levers:
        torch._dynamo.reset()
        gc.collect()
        row = measure(lever, folder, args)
        first = row.pop("image")
        if reference is None:
            reference = first
        row["psnr"] = psnr(first, reference)
        rows.append(row)
        print(
            f"{lever}: first image {row['warmup']:.1f} s, image {row['seconds']:.2f} CPU-s "
            f"({row['wall']:.2f} s wall) (text "
            f"{row['text']:.3f}, UNet call {row['unet']:.3f} x {args.steps}, VAE decode "
            f"{row['vae']:.3f}); PSNR vs {args.levers[0]} {row['psnr']:.1f} dB; load "
            f"{os.getloadavg()[0]:.1f}",
            flush=True,
        )
    print()
    print(
        "| lever | first image (compile), wall s | CPU-s/image (wall s) | text | UNet call "
        "(batch 2) | VAE decode | VAE share | PSNR vs first lever |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['lever']} | {row['warmup']:.1f} | {row['seconds']:.2f} ({row['wall']:.2f}) "
            f"| {row['text']:.3f} "
            f"| {row['unet']:.3f} | {row['vae']:.3f} | {row['vae'] / row['seconds']:.0%} | "
            f"{row['psnr']:.1f} dB |"
        )


if __name__ == "__main__":
    main()
