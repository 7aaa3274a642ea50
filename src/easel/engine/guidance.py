"""Ending classifier-free guidance early (`guidance_end`), for the SD pipelines' step callbacks.

Free of Easel's server-side imports, so that training (`easel.training.tinyshapes.recipe`, which
also runs as a script on a bare GPU machine) and the evaluator apply it exactly as the engine does.
"""

from __future__ import annotations

from typing import Any

# the step-callback tensors of a pipeline call that applies `end_guidance`: diffusers' default
# (latents, which previews read) and the text embeddings that it replaces
TENSOR_INPUTS = ("latents", "prompt_embeds")
# inpainting pipelines also carry their mask inputs doubled for CFG: halved with the embeddings
CFG_DOUBLED = ("prompt_embeds", "mask", "masked_image_latents")


def tensor_inputs(pipe: Any) -> list[str]:
    """The step-callback tensors `end_guidance` needs from ``pipe`` (a diffusers pipeline)."""
    offered = getattr(pipe, "_callback_tensor_inputs", TENSOR_INPUTS)
    return [*TENSOR_INPUTS, *(n for n in CFG_DOUBLED[1:] if n in offered)]


def end_guidance(
    pipe: Any, step: int, guidance_end: float | None, tensors: dict[str, Any]
) -> dict[str, Any]:
    """For a ``callback_on_step_end``: after the first ``round(steps * guidance_end)`` steps
    (at least one), denoise without classifier-free guidance, from the conditional half only.

    Guidance matters while the layout forms; in the last, low-noise steps it adds little, and
    the bundled model drew small shapes right more often without it there (docs/TRAINING-LOG.md,
    "Results"; Kynkäänniemi et al. 2024 found late guidance unnecessary for large models too).
    Each step after the end costs one batch instead of two. This is diffusers' own switch
    (``do_classifier_free_guidance`` reads ``_guidance_scale``), for the SD pipelines whose
    callbacks may replace ``prompt_embeds``. Returns the tensors to replace.
    """
    if guidance_end is None or guidance_end >= 1 or not pipe.do_classifier_free_guidance:
        return {}
    if step + 1 < max(1, round(pipe.num_timesteps * guidance_end)):
        return {}
    pipe._guidance_scale = 0.0
    # (uncond, cond) -> cond; an inpainting pipeline's mask inputs are doubled likewise
    return {name: tensors[name].chunk(2)[-1] for name in CFG_DOUBLED if name in tensors}


def end_guidance_args(guidance_end: float) -> dict[str, Any]:
    """SD pipeline ``__call__`` arguments that apply `end_guidance` (and no other callback)."""
    return {
        "callback_on_step_end": lambda pipe, step, timestep, tensors: end_guidance(
            pipe, step, guidance_end, tensors
        ),
        "callback_on_step_end_tensor_inputs": list(TENSOR_INPUTS),
    }
