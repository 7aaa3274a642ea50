"""The engine: generation requests in, images out.

    >>> engine = Engine(ModelManager(settings, ModelCatalog(settings)), settings,
    ...                 loras=LoraCatalog(settings))  # doctest: +SKIP
    >>> result = engine.generate(GenerationParams(prompt="a red circle", seed=7, num_images=2))
    >>> result.seeds
    [7, 8]
    >>> engine.generate_batch([GenerationRequest(a), GenerationRequest(b)])  # doctest: +SKIP
    [GenerationResult(...), GenerationResult(...)]

Reproducibility rules (tests hold the engine to them):

- image i of a request has its own CPU ``torch.Generator`` seeded ``seed + i``, and equals the
  single-image request with seed ``seed + i`` bit for bit, whether it shares a pipeline call
  with the request's other images or with other requests' (dynamic batching: up to
  ``settings.max_batch`` images of requests with equal ``domain.batch_key`` per call). Batched
  kernels round differently from single ones, so a call over several images computes its
  layers in single-image slices (engine.batching); ``easel generate --from IMAGE`` reproduces
  any image exactly.
- the noise comes from a CPU generator (diffusers moves it to the device), so a seed gives the
  same starting noise on every device.
- a call of one image is exactly the bare diffusers call: same components, scheduler, generator
  and arguments; the engine only adds a ``callback_on_step_end`` that reads latents and, when
  previews are on, a watch on the scheduler's ``step()`` that keeps references to the step's
  tensors (previews show the denoised estimate; engine.preview). Pixels are the same either way.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from easel.config import Settings
from easel.domain import (
    IMAGE_FIELDS,
    TASK_SPECS,
    CancelCheck,
    Canceled,
    GenerationParams,
    GenerationRequest,
    GenerationResult,
    InputImages,
    InvalidParams,
    Progress,
    ProgressCallback,
    batch_key,
)
from easel.engine import guidance
from easel.engine.batching import solo_shapes
from easel.engine.preview import Previewer, TinyDecoders
from easel.engine.schedulers import make_scheduler
from easel.engine.tasks import RUNNERS, Row
from easel.imaging import pixel_hash
from easel.models.cpu_graph import batches_exactly
from easel.models.families import get_family
from easel.models.loader import LoadedModel, ModelManager
from easel.models.loras import LoraCatalog
from easel.models.params import resolve_params

# family -> the tokenizer whose tokens reach the denoiser. SD/SDXL: CLIP (77 tokens, SDXL's
# second CLIP has the same limit); Flux: T5 (CLIP only gives a pooled vector, always cut at 77);
# Z-Image: Qwen, on the chat-templated prompt. Flux and Z-Image cut at the pipeline's
# ``max_sequence_length``.
_PROMPT_TOKENIZER = {"sd": "tokenizer", "sdxl": "tokenizer", "flux": "tokenizer_2"}


class Engine:
    """Runs generation requests on models from a ModelManager, one call per model at a time."""

    def __init__(
        self, models: ModelManager, settings: Settings, *, loras: LoraCatalog | None = None
    ) -> None:
        self.models = models
        self.settings = settings
        # the LoRAs requests may name (default: the ones in settings.loras_dir)
        self.loras = loras if loras is not None else LoraCatalog(settings)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # each model's scheduler config as loaded, before the engine swapped any scheduler in
        self._scheduler_configs: dict[tuple[str, str], dict[str, Any]] = {}
        # the tiny preview decoders (TAESD family) found in the local cache, loaded once
        self.preview_decoders = TinyDecoders()

    def describe(self) -> dict[str, Any]:
        """Where this engine runs and what it holds, for a worker's status (never waits for a
        model load): ``{"node": hostname, "pid", "models": loaded ids, "loads": {model: loads
        from disk}, "load_seconds": {model: seconds}}``."""
        return {
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "models": self.models.loaded(wait=False),
            "loads": self.models.loads(),
            "load_seconds": self.models.load_seconds(),
        }

    def generate(
        self,
        params: GenerationParams,
        *,
        inputs: InputImages | None = None,
        on_progress: ProgressCallback | None = None,
        is_canceled: CancelCheck | None = None,
    ) -> GenerationResult:
        """Make ``params.num_images`` images; image i uses seed ``params.seed + i``.

        ``inputs`` holds the decoded images an editing task names (``params.task``; see
        ``domain.TASK_SPECS``). ``on_progress`` gets a Progress after every denoising step
        (steps count on across the images; a preview every ``settings.preview_every`` steps).
        Raises ``Canceled`` at the first step end after ``is_canceled()`` turns true,
        InvalidParams for a bad request, ModelNotFound / ModelNotAvailable for a model that
        cannot be used. The batch of one of :meth:`generate_batch`.
        """
        request = GenerationRequest(params, inputs, on_progress, is_canceled)
        (outcome,) = self.generate_batch([request])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def generate_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | Exception]:
        """Generate several requests together. Those with equal ``domain.batch_key`` (same
        model, task, size, steps, scheduler, guidance, LoRAs, ...: all but prompts, seeds and
        input images) share pipeline calls of up to ``settings.max_batch`` images; the others
        run one after another. Each request keeps what it would have alone: its seeds and
        pixels (engine.batching), its progress and previews, and its cancel, which ends that
        request at the next step end while the others go on (the call stops once all of its
        requests are over).

        Returns each request's outcome, in order: its GenerationResult, or the exception that
        ended it (Canceled, InvalidParams, ModelNotFound, a failure of its pipeline call), as
        handed to the request's ``on_end`` the moment it was known.
        """
        started = time.perf_counter()
        jobs = [_Job(request, started) for request in requests]
        # 1. resolve each request against its model's defaults and limits and its inputs' sizes
        for job in jobs:
            try:
                self._resolve(job)
            except Exception as exc:  # InvalidParams, ModelNotFound, ...: this request's own
                job.end(exc)
        # 2. run the requests that may share calls together, the others alone
        groups: dict[object, list[_Job]] = {}
        for job in jobs:
            if job.outcome is None:
                key = batch_key(job.params)
                group = (job.model, key) if key is not None else id(job)
                groups.setdefault(group, []).append(job)
        for group_jobs in groups.values():
            self._run_group(group_jobs)
        outcomes = [job.outcome for job in jobs]
        assert all(o is not None for o in outcomes), "every request ends"
        return [o for o in outcomes if o is not None]

    def _resolve(self, job: _Job) -> None:
        """The request with every field concrete (its model's defaults, its inputs' sizes)."""
        params = job.request.params
        record = self.models.catalog.get(params.model or self.settings.default_model)
        family = get_family(record.family)
        given = {n: image for n in IMAGE_FIELDS if (image := job.inputs.get(n)) is not None}
        sizes = {n: i.size for n, i in given.items()}
        params = resolve_params(params, record, family, sizes, loras=self.loras)
        hashes = {name: pixel_hash(image) for name, image in given.items()}
        job.params = dataclasses.replace(params, input_hashes=hashes or None)
        job.model = record.id
        job.images = [None] * job.params.num_images
        assert job.params.seed is not None and job.params.scheduler is not None

    def _run_group(self, jobs: list[_Job]) -> None:
        """Requests with one batch key (or one request alone): the model set up once, then
        pipeline calls over their images until every request has ended."""
        started = time.perf_counter()
        params = jobs[0].params  # what the batch key covers is the same for all
        record = self.models.catalog.get(jobs[0].model)
        try:
            # 3. take the model: never two calls on one pipeline (or its shared modules) at once
            with self._lock(record.id):
                pipes = {
                    name: self.models.get_pipeline(record.id, name)
                    for name in TASK_SPECS[params.task].pipelines
                }
                first: Any = next(iter(pipes.values())).pipeline
                _check_denoiser_serves(first, record.id, params.task)
                adapter = params.task == "style" and record.ip_adapter is not None
                self.models.use_ip_adapter(record, params.style_strength if adapter else None)
                self.models.use_loras(
                    record, [(self.loras.get(x["id"]), x["weight"]) for x in params.loras or []]
                )

                # 4. count prompt tokens the text encoder will not see
                family = get_family(record.family)
                for job in jobs:
                    job.dropped_tokens = count_dropped_tokens(first, family.name, job.params.prompt)
                setup = time.perf_counter() - started
                for job in jobs:
                    job.compute += setup / len(jobs)

                # 5. run the task over the images, each with its own seed, up to max_batch a call
                limit = (
                    self.settings.batch_limit(self.models.device)
                    if TASK_SPECS[params.task].batches
                    else 1
                )
                if not batches_exactly(getattr(first, "unet", None)):
                    limit = 1  # a batch would leave OpenVINO for PyTorch: other pixels
                while rows := _next_rows(jobs, limit):
                    _BatchCall(self, pipes, rows, adapter).run(RUNNERS[params.task])
        except Exception as exc:  # the model could not be set up, or a bug: all of them fail
            for job in jobs:
                if job.outcome is None:
                    job.end(exc)

    def _lock(self, model_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(model_id, threading.Lock())

    def _base_scheduler_config(self, loaded: LoadedModel) -> dict[str, Any]:
        # Building every scheduler from the original config (not the last one swapped in) keeps
        # one request's choice (say, Karras sigmas) from leaking into the next.
        key = (loaded.record.id, loaded.record.source)
        if key not in self._scheduler_configs:
            self._scheduler_configs[key] = dict(loaded.pipeline.scheduler.config)
        return self._scheduler_configs[key]


class _Job:
    """One request of a batch while it runs: its resolved params, its images so far, and its
    outcome once it has ended."""

    def __init__(self, request: GenerationRequest, started: float) -> None:
        self.request = request
        self.inputs = request.inputs or InputImages()
        self.params = request.params  # resolved by Engine._resolve
        self.model = ""  # the catalog id, once resolved
        self.started = started
        self.images: list[Image.Image | None] = []  # by index; None until made
        self.queued = 0  # images handed to a call so far
        self.done = 0  # images made so far
        self.compute = 0.0  # its share of the seconds spent on it
        self.dropped_tokens = 0
        self.outcome: GenerationResult | Exception | None = None

    @property
    def active(self) -> bool:
        return self.outcome is None

    def check_cancel(self) -> bool:
        """True once the request is over; ends it when its ``is_canceled()`` says so."""
        check = self.request.is_canceled
        if self.outcome is None and check is not None and check():
            self.end(Canceled())
        return self.outcome is not None

    def add_images(self, images: list[tuple[int, Image.Image]]) -> None:
        for index, image in images:
            self.images[index] = image
        self.done += len(images)
        if self.done == len(self.images):
            self.end(
                GenerationResult(
                    images=[i for i in self.images if i is not None],
                    params=self.params,
                    seconds=time.perf_counter() - self.started,
                    dropped_tokens=self.dropped_tokens,
                    compute_seconds=self.compute,
                )
            )

    def end(self, outcome: GenerationResult | Exception) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        if isinstance(outcome, Exception):
            self.images = []  # a canceled or failed request's images are dropped
        if self.request.on_end is not None:
            self.request.on_end(outcome)


def _seed(params: GenerationParams) -> int:
    assert params.seed is not None, "resolved params have a seed"
    return params.seed


def _next_rows(jobs: list[_Job], limit: int) -> list[tuple[_Job, int]]:
    """The next images to make, up to ``limit``: each running request's next images in
    order, the requests in order. A request canceled meanwhile ends here and gives none."""
    rows: list[tuple[_Job, int]] = []
    for job in jobs:
        if len(rows) < limit and job.queued < len(job.images) and not job.check_cancel():
            take = min(limit - len(rows), len(job.images) - job.queued)
            rows += [(job, job.queued + i) for i in range(take)]
            job.queued += take
    return rows


class _Stopped(Exception):  # noqa: N818 - control flow: every request of the call is over
    """Raised from the step callback to end a pipeline call nobody waits for any more."""


class _BatchCall:
    """The pipeline calls that make some images (engine.tasks.Call), each image with its
    request's prompts and its own seed; the step callback reports each request's progress,
    whose count runs on across the calls (a call's ``share`` of the images' steps)."""

    def __init__(
        self,
        engine: Engine,
        pipes: dict[str, LoadedModel],
        rows: list[tuple[_Job, int]],
        ip_adapter: bool = False,
    ) -> None:
        self.engine = engine
        self.pipes = pipes
        self.ip_adapter = ip_adapter
        self.rows = rows
        self.jobs = list({id(job): job for job, _ in rows}.values())
        self.done = 0.0  # share of these images' steps behind us

    def run(self, runner: Any) -> None:
        """Make the images with ``runner`` (engine.tasks) and hand them to their requests; a
        failure ends the requests of the call that are still waiting."""
        started = time.perf_counter()
        try:
            images = runner(self, [Row(job.params, job.inputs, index) for job, index in self.rows])
        except _Stopped:
            return  # every request of the call has ended already
        except Exception as exc:
            for job in self.jobs:
                job.end(exc)
            return
        seconds = (time.perf_counter() - started) / len(self.rows)
        made: dict[int, list[tuple[int, Image.Image]]] = {}
        for (job, index), image in zip(self.rows, images, strict=True):
            job.compute += seconds
            made.setdefault(id(job), []).append((index, image))
        for job in self.jobs:
            if job.active:
                job.add_images(made[id(job)])

    def __call__(
        self, pipeline: str, share: float = 1.0, *, each: Sequence[dict[str, Any]] = (), **args: Any
    ) -> list[Image.Image]:
        loaded = self.pipes[pipeline]
        params = self.rows[0][0].params  # the fields a batch shares (domain.batch_key)
        assert params.scheduler is not None
        pipe: Any = loaded.pipeline  # a concrete pipeline class: callable, family-specific
        pipe.scheduler = make_scheduler(
            params.scheduler,
            self.engine._base_scheduler_config(loaded),
            default_shift=loaded.family.flow_shift,
        )
        settings = self.engine.settings
        watched = any(job.request.on_progress is not None for job in self.jobs)
        callback = _StepCallback(
            self,
            self._previewer(pipe) if settings.preview_every and watched else None,
            settings.preview_every,
            start=self.done,
            share=share,
        )
        per_row: dict[str, list[Any]] = {
            "prompt": [job.params.prompt for job, _ in self.rows],
            "negative_prompt": [job.params.negative_prompt for job, _ in self.rows],
            "generator": [
                torch.Generator("cpu").manual_seed(_seed(job.params) + index)
                for job, index in self.rows
            ],
        }
        for name in each[0] if each else ():
            per_row[name] = [row_args[name] for row_args in each]
        # one image: the very arguments of a bare single-image call; several: lists
        batched = {k: v[0] if len(v) == 1 else v for k, v in per_row.items()}
        if not any(per_row["negative_prompt"]):
            # None and "" mean the same to SD-style CFG; Flux treats any negative prompt as a
            # request for true CFG, so none must be None (a batch's requests all have one or
            # none: domain.batch_key)
            batched["negative_prompt"] = None
        with solo_shapes(pipe, len(self.rows)):
            output = pipe(
                **accepted_args(pipe, {**pipeline_args(params, pipe), **args, **batched}),
                callback_on_step_end=callback,
            )
        self.done += share
        return list(output.images)

    def _previewer(self, pipe: Any) -> Previewer:
        # after the call's scheduler is in place: the previewer watches its step()
        settings, params = self.engine.settings, self.rows[0][0].params
        assert params.width is not None and params.height is not None
        decoders = self.engine.preview_decoders if settings.preview_taesd else None
        return Previewer(pipe, (params.width, params.height), decoders)


def _check_denoiser_serves(pipe: Any, model: str, task: str) -> None:
    """A dedicated inpainting checkpoint's UNet takes the mask and the masked image beside the
    latents (9 channels): it can only run the tasks that give it those."""
    unet = getattr(pipe, "unet", None)
    inpainting = unet is not None and unet.config.in_channels == 9
    if inpainting and "inpaint" not in TASK_SPECS[task].pipelines:
        raise InvalidParams(
            f"model {model} is an inpainting checkpoint (its UNet takes a mask): it serves "
            f"inpaint and outpaint, not {task}",
            field="task",
        )


def accepted_args(pipe: Any, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` less those ``pipe.__call__`` does not take (SD's img2img has no width)."""
    parameters = inspect.signature(pipe.__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return args
    return {k: v for k, v in args.items() if k in parameters}


def pipeline_args(params: GenerationParams, pipe: Any) -> dict[str, Any]:
    """The diffusers ``__call__`` arguments that resolved ``params`` give every image of a
    call: all but the prompts and generators (each image's own), and the step callback, which
    must apply `end_guidance` when ``guidance_end`` is below 1."""
    args: dict[str, Any] = {
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "width": params.width,
        "height": params.height,
        "num_images_per_prompt": 1,
    }
    if params.guidance_end is not None and params.guidance_end < 1:
        # the callback swaps in the text embeddings without the unconditional half
        args["callback_on_step_end_tensor_inputs"] = guidance.tensor_inputs(pipe)
    return args


def count_dropped_tokens(pipe: Any, family: str, prompt: str) -> int:
    """How many tokens of ``prompt`` lie beyond the text encoder's limit (0 when it fits)."""
    if family == "z-image":
        tokenizer = pipe.tokenizer
        # the pipeline wraps the prompt in Qwen's chat template before tokenizing
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
    else:
        tokenizer = getattr(pipe, _PROMPT_TOKENIZER.get(family, "tokenizer"))
    limit = _max_sequence_length(pipe) or tokenizer.model_max_length
    count = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
    return max(0, count - limit)


def _max_sequence_length(pipe: Any) -> int | None:
    parameter = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    return None if parameter is None else int(parameter.default)


class _StepCallback:
    """``callback_on_step_end`` for one pipeline call: each request's cancellation, progress
    and previews; the end of guidance for all."""

    def __init__(
        self,
        call: _BatchCall,
        previewer: Previewer | None,
        preview_every: int,
        *,
        start: float = 0.0,
        share: float = 1.0,
    ) -> None:
        self.call = call
        self.start = start  # share of the images' steps done before this call
        self.share = share  # this call's share
        self.previewer = previewer  # None: no previews
        self.preview_every = preview_every
        # where each request's images sit in the call's batch
        self.places: dict[int, list[int]] = {}
        for place, (job, _) in enumerate(call.rows):
            self.places.setdefault(id(job), []).append(place)

    def __call__(
        self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        jobs = self.call.jobs
        for job in jobs:
            job.check_cancel()  # a canceled request ends now; its images are dropped
        if not any(job.active for job in jobs):
            raise _Stopped()  # unwinds out of the pipeline call: no further step runs
        params = jobs[0].params
        replaced = guidance.end_guidance(pipe, step, params.guidance_end, tensors)
        done = step + 1
        within = self.start + self.share * done / max(pipe.num_timesteps, 1)
        for job in jobs:
            if job.active and job.request.on_progress is not None:
                # progress counts in the request's steps, whatever this call runs (an img2img
                # call runs strength × steps of them; a style image makes two calls)
                per_image = job.params.num_inference_steps or pipe.num_timesteps
                places = self.places[id(job)]
                preview = None
                if self.previewer is not None and done % self.preview_every == 0:
                    preview = self.previewer(pipe, tensors["latents"], index=places[0])
                job.request.on_progress(
                    Progress(
                        step=job.done * per_image + len(places) * round(within * per_image),
                        total=job.params.num_images * per_image,
                        preview=preview,
                    )
                )
        return replaced
