"""Previews: the denoised estimate x0 of every scheduler, through a cached tiny decoder (TAESD
family) or the linear projection (fitted factors for a known VAE, normalised channels else)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from PIL import Image

from easel.config import Settings
from easel.domain import GenerationParams, Progress
from easel.engine.generate import Engine
from easel.engine.preview import (
    KNOWN_VAES,
    KnownVae,
    Previewer,
    StepWatch,
    TinyDecoders,
    find_taesd,
    known_vae,
    latents_to_preview,
    rgb_factors,
    unpack_tokens,
)
from easel.engine.schedulers import make_scheduler
from easel.models.catalog import TINY_SHAPES_DIR, ModelCatalog
from easel.models.families import EPS_SCHEDULERS
from easel.models.loader import ModelManager
from tests.tiny_models import make_tiny_taesd, populate_hub_cache

SD_VAE = dict(
    latent_channels=4,
    scaling_factor=0.18215,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
)
# SD 1.x's noise schedule, as the tiny SD model and the bundled model have it
SD_SCHEDULE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)
TEST_TAESD = "easel-tests/taesd"
# the tiny test SD model's VAE, made known for a test, with a tiny decoder under TEST_TAESD
TINY_VAE = KnownVae(
    latent_channels=4,
    scaling_factor=0.18215,
    block_out_channels=(8, 16),
    factors=KNOWN_VAES["sd"].factors,
    taesd=TEST_TAESD,
)


# --- the linear projection ----------------------------------------------------------------------


def test_known_vaes_are_recognised_by_their_config() -> None:
    sd = rgb_factors(SD_VAE)
    assert sd is not None and torch.equal(sd, torch.tensor(KNOWN_VAES["sd"].factors))
    sdxl = rgb_factors({**SD_VAE, "scaling_factor": 0.13025})
    assert sdxl is not None and torch.equal(sdxl, torch.tensor(KNOWN_VAES["sdxl"].factors))
    flux = rgb_factors({**SD_VAE, "latent_channels": 16, "scaling_factor": 0.3611})
    assert flux is not None and flux.shape == (16, 3)


def test_known_vaes_name_their_tiny_decoders() -> None:
    assert [KNOWN_VAES[n].taesd for n in ("sd", "sdxl", "flux")] == [
        "madebyollin/taesd",
        "madebyollin/taesdxl",
        "madebyollin/taef1",
    ]


def test_the_bundled_models_vae_has_its_fitted_factors() -> None:
    # bench/fit_preview_factors.py fitted them for this VAE: a retrained one must be refitted
    config = AutoencoderKL.load_config(TINY_SHAPES_DIR / "vae")
    assert known_vae(config) is KNOWN_VAES["tiny-shapes"]


def test_other_vaes_get_no_factors(tiny_sd_path: Path) -> None:
    # the tiny model has SD's channel count and default scaling, but not SD's VAE
    tiny = AutoencoderKL.load_config(tiny_sd_path / "vae")
    assert tiny["latent_channels"] == 4
    assert rgb_factors(tiny) is None
    assert rgb_factors({**SD_VAE, "latent_channels": 8}) is None


def test_factors_project_channels_to_rgb() -> None:
    factors = torch.tensor(KNOWN_VAES["sd"].factors)
    latents = torch.zeros(1, 4, 2, 2)
    latents[0, 3] = 1.0  # SD's 4th channel is mostly "blue-negative": the preview turns yellow
    image = latents_to_preview(latents, factors)
    expected = tuple(round((1 + float(factors[3, c])) / 2 * 255) for c in range(3))
    assert image.size == (2, 2)
    assert image.getpixel((0, 0)) == expected
    shifted = latents_to_preview(latents, factors, bias=torch.tensor([0.5, 0.0, -0.5]))
    assert shifted.getpixel((0, 0))[0] == round((1.5 + float(factors[3, 0])) / 2 * 255)


def test_without_factors_the_first_three_channels_are_normalised() -> None:
    latents = torch.zeros(2, 5, 4, 4)
    latents[0, 0, 0, 0] = 3.0  # bright red corner
    latents[0, 1] = torch.arange(16.0).view(4, 4)  # a green ramp
    image = latents_to_preview(latents, None, size=(4, 4))
    assert image.getpixel((0, 0))[0] == 255 and image.getpixel((1, 0))[0] == 0
    assert image.getpixel((0, 0))[1] == 0 and image.getpixel((3, 3))[1] == 255


def test_preview_is_resized_to_the_output_size() -> None:
    assert latents_to_preview(torch.randn(1, 16, 8, 6), None, (48, 64)).size == (48, 64)


def test_unpack_tokens_inverts_flux_packing() -> None:
    latents = torch.randn(2, 4, 6, 8)
    # Flux packs (B, C, h, w) as (B, h/2 * w/2, C * 2 * 2) tokens
    packed = latents.view(2, 4, 3, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 12, 16)
    assert torch.equal(unpack_tokens(packed, 6, 8), latents)


# --- the denoised estimate ----------------------------------------------------------------------


@pytest.mark.parametrize("name", EPS_SCHEDULERS)
def test_the_watch_reads_each_schedulers_x0(name: str) -> None:
    """Every eps/v scheduler Easel offers: the estimate is the x0 the step itself used."""
    # A model that predicts x0 itself ("sample") makes x0 known: it is the model output. Euler
    # ancestral has no "sample" parametrisation; for epsilon, x0 = x_t - sigma * eps
    prediction = "epsilon" if name == "euler_a" else "sample"
    scheduler = make_scheduler(name, {**SD_SCHEDULE, "prediction_type": prediction})
    watch = StepWatch(scheduler)
    assert watch.denoised() is None
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = torch.randn(1, 4, 8, 8, generator=generator)
        before = x
        x = scheduler.step(output, t, x, generator=generator, return_dict=False)[0]
        estimate = watch.denoised()
        assert estimate is not None
        if prediction == "sample":
            expected = output
        else:
            expected = before - scheduler.sigmas[scheduler.step_index - 1] * output
        torch.testing.assert_close(estimate, expected)
    # the last step lands on the estimate (every offered schedule ends at sigma 0)
    torch.testing.assert_close(x, estimate)


def test_flow_x0_is_where_the_euler_step_points() -> None:
    """Flow matching: x_next = x + (sigma_next - sigma) v, and x0 lies on that line at sigma 0."""
    scheduler = make_scheduler("flow_euler", {"num_train_timesteps": 1000, "shift": 3.0})
    watch = StepWatch(scheduler)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=generator)
    sigmas = scheduler.sigmas.tolist()
    for index, t in enumerate(scheduler.timesteps):
        before = x
        x = scheduler.step(torch.randn(1, 16, 8, 8, generator=generator), t, x)[0]
        sigma, after = sigmas[index], sigmas[index + 1]
        expected = before - sigma * (x - before) / (after - sigma)
        torch.testing.assert_close(watch.denoised(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(watch.denoised(), x)


def test_the_watch_keeps_the_step_signature() -> None:
    # pipelines pass eta and generator only to a step() whose signature names them
    for name, parameter in (("euler_a", "generator"), ("ddim", "eta")):
        scheduler = make_scheduler(name, SD_SCHEDULE)
        StepWatch(scheduler)
        assert parameter in inspect.signature(scheduler.step).parameters


def test_previews_show_the_estimate_long_before_the_noise_is_gone() -> None:
    """The bundled (trained) model, every scheduler: from the second of 8 steps on, previews of
    x0 are much closer to the final image than a preview of the noisy latent x_t would be."""
    settings = Settings(preview_every=1)
    pipe = ModelManager(settings, ModelCatalog(settings)).get_pipeline("tiny-shapes").pipeline
    base = dict(pipe.scheduler.config)
    for name in EPS_SCHEDULERS:
        pipe.scheduler = make_scheduler(name, base)
        noisy, estimated, final = _both_previews(pipe, Previewer(pipe, (64, 64)))
        far = np.mean([_distance(image, final) for image in noisy[1:4]])
        near = np.mean([_distance(image, final) for image in estimated[1:4]])
        assert near < 0.75 * far, (name, near, far)


def _both_previews(
    pipe: Any, previewer: Previewer
) -> tuple[list[Image.Image], list[Image.Image], Image.Image]:
    """Each step's x_t and x0 previews of one bundled-model image, and the image."""
    known = KNOWN_VAES["tiny-shapes"]
    factors, bias = torch.tensor(known.factors), torch.tensor(known.bias)
    noisy: list[Image.Image] = []
    estimated: list[Image.Image] = []

    def step_end(pipe: Any, step: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        noisy.append(latents_to_preview(tensors["latents"], factors, (64, 64), bias=bias))
        estimated.append(previewer(pipe, tensors["latents"]))
        return {}

    final = pipe(
        "a red circle and a blue square on a white background",
        num_inference_steps=8,
        guidance_scale=3.0,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(3),
        callback_on_step_end=step_end,
    ).images[0]
    return noisy, estimated, final


# --- in the engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    settings = Settings(home=tmp_path_factory.mktemp("preview-home"))
    return ModelManager(settings, ModelCatalog(settings))


def _engine(models: ModelManager, **settings: object) -> Engine:
    return Engine(models, models.settings.model_copy(update=settings))


def _request(model: Path, **overrides: object) -> GenerationParams:
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


CASES = [("tiny_sd_path", name) for name in EPS_SCHEDULERS] + [
    ("tiny_zimage_path", "flow_euler"),
    ("tiny_flux_path", "flow_euler"),
]


@pytest.mark.parametrize(("fixture", "scheduler"), CASES)
def test_previews_leave_the_pixels_alone(
    models: ModelManager, fixture: str, scheduler: str, request: pytest.FixtureRequest
) -> None:
    flow = scheduler == "flow_euler"
    params = _request(
        request.getfixturevalue(fixture),
        scheduler=scheduler,
        guidance_scale=0.0 if flow else 5.0,
        width=96 if flow else 64,  # Flux: a packed latent that is not square
    )
    seen: list[Progress] = []
    quiet = _engine(models, preview_every=0).generate(params, on_progress=seen.append)
    assert seen and all(p.preview is None for p in seen)
    seen.clear()
    watched = _engine(models, preview_every=1).generate(params, on_progress=seen.append)
    assert [p.preview.size for p in seen if p.preview is not None] == [(params.width, 64)] * 3
    assert np.array_equal(np.asarray(quiet.images[0]), np.asarray(watched.images[0]))


@pytest.fixture
def taesd_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache (HF_HUB_CACHE) holding a tiny random decoder as
    TEST_TAESD, and the tiny test SD VAE known as a VAE whose tiny decoder that is."""
    cache = tmp_path / "hf-cache"
    populate_hub_cache(cache, TEST_TAESD, make_tiny_taesd(tmp_path / "taesd"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setitem(KNOWN_VAES, "tiny-test", TINY_VAE)
    return cache


def test_the_cache_lookup_finds_a_tiny_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert find_taesd(SD_VAE) is None  # nothing cached: no download is tried
    folder = make_tiny_taesd(tmp_path / "taesd")
    snapshot = populate_hub_cache(cache, "madebyollin/taesd", folder)
    assert find_taesd(SD_VAE) == snapshot
    assert find_taesd({**SD_VAE, "scaling_factor": 0.13025}) is None  # SDXL's is not cached
    decoders = TinyDecoders()
    taesd = decoders.get(SD_VAE, torch.device("cpu"), torch.float32)
    assert isinstance(taesd, AutoencoderTiny)
    saved = AutoencoderTiny.from_pretrained(folder)
    assert all(
        torch.equal(a, b) for a, b in zip(taesd.parameters(), saved.parameters(), strict=True)
    )
    assert decoders.get(SD_VAE, torch.device("cpu"), torch.float32) is taesd  # loaded once
    assert decoders.loaded() == [str(snapshot)]


def test_a_broken_tiny_decoder_leaves_previews_linear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "hf-cache"
    snapshot = populate_hub_cache(cache, "madebyollin/taesd", make_tiny_taesd(tmp_path / "taesd"))
    (snapshot / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    decoders = TinyDecoders()
    assert decoders.get(SD_VAE, torch.device("cpu"), torch.float32) is None
    assert "tiny decoder" in caplog.text and decoders.loaded() == []


def test_previews_come_from_the_cached_tiny_decoder(
    models: ModelManager, tiny_sd_path: Path, taesd_cache: Path
) -> None:
    engine = _engine(models, preview_every=1)
    params = _request(tiny_sd_path)
    pipe = models.get_pipeline(str(tiny_sd_path)).pipeline
    taesd = engine.preview_decoders.get(pipe.vae.config, torch.device("cpu"), pipe.vae.dtype)
    assert taesd is not None
    decoded: list[torch.Tensor] = []
    hook = taesd.decoder.register_forward_hook(lambda m, args, out: decoded.append(out))
    seen: list[Progress] = []
    try:
        result = engine.generate(params, on_progress=seen.append)
    finally:
        hook.remove()
    previews = [p.preview for p in seen if p.preview is not None]
    assert len(previews) == len(decoded) == 3
    for out, preview in zip(decoded, previews, strict=True):  # each preview is its decode
        expected = out[0].float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0)
        assert np.array_equal(np.asarray(preview), expected.numpy())
    quiet = _engine(models, preview_every=0).generate(params)
    assert np.array_equal(np.asarray(quiet.images[0]), np.asarray(result.images[0]))


def test_without_the_tiny_decoder_previews_are_linear(
    models: ModelManager,
    tiny_sd_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setitem(KNOWN_VAES, "tiny-test", TINY_VAE)
    engine = _engine(models, preview_every=1)
    seen: list[Progress] = []
    engine.generate(_request(tiny_sd_path), on_progress=seen.append)
    assert sum(p.preview is not None for p in seen) == 3
    assert engine.preview_decoders.loaded() == []


def test_the_tiny_decoder_can_be_turned_off(
    models: ModelManager, tiny_sd_path: Path, taesd_cache: Path
) -> None:
    engine = _engine(models, preview_every=1, preview_taesd=False)
    seen: list[Progress] = []
    engine.generate(_request(tiny_sd_path), on_progress=seen.append)
    assert sum(p.preview is not None for p in seen) == 3
    assert engine.preview_decoders.loaded() == []


def _distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())
