"""Schedulers by stable name keep the model's noise schedule and its flow shift."""

from __future__ import annotations

import pytest
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from easel.engine.schedulers import SCHEDULERS, make_scheduler
from easel.models.families import EPS_SCHEDULERS, FLOW_SCHEDULERS

SD_CONFIG = EulerDiscreteScheduler(
    beta_schedule="scaled_linear", timestep_spacing="trailing", prediction_type="v_prediction"
).config


def test_every_family_scheduler_name_has_a_scheduler() -> None:
    assert set(SCHEDULERS) == set(EPS_SCHEDULERS) | set(FLOW_SCHEDULERS)


@pytest.mark.parametrize("name", EPS_SCHEDULERS)
def test_eps_schedulers_keep_the_models_noise_schedule(name: str) -> None:
    scheduler = make_scheduler(name, SD_CONFIG)
    assert isinstance(scheduler, SCHEDULERS[name].cls)
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.prediction_type == "v_prediction"


def test_karras_is_switched_on_and_off_explicitly() -> None:
    karras = make_scheduler("dpmpp_2m_karras", SD_CONFIG)
    assert karras.config.use_karras_sigmas is True
    assert make_scheduler("dpmpp_2m", karras.config).config.use_karras_sigmas is False
    assert make_scheduler("euler", karras.config).config.use_karras_sigmas is False


def test_flow_euler_keeps_the_models_shift_and_defaults_to_the_familys() -> None:
    own = FlowMatchEulerDiscreteScheduler(shift=6.0).config
    assert make_scheduler("flow_euler", own, default_shift=3.0).config.shift == 6.0
    assert make_scheduler("flow_euler", {}, default_shift=3.0).config.shift == 3.0
