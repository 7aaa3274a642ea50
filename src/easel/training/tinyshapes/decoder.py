"""Fine-tune the VAE decoder of a trained pipeline, for crisper edges and corners.

The encoder stays frozen, so the latents the denoiser was trained on keep their meaning and the
UNet needs no retraining — the same idea as the "ft-MSE" decoders released for Stable Diffusion.
With ``--encoder-anchor W`` the encoder learns too, held near its old latents by W times the mean
squared distance to them; the denoiser then wants a short tune on the new latents
(`easel.training.tinyshapes.denoiser`).
The loss weighs pixels near edges more (a small star is mostly edge), half of the scenes are
redrawn with small objects, stars and crosses the likeliest (the shapes the decoder loses first),
and the decoder sees the posterior mean: a decoder trained on posterior samples learns to blur
away the detail that separates a small star from a blob. The VAE is saved every few minutes, so
an interrupted run keeps its progress (start again from the saved folder with ``--vae``). The
defaults are the run that made the shipped tiny-shapes decoder (docs/TRAINING-LOG.md).

    python -m easel.training.tinyshapes.decoder PIPELINE_DIR --out VAE_DIR [--encoder-anchor 1]
"""

from __future__ import annotations

import argparse
import copy
import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from easel.domain import InvalidParams
from easel.training.loop import (
    Checkpoints,
    StageLog,
    StageRun,
    TrainStep,
    autocast,
    lr_factor,
    pick_device,
    prefetched,
    with_native_precision,
)
from easel.training.tinyshapes.config import BaseConfig
from easel.training.tinyshapes.data import render, training_scene

EDGE_FOCUS = 4.0  # extra loss weight on pixels within 2 px of an edge
HARD_SHARE = 0.5  # share of training scenes redrawn small, stars and crosses likeliest


def reconstruction_loss(
    decoded: torch.Tensor, images: torch.Tensor, *, edge_weight: float = 1.0
) -> torch.Tensor:
    """L1 + MSE + L1 on image gradients (the last keeps corners and edges sharp)."""
    edges = (decoded.diff(dim=-1) - images.diff(dim=-1)).abs().mean() + (
        decoded.diff(dim=-2) - images.diff(dim=-2)
    ).abs().mean()
    return F.l1_loss(decoded, images) + F.mse_loss(decoded, images) + edge_weight * edges


def edge_weights(images: torch.Tensor, focus: float = EDGE_FOCUS) -> torch.Tensor:
    """(B, 1, H, W) weights: 1 everywhere, 1 + ``focus`` within 2 px of a colour edge."""
    dx = images.diff(dim=-1).abs().amax(dim=1, keepdim=True)
    dy = images.diff(dim=-2).abs().amax(dim=1, keepdim=True)
    edges = F.pad(dx, (0, 1)) + F.pad(dy, (0, 0, 0, 1)) > 0.05
    near = F.max_pool2d(edges.float(), kernel_size=5, stride=1, padding=2)
    return 1.0 + focus * near


def focused_loss(decoded: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """`reconstruction_loss` plus the same L1 again, weighted towards edges."""
    weights = edge_weights(images)
    focus = ((decoded - images).abs() * weights).sum() / (weights.sum() * images.shape[1])
    return reconstruction_loss(decoded, images) + focus


def tune_decoder(
    vae: AutoencoderKL,
    config: BaseConfig,
    device: torch.device,
    *,
    budget_s: float,
    log: StageLog,
    checkpoints: Checkpoints | None = None,
    on_save: Callable[[], None] | None = None,
    on_step: Callable[[TrainStep], None] | None = None,
    is_canceled: Callable[[], bool] | None = None,
    encoder_anchor: float = 0.0,
) -> float:
    """Train ``vae``'s decoder in place (``config.decoder_*``; stage 3 of `train_base`) for
    ``budget_s`` seconds or ``config.decoder_max_steps``, whichever is further along. With
    ``checkpoints`` it resumes from and saves "decoder" checkpoints; ``on_save`` is called
    whenever it saves. With ``encoder_anchor`` > 0 the encoder trains too, and the loss adds
    that weight times the mean squared distance of its posterior means from those of the
    encoder it started as. Returns the stage's seconds over all sessions; ``vae`` ends frozen."""
    # 1. freeze the encoder half (or keep a copy to anchor it to); resume
    anchor = copy.deepcopy(vae).requires_grad_(False) if encoder_anchor > 0 else None
    vae.requires_grad_(False)
    if anchor is None:
        trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    else:
        trainable = list(vae.parameters())
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=config.decoder_lr, weight_decay=0.0)
    parts = {"model": vae, "optimizer": optimizer}
    step, elapsed_before = checkpoints.resume("decoder", parts, log) if checkpoints else (0, 0.0)
    rng = random.Random(config.seed + step)
    generator = torch.Generator().manual_seed(config.seed + step)

    def batch() -> torch.Tensor:
        scenes = [training_scene(rng, HARD_SHARE) for _ in range(config.decoder_batch_size)]
        return render(scenes, device=device, jitter=1.0, generator=generator) * 2 - 1

    batches = prefetched(batch, device)

    def save() -> None:
        if checkpoints:
            checkpoints.save_stage("decoder", step, parts, run.elapsed(), log)
        if on_save:
            on_save()

    # 2. the loop: the decoder sees the posterior mean of freshly rendered scenes
    run = StageRun(
        "decoder",
        config,
        budget_s=budget_s,
        max_steps=config.decoder_max_steps,
        batch_size=config.decoder_batch_size,
        step=step,
        elapsed_before=elapsed_before,
        log=log,
        on_step=on_step,
        is_canceled=is_canceled,
    )
    vae.train()
    while not run.done:
        images = next(batches)
        lr = config.decoder_lr * lr_factor(step, run.fraction, warmup_steps=50)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.set_grad_enabled(anchor is not None), autocast(device, config.bf16):
            latents = vae.encode(images).latent_dist.mode().float()
        with autocast(device, config.bf16):
            decoded = vae.decode(latents).sample.float()
        loss = focused_loss(decoded, images)
        if anchor is not None:
            with torch.no_grad(), autocast(device, config.bf16):
                old = anchor.encode(images).latent_dist.mode().float()
            loss = loss + encoder_anchor * F.mse_loss(latents, old)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        run.record(step, loss.item(), lr, save)
    run.close()
    vae.eval().requires_grad_(False)
    return run.elapsed()


def finetune_decoder(
    pipeline_dir: Path,
    out_dir: Path,
    *,
    minutes: float = 45.0,
    vae_dir: Path | None = None,
    batch_size: int = 64,
    lr: float = 2e-4,
    device: str = "auto",
    bf16: bool = True,
    seed: int = 1234,
    save_every_minutes: float = 10.0,
    max_steps: int | None = None,
    encoder_anchor: float = 0.0,
) -> Path:
    """Train the decoder of ``vae_dir`` (default ``pipeline_dir/vae``) for ``minutes`` (or
    ``max_steps``, whichever ends first), and its encoder too if ``encoder_anchor`` > 0
    (`tune_decoder`); save the VAE to ``out_dir`` every ``save_every_minutes`` and at the end.
    Raises `InvalidParams` for settings that cannot train (`check_tune_inputs`)."""
    # 1. check inputs
    check_tune_inputs(pipeline_dir, minutes=minutes, batch_size=batch_size, lr=lr)
    if not encoder_anchor >= 0:
        raise InvalidParams(
            f"encoder_anchor (--encoder-anchor) must be 0 or more (got {encoder_anchor})",
            field="encoder_anchor",
        )
    # 2. load the VAE, tune it, saving on the clock
    dev = pick_device(device)
    vae = AutoencoderKL.from_pretrained(
        vae_dir or pipeline_dir / "vae", torch_dtype=torch.float32, use_safetensors=True
    )
    vae.to(dev)
    config = BaseConfig(
        seed=seed,
        bf16=bf16,
        decoder_batch_size=batch_size,
        decoder_lr=lr,
        decoder_max_steps=max_steps or BaseConfig.decoder_max_steps,
        checkpoint_every_minutes=save_every_minutes,
    )
    config = with_native_precision(config, dev)

    def save() -> None:
        # a float16 copy (the shipped precision); training goes on in float32
        shipped = AutoencoderKL.from_config(vae.config)
        shipped.load_state_dict(vae.state_dict())
        shipped.half().save_pretrained(out_dir, safe_serialization=True)

    log = StageLog()
    tune_decoder(
        vae, config, dev, budget_s=minutes * 60, log=log, on_save=save,
        encoder_anchor=encoder_anchor,
    )  # fmt: skip
    # a positive budget always runs a first step, and the last step saves
    print(f"decoder: {log.steps[-1]} steps, final loss {log.losses[-1]:.4f}")
    return out_dir


def check_tune_inputs(pipeline_dir: Path, *, minutes: float, batch_size: int, lr: float) -> None:
    """What `finetune_decoder` and `easel.training.tinyshapes.denoiser.tune_denoiser` check first:
    a positive budget, batch and learning rate, and a pipeline folder to start from. Raises
    `InvalidParams` naming the argument and its command-line flag."""
    for name, value in (("minutes", minutes), ("batch_size", batch_size), ("lr", lr)):
        if not value > 0:
            flag = "--" + name.replace("_", "-")
            raise InvalidParams(f"{name} ({flag}) must be greater than 0 (got {value})", field=name)
    if not (pipeline_dir / "model_index.json").is_file():
        raise InvalidParams(
            f"pipeline: {pipeline_dir} is not a pipeline folder (no model_index.json)",
            field="pipeline_dir",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m easel.training.tinyshapes.decoder", description=__doc__
    )
    parser.add_argument("pipeline", type=Path, help="the trained pipeline folder")
    parser.add_argument("--out", type=Path, required=True, help="where the new VAE folder goes")
    parser.add_argument("--vae", type=Path, help="start from this VAE (default: the pipeline's)")
    parser.add_argument("--minutes", type=float, default=45.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--encoder-anchor",
        type=float,
        default=0.0,
        help="train the encoder too, held to its old latents with this weight (default 0: frozen)",
    )
    args = parser.parse_args(argv)
    try:
        finetune_decoder(
            args.pipeline,
            args.out,
            minutes=args.minutes,
            vae_dir=args.vae,
            batch_size=args.batch_size,
            lr=args.lr,
            device=args.device,
            seed=args.seed,
            encoder_anchor=args.encoder_anchor,
        )
    except InvalidParams as exc:
        parser.error(exc.message)  # one line, exit code 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
