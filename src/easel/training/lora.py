"""Fine-tune a model with LoRA on a folder of captioned images: `train_lora(config, ...)`.

    >>> result = train_lora(LoraConfig(model="tiny-shapes", dataset="data/hexagons",
    ...                                out_dir="runs/hex", name="hexagon", trigger="sks"))
    >>> result.lora_file        # diffusers' LoRA format: pipe.load_lora_weights(...) reads it

One loop for every family diffusers can train (SD 1.x/2.x, SDXL, Z-Image, Flux): LoRA layers
(peft) on the denoiser's attention projections, optionally on the CLIP text encoder(s). What
differs per family — how text and images are encoded and what the denoiser is asked to predict
— sits in a small class per family below (`_Sd`, `_Flux`, `_ZImage`); the loop reads the same for
all. Latents and text embeddings are computed once when their encoders are frozen.

Along the way, in ``config.out_dir``: step-stamped checkpoints (a killed run resumes from the
newest), sample grids every ``sample_every`` steps (`samples/step000100.png`) with a held-out
loss, `loss.png`, `best.safetensors` (the LoRA at the lowest held-out loss), `summary.json`,
and at the end the LoRA itself, `<name>.safetensors`.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from PIL import Image

from easel.config import Settings
from easel.datasets import load_dataset
from easel.domain import InvalidParams
from easel.engine.guidance import end_guidance_args
from easel.imaging import image_grid
from easel.models.catalog import ModelCatalog
from easel.models.families import get_family
from easel.models.loader import ModelManager
from easel.models.loras import check_text_encoder_family
from easel.models.params import defaults_for, effective_family
from easel.training.loop import (
    Checkpoints,
    StageLog,
    StageRun,
    TrainStep,
    adamw,
    autocast,
    lr_factor,
    pick_device,
    save_loss_plot,
    training_attention,
    with_native_precision,
)
from easel.training.lora_config import LoraConfig

if TYPE_CHECKING:
    from peft.tuners.tuners_utils import BaseTunerLayer

CLIP_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "out_proj"]
HELDOUT_DRAWS = 4  # noise/timestep draws per held-out image, fixed across the run


@dataclass
class Samples:
    """What `on_sample` receives every ``sample_every`` steps (and at the end)."""

    step: int
    images: list[Image.Image]
    prompts: list[str]
    heldout_loss: float | None


@dataclass
class LoraResult:
    lora_file: Path  # <out_dir>/<name>.safetensors
    best_file: Path | None  # the LoRA at the lowest held-out loss, when there was one
    family: str
    base_model: str
    steps: int
    final_loss: float
    best_step: int | None
    heldout: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


# --- families: what is encoded how, and what the denoiser predicts ------------------------------


class _Family:
    """The per-family part of the loop. ``denoiser_name`` is the pipeline attribute holding the
    trained model ("unet" or "transformer")."""

    denoiser_name = "unet"
    text_encoder_names: tuple[str, ...] = ()
    # what LoRA layers go on by default: diffusers' attention projections, in every family
    default_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe: DiffusionPipeline, device: torch.device):
        self.pipe, self.device = pipe, device

    @property
    def denoiser(self) -> torch.nn.Module:
        module: torch.nn.Module = getattr(self.pipe, self.denoiser_name)
        return module

    def targets(self, text_only: bool = False) -> list[str]:
        """Names (or name suffixes) of the denoiser's modules that get LoRA layers by default.
        ``text_only`` (prior words) asks for only those whose input depends on the text; a
        transformer's attention projections all qualify, so here it changes nothing."""
        return list(self.default_targets)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents of images in [-1, 1] (the posterior mean, as the loss target)."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def encode_text(self, captions: list[str]) -> list[Any]:
        """One conditioning item per caption (tensors without a batch dimension)."""
        raise NotImplementedError

    def noise(self, latents: torch.Tensor, generator: torch.Generator) -> _Noised:
        """``latents`` noised at random levels drawn from ``generator``, with the target."""
        raise NotImplementedError

    def predict(self, noised: _Noised, conds: list[Any]) -> torch.Tensor:
        """The denoiser's prediction, shaped like ``noised.target``."""
        raise NotImplementedError

    def weigh(self, losses: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Per-image losses weighted by noise level (as they are, unless a family says)."""
        return losses


@dataclass
class _Noised:
    """One step's latents after noising: the denoiser's input, the noise levels (B,) and the
    target it is trained towards. ``noised[a:b]`` is a part of the batch."""

    noisy: torch.Tensor
    level: torch.Tensor
    target: torch.Tensor

    def __getitem__(self, part: slice) -> _Noised:
        return _Noised(self.noisy[part], self.level[part], self.target[part])


def _losses(adapter: _Family, noised: _Noised, conds: list[Any]) -> torch.Tensor:
    """Per-image loss (B,): the prediction's squared error, weighted as the family says."""
    return adapter.weigh(_mse(adapter.predict(noised, conds), noised.target), noised.level)


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image (B,), in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


class _Sd(_Family):
    """SD 1.x/2.x and SDXL: a UNet trained with DDPM noise, predicting what the scheduler's
    ``prediction_type`` says (epsilon or v). Its LoRA covers the transformer blocks' attention
    and feed-forward layers and the ResNets' convolutions (`targets`); with attention alone,
    tiny-shapes drew a taught hexagon in new colours 42 % of the time, with these 80 %
    (docs/TRAINING.md)."""

    default_targets = (
        *_Family.default_targets,
        "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    )  # fmt: skip

    def __init__(
        self, pipe: DiffusionPipeline, device: torch.device, xl: bool, min_snr_gamma: float
    ):
        super().__init__(pipe, device)
        self.xl, self.min_snr_gamma = xl, min_snr_gamma
        self.text_encoder_names = ("text_encoder", "text_encoder_2") if xl else ("text_encoder",)
        self.schedule = DDPMScheduler.from_config(pipe.scheduler.config)

    def targets(self, text_only: bool = False) -> list[str]:
        """The attention and feed-forward layers and the ResNets' convolutions; with
        ``text_only``, not the convolutions of the ResNets that run before the UNet's first
        cross-attention, whose input carries no text: what a LoRA learns there changes every
        prompt alike, which prior words forbid (tiny-shapes' hexagon under prior words: 72.5 %
        hexagons and -3.9 points on plain prompts without those convolutions, 77.5 % and -5.5
        with them; docs/TRAINING-LOG.md, runs 38 and 43)."""
        if not text_only:
            return list(self.default_targets)
        from diffusers.models.resnet import ResnetBlock2D

        unet, blind = self.denoiser, set()
        for i, block in enumerate(unet.down_blocks):
            if getattr(block, "has_cross_attention", False):
                blind.add(f"down_blocks.{i}.resnets.0")  # its first attention comes after it
                break
            blind.update(f"down_blocks.{i}.resnets.{j}" for j in range(len(block.resnets)))
        resnets = [n for n, m in unet.named_modules() if isinstance(m, ResnetBlock2D)]
        convs = [f"{n}.{conv}" for n in resnets if n not in blind for conv in ("conv1", "conv2")]
        return [t for t in self.default_targets if t not in ("conv1", "conv2")] + convs

    def encode_text(self, captions: list[str]) -> list[Any]:
        if not self.xl:
            embeds = self.pipe.encode_prompt(captions, self.device, 1, False)[0]
            return list(embeds)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=captions, device=self.device, do_classifier_free_guidance=False
        )
        return list(zip(embeds, pooled, strict=True))

    def noise(self, latents, generator):
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        steps = self.schedule.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), generator=generator)
        timesteps = timesteps.to(self.device)
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        if self.schedule.config.prediction_type == "v_prediction":
            return _Noised(noisy, timesteps, self.schedule.get_velocity(latents, noise, timesteps))
        return _Noised(noisy, timesteps, noise)

    def predict(self, noised, conds):
        noisy, timesteps, batch = noised.noisy, noised.level, len(noised.noisy)
        extra = {}
        if self.xl:
            embeds = torch.stack([c[0] for c in conds])
            height, width = (side * self.pipe.vae_scale_factor for side in noisy.shape[-2:])
            time_ids = torch.tensor([height, width, 0, 0, height, width], device=self.device)
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.stack([c[1] for c in conds]),
                "time_ids": time_ids.repeat(batch, 1).to(embeds.dtype),
            }
        else:
            embeds = torch.stack(conds)
        return self.denoiser(noisy, timesteps, embeds, **extra).sample

    def weigh(self, losses, level):
        if not self.min_snr_gamma:
            return losses
        # min(snr, gamma) / snr for epsilon, / (snr + 1) for v
        alphas = self.schedule.alphas_cumprod.to(self.device)[level]
        snr = alphas / (1 - alphas)
        v = self.schedule.config.prediction_type == "v_prediction"
        return losses * snr.clamp(max=self.min_snr_gamma) / (snr + 1 if v else snr)


def _flow_noise(latents: torch.Tensor, generator: torch.Generator) -> _Noised:
    """Rectified flow: a noise level sigma from a logit-normal (SD3's choice), the noisy latents
    (1 - sigma) x0 + sigma noise, and the velocity noise - x0 as the target."""
    sigma = torch.sigmoid(torch.randn(latents.shape[0], generator=generator)).to(latents)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    s = sigma.view(-1, 1, 1, 1)
    return _Noised((1 - s) * latents + s * noise, sigma, noise - latents)


class _Flux(_Family):
    """Flux: a transformer on 2x2-packed latents predicting the velocity noise - x0."""

    denoiser_name = "transformer"

    def encode_text(self, captions: list[str]) -> list[Any]:
        embeds, pooled, text_ids = self.pipe.encode_prompt(captions, None, device=self.device)
        self.text_ids = text_ids
        return list(zip(embeds, pooled, strict=True))

    def noise(self, latents, generator):
        noised = _flow_noise(latents, generator)
        noised.target = self.pipe._pack_latents(noised.target, *latents.shape)
        return noised

    def predict(self, noised, conds):
        pipe, (batch, channels, height, width) = self.pipe, noised.noisy.shape
        transformer = self.denoiser
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.ones(batch, device=self.device)
        prediction: torch.Tensor = transformer(
            hidden_states=pipe._pack_latents(noised.noisy, batch, channels, height, width),
            timestep=noised.level,
            guidance=guidance,
            pooled_projections=torch.stack([c[1] for c in conds]),
            encoder_hidden_states=torch.stack([c[0] for c in conds]),
            txt_ids=self.text_ids,
            img_ids=pipe._prepare_latent_image_ids(
                batch, height // 2, width // 2, self.device, noised.noisy.dtype
            ),
            return_dict=False,
        )[0]
        return prediction


class _ZImage(_Family):
    """Z-Image: a transformer taking lists of latents and of unpadded prompt embeddings; its
    timestep input is 1 - sigma and it predicts x0 - noise (the pipeline negates it)."""

    denoiser_name = "transformer"

    def encode_text(self, captions: list[str]) -> list[Any]:
        embeds, _ = self.pipe.encode_prompt(
            captions, device=self.device, do_classifier_free_guidance=False
        )
        return list(embeds)

    def noise(self, latents, generator):
        noised = _flow_noise(latents, generator)
        noised.target = -noised.target  # x0 - noise
        return noised

    def predict(self, noised, conds):
        outputs = self.denoiser(
            list(noised.noisy.unsqueeze(2).unbind(0)),
            1 - noised.level,
            list(conds),
            return_dict=False,
        )[0]
        return torch.stack(list(outputs)).squeeze(2)


def _family_adapter(
    family: str, pipe: DiffusionPipeline, device: torch.device, config: LoraConfig
) -> _Family:
    if family in ("sd", "sdxl"):
        return _Sd(pipe, device, xl=family == "sdxl", min_snr_gamma=config.min_snr_gamma)
    if family == "flux":
        return _Flux(pipe, device)
    if family == "z-image":
        return _ZImage(pipe, device)
    raise InvalidParams(f"LoRA training does not support the {family} family", field="model")


# --- data ---------------------------------------------------------------------------------------


@dataclass
class _Example:
    caption: str
    latents: torch.Tensor  # (C, h, w)
    cond: Any = None  # cached text conditioning (encoders frozen)


def with_trigger(caption: str, trigger: str) -> str:
    """The caption as trained: the trigger word put in front when the caption lacks it, the
    trigger alone for an image without a caption."""
    caption = caption.strip()
    if not caption:
        return trigger
    if trigger.lower() in caption.lower().split():
        return caption
    return f"{trigger} {caption}"


def check_trigger_tokens(pipe: DiffusionPipeline, trigger: str) -> None:
    """Refuse a trigger the model's tokenizer cannot spell: its unknown pieces become the unknown
    token (on a small vocabulary such as tiny-shapes', "zq" loses its "q"), and the LoRA would
    learn to answer a token every unknown word shares."""
    tokenizer = getattr(pipe, "tokenizer", None)
    unknown = getattr(tokenizer, "unk_token_id", None)
    if tokenizer is None or unknown is None:
        return
    ids = tokenizer(trigger, add_special_tokens=False).input_ids
    if unknown in ids:
        raise InvalidParams(
            f"trigger {trigger!r} has characters this model's tokenizer does not know; pick a "
            "word of common letters (e.g. 'sks')",
            field="trigger",
        )


def load_pixels(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1]: the image scaled so its short side is ``size``, centre crop."""
    with Image.open(path) as image:
        return to_pixels(image, size)


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """`load_pixels` for an image in memory."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    resized = image.resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    array = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8)
    return array.view(size, size, 3).permute(2, 0, 1).float() / 127.5 - 1


def _split_holdout(count: int, share: float, seed: int) -> list[int]:
    """Indices of the held-out images: ``share`` of them, at least one when any are kept and
    at least four remain to train on."""
    if share <= 0 or count < 5:
        return []
    held = max(1, round(count * share))
    return sorted(random.Random(seed).sample(range(count), min(held, count - 4)))


# --- the run ------------------------------------------------------------------------------------


class _Weights:
    """The LoRA layers of the trained modules as one checkpoint part."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules

    def state_dict(self) -> dict[str, Any]:
        from peft.utils import get_peft_model_state_dict

        return {name: get_peft_model_state_dict(m) for name, m in self.modules.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from peft.utils import set_peft_model_state_dict

        for name, module in self.modules.items():
            set_peft_model_state_dict(module, state[name])


@dataclass
class _History:
    """Held-out losses and the best step, checkpointed with the weights."""

    heldout: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.heldout = [tuple(x) for x in state["heldout"]]  # type: ignore[misc]
        self.best_step = state["best_step"]


def train_lora(
    config: LoraConfig,
    *,
    on_step: Callable[[TrainStep], None] | None = None,
    on_sample: Callable[[Samples], None] | None = None,
    is_canceled: Callable[[], bool] | None = None,
    settings: Settings | None = None,
) -> LoraResult:
    """Train a LoRA as ``config`` says; resumes from ``config.out_dir``'s newest checkpoint.

    Raises `easel.domain.Canceled` after saving a checkpoint when ``is_canceled()`` turns true,
    `InvalidParams` for a model or dataset it cannot train on.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    # 1. set up: device, precision, folders, the model in float32 (never the server's cached copy)
    started = time.monotonic()
    settings = settings or Settings()
    device = pick_device(config.device if config.device != "auto" else settings.device)
    config = with_native_precision(config, device)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    catalog = ModelCatalog(settings)
    record = catalog.get(config.model)
    family = effective_family(record, get_family(record.family))
    defaults = defaults_for(record, family)
    if config.sample_steps:
        defaults["num_inference_steps"] = config.sample_steps
    training_settings = settings.model_copy(
        update={"dtype": "float32", "cpu_graphs": False, "cpu_offload": False,
                "device": device.type}
    )  # fmt: skip
    pipe = ModelManager(training_settings, catalog).get_pipeline(config.model).pipeline
    adapter = _family_adapter(family.name, pipe, device, config)
    check_text_encoder_family(config.train_text_encoder, family.name)
    size = config.size or int(defaults.get("width", 512))
    check_trigger_tokens(pipe, config.trigger)

    # 2. data: captions with the trigger, latents (and text embeddings) encoded once
    dataset = load_dataset(Path(config.dataset))
    captions = [with_trigger(item.caption, config.trigger) for item in dataset.items]
    heldout_index = set(_split_holdout(len(captions), config.holdout, config.seed))
    examples: list[_Example] = []
    with torch.no_grad(), autocast(device, config.bf16):
        for index, item in enumerate(dataset.items):
            pixels = load_pixels(item.image, size).unsqueeze(0).to(device)
            examples.append(_Example(captions[index], adapter.encode_images(pixels)[0]))
        if not config.train_text_encoder:
            for example in examples:
                example.cond = adapter.encode_text([example.caption])[0]
    train = [e for i, e in enumerate(examples) if i not in heldout_index]
    heldout = [e for i, e in enumerate(examples) if i in heldout_index]
    prior = _prior_examples(
        config, [e.caption for e in train], adapter, pipe, defaults, size, device, out_dir
    )
    prior += _prior_word_examples(config, train, adapter, device)
    sample_prompts = list(config.sample_prompts) or _default_sample_prompts(config, heldout, train)

    # 3. LoRA layers on the targets (the family's by default); only they learn
    pipe.vae.requires_grad_(False)
    for name in adapter.text_encoder_names:
        getattr(pipe, name).requires_grad_(False)
    adapter.denoiser.requires_grad_(False)
    text_only = bool(config.prior_words)
    lora = dict(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian")
    trained = {adapter.denoiser_name: adapter.denoiser}
    # peft draws the layers' first weights from torch's global generator: seeded here (and put
    # back after), so that the same config trains the same LoRA in any process
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        adapter.denoiser.add_adapter(
            PeftLoraConfig(
                target_modules=list(config.targets or adapter.targets(text_only)), **lora
            )
        )
        if config.train_text_encoder:
            for name in adapter.text_encoder_names:
                # peft itself, not transformers' add_adapter, which wants a newer peft (>= 0.22)
                # than diffusers needs; the layers and their state dict are the same
                inject_adapter_in_model(
                    PeftLoraConfig(target_modules=CLIP_PROJECTIONS, **lora), getattr(pipe, name)
                )
                trained[name] = getattr(pipe, name)
    if config.gradient_checkpointing or (
        config.gradient_checkpointing is None and device.type == "cuda"
    ):
        adapter.denoiser.enable_gradient_checkpointing()
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    lora_layers = _lora_layers(trained.values())
    optimizer = adamw(params, config.learning_rate, 0.0, device)

    # 4. resume from the newest checkpoint, if any
    checkpoints = Checkpoints(out_dir / "checkpoints", config.keep_checkpoints)
    log, history = StageLog(), _History()
    parts = {"lora": _Weights(trained), "optimizer": optimizer, "history": history}
    step, elapsed_before = checkpoints.resume("lora", parts, log)
    draw = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    order = random.Random(config.seed + step)

    def save() -> None:
        checkpoints.save_stage("lora", step, parts, run.elapsed(), log)

    def sample_and_score() -> None:
        loss = _heldout_loss(adapter, heldout, config, device) if heldout else None
        if loss is not None:
            history.heldout.append((step, loss))
            if history.best_step is None or loss <= min(x for _, x in history.heldout):
                history.best_step = step
                _export(pipe, trained, out_dir / "best.safetensors", config.export_scale)
        images = _samples(pipe, sample_prompts, defaults, size, config.seed, device, config.bf16)
        image_grid(images, columns=len(images)).save(
            _mkdir(out_dir / "samples") / f"step{step:06d}.png"
        )
        save_loss_plot_with_heldout(log, history, out_dir / "loss.png")
        if on_sample:
            on_sample(Samples(step, images, sample_prompts, loss))

    # 5. the loop
    run = StageRun(
        "lora", config, budget_s=math.inf, max_steps=config.steps, batch_size=config.batch_size,
        step=step, elapsed_before=elapsed_before, log=log, on_step=on_step,
        is_canceled=is_canceled, checkpoint_every_steps=config.checkpoint_every,
    )  # fmt: skip
    if step == 0 and config.sample_every and not run.done:
        sample_and_score()  # the base model's samples and held-out loss: the "before"
    for module in trained.values():
        module.train()
    while not run.done:
        batch = order.sample(train, min(config.batch_size, len(train)))
        lr = config.learning_rate * lr_factor(step, step / config.steps, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the prior's images alongside, half as many as the dataset's
        picks = order.sample(prior, min(max(1, config.batch_size // 2), len(prior)))
        with autocast(device, config.bf16), training_attention(device):
            latents, conds = _inputs(adapter, batch + picks, config)
            noised = adapter.noise(latents, draw)
            if picks:
                _base_targets(adapter, noised[len(batch) :], picks, config, lora_layers)
            losses = _losses(adapter, noised, conds)
            loss = losses[: len(batch)].mean()
            if picks:
                loss = loss + config.prior_weight * losses[len(batch) :].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

        # bookkeeping (progress, checkpoints, cancellation), then samples and held-out loss
        step += 1
        if config.sample_every and (step % config.sample_every == 0 or step == config.steps):
            for module in trained.values():
                module.eval()
            sample_and_score()
            for module in trained.values():
                module.train()
        run.record(step, loss.item(), lr, save)
    run.close()

    # 6. export: the LoRA in diffusers' format, the loss plot, a summary
    lora_file = _export(pipe, trained, out_dir / f"{config.name}.safetensors", config.export_scale)
    save_loss_plot_with_heldout(log, history, out_dir / "loss.png")
    best = out_dir / "best.safetensors"
    result = LoraResult(
        lora_file=lora_file,
        best_file=best if best.exists() else None,
        family=family.name,
        base_model=record.id,
        steps=step,
        final_loss=sum(log.losses[-50:]) / max(1, len(log.losses[-50:])),
        best_step=history.best_step,
        heldout=list(history.heldout),
        seconds=time.monotonic() - started,
    )
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


# --- pieces of the run --------------------------------------------------------------------------


def _default_sample_prompts(
    config: LoraConfig, heldout: list[_Example], train: list[_Example]
) -> list[str]:
    """Held-out captions first (what the LoRA has not seen), then training ones: four in all."""
    prompts = [e.caption for e in heldout[:2]] + [e.caption for e in train]
    unique = list(dict.fromkeys(prompts))
    return unique[:4] or [config.trigger]


def swap_trigger(caption: str, trigger: str, word: str = "") -> str:
    """The caption with ``word`` in the trigger's place ("a big red sks" -> "a big red circle"),
    or with the trigger taken out (what the base model is asked for the prior)."""
    words = (word if w.lower() == trigger.lower() else w for w in caption.split())
    return " ".join(w for w in words if w)


def _prior_word_examples(
    config: LoraConfig, train: list[_Example], adapter: _Family, device: torch.device
) -> list[_Example]:
    """Prior words: each training image again under each word in the trigger's place, trained
    towards the base model's prediction (`_base_targets`). Asking for no change on the very
    pictures that teach the change leaves the LoRA one way to tell them apart, the trigger's
    text: on tiny-shapes the five shape words (with the text-encoder LoRA, 900 steps, saved at
    1.05: its defaults) took the drift of the model's usual prompts from 21-27 points to 4-5,
    keeping 82-84 % of the new shape (docs/TRAINING-LOG.md, runs 30-51)."""
    examples = []
    with torch.no_grad(), autocast(device, config.bf16):
        for example in train:
            for word in config.prior_words:
                caption = swap_trigger(example.caption, config.trigger, word)
                cond = None if config.train_text_encoder else adapter.encode_text([caption])[0]
                examples.append(_Example(caption, example.latents, cond))
    return examples


def _prior_examples(
    config: LoraConfig,
    captions: list[str],
    adapter: _Family,
    pipe: DiffusionPipeline,
    defaults: dict[str, Any],
    size: int,
    device: torch.device,
    out_dir: Path,
) -> list[_Example]:
    """Prior preservation: images by the base model (made once, kept in ``out_dir/prior`` for a
    resumed run) of ``prior_prompts``, or of each training caption without the trigger; encoded
    like the dataset and trained on with their prompts, towards the base model's prediction
    (`_base_targets`)."""
    if config.prior_prompts:
        count = len(config.prior_prompts)
        prompts = [config.prior_prompts[i % count] for i in range(config.prior_images)]
    elif config.prior:
        prompts = [p for c in captions if (p := swap_trigger(c, config.trigger))]
    else:
        return []
    folder = _mkdir(out_dir / "prior")
    examples = []
    with torch.no_grad(), autocast(device, config.bf16):
        conds = adapter.encode_text(list(dict.fromkeys(prompts)))
        cond_of = dict(zip(dict.fromkeys(prompts), conds, strict=True))
        for index, prompt in enumerate(prompts):
            file = folder / f"{index:04d}.png"
            if not file.exists():  # the seed follows the index: a resumed run makes the same
                image = _samples(pipe, [prompt], defaults, size, 10_000 + index, device, False)[0]
                image.save(file.with_suffix(".tmp.png"))
                file.with_suffix(".tmp.png").replace(file)
            latents = adapter.encode_images(load_pixels(file, size).unsqueeze(0).to(device))[0]
            examples.append(_Example(prompt, latents, cond_of[prompt]))
    return examples


def _inputs(
    adapter: _Family, examples: list[_Example], config: LoraConfig
) -> tuple[torch.Tensor, list[Any]]:
    """The latents and text conditioning of ``examples``."""
    return torch.stack([e.latents for e in examples]), _conds(adapter, examples, config)


def _conds(adapter: _Family, examples: list[_Example], config: LoraConfig) -> list[Any]:
    """The text conditioning of ``examples``: cached, or encoded now when the text encoder
    learns (through its LoRA as it is at the time)."""
    if config.train_text_encoder:
        return adapter.encode_text([e.caption for e in examples])
    return [e.cond for e in examples]


@torch.no_grad()
def _base_targets(
    adapter: _Family,
    noised: _Noised,
    picks: list[_Example],
    config: LoraConfig,
    lora_layers: list[BaseTunerLayer],
) -> None:
    """Prior preservation: the prior's targets become what the model without its LoRA predicts
    at the same noise, so that there the LoRA is asked to change nothing. DreamBooth's target,
    the noise itself, asks the LoRA to denoise the prior's images better than the base model
    does, and drifted two to four times as far on tiny-shapes (docs/TRAINING-LOG.md, runs
    18-25). Sets ``noised.target`` in place."""
    with _lora_off(lora_layers):
        conds = _conds(adapter, picks, config)
        noised.target.copy_(adapter.predict(noised, conds).to(noised.target.dtype))


def _lora_layers(modules: Iterable[torch.nn.Module]) -> list[BaseTunerLayer]:
    """The LoRA layers in ``modules``, found once for the run rather than at every step."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def _lora_off(layers: list[BaseTunerLayer]) -> Iterator[None]:
    """The base model: ``layers`` bypassed."""
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@torch.no_grad()
def _heldout_loss(
    adapter: _Family, heldout: list[_Example], config: LoraConfig, device: torch.device
) -> float:
    """The loss on the held-out images at fixed noise and noise levels (the same draws at every
    call), so the numbers of one run compare step to step."""
    generator = torch.Generator().manual_seed(config.seed + 99)
    total = 0.0
    with autocast(device, config.bf16):
        for _ in range(HELDOUT_DRAWS):
            latents, conds = _inputs(adapter, heldout, config)
            total += _losses(adapter, adapter.noise(latents, generator), conds).mean().item()
    return total / HELDOUT_DRAWS


@torch.no_grad()
def _samples(
    pipe: DiffusionPipeline,
    prompts: list[str],
    defaults: dict[str, Any],
    size: int,
    seed: int,
    device: torch.device,
    bf16: bool,
) -> list[Image.Image]:
    """One image per prompt through the model's own pipeline (with the LoRA as it is now), at the
    model's default steps and guidance; prompt i uses seed ``seed + i``."""
    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + index)
        with autocast(device, bf16):
            out = pipe(
                prompt,
                num_inference_steps=int(defaults.get("num_inference_steps", 20)),
                guidance_scale=float(defaults.get("guidance_scale", 5.0)),
                width=size,
                height=size,
                generator=generator,
                **end_guidance_args(defaults.get("guidance_end", 1.0)),
            )
        images.append(out.images[0])
    return images


def _export(
    pipe: DiffusionPipeline, trained: dict[str, torch.nn.Module], path: Path, scale: float
) -> Path:
    """Write the LoRA layers as diffusers' ``save_lora_weights`` does (the file
    ``load_lora_weights`` reads), with each module's LoRA settings in the metadata. The keys stay
    in peft's naming: diffusers' ``convert_state_dict_to_diffusers`` renames the attention
    layers' keys but not the convolutions', and ``load_lora_weights`` then dropped the attention
    half of such a mixed file without an error (only a warning). The LoRA's change is saved
    times ``scale`` (`LoraConfig.export_scale`)."""
    from peft.utils import get_peft_model_state_dict

    accepted = inspect.signature(type(pipe).save_lora_weights).parameters
    kwargs: dict[str, Any] = {}
    for name, module in trained.items():
        kwargs[f"{name}_lora_layers"] = {
            key: value * scale if ".lora_B." in key else value  # the change is B @ A
            for key, value in get_peft_model_state_dict(module).items()
        }
        if f"{name}_lora_adapter_metadata" in accepted:
            kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(
        str(path.parent), weight_name=path.name, safe_serialization=True, **kwargs
    )
    return path


def save_loss_plot_with_heldout(log: StageLog, history: _History, path: Path) -> None:
    """The training loss (smoothed) with the held-out losses as points on the same axes."""
    save_loss_plot({"lora": log}, path, extra={"held-out": history.heldout})


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
