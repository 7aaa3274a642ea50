"""Typed request and response bodies of the HTTP API (field names follow diffusers' __call__)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from easel.domain import (
    FILLED_TEXT_PATTERN,
    OUTPAINT_SIDES,
    TASK_SPECS,
    TEXT_PATTERN,
    DatasetRecord,
    EaselError,
    GenerationParams,
    ImageRecord,
    JobRecord,
    KeyRecord,
    LoraRecord,
    WorkerState,
    WorkerStatus,
)
from easel.jobs.keys import MAX_LIMIT
from easel.jobs.keys import NAME_RE as KEY_NAME_RE
from easel.jobs.queue import QueueSummary
from easel.jobs.webhooks import MAX_URL_CHARS as WEBHOOK_URL_CHARS
from easel.models.families import FAMILIES, Family
from easel.models.loras import MAX_PRIOR_WORDS, MAX_RANK, MAX_TRAIN_STEPS, TRIGGER_RE
from easel.models.loras import NAME_RE as LORA_NAME_RE
from easel.models.params import LORA_WEIGHT_RANGE, MAX_LORAS, MAX_MASK_BLUR, MAX_SEED
from easel.services import DATASET_ID, PRIORITY_RANGE, TRAIN_REQUIRED, ModelInfo, Services

MAX_ID_CHARS = 64  # image and dataset ids are 32 hex digits (a generated image's: + "-N")
MAX_NAME_CHARS = 1024  # a model id, or a path from an admin key
# the widest over the families (a catalog entry cannot change these)
GUIDANCE_RANGE = (
    min(f.guidance_range[0] for f in FAMILIES.values()),
    max(f.guidance_range[1] for f in FAMILIES.values()),
)
SCHEDULERS = sorted({name for f in FAMILIES.values() for name in f.schedulers})


def _whole(value: Any) -> Any:
    """JSON's 5.0 is the integer 5 (as JSON Schema counts it); "5" and true stay no integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# a whole number in a strict request model
Int = Annotated[int, BeforeValidator(_whole)]


def limits(**keywords: Any) -> Callable[[dict[str, Any]], None]:
    """JSON Schema keywords a field's value must meet, for the OpenAPI document (inside
    ``anyOf`` for an optional field, so none applies to its null). They state what the services
    check (``resolve_params``, ``Services``), which still do the checking and name the field."""

    def state(schema: dict[str, Any]) -> None:
        for branch in _typed(schema):
            branch.update(keywords)

    return state


def _typed(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The branches of a property's schema that are not ``null``."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") != "null":
            yield branch


def image_url(image_id: str) -> str:
    return f"/api/v1/images/{image_id}"


class LoraUse(BaseModel):
    """One LoRA applied to a generation: its name (``GET /api/v1/loras``) and weight."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(
        max_length=64,
        description="The LoRA's name.",
        json_schema_extra=limits(pattern=f"^{LORA_NAME_RE.pattern}$"),
    )
    weight: float = Field(
        1.0,
        description="Its strength, -4..4 (0: no effect).",
        json_schema_extra=limits(minimum=LORA_WEIGHT_RANGE[0], maximum=LORA_WEIGHT_RANGE[1]),
    )


class JobCreate(BaseModel):
    """A generation request. Omitted fields take the model's defaults; ranges are checked
    against the model's family (the error names the field and the allowed values): the ranges
    stated here are the widest any model on this server takes. Text may not hold control
    characters (but tab and newline) or unpaired surrogates."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # "5" and true are not numbers, 1 is not true (but 5.0 is 5: see Int)
        json_schema_extra={
            "examples": [{"prompt": "a red circle on a blue square", "model": "tiny-shapes"}]
        },
    )

    task: Literal["txt2img", "img2img", "inpaint", "outpaint", "style", "train_lora"] = Field(
        "txt2img",
        description="txt2img; img2img (image, strength); inpaint (image, mask, strength, "
        "mask_blur, only_masked); outpaint (image, outpaint, mask_blur); style (style_image, "
        "optional image, style_strength, strength); train_lora (dataset, name, trigger, "
        "steps, rank, learning_rate, train_text_encoder, prior_words, export_scale).",
    )
    model: str | None = Field(
        None,
        max_length=MAX_NAME_CHARS,
        description="Catalog id (a local path or hub id: admin keys only); default: the server's.",
    )
    prompt: str = Field("", description="Required for every task but train_lora.")
    negative_prompt: str = ""
    num_inference_steps: Int | None = Field(
        None,
        description="Denoising steps (train_lora: of its sample images). Default: the model's.",
        json_schema_extra=limits(minimum=1),  # maximum: state_limits
    )
    guidance_scale: float | None = Field(
        None, json_schema_extra=limits(minimum=GUIDANCE_RANGE[0], maximum=GUIDANCE_RANGE[1])
    )
    guidance_end: float | None = Field(
        None,
        description="Share of the steps, from the first, that use classifier-free guidance "
        "(0 < x <= 1; below 1 only for sd models). Default: the model's.",
        json_schema_extra=limits(exclusiveMinimum=0, maximum=1),
    )
    width: Int | None = None  # limits: state_limits (the catalog's models)
    height: Int | None = None
    seed: Int | None = Field(
        None,
        description="Random when omitted; image i uses seed + i.",
        json_schema_extra=limits(minimum=0, maximum=MAX_SEED),
    )
    num_images: Int = Field(1, json_schema_extra=limits(minimum=1))
    scheduler: str | None = Field(
        None,
        max_length=64,
        description="One of the model family's (GET /api/v1/models).",
        json_schema_extra=limits(enum=SCHEDULERS),
    )
    image: str | None = Field(
        None, max_length=MAX_ID_CHARS, description="Input image id (POST /api/v1/images)."
    )
    mask: str | None = Field(
        None,
        max_length=MAX_ID_CHARS,
        description="Mask image id, the image's size: white (or alpha 0) = repaint.",
    )
    strength: float | None = Field(
        None,
        description="How much of the input is redrawn (0 < x <= 1). Default per task.",
        json_schema_extra=limits(exclusiveMinimum=0, maximum=1),
    )
    mask_blur: Int | None = Field(
        None,
        description="Pixels over which the mask's edge is feathered (0..64; default 4).",
        json_schema_extra=limits(minimum=0, maximum=MAX_MASK_BLUR),
    )
    only_masked: bool | None = Field(
        None,
        description="Inpaint a crop around the mask at the model's resolution, then paste it "
        "back (more detail for small masks).",
    )
    outpaint: dict[str, Int] | None = Field(
        None,
        description='Pixels to add on each side: {"left", "top", "right", "bottom"}.',
    )
    style_image: str | None = Field(
        None, max_length=MAX_ID_CHARS, description="Reference image id whose look to take."
    )
    style_strength: float | None = Field(
        None,
        description="How much of the reference's colours (0..1; default 1).",
        json_schema_extra=limits(minimum=0, maximum=1),
    )
    loras: list[LoraUse] | None = Field(
        None,
        description="LoRAs to apply, in order (at most 8, each once, made for the model's "
        'family): [{"id": NAME, "weight": 0.8}].',
        json_schema_extra=limits(maxItems=MAX_LORAS),
    )
    dataset: str | None = Field(
        None,
        max_length=MAX_ID_CHARS,
        description="train_lora: a dataset id (POST /api/v1/datasets).",
        json_schema_extra=limits(pattern=f"^{DATASET_ID.pattern}$"),
    )
    name: str | None = Field(
        None,
        max_length=64,
        description="train_lora: the LoRA's name (letters, digits, . _ -; at most 64); not one a "
        "LoRA or a queued or running train_lora job has already.",
        json_schema_extra=limits(pattern=f"^{LORA_NAME_RE.pattern}$"),
    )
    trigger: str | None = Field(
        None,
        max_length=64,
        description="train_lora: the word that calls up what the LoRA learnt.",
        json_schema_extra=limits(pattern=f"^{TRIGGER_RE.pattern}$"),
    )
    steps: Int | None = Field(
        None,
        description="train_lora: optimisation steps (default: the model's (tiny-shapes: 900), "
        "else 600).",
        json_schema_extra=limits(minimum=1, maximum=MAX_TRAIN_STEPS),
    )
    rank: Int | None = Field(
        None,
        description="train_lora: LoRA rank, 1..256 (default 8).",
        json_schema_extra=limits(minimum=1, maximum=MAX_RANK),
    )
    learning_rate: float | None = Field(
        None,
        description="train_lora: AdamW learning rate, 0 < x <= 1 (default: the model's, else "
        "0.001).",
        json_schema_extra=limits(exclusiveMinimum=0, maximum=1),
    )
    train_text_encoder: bool | None = Field(
        None,
        description="train_lora: LoRA on the CLIP text encoder(s) too (SD, SDXL families); "
        "default: the model's (tiny-shapes: true), else false.",
    )
    prior_words: list[str] | None = Field(
        None,
        description='train_lora: classes the LoRA must leave alone (e.g. ["circle"]): each '
        "caption is trained again with one in the trigger's place, towards the model's own "
        f"prediction; at most {MAX_PRIOR_WORDS} words of 1-64 characters, not the trigger. "
        "Default: the model's (tiny-shapes: its five shapes); [] for none.",
        json_schema_extra=limits(
            maxItems=MAX_PRIOR_WORDS,
            items={
                "type": "string",
                "minLength": 1,
                "maxLength": 64,
                "pattern": FILLED_TEXT_PATTERN,
            },
        ),  # fmt: skip
    )
    export_scale: float | None = Field(
        None,
        description="train_lora: the LoRA is saved with its change times this, 0 < x <= 4, so "
        "that weight 1 applies it this strongly. Default: the model's (tiny-shapes: 1.05), else 1.",
        json_schema_extra=limits(exclusiveMinimum=0, maximum=4),
    )
    priority: Int = Field(
        0,
        description="Higher runs first (-100..100); FIFO within a priority.",
        json_schema_extra=limits(minimum=PRIORITY_RANGE[0], maximum=PRIORITY_RANGE[1]),
    )
    webhook: str | None = Field(
        None,
        max_length=WEBHOOK_URL_CHARS,
        description="An http(s) URL the job is POSTed to (signed) when it ends; its host must "
        "be in the server's webhook_hosts setting (empty: webhooks off, 422). See WEBHOOKS.md.",
    )

    def to_params(self) -> GenerationParams:
        return GenerationParams.from_dict(self.model_dump(exclude={"priority", "webhook"}))


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
    webhook: str | None = Field(description="the URL the job is POSTed to when it ends")
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
            webhook=job.webhook,
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


class WorkerPublic(BaseModel):
    """One worker: where it runs, what it holds, what it does."""

    id: str = Field(description="The worker's name, e.g. `cpu-0` or `cuda:1-0`.")
    node: str = Field(description="The machine it runs on: its hostname (a Ray node id later).")
    device: str = Field(description="`cpu`, `cuda:0`, `mps`, ...")
    pid: int = Field(description="The process that runs its jobs.")
    state: WorkerState = Field(
        description="`idle`, `busy` (runs `job`), `starting`, `stopping` (draining: takes no "
        "new job), `stopped`, or `dead` (ended on its own)."
    )
    models: list[str] = Field(description="Models in its memory, least recently used first.")
    job: str | None = Field(
        description="The job it runs now: its id for the job's owner and admin keys, else null."
    )
    jobs_done: int = Field(description="Jobs it ended since the server started, in any status.")
    busy_ratio: float = Field(description="Share of its up time spent running jobs, 0..1.")
    busy_seconds: float
    up_seconds: float
    loads: dict[str, int] = Field(description="Per model id: loads from disk.")
    load_seconds: dict[str, float] = Field(description="Per model id: seconds spent loading.")

    @classmethod
    def of(cls, status: WorkerStatus) -> WorkerPublic:
        return cls(
            id=status.id,
            node=status.node,
            device=status.device,
            pid=status.pid,
            state=status.state,
            models=status.models,
            job=status.job,
            jobs_done=status.jobs_done,
            busy_ratio=round(status.busy_ratio, 4),
            busy_seconds=round(status.busy_s, 3),
            up_seconds=round(status.up_s, 3),
            loads=status.loads,
            load_seconds={m: round(s, 3) for m, s in status.load_seconds.items()},
        )


class DiskPublic(BaseModel):
    free_bytes: int = Field(description="Free bytes on the disk holding EASEL_HOME.")
    min_free_bytes: int = Field(description="EASEL_MIN_FREE_DISK_MB in bytes.")
    low: bool = Field(description="Under the minimum: new jobs and uploads get 507 DiskFull.")


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        "ok", description="degraded: the server answers but cannot take new work (disk.low)."
    )
    version: str
    workers: int
    disk: DiskPublic


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

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(
        description="1-64 letters, digits, '.', '_' or '-'; unique among active keys",
        json_schema_extra=limits(pattern=f"^{KEY_NAME_RE.pattern}$"),
    )
    scopes: list[Literal["generate", "train", "admin"]] = Field(
        ["generate"], min_length=1, max_length=3, description="What the key may do"
    )
    rate_per_minute: Int | None = Field(
        None,
        description="Requests per minute (none: no limit)",
        json_schema_extra=limits(minimum=1, maximum=MAX_LIMIT),
    )
    max_jobs: Int | None = Field(
        None,
        description="Jobs queued or running at once (none: no limit)",
        json_schema_extra=limits(minimum=1, maximum=MAX_LIMIT),
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


# --- limits that depend on the server -----------------------------------------------------------

REQUEST_MODELS = (JobCreate, LoraUse, KeyCreate)  # bodies whose text check_text holds to
SEARCH_PARAMETERS = ("q",)  # query text bounded by max_prompt_chars (Services.list_images)


def widest(services: Services) -> Family:
    """A family with the widest size, step and image limits any family or catalog model takes
    (an entry may widen its family's: tiny-shapes takes 32 px); sizes step by the largest step
    every model's multiple is a multiple of."""
    families = [*FAMILIES.values(), *(info.family for info in services.list_models())]
    try:  # the default model may be a folder outside the catalog
        families.append(services.model_info(services.settings.default_model).family)
    except EaselError:
        pass
    return replace(
        families[0],
        size_multiple=math.gcd(*(f.size_multiple for f in families)),
        min_size=min(f.min_size for f in families),
        max_size=max(f.max_size for f in families),
        max_steps=max(f.max_steps for f in families),
        max_images=max(f.max_images for f in families),
    )


def state_limits(app: FastAPI, services: Services) -> None:
    """State in the OpenAPI document the limits that depend on this server: text lengths
    (``settings.max_prompt_chars``), sizes, steps and images (the widest of its models), and
    check_text's rule on every text field of a request body and every text query parameter.
    Fuzzers and clients then send what the queue takes, and know what it refuses."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        models = schema["components"]["schemas"]
        job = models[JobCreate.__name__]["properties"]
        family = widest(services)
        text: dict[str, Any] = {"maxLength": services.settings.max_prompt_chars}
        size: dict[str, Any] = {
            "minimum": family.min_size,
            "maximum": family.max_size,
            "multipleOf": family.size_multiple,
        }
        stated: dict[str, dict[str, Any]] = {
            "prompt": text,
            "negative_prompt": text,
            "width": size,
            "height": size,
            "num_inference_steps": {"maximum": family.max_steps},
            "num_images": {"maximum": family.max_images},
            "outpaint": {
                "properties": {
                    side: {"type": "integer", "minimum": 0, "maximum": family.max_size}
                    for side in OUTPAINT_SIDES
                },
                "additionalProperties": False,
                "minProperties": 1,
            },
        }
        for name, keywords in stated.items():
            limits(**keywords)(job[name])
        for model in REQUEST_MODELS:
            for field in models[model.__name__]["properties"].values():
                _state_text(field)
        models[JobCreate.__name__] = _by_task(models[JobCreate.__name__])
        for operations in schema["paths"].values():
            for operation in operations.values():
                for parameter in operation.get("parameters", []):
                    if parameter["in"] == "query":
                        bounded = parameter["name"] in SEARCH_PARAMETERS
                        _state_text(parameter["schema"], text if bounded else None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _by_task(job: dict[str, Any]) -> dict[str, Any]:
    """JobCreate as one object schema per task (``domain.TASK_SPECS``): fields only other tasks
    use may be null only, the task's input images are required, and so is a prompt that holds
    more than white space for a task that generates (train_lora needs TRAIN_REQUIRED instead,
    and no LoRAs). What resolve_params and Services check first, so valid bodies reach them."""
    properties = job["properties"]
    specific = {f for spec in TASK_SPECS.values() for f in (*spec.image_fields, *spec.fields)}
    default_task = JobCreate.model_fields["task"].default
    variants = []
    for task, spec in TASK_SPECS.items():
        own = {*spec.image_fields, *spec.fields}
        variant = {
            name: {"type": "null"} if name in specific - own else value
            for name, value in properties.items()
        }
        variant["task"] = {**properties["task"], "enum": [task]}
        required = [] if task == default_task else ["task"]
        given = TRAIN_REQUIRED if spec.kind == "train" else spec.inputs
        for name in given:  # an id or a name, not null and not ""
            variant[name] = {**_only_text(properties[name]), "minLength": 1}
        if task == "outpaint":  # the pixels to add (resolve_params._check_outpaint)
            variant["outpaint"] = next(_typed(properties["outpaint"]))
            required.append("outpaint")
        if spec.kind == "train":
            variant["loras"] = {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}]}
        else:
            variant["prompt"] = {**properties["prompt"], "pattern": FILLED_TEXT_PATTERN}
            required.append("prompt")
        variants.append(
            {
                "type": "object",
                "title": task,
                "properties": variant,
                "required": [*required, *given],
                "additionalProperties": False,
            }
        )
    return {key: value for key, value in job.items() if key not in _OBJECT_KEYS} | {
        "oneOf": variants
    }


_OBJECT_KEYS = ("type", "properties", "required", "additionalProperties")


def _only_text(schema: dict[str, Any]) -> dict[str, Any]:
    """The string branch of a property's schema."""
    return next(branch for branch in _typed(schema) if branch.get("type") == "string")


def _state_text(schema: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """TEXT_PATTERN (and ``extra``) on the text branches of a property (not an enum's, nor a
    binary file's); beside a pattern of its own (a trigger word's), in ``allOf``."""
    for branch in _typed(schema):
        if branch.get("type") != "string" or {"enum", "format"} & set(branch):
            continue
        if "pattern" in branch:
            branch["allOf"] = [{"pattern": TEXT_PATTERN}]
        else:
            branch["pattern"] = TEXT_PATTERN
        branch.update(extra or {})


class WebhookSecret(BaseModel):
    """The secret that signs the webhook deliveries of the asking key's jobs."""

    secret: str = Field(
        description="HMAC-SHA256 key for the Easel-Signature header (see WEBHOOKS.md)"
    )
    owner: str | None = Field(description="the key it belongs to (null: the keyless user)")
    enabled: bool = Field(description="whether this server sends webhooks (webhook_hosts)")
