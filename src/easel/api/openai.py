"""OpenAI's Images API under ``/v1``: the official ``openai`` SDK, and what is built on it (Open
WebUI among them), use Easel as they would OpenAI::

    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key=KEY)
    result = client.images.generate(prompt="a red circle", n=2, size="64x64")

- ``POST /v1/images/generations`` (JSON), ``POST /v1/images/edits`` (multipart: ``image`` or
  ``image[]``, optional ``mask`` whose alpha 0 marks what to repaint), ``POST
  /v1/images/variations`` (multipart ``image``), ``GET /v1/models``, ``GET /v1/models/{id}``.
- Each request is one job in the queue, made by ``Services.submit_job`` with the request's key
  (the same checks, limits, quotas and ownership as ``/api/v1/jobs``); the route waits for it
  on the event bus (never blocking the event loop) and answers ``{"created", "data", "usage",
  ...}``, or with ``stream: true`` Server-Sent Events: ``image_generation.partial_image``
  (from Easel's progress previews, ``partial_images`` of them at most), then one
  ``image_generation.completed`` per image (edits: ``image_edit.*``).
- ``model``: a catalog id, or an OpenAI name (``gpt-image-1``, ``dall-e-3``, ...) or none for the
  server's default model. ``quality`` scales the model's default steps (low ½, medium and auto
  1×, high 2×; ``standard``/``hd`` as medium/high). Easel's own parameters ride along in
  ``extra_body``: ``seed``, ``negative_prompt``, ``num_inference_steps``, ``guidance_scale``,
  ``scheduler``, and ``strength`` for edits and variations.
- Errors take OpenAI's shape (``easel.api.errors``) and the status its SDK maps to the right
  exception: 400 BadRequestError for any bad parameter, 401, 403, 404, 429.

The shapes follow the ``openai`` package's own types (``openai/types/image_generate_params.py``,
``image_edit_params.py``, ``images_response.py``, ``image_gen_*_event.py``, ``image_edit_*``).
The routes are left out of /openapi.json: OpenAI's API reference is their schema, their errors
are not the ``ErrorBody`` the document states for every operation, and a schema fuzzer's
requests would each wait for a job.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from easel.api.deps import PrincipalDep, ServicesDep
from easel.api.errors import error_body
from easel.api.schemas import image_url
from easel.api.streams import EventStreamResponse, Slot, StreamSlots, client_of
from easel.domain import (
    EaselError,
    GenerationParams,
    InvalidParams,
    JobRecord,
    JobStatus,
    ModelNotFound,
    ModelRecord,
    Principal,
    check_text,
)
from easel.jobs.events import with_ticks
from easel.services import Services

# not in /openapi.json: OpenAI's reference is these routes' schema (see the module docstring)
router = APIRouter(prefix="/v1", tags=["openai"], include_in_schema=False)

# OpenAI's model names: they mean the server's default model (a catalog id of that name wins)
OPENAI_MODEL = re.compile(r"^(gpt-image-|dall-e-|chatgpt-image-)")
# quality -> (factor on the model's default steps, the quality an answer reports)
QUALITY = {
    "low": (0.5, "low"),
    "medium": (1.0, "medium"),
    "auto": (1.0, "medium"),
    "standard": (1.0, "medium"),
    "high": (2.0, "high"),
    "hd": (2.0, "high"),
    "xhigh": (3.0, "xhigh"),
    "max": (4.0, "max"),
}
SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
VARIATION_PROMPT = "a picture like this one"  # an image without Easel's metadata
PATCH = 16  # usage counts an image's 16×16 patches as its tokens
MAX_FORM_FILES = 20
MAX_FORM_FIELDS = 100
KEEPALIVE_S = 15.0

Kind = Literal["image_generation", "image_edit", "variation"]


# --- errors in OpenAI's words (the codes are the class names in snake_case) ---------------------


class MissingRequiredParameter(InvalidParams):
    pass


class UnknownParameter(InvalidParams):
    pass


class InvalidType(InvalidParams):
    pass


class MalformedJSON(EaselError):
    status = 400


class InvalidRequest(EaselError):
    status = 400


# --- requests -----------------------------------------------------------------------------------


class ImageRequest(BaseModel):
    """The parameters every route takes. Lax types: a multipart form's fields are text."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    n: int | None = Field(None, ge=1, le=10)
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None  # accepted, not used
    # Easel's own (the SDK's extra_body)
    seed: int | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None


class GenerateRequest(ImageRequest):
    prompt: str
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] | None = (
        None
    )
    background: Literal["transparent", "opaque", "auto"] | None = None
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=3)
    # accepted, not used
    moderation: Literal["low", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    safety_identifier: str | None = None
    complexity: Literal["low", "medium", "high"] | None = None


class EditRequest(GenerateRequest):
    input_fidelity: Literal["high", "low"] | None = None  # accepted, not used
    strength: float | None = None  # Easel's own


class VariationRequest(ImageRequest):
    prompt: str | None = None  # Easel's own: else the image's own prompt, if it carries one
    strength: float | None = None  # Easel's own


@dataclass
class Output:
    """How the images are handed back."""

    kind: Kind  # the events' prefix when streaming
    response_format: str  # "b64_json" or "url"
    output_format: str  # "png", "jpeg" or "webp"
    compression: int  # JPEG and WebP quality, 0..100
    quality: str  # as reported
    stream: bool
    partial_images: int
    base_url: str  # for url answers


def parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """``data`` as ``model``, or the first problem as OpenAI words it (400)."""
    for name, value in data.items():
        check_text(name, "parameter names")
        if isinstance(value, str):
            check_text(value, name)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "body"
        shown = _shown(first.get("input"))
        if first["type"] == "missing":
            raise MissingRequiredParameter(
                f"Missing required parameter: {name!a}.", field=name
            ) from None
        if first["type"] == "extra_forbidden":
            raise UnknownParameter(
                f"Unrecognized request argument supplied: {name!a}.", field=name
            ) from None
        if first["type"].endswith("_type") or first["type"].endswith("_parsing"):
            raise InvalidType(
                f"Invalid type for {name!a}: {first['msg']} (got {shown}).", field=name
            ) from None
        raise InvalidParams(
            f"Invalid value for {name!a}: {first['msg']} (got {shown}).", field=name
        ) from None


def _shown(value: Any) -> str:
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


async def json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise MalformedJSON(f"We could not parse the JSON body of your request ({exc}).") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def form_body(request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """A multipart form's text fields and its files (by field name; ``image[]`` counts as
    ``image``)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest(
            "This endpoint takes multipart/form-data (the image files and the other "
            f"parameters as form fields); got Content-Type {_shown(content_type)}."
        )
    form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    for name, value in form.multi_items():
        key = name.removesuffix("[]")
        if isinstance(value, UploadFile):
            files.setdefault(key, []).append(await value.read())
        elif key in ("image", "mask"):
            raise InvalidType(f"Invalid type for {key!a}: expected a file.", field=key)
        else:
            fields[name] = value
    await form.close()
    return fields, files


def output_of(options: ImageRequest, kind: Kind, base_url: str) -> Output:
    """How to answer, from the request's options; refuses what Easel cannot make."""
    fmt = getattr(options, "output_format", None) or "png"
    if fmt not in FORMATS:
        raise InvalidParams(
            f"Invalid value for 'output_format': Easel makes png, jpeg or webp (got {fmt!a}).",
            field="output_format",
        )
    if getattr(options, "background", None) == "transparent":
        raise InvalidParams(
            "Invalid value for 'background': Easel's models paint opaque images; ask for "
            "'opaque' or 'auto'.",
            field="background",
        )
    quality = getattr(options, "quality", None) or "auto"
    compression = getattr(options, "output_compression", None)
    stream = bool(getattr(options, "stream", False))
    return Output(
        kind=kind,
        # events carry the image itself, as OpenAI's do
        response_format="b64_json" if stream else options.response_format or "b64_json",
        output_format=fmt,
        compression=100 if compression is None else compression,
        quality=QUALITY[quality][1],
        stream=stream,
        partial_images=getattr(options, "partial_images", None) or 0,
        base_url=base_url,
    )


def size_of(size: str | None) -> tuple[int | None, int | None]:
    """``"auto"`` or none: the model's (an edit's: its input's); ``"WxH"``: that."""
    if size is None or size == "auto":
        return None, None
    match = SIZE.fullmatch(size)
    if match is None:
        raise InvalidParams(
            f"Invalid value for 'size': expected 'auto' or WIDTHxHEIGHT such as '512x512' "
            f"(got {_shown(size)}).",
            field="size",
        )
    return int(match[1]), int(match[2])


# --- one job ------------------------------------------------------------------------------------

# Easel's fields named in an error -> the OpenAI parameter the client sent
RENAMED = {"width": "size", "height": "size", "num_images": "n"}


def submit(
    services: Services,
    principal: Principal,
    params: GenerationParams,
    quality: str | None,
) -> JobRecord:
    """Map the model name and the quality, then queue the job (in a worker thread: these are
    database reads and writes). Errors name the OpenAI parameter."""
    try:
        params.model = catalog_model(services, params.model)
        if params.num_inference_steps is None and quality is not None:
            params.num_inference_steps = steps_for(services, principal, params.model, quality)
        return services.submit_with_uploads(params, principal)  # a refusal leaves no uploads
    except InvalidParams as exc:
        param = RENAMED.get(exc.field or "")
        if param is None and exc.field == "num_inference_steps" and quality is not None:
            param = "quality"
        if param is None:
            raise
        raise type(exc)(f"{param}: {exc.message}", field=param) from None


def catalog_model(services: Services, name: str | None) -> str | None:
    """The catalog model a request's ``model`` names: None (the server's default) for an
    OpenAI model name, unless the catalog has an entry of that very name."""
    if not name or not OPENAI_MODEL.match(name):
        return name or None
    return name if name in {r.id for r in services.catalog.list()} else None


def steps_for(services: Services, principal: Principal, model: str | None, quality: str) -> int:
    factor = QUALITY[quality][0]
    info = services.model_info(model or services.settings.default_model, principal)
    default = int(info.defaults.get("num_inference_steps", 1))
    return max(1, min(info.family.max_steps, round(default * factor)))


def take_slot(request: Request, principal: Principal) -> Slot:
    """A waiting request holds a subscription as an event stream does: it takes a stream slot
    (429/503 past the caps, before any job is made)."""
    slots: StreamSlots = request.app.state.streams
    return slots.take(client_of(principal, request.client.host if request.client else None))


async def run(
    request: Request,
    services: Services,
    principal: Principal,
    params: GenerationParams,
    output: Output,
    quality: str | None,
    *,
    inputs: list[tuple[int, int]] | None = None,
    revised_prompt: str | None = None,
) -> Response:
    """Queue the job, wait for it (or stream it), and answer as OpenAI does."""
    slot = take_slot(request, principal)
    try:
        job = await asyncio.to_thread(submit, services, principal, params, quality)
    except BaseException:
        slot.release()
        raise
    if output.stream:
        return EventStreamResponse(
            stream_job(services, principal, job, output, inputs or []),
            slot=slot,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        async for _ in services.subscribe(job.id):  # to the job's final event (or shutdown)
            pass
    finally:
        slot.release()
    job = await asyncio.to_thread(services.get_job, job.id, principal)
    if job.status is not JobStatus.SUCCEEDED:
        # the job ran (or stays queued): a retry by the client would make another
        status, kind, message = job_problem(job)
        return JSONResponse(
            error_body(request.url.path, status, kind, message, None),
            status_code=status,  # as is: a canceled job is 409, ConflictError
            headers={"x-should-retry": "false"},
        )
    body = await asyncio.to_thread(
        images_response, services, principal, job, output, inputs or [], revised_prompt
    )
    return JSONResponse(body)


def job_problem(job: JobRecord) -> tuple[int, str, str]:
    """(status, error type, message) for a job that did not succeed."""
    if job.status is JobStatus.FAILED:
        return 500, "JobFailed", f"job {job.id} failed: {job.error}"
    if job.status is JobStatus.CANCELED:
        return 409, "JobCanceled", f"job {job.id} was canceled"
    # the server is stopping: the job waits in the queue for the next start
    return (
        503,
        "ServerStopping",
        f"the server is stopping; job {job.id} stays queued and runs after the restart "
        f"(GET /api/v1/jobs/{job.id})",
    )


# --- answers ------------------------------------------------------------------------------------


def images_response(
    services: Services,
    principal: Principal,
    job: JobRecord,
    output: Output,
    inputs: list[tuple[int, int]],
    revised_prompt: str | None,
) -> dict[str, Any]:
    """OpenAI's ``ImagesResponse`` for a finished job."""
    data = []
    for image in job.images:
        item: dict[str, Any]
        if output.response_format == "url":
            item = {"url": output.base_url + image_url(image.id)}
        else:
            png = services.image_bytes(image.id, principal)
            item = {"b64_json": b64(encoded(png, output))}
        if revised_prompt is not None:
            item["revised_prompt"] = revised_prompt
        data.append(item)
    params = job.params
    body: dict[str, Any] = {
        "created": int(time.time()),
        "data": data,
        "background": "opaque",
        # a URL serves the stored PNG, whatever was asked
        "output_format": "png" if output.response_format == "url" else output.output_format,
        "quality": output.quality,
        "size": f"{params.width}x{params.height}",
        "usage": usage(params, inputs),
    }
    return body


def encoded(png: bytes, output: Output) -> bytes:
    """The stored PNG (with its metadata) as asked: itself, or re-encoded as JPEG or WebP."""
    if output.output_format == "png":
        return png
    with Image.open(io.BytesIO(png)) as image:
        return convert(image, output)


def convert(image: Image.Image, output: Output) -> bytes:
    buffer = io.BytesIO()
    fmt = FORMATS[output.output_format]
    if fmt == "PNG":
        image.save(buffer, format=fmt)
    else:
        image.convert("RGB").save(buffer, format=fmt, quality=output.compression)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def usage(params: GenerationParams, inputs: list[tuple[int, int]]) -> dict[str, Any]:
    """Token counts as OpenAI reports them, counted Easel's way: a prompt's words, and an
    image's 16×16 patches (Easel bills nothing; clients that log usage get stable numbers)."""
    assert params.width is not None and params.height is not None
    text = len(params.prompt.split())
    image_in = sum(patches(w, h) for w, h in inputs)
    image_out = patches(params.width, params.height) * params.num_images
    return {
        "input_tokens": text + image_in,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image_in},
        "output_tokens": image_out,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": image_out},
        "total_tokens": text + image_in + image_out,
    }


def patches(width: int, height: int) -> int:
    return math.ceil(width / PATCH) * math.ceil(height / PATCH)


# --- streaming ----------------------------------------------------------------------------------


async def stream_job(
    services: Services,
    principal: Principal,
    job: JobRecord,
    output: Output,
    inputs: list[tuple[int, int]],
) -> AsyncIterator[str]:
    """Server-Sent Events of one job as OpenAI streams an image: ``partial_images`` partial
    images spread over the run (partial k once the run is (k + 1) / (partial_images + 1)
    done, from the next preview; fewer when the run has fewer previews), then a completed
    event per image, or an ``error`` event."""
    params = job.params
    sent = 0
    async with aclosing(with_ticks(services.subscribe(job.id), KEEPALIVE_S)) as events:
        async for event in events:
            if event is None:
                yield ": keep-alive\n\n"
                continue
            if event.type == "progress" and sent < output.partial_images:
                preview = event.data.get("preview")
                step, total = event.data.get("step", 0), event.data.get("total", 1)
                if preview and step * (output.partial_images + 1) >= total * (sent + 1):
                    image = await asyncio.to_thread(partial_image, preview, params, output)
                    yield sse(
                        f"{output.kind}.partial_image",
                        {**common(params, output), "b64_json": image, "partial_image_index": sent},
                    )
                    sent += 1
    done = await asyncio.to_thread(services.get_job, job.id, principal)
    if done.status is not JobStatus.SUCCEEDED:  # the SDK raises APIError with the message
        status, kind, message = job_problem(done)
        yield sse("error", {"type": "error", **error_body("/v1/", status, kind, message, None)})
        return
    answer = await asyncio.to_thread(
        images_response, services, principal, done, output, inputs, None
    )
    for item in answer["data"]:
        yield sse(
            f"{output.kind}.completed",
            {**common(params, output), "b64_json": item["b64_json"], "usage": answer["usage"]},
        )


def common(params: GenerationParams, output: Output) -> dict[str, Any]:
    return {
        "created_at": int(time.time()),
        "size": f"{params.width}x{params.height}",
        "quality": output.quality,
        "background": "opaque",
        "output_format": output.output_format,
    }


def partial_image(preview: str, params: GenerationParams, output: Output) -> str:
    """A progress preview (a small JPEG data URL) at the job's size, in the asked format."""
    assert params.width is not None and params.height is not None
    data = base64.b64decode(preview.partition(",")[2])
    with Image.open(io.BytesIO(data)) as image:
        full = image.convert("RGB").resize((params.width, params.height), Image.Resampling.BICUBIC)
    return b64(convert(full, output))


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n"


# --- the routes ---------------------------------------------------------------------------------


def params_of(options: ImageRequest, prompt: str, **more: Any) -> GenerationParams:
    width, height = size_of(options.size)
    return GenerationParams(
        prompt=prompt,
        model=options.model,
        negative_prompt=options.negative_prompt or "",
        num_inference_steps=options.num_inference_steps,
        guidance_scale=options.guidance_scale,
        width=width,
        height=height,
        seed=options.seed,
        num_images=options.n or 1,
        scheduler=options.scheduler,
        **more,
    )


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@router.post("/images/generations")
async def create_image(
    request: Request, services: ServicesDep, principal: PrincipalDep
) -> Response:
    """OpenAI's ``images.generate``: a txt2img job."""
    options: GenerateRequest = parse(GenerateRequest, await json_body(request))
    output = output_of(options, "image_generation", base_url(request))
    params = params_of(options, options.prompt)
    return await run(request, services, principal, params, output, options.quality)


@router.post("/images/edits")
async def edit_image(request: Request, services: ServicesDep, principal: PrincipalDep) -> Response:
    """OpenAI's ``images.edit``: inpainting where the mask's alpha is 0 (white in a mask
    without alpha), or img2img of the whole image without a mask."""
    fields, files = await form_body(request)
    options: EditRequest = parse(EditRequest, fields)
    output = output_of(options, "image_edit", base_url(request))
    image, mask = one_file(files, "image", required=True), one_file(files, "mask")
    unknown = sorted(set(files) - {"image", "mask"})
    if unknown:
        raise UnknownParameter(
            f"Unrecognized request argument supplied: {unknown[0]!a}.", field=unknown[0]
        )
    assert image is not None
    size_of(options.size)  # checked before anything is stored
    stored = await asyncio.to_thread(
        store_inputs, services, principal, {"image": image, "mask": mask}
    )
    params = params_of(
        options,
        options.prompt,
        task="inpaint" if "mask" in stored else "img2img",
        image=stored["image"][0],
        mask=stored["mask"][0] if "mask" in stored else None,
        strength=options.strength,
    )
    inputs = [size for _, size in stored.values()]
    return await run(request, services, principal, params, output, options.quality, inputs=inputs)


@router.post("/images/variations")
async def create_variation(
    request: Request, services: ServicesDep, principal: PrincipalDep
) -> Response:
    """OpenAI's ``images.create_variation``: img2img of the image, with the prompt it was
    made from when it carries Easel's metadata (``revised_prompt`` says which prompt)."""
    fields, files = await form_body(request)
    options: VariationRequest = parse(VariationRequest, fields)
    output = output_of(options, "variation", base_url(request))
    image = one_file(files, "image", required=True)
    unknown = sorted(set(files) - {"image"})
    if unknown:
        raise UnknownParameter(
            f"Unrecognized request argument supplied: {unknown[0]!a}.", field=unknown[0]
        )
    assert image is not None
    size_of(options.size)  # checked before anything is stored
    stored = await asyncio.to_thread(store_inputs, services, principal, {"image": image})
    image_id, size = stored["image"]
    prompt = options.prompt
    if not prompt:
        prompt = await asyncio.to_thread(stored_prompt, services, image)
    params = params_of(options, prompt, task="img2img", image=image_id, strength=options.strength)
    return await run(
        request, services, principal, params, output, None, inputs=[size], revised_prompt=prompt
    )


def one_file(files: dict[str, list[bytes]], name: str, *, required: bool = False) -> bytes | None:
    given = files.get(name, [])
    if not given:
        if required:
            raise MissingRequiredParameter(
                f"Missing required parameter: {name!a} (a file).", field=name
            )
        return None
    if len(given) > 1:
        raise InvalidParams(
            f"Invalid value for {name!a}: Easel edits one image per request (got {len(given)}).",
            field=name,
        )
    return given[0]


def store_inputs(
    services: Services, principal: Principal, files: dict[str, bytes | None]
) -> dict[str, tuple[str, tuple[int, int]]]:
    """Check and store the input image (and mask) as the key's uploads (checked like
    ``POST /api/v1/images``): field -> (image id, (width, height))."""
    stored: dict[str, tuple[str, tuple[int, int]]] = {}
    for name, data in files.items():
        if data is None:
            continue
        try:
            record = services.upload_image(data, principal)
        except InvalidParams as exc:
            for image_id, _ in stored.values():  # the image stored before a bad mask goes too
                services.discard_upload(image_id, principal)
            raise InvalidParams(
                exc.message.replace("file", name, 1) if exc.field == "file" else exc.message,
                field=name,
            ) from None
        stored[name] = (record.id, (record.width, record.height))
    return stored


def stored_prompt(services: Services, png: bytes) -> str:
    """The prompt an Easel image was made from (its metadata), else a neutral one."""
    try:
        easel = services.read_image_info(png).get("easel") or {}
    except EaselError:
        return VARIATION_PROMPT
    prompt = easel.get("prompt") if isinstance(easel, dict) else None
    return prompt if isinstance(prompt, str) and prompt.strip() else VARIATION_PROMPT


@router.get("/models")
def list_models(services: ServicesDep) -> dict[str, Any]:
    """OpenAI's ``models.list``: the catalog models this machine has."""
    return {
        "object": "list",
        "data": [
            model_object(info.record) for info in services.list_models() if info.record.available
        ],
    }


@router.get("/models/{model}")
def get_model(model: str, services: ServicesDep) -> dict[str, Any]:
    """OpenAI's ``models.retrieve``: one catalog model (404 ``model_not_found``)."""
    check_text(model, "model")
    for info in services.list_models():
        if info.record.id == model:
            return model_object(info.record)
    raise ModelNotFound(f"The model {model!a} does not exist (see GET /v1/models).", field="model")


def model_object(record: ModelRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "model",
        "created": 0,
        "owned_by": "easel" if record.builtin else "user",
    }
