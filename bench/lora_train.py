"""LoRA training speed on the bundled model: Easel's `train_lora` against the plain loop of
diffusers' `examples/text_to_image/train_text_to_image_lora.py`, same data and settings.

Both train rank-8 LoRA layers on the same modules of tiny-shapes' UNet (Easel's defaults for a
UNet: attention, feed-forward, ResNet convolutions), batch 8, 64x64, on the
hexagon dataset (`easel.training.tinyshapes.evaluate_lora.make_dataset`). The plain loop does per
step what that script does on a CPU: VAE encode and text encoder forward for every batch, fp32
(its default; `--bf16` adds autocast as `--mixed_precision bf16` would), AdamW, gradient
clipping. Easel encodes images and captions once (the encoders are frozen), uses bf16 where the
CPU has it natively (also timed without), the math attention kernel and the fused AdamW. Each variant runs
``--rounds`` times, interleaved, and the best round counts (the steps after ``--warmup``).

    python bench/lora_train.py            # prints a table; record it in docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig as PeftLoraConfig
from PIL import Image

from easel.config import Settings
from easel.datasets import DatasetLimits, load_dataset, prepare_dataset
from easel.models.catalog import ModelCatalog
from easel.training.lora import _Sd, to_pixels, train_lora, with_trigger
from easel.training.lora_config import LoraConfig
from easel.training.tinyshapes.evaluate_lora import TRIGGER, make_dataset

SIZE, RANK, BATCH, LR = 64, 8, 8, 1e-3
TARGETS = list(_Sd.default_targets)  # the same LoRA layers in both loops


def plain_loop(source: str, dataset: Path, steps: int, warmup: int, bf16: bool) -> float:
    """Steps per second of the diffusers example's loop (after ``warmup`` steps)."""
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(source)
    vae, text_encoder, unet, tokenizer = pipe.vae, pipe.text_encoder, pipe.unet, pipe.tokenizer
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    unet.add_adapter(PeftLoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                    target_modules=TARGETS))  # fmt: skip
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    items = load_dataset(dataset).items
    images = [Image.open(item.image).convert("RGB") for item in items]
    captions = [with_trigger(item.caption, TRIGGER) for item in items]
    rng = random.Random(0)
    unet.train()
    started = 0.0
    for step in range(steps):
        if step == warmup:
            started = time.perf_counter()
        picks = rng.sample(range(len(images)), BATCH)
        # the example's transforms run on every batch: resize, crop, to tensor, normalise
        pixels = torch.stack([to_pixels(images[i], SIZE) for i in picks])
        ids = tokenizer([captions[i] for i in picks], max_length=tokenizer.model_max_length,
                        padding="max_length", truncation=True, return_tensors="pt").input_ids  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (BATCH,))
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            context = text_encoder(ids, return_dict=False)[0]
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            prediction = unet(noisy, timesteps, context, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return (steps - warmup) / (time.perf_counter() - started)


def easel_loop(dataset: Path, out: Path, steps: int, warmup: int, bf16: bool = True) -> float:
    """Steps per second of `train_lora` (after ``warmup`` steps; set-up and caching excluded)."""
    times: list[float] = []
    config = LoraConfig(model="tiny-shapes", dataset=str(dataset), out_dir=str(out),
                        name="bench", trigger=TRIGGER, steps=steps, batch_size=BATCH, rank=RANK,
                        learning_rate=LR, sample_every=0, holdout=0.0,
                        checkpoint_every=steps, bf16=bf16)  # fmt: skip
    train_lora(config, on_step=lambda _: times.append(time.perf_counter()))
    return (steps - warmup) / (times[-1] - times[warmup - 1])


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))  # fmt: skip
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    source = ModelCatalog(Settings()).get("tiny-shapes").source
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = root / "dataset"
        prepare_dataset(make_dataset(root / "source"), dataset, DatasetLimits())
        runs: dict[str, list[float]] = {
            "plain fp32": [], "plain bf16": [], "easel fp32": [], "easel (bf16)": []
        }  # fmt: skip
        for round_ in range(args.rounds):
            runs["plain fp32"].append(plain_loop(source, dataset, args.steps, args.warmup, False))
            runs["plain bf16"].append(plain_loop(source, dataset, args.steps, args.warmup, True))
            for name, bf16 in (("easel fp32", False), ("easel (bf16)", True)):
                out = root / f"{name}-{round_}"
                runs[name].append(easel_loop(dataset, out, args.steps, args.warmup, bf16))
    best = {name: max(rates) for name, rates in runs.items()}
    print(f"LoRA training on tiny-shapes, rank {RANK}, batch {BATCH}, {SIZE}px, {cpu_name()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of "
          f"{args.rounds} rounds of {args.steps - args.warmup} steps")  # fmt: skip
    print("| loop | steps/s | images/s | vs plain fp32 |")
    print("|---|---|---|---|")
    for name, rate in best.items():
        print(f"| {name} | {rate:.2f} | {rate * BATCH:.0f} | {rate / best['plain fp32']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
