"""AUTOMATIC1111's web API under ``/sdapi/v1``: the subset real clients call (Open WebUI's
and SillyTavern's AUTOMATIC1111 backends), so they work with Easel as their server.

Every generation is a job in the one queue, submitted through ``Services`` with the request's
key, so it has that key's scopes, quotas, ownership and Easel's checks; input images are
stored with ``Services.upload_image`` (the upload checks). ``/txt2img`` and ``/img2img`` wait
for their job and answer as A1111 does: ``{"images": [base64 PNG], "parameters", "info"}``.

What differs from A1111 (see docs/A1111.md):
- the checkpoint ``POST /options`` picks (``sd_model_checkpoint``) is the calling key's own
  default, not the server's: one key switching models changes nothing for another (the server's
  default stays ``EASEL_DEFAULT_MODEL``); it lasts until the server restarts. Other options are
  accepted and ignored.
- ``/progress``, ``/interrupt`` and ``/skip`` see the calling key's jobs only (an admin key:
  every job for ``/progress``); ``/interrupt`` and ``/skip`` both cancel the key's running jobs.
- omitted fields take the model's defaults (size, steps, CFG scale, sampler), not A1111's
  512 px, 50 steps, 7.0 and Euler; a prompt must not be empty (A1111 allows one).
- errors keep A1111's shape (``{"error", "detail", "body", "errors"}``, ``easel.api.errors``)
  and Easel's statuses: 422 naming the field (as A1111 names it), 404 for an unknown model or
  sampler, 401/403/429 from the keys, never a traceback.

The routes are left out of /openapi.json (``include_in_schema=False``): their bodies are
another project's loose shapes (unknown fields ignored, as A1111 does), which the schema
fuzzer's negative-data checks would flag by design; docs/A1111.md documents them and
tests/e2e/test_a1111.py drives them as the clients do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import re
import threading
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from PIL import ImageOps
from pydantic import BaseModel, ConfigDict

from easel import __version__
from easel.api.deps import PrincipalDep, ServicesDep
from easel.config import Settings
from easel.domain import (
    EaselError,
    GenerationParams,
    InvalidParams,
    JobRecord,
    JobStatus,
    ModelNotAvailable,
    Principal,
)
from easel.imaging import decode_image, png_bytes
from easel.jobs.events import SERVER_STOPPING
from easel.services import ModelInfo, Services

PREFIX = "/sdapi/v1"

# A1111 sampler name -> Easel scheduler (easel.engine.schedulers), with A1111's aliases. A
# "Karras" schedule (or the old "DPM++ 2M Karras" name) picks the Karras variant where one
# exists; a flow-matching model (Z-Image, Flux) runs "Euler" as flow_euler.
SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Euler a": ("euler_a", ("k_euler_a", "k_euler_ancestral")),
    "Euler": ("euler", ("k_euler",)),
    "DPM++ 2M": ("dpmpp_2m", ("k_dpmpp_2m",)),
    "DPM++ 2M Karras": ("dpmpp_2m_karras", ("k_dpmpp_2m_ka",)),
    "DDIM": ("ddim", ("ddim",)),
}
KARRAS = {"dpmpp_2m": "dpmpp_2m_karras"}
FLOW = {"euler": "flow_euler", "euler_a": "flow_euler"}
# Easel scheduler -> (A1111 sampler, schedule), for what a job ran (as in its PNG's text)
SAMPLER_OF = {
    "euler": ("Euler", "Automatic"),
    "euler_a": ("Euler a", "Automatic"),
    "dpmpp_2m": ("DPM++ 2M", "Automatic"),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "ddim": ("DDIM", "Automatic"),
    "flow_euler": ("Euler", "Simple"),
}
# the schedules listed; A1111's others ("Uniform", "Normal", ...) are taken as "Automatic", as
# A1111 takes a schedule it does not know
SCHEDULES = (("automatic", "Automatic", -1.0), ("karras", "Karras", 7.0))

# Easel's request fields as A1111 names them, for errors (``field`` and the message's start)
FIELD_NAMES = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "scheduler": "sampler_name",
    "strength": "denoising_strength",
    "image": "init_images",
    "only_masked": "inpaint_full_res",
    "model": "sd_model_checkpoint",
}
INPAINT_FILL_ORIGINAL = 1  # inpainting_fill: 0 fill, 1 original, 2 latent noise, 3 nothing
A1111_STRENGTH = 0.75  # A1111's denoising_strength when a request gives none
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]*\]$")  # "name [abc123]", as A1111 titles models
# one "Key: value" item of an A1111 settings line; values with commas are JSON-quoted
_ITEM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


class SamplerNotFound(EaselError):
    """A sampler name A1111 clients may send that Easel does not run (HTTP 404, as A1111)."""

    status = 404


class JobFailed(EaselError):
    """The generation failed in the worker (HTTP 500: the server's failure, not the request's;
    the job, with its error, stays readable under /api/v1/jobs)."""

    status = 500


class ServerStopping(EaselError):
    """The server stopped while the request waited; the job runs after the restart (503)."""

    status = 503


# --- request bodies: A1111's field names; unknown fields ignored, as A1111 does ---------------


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str | None = ""
    negative_prompt: str | None = ""
    seed: int | None = -1  # -1: random
    sampler_name: str | None = None  # None: the model's default sampler
    sampler_index: str | None = None  # the older name of sampler_name
    scheduler: str | None = None  # A1111 >= 1.9: the noise schedule, "Karras", ...
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool | None = True


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None  # base64 (or data: URLs); the first is used
    mask: str | None = None  # white = repaint
    denoising_strength: float | None = None
    mask_blur: int | None = None
    inpainting_fill: int | None = None
    inpaint_full_res: bool | None = None  # "only masked": work on a crop around the mask
    inpainting_mask_invert: int | None = None  # 1: repaint where the mask is black
    include_init_images: bool | None = False


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str | None = None


# --- per-key state -----------------------------------------------------------------------------


class Checkpoints:
    """The model each key picked with ``POST /options`` (in memory: a restart returns every key
    to the server's default). Keyed by key id; the keyless local user is ``None``."""

    def __init__(self) -> None:
        self._chosen: dict[str | None, str] = {}
        self._lock = threading.Lock()

    def get(self, principal: Principal) -> str | None:
        with self._lock:
            return self._chosen.get(principal.key_id)

    def set(self, principal: Principal, model: str) -> None:
        with self._lock:
            self._chosen[principal.key_id] = model


def checkpoints_of(request: Request) -> Checkpoints:
    checkpoints: Checkpoints = request.app.state.a1111_checkpoints
    return checkpoints


def body_limits(settings: Settings) -> dict[str, int]:
    """The largest bodies of the routes that carry base64 images (4 bytes per 3), by path."""
    image = 4 * (settings.max_upload_bytes // 3 + 1)
    return {f"{PREFIX}/img2img": 2 * image + 65536, f"{PREFIX}/png-info": image + 65536}


def install(app: FastAPI) -> None:
    """Serve the routes below on ``app``, with the per-key checkpoint choices they share."""
    app.state.a1111_checkpoints = Checkpoints()
    app.include_router(router)


router = APIRouter(prefix=PREFIX, include_in_schema=False)


# --- what clients read when they connect --------------------------------------------------------


@router.get("/options")
def get_options(request: Request, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    """The options clients read: the key's checkpoint (``sd_model_checkpoint``) and a few
    fixed ones. Open WebUI posts this whole dict back with another checkpoint."""
    info = current_model(services, principal, checkpoints_of(request).get(principal))
    return {
        "sd_model_checkpoint": info.record.id,
        "sd_checkpoint_hash": None,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "live_previews_enable": True,
        "live_previews_image_format": "jpeg",
    }


@router.post("/options")
def set_options(
    body: dict[str, Any], request: Request, services: ServicesDep, principal: PrincipalDep
) -> None:
    """Take the options dict (all of it, as A1111 does); ``sd_model_checkpoint`` switches the
    calling key's model (404 unknown, 409 not on this machine). The rest is ignored."""
    name = body.get("sd_model_checkpoint")
    if name is None:
        return
    if not isinstance(name, str):
        raise InvalidParams(
            f"sd_model_checkpoint must be a model's title (got {name!r})",
            field="sd_model_checkpoint",
        )
    info = find_model(services, principal, name)
    checkpoints_of(request).set(principal, info.record.id)


@router.get("/sd-models")
def sd_models(services: ServicesDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    """The models on this machine, as A1111 lists checkpoints (title = Easel's model id)."""
    return [
        {
            "title": info.record.id,
            "model_name": info.record.id,
            "hash": None,
            "sha256": None,
            # a server path only for those who may name paths (it maps the server's disk)
            "filename": info.record.source if principal.may_name_paths else info.record.id,
            "config": info.record.config if principal.may_name_paths else None,
        }
        for info in services.list_models()
        if info.record.available
    ]


@router.get("/samplers")
def samplers(
    request: Request, services: ServicesDep, principal: PrincipalDep
) -> list[dict[str, Any]]:
    """The sampler names Easel runs for the key's model, with the scheduler each maps to."""
    family = current_model(services, principal, checkpoints_of(request).get(principal)).family
    found = []
    for name, (scheduler, aliases) in SAMPLERS.items():
        runs = fit_scheduler(scheduler, family.schedulers)
        if runs in family.schedulers:
            found.append({"name": name, "aliases": list(aliases), "options": {"easel": runs}})
    return found


@router.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "label": label,
            "aliases": None,
            "default_rho": rho,
            "need_inner_model": False,
        }
        for name, label, rho in SCHEDULES
    ]


@router.get("/upscalers")
def upscalers() -> list[dict[str, Any]]:
    """A1111's "None" upscaler only: Easel has no upscalers (``enable_hr`` is ignored)."""
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1}]


@router.get("/latent-upscale-modes")
def latent_upscale_modes() -> list[dict[str, Any]]:
    return []


@router.get("/sd-vae")
def sd_vae() -> list[dict[str, Any]]:
    return []


# --- generation -------------------------------------------------------------------------------


@router.post("/txt2img")
async def txt2img(
    body: Txt2ImgRequest, request: Request, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Generate, wait for the job, answer with the images (base64 PNG, with their metadata)."""
    chosen = checkpoints_of(request).get(principal)
    job = await asyncio.to_thread(submit, services, principal, chosen, body)
    return await finish(services, principal, job, body)


@router.post("/img2img")
async def img2img(
    body: Img2ImgRequest, request: Request, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Redraw ``init_images[0]``; with ``mask``, repaint only where it is white (inpaint)."""
    chosen = checkpoints_of(request).get(principal)
    job = await asyncio.to_thread(submit, services, principal, chosen, body)
    return await finish(services, principal, job, body)


def submit(
    services: Services, principal: Principal, chosen: str | None, body: Txt2ImgRequest
) -> JobRecord:
    """Turn an A1111 request into Easel's and queue it as ``principal``; EaselErrors name the
    field as A1111 does."""
    services.require(principal, "generate")  # before anything is stored
    try:
        # 1. the model: the request's override, else the key's choice, else the server's
        override = (body.override_settings or {}).get("sd_model_checkpoint")
        if override is not None and not isinstance(override, str):
            raise InvalidParams(
                f"override_settings.sd_model_checkpoint must be a model's title (got {override!r})",
                field="sd_model_checkpoint",
            )
        info = find_model(services, principal, override) if override else None
        info = info or current_model(services, principal, chosen)
        # 2. the generation's fields
        params = GenerationParams(
            prompt=body.prompt or "",
            negative_prompt=body.negative_prompt or "",
            model=info.record.id,
            num_inference_steps=body.steps,
            guidance_scale=body.cfg_scale,
            width=body.width,
            height=body.height,
            seed=None if body.seed is None or body.seed == -1 else body.seed,
            num_images=batch_count(body),
            scheduler=pick_scheduler(
                body.sampler_name or body.sampler_index, body.scheduler, info.family.schedulers
            ),
        )
        # 3. an edit's inputs, stored as the key's uploads
        if isinstance(body, Img2ImgRequest):
            params = edit_params(services, principal, body, params)
        return services.submit_with_uploads(params, principal)  # a refusal leaves no uploads
    except EaselError as exc:
        raise renamed(exc) from None


def batch_count(body: Txt2ImgRequest) -> int:
    for name in ("batch_size", "n_iter"):
        value = getattr(body, name)
        if value is not None and value < 1:
            raise InvalidParams(f"{name} must be at least 1 (got {value})", field=name)
    return (body.batch_size or 1) * (body.n_iter or 1)


def edit_params(
    services: Services, principal: Principal, body: Img2ImgRequest, params: GenerationParams
) -> GenerationParams:
    """img2img, or inpaint with a mask: the inputs uploaded, A1111's inpaint options mapped."""
    if not body.init_images:
        raise InvalidParams("init_images is required: one base64 image", field="init_images")
    picture = image_bytes(body.init_images[0], "init_images")
    strength = body.denoising_strength
    if body.mask is None:
        image = upload(services, principal, picture)
        return replace(params, task="img2img", image=image, strength=strength)
    pixels = services.settings.max_upload_pixels  # the mask read first: a bad one stores nothing
    mask = mask_png(image_bytes(body.mask, "mask"), bool(body.inpainting_mask_invert), pixels)
    image = upload(services, principal, picture)
    try:
        mask_id = upload(services, principal, mask, field="mask")
    except EaselError:
        services.discard_upload(image, principal)
        raise
    if strength is None and body.inpainting_fill == INPAINT_FILL_ORIGINAL:
        strength = A1111_STRENGTH  # start from the original under the mask, as A1111 does
    return replace(
        params,
        task="inpaint",
        image=image,
        mask=mask_id,
        strength=strength,  # None: Easel's inpaint default (1.0, repaint from noise)
        mask_blur=body.mask_blur,
        only_masked=body.inpaint_full_res,
    )


def image_bytes(value: str, field: str) -> bytes:
    """The bytes of a base64 image (a ``data:`` URL's too). URLs are not fetched."""
    if value.startswith(("http://", "https://")):
        raise InvalidParams(
            f"{field} must be base64 image data (URLs are not fetched)", field=field
        )
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        data = base64.b64decode(value)
    except (binascii.Error, ValueError):
        raise InvalidParams(f"{field} is not valid base64", field=field) from None
    if not data:
        raise InvalidParams(f"{field} is empty", field=field)
    return data


def upload(
    services: Services, principal: Principal, data: bytes, field: str = "init_images"
) -> str:
    try:
        return services.upload_image(data, principal).id
    except InvalidParams as exc:
        message = exc.message.removeprefix("file ")
        raise InvalidParams(f"{field} {message}", field=field) from None


def mask_png(data: bytes, invert: bool, max_pixels: int) -> bytes:
    """A1111's mask as Easel's (white = repaint): a mask with transparency repaints where it
    is opaque (as A1111 reads one, unlike OpenAI's), any other is read as grey; both are
    rounded to black and white at 50 %, and inverted for ``inpainting_mask_invert``."""
    image = decode_image(data, field="mask", max_pixels=max_pixels)
    mask = image.convert("L")
    if image.mode == "RGBA":
        alpha = image.getchannel("A")
        low, _ = alpha.getextrema()  # one band: (min, max)
        if isinstance(low, int) and low < 255:  # some transparency: the alpha is the mask
            mask = alpha
    mask = mask.point(lambda v: 255 if v > 128 else 0)
    return png_bytes(ImageOps.invert(mask) if invert else mask)


async def finish(
    services: Services, principal: Principal, job: JobRecord, body: Txt2ImgRequest
) -> dict[str, Any]:
    """Wait for the job's final event, then answer with its images (a cancelled job: those it
    made, often none, as A1111 answers an interrupted one)."""
    async for event in services.subscribe(job.id):
        if event.type == SERVER_STOPPING:
            raise ServerStopping(
                f"the server is stopping; job {job.id} runs again after the restart "
                f"(GET /api/v1/jobs/{job.id})"
            )
    return await asyncio.to_thread(answer, services, principal, job.id, body)


def answer(
    services: Services, principal: Principal, job_id: str, body: Txt2ImgRequest
) -> dict[str, Any]:
    job = services.get_job(job_id, principal)
    if job.status is JobStatus.FAILED:
        raise JobFailed(f"the generation failed: {job.error} (job {job.id})")
    files = [services.image_bytes(image.id, principal) for image in job.images]
    texts = [services.read_image_info(data).get("parameters") or "" for data in files]
    params = job.params
    sampler, schedule = SAMPLER_OF.get(params.scheduler or "", (params.scheduler, "Automatic"))
    seeds = [image.seed for image in job.images] or [params.seed]
    info: dict[str, Any] = {
        "prompt": params.prompt,
        "all_prompts": [params.prompt] * len(seeds),
        "negative_prompt": params.negative_prompt,
        "all_negative_prompts": [params.negative_prompt] * len(seeds),
        "seed": params.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": params.width,
        "height": params.height,
        "sampler_name": sampler,
        "scheduler": schedule,
        "cfg_scale": params.guidance_scale,
        "steps": params.num_inference_steps,
        "batch_size": params.num_images,
        "restore_faces": False,
        "sd_model_name": params.model,
        "sd_model_hash": None,
        "denoising_strength": params.strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": job.created_at.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "version": f"easel {__version__}",
        "job_id": job.id,  # Easel's: the job stays readable under /api/v1/jobs
        "interrupted": job.status is JobStatus.CANCELED,
    }
    echoed = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        echoed.update(init_images=None, mask=None)
    return {
        "images": [base64.b64encode(f).decode("ascii") for f in files]
        if body.send_images is not False
        else [],
        "parameters": echoed,
        "info": json.dumps(info),
    }


# --- while it runs -----------------------------------------------------------------------------


@router.get("/progress")
def progress(
    services: ServicesDep, principal: PrincipalDep, skip_current_image: bool = False
) -> dict[str, Any]:
    """The key's jobs (an admin's: all): progress 0..1 of the running one over all of them,
    seconds until the last is done, the newest preview (JPEG, base64)."""
    running, queued = services.active_jobs(principal)
    count = len(running) + queued
    job = running[0] if running else None
    state = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": job.id if job else "",
        "job_count": count,
        "job_timestamp": job.started_at.strftime("%Y%m%d%H%M%S") if job and job.started_at else "0",
        "job_no": 0,
        "sampling_step": job.step if job else 0,
        "sampling_steps": job.total_steps if job else 0,
    }
    if count == 0:
        return {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": state,
            "current_image": None,
            "textinfo": None,
        }
    done = job.step / job.total_steps if job and job.total_steps else 0.0
    last = services.list_jobs(JobStatus.QUEUED, 1, principal) if queued else running[-1:]
    eta = services.job_eta(last[0].id) if last else None
    preview = None
    if job is not None and not skip_current_image:
        preview = services.latest_preview(job.id, principal)
    return {
        "progress": min(1.0, 0.01 + done / count),
        "eta_relative": round(eta or 0.0, 3),
        "state": state,
        "current_image": preview.partition(",")[2] if preview else None,
        "textinfo": f"Step {job.step}/{job.total_steps}" if job else "Waiting in the queue",
    }


@router.post("/interrupt")
def interrupt(services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    """Cancel the key's running jobs (each stops at its next step)."""
    cancel_running(services, principal)
    return {}


@router.post("/skip")
def skip(services: ServicesDep, principal: PrincipalDep) -> None:
    """As ``/interrupt``: Easel cannot skip one image of a batch."""
    cancel_running(services, principal)


def cancel_running(services: Services, principal: Principal) -> None:
    running, _ = services.active_jobs(principal)
    for job in running:
        if job.owner == principal.key_id:  # its own, an admin's too: never another key's
            services.cancel_job(job.id, principal)


# --- reading an image's parameters -------------------------------------------------------------


@router.post("/png-info")
def png_info(body: PngInfoRequest, services: ServicesDep) -> dict[str, Any]:
    """The generation parameters in an image: ``info`` (A1111's text), ``parameters`` (that
    text parsed, A1111's keys), ``items`` (the image's other metadata: Easel's JSON)."""
    if not body.image:
        raise InvalidParams("image is required: a base64 PNG", field="image")
    found = services.read_image_info(image_bytes(body.image.strip(), "image"))
    text = found.get("parameters") or ""
    items = {"easel": found["easel"]} if found.get("easel") else {}
    return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's ``parameters`` text as A1111's png-info parses it: ``Prompt``, ``Negative
    prompt`` and each setting as text (``Size`` as ``Size-1`` and ``Size-2``)."""
    lines = text.strip().split("\n")
    settings = lines.pop() if len(_ITEM.findall(lines[-1])) >= 3 else ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if not negative and line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        else:
            (negative if negative else prompt).append(line)
    found = {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative)}
    for key, value in _ITEM.findall(settings):
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        size = _SIZE.match(value)
        if size:
            found[f"{key}-1"], found[f"{key}-2"] = size.groups()
        else:
            found[key] = value
    return found


# --- models and samplers -----------------------------------------------------------------------


def find_model(services: Services, principal: Principal, title: str) -> ModelInfo:
    """A model by A1111 title (Easel's id, maybe with a ``[hash]`` after it) that is on this
    machine: ModelNotFound (404) or ModelNotAvailable (409) naming sd_model_checkpoint."""
    try:
        info = services.model_info(_TITLE_HASH.sub("", title.strip()), principal)
    except EaselError as exc:
        raise replace_field(exc, "sd_model_checkpoint") from None
    if not info.record.available:
        raise ModelNotAvailable(
            f"model {info.record.id} is not on this machine; fetch it with "
            f"`easel models pull {info.record.id}`",
            field="sd_model_checkpoint",
        )
    return info


def current_model(services: Services, principal: Principal, chosen: str | None) -> ModelInfo:
    """The key's chosen model, else the server's default."""
    try:
        return services.model_info(chosen or services.settings.default_model, principal)
    except EaselError as exc:
        raise replace_field(exc, "sd_model_checkpoint") from None


def pick_scheduler(
    sampler: str | None, schedule: str | None, allowed: tuple[str, ...]
) -> str | None:
    """Easel's scheduler for an A1111 sampler and schedule (None: the model's default);
    SamplerNotFound (404) for a sampler Easel does not run."""
    if not sampler:
        return None
    name = sampler.strip()
    karras = (schedule or "").strip().lower() == "karras"
    for label, (scheduler, aliases) in SAMPLERS.items():  # noqa: B007 - used after
        if name.lower() == label.lower() or name.lower() in aliases:
            break
    else:
        known = ", ".join(SAMPLERS)
        raise SamplerNotFound(
            f"Sampler not found: {sampler!r} (Easel runs: {known})", field="sampler_name"
        )
    if karras and KARRAS.get(scheduler) in allowed:
        scheduler = KARRAS[scheduler]
    return fit_scheduler(scheduler, allowed)


def fit_scheduler(scheduler: str, allowed: tuple[str, ...]) -> str:
    """``scheduler``, or its flow-matching counterpart on a model that runs only those."""
    if scheduler not in allowed and FLOW.get(scheduler) in allowed:
        return FLOW[scheduler]
    return scheduler


def renamed(exc: EaselError) -> EaselError:
    """``exc`` with its field (and the message's first word, when that is the field) named as
    A1111 names it."""
    if exc.field not in FIELD_NAMES:
        return exc
    name = FIELD_NAMES[exc.field]
    if exc.field == "num_images":
        name = "batch_size × n_iter"
    message = exc.message
    if message.startswith(exc.field):
        message = name + message[len(exc.field) :]
    return replace_field(exc, FIELD_NAMES[exc.field], message)


def replace_field(exc: EaselError, field: str, message: str | None = None) -> EaselError:
    """A copy of ``exc`` (its class and extras, e.g. Retry-After) naming another field."""
    new = copy.copy(exc)
    new.field = field
    if message is not None:
        new.message = message
        new.args = (message,)
    return new
