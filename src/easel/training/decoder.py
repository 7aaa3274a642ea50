"""Fine-tune only the VAE decoder of a trained pipeline, for crisper edges and corners.

The encoder stays frozen, so the latents the denoiser was trained on keep their meaning and the
UNet needs no retraining — the same idea as the "ft-MSE" decoders released for Stable Diffusion.

    python -m easel.training.decoder PIPELINE_DIR --minutes 2 --out VAE_DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from easel.training.base import (
    autocast,
    lr_factor,
    pick_device,
    prefetched,
    reconstruction_loss,
)
from easel.training.data import SceneStream


def finetune_decoder(
    pipeline_dir: Path,
    out_dir: Path,
    *,
    minutes: float,
    batch_size: int = 256,
    lr: float = 3e-4,
    device: str = "auto",
    bf16: bool = True,
    seed: int = 1234,
) -> Path:
    """Train the decoder of ``pipeline_dir/vae`` for ``minutes`` and save the VAE to ``out_dir``."""
    # 1. load, freeze the encoder half
    dev = pick_device(device)
    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae", torch_dtype=torch.float32).to(dev)
    vae.requires_grad_(False)
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    stream = SceneStream(seed=seed, device=dev)
    batches = prefetched(lambda: stream.batch(batch_size).images)
    use_bf16 = bf16 and dev.type == "cuda"

    # 2. the loop: a wall-clock budget drives the learning-rate schedule
    budget_s, start, step = minutes * 60, time.monotonic(), 0
    progress = tqdm(desc="decoder", unit="step", mininterval=2.0)
    vae.decoder.train()
    while (fraction := (time.monotonic() - start) / budget_s) < 1.0:
        images = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, fraction, warmup_steps=50)
        with torch.no_grad(), autocast(dev, use_bf16):
            posterior = vae.encode(images).latent_dist
            # the denoiser's latents are near the posterior mean but never exact: train on both
            latents = torch.where(
                torch.rand(len(images), 1, 1, 1, device=dev) < 0.5,
                posterior.mean,
                posterior.sample(),
            )
        with autocast(dev, use_bf16):
            decoded = vae.decode(latents).sample.float()
        loss = reconstruction_loss(decoded, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    progress.close()
    print(f"decoder: {step} steps, final loss {loss.item():.4f}")

    # 3. save in the shipped precision
    vae.eval().to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easel.training.decoder", description=__doc__)
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    finetune_decoder(
        args.pipeline,
        args.out,
        minutes=args.minutes,
        batch_size=args.batch_size,
        device=args.device,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
