"""Seconds per image of the bundled tiny-shapes model at its defaults, through the real Engine.

    .venv/bin/python bench/tiny_shapes_latency.py [--repeats 10] [--threads 2] [--steps N]

Interleaves, per repeat, one 64x64 image from each of five set-ups: Easel's defaults (the
model's steps, guidance, scheduler and guidance_end; on the CPU bf16 weights + channels_last
where the CPU computes bf16 natively, else fp32; the UNet replayed as traced graphs,
easel.models.cpu_graph); the same at 12 steps (tiny-shapes' default until 2026-11-27); the
defaults in float32 (the same as the defaults where the CPU lacks native bf16); the defaults
without the graphs; and plain diffusers at the model's first defaults (float32, no
graphs, 12 steps, guidance to the last step). `--steps N` sets every set-up's steps. Prints min
and median seconds per image for each. Target: <= 0.3 s per image on a 2-core build machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from easel.config import Settings
from easel.domain import GenerationParams
from easel.engine.generate import Engine
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager


def make_engine(home: Path, dtype: str, cpu_graphs: bool) -> Engine:
    settings = Settings(home=home, dtype=dtype, cpu_graphs=cpu_graphs, preview_every=0)
    return Engine(ModelManager(settings, ModelCatalog(settings)), settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as home:
        default = make_engine(Path(home), "auto", cpu_graphs=True)
        float32 = make_engine(Path(home), "float32", cpu_graphs=True)
        no_graphs = make_engine(Path(home), "auto", cpu_graphs=False)
        plain = make_engine(Path(home), "float32", cpu_graphs=False)
        # name -> (engine, steps, guidance_end); None: the model's (steps: or --steps)
        setups = {
            "easel default": (default, None, None),
            "easel default at 12 steps": (default, 12, None),
            "easel default in float32": (float32, None, None),
            "without CPU graphs": (no_graphs, None, None),
            "float32, without CPU graphs, 12 steps, guidance to the last step": (plain, 12, 1.0),
        }
        times: dict[str, list[float]] = {name: [] for name in setups}
        resolved = None
        for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
            for name, (engine, steps, guidance_end) in setups.items():
                params = GenerationParams(
                    prompt="a red circle and a blue square on a white background",
                    model="tiny-shapes",
                    num_inference_steps=args.steps or steps,
                    guidance_end=guidance_end,
                    seed=repeat,
                )
                start = time.perf_counter()
                result = engine.generate(params)
                if repeat:
                    times[name].append(time.perf_counter() - start)
                if name == "easel default":
                    resolved = result.params
        dtype = default.models.get_pipeline("tiny-shapes", "txt2img").dtype

    assert resolved is not None
    print(
        f"tiny-shapes, {resolved.width}x{resolved.height}, {resolved.num_inference_steps} steps, "
        f"guidance {resolved.guidance_scale} (model default: for {resolved.guidance_end:g} of "
        f"the steps), {resolved.scheduler}, {args.threads} threads, {args.repeats} repeats "
        f"(easel default dtype: {dtype})\n"
    )
    print("| settings | min s/image | median s/image |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {min(values):.3f} | {statistics.median(values):.3f} |")


if __name__ == "__main__":
    main()
