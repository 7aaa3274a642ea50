"""Schedulers by stable name.

Users and stored requests name a sampler (``euler``, ``dpmpp_2m_karras``, ...); this module turns
that name into a fresh diffusers scheduler built ``from_config`` of the model's own scheduler
config, so the model's noise schedule (betas, timestep spacing, prediction type) is kept and only
the sampling algorithm changes. A fresh object per call also keeps scheduler state (step index,
model-output history) out of concurrent calls.

Which names a family allows is the family's business (``Family.schedulers``); eps/v-prediction
models use the first five, flow-matching models (Z-Image, Flux) use ``flow_euler``.

    >>> pipe.scheduler = make_scheduler("dpmpp_2m_karras", base_config)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)


@dataclass(frozen=True)
class SchedulerSpec:
    cls: type[Any]  # a diffusers scheduler class (SchedulerMixin + ConfigMixin)
    overrides: dict[str, Any] = field(default_factory=dict)
    flow: bool = False  # a flow-matching sampler (velocity models), not an eps/v one


SCHEDULERS: dict[str, SchedulerSpec] = {
    "euler": SchedulerSpec(EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "euler_a": SchedulerSpec(EulerAncestralDiscreteScheduler),
    "dpmpp_2m": SchedulerSpec(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": SchedulerSpec(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    # DDIM's own default clips x0 to [-1, 1], which is right for pixels and wrong for latents
    "ddim": SchedulerSpec(DDIMScheduler, {"clip_sample": False}),
    "flow_euler": SchedulerSpec(FlowMatchEulerDiscreteScheduler, flow=True),
}


def make_scheduler(
    name: str, base_config: Mapping[str, Any], *, default_shift: float | None = None
) -> Any:
    """A fresh scheduler ``name`` from the model's original scheduler config.

    For ``flow_euler`` the model's own timestep shift is kept (Z-Image-Turbo 3, Z-Image base 6;
    FLUX.1-dev shifts dynamically); ``default_shift`` (the family's reference value) applies only
    when the model's config has none. Raises KeyError for an unknown name (requests are
    validated against the family's list before they get here).
    """
    spec = SCHEDULERS[name]
    overrides = dict(spec.overrides)
    if spec.flow and "shift" not in base_config and default_shift is not None:
        overrides["shift"] = default_shift
    return spec.cls.from_config(dict(base_config), **overrides)
