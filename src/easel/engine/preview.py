"""Cheap previews of an image while it is being denoised.

A VAE decode per preview would cost as much as a denoising step (more on the CPU), so previews
project the latent channels linearly to RGB, ``rgb = latents^T @ factors`` (in [-1, 1]), at
latent resolution, then resize to the output size.

Factors belong to one VAE: they were fitted by the community on real images (SD 1.5's VAE, also
used by SD 2.x and SD-Turbo: @torridgristle; SDXL's: @StAlKeR7779; the 16-channel Flux VAE,
which Z-Image uses too: as in InvokeAI's Flux preview). A pipeline gets them only when its VAE
is that VAE (same latent channels, scaling factor and block widths), whatever family it is in.

Any other VAE (the tiny test models, a bundled model's own small VAE, a new architecture) gets no
fitted factors, and none are fitted on the fly: its first three latent channels, each normalised
to [0, 1] by its own min and max, stand in for R, G and B. That shows layout and motion, not
colour.

Previews see the noisy latent x_t, so early ones look like noise; that is expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image


@dataclass(frozen=True)
class KnownVae:
    """A VAE recognised by its config, with its latent -> RGB factors [channel][R, G, B]."""

    latent_channels: int
    scaling_factor: float
    block_out_channels: tuple[int, ...]
    factors: tuple[tuple[float, float, float], ...]

    def matches(self, config: Mapping[str, Any]) -> bool:
        return (
            config.get("latent_channels") == self.latent_channels
            and math.isclose(config.get("scaling_factor") or 0.0, self.scaling_factor)
            and tuple(config.get("block_out_channels") or ()) == self.block_out_channels
        )


KNOWN_VAES: dict[str, KnownVae] = {
    "sd": KnownVae(
        latent_channels=4,
        scaling_factor=0.18215,
        block_out_channels=(128, 256, 512, 512),
        factors=(
            (0.3444, 0.1385, 0.0670),
            (0.1247, 0.4027, 0.1494),
            (-0.3192, 0.2513, 0.2103),
            (-0.1307, -0.1874, -0.7445),
        ),
    ),
    "sdxl": KnownVae(
        latent_channels=4,
        scaling_factor=0.13025,
        block_out_channels=(128, 256, 512, 512),
        factors=(
            (0.3816, 0.4930, 0.5320),
            (-0.3753, 0.1631, 0.1739),
            (0.1770, 0.3588, -0.2048),
            (-0.4350, -0.2644, -0.4289),
        ),
    ),
    "flux": KnownVae(
        latent_channels=16,
        scaling_factor=0.3611,
        block_out_channels=(128, 256, 512, 512),
        factors=(
            (-0.0243, 0.0101, 0.0400),
            (0.0491, 0.0718, 0.0799),
            (0.0451, -0.0168, -0.0259),
            (-0.0106, -0.0033, 0.0196),
            (0.0167, 0.0159, -0.0096),
            (-0.0073, 0.0163, 0.0034),
            (0.0369, 0.0804, 0.0819),
            (-0.0170, -0.0390, -0.0654),
            (-0.0218, 0.0041, 0.0432),
            (0.0941, 0.0516, -0.0211),
            (0.0119, 0.0180, 0.0234),
            (0.0503, 0.0268, 0.0144),
            (0.0497, 0.0415, 0.0575),
            (-0.0746, -0.0326, -0.0501),
            (-0.0367, -0.0411, -0.0280),
            (-0.0598, -0.0383, -0.0303),
        ),
    ),
}


def rgb_factors(vae_config: Mapping[str, Any]) -> torch.Tensor | None:
    """The (channels, 3) latent -> RGB factors for this VAE, or None for an unknown VAE."""
    for vae in KNOWN_VAES.values():
        if vae.matches(vae_config):
            return torch.tensor(vae.factors)
    return None


def unpack_tokens(latents: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Undo Flux-style packing: (B, h/2 * w/2, C*4) tokens of 2x2 patches -> (B, C, h, w)."""
    batch, _, packed = latents.shape
    channels = packed // 4
    x = latents.view(batch, latent_height // 2, latent_width // 2, channels, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, latent_height, latent_width)


def latents_to_preview(
    latents: torch.Tensor, factors: torch.Tensor | None, size: tuple[int, int] | None = None
) -> Image.Image:
    """RGB preview of the first latent of a (B, C, h, w) batch, resized to ``size`` (w, h).

    ``factors`` come from :func:`rgb_factors`; None gives the normalised first-three-channels
    projection.
    """
    x = latents[0].detach().to(device="cpu", dtype=torch.float32)
    if factors is not None:
        rgb = (torch.einsum("chw,cr->hwr", x, factors) + 1) / 2
    else:
        channels = x.shape[0]
        rgb = x[[i % channels for i in range(3)]].permute(1, 2, 0)
        low = rgb.amin(dim=(0, 1), keepdim=True)
        high = rgb.amax(dim=(0, 1), keepdim=True)
        rgb = (rgb - low) / (high - low).clamp_min(1e-6)
    pixels = rgb.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    return image if size is None else image.resize(size, Image.Resampling.BILINEAR)
