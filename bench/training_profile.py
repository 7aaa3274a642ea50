"""Where one stage of `easel train base` spends a step: torch.profiler over the real training loop.

    .venv/bin/python bench/training_profile.py [--preset gpu] [--stage unet] [--steps 20]
        [--warmup 10] [--no-bf16] [--out DIR]

Runs `train_base` in a temporary folder with the other stages cut short, records `--steps`
optimisation steps of `--stage` after `--warmup` unrecorded ones, then cancels the run. Prints
the wall time per recorded step, how busy the device was (the kernels' own time over the wall
time: far below 100 % means the host cannot feed it), the operators with the most host time and,
on a GPU, the kernels with the most device time; writes a Chrome trace (DIR/trace.json, open it
in chrome://tracing or Perfetto). Made for the 2026-11-27 finding that the UNet stage ran at
2,906 images/s alone on an H200, under half the first GPU run's 6,600 (docs/TRAINING-LOG.md): one short
device call with this script says where the step goes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from easel.domain import Canceled
from easel.training.loop import TrainStep
from easel.training.tinyshapes.config import preset
from easel.training.tinyshapes.recipe import train_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stage", choices=["vae", "unet"], default="unet")
    parser.add_argument("--steps", type=int, default=20, help="steps recorded")
    parser.add_argument("--warmup", type=int, default=10, help="steps run first, not recorded")
    parser.add_argument("--out", type=Path, default=Path("profile"), help="folder for the trace")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step_ends: list[float] = []  # when each step of the stage ended
    # The profiler's first "step" is everything before the stage's first step ends (not traced);
    # then `warmup` steps traced and dropped, then `steps` recorded.
    profiler = profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=args.warmup, active=args.steps, repeat=1),
    )

    def on_step(step: TrainStep) -> None:
        if step.stage == args.stage:
            profiler.step()
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as folder:
        # A generous budget that cancelling ends; the autoencoder gets a minute when the UNet
        # stage is the one profiled (its latents need not be good, only the right shape).
        config = preset(
            args.preset,
            out_dir=folder,
            max_minutes=30.0,
            vae_share=0.5 if args.stage == "vae" else 1 / 30,
            decoder_share=0.0,
            **({"bf16": False} if args.no_bf16 else {}),  # else the preset's, as `easel train base`
        )
        with profiler:
            try:
                train_base(
                    config,
                    on_step=on_step,
                    is_canceled=lambda: len(step_ends) > args.warmup + args.steps,
                )
            except Canceled:
                pass

    recorded = step_ends[args.warmup : args.warmup + args.steps + 1]
    wall = (recorded[-1] - recorded[0]) / args.steps
    events = profiler.key_averages()
    precision = "float32" if args.no_bf16 else "the preset's precision"
    print(
        f"{args.preset} preset ({precision}), {args.stage} stage: {wall * 1000:.1f} ms per step (wall)"
    )
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        device_us = sum(e.self_device_time_total for e in kernels) / args.steps
        print(
            f"device busy {device_us / 1000:.1f} ms per step: {device_us / 1e4 / wall:.0f} % "
            "of the wall time"
        )
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    if cuda:
        print(events.table(sort_by="self_device_time_total", row_limit=15))
    args.out.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(args.out / "trace.json"))
    print(f"trace: {args.out / 'trace.json'}")


if __name__ == "__main__":
    main()
