"""Previews of an image while it is being denoised: the model's current estimate of the final image.

After each denoising step the model has predicted the clean latent x0 (the step then moves the
noisy latent x_t only part of the way towards it). Previews show that estimate, so the first ones
already show the picture's layout, and the last one is the final latent itself, rather than noise
fading away (docs/img/previews-tiny-shapes.png). :class:`StepWatch` reads x0 off the scheduler's ``step()`` for every
scheduler Easel offers (``engine.schedulers``):

- Euler, Euler ancestral, DDIM: the scheduler's own ``pred_original_sample`` (eps and
  v-prediction alike);
- DPM-Solver++ (``dpmpp_2m``, ``dpmpp_2m_karras``): the model output it has converted to x0 and
  keeps in ``model_outputs[-1]`` for its multistep update;
- flow matching (``flow_euler``; Z-Image, Flux): the model predicts a velocity v, and
  x0 = x_t - sigma * v, computed only on steps that send a preview.

It only keeps references to the step's tensors: the pipeline call, and so the final image, is the
same with previews on or off. Flux's packed tokens are unpacked to (B, C, h, w) first.

Then x0 becomes pixels one of two ways:

1. a tiny decoder of the TAESD family (madebyollin's ``taesd`` for SD 1.x/2.x's VAE, ``taesdxl``
   for SDXL's, ``taef1`` for the 16-channel Flux VAE that Z-Image shares), when its diffusers
   weights (``config.json``, ``diffusion_pytorch_model.safetensors``) are in the local Hugging
   Face cache. It is never downloaded: ``hf download madebyollin/taesd`` puts it there. It
   decodes the model's latents as they are (its config's scaling is 1, its shift 0). Its input is
   first averaged down to at most ``TAESD_MAX_LATENT`` latent pixels a side (a 256-pixel picture
   for an 8x VAE), twice the 128 pixels progress events carry, so a preview costs the same small
   decode at any image size.
2. otherwise a linear projection of the latent channels to RGB, ``rgb = latents^T @ factors`` (in
   [-1, 1]) at latent resolution, resized to the output size. Factors belong to one VAE: they
   were fitted by the community on real images (SD 1.5's VAE, also used by SD 2.x and SD-Turbo:
   @torridgristle; SDXL's: @StAlKeR7779; the Flux VAE: as in InvokeAI's Flux preview), and for
   the bundled tiny-shapes model's own VAE by ``bench/fit_preview_factors.py`` (with a bias).
   Any other VAE (the tiny test models, a new architecture) gets no fitted factors, and none are
   fitted on the fly: its first three latent channels, each normalised to [0, 1] by its own min
   and max, stand in for R, G and B. That shows layout and motion, not colour.

A pipeline's VAE is recognised by its config (same latent channels, scaling factor and block
widths), whatever family the pipeline is in.

    >>> previews = Previewer(pipe, (512, 512), TinyDecoders())  # doctest: +SKIP
    >>> image = previews(pipe, latents)  # in callback_on_step_end  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderTiny,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from PIL import Image

from easel.models.catalog import hub_cache_dir

log = logging.getLogger(__name__)

# the longest latent side a tiny decoder gets (larger latents are averaged down to it): 32 latent
# pixels decode to 256 image pixels, twice what progress events carry (jobs.worker.PREVIEW_SIZE)
TAESD_MAX_LATENT = 32
# the files of a TAESD-family repo in diffusers format
TAESD_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


@dataclass(frozen=True)
class KnownVae:
    """A VAE recognised by its config, with its latent -> RGB factors [channel][R, G, B] and
    bias, and the hub repo of its tiny decoder (TAESD family), if one exists."""

    latent_channels: int
    scaling_factor: float
    block_out_channels: tuple[int, ...]
    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    taesd: str | None = None

    def matches(self, config: Mapping[str, Any]) -> bool:
        return (
            config.get("latent_channels") == self.latent_channels
            and math.isclose(config.get("scaling_factor") or 0.0, self.scaling_factor)
            and tuple(config.get("block_out_channels") or ()) == self.block_out_channels
        )


KNOWN_VAES: dict[str, KnownVae] = {
    "sd": KnownVae(
        latent_channels=4,
        scaling_factor=0.18215,
        block_out_channels=(128, 256, 512, 512),
        factors=(
            (0.3444, 0.1385, 0.0670),
            (0.1247, 0.4027, 0.1494),
            (-0.3192, 0.2513, 0.2103),
            (-0.1307, -0.1874, -0.7445),
        ),
        taesd="madebyollin/taesd",
    ),
    "sdxl": KnownVae(
        latent_channels=4,
        scaling_factor=0.13025,
        block_out_channels=(128, 256, 512, 512),
        factors=(
            (0.3816, 0.4930, 0.5320),
            (-0.3753, 0.1631, 0.1739),
            (0.1770, 0.3588, -0.2048),
            (-0.4350, -0.2644, -0.4289),
        ),
        taesd="madebyollin/taesdxl",
    ),
    "flux": KnownVae(
        latent_channels=16,
        scaling_factor=0.3611,
        block_out_channels=(128, 256, 512, 512),
        factors=(
            (-0.0243, 0.0101, 0.0400),
            (0.0491, 0.0718, 0.0799),
            (0.0451, -0.0168, -0.0259),
            (-0.0106, -0.0033, 0.0196),
            (0.0167, 0.0159, -0.0096),
            (-0.0073, 0.0163, 0.0034),
            (0.0369, 0.0804, 0.0819),
            (-0.0170, -0.0390, -0.0654),
            (-0.0218, 0.0041, 0.0432),
            (0.0941, 0.0516, -0.0211),
            (0.0119, 0.0180, 0.0234),
            (0.0503, 0.0268, 0.0144),
            (0.0497, 0.0415, 0.0575),
            (-0.0746, -0.0326, -0.0501),
            (-0.0367, -0.0411, -0.0280),
            (-0.0598, -0.0383, -0.0303),
        ),
        taesd="madebyollin/taef1",
    ),
    # the bundled model's own VAE: fitted by bench/fit_preview_factors.py (a test checks that the
    # bundled VAE still matches; refit when it is retrained)
    "tiny-shapes": KnownVae(
        latent_channels=4,
        scaling_factor=1.0321768522262573,
        block_out_channels=(32, 64, 128),
        factors=(
            (-0.0636, 0.4278, -0.5333),
            (-0.0797, 0.1721, 1.2421),
            (-0.3868, -0.3425, 0.6698),
            (0.1266, 0.0230, 1.4365),
        ),
        bias=(0.1643, -0.0137, -0.0866),
    ),
}


def known_vae(vae_config: Mapping[str, Any]) -> KnownVae | None:
    """The entry of :data:`KNOWN_VAES` this VAE config matches, or None."""
    for vae in KNOWN_VAES.values():
        if vae.matches(vae_config):
            return vae
    return None


def rgb_factors(vae_config: Mapping[str, Any]) -> torch.Tensor | None:
    """The (channels, 3) latent -> RGB factors for this VAE, or None for an unknown VAE."""
    vae = known_vae(vae_config)
    return None if vae is None else torch.tensor(vae.factors)


def find_taesd(vae_config: Mapping[str, Any]) -> Path | None:
    """The snapshot folder of this VAE's tiny decoder in the local Hugging Face cache
    (``HF_HUB_CACHE``, else ``HF_HOME``/hub), or None: an unknown VAE, or the decoder is not
    cached. Looks on disk only; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    vae = known_vae(vae_config)
    if vae is None or vae.taesd is None:
        return None
    folder = None
    for name in TAESD_FILES:
        found = try_to_load_from_cache(vae.taesd, name, cache_dir=hub_cache_dir())
        if not isinstance(found, str):
            return None
        folder = Path(found).parent
    return folder


class TinyDecoders:
    """The TAESD-family decoders loaded so far, one per (folder, device, dtype); thread-safe.

    An engine holds one: a decoder is a few MB and loads in well under a second, once.
    """

    def __init__(self) -> None:
        # None: it failed to load (then previews use the linear projection)
        self._loaded: dict[tuple[str, str, torch.dtype], AutoencoderTiny | None] = {}
        self._lock = threading.Lock()

    def loaded(self) -> list[str]:
        """The folders of the decoders loaded so far (one entry per device and dtype)."""
        with self._lock:
            return [folder for (folder, _, _), taesd in self._loaded.items() if taesd is not None]

    def get(
        self, vae_config: Mapping[str, Any], device: torch.device, dtype: torch.dtype
    ) -> AutoencoderTiny | None:
        """The tiny decoder for this VAE on ``device`` in ``dtype``, or None when it is not
        in the local cache."""
        folder = find_taesd(vae_config)
        if folder is None:
            return None
        key = (str(folder), str(device), dtype)
        with self._lock:
            if key not in self._loaded:
                try:
                    self._loaded[key] = _load_taesd(folder, device, dtype)
                except Exception as error:  # a broken download must not fail the image
                    log.warning("previews: tiny decoder in %s not loaded (%s)", folder, error)
                    self._loaded[key] = None
            return self._loaded[key]


def _load_taesd(folder: Path, device: torch.device, dtype: torch.dtype) -> AutoencoderTiny:
    taesd = AutoencoderTiny.from_pretrained(
        folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True
    )
    taesd.to(device).eval().requires_grad_(False)
    if device.type == "cpu" and dtype == torch.bfloat16:
        taesd.to(memory_format=torch.channels_last)  # oneDNN's bf16 convolutions like NHWC
    return taesd


class StepWatch:
    """Watches a scheduler's ``step()`` so that the step callback can read the denoised estimate.

    Installs a wrapper on this scheduler object only (the engine builds a fresh one per call).
    The wrapper has the original's signature (pipelines look for ``eta`` and ``generator`` in it),
    passes everything through unchanged and keeps references to the last step's model output,
    sample and result; it computes nothing.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._last: tuple[torch.Tensor, torch.Tensor, Any] | None = None
        step = scheduler.step

        @functools.wraps(step)
        def watched(*args: Any, **kwargs: Any) -> Any:
            result = step(*args, **kwargs)
            output = args[0] if args else kwargs["model_output"]
            sample = args[2] if len(args) > 2 else kwargs["sample"]
            self._last = (output, sample, result)
            return result

        scheduler.step = watched

    def denoised(self) -> torch.Tensor | None:
        """x0 as predicted at the last step, in the latents' layout; None before the first
        step or for a scheduler whose estimate is not known here."""
        if self._last is None:
            return None
        model_output, sample, result = self._last
        scheduler = self.scheduler
        kind = type(scheduler)  # (diffusers' classes are loosely typed: no narrowing wanted)
        if issubclass(kind, _RETURNS_ESTIMATE):
            # (prev_sample, pred_original_sample) as a tuple (return_dict=False) or an output
            return result[1] if isinstance(result, tuple) else result.pred_original_sample
        if issubclass(kind, DPMSolverMultistepScheduler):
            # the ++ variants convert the model output to x0; the plain ones to epsilon
            if scheduler.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
                x0: torch.Tensor = scheduler.model_outputs[-1]
                return x0
            return None
        if issubclass(kind, FlowMatchEulerDiscreteScheduler):
            # x_t = (1 - sigma) x0 + sigma noise, v = noise - x0; step() has moved the index on
            sigma = float(scheduler.sigmas[scheduler.step_index - 1])
            return sample - sigma * model_output
        return None


# schedulers whose step() returns x0 as ``pred_original_sample`` (second in its tuple)
_RETURNS_ESTIMATE = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler)


class Previewer:
    """Preview images for one pipeline call: the denoised estimate of the step just taken,
    decoded by the VAE's tiny decoder when cached (and ``decoders`` is given), else projected
    linearly. Build it after the call's scheduler is in place; call it from the step callback.
    """

    def __init__(
        self, pipe: Any, size: tuple[int, int], decoders: TinyDecoders | None = None
    ) -> None:
        self.size = size  # (width, height) of the output image
        self.watch = StepWatch(pipe.scheduler)
        self.vae_config = pipe.vae.config
        known = known_vae(self.vae_config)
        self.factors = None if known is None else torch.tensor(known.factors)
        self.bias = None if known is None else torch.tensor(known.bias)
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        self.dtype = pipe.vae.dtype  # the tiny decoder runs in the VAE's dtype
        self.decoders = decoders
        self.decoder: AutoencoderTiny | None = None
        self._looked = decoders is None  # the decoder is looked up at the first preview

    def __call__(self, pipe: Any, latents: torch.Tensor, index: int = 0) -> Image.Image:
        """The preview of image ``index`` of the batch; ``latents`` (the step's result) stand
        in when the scheduler's estimate is unknown."""
        with torch.no_grad():
            estimate = self.watch.denoised()
            x = (estimate if estimate is not None else latents)[index : index + 1]
            if x.ndim == 3:  # Flux packs 2x2 latent patches into tokens
                # as FluxPipeline._unpack_latents: latent sides are rounded down to even numbers
                scale = self.vae_scale_factor * 2
                width, height = self.size
                x = unpack_tokens(x, 2 * (height // scale), 2 * (width // scale))
            decoder = self._decoder(x.device)
            if decoder is not None:
                return decode_preview(decoder, x, self.size)
            return latents_to_preview(x, self.factors, self.size, bias=self.bias)

    def _decoder(self, device: torch.device) -> AutoencoderTiny | None:
        if not self._looked:
            self._looked = True
            assert self.decoders is not None
            self.decoder = self.decoders.get(self.vae_config, device, self.dtype)
        return self.decoder


def unpack_tokens(latents: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Undo Flux-style packing: (B, h/2 * w/2, C*4) tokens of 2x2 patches -> (B, C, h, w)."""
    batch, _, packed = latents.shape
    channels = packed // 4
    x = latents.reshape(batch, latent_height // 2, latent_width // 2, channels, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, latent_height, latent_width)


def decode_preview(
    decoder: Any, latents: torch.Tensor, size: tuple[int, int] | None = None
) -> Image.Image:
    """RGB preview of the first latent of a (B, C, h, w) batch through a tiny decoder, resized to
    ``size`` (w, h). ``decoder`` is an ``AutoencoderTiny``. Latents over ``TAESD_MAX_LATENT`` a
    side are averaged down first."""
    x = latents[:1].to(device=decoder.device, dtype=decoder.dtype)
    longest = max(x.shape[-2:])
    if longest > TAESD_MAX_LATENT:
        shape = [max(1, round(side * TAESD_MAX_LATENT / longest)) for side in x.shape[-2:]]
        x = F.interpolate(x, size=shape, mode="area")
    # as a pipeline that decodes with an AutoencoderTiny does (TAESD's own config: 1 and 0)
    config = decoder.config
    x = x / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    if decoder.device.type == "cpu" and decoder.dtype == torch.bfloat16:
        x = x.contiguous(memory_format=torch.channels_last)
    rgb = decoder.decode(x).sample[0].float().clamp(-1, 1)  # [-1, 1]
    pixels = rgb.add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(pixels)
    return (
        image
        if size is None or image.size == size
        else image.resize(size, Image.Resampling.BILINEAR)
    )


def latents_to_preview(
    latents: torch.Tensor,
    factors: torch.Tensor | None,
    size: tuple[int, int] | None = None,
    *,
    bias: torch.Tensor | None = None,
) -> Image.Image:
    """RGB preview of the first latent of a (B, C, h, w) batch, resized to ``size`` (w, h).

    ``factors`` (channels, 3) and ``bias`` (3,) come from a :class:`KnownVae`; None gives the
    normalised first-three-channels projection.
    """
    x = latents[0].detach().to(device="cpu", dtype=torch.float32)
    if factors is not None:
        rgb = torch.einsum("chw,cr->hwr", x, factors)
        rgb = (rgb + (bias if bias is not None else 0.0) + 1) / 2
    else:
        channels = x.shape[0]
        rgb = x[[i % channels for i in range(3)]].permute(1, 2, 0)
        low = rgb.amin(dim=(0, 1), keepdim=True)
        high = rgb.amax(dim=(0, 1), keepdim=True)
        rgb = (rgb - low) / (high - low).clamp_min(1e-6)
    pixels = rgb.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    return image if size is None else image.resize(size, Image.Resampling.BILINEAR)
