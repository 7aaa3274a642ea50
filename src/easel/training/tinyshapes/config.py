"""Settings of a tiny-shapes training run (`BaseConfig`, presets) and their command-line options.

A `BaseConfig` checks itself when built (`InvalidParams` naming the field and its flag), so
`easel train base`, `python -m easel.training.tinyshapes.recipe` and library callers meet the same
rules. Kept free of torch so that `easel --help` stays fast; `recipe` does the work.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace

from easel.domain import InvalidParams
from easel.models.hardware import cpu_has_native_bf16


@dataclass
class BaseConfig:
    """Everything a from-scratch run needs. Defaults are the CPU preset (<= 2 h on 2 cores).

    Raises `easel.domain.InvalidParams` when built with settings that cannot train, e.g.
    ``BaseConfig(max_minutes=-1)``: "max_minutes (--max-minutes) must be greater than 0 (got -1)".
    """

    out_dir: str = "runs/tiny-shapes"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    seed: int = 0
    max_minutes: float = 110.0  # wall-clock budget for all stages together
    vae_share: float = (
        0.45  # of max_minutes for the autoencoder: it caps pairs (docs/TRAINING-LOG.md)
    )
    bf16: bool = True  # bf16 autocast on CUDA and on CPUs that compute it natively (AMX)
    # -- stage 1: autoencoder (factor 4: 64x64x3 -> 16x16x4)
    vae_channels: tuple[int, ...] = (32, 64, 128)
    latent_channels: int = 4  # more keep finer detail (small stars), at almost no denoiser cost
    vae_batch_size: int = 16  # a CPU run is short of steps: small batches learn more per image
    vae_lr: float = 1e-3
    vae_max_steps: int = 100_000  # a cap; normally the time budget ends the stage
    vae_kl_weight: float = (
        1e-6  # tiny, yet the posterior stays wide (std ~0.2; docs/TRAINING-LOG.md)
    )
    vae_edge_weight: float = 1.0  # L1 on image gradients keeps corners and edges sharp
    vae_mosaic_share: float = 0.5  # of each batch: 2x2 mosaics of object crops (more edges)
    # -- stage 2: denoiser + text encoder
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_attention: tuple[bool, ...] = (False, True, True)  # cross-attention per resolution
    text_width: int = 128
    text_layers: int = 4
    batch_size: int = 24  # (docs/TRAINING-LOG.md, "Smaller batches"); the GPU preset's are large
    lr: float = 1e-3  # 83.5 against 81.0 % at 5e-4, the same 10,200 steps (docs/TRAINING-LOG.md)
    max_steps: int = 1_000_000  # a cap; normally the time budget ends the stage
    warmup_steps: int = 200
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023)
    ema_decay: float = 0.999
    attribute_weight: float = 0.02  # the text encoder's attribute-probe loss (AttributeProbe)
    latent_reuse: int = 4  # each encoded scene is drawn about this often (LatentPool)
    latent_pool: int = 2400  # scenes (with their latents) the denoiser draws its batches from
    hard_share: float = 0.0  # of denoiser scenes redrawn small, stars and crosses likeliest
    # -- stage 3: the decoder alone, encoder frozen (tinyshapes.decoder; 0 skips it)
    decoder_share: float = 0.15  # fraction of max_minutes
    decoder_batch_size: int = 64
    decoder_lr: float = 2e-4
    decoder_max_steps: int = 100_000  # a cap; normally the time budget ends the stage
    # -- bookkeeping
    log_every_seconds: float = 60.0  # a throughput line (it/s, images/s) on stdout
    sample_every_minutes: float = 15.0
    checkpoint_every_minutes: float = 10.0
    keep_checkpoints: int = 2
    sample_steps: int = 8  # also the shipped default step count (docs/TRAINING-LOG.md, "Results")
    guidance_scale: float = 3.0  # 81.5 against 79.3 % at 2.5 for run 13 (docs/TRAINING-LOG.md)
    guidance_end: float = (
        0.67  # guidance for the first two thirds of the steps (docs/TRAINING-LOG.md)
    )

    def __post_init__(self) -> None:
        if not self.max_minutes > 0:
            raise _invalid("max_minutes", "must be greater than 0", self.max_minutes)
        for name in ("latent_channels", "batch_size", "vae_batch_size", "decoder_batch_size"):
            if getattr(self, name) < 1:
                raise _invalid(name, "must be at least 1", getattr(self, name))
        for name in ("vae_lr", "lr", "decoder_lr"):
            if not getattr(self, name) > 0:
                raise _invalid(name, "must be greater than 0", getattr(self, name))
        for name in ("vae_share", "decoder_share"):
            if not 0 <= getattr(self, name) < 1:
                raise _invalid(name, "must be at least 0 and below 1", getattr(self, name))
        if not 0 <= self.hard_share <= 1:
            raise _invalid("hard_share", "must be between 0 and 1", self.hard_share)
        if self.vae_share + self.decoder_share > 0.9:
            raise InvalidParams(
                f"{_named('vae_share')} + {_named('decoder_share')} must be at most 0.9, so the "
                "denoiser keeps a tenth of the budget "
                f"(got {self.vae_share} + {self.decoder_share})",
                field="decoder_share",
            )


# The command-line flags of the checked fields (`add_arguments`), which messages name too.
FLAGS = {
    name: "--" + name.replace("_", "-")
    for name in (
        "max_minutes",
        "batch_size",
        "vae_batch_size",
        "latent_channels",
        "vae_share",
        "decoder_share",
        "hard_share",
    )
}


def _named(name: str) -> str:
    """A field as messages name it: ``max_minutes (--max-minutes)``, or bare without a flag."""
    return f"{name} ({FLAGS[name]})" if name in FLAGS else name


def _invalid(name: str, requirement: str, value: object) -> InvalidParams:
    return InvalidParams(f"{_named(name)} {requirement} (got {value})", field=name)


PRESETS: dict[str, dict] = {
    "cpu": {},
    "gpu": {
        "max_minutes": 7.0,
        "vae_share": 0.2,
        "vae_batch_size": 256,
        "vae_lr": 2e-3,
        "batch_size": 512,  # small latents: a GPU step is launch-bound, so big batches are ~free
        "decoder_share": 0.2,
        "decoder_batch_size": 256,
        "decoder_lr": 3e-4,
        "guidance_scale": 2.5,  # the shipped model's (made with this preset): 3.0 scored less
        "latent_pool": 25_600,
        "warmup_steps": 300,
        "log_every_seconds": 20.0,
        "sample_every_minutes": 2.0,
        "checkpoint_every_minutes": 2.0,
    },
    # For tests: seconds, not hours.
    "tiny": {
        "max_minutes": 0.5,
        "bf16": False,  # the same numbers on every CPU, AMX or not
        "vae_channels": (32, 32),
        "vae_batch_size": 8,
        "unet_channels": (32, 32),
        "unet_attention": (False, True),
        "text_width": 32,
        "text_layers": 1,
        "batch_size": 8,
        "warmup_steps": 5,
        "decoder_batch_size": 8,
        "latent_pool": 32,
        "sample_steps": 2,
    },
}

# On a CPU without native bf16 (AVX2 only) the float32 steps run 2-4x slower, the autoencoder
# bounds the model and the decoder stage buys almost nothing, so its minutes go to the autoencoder:
# 39 % of `easel eval`'s prompts all right against 31 % (docs/TRAINING-LOG.md, runs 8 and 9).
CPU_WITHOUT_BF16 = {"vae_share": 0.5, "decoder_share": 0.0}


def preset(name: str, **overrides) -> BaseConfig:
    """A `BaseConfig` from a preset ("cpu", "gpu", "tiny") with field overrides; "cpu" takes the
    shares of `CPU_WITHOUT_BF16` on a CPU without native bf16."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} (got {name!r})")
    values = dict(PRESETS[name])
    if name == "cpu" and not cpu_has_native_bf16():
        values |= CPU_WITHOUT_BF16
    return replace(BaseConfig(), **{**values, **overrides})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `easel train base` and `python -m easel.training.tinyshapes.recipe`."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", default=BaseConfig.out_dir, help="run folder (resumes if present)")
    parser.add_argument("--max-minutes", type=float, help="wall-clock budget, all stages")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int, help="the denoiser's batch")
    parser.add_argument("--vae-batch-size", type=int, help="the autoencoder's batch")
    parser.add_argument("--latent-channels", type=int, help="autoencoder latent channels (4)")
    parser.add_argument("--vae-share", type=float, help="share of the budget for the autoencoder")
    parser.add_argument(
        "--decoder-share", type=float, help="share of the budget for the decoder tune (0: none)"
    )
    parser.add_argument(
        "--hard-share",
        type=float,
        help="share of the denoiser's scenes redrawn with small objects, stars and crosses (0)",
    )
    parser.add_argument("--no-bf16", action="store_true", help="train in float32")


def config_from_args(args: argparse.Namespace) -> BaseConfig:
    overrides = {
        "out_dir": args.out,
        "max_minutes": args.max_minutes,
        "device": args.device,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "vae_batch_size": args.vae_batch_size,
        "latent_channels": args.latent_channels,
        "vae_share": args.vae_share,
        "decoder_share": args.decoder_share,
        "hard_share": args.hard_share,
    }
    if args.no_bf16:
        overrides["bf16"] = False
    names = {f.name for f in fields(BaseConfig)}
    return preset(
        args.preset, **{k: v for k, v in overrides.items() if v is not None and k in names}
    )
