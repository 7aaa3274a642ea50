"""Tune a trained pipeline's denoiser on the latents of a new autoencoder.

After ``python -m easel.training.tinyshapes.decoder --encoder-anchor W`` has moved the encoder a
little, the denoiser was trained on latents the encoder no longer quite makes. This trains the
UNet alone (the text encoder stays as it is) on the new encoder's latents of freshly rendered
scenes, with a low learning rate and an EMA copy, and writes a whole pipeline folder: the new VAE,
the EMA UNet, everything else copied. The defaults are the run that made the shipped tiny-shapes
denoiser (docs/TRAINING-LOG.md).

    python -m easel.training.tinyshapes.denoiser PIPELINE_DIR --vae VAE_DIR --out NEW_PIPELINE_DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from easel.domain import InvalidParams
from easel.training.loop import (
    StageLog,
    StageRun,
    autocast,
    lr_factor,
    pick_device,
    training_attention,
    with_native_precision,
)
from easel.training.tinyshapes.config import BaseConfig
from easel.training.tinyshapes.data import SceneStream
from easel.training.tinyshapes.decoder import check_tune_inputs
from easel.training.tinyshapes.recipe import denoiser_loss, noise_schedule, scaled_latents, tokenize


def tune_denoiser(
    pipeline_dir: Path,
    vae_dir: Path,
    out_dir: Path,
    *,
    minutes: float = 35.0,
    batch_size: int = 48,
    lr: float = 5e-5,
    device: str = "auto",
    bf16: bool = True,
    seed: int = 4242,
    max_steps: int | None = None,
    ema_decay: float = 0.999,
    hard_share: float = 0.0,
) -> Path:
    """Train ``pipeline_dir``'s UNet on ``vae_dir``'s latents for ``minutes`` (or ``max_steps``,
    whichever ends first); write the pipeline with that VAE and the UNet's EMA copy to
    ``out_dir`` (float16 weights, as shipped; each save replaces the last) every
    ``BaseConfig.checkpoint_every_minutes`` and at the end, and return it. ``hard_share`` of
    the scenes are redrawn with small objects, stars and crosses likeliest (`training_scene`).
    Raises `InvalidParams` for settings that cannot train, a ``vae_dir`` that is no VAE folder,
    a pipeline whose denoiser does not predict velocity, and an ``out_dir`` that is the pipeline
    folder or a folder with files in it."""
    # 1. check inputs: the settings (BaseConfig checks hard_share), the folders
    check_tune_inputs(pipeline_dir, minutes=minutes, batch_size=batch_size, lr=lr)
    config = BaseConfig(
        seed=seed, bf16=bf16, batch_size=batch_size, lr=lr,
        max_steps=max_steps or BaseConfig.max_steps, hard_share=hard_share,
    )  # fmt: skip
    check_folders(pipeline_dir, vae_dir, out_dir)

    # 2. load: the new VAE, the pipeline's frozen text encoder, its UNet to train
    dev = pick_device(device)
    config = with_native_precision(config, dev)
    torch.manual_seed(seed)
    # use_safetensors: weights are never unpickled (a pickle can run code)
    vae = AutoencoderKL.from_pretrained(
        vae_dir, torch_dtype=torch.float32, use_safetensors=True
    ).to(dev)
    tokenizer = CLIPTokenizer.from_pretrained(pipeline_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(
        pipeline_dir / "text_encoder", torch_dtype=torch.float32, use_safetensors=True
    ).to(dev)
    unet = UNet2DConditionModel.from_pretrained(
        pipeline_dir / "unet", torch_dtype=torch.float32, use_safetensors=True
    ).to(dev)
    for model in (vae, text_encoder):
        model.eval().requires_grad_(False)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = noise_schedule()
    stream = SceneStream(seed=seed, device=dev, hard_share=config.hard_share)
    dropout_rng = random.Random(seed)

    # 3. the loop: stage 2's denoiser step, without the text encoder's training
    def save() -> None:
        export(pipeline_dir, out_dir, vae=vae, unet=ema)

    run = StageRun(
        "unet",
        config,
        budget_s=minutes * 60,
        max_steps=config.max_steps,
        batch_size=batch_size,
        step=0,
        elapsed_before=0.0,
        log=StageLog(),
        on_step=None,
        is_canceled=None,
    )
    step = 0
    unet.train()
    while not run.done:
        batch = stream.batch(batch_size)
        captions = [
            c if dropout_rng.random() >= config.caption_dropout else "" for c in batch.captions
        ]
        token_ids = tokenize(tokenizer, captions, dev)
        step_lr = lr * lr_factor(step, run.fraction, warmup_steps=50)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        with autocast(dev, config.bf16), training_attention(dev):
            with torch.no_grad():
                context = text_encoder(token_ids)[0]
            latents = scaled_latents(vae, batch.images)
            loss = denoiser_loss(unet, scheduler, latents, context, config.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - ema_decay)
        step += 1
        run.record(step, loss.item(), step_lr, save)  # saves on the clock and at the end
    run.close()
    recent = run.log.losses[-100:]
    print(f"unet: {step} steps, final loss {sum(recent) / len(recent):.4f}")
    return out_dir


def check_folders(pipeline_dir: Path, vae_dir: Path, out_dir: Path) -> None:
    """`tune_denoiser`'s folders: a VAE to train on, a v-prediction denoiser to tune, and a new
    or empty ``out_dir`` apart from the pipeline (every save replaces what is there)."""
    if not (vae_dir / "config.json").is_file():
        raise InvalidParams(
            f"vae_dir (--vae): {vae_dir} is not a VAE folder (no config.json)", field="vae_dir"
        )
    config_path = pipeline_dir / "scheduler" / "scheduler_config.json"
    prediction = (
        json.loads(config_path.read_text()).get("prediction_type")
        if config_path.is_file()
        else None
    )
    if prediction != "v_prediction":
        raise InvalidParams(
            f"pipeline: its denoiser predicts {prediction!r}; this tunes v-prediction "
            "denoisers such as easel train base makes",
            field="pipeline_dir",
        )
    if out_dir.resolve() == pipeline_dir.resolve():
        raise InvalidParams(
            "out_dir (--out) must differ from the pipeline folder (it is copied from there)",
            field="out_dir",
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidParams(
            f"out_dir (--out): {out_dir} already exists and is not empty; name a new folder",
            field="out_dir",
        )


def export(pipeline_dir: Path, out_dir: Path, **models: torch.nn.Module) -> None:
    """``pipeline_dir`` copied to ``out_dir`` with the named parts replaced by ``models``
    (float16 copies; training goes on in float32)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(pipeline_dir, out_dir)
    for name, model in models.items():
        shutil.rmtree(out_dir / name)
        copy.deepcopy(model).half().save_pretrained(out_dir / name, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m easel.training.tinyshapes.denoiser", description=__doc__
    )
    parser.add_argument("pipeline", type=Path, help="the trained pipeline folder")
    parser.add_argument("--vae", type=Path, required=True, help="the new VAE folder")
    parser.add_argument("--out", type=Path, required=True, help="where the new pipeline goes")
    parser.add_argument("--minutes", type=float, default=35.0)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument(
        "--hard-share",
        type=float,
        default=0.0,
        help="share of scenes redrawn with small objects, stars and crosses likeliest (0-1)",
    )
    args = parser.parse_args(argv)
    try:
        tune_denoiser(
            args.pipeline,
            args.vae,
            args.out,
            minutes=args.minutes,
            batch_size=args.batch_size,
            lr=args.lr,
            device=args.device,
            seed=args.seed,
            hard_share=args.hard_share,
        )
    except InvalidParams as exc:
        parser.error(exc.message)  # one line, exit code 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
