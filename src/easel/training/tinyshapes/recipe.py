"""Train the bundled `tiny-shapes` model from scratch: `train_base(config, on_step, is_canceled)`.

Three stages, each one visible loop with a wall-clock budget (the learning rate follows the
elapsed fraction of the budget, so a run ends on time whatever the machine's speed):

1. an `AutoencoderKL` (64x64x3 images <-> 16x16x4 latents) trained on rendered scenes and
   mosaics of their objects;
2. a `UNet2DConditionModel` and a `CLIPTextModel`, trained jointly from scratch on the frozen VAE's
   latents, each encoded once and drawn about four times (`LatentPool`; v-prediction, 10 %
   empty captions for classifier-free guidance, an EMA copy kept, and an `AttributeProbe` loss
   that keeps every attribute word legible in the text encoder);
3. the VAE's decoder alone, encoder frozen, for crisper small shapes (`decoder.tune_decoder`).

The result is a `StableDiffusionPipeline` folder (`<out>/pipeline`) that plain
`StableDiffusionPipeline.from_pretrained` loads. Along the way it writes step-stamped checkpoints
(`<out>/checkpoints`, resumed automatically), sample grids (`<out>/samples`), `loss.png` and
`summary.json`. The settings are a `config.BaseConfig`; the loop pieces every recipe shares
(checkpoints, stage bookkeeping, optimizer, schedule, precision) come from `easel.training.loop`.

This module imports only torch, diffusers, transformers, tokenizers, numpy, PIL, matplotlib, tqdm
and easel.training / easel.domain, so it also runs as a script on a bare GPU machine::

    python -m easel.training.tinyshapes.recipe --preset gpu --out runs/gpu --max-minutes 7
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from easel.domain import MODEL_DEFAULTS_FILE, InvalidParams
from easel.engine.guidance import end_guidance_args
from easel.engine.schedulers import make_scheduler
from easel.imaging import image_grid
from easel.models.hardware import cpu_has_native_bf16
from easel.training.loop import (
    Checkpoints,
    StageLog,
    StageRun,
    TrainStep,
    adamw,
    autocast,
    lr_factor,
    pick_device,
    prefetched,
    save_loss_plot,
    training_attention,
    with_native_precision,
)
from easel.training.tinyshapes.config import BaseConfig, add_arguments, config_from_args
from easel.training.tinyshapes.data import (
    COLOURS,
    HELD_OUT,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneStream,
    ShapeObject,
    caption,
    parse_prompt,
    render,
    to_pil,
)
from easel.training.tinyshapes.decoder import reconstruction_loss, tune_decoder
from easel.training.tinyshapes.tokenizer import MAX_LENGTH, train_tokenizer

# Prompts in every sample grid: held-out combinations first, then seen ones and two objects.
SAMPLE_PROMPTS = [
    caption(Scene((ShapeObject(shape, colour),), background))
    for colour, shape, background in HELD_OUT[:5]
] + [
    "a big green star on a black background",
    "a small pink triangle on the left on a blue background",
    "a red circle and a blue square on a white background",
]


# --- building blocks ----------------------------------------------------------------------------


# What `AttributeProbe` reads: the background, then per object slot its shape, colour, size and
# position, each with a last class "no such object" (a one-object scene's second slot).
OBJECT_ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("shape", SHAPES),
    ("colour", tuple(COLOURS)),
    ("size", tuple(SIZES)),
    ("position", tuple(POSITIONS)),
)
ATTRIBUTE_CLASSES: tuple[int, ...] = (len(COLOURS),) + tuple(
    len(values) + 1 for _ in range(2) for _, values in OBJECT_ATTRIBUTES
)


def attribute_labels(scenes: list[Scene], kept: list[bool]) -> torch.Tensor:
    """(batch, len(ATTRIBUTE_CLASSES)) class indices of each scene's attributes; rows whose
    caption was dropped are -100 (ignored by the loss: an empty caption says nothing)."""
    rows = []
    for scene, keep in zip(scenes, kept, strict=True):
        row = [list(COLOURS).index(scene.background)]
        for slot in range(2):
            obj = scene.objects[slot] if slot < len(scene.objects) else None
            for name, values in OBJECT_ATTRIBUTES:
                row.append(values.index(getattr(obj, name)) if obj else len(values))
        rows.append(row if keep else [-100] * len(row))
    return torch.tensor(rows)


class AttributeProbe(torch.nn.Module):
    """Linear heads that read every scene attribute from the mean of the text encoder's output.
    Its cross-entropy, added to the denoiser loss, keeps the words that pick an attribute apart
    in what the UNet sees: run 3 of the CPU retrain lost the position words ("left" and "right"
    came out nearly alike) while its loss fell (docs/TRAINING-LOG.md). Training only, never exported."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = torch.nn.Linear(width, sum(ATTRIBUTE_CLASSES))

    def logits(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One (batch, classes) tensor per attribute, in `ATTRIBUTE_CLASSES` order."""
        return self.linear(context.float().mean(dim=1)).split(ATTRIBUTE_CLASSES, dim=1)

    def loss(self, context: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = [
            F.cross_entropy(part, labels[:, i]) for i, part in enumerate(self.logits(context))
        ]
        return torch.stack(losses).mean()


def build_vae(config: BaseConfig) -> AutoencoderKL:
    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=min(32, config.vae_channels[0]),
        sample_size=IMAGE_SIZE,
    )


def build_text_encoder(config: BaseConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_width,
            intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=max(1, config.text_width // 32),
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def latent_size(config: BaseConfig) -> int:
    """The side of the autoencoder's latents: each level after the first halves the image."""
    return IMAGE_SIZE // 2 ** (len(config.vae_channels) - 1)


def build_unet(config: BaseConfig, size: int) -> UNet2DConditionModel:
    """The denoiser for latents of side ``size`` (`latent_size`)."""
    attention = config.unet_attention
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=config.unet_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]),
        layers_per_block=1,
        cross_attention_dim=config.text_width,
        attention_head_dim=8,
        norm_num_groups=min(32, config.unet_channels[0]),
    )


def noise_schedule() -> DDPMScheduler:
    """Stable Diffusion's training schedule, with v-prediction (robust at few sampling steps)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
    )


SAMPLER = "dpmpp_2m"  # the engine's name for the sampler the samples and the shipped folder use


def sampling_scheduler() -> DPMSolverMultistepScheduler:
    """`SAMPLER` on the training noise schedule, with trailing timesteps (sampling starts at the
    pure-noise end): what the run's sample grids use and the exported folder's scheduler holds."""
    sampler = make_scheduler(SAMPLER, noise_schedule().config)
    return DPMSolverMultistepScheduler.from_config(
        sampler.config,
        timestep_spacing="trailing",
        steps_offset=1,  # unused with trailing spacing; SD pipelines warn unless it is 1
    )


def tokenize(tokenizer: CLIPTokenizer, captions: list[str], device: torch.device) -> torch.Tensor:
    """Token ids exactly as `StableDiffusionPipeline` makes them (padded to the max length)."""
    ids = tokenizer(
        captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)


@torch.no_grad()
def scaled_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """What the denoiser learns to make: the posterior mean times the scaling factor, the same
    latents `latent_scale` measured (a briefly trained VAE can still have a wide posterior whose
    samples are far off scale)."""
    return vae.encode(images).latent_dist.mode().float() * vae.config.scaling_factor


def denoiser_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    context: torch.Tensor,
    min_snr_gamma: float,
) -> torch.Tensor:
    """The v-prediction loss at random timesteps, with Min-SNR weighting for v-prediction:
    min(snr, gamma) / (snr + 1) per image (Hang et al. 2023)."""
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, context).sample.float()
    alphas_cumprod = scheduler.alphas_cumprod.to(latents.device)[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight = snr.clamp(max=min_snr_gamma) / (snr + 1)
    return (weight * (prediction - target).pow(2).mean(dim=(1, 2, 3))).mean()


class LatentPool:
    """The denoiser's training examples: the most recent `capacity` scenes with their latents,
    drawn at random. Encoding a batch took a fifth of a denoiser step on 2 cores, so the loop
    encodes only batch_size / latent_reuse new scenes a step and each is drawn about
    `latent_reuse` times (with fresh noise, timestep and caption wording each time)."""

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.scenes: list[Scene] = []
        self.latents: list[torch.Tensor] = []
        self.oldest = 0  # once full, the slot the next scene replaces
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.scenes)

    def add(self, scenes: list[Scene], latents: torch.Tensor) -> None:
        for scene, latent in zip(scenes, latents, strict=True):
            if len(self.scenes) < self.capacity:
                self.scenes.append(scene)
                self.latents.append(latent)
            else:
                self.scenes[self.oldest], self.latents[self.oldest] = scene, latent
                self.oldest = (self.oldest + 1) % self.capacity

    def draw(self, count: int) -> tuple[list[Scene], torch.Tensor]:
        """`count` distinct examples (all of them if the pool holds fewer)."""
        picks = torch.randperm(len(self.scenes), generator=self.generator)[:count].tolist()
        return [self.scenes[i] for i in picks], torch.stack([self.latents[i] for i in picks])


def make_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def save_samples(pipeline: StableDiffusionPipeline, config: BaseConfig, path: Path) -> None:
    """Real renders (odd rows) above the model's images (even rows) for `SAMPLE_PROMPTS`."""
    device = pipeline.unet.device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    pipeline.set_progress_bar_config(disable=True)
    with autocast(device, config.bf16):
        images = pipeline(
            SAMPLE_PROMPTS,
            num_inference_steps=config.sample_steps,
            guidance_scale=config.guidance_scale,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            generator=generator,
            **end_guidance_args(config.guidance_end),
        ).images
    real = to_pil(render([parse_prompt(p) for p in SAMPLE_PROMPTS]))
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(real + images, columns=len(SAMPLE_PROMPTS)).save(path)


# --- stages 1 and 2 (stage 3, the decoder tune, is in decoder.py) -------------------------------


def train_vae(
    config: BaseConfig,
    device: torch.device,
    checkpoints: Checkpoints,
    budget_s: float,
    log: StageLog,
    on_step: Callable[[TrainStep], None] | None,
    is_canceled: Callable[[], bool] | None,
) -> tuple[AutoencoderKL, float]:
    """Stage 1: the autoencoder, on freshly rendered scenes, half of each batch tiled into
    mosaics of object crops (`SceneStream.mosaics`); L1 + edge L1 + MSE + tiny KL. Returns it
    frozen, with the seconds the stage took over all sessions."""
    # 1. build or resume
    vae = build_vae(config).to(device)
    optimizer = adamw(vae.parameters(), config.vae_lr, 0.0, device)
    parts = {"model": vae, "optimizer": optimizer}
    step, elapsed_before = checkpoints.resume("vae", parts, log)
    stream = SceneStream(seed=config.seed + step, device=device)
    batches = prefetched(
        lambda: stream.autoencoder_images(config.vae_batch_size, config.vae_mosaic_share), device
    )

    def save() -> None:
        checkpoints.save_stage("vae", step, parts, run.elapsed(), log)

    # 2. the loop
    run = StageRun(
        "vae",
        config,
        budget_s=budget_s,
        max_steps=config.vae_max_steps,
        batch_size=config.vae_batch_size,
        step=step,
        elapsed_before=elapsed_before,
        log=log,
        on_step=on_step,
        is_canceled=is_canceled,
    )
    vae.train()
    while not run.done:
        images = next(batches)
        lr = config.vae_lr * lr_factor(step, run.fraction, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, config.bf16):
            posterior = vae.encode(images).latent_dist
            decoded = vae.decode(posterior.sample()).sample.float()
        loss = (
            reconstruction_loss(decoded, images, edge_weight=config.vae_edge_weight)
            + config.vae_kl_weight * posterior.kl().mean()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()

        # 3. bookkeeping: progress, throughput, checkpoints, cancellation
        step += 1
        run.record(step, loss.item(), lr, save)
    run.close()
    return vae.eval().requires_grad_(False), run.elapsed()


def train_unet(
    config: BaseConfig,
    device: torch.device,
    checkpoints: Checkpoints,
    budget_s: float,
    log: StageLog,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    out_dir: Path,
    on_step: Callable[[TrainStep], None] | None,
    is_canceled: Callable[[], bool] | None,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Stage 2: denoiser and text encoder, jointly, on frozen VAE latents. Returns the EMA copies."""
    # 1. build or resume
    unet = build_unet(config, latent_size(config)).to(device)
    text_encoder = build_text_encoder(config, tokenizer).to(device)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    probe = AttributeProbe(config.text_width).to(device)
    trained = [*unet.parameters(), *text_encoder.parameters()]
    ema_params = [*ema_unet.parameters(), *ema_text.parameters()]
    params = [*trained, *probe.parameters()]  # the probe is optimised too, but has no EMA copy
    optimizer = adamw(params, config.lr, 0.01, device)
    scheduler = noise_schedule()
    parts = {
        "unet": unet,
        "text_encoder": text_encoder,
        "ema_unet": ema_unet,
        "ema_text": ema_text,
        "probe": probe,
        "optimizer": optimizer,
    }
    step, elapsed_before = checkpoints.resume("unet", parts, log)
    stream = SceneStream(
        seed=config.seed + 1_000_003 + step, device=device, hard_share=config.hard_share
    )
    pool = LatentPool(config.latent_pool, seed=config.seed + step)
    caption_rng = random.Random(config.seed + step)

    def encode_new(count: int) -> None:
        batch = stream.batch(count)
        with autocast(device, config.bf16):
            pool.add(batch.scenes, scaled_latents(vae, batch.images))

    def make_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents from the pool, each with a newly worded caption (10 % left empty)."""
        encode_new(max(1, config.batch_size // config.latent_reuse))
        scenes, latents = pool.draw(config.batch_size)
        kept = [caption_rng.random() >= config.caption_dropout for _ in scenes]
        captions = [
            caption(scene, caption_rng) if keep else ""
            for scene, keep in zip(scenes, kept, strict=True)
        ]
        labels = attribute_labels(scenes, kept).to(device)
        return latents, tokenize(tokenizer, captions, device), labels

    def save() -> None:
        checkpoints.save_stage("unet", step, parts, run.elapsed(), log)

    # 2. the loop
    run = StageRun(
        "unet",
        config,
        budget_s=budget_s,
        max_steps=config.max_steps,
        batch_size=config.batch_size,
        step=step,
        elapsed_before=elapsed_before,
        log=log,
        on_step=on_step,
        is_canceled=is_canceled,
    )
    while len(pool) < config.latent_pool and not run.done:  # a full pool first (6 s on 2 cores)
        encode_new(config.batch_size)
    last_sample = time.monotonic()
    unet.train()
    text_encoder.train()
    while not run.done:
        latents, token_ids, labels = make_batch()
        lr = config.lr * lr_factor(step, run.fraction, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, config.bf16), training_attention(device):
            context = text_encoder(token_ids)[0]
            loss = denoiser_loss(unet, scheduler, latents, context, config.min_snr_gamma)
        probe_loss = probe.loss(context, labels)
        optimizer.zero_grad(set_to_none=True)
        (loss + config.attribute_weight * probe_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, trained, 1 - decay)

        # 3. bookkeeping (progress, throughput, checkpoints, cancellation), then samples
        step += 1
        run.record(step, loss.item(), lr, save)
        if time.monotonic() - last_sample >= config.sample_every_minutes * 60 and not run.done:
            pipeline = make_pipeline(vae, ema_text, tokenizer, ema_unet)
            save_samples(pipeline, config, out_dir / "samples" / f"unet-step{step:07d}.png")
            last_sample = time.monotonic()
    run.close()
    return ema_unet, ema_text


# --- the whole run ------------------------------------------------------------------------------


def train_base(
    config: BaseConfig,
    *,
    on_step: Callable[[TrainStep], None] | None = None,
    is_canceled: Callable[[], bool] | None = None,
) -> Path:
    """Train tiny-shapes from scratch (or resume a run in `config.out_dir`); returns the folder of
    the saved `StableDiffusionPipeline`.

    Example: ``train_base(preset("cpu", out_dir="runs/ts"))`` then
    ``StableDiffusionPipeline.from_pretrained("runs/ts/pipeline")``.
    Raises `easel.domain.Canceled` (after saving a checkpoint) when `is_canceled()` turns true.
    """
    # 1. set up: device, seeds, output folders, tokenizer
    started = time.monotonic()
    device = pick_device(config.device)
    config = with_native_precision(config, device)
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    checkpoints = Checkpoints(out_dir / "checkpoints", config.keep_checkpoints)
    tokenizer = train_tokenizer(out_dir / "tokenizer")
    logs = {"vae": StageLog(), "unet": StageLog()}
    budget_s = config.max_minutes * 60
    precision = "bf16 autocast" if config.bf16 else "float32"
    tqdm.write(
        f"training tiny-shapes on {device} ({precision}), budget {config.max_minutes:.1f} min "
        f"-> {out_dir}"
    )
    if device.type == "cpu" and not cpu_has_native_bf16():
        tqdm.write(
            "  no native bf16 on this CPU (AMX / AVX512-BF16): on a 2-core AVX2 CPU the steps ran "
            "2-4x slower than on the reference one, so the budget trains a weaker model "
            "(docs/TRAINING-LOG.md)"
        )

    # 2. stage 1: autoencoder; its latents' spread sets the scaling factor (SD's 0.18215 trick)
    vae, vae_seconds = train_vae(
        config, device, checkpoints, budget_s * config.vae_share, logs["vae"], on_step, is_canceled
    )
    vae.register_to_config(scaling_factor=latent_scale(vae, config, device))
    save_loss_plot(logs, out_dir / "loss.png")

    # 3. stage 2: denoiser + text encoder, with what is left of the budget
    decoder_budget = budget_s * config.decoder_share
    unet_budget = budget_s - vae_seconds - decoder_budget - export_reserve_s(config)
    unet, text_encoder = train_unet(
        config, device, checkpoints, max(unet_budget, 1.0), logs["unet"], vae, tokenizer,
        out_dir, on_step, is_canceled,
    )  # fmt: skip

    # 4. stage 3: the decoder alone (the encoder, and so the denoiser's latents, stay)
    if config.decoder_share > 0:
        logs["decoder"] = StageLog()
        tune_decoder(
            vae, config, device, budget_s=decoder_budget, log=logs["decoder"],
            checkpoints=checkpoints, on_step=on_step, is_canceled=is_canceled,
        )  # fmt: skip

    # 5. export: the pipeline folder (fp16 weights keep it small), a last sample grid and loss plot
    pipeline = make_pipeline(vae, text_encoder, tokenizer, unet)
    save_samples(pipeline, config, out_dir / "samples.png")
    save_loss_plot(logs, out_dir / "loss.png")
    pipeline_dir = export_pipeline(
        pipeline, out_dir / "pipeline", out_dir / "tokenizer", sampling_defaults(config)
    )
    summary = {
        "device": str(device),
        "minutes": (time.monotonic() - started) / 60,
        "params": {
            "unet": sum(p.numel() for p in unet.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
        },
        **{
            f"{stage}_{key}": value
            for stage, log in logs.items()
            for key, value in {
                "steps": log.steps[-1] if log.steps else 0,
                "final_loss": sum(log.losses[-100:]) / max(1, len(log.losses[-100:])),
                "images_per_s": log.images_per_s,
            }.items()
        },
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    tqdm.write(json.dumps(summary))
    return pipeline_dir


def export_reserve_s(config: BaseConfig) -> float:
    """Time kept back from stage 2 for set-up, the final samples and the export."""
    return min(30.0, config.max_minutes * 60 * 0.05)


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, config: BaseConfig, device: torch.device) -> float:
    images = SceneStream(seed=config.seed + 7, device=device).batch(64).images
    with autocast(device, config.bf16):
        latents = vae.encode(images).latent_dist.mode().float()
    return float(1.0 / latents.std())


def sampling_defaults(config: BaseConfig) -> dict[str, int | float | str]:
    """The request defaults a trained folder carries (its easel.json): the settings the run's
    samples are drawn with, at the native size, allowing half to twice that size."""
    return {
        "width": IMAGE_SIZE,
        "height": IMAGE_SIZE,
        "num_inference_steps": config.sample_steps,
        "guidance_scale": config.guidance_scale,
        "guidance_end": config.guidance_end,
        "scheduler": SAMPLER,
        "min_size": IMAGE_SIZE // 2,
        "max_size": IMAGE_SIZE * 2,
    }


# `easel train lora`'s defaults for this model (easel.json's ``train_lora``): the shapes it draws
# as prior words, which a new shape must leave alone, with the text encoder's LoRA, the steps
# and the saved strength that keep them apart (docs/TRAINING.md)
LORA_DEFAULTS = {
    "steps": 900,
    "train_text_encoder": True,
    "prior_words": list(SHAPES),
    "export_scale": 1.05,
}


def export_pipeline(
    pipeline: StableDiffusionPipeline, folder: Path, tokenizer_dir: Path, defaults: dict
) -> Path:
    """Save with fp16 weights (half the size); configs still say float32, so a plain
    `from_pretrained` loads the model in float32. ``defaults`` go to easel.json, so Easel
    samples the folder with its recipe's settings, not its family's, and fine-tunes it with
    `LORA_DEFAULTS`."""
    half = copy.deepcopy(pipeline).to(torch.float16)
    half.save_pretrained(folder, safe_serialization=True)
    # diffusers loads fp16 files into the models' default float32; transformers follows the
    # config's dtype, so say float32 there too (or the text encoder alone would come back fp16).
    config_path = folder / "text_encoder" / "config.json"
    text_config = json.loads(config_path.read_text())
    text_config["dtype"] = "float32"
    config_path.write_text(json.dumps(text_config, indent=2))
    # The classic CLIP files too, for transformers versions that do not read tokenizer.json.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, folder / "tokenizer" / name)
    model_file = {"defaults": defaults, "train_lora": LORA_DEFAULTS}
    (folder / MODEL_DEFAULTS_FILE).write_text(json.dumps(model_file, indent=2) + "\n")
    return folder


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m easel.training.tinyshapes.recipe", description=__doc__
    )
    add_arguments(parser)
    try:
        config = config_from_args(parser.parse_args(argv))
    except InvalidParams as exc:
        parser.error(exc.message)  # one line and exit code 2, as `easel train base`
    folder = train_base(config)
    print(f"saved {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
