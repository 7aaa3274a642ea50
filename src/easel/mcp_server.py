"""``easel mcp``: Easel's tools for agents, over the Model Context Protocol on stdio.

    easel mcp                                                   # own queue on EASEL_HOME
    EASEL_URL=http://127.0.0.1:7860 EASEL_KEY=SECRET easel mcp   # a running server's queue

An MCP client (Claude Desktop, an agent framework) starts ``easel mcp`` and speaks JSON-RPC over
its stdin and stdout. Tools: ``list_models``, ``generate_image`` (txt2img), ``edit_image``
(img2img, or inpaint with a mask), ``get_job``, ``get_job_images`` and ``cancel_job``. Every
generation and edit is a job in Easel's durable queue, checked as ``POST /api/v1/jobs`` checks
it; images come back as MCP image content (base64 PNG). A bad request is a tool error
(``isError``) that names the field, never the end of the process.

Where the queue is. With a server URL (``--url`` or ``EASEL_URL``) every tool is a call to that
server's REST API with its key (``--key`` or ``EASEL_KEY``): queue, keys, quotas and workers are
the server's, and this process stays small (no torch). Without one, this process runs Easel's
services itself on ``EASEL_HOME`` (recovery, a worker with the real engine), as ``easel serve``
does without HTTP; the home's lock admits one such process, so while a server runs on that home
give its URL instead. Both give the same tools and the same answers (the REST API's JSON).

Input images (``edit_image``'s ``image`` and ``mask``): an Easel image id, a ``data:`` URL or
bare base64, or the path of a file on this machine. The process runs as the user who started it,
so an agent may name any image file that user can read (``--no-files`` turns paths off). What
it names must pass the upload checks here first (a PNG, JPEG or WebP within the size limits):
the bytes of any other file go nowhere, and no error repeats them.

Module-level imports stay light: the CLI imports :func:`register` for every command; ``mcp``,
the services and httpx load in :func:`cmd_mcp`. No ``from __future__ import annotations``: the
tools' annotations are their input schemas, read at run time from closures in
:func:`build_server` (so names only known to type checkers are quoted).
"""

import argparse
import base64
import binascii
import contextlib
import json
import os
import re
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from easel.config import Settings
from easel.domain import EaselError, InvalidParams

if TYPE_CHECKING:
    import httpx
    from mcp.server.mcpserver import MCPServer
    from mcp.types import CallToolResult

    from easel.domain import Principal
    from easel.services import Services

JOB_ID_RE = re.compile(r"[0-9a-f]{32}")  # uuid4().hex
IMAGE_ID_RE = re.compile(r"[0-9a-f]{32}(-[0-9]{1,4})?")  # an upload's uuid4().hex, or JOB-INDEX
FINAL = ("succeeded", "failed", "canceled")
DEFAULT_WAIT_S = 120.0  # generate/edit wait this long for the images, then return the job id
MAX_WAIT_S = 600.0
# The stdio client closes our stdin, waits 2 s, then sends SIGTERM: the in-process worker gets
# this long to finish the running job before it goes back to the queue (the next `easel serve`
# or `easel mcp` on the home runs it), whatever EASEL_DRAIN_TIMEOUT_S says.
LOCAL_DRAIN_S = 1.0
MAX_PATH_CHARS = 4096
INSTALL_HINT = "`easel mcp` needs the MCP extra: pip install 'easel[mcp]'"


# --- the command --------------------------------------------------------------------------------


def register(commands: Any) -> None:
    """Add ``mcp`` to the ``easel`` command's subparsers."""
    parser = commands.add_parser(
        "mcp",
        help="serve Easel's tools to agents over the Model Context Protocol (stdio)",
        description="Speak MCP on stdin/stdout: list models, generate and edit images, read "
        "jobs. With --url (or EASEL_URL) the jobs go to that Easel server; without, this "
        "process runs the queue and a worker on EASEL_HOME itself.",
    )
    parser.add_argument(
        "--url", help="a running Easel server, e.g. http://127.0.0.1:7860 (default: EASEL_URL)"
    )
    parser.add_argument(
        "--key",
        help="its API key (default: EASEL_KEY; prefer the variable: arguments show in `ps`)",
    )
    parser.add_argument(
        "--no-files",
        action="store_true",
        help="refuse file paths as input images (ids and base64 only)",
    )
    parser.set_defaults(func=cmd_mcp)


def cmd_mcp(args: argparse.Namespace) -> None:
    try:
        import mcp.server.mcpserver  # noqa: F401
    except ImportError:
        raise EaselError(INSTALL_HINT) from None
    url = args.url or os.environ.get("EASEL_URL") or None
    key = args.key or os.environ.get("EASEL_KEY") or None
    settings = Settings()
    # 1. the backend, before the protocol starts: a locked home or a bad URL ends here as one
    # line (exit 2). Anything printed meanwhile (torch's notes) must not reach the protocol.
    with _stdout_to_stderr():
        backend = RemoteBackend(url, key) if url else LocalBackend.open(settings, key)
    # 2. serve until the client closes stdin (or sends SIGTERM: then as after Ctrl-C)
    signal.signal(signal.SIGTERM, _interrupt)
    interrupted = False
    try:
        server = build_server(
            backend,
            allow_files=not args.no_files,
            max_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_upload_pixels,
        )
        server.run("stdio")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # 3. a client that closed stdin sends SIGTERM after 2 s: the drain (at most
        # 2 * LOCAL_DRAIN_S) must not be cut short by it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with _stdout_to_stderr():
            backend.close()
    if interrupted:
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)  # the thread reading stdin is blocked in read() and would hold the exit


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr for a while: stdout carries the protocol."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# --- where the jobs go --------------------------------------------------------------------------


class Backend(Protocol):
    """Easel as the tools see it; answers are the REST API's JSON (``ModelPublic``,
    ``JobPublic``); failures are EaselErrors."""

    def models(self) -> list[dict[str, Any]]: ...
    def upload(self, data: bytes) -> str: ...  # the stored image's id
    def submit(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def job(self, job_id: str) -> dict[str, Any]: ...
    def cancel(self, job_id: str) -> dict[str, Any]: ...
    def image(self, image_id: str) -> bytes: ...
    def close(self) -> None: ...


class RemoteError(EaselError):
    """An error answer of the Easel server, with its type and status."""

    def __init__(self, kind: str, message: str, *, field: str | None, status: int) -> None:
        super().__init__(message, field=field)
        self.kind = kind
        self.status = status


class RemoteBackend:
    """Jobs on a running Easel server, through ``/api/v1`` with a Bearer key."""

    def __init__(self, url: str, key: str | None, *, timeout_s: float = 60.0) -> None:
        import httpx

        if not re.match(r"https?://[^/\s]+", url):
            raise EaselError(
                f"--url / EASEL_URL must be an http:// or https:// URL (got {url!r})", field="url"
            )
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # no redirects: a key is for this server only
        self.client = httpx.Client(
            base_url=self.url + "/api/v1", headers=headers, timeout=timeout_s
        )

    def models(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/models").json())

    def upload(self, data: bytes) -> str:
        files = {"file": ("input", data, "application/octet-stream")}
        return str(self._call("POST", "/images", files=files).json()["id"])

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "/jobs", json=body).json())

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/jobs/{_job_id(job_id)}").json())

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/jobs/{_job_id(job_id)}").json())

    def image(self, image_id: str) -> bytes:
        return self._call("GET", f"/images/{_image_id(image_id)}").content

    def close(self) -> None:
        self.client.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> "httpx.Response":
        import httpx

        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise RemoteError(
                "Unreachable",
                f"cannot reach the Easel server at {self.url} ({type(exc).__name__}: {exc}); "
                "is `easel serve` running there? (EASEL_URL)",
                field="url",
                status=503,
            ) from None
        if response.is_success:
            return response
        try:
            error = response.json()["error"]
            kind, message, field = str(error["type"]), str(error["message"]), error.get("field")
        except (ValueError, KeyError, TypeError):
            kind, message, field = (
                "HTTPError",
                f"{method} {path}: HTTP {response.status_code}",
                None,
            )
        if response.status_code == 429 and "retry-after" in response.headers:
            message += f" (retry after {response.headers['retry-after']} s)"
        raise RemoteError(kind, message, field=field, status=response.status_code)


class LocalBackend:
    """Easel's services in this process, on ``settings.home``: the queue, recovery and one
    worker per device with the real engine."""

    def __init__(self, services: "Services", principal: "Principal") -> None:
        self.services = services
        self.principal = principal

    @classmethod
    def open(cls, settings: Settings, key: str | None) -> "LocalBackend":
        """Check the home, build and start the services (raises EaselError: a damaged
        database, another server on the home). With ``key``, jobs belong to that key;
        without, to the local user, as with the CLI. Model paths are refused either way:
        the ``model`` argument takes catalog ids (add models with ``easel models add``)."""
        from dataclasses import replace

        from easel.domain import LOCAL
        from easel.services import build_services, check_home

        settings = settings.model_copy(
            update={"drain_timeout_s": min(settings.drain_timeout_s, LOCAL_DRAIN_S)}
        )
        check_home(settings)
        services = build_services(settings)
        try:
            services.start()
            principal = services.authenticate(key) if key else LOCAL
        except EaselError as exc:
            services.stop()
            if "another Easel server" not in exc.message:
                raise
            raise EaselError(
                exc.message + "; or give that server's URL: EASEL_URL=http://127.0.0.1:7860 "
                "easel mcp",
                field=exc.field,
            ) from None
        return cls(services, replace(principal, may_name_paths=False))

    def models(self) -> list[dict[str, Any]]:
        from easel.api.schemas import ModelPublic

        return [ModelPublic.of(i).model_dump(mode="json") for i in self.services.list_models()]

    def upload(self, data: bytes) -> str:
        return self.services.upload_image(data, self.principal).id

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        from pydantic import ValidationError

        from easel.api.schemas import JobCreate

        try:  # the API's request schema: the same types and ranges as POST /api/v1/jobs
            request = JobCreate.model_validate(body)
        except ValidationError as exc:
            raise _invalid(exc) from None
        job = self.services.submit_job(
            request.to_params(), priority=request.priority, principal=self.principal
        )
        return self._public(job)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._public(self.services.get_job(_job_id(job_id), self.principal))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._public(self.services.cancel_job(_job_id(job_id), self.principal))

    def image(self, image_id: str) -> bytes:
        return self.services.image_bytes(_image_id(image_id), self.principal)

    def close(self) -> None:
        self.services.stop()

    def _public(self, job: Any) -> dict[str, Any]:
        from easel.api.schemas import JobPublic

        eta = None if job.status.final else self.services.job_eta(job.id)
        return JobPublic.of(job, position=job.position, eta_seconds=eta).model_dump(mode="json")


def _invalid(exc: Any) -> InvalidParams:
    """The first problem of a pydantic ValidationError, named as the API names it."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return InvalidParams(f"{field} is not a known field", field=field)
    return InvalidParams(f"{field}: {first['msg']} (got {first.get('input')!r})", field=field)


# Checked before use: also keeps a crafted id ("../keys") out of the server's URL paths.
def _job_id(value: str) -> str:
    if not JOB_ID_RE.fullmatch(value):
        raise InvalidParams(
            f"job_id must be 32 hexadecimal digits (got {value[:80]!r})", field="job_id"
        )
    return value


def _image_id(value: str) -> str:
    if not IMAGE_ID_RE.fullmatch(value):
        raise InvalidParams(
            f"image_id must be an Easel image id (got {value[:80]!r})", field="image_id"
        )
    return value


# --- input images -------------------------------------------------------------------------------


def read_image_arg(
    value: str, field: str, *, allow_files: bool, max_bytes: int, max_pixels: int
) -> str | bytes:
    """An input image argument as a stored image's id (str) or the bytes of an image that
    passed the upload checks (bytes). ``value``: an image id, a ``data:`` URL, base64, or a
    file path (when ``allow_files``). Raises InvalidParams naming ``field``."""
    from easel.imaging import check_structure  # PIL only

    if IMAGE_ID_RE.fullmatch(value):
        return value
    path = _as_path(value)
    if path is not None:
        if not allow_files:
            raise InvalidParams(
                f"{field}: file paths are turned off (easel mcp --no-files); give the image "
                "as base64 or as an Easel image id",
                field=field,
            )
        data = _read_file(path, field, max_bytes)
    else:
        data = _decode_base64(value, field, max_bytes)
    check_structure(data, field, max_pixels)  # before it is sent or stored anywhere
    return data


def _as_path(value: str) -> Path | None:
    """``value`` as a file path, when it names one or looks like one and is not base64
    (a JPEG's base64 starts with "/9j/")."""
    if len(value) > MAX_PATH_CHARS or "\n" in value or value.startswith("data:"):
        return None
    path = Path(value).expanduser()
    try:
        if path.exists():
            return path
    except (OSError, ValueError):  # a name too long, a NUL
        return None
    looks_like_path = value.startswith(("/", "~", "./", "../")) or bool(
        re.search(r"\.(png|jpe?g|webp)$", value, re.IGNORECASE)
    )
    return path if looks_like_path and not _is_base64(value) else None


def _is_base64(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", value)) and len(value) % 4 == 0


def _read_file(path: Path, field: str, max_bytes: int) -> bytes:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise InvalidParams(f"{field}: {path} is not a regular file", field=field)
        if info.st_size > max_bytes:
            raise InvalidParams(
                f"{field}: {path} has {info.st_size} bytes; at most {max_bytes}", field=field
            )
        return path.read_bytes()
    except OSError as exc:
        raise InvalidParams(f"{field}: cannot read {path}: {exc.strerror}", field=field) from None


def _decode_base64(value: str, field: str, max_bytes: int) -> bytes:
    text = value.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidParams(
                f"{field}: a data URL must be data:image/...;base64,<data>", field=field
            )
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:
        raise InvalidParams(f"{field}: the image must be at most {max_bytes} bytes", field=field)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParams(
            f"{field} must be an Easel image id, a file path, or a PNG, JPEG or WebP as "
            "base64 or a data: URL",
            field=field,
        ) from None


# --- the MCP server -----------------------------------------------------------------------------


def build_server(
    backend: Backend, *, allow_files: bool, max_bytes: int, max_pixels: int
) -> "MCPServer[Any]":
    """The MCP server with Easel's tools over ``backend`` (run it with ``.run("stdio")``)."""
    # Annotated parameters are the tools' input schemas, read from the signatures at run time
    from typing import Annotated

    import anyio
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.types import CallToolResult, ToolAnnotations
    from pydantic import Field

    server: MCPServer[Any] = MCPServer(
        "easel",
        instructions="Easel generates and edits images on the user's own machine or server. "
        "Call list_models for model ids and their size and step limits. generate_image and "
        "edit_image queue a job and wait for its images (wait_s); a job still running after "
        "that can be read later with get_job and get_job_images.",
        log_level="WARNING",
    )
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    makes = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)

    async def call(fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args)  # database or HTTP: off the loop

    async def run_job(body: dict[str, Any], wait_s: float, ctx: Context) -> CallToolResult:
        job = await call(backend.submit, {k: v for k, v in body.items() if v is not None})
        job = await wait_for(job, wait_s, ctx)
        return await job_result(job, images=True, failed_is_error=True)

    async def wait_for(job: dict[str, Any], wait_s: float, ctx: Context) -> dict[str, Any]:
        deadline, delay = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S), 0.1
        reported: tuple[Any, ...] = ()
        while job["status"] not in FINAL and time.monotonic() < deadline:
            await anyio.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(delay * 1.5, 1.0)
            job = await call(backend.job, job["id"])
            message = job["status"]
            if job["position"]:
                message += f", place {job['position']} in the queue"
            now = (job["progress"]["step"], job["progress"]["total"] or None, message)
            if now != reported:  # a no-op unless the client asked for progress
                await ctx.report_progress(*now)
                reported = now
        return job

    async def job_result(
        job: dict[str, Any], *, images: bool, failed_is_error: bool = False
    ) -> CallToolResult:
        summary = _summary(job)
        blocks: list[Any] = []
        if images and job["status"] == "succeeded":
            for ref in job["images"]:
                blocks.append(_png_block(await call(backend.image, ref["id"])))
        if job["status"] not in FINAL:
            summary["note"] = (
                "not finished yet: call get_job_images with this job_id later "
                "(get_job for its status)"
            )
        return _result(summary, blocks, error=failed_is_error and job["status"] == "failed")

    def image_arg(value: str, field: str) -> str:
        found = read_image_arg(
            value, field, allow_files=allow_files, max_bytes=max_bytes, max_pixels=max_pixels
        )
        return found if isinstance(found, str) else backend.upload(found)

    Prompt = Annotated[str, Field(description="What to draw.")]
    Model = Annotated[
        str | None, Field(description="A model id from list_models; default: Easel's.")
    ]
    Negative = Annotated[str | None, Field(description="What to avoid.")]
    Steps = Annotated[int | None, Field(description="Denoising steps; default: the model's.", ge=1)]
    Guidance = Annotated[
        float | None, Field(description="Classifier-free guidance; default: the model's.")
    ]
    Seed = Annotated[
        int | None, Field(description="Seed of the first image (image i uses seed+i).", ge=0)
    ]
    Count = Annotated[int, Field(description="How many images.", ge=1)]
    Scheduler = Annotated[
        str | None, Field(description="A sampler of the model's family, e.g. euler, dpmpp_2m.")
    ]
    Wait = Annotated[
        float,
        Field(
            description="Seconds to wait for the images (0: return the job id at once).",
            ge=0,
            le=MAX_WAIT_S,
        ),
    ]

    @server.tool(annotations=read_only)
    async def list_models() -> CallToolResult:
        """The models Easel knows: id, family, tasks (txt2img, img2img, inpaint, ...), default
        size and steps, limits (min_size, max_size, size_multiple, max_steps, max_images),
        and whether each is on this machine (available) and in memory (loaded)."""
        try:
            models = await call(backend.models)
        except EaselError as exc:
            return _failure(exc)
        keep = ("id", "family", "description", "tasks", "defaults", "limits", "available", "loaded")
        return _result({"models": [{k: m.get(k) for k in keep} for m in models]}, [])

    @server.tool(annotations=makes)
    async def generate_image(
        prompt: Prompt,
        ctx: Context,
        model: Model = None,
        negative_prompt: Negative = None,
        width: Annotated[int | None, Field(description="Pixels; default: the model's.")] = None,
        height: Annotated[int | None, Field(description="Pixels; default: the model's.")] = None,
        steps: Steps = None,
        guidance_scale: Guidance = None,
        seed: Seed = None,
        num_images: Count = 1,
        scheduler: Scheduler = None,
        wait_s: Wait = DEFAULT_WAIT_S,
    ) -> CallToolResult:
        """Draw images from a text prompt (txt2img). Queues a job in Easel, waits up to
        wait_s seconds for it and returns the job (id, status, seeds) with its images as
        PNG; if it is not done by then, read it later with get_job_images."""
        body = {
            "task": "txt2img",
            "prompt": prompt,
            "model": model,
            "negative_prompt": negative_prompt,
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "num_images": num_images,
            "scheduler": scheduler,
        }
        try:
            return await run_job(body, wait_s, ctx)
        except EaselError as exc:
            return _failure(exc)

    @server.tool(annotations=makes)
    async def edit_image(
        prompt: Prompt,
        image: Annotated[
            str,
            Field(
                description="The image to edit: an Easel image id (from a job's images), a "
                "PNG/JPEG/WebP as base64 or a data: URL, or a file path on this machine."
            ),
        ],
        ctx: Context,
        mask: Annotated[
            str | None,
            Field(
                description="Inpainting mask of the image's size, given like image: white (or "
                "alpha 0) = repaint, black = keep. Without a mask the whole image is redrawn "
                "(img2img)."
            ),
        ] = None,
        strength: Annotated[
            float | None,
            Field(description="How much is redrawn, 0 < x <= 1; default per task.", gt=0, le=1),
        ] = None,
        width: Annotated[
            int | None,
            Field(description="img2img: pixels; default: the input's aspect at the model's size."),
        ] = None,
        height: Annotated[int | None, Field(description="img2img: pixels (as width).")] = None,
        model: Model = None,
        negative_prompt: Negative = None,
        steps: Steps = None,
        guidance_scale: Guidance = None,
        seed: Seed = None,
        num_images: Count = 1,
        scheduler: Scheduler = None,
        wait_s: Wait = DEFAULT_WAIT_S,
    ) -> CallToolResult:
        """Edit an image with a prompt: img2img, or inpainting where a mask is given (only
        the white part changes, the output has the input's size). img2img works at the
        input's aspect at about the model's default pixel count, or at width x height. Queues
        a job in Easel, waits up to wait_s seconds and returns the job with its images as
        PNG."""
        try:
            body = {
                "task": "inpaint" if mask is not None else "img2img",
                "prompt": prompt,
                "image": await call(image_arg, image, "image"),
                "mask": None if mask is None else await call(image_arg, mask, "mask"),
                "strength": strength,
                "width": width,
                "height": height,
                "model": model,
                "negative_prompt": negative_prompt,
                "num_inference_steps": steps,
                "guidance_scale": guidance_scale,
                "seed": seed,
                "num_images": num_images,
                "scheduler": scheduler,
            }
            return await run_job(body, wait_s, ctx)
        except EaselError as exc:
            return _failure(exc)

    JobId = Annotated[str, Field(description="The job's id (from generate_image or edit_image).")]

    @server.tool(annotations=read_only)
    async def get_job(job_id: JobId) -> CallToolResult:
        """A job's status (queued, running, succeeded, failed, canceled), place in the queue,
        estimated seconds left, progress (step of total), error, and its images' ids and
        seeds (the pixels: get_job_images)."""
        try:
            return await job_result(await call(backend.job, job_id), images=False)
        except EaselError as exc:
            return _failure(exc)

    @server.tool(annotations=read_only)
    async def get_job_images(job_id: JobId) -> CallToolResult:
        """A finished job's images as PNG, with the job's status and seeds; a job not done
        yet answers with its status only."""
        try:
            return await job_result(await call(backend.job, job_id), images=True)
        except EaselError as exc:
            return _failure(exc)

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False))
    async def cancel_job(job_id: JobId) -> CallToolResult:
        """Cancel a job: a queued one never starts, a running one stops at its next step. A
        finished job is left as it is."""
        try:
            return await job_result(await call(backend.cancel, job_id), images=False)
        except EaselError as exc:
            return _failure(exc)

    return server


def _summary(job: dict[str, Any]) -> dict[str, Any]:
    params = job.get("params") or {}
    return {
        "job_id": job["id"],
        "status": job["status"],
        "task": job["task"],
        "model": job["model"],
        "position": job["position"],
        "eta_seconds": job["eta_seconds"],
        "progress": job["progress"],
        "error": job["error"],
        "prompt": params.get("prompt"),
        "images": [{k: ref[k] for k in ("id", "seed", "width", "height")} for ref in job["images"]],
    }


def _png_block(png: bytes) -> Any:
    from mcp.types import ImageContent

    return ImageContent(data=base64.b64encode(png).decode("ascii"), mime_type="image/png")


def _result(
    summary: dict[str, Any], blocks: list[Any], *, error: bool = False, text: str | None = None
) -> "CallToolResult":
    from mcp.types import CallToolResult, TextContent

    block = TextContent(text=text if text is not None else json.dumps(summary, indent=1))
    return CallToolResult(content=[block, *blocks], structured_content=summary, is_error=error)


def _failure(exc: EaselError) -> "CallToolResult":
    """A tool error the agent can act on: the error's type, message and field."""
    kind = getattr(exc, "kind", None) or type(exc).__name__
    error = {"type": kind, "message": exc.message, "field": exc.field}
    return _result({"error": error}, [], error=True, text=f"{kind}: {exc.message}")
