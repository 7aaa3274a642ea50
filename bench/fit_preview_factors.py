"""Fit the linear latent -> RGB preview factors of the bundled model's VAE (tiny-shapes).

    .venv/bin/python bench/fit_preview_factors.py [--images 512] [--seed 1]

Previews project a latent to RGB with ``rgb = latents^T @ factors + bias`` (engine.preview) when
the VAE is one of ``KNOWN_VAES``. This script fits those numbers for ``src/easel/assets/tiny-shapes``
the way the community fitted SD's: encode rendered training scenes (easel.training.tinyshapes.data),
take the scaled posterior means (the latents the UNet sees), and solve least squares against the
images averaged down to latent resolution, in [-1, 1]. It prints the ``KnownVae`` fields to paste
into ``KNOWN_VAES["tiny-shapes"]`` (a test checks that entry still matches the bundled VAE) and
the fit's error beside the images' own spread. Seconds on a CPU.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from easel.models.catalog import TINY_SHAPES_DIR
from easel.training.tinyshapes.data import SceneStream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="rendered scenes to encode")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    vae = AutoencoderKL.from_pretrained(TINY_SHAPES_DIR / "vae").eval()
    config = vae.config
    scale = 2 ** (len(config.block_out_channels) - 1)  # the VAE's downsampling
    stream = SceneStream(seed=args.seed)
    latents, targets = [], []
    with torch.no_grad():
        for _ in range(0, args.images, 64):
            images = stream.batch(64).images  # [-1, 1]
            latents.append(vae.encode(images).latent_dist.mean * config.scaling_factor)
            targets.append(F.avg_pool2d(images, scale))
    z = torch.cat(latents).permute(0, 2, 3, 1).reshape(-1, config.latent_channels)
    rgb = torch.cat(targets).permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    solution = torch.linalg.lstsq(design, rgb).solution
    error = float((design @ solution - rgb).pow(2).mean().sqrt())

    print(f"{len(z)} latent pixels from {args.images} scenes; RMS error {error:.3f} (images' own")
    print(f"spread {float(rgb.std()):.3f}, in [-1, 1] units)\n")
    print(f"latent_channels={config.latent_channels},")
    print(f"scaling_factor={config.scaling_factor!r},")
    print(f"block_out_channels={tuple(config.block_out_channels)},")
    print("factors=(")
    for row in solution[:-1].tolist():
        print("    (" + ", ".join(f"{v:.4f}" for v in row) + "),")
    print("),")
    print("bias=(" + ", ".join(f"{v:.4f}" for v in solution[-1].tolist()) + "),")


if __name__ == "__main__":
    main()
