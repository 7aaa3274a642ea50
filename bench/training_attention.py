"""Seconds per denoiser training step of `easel train base`, attention kernel by attention kernel.

    .venv/bin/python bench/training_attention.py [--repeats 3] [--steps 8] [--batch 48]

Builds the `cpu` preset's UNet and text encoder (random weights: the work, not the values, sets
the speed) and times, interleaved, one optimisation step each with torch's flash attention kernel
(torch's default on the CPU) and inside `training_attention`, the choice `easel train base` makes
(the plain math kernel on the CPU): bf16 autocast forward, backward, AdamW step, on random
latents and real captions. Prints min and median seconds per step for both and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from easel.training.base import (
    autocast,
    build_text_encoder,
    build_unet,
    latent_size,
    tokenize,
    training_attention,
)
from easel.training.base_config import preset
from easel.training.data import SceneStream
from easel.training.tokenizer import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per kernel and repeat")
    parser.add_argument("--batch", type=int, default=48)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = preset("cpu")
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = train_tokenizer(Path(folder))
    size = latent_size(config)
    unet = build_unet(config, size).train()
    text_encoder = build_text_encoder(config, tokenizer).train()
    optimizer = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=1e-4)
    batch = SceneStream(seed=0, device=device).batch(args.batch)
    token_ids = tokenize(tokenizer, batch.captions, device)
    latents = torch.randn(args.batch, config.latent_channels, size, size)
    timesteps = torch.randint(0, 1000, (args.batch,))

    kernels = {
        "flash (torch default)": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION),
        "Easel (training_attention)": lambda: training_attention(device),
    }

    def step(kernel: Callable[[], AbstractContextManager]) -> None:
        with autocast(device, config.bf16), kernel():
            context = text_encoder(token_ids)[0]
            prediction = unet(latents, timesteps, context).sample.float()
        loss = prediction.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(args.repeats):
        for name, kernel in kernels.items():
            step(kernel)  # warm-up
            for _ in range(args.steps):
                start = time.perf_counter()
                step(kernel)
                times[name].append(time.perf_counter() - start)

    print(f"batch {args.batch}, bf16 autocast {config.bf16}, threads {torch.get_num_threads()}")
    print("| kernel | min s/step | median s/step |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {min(values):.3f} | {statistics.median(values):.3f} |")
    flash, easel = (statistics.median(v) for v in times.values())
    print(f"Easel's speed-up (median): {flash / easel:.2f}x")


if __name__ == "__main__":
    main()
