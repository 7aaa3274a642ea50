"""Latent previews: fitted factors where the VAE is known, a normalised projection elsewhere."""

from __future__ import annotations

import torch

from easel.engine.preview import LATENT_RGB_FACTORS, latents_to_preview, unpack_tokens


def test_known_vae_uses_its_factors() -> None:
    factors, _ = LATENT_RGB_FACTORS["sd"]
    latents = torch.zeros(1, 4, 2, 2)
    latents[0, 3] = 1.0  # SD's 4th channel is mostly "blue-negative": the preview turns yellow
    image = latents_to_preview(latents, "sd")
    expected = tuple(round((1 + factors[3][c]) / 2 * 255) for c in range(3))
    assert image.size == (2, 2)
    assert image.getpixel((0, 0)) == expected


def test_unknown_channel_count_falls_back_to_first_three_channels_normalised() -> None:
    latents = torch.zeros(2, 5, 4, 4)
    latents[0, 0, 0, 0] = 3.0  # bright red corner
    latents[0, 1] = torch.arange(16.0).view(4, 4)  # a green ramp
    image = latents_to_preview(latents, "sd", size=(4, 4))
    assert image.getpixel((0, 0))[0] == 255 and image.getpixel((1, 0))[0] == 0
    assert image.getpixel((0, 0))[1] == 0 and image.getpixel((3, 3))[1] == 255


def test_preview_is_resized_to_the_output_size() -> None:
    assert latents_to_preview(torch.randn(1, 16, 8, 6), "flux", (48, 64)).size == (48, 64)


def test_unpack_tokens_inverts_flux_packing() -> None:
    latents = torch.randn(2, 4, 6, 8)
    # Flux packs (B, C, h, w) as (B, h/2 * w/2, C * 2 * 2) tokens
    packed = latents.view(2, 4, 3, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 12, 16)
    assert torch.equal(unpack_tokens(packed, 6, 8), latents)
