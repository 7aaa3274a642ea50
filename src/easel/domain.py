"""Plain typed data shared by every layer: requests, results, jobs, events, models, errors.

Nothing here imports torch or diffusers; images travel as PIL images or PNG bytes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Literal

from PIL import Image

Task = Literal["txt2img", "img2img", "inpaint", "outpaint", "style", "train_lora"]


TaskKind = Literal["generate", "train"]


@dataclass(frozen=True)
class TaskSpec:
    """One kind of work, as a row of :data:`TASK_SPECS`: the input images it takes, the request
    fields only it uses, and the family pipelines (``Family.pipelines`` keys) it runs on.

    Validation (``models.params``), the engine's runners (``engine.tasks``), the CLI and the UI
    read this table instead of each testing ``task == ...``.
    """

    name: str
    pipelines: tuple[str, ...]
    inputs: tuple[str, ...] = ()  # image fields that must be given
    optional_inputs: tuple[str, ...] = ()  # image fields that may be given
    fields: tuple[str, ...] = ()  # other request fields only this task uses
    description: str = ""
    # "generate": the engine makes images; "train": the trainer fits a LoRA (its samples are
    # the job's images)
    kind: TaskKind = "generate"
    # whether compatible jobs of this task may share pipeline calls (see `batch_key`)
    batches: bool = True

    @property
    def image_fields(self) -> tuple[str, ...]:
        return self.inputs + self.optional_inputs


TASK_SPECS: dict[str, TaskSpec] = {
    "txt2img": TaskSpec("txt2img", ("txt2img",), description="an image from text"),
    "img2img": TaskSpec(
        "img2img",
        ("img2img",),
        inputs=("image",),
        fields=("strength",),
        description="redraw an image; strength 0..1 is how much may change",
    ),
    "inpaint": TaskSpec(
        "inpaint",
        ("inpaint",),
        inputs=("image", "mask"),
        fields=("strength", "mask_blur", "only_masked"),
        description="repaint where the mask is white; the rest stays as it was",
    ),
    "outpaint": TaskSpec(
        "outpaint",
        ("inpaint",),
        inputs=("image",),
        fields=("outpaint", "strength", "mask_blur"),
        description="grow the canvas and paint the new border",
    ),
    "style": TaskSpec(
        "style",
        ("txt2img", "img2img"),
        inputs=("style_image",),
        optional_inputs=("image",),
        fields=("strength", "style_strength"),
        description="the look of style_image: restyle image, or a new picture in that look",
        # two passes per image with a colour transfer between them, or an image prompt
        batches=False,
    ),
    "train_lora": TaskSpec(
        "train_lora",
        ("txt2img",),
        fields=(
            "dataset",
            "name",
            "trigger",
            "steps",
            "rank",
            "learning_rate",
            "train_text_encoder",
            "prior_words",
            "export_scale",
        ),  # fmt: skip
        description="fit a LoRA on a dataset of captioned images; samples show its progress",
        kind="train",
        batches=False,
    ),
}
TASKS: tuple[str, ...] = tuple(TASK_SPECS)
IMAGE_FIELDS = ("image", "mask", "style_image")  # request fields that name an input image
OUTPAINT_SIDES = ("left", "top", "right", "bottom")


def infer_task(params: GenerationParams) -> str:
    """The task a request's inputs imply (the CLI's rule when ``--task`` is not given)."""
    if params.style_image is not None:
        return "style"
    if params.outpaint is not None:
        return "outpaint"
    if params.mask is not None:
        return "inpaint"
    if params.image is not None:
        return "img2img"
    return "txt2img"


# --- errors -------------------------------------------------------------------------------------


class EaselError(Exception):
    """An error with a message fit for a user: the CLI prints it (exit 2), the API returns it.

    ``field`` names the offending input when there is one; ``status`` is the HTTP status to use.
    """

    status: int = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidParams(EaselError):
    """A request field is out of range or malformed (HTTP 422)."""

    status = 422


class ModelNotFound(EaselError):
    """No model with that id or path (HTTP 404)."""

    status = 404


class LoraNotFound(EaselError):
    """No LoRA with that name in EASEL_HOME/loras (HTTP 404)."""

    status = 404


class ModelNotAvailable(EaselError):
    """The model is known but its weights are not on this machine (HTTP 409)."""

    status = 409


class JobNotFound(EaselError):
    status = 404


class QueueFull(EaselError):
    status = 429


class DiskFull(EaselError):
    """Too little free space on the disk holding EASEL_HOME to store more (HTTP 507)."""

    status = 507


class Unauthorized(EaselError):
    """No API key, an unknown one, or a revoked one, on a server that has keys (HTTP 401)."""

    status = 401


class Forbidden(EaselError):
    """The key is valid but lacks the scope the request needs (HTTP 403)."""

    status = 403


class QuotaExceeded(EaselError):
    """A key's requests per minute or jobs at once are used up (HTTP 429, ``Retry-After``)."""

    status = 429

    def __init__(self, message: str, *, retry_after_s: int, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class ServerBusy(QuotaExceeded):
    """A limit of the whole server is reached, e.g. its open event streams (HTTP 503,
    ``Retry-After``)."""

    status = 503


# C0 control characters but tab, newline and carriage return, DEL, and UTF-16 surrogates
# (which JSON's "\ud800" escapes can smuggle in, and no UTF-8 store can hold alone)
_CONTROL_CHARS = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f"
_BAD_TEXT = re.compile(rf"[{_CONTROL_CHARS}\ud800-\udfff]")
# check_text's rule as a JSON Schema pattern, for the OpenAPI document (a lone surrogate is no
# character a schema can name; the description says so)
TEXT_PATTERN = rf"^[^{_CONTROL_CHARS}]*$"
# and for text that must hold more than white space (a prompt)
FILLED_TEXT_PATTERN = rf"^[^{_CONTROL_CHARS}]*[^\s{_CONTROL_CHARS}][^{_CONTROL_CHARS}]*$"


def check_text(value: object, field: str) -> None:
    """Refuse text the system cannot hold or show: a lone surrogate, NUL or another control
    character (InvalidParams naming the field and the character's position). Every way in
    (API, UI, CLI, the drop-in protocols) reaches this through ``Services``."""
    if not isinstance(value, str):
        return
    bad = _BAD_TEXT.search(value)
    if bad is not None:
        raise InvalidParams(
            f"{field} holds U+{ord(bad.group()):04X} at character {bad.start()}: text may not "
            "contain control characters (other than tab and newline) or unpaired surrogates",
            field=field,
        )


class Canceled(Exception):  # noqa: N818 - a control-flow signal, not an error to report
    """Raised inside a generation when the caller asked to stop."""


class WorkerLost(Exception):  # noqa: N818 - not the job's fault: it goes back to the queue
    """Raised when the process running a job died under it (a Ray actor killed, its node
    gone); the job is requeued and counts one more attempt."""


# --- generation ---------------------------------------------------------------------------------


@dataclass
class GenerationParams:
    """One generation request. ``None`` fields take the model family's defaults.

    Names follow diffusers' ``__call__`` arguments. After ``engine.resolve_params`` every
    field is concrete, and that resolved copy is what goes into the PNG metadata.
    """

    prompt: str
    model: str | None = None
    task: str = "txt2img"
    negative_prompt: str = ""
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    # the share of the steps, from the first, that use classifier-free guidance (1: all)
    guidance_end: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    num_images: int = 1
    scheduler: str | None = None
    # --- editing (see TASK_SPECS for which task uses which) ---
    # how much of the input the model redraws (0 < x <= 1)
    strength: float | None = None
    # input images by reference: an image id in the server's store (a file path on the CLI)
    image: str | None = None
    mask: str | None = None  # white (or alpha 0) = repaint
    mask_blur: int | None = None  # feather, in pixels, of the mask's edge (both sides)
    only_masked: bool | None = None  # inpaint a crop around the mask at the model's resolution
    outpaint: dict[str, int] | None = None  # pixels to add: left, top, right, bottom
    style_image: str | None = None
    style_strength: float | None = None  # how much of style_image's colours (0..1)
    # sha256 (first 16 hex digits) of each input's decoded pixels, set by the engine: a PNG
    # records which inputs made it, so `generate --from` can tell when others are given
    input_hashes: dict[str, str] | None = None
    # LoRAs applied to the model, in order: [{"id": NAME, "weight": 0.8}, ...]
    loras: list[dict[str, Any]] | None = None
    # --- fine-tuning (task train_lora) ---
    dataset: str | None = None  # a dataset id (a folder or .zip on the CLI)
    name: str | None = None  # the LoRA's name: EASEL_HOME/loras/NAME.safetensors
    trigger: str | None = None  # the word that calls up what the LoRA learnt
    steps: int | None = None  # optimisation steps
    rank: int | None = None  # LoRA rank
    learning_rate: float | None = None
    train_text_encoder: bool | None = None  # LoRA on the CLIP text encoder(s) too
    # classes the LoRA must leave alone (each caption again with one in the trigger's place);
    # None: the model's, [] none
    prior_words: list[str] | None = None
    export_scale: float | None = None  # the LoRA is saved with its change times this

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationParams:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# Request fields in which jobs of one batch may differ: each image's own prompts and seed, how
# many images, its input images (any, once brought to the common work size) and what is done
# with them before and after the pipeline call (the inpaint crop and feather, the outpaint
# margins). Every other field changes the pipeline call and must match; so must whether a
# negative prompt is given (Flux runs true CFG only with one).
BATCH_FREE = frozenset(
    {
        "prompt",
        "negative_prompt",
        "seed",
        "num_images",
        "image",
        "mask",
        "input_hashes",
        "mask_blur",
        "only_masked",
        "outpaint",
    }
)


def batch_key(params: GenerationParams) -> str | None:
    """Jobs whose keys are equal may run in the same pipeline calls (dynamic batching: each
    still gets the pixels it would get alone); None for a job that never shares (its task's
    ``batches`` is off). Compare keys of params resolved the same way (the queue's are)."""
    spec = TASK_SPECS.get(params.task)
    if spec is None or not spec.batches or spec.kind != "generate":
        return None
    shared = {k: v for k, v in params.to_dict().items() if k not in BATCH_FREE}
    shared["negative_prompt"] = bool(params.negative_prompt)
    return repr(sorted(shared.items()))


@dataclass
class InputImages:
    """The decoded input images of an editing request (the worker reads them from the image
    store by the ids in GenerationParams; the CLI from files). ``mask`` is as given: the engine
    turns white or alpha 0 into "repaint"."""

    image: Image.Image | None = None
    mask: Image.Image | None = None
    style_image: Image.Image | None = None

    def get(self, name: str) -> Image.Image | None:
        value: Image.Image | None = getattr(self, name)
        return value


@dataclass
class Progress:
    """Reported after each denoising step. ``preview`` is set every few steps."""

    step: int
    total: int
    preview: Image.Image | None = None


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


@dataclass
class TrainProgress:
    """Reported after each optimisation step of a training job."""

    step: int
    total: int
    loss: float
    lr: float
    eta_s: float | None = None


@dataclass
class TrainSamples:
    """Validation images made every few steps with the LoRA as it is, and the held-out loss."""

    step: int
    images: list[Image.Image]
    prompts: list[str]
    heldout_loss: float | None = None


@dataclass
class GenerationResult:
    """Images of one request, in order; image i was made with seed ``params.seed + i``."""

    images: list[Image.Image]
    params: GenerationParams  # resolved: every field concrete
    seconds: float  # from the start of its generation to its last image
    dropped_tokens: int = 0  # prompt tokens beyond the text encoder's limit
    # its share of the compute: a batched pipeline call's time split evenly over the call's
    # images (what speed estimates use); None: ``seconds``, it ran alone
    compute_seconds: float | None = None

    @property
    def seeds(self) -> list[int]:
        assert self.params.seed is not None
        return [self.params.seed + i for i in range(len(self.images))]


@dataclass
class GenerationRequest:
    """One job of a batch (``Engine.generate_batch``): its request, decoded input images and
    callbacks. ``is_canceled`` is asked at every step end; once it answers true the job is
    over (``on_end`` gets Canceled, its images are dropped) while the rest of the batch goes
    on. ``on_end`` gets the job's outcome -- its GenerationResult, or the exception that ended
    it (Canceled, an EaselError, a failure of its pipeline call) -- as soon as it is known,
    exactly once, from the generating thread; it must not raise."""

    params: GenerationParams
    inputs: InputImages | None = None
    on_progress: ProgressCallback | None = None
    is_canceled: CancelCheck | None = None
    on_end: Callable[[GenerationResult | Exception], None] | None = None


# --- models -------------------------------------------------------------------------------------


# A model folder may carry its own request defaults in this file beside model_index.json
# ({"defaults": {...}}, the keys of a models.toml entry's `defaults`); Easel's training writes it,
# and a catalog entry's own defaults win over it.
MODEL_DEFAULTS_FILE = "easel.json"


@dataclass
class ModelRecord:
    """A catalog entry: where the weights are, which family serves them, and its defaults."""

    id: str
    family: str
    source: str  # hub repo id, local folder, or .safetensors file
    description: str = ""
    tasks: tuple[str, ...] = ("txt2img",)
    defaults: dict[str, Any] = field(default_factory=dict)
    available: bool = False  # weights present on this machine
    builtin: bool = True
    # for a .safetensors source: a diffusers folder or hub id holding the pipeline's configs
    config: str | None = None
    # an IP-Adapter .safetensors file (SD, SDXL) with its CLIP image encoder in an
    # `image_encoder` folder beside it (h94/IP-Adapter's layout): the `style` task uses it
    ip_adapter: str | None = None
    # a LoRA fine-tune's defaults for this model (easel.json's ``train_lora``), under what a
    # request gives: steps, rank, learning_rate, train_text_encoder, prior_words, export_scale
    train_defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraRecord:
    """A LoRA in EASEL_HOME/loras: ``NAME.safetensors`` (diffusers' LoRA format) and ``NAME.json``
    with what is known about it. Trained ones know their base model, trigger word and run."""

    id: str  # NAME
    path: str
    family: str  # the model family it fits ("sd", "sdxl", "z-image", "flux")
    base_model: str | None = None  # the catalog id it was trained on
    trigger: str | None = None
    rank: int | None = None
    steps: int | None = None
    source: str = "trained"  # or "added" (a file from elsewhere)
    job_id: str | None = None  # the train_lora job that made it
    created_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # loss, best step, dataset, ...
    owner: str | None = None  # the key that trained it; None (added by the owner): everyone's


# --- jobs ---------------------------------------------------------------------------------------


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


@dataclass
class ImageRecord:
    """A stored image: made by a job (``kind`` "generated") or uploaded (``job_id`` None)."""

    id: str
    job_id: str | None
    seed: int | None
    path: str  # relative to Settings.images_dir
    width: int
    height: int
    prompt: str
    created_at: datetime
    kind: str = "generated"  # or "upload"
    owner: str | None = None  # the key id that made it (its job's owner for generated ones)


@dataclass
class JobRecord:
    id: str
    task: str
    model: str
    params: GenerationParams
    priority: int
    status: JobStatus
    created_at: datetime
    owner: str | None = None
    attempts: int = 0
    step: int = 0
    total_steps: int = 0
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    images: list[ImageRecord] = field(default_factory=list)
    position: int | None = None  # 1 = next to start; None unless queued (read with the status)
    webhook: str | None = None  # POSTed once the job ends (easel.jobs.webhooks)


# --- workers ------------------------------------------------------------------------------------

WorkerState = Literal["idle", "busy", "starting", "stopping", "stopped", "dead"]
WORKER_STATES: tuple[WorkerState, ...] = (
    "idle",
    "busy",
    "starting",
    "stopping",
    "stopped",
    "dead",
)


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as it is now: what ``GET /api/v1/workers``, ``/metrics`` and the web UI read.

    ``state``: ``idle`` (waits for a job), ``busy`` (runs ``job``), ``starting`` (not ready
    yet), ``stopping`` (draining: takes no new job), ``stopped`` (ended on purpose), ``dead``
    (ended on its own: a crashed thread or process). ``jobs_done`` counts the jobs it ended, in
    any status; ``busy_s`` of ``up_s`` seconds were spent running them. ``loads`` and
    ``load_seconds``: per model id, how often it was loaded from disk and the seconds that took
    (a pipeline derived with ``from_pipe`` is no load). ``job_owner``: the key that owns
    ``job`` (read by ``Services.list_workers``, which hides another key's job id).
    """

    id: str  # the worker's name, e.g. "cpu-0"
    node: str  # hostname (a Ray node id for a Ray actor)
    device: str
    pid: int
    state: WorkerState
    models: list[str] = field(default_factory=list)  # loaded model ids, least recent first
    job: str | None = None
    job_owner: str | None = None
    jobs_done: int = 0
    busy_s: float = 0.0
    up_s: float = 0.0
    loads: dict[str, int] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def busy_ratio(self) -> float:
        """Share of its up time spent running jobs, 0..1."""
        return min(self.busy_s / self.up_s, 1.0) if self.up_s > 0 else 0.0


# --- keys -------------------------------------------------------------------------------------

SCOPES = ("generate", "train", "admin")


class KeyNotFound(EaselError):
    """No active API key by that name (HTTP 404)."""

    status = 404


class NameTaken(EaselError):
    """An active API key has that name already (HTTP 409)."""

    status = 409


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: an API key, or the keyless local user of a server without keys.

    What it owns carries its ``key_id`` (``owner`` of jobs, images, datasets and LoRAs); it sees
    only those, unless it has the ``admin`` scope. ``may_name_paths``: a request may name a
    filesystem path or hub id as its model (an admin key, the CLI, a keyless loopback server).
    """

    key_id: str | None
    name: str
    scopes: frozenset[str]
    rate_per_minute: int | None = None
    max_jobs: int | None = None
    may_name_paths: bool = False

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def can(self, scope: str) -> bool:
        return self.admin or scope in self.scopes

    def sees(self, owner: str | None) -> bool:
        """Whether something owned by ``owner`` (a key id; None: made before keys) is visible."""
        return self.admin or (owner is not None and owner == self.key_id)

    @property
    def owner_filter(self) -> str | None:
        """The owner to filter lists by: None (everything) for an admin, else its key id."""
        return None if self.admin else self.key_id


# The one person on their own machine: the CLI, and a server on which no key exists.
LOCAL = Principal(key_id=None, name="local", scopes=frozenset(SCOPES), may_name_paths=True)


@dataclass
class KeyRecord:
    """An API key as stored (the secret itself only as its hash)."""

    id: str
    name: str
    scopes: tuple[str, ...]
    rate_per_minute: int | None
    max_jobs: int | None
    created_at: datetime
    revoked_at: datetime | None = None

    def principal(self) -> Principal:
        return Principal(
            key_id=self.id,
            name=self.name,
            scopes=frozenset(self.scopes),
            rate_per_minute=self.rate_per_minute,
            max_jobs=self.max_jobs,
            may_name_paths="admin" in self.scopes,
        )


# --- datasets -----------------------------------------------------------------------------------


class DatasetNotFound(EaselError):
    """No prepared dataset with that id (HTTP 404)."""

    status = 404


@dataclass
class DatasetRecord:
    """A training dataset in ``EASEL_HOME/datasets/<id>/`` (images, captions, dataset.json):
    what ``easel.datasets.prepare_dataset`` checked and copied."""

    id: str
    images: int
    captions: int  # images with a caption
    missing_captions: list[str]  # names (as uploaded) of the images without one
    created_at: datetime
    bytes: int  # size of the clean copy on disk
    owner: str | None = None  # the key id that uploaded it
