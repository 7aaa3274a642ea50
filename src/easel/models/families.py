"""Model families: which diffusers pipeline serves each task, the defaults, and the limits.

Pure Python (no torch): the API and UI read limits from here to validate and draw forms.

    >>> get_family("sd").defaults["num_inference_steps"]
    25
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from easel.domain import TASK_SPECS, ModelNotFound

# Stable scheduler names (the engine maps them to diffusers schedulers).
EPS_SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim")
FLOW_SCHEDULERS = ("flow_euler",)


@dataclass(frozen=True)
class Family:
    """One model family: task -> diffusers class name, request defaults, and limits.

    ``kind`` is "eps" for noise-prediction models (SD, SDXL) and "flow" for flow-matching ones;
    ``flow_shift`` is the flow-matching timestep shift the family's checkpoints are trained for.
    """

    name: str
    kind: str
    pipelines: dict[str, str]
    defaults: dict[str, Any]
    size_multiple: int
    min_size: int
    max_size: int
    max_steps: int
    guidance_range: tuple[float, float]
    schedulers: tuple[str, ...]
    max_images: int = 8
    # whether guidance can stop before the last step (``guidance_end`` < 1; engine.end_guidance)
    ends_guidance_early: bool = False
    flow_shift: float | None = None
    description: str = ""
    # hub repo whose configs describe a single-file (.safetensors) checkpoint of this family
    config_repo: str | None = None
    # the one component a single-file checkpoint of this family holds (the rest comes from the
    # config folder); None: the checkpoint holds the whole pipeline (SD, SDXL)
    single_file_component: str | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks whose pipelines this family has (``domain.TASK_SPECS``)."""
        return tuple(
            name
            for name, spec in TASK_SPECS.items()
            if all(p in self.pipelines for p in spec.pipelines)
        )


FAMILIES: dict[str, Family] = {
    "sd": Family(
        name="sd",
        config_repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
        kind="eps",
        description="Stable Diffusion 1.x / 2.x, SD-Turbo",
        pipelines={
            "txt2img": "StableDiffusionPipeline",
            "img2img": "StableDiffusionImg2ImgPipeline",
            "inpaint": "StableDiffusionInpaintPipeline",
        },
        defaults={
            "num_inference_steps": 25,
            "guidance_scale": 7.0,
            "guidance_end": 1.0,
            "width": 512,
            "height": 512,
            "scheduler": "dpmpp_2m",
            "strength": 0.75,
        },
        size_multiple=8,
        min_size=64,
        max_size=2048,
        max_steps=150,
        guidance_range=(0.0, 30.0),
        schedulers=EPS_SCHEDULERS,
        ends_guidance_early=True,
    ),
    "sdxl": Family(
        name="sdxl",
        config_repo="stabilityai/stable-diffusion-xl-base-1.0",
        kind="eps",
        description="Stable Diffusion XL, SDXL-Turbo",
        pipelines={
            "txt2img": "StableDiffusionXLPipeline",
            "img2img": "StableDiffusionXLImg2ImgPipeline",
            "inpaint": "StableDiffusionXLInpaintPipeline",
        },
        defaults={
            "num_inference_steps": 25,
            "guidance_scale": 7.0,
            "guidance_end": 1.0,
            "width": 1024,
            "height": 1024,
            "scheduler": "dpmpp_2m",
            "strength": 0.75,
        },
        size_multiple=8,
        min_size=64,
        max_size=2048,
        max_steps=150,
        guidance_range=(0.0, 30.0),
        schedulers=EPS_SCHEDULERS,
    ),
    "z-image": Family(
        name="z-image",
        config_repo="Tongyi-MAI/Z-Image-Turbo",
        kind="flow",
        description="Z-Image (Turbo): single-stream DiT with a Qwen3 text encoder",
        pipelines={
            "txt2img": "ZImagePipeline",
            "img2img": "ZImageImg2ImgPipeline",
            "inpaint": "ZImageInpaintPipeline",
        },
        # diffusers 0.42 samples sigmas linspace(1, 1/n, n): num_inference_steps == model
        # evaluations, so Z-Image-Turbo's 8 evaluations are 8 steps (older releases needed 9).
        defaults={
            "num_inference_steps": 8,
            "guidance_scale": 0.0,
            "guidance_end": 1.0,
            "width": 1024,
            "height": 1024,
            "scheduler": "flow_euler",
            "strength": 0.6,
        },
        # the VAE downsamples 8x and the transformer packs 2x2 patches
        size_multiple=16,
        min_size=64,
        max_size=2048,
        max_steps=100,
        guidance_range=(0.0, 20.0),
        schedulers=FLOW_SCHEDULERS,
        flow_shift=3.0,
        single_file_component="transformer",
    ),
    "flux": Family(
        name="flux",
        config_repo="black-forest-labs/FLUX.1-schnell",
        kind="flow",
        description="FLUX.1 (schnell defaults: 4 steps, no guidance)",
        pipelines={
            "txt2img": "FluxPipeline",
            "img2img": "FluxImg2ImgPipeline",
            "inpaint": "FluxInpaintPipeline",
        },
        defaults={
            "num_inference_steps": 4,
            "guidance_scale": 0.0,
            "guidance_end": 1.0,
            "width": 1024,
            "height": 1024,
            "scheduler": "flow_euler",
            "strength": 0.6,
        },
        size_multiple=16,
        min_size=64,
        max_size=2048,
        max_steps=100,
        guidance_range=(0.0, 20.0),
        schedulers=FLOW_SCHEDULERS,
        flow_shift=1.0,
        single_file_component="transformer",
    ),
}

# Limit fields a catalog entry may narrow or widen in its ``defaults`` (e.g. tiny-shapes: 32..128).
LIMIT_FIELDS = ("size_multiple", "min_size", "max_size", "max_steps", "max_images")


def get_family(name: str) -> Family:
    """The family called ``name``; raises ModelNotFound listing the known families."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(FAMILIES)
        raise ModelNotFound(
            f"unknown model family {name!r}; known families: {known}", field="family"
        ) from None


def family_for_pipeline(class_name: str) -> Family | None:
    """The family whose pipelines include the diffusers class ``class_name`` (from model_index)."""
    for family in FAMILIES.values():
        if class_name in family.pipelines.values():
            return family
    return None
