"""The engine on tiny real pipelines of every family, loaded from disk by path."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from PIL import Image

from easel.config import Settings
from easel.domain import Canceled, GenerationParams, InvalidParams, Progress
from easel.engine.generate import Engine, count_dropped_tokens
from easel.models.catalog import ModelCatalog
from easel.models.families import EPS_SCHEDULERS
from easel.models.loader import ModelManager

FAMILY_FIXTURES = {
    "sd": "tiny_sd_path",
    "sdxl": "tiny_sdxl_path",
    "z-image": "tiny_zimage_path",
    "flux": "tiny_flux_path",
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    settings = Settings(home=tmp_path_factory.mktemp("engine-home"), preview_every=2)
    return Engine(ModelManager(settings, ModelCatalog(settings)), settings)


def _params(model: Path, **overrides: object) -> GenerationParams:
    values: dict[str, object] = dict(
        prompt="a red circle",
        model=str(model),
        num_inference_steps=3,
        guidance_scale=5.0,
        width=64,
        height=64,
        seed=11,
    )
    values.update(overrides)
    return GenerationParams(**values)  # type: ignore[arg-type]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_same_seed_is_bit_identical_and_other_seeds_differ(
    engine: Engine, tiny_sd_path: Path
) -> None:
    first = engine.generate(_params(tiny_sd_path)).images[0]
    again = engine.generate(_params(tiny_sd_path)).images[0]
    other = engine.generate(_params(tiny_sd_path, seed=12)).images[0]
    assert np.array_equal(_pixels(first), _pixels(again))
    assert not np.array_equal(_pixels(first), _pixels(other))


@pytest.mark.parametrize("family", list(FAMILY_FIXTURES))
def test_engine_equals_a_bare_diffusers_call(
    engine: Engine, family: str, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(FAMILY_FIXTURES[family])
    flow = family in ("z-image", "flux")
    # the tiny models ship euler (eps) / flow-match euler with the family's shift, so the model's
    # own scheduler, loaded as diffusers would, is what the engine's stable name must give
    scheduler_cls = FlowMatchEulerDiscreteScheduler if flow else EulerDiscreteScheduler
    guidance = 0.0 if flow else 5.0
    params = _params(path, scheduler="flow_euler" if flow else "euler", guidance_scale=guidance)

    result = engine.generate(params)

    pipe = engine.models.get_pipeline(str(path)).pipeline
    scheduler = scheduler_cls.from_pretrained(path, subfolder="scheduler")
    bare = type(pipe)(**{**pipe.components, "scheduler": scheduler})
    bare.set_progress_bar_config(disable=True)
    expected = bare(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=guidance,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(11),
    ).images[0]
    assert np.array_equal(_pixels(result.images[0]), _pixels(expected))


def test_guidance_end_drops_the_unconditional_half_for_the_last_steps(
    engine: Engine, tiny_sd_path: Path
) -> None:
    pipe = engine.models.get_pipeline(str(tiny_sd_path)).pipeline
    batches: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    try:
        full = engine.generate(_params(tiny_sd_path, num_inference_steps=4)).images[0]
        ended = engine.generate(_params(tiny_sd_path, num_inference_steps=4, guidance_end=0.5))
        again = engine.generate(_params(tiny_sd_path, num_inference_steps=4)).images[0]
    finally:
        hook.remove()
    # guided steps run the unconditional and conditional halves together, the rest one half;
    # the next request is guided throughout again
    assert batches == [2, 2, 2, 2] + [2, 2, 1, 1] + [2, 2, 2, 2]
    assert ended.params.guidance_end == 0.5
    assert not np.array_equal(_pixels(full), _pixels(ended.images[0]))
    assert np.array_equal(_pixels(full), _pixels(again))


def test_image_i_equals_a_single_image_request_with_seed_plus_i(
    engine: Engine, tiny_sd_path: Path
) -> None:
    batch = engine.generate(_params(tiny_sd_path, seed=5, num_images=3))
    single = engine.generate(_params(tiny_sd_path, seed=7)).images[0]
    assert batch.seeds == [5, 6, 7]
    assert np.array_equal(_pixels(batch.images[2]), _pixels(single))
    assert not np.array_equal(_pixels(batch.images[0]), _pixels(batch.images[1]))


@pytest.mark.parametrize("max_batch", [1, 4])
def test_progress_counts_up_over_all_images_with_previews(
    engine: Engine, tiny_sd_path: Path, max_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.settings, "max_batch", max_batch)
    seen: list[Progress] = []
    engine.generate(
        _params(tiny_sd_path, num_inference_steps=4, num_images=2), on_progress=seen.append
    )
    # one image per call: image 0's steps, then image 1's; both in one call: two steps a step
    assert [p.step for p in seen] == (list(range(1, 9)) if max_batch == 1 else [2, 4, 6, 8])
    assert {p.total for p in seen} == {8}
    # settings.preview_every = 2: a preview at every second step of each call
    with_preview = [p.step for p in seen if p.preview is not None]
    assert with_preview == ([2, 4, 6, 8] if max_batch == 1 else [4, 8])
    preview = next(p.preview for p in seen if p.preview is not None)
    assert preview is not None and preview.size == (64, 64) and preview.mode == "RGB"


def test_flux_previews_unpack_tokens(engine: Engine, tiny_flux_path: Path) -> None:
    seen: list[Progress] = []
    params = _params(tiny_flux_path, width=96, guidance_scale=0.0, num_inference_steps=2)
    engine.generate(params, on_progress=seen.append)
    assert seen[-1].preview is not None and seen[-1].preview.size == (96, 64)


def test_cancel_stops_at_the_step_it_was_asked(engine: Engine, tiny_sd_path: Path) -> None:
    seen: list[int] = []
    with pytest.raises(Canceled):
        engine.generate(
            _params(tiny_sd_path, num_inference_steps=6, num_images=2),
            on_progress=lambda p: seen.append(p.step),
            is_canceled=lambda: len(seen) >= 2,
        )
    # the two images share calls (max_batch's default on the CPU): each event counts both
    assert seen == [2, 4]


def test_cancel_before_start_runs_no_step(engine: Engine, tiny_sd_path: Path) -> None:
    seen: list[Progress] = []
    with pytest.raises(Canceled):
        engine.generate(_params(tiny_sd_path), on_progress=seen.append, is_canceled=lambda: True)
    assert seen == []


def test_dropped_tokens_are_counted_with_the_encoder_that_matters(
    engine: Engine, tiny_sd_path: Path, tiny_flux_path: Path
) -> None:
    # the tiny CLIP tokenizer is one token per character: 100 + <start> + <end> = 102 > 77
    long_prompt = "a" * 100
    assert engine.generate(_params(tiny_sd_path, prompt=long_prompt)).dropped_tokens == 25
    assert engine.generate(_params(tiny_sd_path)).dropped_tokens == 0
    # Flux's prompt goes to T5 (512 tokens); CLIP's 77-token cut only touches the pooled vector
    flux = dict(guidance_scale=0.0, num_inference_steps=1)
    assert engine.generate(_params(tiny_flux_path, prompt=long_prompt, **flux)).dropped_tokens == 0
    assert engine.generate(_params(tiny_flux_path, prompt="a" * 600, **flux)).dropped_tokens > 0


def test_z_image_counts_tokens_of_the_chat_templated_prompt(
    engine: Engine, tiny_zimage_path: Path
) -> None:
    pipe = engine.models.get_pipeline(str(tiny_zimage_path)).pipeline
    # byte-level tokens: one per "a"; the chat template adds its own tokens on top of the 600
    dropped = count_dropped_tokens(pipe, "z-image", "a" * 600)
    assert dropped > 600 - 512
    assert count_dropped_tokens(pipe, "z-image", "a" * 610) == dropped + 10
    assert count_dropped_tokens(pipe, "z-image", "a" * 400) == 0


def test_every_scheduler_name_runs_and_none_leaks_into_the_next(
    engine: Engine, tiny_sd_path: Path
) -> None:
    images = {}
    for name in EPS_SCHEDULERS:
        images[name] = _pixels(engine.generate(_params(tiny_sd_path, scheduler=name)).images[0])
    assert len({image.tobytes() for image in images.values()}) == len(EPS_SCHEDULERS)
    # after Karras sigmas were used, plain dpmpp_2m still gives what it gave before
    again = engine.generate(_params(tiny_sd_path, scheduler="dpmpp_2m")).images[0]
    assert np.array_equal(_pixels(again), images["dpmpp_2m"])


def test_invalid_request_fails_before_loading(tmp_path: Path, tiny_sdxl_path: Path) -> None:
    settings = Settings(home=tmp_path)
    engine = Engine(ModelManager(settings, ModelCatalog(settings)), settings)
    with pytest.raises(InvalidParams, match="width must be a multiple of 8") as err:
        engine.generate(_params(tiny_sdxl_path, width=100))
    assert err.value.field == "width"
    assert engine.models.loaded() == []
    with pytest.raises(InvalidParams, match="image is required for task img2img") as err:
        engine.generate(_params(tiny_sdxl_path, task="img2img"))
    assert err.value.field == "image"
    assert engine.models.loaded() == []


def test_two_threads_never_share_a_pipeline(engine: Engine, tiny_sd_path: Path) -> None:
    events: list[str] = []

    def run(name: str) -> None:
        def on_progress(p: Progress) -> None:
            events.append(name)
            time.sleep(0.01)  # give the other thread every chance to interleave

        engine.generate(_params(tiny_sd_path, num_inference_steps=4), on_progress=on_progress)

    threads = [threading.Thread(target=run, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "".join(events) in ("aaaabbbb", "bbbbaaaa")
