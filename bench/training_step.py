"""Seconds per denoiser training step of `easel train base`: torch's defaults against Easel's choices.

    .venv/bin/python bench/training_step.py [--repeats 5] [--steps 8] [--batch 24]

Builds the `cpu` preset's UNet and text encoder (random weights: the work, not the values, sets
the speed) and times, interleaved, one optimisation step (bf16 autocast forward, backward, AdamW
step, on random latents and real captions) three ways:
- torch's defaults: its flash attention kernel (the default on the CPU) and AdamW's foreach kernel;
- the math attention kernel of `training_attention` with the foreach AdamW (Easel until 2026-12-05);
- Easel's step: `training_attention` and `adamw` (the fused kernel on the CPU and CUDA).
Prints min and median seconds per step for each and the speed-ups over the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from easel.training.loop import adamw, autocast, training_attention
from easel.training.tinyshapes.config import preset
from easel.training.tinyshapes.data import SceneStream
from easel.training.tinyshapes.recipe import build_text_encoder, build_unet, latent_size, tokenize
from easel.training.tinyshapes.tokenizer import train_tokenizer


def main() -> None:
    config = preset("cpu")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per set-up and repeat")
    parser.add_argument("--batch", type=int, default=config.batch_size)
    args = parser.parse_args()

    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = train_tokenizer(Path(folder))
    size = latent_size(config)
    batch = SceneStream(seed=0, device=device).batch(args.batch)
    token_ids = tokenize(tokenizer, batch.captions, device)
    latents = torch.randn(args.batch, config.latent_channels, size, size)
    timesteps = torch.randint(0, 1000, (args.batch,))

    def make_step(attention: Callable, fused: bool) -> Callable[[], None]:
        """One set-up: its own models (the same initial weights) and optimizer."""
        torch.manual_seed(0)
        unet = build_unet(config, size).train()
        text_encoder = build_text_encoder(config, tokenizer).train()
        params = [*unet.parameters(), *text_encoder.parameters()]
        if fused:
            optimizer = adamw(params, config.lr, 0.01, device)
        else:
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01, foreach=True)

        def step() -> None:
            with autocast(device, config.bf16), attention():
                context = text_encoder(token_ids)[0]
                prediction = unet(latents, timesteps, context).sample.float()
            loss = prediction.pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    steps = {
        "torch defaults (flash attention, foreach AdamW)": make_step(
            lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION), fused=False
        ),
        "math attention, foreach AdamW": make_step(lambda: training_attention(device), False),
        "Easel (math attention, fused AdamW)": make_step(lambda: training_attention(device), True),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            step()  # warm-up
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)

    print(f"batch {args.batch}, bf16 autocast {config.bf16}, threads {torch.get_num_threads()}")
    print("| set-up | min s/step | median s/step | speed-up over the defaults (median) |")
    print("|---|---|---|---|")
    baseline = statistics.median(next(iter(times.values())))
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {min(values):.3f} | {median:.3f} | {baseline / median:.2f}x |")


if __name__ == "__main__":
    main()
