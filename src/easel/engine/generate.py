"""The engine: one generation request in, images out.

    >>> engine = Engine(ModelManager(settings, ModelCatalog(settings)), settings,
    ...                 loras=LoraCatalog(settings))  # doctest: +SKIP
    >>> result = engine.generate(GenerationParams(prompt="a red circle", seed=7, num_images=2))
    >>> result.seeds
    [7, 8]

Reproducibility rules (tests hold the engine to them):

- image i of a request is made by its own pipeline call with one CPU ``torch.Generator`` seeded
  ``seed + i``, so it equals the single-image request with seed ``seed + i`` bit for bit. Batching
  the images into one call would be a little faster on a GPU, but batched matrix kernels may
  round differently from single ones, and then ``easel generate --from IMAGE`` could not
  reproduce image i exactly.
- the noise comes from a CPU generator (diffusers moves it to the device), so a seed gives the
  same starting noise on every device.
- the pipeline call is exactly the bare diffusers call: same components, scheduler, generator
  and arguments; the engine only adds a ``callback_on_step_end`` that reads latents.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import time
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
    GenerationResult,
    InputImages,
    InvalidParams,
    Progress,
    ProgressCallback,
)
from easel.engine import guidance
from easel.engine.preview import latents_to_preview, rgb_factors, unpack_tokens
from easel.engine.schedulers import make_scheduler
from easel.engine.tasks import RUNNERS
from easel.imaging import pixel_hash
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
        cannot be used.
        """
        started = time.perf_counter()
        inputs = inputs or InputImages()
        # 1. resolve the request against its model's defaults and limits and its inputs' sizes
        record = self.models.catalog.get(params.model or self.settings.default_model)
        family = get_family(record.family)
        given = {n: image for n in IMAGE_FIELDS if (image := inputs.get(n)) is not None}
        sizes = {n: i.size for n, i in given.items()}
        params = resolve_params(params, record, family, sizes, loras=self.loras)
        hashes = {name: pixel_hash(image) for name, image in given.items()}
        params = dataclasses.replace(params, input_hashes=hashes or None)
        assert params.seed is not None and params.scheduler is not None
        runner = RUNNERS[params.task]

        # 2. take the model: never two calls on one pipeline (or its shared modules) at once
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

            # 3. count prompt tokens the text encoder will not see
            dropped_tokens = count_dropped_tokens(first, family.name, params.prompt)

            # 4. run the task for each image with its own seed
            images = []
            for index in range(params.num_images):
                if is_canceled is not None and is_canceled():
                    raise Canceled()
                call = _ImageCall(self, pipes, params, index, on_progress, is_canceled, adapter)
                images.append(runner(call, params, inputs))

        # 5. report the images with the resolved request that made them
        return GenerationResult(
            images=images,
            params=params,
            seconds=time.perf_counter() - started,
            dropped_tokens=dropped_tokens,
        )

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


class _ImageCall:
    """The pipeline calls that make image ``index`` of a request (engine.tasks.Call): each
    with the request's scheduler, the image's seed, and a step callback whose progress runs on
    across the calls (a call's ``share`` of the image's steps)."""

    def __init__(
        self,
        engine: Engine,
        pipes: dict[str, LoadedModel],
        params: GenerationParams,
        index: int,
        on_progress: ProgressCallback | None,
        is_canceled: CancelCheck | None,
        ip_adapter: bool = False,
    ) -> None:
        self.engine = engine
        self.pipes = pipes
        self.ip_adapter = ip_adapter
        self.params = params
        self.index = index
        self.on_progress = on_progress
        self.is_canceled = is_canceled
        self.done = 0.0  # share of this image's steps behind us

    def __call__(self, pipeline: str, share: float = 1.0, **args: Any) -> Image.Image:
        params, loaded = self.params, self.pipes[pipeline]
        assert params.seed is not None and params.scheduler is not None
        pipe: Any = loaded.pipeline  # a concrete pipeline class: callable, family-specific
        pipe.scheduler = make_scheduler(
            params.scheduler,
            self.engine._base_scheduler_config(loaded),
            default_shift=loaded.family.flow_shift,
        )
        callback = _StepCallback(
            rgb_factors(pipe.vae.config),
            params,
            self.index,
            self.engine.settings.preview_every,
            self.on_progress,
            self.is_canceled,
            start=self.done,
            share=share,
        )
        output = pipe(
            **accepted_args(pipe, {**pipeline_args(params, pipe), **args}),
            generator=torch.Generator("cpu").manual_seed(params.seed + self.index),
            callback_on_step_end=callback,
        )
        self.done += share
        image: Image.Image = output.images[0]
        return image


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
    """The diffusers ``__call__`` arguments for one image of resolved ``params``, but for the
    step callback, which must apply `end_guidance` when ``guidance_end`` is below 1."""
    args: dict[str, Any] = {
        "prompt": params.prompt,
        # None and "" mean the same to SD-style CFG; Flux treats any negative prompt as a request
        # for true CFG, so an empty one must be None
        "negative_prompt": params.negative_prompt or None,
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
    """``callback_on_step_end`` for one image: cancellation, progress, previews."""

    def __init__(
        self,
        preview_factors: torch.Tensor | None,
        params: GenerationParams,
        index: int,
        preview_every: int,
        on_progress: ProgressCallback | None,
        is_canceled: CancelCheck | None,
        *,
        start: float = 0.0,
        share: float = 1.0,
    ) -> None:
        self.start = start  # share of the image's steps done before this call
        self.share = share  # this call's share
        self.preview_factors = preview_factors
        self.params = params
        self.index = index
        self.preview_every = preview_every
        self.on_progress = on_progress
        self.is_canceled = is_canceled

    def __call__(
        self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        if self.is_canceled is not None and self.is_canceled():
            raise Canceled()  # unwinds out of the pipeline call: no further step runs
        replaced = guidance.end_guidance(pipe, step, self.params.guidance_end, tensors)
        if self.on_progress is not None:
            # progress counts in the request's steps, whatever this call runs (an img2img
            # call runs strength × steps of them; a style image makes two calls)
            per_image = self.params.num_inference_steps or pipe.num_timesteps
            done = step + 1
            within = self.start + self.share * done / max(pipe.num_timesteps, 1)
            preview = None
            if self.preview_every and done % self.preview_every == 0:
                preview = self._preview(pipe, tensors["latents"])
            self.on_progress(
                Progress(
                    step=self.index * per_image + round(within * per_image),
                    total=self.params.num_images * per_image,
                    preview=preview,
                )
            )
        return replaced

    def _preview(self, pipe: Any, latents: torch.Tensor) -> Any:
        width, height = self.params.width, self.params.height
        assert width is not None and height is not None
        if latents.ndim == 3:  # Flux packs 2x2 latent patches into tokens
            # as FluxPipeline._unpack_latents: latent sides are rounded down to even numbers
            scale = pipe.vae_scale_factor * 2
            latents = unpack_tokens(latents, 2 * (height // scale), 2 * (width // scale))
        return latents_to_preview(latents, self.preview_factors, (width, height))
