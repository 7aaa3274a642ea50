"""Latent previews: fitted factors for a known VAE, a normalised projection for any other."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from easel.engine.preview import KNOWN_VAES, latents_to_preview, rgb_factors, unpack_tokens

SD_VAE = dict(
    latent_channels=4,
    scaling_factor=0.18215,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
)


def test_known_vaes_are_recognised_by_their_config() -> None:
    sd = rgb_factors(SD_VAE)
    assert sd is not None and torch.equal(sd, torch.tensor(KNOWN_VAES["sd"].factors))
    sdxl = rgb_factors({**SD_VAE, "scaling_factor": 0.13025})
    assert sdxl is not None and torch.equal(sdxl, torch.tensor(KNOWN_VAES["sdxl"].factors))
    flux = rgb_factors({**SD_VAE, "latent_channels": 16, "scaling_factor": 0.3611})
    assert flux is not None and flux.shape == (16, 3)


def test_other_vaes_get_no_factors(tiny_sd_path: Path) -> None:
    # the tiny model has SD's channel count and default scaling, but not SD's VAE
    tiny = AutoencoderKL.load_config(tiny_sd_path / "vae")
    assert tiny["latent_channels"] == 4
    assert rgb_factors(tiny) is None
    assert rgb_factors({**SD_VAE, "latent_channels": 8}) is None


def test_factors_project_channels_to_rgb() -> None:
    factors = torch.tensor(KNOWN_VAES["sd"].factors)
    latents = torch.zeros(1, 4, 2, 2)
    latents[0, 3] = 1.0  # SD's 4th channel is mostly "blue-negative": the preview turns yellow
    image = latents_to_preview(latents, factors)
    expected = tuple(round((1 + float(factors[3, c])) / 2 * 255) for c in range(3))
    assert image.size == (2, 2)
    assert image.getpixel((0, 0)) == expected


def test_without_factors_the_first_three_channels_are_normalised() -> None:
    latents = torch.zeros(2, 5, 4, 4)
    latents[0, 0, 0, 0] = 3.0  # bright red corner
    latents[0, 1] = torch.arange(16.0).view(4, 4)  # a green ramp
    image = latents_to_preview(latents, None, size=(4, 4))
    assert image.getpixel((0, 0))[0] == 255 and image.getpixel((1, 0))[0] == 0
    assert image.getpixel((0, 0))[1] == 0 and image.getpixel((3, 3))[1] == 255


def test_preview_is_resized_to_the_output_size() -> None:
    assert latents_to_preview(torch.randn(1, 16, 8, 6), None, (48, 64)).size == (48, 64)


def test_unpack_tokens_inverts_flux_packing() -> None:
    latents = torch.randn(2, 4, 6, 8)
    # Flux packs (B, C, h, w) as (B, h/2 * w/2, C * 2 * 2) tokens
    packed = latents.view(2, 4, 3, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 12, 16)
    assert torch.equal(unpack_tokens(packed, 6, 8), latents)
