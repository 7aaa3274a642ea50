"""Decoder fine-tune: the encoder (and so the denoiser's latents) stays as it was, the decoder
learns, and the loss weighs edges more."""

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from easel.domain import InvalidParams
from easel.training.tinyshapes.data import Scene, SceneStream, ShapeObject, render
from easel.training.tinyshapes.decoder import (
    edge_weights,
    finetune_decoder,
    focused_loss,
    main,
)


def test_edge_weights_are_raised_only_near_edges() -> None:
    scene = Scene((ShapeObject("square", "red", "medium", "centre"),), "white")
    image = render([scene], size=64, jitter=0.0) * 2 - 1
    weights = edge_weights(image)[0, 0]
    assert weights[0, 0] == 1.0  # a corner of the background, far from the square
    assert weights[32, 32] == 1.0  # the square's middle
    edge_column = int((image[0, 0, 32] < 0.9).nonzero()[0])  # the square's left edge, middle row
    assert weights[32, edge_column] > 1.0
    assert weights[32, edge_column - 2] > 1.0


@torch.no_grad()
def _loss(vae: AutoencoderKL, images: torch.Tensor) -> float:
    return float(focused_loss(vae.decode(vae.encode(images).latent_dist.mode()).sample, images))


def test_finetune_trains_the_decoder_only_and_lowers_the_loss(
    tiny_sd_path: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    images = SceneStream(seed=99).batch(16).images
    before = AutoencoderKL.from_pretrained(tiny_sd_path / "vae")

    out = finetune_decoder(
        tiny_sd_path,
        tmp_path / "vae",
        minutes=5,
        max_steps=40,
        batch_size=8,
        lr=3e-3,
        device="cpu",
        bf16=False,
    )

    saved = load_file(out / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float16}  # the shipped precision
    after = AutoencoderKL.from_pretrained(out, torch_dtype=torch.float32)
    for name, value in before.encoder.state_dict().items():
        # saved in float16, so equal up to that rounding
        torch.testing.assert_close(after.encoder.state_dict()[name], value, atol=2e-3, rtol=1e-3)
    assert not torch.allclose(after.decoder.conv_out.weight, before.decoder.conv_out.weight)
    assert _loss(after, images) < 0.8 * _loss(before, images)


@torch.no_grad()
def _drift(vae: AutoencoderKL, before: AutoencoderKL, images: torch.Tensor) -> float:
    """Root mean squared distance between two encoders' posterior means."""
    moved = vae.encode(images).latent_dist.mode() - before.encode(images).latent_dist.mode()
    return float(moved.pow(2).mean().sqrt())


def test_an_anchored_tune_trains_the_encoder_and_the_anchor_holds_its_latents(
    tiny_sd_path: Path, tmp_path: Path
) -> None:
    images = SceneStream(seed=99).batch(16).images
    before = AutoencoderKL.from_pretrained(tiny_sd_path / "vae")
    tuned = {}
    for anchor in (0.1, 100.0):
        torch.manual_seed(0)
        out = finetune_decoder(
            tiny_sd_path, tmp_path / f"vae-{anchor}", minutes=5, max_steps=30, batch_size=8,
            lr=3e-3, device="cpu", bf16=False, encoder_anchor=anchor,
        )  # fmt: skip
        tuned[anchor] = AutoencoderKL.from_pretrained(out, torch_dtype=torch.float32)
    loose, tight = tuned[0.1], tuned[100.0]
    assert not torch.allclose(loose.encoder.conv_in.weight, before.encoder.conv_in.weight)
    assert _loss(loose, images) < 0.8 * _loss(before, images)
    assert _drift(tight, before, images) < 0.5 * _drift(loose, before, images)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--minutes", "0"], "minutes (--minutes) must be greater than 0 (got 0.0)"),
        (["--batch-size", "-1"], "batch_size (--batch-size) must be greater than 0 (got -1)"),
        (["--lr", "0"], "lr (--lr) must be greater than 0"),
        (["--encoder-anchor", "-1"], "encoder_anchor (--encoder-anchor) must be 0 or more"),
    ],
)
def test_the_command_refuses_budgets_that_cannot_train(
    tiny_sd_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    named: str,
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_sd_path), "--out", str(tmp_path / "vae"), *flags])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "vae").exists()


def test_the_command_refuses_a_folder_that_is_not_a_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--out", str(tmp_path / "vae")])
    assert exit_info.value.code == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_a_library_call_is_refused_like_the_command(tiny_sd_path: Path, tmp_path: Path) -> None:
    with pytest.raises(
        InvalidParams, match=r"^minutes \(--minutes\) must be greater than 0"
    ) as refused:
        finetune_decoder(tiny_sd_path, tmp_path / "vae", minutes=0)
    assert refused.value.field == "minutes"
    with pytest.raises(InvalidParams) as refused:
        finetune_decoder(tiny_sd_path, tmp_path / "vae", encoder_anchor=-1)
    assert refused.value.field == "encoder_anchor"
    assert not (tmp_path / "vae").exists()
