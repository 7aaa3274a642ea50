"""The settings of a LoRA fine-tune (`easel.training.lora.train_lora`), checked when built.

Kept free of torch, so the server checks a `train_lora` request with the same rules as the CLI
before the job exists. A model may name its own defaults (`lora_config`): with tiny-shapes'
(its easel.json) they teach the bundled model a new shape from about 20 captioned images in
under three minutes on a 2-core CPU, leaving its other shapes alone (docs/TRAINING.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from easel.domain import GenerationParams, InvalidParams, check_text
from easel.models.catalog import TRAIN_DEFAULT_FIELDS
from easel.models.loras import MAX_PRIOR_WORDS, MAX_RANK, MAX_TRAIN_STEPS, NAME_RE, TRIGGER_RE
from easel.models.params import check_int, check_number

JOB_CHECKPOINTS = 10  # a train_lora job checkpoints about this often over its run


@dataclass(frozen=True)
class LoraConfig:
    """One fine-tune. ``model`` is a catalog id or a model folder; ``dataset`` a folder that
    `easel.datasets.prepare_dataset` wrote; ``out_dir`` the run folder (checkpoints, samples,
    loss plot, the LoRA file), where a run resumes from its newest checkpoint."""

    model: str
    dataset: str
    out_dir: str
    name: str  # the LoRA's name (and file name)
    trigger: str  # the word that calls up what the LoRA learnt; put in captions lacking it
    steps: int = 600  # optimisation steps
    batch_size: int = 8
    rank: int = 8  # LoRA rank; alpha equals it (scale 1), so a weight of 1 means "as trained"
    learning_rate: float = 1e-3  # AdamW, after a linear warm-up, cosine decay to 10 %
    warmup_steps: int = 20
    train_text_encoder: bool = False  # LoRA on the CLIP text encoder(s) too (SD, SDXL)
    # denoiser modules that get LoRA layers (name suffixes); None: the family's choice (a UNet's
    # attention, feed-forward and ResNet convolutions; a transformer's attention projections)
    targets: tuple[str, ...] | None = None
    # SD/SDXL: Min-SNR loss weighting (Hang et al. 2023), as tiny-shapes was trained; 0: plain MSE
    min_snr_gamma: float = 0.0
    # Prior preservation: images the base model makes first, noised alongside the dataset's,
    # where the LoRA is trained to predict what the base model predicts (DreamBooth's idea, with
    # the base model's prediction as the target rather than the noise), so that prompts without
    # the trigger keep their usual look: prior_images images of the prior_prompts, in turn (a
    # class prompt, "a dog"; or several prompts of what the model should not forget); with prior
    # alone, one image per training caption with the trigger taken out ("a big red sks on ..." ->
    # "a big red on ..."). Off by default (docs/TRAINING.md).
    prior: bool = False
    prior_prompts: tuple[str, ...] = ()
    prior_images: int = 16
    prior_weight: float = 1.0
    # Prior words: the dataset's own images again, each caption with the trigger replaced by
    # each word (the classes the new one must leave alone: "circle", "square"), trained towards
    # the base model's prediction like the prior's images. The same picture then asks for the
    # LoRA's change under the trigger and for none under the words, so the change has to follow
    # the text (docs/TRAINING.md); the convolutions that see no text then get no LoRA. No images
    # to make; one more forward pass of the base per step.
    prior_words: tuple[str, ...] = ()
    # the LoRA is saved with its layers' change times this, so that weight 1 at generation
    # applies it this strongly: tiny-shapes' prior-word LoRAs are saved at 1.05, which drew 10
    # points more of a new shape for under 1 point of drift (docs/TRAINING.md)
    export_scale: float = 1.0
    size: int | None = None  # training side in pixels (default: the model's default width)
    holdout: float = 0.1  # share of the images kept out for the held-out loss (0: none)
    sample_every: int = 100  # steps between validation samples and held-out losses (0: never)
    sample_prompts: tuple[str, ...] = ()  # default: the trigger and a few captions
    sample_steps: int | None = None  # denoising steps of the samples (default: the model's)
    checkpoint_every: int = 100  # steps between checkpoints (and on cancel, and at the end)
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"  # "cpu", "cuda", ...
    bf16: bool = True  # bf16 autocast, kept only where the device computes it natively
    gradient_checkpointing: bool | None = None  # None: on for CUDA, off on the CPU
    log_every_seconds: float = 30.0
    checkpoint_every_minutes: float = 10.0  # a clock too, for slow steps

    def __post_init__(self) -> None:
        check_name(self.name)
        check_trigger(self.trigger)
        check_int("steps", self.steps, 1, MAX_TRAIN_STEPS)
        check_int("batch_size", self.batch_size, 1, 256)
        check_int("rank", self.rank, 1, MAX_RANK)
        check_int("warmup_steps", self.warmup_steps, 0, MAX_TRAIN_STEPS)
        check_int("prior_images", self.prior_images, 1, 1000)
        check_int("keep_checkpoints", self.keep_checkpoints, 1, 100)
        check_int("sample_every", self.sample_every, 0, MAX_TRAIN_STEPS)
        check_int("checkpoint_every", self.checkpoint_every, 1, MAX_TRAIN_STEPS)
        if self.sample_steps is not None:
            check_int("sample_steps", self.sample_steps, 1, 200)
        if self.size is not None:
            check_int("size", self.size, 16, 4096)
            if self.size % 16:
                raise InvalidParams(
                    f"size must be a multiple of 16 (got {self.size})", field="size"
                )
        check_number("learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        check_number("prior_weight", self.prior_weight, 0.0, 100.0, low_open=True)
        check_number("holdout", self.holdout, 0.0, 0.5)
        check_number("export_scale", self.export_scale, 0.0, 4.0, low_open=True)
        check_number("min_snr_gamma", self.min_snr_gamma, 0.0, 1000.0)
        if self.targets is not None and (
            not self.targets or not all(isinstance(t, str) and t for t in self.targets)
        ):
            raise InvalidParams("targets must name at least one module", field="targets")
        if not all(isinstance(p, str) and p.strip() for p in self.prior_prompts):
            raise InvalidParams("prior_prompts must not be empty text", field="prior_prompts")
        if not isinstance(self.train_text_encoder, bool):
            raise InvalidParams(
                f"train_text_encoder must be true or false (got {self.train_text_encoder!r})",
                field="train_text_encoder",
            )
        if not isinstance(self.prior_words, tuple) or len(self.prior_words) > MAX_PRIOR_WORDS:
            raise InvalidParams(
                f"prior_words must be a list of at most {MAX_PRIOR_WORDS} words "
                f"(got {self.prior_words!r:.80})",
                field="prior_words",
            )
        for word in self.prior_words:
            if not isinstance(word, str) or len(word) > 64 or not word.strip():
                raise InvalidParams(
                    f"prior_words must be words of 1-64 characters (got {word!r:.80})",
                    field="prior_words",
                )
            # control characters and lone surrogates (the schema's FILLED_TEXT_PATTERN)
            check_text(word, "prior_words")
            if self.trigger.lower() in word.lower().split():
                raise InvalidParams(
                    f"prior_words must not contain the trigger {self.trigger!r} (got {word!r})",
                    field="prior_words",
                )


def lora_config(model_defaults: Mapping[str, Any], **fields: Any) -> LoraConfig:
    """A LoraConfig of ``fields``, where those left None take the model's training defaults
    (`ModelRecord.train_defaults`, its easel.json's ``train_lora``: tiny-shapes names the shapes
    it draws as prior words), else LoraConfig's own. What the CLI and a queued job train with."""
    given = {key: value for key, value in fields.items() if value is not None}
    for key in TRAIN_DEFAULT_FIELDS:
        if key not in given and key in model_defaults:
            value = model_defaults[key]
            given[key] = tuple(value) if isinstance(value, list) else value
    return LoraConfig(**given)


def config_from_params(
    params: GenerationParams,
    dataset: str,
    out_dir: str,
    model_defaults: Mapping[str, Any] | None = None,
) -> LoraConfig:
    """The LoraConfig of a ``train_lora`` job: what the server checks at submit and the worker
    trains with. Fields the request leaves unset take the model's training defaults, else
    LoraConfig's, but for two that a job sets its own way: its samples denoise for the job's
    ``num_inference_steps`` (the model's default unless given), and it checkpoints every tenth
    of its steps (10 to 100 steps apart), so a crash or a restart costs at most a tenth of the
    run."""
    prior_words = params.prior_words
    config = lora_config(
        model_defaults or {},
        model=params.model or "",
        dataset=dataset,
        out_dir=out_dir,
        name=params.name or "",
        trigger=params.trigger or "",
        seed=params.seed or 0,
        sample_steps=params.num_inference_steps,
        steps=params.steps,
        rank=params.rank,
        learning_rate=params.learning_rate,
        train_text_encoder=params.train_text_encoder,
        prior_words=None if prior_words is None else tuple(prior_words),
        export_scale=params.export_scale,
    )
    every = math.ceil(config.steps / JOB_CHECKPOINTS)
    return replace(config, checkpoint_every=min(config.checkpoint_every, max(10, every)))


def check_name(name: str) -> None:
    """A LoRA name is also a file name: letters, digits, '.', '_', '-', at most 64."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidParams(
            "name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit (got {name!r})",
            field="name",
        )


def check_trigger(trigger: str) -> None:
    if not isinstance(trigger, str) or not TRIGGER_RE.fullmatch(trigger):
        raise InvalidParams(
            "trigger must be one word of 1-64 characters, without spaces, '<', '>', ':' or "
            f"quotes (got {trigger!r})",
            field="trigger",
        )
