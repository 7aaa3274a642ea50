"""Denoiser tune: the UNet learns a new autoencoder's latents; the text encoder stays; the folder
it writes is a whole pipeline."""

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from easel.domain import InvalidParams
from easel.models.catalog import TINY_SHAPES_DIR
from easel.training.tinyshapes.data import SceneStream
from easel.training.tinyshapes.denoiser import main, tune_denoiser
from easel.training.tinyshapes.recipe import denoiser_loss, noise_schedule, scaled_latents, tokenize


def _shifted_vae(path: Path) -> Path:
    """The shipped autoencoder with every latent moved by 0.3: a "new" encoder whose latents
    the shipped denoiser never saw."""
    vae = AutoencoderKL.from_pretrained(TINY_SHAPES_DIR / "vae", torch_dtype=torch.float32)
    latent_channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[:latent_channels] += 0.3  # the posterior mean's half
        vae.post_quant_conv.bias -= vae.post_quant_conv.weight[:, :, 0, 0].sum(dim=1) * 0.3
    vae.save_pretrained(path)
    return path


@torch.no_grad()
def _loss(pipeline_dir: Path, vae: AutoencoderKL) -> float:
    """The denoiser loss on the same 32 scenes, noise and timesteps whatever the model."""
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(pipeline_dir / "tokenizer")
    batch = SceneStream(seed=5).batch(32)
    context = text_encoder(tokenize(tokenizer, batch.captions, torch.device("cpu")))[0]
    torch.manual_seed(0)
    loss = denoiser_loss(unet, noise_schedule(), scaled_latents(vae, batch.images), context, 5.0)
    return float(loss)


def test_the_tune_teaches_the_unet_the_new_latents_and_writes_a_whole_pipeline(
    tmp_path: Path,
) -> None:
    vae_dir = _shifted_vae(tmp_path / "vae")
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)

    out = tune_denoiser(
        TINY_SHAPES_DIR, vae_dir, tmp_path / "tuned", minutes=5, max_steps=30, batch_size=16,
        lr=1e-3, device="cpu", bf16=False, ema_decay=0.0,
    )  # fmt: skip

    assert _loss(out, vae) < 0.8 * _loss(TINY_SHAPES_DIR, vae)
    for part in ("unet", "vae"):
        saved = load_file(out / part / "diffusion_pytorch_model.safetensors")
        assert {t.dtype for t in saved.values()} == {torch.float16}  # the shipped precision
    torch.testing.assert_close(
        AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).quant_conv.bias,
        vae.quant_conv.bias,
        atol=1e-3,
        rtol=1e-3,
    )
    text_file = "text_encoder/model.safetensors"
    assert (out / text_file).read_bytes() == (TINY_SHAPES_DIR / text_file).read_bytes()
    pipeline = StableDiffusionPipeline.from_pretrained(out)
    image = pipeline(
        "a red circle on a white background", num_inference_steps=2, output_type="pil"
    ).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--minutes", "0"], "minutes (--minutes) must be greater than 0"),
        (["--vae", "{tmp}/nothing"], "is not a VAE folder"),
        (["--out", str(TINY_SHAPES_DIR)], "out_dir (--out) must differ from the pipeline folder"),
        (["--out", "{tmp}/kept"], "already exists and is not empty"),
        (["--hard-share", "1.5"], "hard_share (--hard-share) must be between 0 and 1 (got 1.5)"),
    ],
)
def test_the_command_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    defaults = {"--vae": str(TINY_SHAPES_DIR / "vae"), "--out": str(tmp_path / "out")}
    given = {**defaults, **dict(zip(flags[::2], flags[1::2], strict=True))}
    argv = [str(TINY_SHAPES_DIR), *(x.format(tmp=tmp_path) for kv in given.items() for x in kv)]
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"


def test_the_command_refuses_a_denoiser_that_does_not_predict_velocity(
    tiny_sd_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tiny_sd_path), "--vae", str(tiny_sd_path / "vae"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "predicts 'epsilon'" in capsys.readouterr().err


def test_a_library_call_is_refused_like_the_command(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(InvalidParams) as refused:  # the BaseConfig it builds checks hard_share
        tune_denoiser(TINY_SHAPES_DIR, TINY_SHAPES_DIR / "vae", out, hard_share=2.0)
    assert refused.value.field == "hard_share"
    with pytest.raises(InvalidParams) as refused:
        tune_denoiser(TINY_SHAPES_DIR, TINY_SHAPES_DIR / "vae", TINY_SHAPES_DIR)
    assert refused.value.field == "out_dir"
    assert not out.exists()
