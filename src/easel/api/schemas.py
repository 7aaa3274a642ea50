"""Typed request and response bodies of the HTTP API (field names follow diffusers' __call__)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from easel.domain import (
    DatasetRecord,
    GenerationParams,
    ImageRecord,
    JobRecord,
    KeyRecord,
    LoraRecord,
)
from easel.jobs.queue import QueueSummary
from easel.services import ModelInfo

MAX_ID_CHARS = 64  # image and dataset ids are 32 hex digits (a generated image's: + "-N")
MAX_NAME_CHARS = 1024  # a model id, or a path from an admin key


def image_url(image_id: str) -> str:
    return f"/api/v1/images/{image_id}"


class LoraUse(BaseModel):
    """One LoRA applied to a generation: its name (``GET /api/v1/loras``) and weight."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=64, description="The LoRA's name.")
    weight: float = Field(1.0, description="Its strength, -4..4 (0: no effect).")


class JobCreate(BaseModel):
    """A generation request. Omitted fields take the model's defaults; ranges are checked
    against the model's family (the error names the field and the allowed values)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"prompt": "a red circle on a blue square", "model": "tiny-shapes"}]
        },
    )

    task: Literal["txt2img", "img2img", "inpaint", "outpaint", "style", "train_lora"] = Field(
        "txt2img",
        description="txt2img; img2img (image, strength); inpaint (image, mask, strength, "
        "mask_blur, only_masked); outpaint (image, outpaint, mask_blur); style (style_image, "
        "optional image, style_strength, strength); train_lora (dataset, name, trigger, "
        "steps, rank, learning_rate).",
    )
    model: str | None = Field(
        None,
        max_length=MAX_NAME_CHARS,
        description="Catalog id (a local path or hub id: admin keys only); default: the server's.",
    )
    prompt: str = Field("", description="Required for every task but train_lora.")
    negative_prompt: str = ""
    num_inference_steps: int | None = Field(
        None,
        description="Denoising steps (train_lora: of its sample images). Default: the model's.",
    )
    guidance_scale: float | None = None
    guidance_end: float | None = Field(
        None,
        description="Share of the steps, from the first, that use classifier-free guidance "
        "(0 < x <= 1; below 1 only for sd models). Default: the model's.",
    )
    width: int | None = None
    height: int | None = None
    seed: int | None = Field(None, description="Random when omitted; image i uses seed + i.")
    num_images: int = 1
    scheduler: str | None = Field(None, max_length=64)
    image: str | None = Field(
        None, max_length=MAX_ID_CHARS, description="Input image id (POST /api/v1/images)."
    )
    mask: str | None = Field(
        None,
        max_length=MAX_ID_CHARS,
        description="Mask image id, the image's size: white (or alpha 0) = repaint.",
    )
    strength: float | None = Field(
        None, description="How much of the input is redrawn (0 < x <= 1). Default per task."
    )
    mask_blur: int | None = Field(
        None, description="Pixels over which the mask's edge is feathered (0..64; default 4)."
    )
    only_masked: bool | None = Field(
        None,
        description="Inpaint a crop around the mask at the model's resolution, then paste it "
        "back (more detail for small masks).",
    )
    outpaint: dict[str, int] | None = Field(
        None,
        description='Pixels to add on each side: {"left", "top", "right", "bottom"}.',
    )
    style_image: str | None = Field(
        None, max_length=MAX_ID_CHARS, description="Reference image id whose look to take."
    )
    style_strength: float | None = Field(
        None, description="How much of the reference's colours (0..1; default 1)."
    )
    loras: list[LoraUse] | None = Field(
        None,
        description="LoRAs to apply, in order (at most 8, each once, made for the model's "
        'family): [{"id": NAME, "weight": 0.8}].',
    )
    dataset: str | None = Field(
        None,
        max_length=MAX_ID_CHARS,
        description="train_lora: a dataset id (POST /api/v1/datasets).",
    )
    name: str | None = Field(
        None,
        max_length=64,
        description="train_lora: the LoRA's name (letters, digits, . _ -; at most 64); not one a "
        "LoRA or a queued or running train_lora job has already.",
    )
    trigger: str | None = Field(
        None,
        max_length=64,
        description="train_lora: the word that calls up what the LoRA learnt.",
    )
    steps: int | None = Field(None, description="train_lora: optimisation steps (default 600).")
    rank: int | None = Field(None, description="train_lora: LoRA rank, 1..256 (default 8).")
    learning_rate: float | None = Field(
        None, description="train_lora: AdamW learning rate, 0 < x <= 1 (default 0.001)."
    )
    priority: int = Field(0, description="Higher runs first (-100..100); FIFO within a priority.")

    def to_params(self) -> GenerationParams:
        return GenerationParams.from_dict(self.model_dump(exclude={"priority"}))


class LoraPublic(BaseModel):
    """A LoRA in EASEL_HOME/loras: name it in a job's ``loras``."""

    id: str
    family: str = Field(description="the model family it fits: sd, sdxl, z-image or flux")
    base_model: str | None = Field(description="the catalog model it was trained on, if known")
    trigger: str | None = Field(description="the word that calls up what it learnt")
    rank: int | None
    steps: int | None = Field(description="training steps, for a trained LoRA")
    source: str = Field(description='"trained" or "added"')
    job_id: str | None = Field(description="the train_lora job that made it")
    created_at: datetime | None
    extra: dict[str, Any]

    @classmethod
    def of(cls, record: LoraRecord) -> LoraPublic:
        return cls(
            id=record.id,
            family=record.family,
            base_model=record.base_model,
            trigger=record.trigger,
            rank=record.rank,
            steps=record.steps,
            source=record.source,
            job_id=record.job_id,
            created_at=record.created_at,
            extra=record.extra,
        )


class ImageRef(BaseModel):
    id: str
    url: str
    seed: int | None = Field(description="null for an uploaded image")
    width: int
    height: int


class Upload(BaseModel):
    """A stored input image: name it by ``id`` in an editing job."""

    id: str
    url: str
    width: int
    height: int


class ImagePublic(ImageRef):
    job_id: str | None = Field(description="the job that made it; null for an upload")
    kind: str = Field(description='"generated" or "upload"')
    prompt: str
    created_at: datetime

    @classmethod
    def of(cls, image: ImageRecord) -> ImagePublic:
        return cls(
            id=image.id,
            url=image_url(image.id),
            seed=image.seed,
            width=image.width,
            height=image.height,
            job_id=image.job_id,
            kind=image.kind,
            prompt=image.prompt,
            created_at=image.created_at,
        )


class ProgressPublic(BaseModel):
    step: int
    total: int


class JobPublic(BaseModel):
    """A job as clients see it. ``position`` and ``eta_seconds`` are null when not applicable
    (position: not queued; eta: speed for this model and size not measured yet)."""

    id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    task: str
    model: str
    priority: int
    owner: str | None
    position: int | None
    eta_seconds: float | None
    progress: ProgressPublic
    images: list[ImageRef]
    error: str | None
    attempts: int
    params: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: JobRecord, *, position: int | None, eta_seconds: float | None) -> JobPublic:
        return cls(
            id=job.id,
            status=job.status.value,
            task=job.task,
            model=job.model,
            priority=job.priority,
            owner=job.owner,
            position=position,
            eta_seconds=None if eta_seconds is None else round(eta_seconds, 2),
            progress=ProgressPublic(step=job.step, total=job.total_steps),
            images=[
                ImageRef(id=i.id, url=image_url(i.id), seed=i.seed, width=i.width, height=i.height)
                for i in job.images
            ],
            error=job.error,
            attempts=job.attempts,
            params=job.params.to_dict(),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class ModelLimits(BaseModel):
    size_multiple: int
    min_size: int
    max_size: int
    max_steps: int
    max_images: int
    guidance_range: tuple[float, float]
    schedulers: list[str]


class ModelPublic(BaseModel):
    id: str
    family: str
    description: str
    source: str
    tasks: list[str]
    defaults: dict[str, Any]
    limits: ModelLimits
    available: bool
    loaded: bool
    builtin: bool

    @classmethod
    def of(cls, info: ModelInfo) -> ModelPublic:
        r, f = info.record, info.family
        return cls(
            id=r.id,
            family=r.family,
            description=r.description,
            source=r.source,
            tasks=list(r.tasks),
            defaults=info.defaults,
            limits=ModelLimits(
                size_multiple=f.size_multiple,
                min_size=f.min_size,
                max_size=f.max_size,
                max_steps=f.max_steps,
                max_images=f.max_images,
                guidance_range=f.guidance_range,
                schedulers=list(f.schedulers),
            ),
            available=r.available,
            loaded=info.loaded,
            builtin=r.builtin,
        )


class QueuePublic(BaseModel):
    counts: dict[str, int]
    running: list[JobPublic]
    workers: int

    @classmethod
    def of(cls, summary: QueueSummary, workers: int) -> QueuePublic:
        return cls(
            counts=summary.counts,
            running=[JobPublic.of(j, position=None, eta_seconds=None) for j in summary.running],
            workers=workers,
        )


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    workers: int


class ErrorDetail(BaseModel):
    type: str = Field(description="Error class, e.g. InvalidParams, ModelNotFound, QueueFull.")
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """Every error response: ``{"error": {"type", "message", "field"}}``."""

    error: ErrorDetail


def dataset_url(dataset_id: str) -> str:
    return f"/api/v1/datasets/{dataset_id}"


class DatasetCreated(BaseModel):
    """A stored training dataset: name it by ``id`` in a ``train_lora`` job."""

    id: str
    url: str
    images: int
    captions: int = Field(description="images with a caption")
    missing_captions: list[str] = Field(
        description="names of the images without a caption (empty unless allowed)"
    )


class DatasetPublic(DatasetCreated):
    bytes: int = Field(description="size of the checked copy on disk")
    created_at: datetime

    @classmethod
    def of(cls, record: DatasetRecord) -> DatasetPublic:
        return cls(
            id=record.id,
            url=dataset_url(record.id),
            images=record.images,
            captions=record.captions,
            missing_captions=record.missing_captions,
            bytes=record.bytes,
            created_at=record.created_at,
        )


class DatasetItemPublic(BaseModel):
    file: str = Field(description="the image's name as uploaded")
    caption: str = Field(description='"" for an image without a caption')
    width: int
    height: int


class DatasetDetail(DatasetPublic):
    items: list[DatasetItemPublic]


class KeyCreate(BaseModel):
    """A new API key (admin keys only)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-64 letters, digits, '.', '_' or '-'; unique among active keys")
    scopes: list[Literal["generate", "train", "admin"]] = Field(
        ["generate"], min_length=1, max_length=3, description="What the key may do"
    )
    rate_per_minute: int | None = Field(
        None, ge=1, le=1_000_000, description="Requests per minute (none: no limit)"
    )
    max_jobs: int | None = Field(
        None, ge=1, le=1_000_000, description="Jobs queued or running at once (none: no limit)"
    )


class KeyPublic(BaseModel):
    id: str = Field(description="What the key's jobs, images and datasets record as owner")
    name: str
    scopes: list[str]
    rate_per_minute: int | None
    max_jobs: int | None
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, record: KeyRecord) -> KeyPublic:
        return cls(
            id=record.id,
            name=record.name,
            scopes=list(record.scopes),
            rate_per_minute=record.rate_per_minute,
            max_jobs=record.max_jobs,
            created_at=record.created_at,
            revoked_at=record.revoked_at,
        )


class KeyCreated(KeyPublic):
    secret: str = Field(description="The key itself: shown this once, stored only hashed")
