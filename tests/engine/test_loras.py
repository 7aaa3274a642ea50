"""LoRAs at generation on tiny real pipelines: Easel's pixels equal diffusers' own
``load_lora_weights`` + ``set_adapters``, LoRAs stack and switch without reloading the model, no
LoRA (or weight 0) gives the base model's pixels exactly, kohya files apply, and the PNG
metadata carries them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from easel.config import Settings
from easel.domain import GenerationParams, InputImages, InvalidParams
from easel.engine.generate import Engine
from easel.engine.metadata import format_a1111, parse_a1111, parse_png, to_png_bytes
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager
from easel.models.loras import LoraCatalog
from tests.engine.test_generate import FAMILY_FIXTURES
from tests.tiny_models import make_tiny_lora

FLOW = ("z-image", "flux")


def _settings(home: Path) -> Settings:
    # float32: the reference pipelines below load in float32 too
    return Settings(home=home, device="cpu", dtype="float32", preview_every=0, cpu_graphs=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora-home")


@pytest.fixture(scope="module")
def lora_files(
    home: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict[str, Path]:
    """Two LoRAs per family, added to the home's catalog as ``FAMILY.ink`` and
    ``FAMILY.paper``; returns name -> the added file."""
    loras = LoraCatalog(_settings(home))
    files = tmp_path_factory.mktemp("lora-files")
    out = {}
    for family, fixture in FAMILY_FIXTURES.items():
        folder = request.getfixturevalue(fixture)
        for seed, kind in ((1, "ink"), (2, "paper")):
            name = f"{family}.{kind}"
            source = make_tiny_lora(folder, files / f"{name}.safetensors", family, seed=seed)
            out[name] = Path(loras.add(source, name=name, family=family).path)
    return out


@pytest.fixture(scope="module")
def engine(home: Path, lora_files: dict[str, Path]) -> Engine:
    settings = _settings(home)
    return Engine(
        ModelManager(settings, ModelCatalog(settings)), settings, loras=LoraCatalog(settings)
    )


def _params(
    model: Path, family: str, loras: list[dict[str, Any]] | None = None
) -> GenerationParams:
    flow = family in FLOW
    return GenerationParams(
        prompt="a red circle",
        model=str(model),
        num_inference_steps=2,
        guidance_scale=0.0 if flow else 5.0,
        scheduler="flow_euler" if flow else "euler",
        width=64,
        height=64,
        seed=9,
        loras=loras,
    )


def _generate(engine: Engine, model: Path, family: str, **loras: float) -> np.ndarray:
    """The image with the LoRAs FAMILY.NAME at the given weights (none: the plain model)."""
    wanted = [{"id": f"{family}.{name}", "weight": w} for name, w in loras.items()] or None
    return np.asarray(engine.generate(_params(model, family, wanted)).images[0])


def _diffusers(model: Path, family: str, files: list[Path], weights: list[float]) -> np.ndarray:
    """The same request as `_params` on a fresh diffusers pipeline with the LoRAs loaded by
    diffusers itself (no Easel code, no CPU graphs)."""
    index = json.loads((model / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    scheduler_cls = FlowMatchEulerDiscreteScheduler if family in FLOW else EulerDiscreteScheduler
    pipe.scheduler = scheduler_cls.from_pretrained(model, subfolder="scheduler")
    names = [f"lora{i}" for i in range(len(files))]
    for name, file in zip(names, files, strict=True):
        pipe.load_lora_weights(str(file), adapter_name=name)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        guidance_scale=0.0 if family in FLOW else 5.0,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(9),
    ).images[0]
    return np.asarray(image)


@pytest.fixture(params=list(FAMILY_FIXTURES))
def family(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def test_a_lora_changes_the_image_as_diffusers_does_and_none_gives_the_base_pixels(
    engine: Engine, lora_files: dict[str, Path], family: str, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(FAMILY_FIXTURES[family])
    base = _generate(engine, model, family)
    inked = _generate(engine, model, family, ink=0.7)
    assert np.abs(inked.astype(int) - base).mean() > 0.5, "the LoRA changes the image"
    assert np.array_equal(inked, _diffusers(model, family, [lora_files[f"{family}.ink"]], [0.7]))
    assert np.array_equal(_generate(engine, model, family, ink=0.0), base), "weight 0: no effect"
    assert np.array_equal(_generate(engine, model, family), base), "switched off again"


def test_two_loras_stack_as_in_diffusers(
    engine: Engine, lora_files: dict[str, Path], tiny_sd_path: Path
) -> None:
    both = _generate(engine, tiny_sd_path, "sd", ink=0.8, paper=-0.5)
    assert not np.array_equal(both, _generate(engine, tiny_sd_path, "sd", ink=0.8))
    assert not np.array_equal(both, _generate(engine, tiny_sd_path, "sd", paper=-0.5))
    files = [lora_files["sd.ink"], lora_files["sd.paper"]]
    assert np.array_equal(both, _diffusers(tiny_sd_path, "sd", files, [0.8, -0.5]))


def test_switching_loras_never_reloads_the_model_and_plain_calls_replay_graphs(
    engine: Engine, lora_files: dict[str, Path], tiny_sd_path: Path
) -> None:
    manager = engine.models
    pipe = manager.get_pipeline(str(tiny_sd_path)).pipeline
    unet, text_encoder = pipe.unet, pipe.text_encoder
    loads: list[str] = []
    real_load = manager._load
    manager._load = lambda *a, **k: loads.append("load") or real_load(*a, **k)  # type: ignore[method-assign]
    try:
        first = _generate(engine, tiny_sd_path, "sd", ink=1.0)
        _generate(engine, tiny_sd_path, "sd", paper=1.0)
        _generate(engine, tiny_sd_path, "sd", ink=0.5, paper=0.5)
        again = _generate(engine, tiny_sd_path, "sd", ink=1.0)
        # a plain request after LoRAs replays the traced graphs: the LoRA layers are all off
        eager_calls: list[int] = []
        replay = unet.forward
        eager = replay.eager
        replay.eager = lambda *a, **k: eager_calls.append(1) or eager(*a, **k)
        try:
            _generate(engine, tiny_sd_path, "sd")
        finally:
            replay.eager = eager
    finally:
        del manager._load
    assert np.array_equal(first, again)
    assert loads == [], "the base model was not loaded again"
    now = manager.get_pipeline(str(tiny_sd_path)).pipeline
    assert now.unet is unet and now.text_encoder is text_encoder
    assert manager.loaded_loras(str(tiny_sd_path)) == ["sd.paper", "sd.ink"]  # kept loaded
    assert eager_calls == [] and len(replay.graphs.graphs) >= 1


def test_other_task_pipelines_share_the_loras(
    engine: Engine, lora_files: dict[str, Path], tiny_sd_path: Path
) -> None:
    image = Image.new("RGB", (64, 64), (200, 30, 30))

    def img2img(loras: list[dict[str, Any]] | None) -> np.ndarray:
        params = _params(tiny_sd_path, "sd", loras)
        params.task, params.image, params.strength = "img2img", "in", 0.5
        result = engine.generate(params, inputs=InputImages(image=image))
        return np.asarray(result.images[0])

    plain = img2img(None)
    assert not np.array_equal(img2img([{"id": "sd.ink", "weight": 1.0}]), plain)
    assert np.array_equal(img2img(None), plain)


def _to_kohya(file: Path, out: Path) -> Path:
    """A diffusers (peft-format) SD UNet LoRA rewritten with kohya's key names: ``lora_unet_``
    + the module path with ``_`` for ``.``, ``lora_down``/``lora_up``, and an ``alpha``."""
    kohya: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(file).items():
        module, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor
        if kind.startswith("A"):
            kohya[f"{name}.alpha"] = torch.tensor(float(tensor.shape[0]))  # scale alpha/rank 1
    save_file(kohya, out)
    return out


def test_a_kohya_file_is_added_and_applies_like_its_diffusers_twin(
    engine: Engine, lora_files: dict[str, Path], tiny_sd_path: Path, tmp_path: Path
) -> None:
    kohya = _to_kohya(lora_files["sd.ink"], tmp_path / "kohya-ink.safetensors")
    record = engine.loras.add(kohya, name="sd.kohya-ink", family="sd")
    assert record.rank == 4
    params = _params(tiny_sd_path, "sd", [{"id": "sd.kohya-ink", "weight": 0.7}])
    image = np.asarray(engine.generate(params).images[0])
    assert np.array_equal(image, _generate(engine, tiny_sd_path, "sd", ink=0.7))


def test_a_lora_of_another_family_is_refused_before_loading(
    engine: Engine, lora_files: dict[str, Path], tiny_sd_path: Path
) -> None:
    with pytest.raises(InvalidParams, match="is for flux models") as err:
        engine.generate(_params(tiny_sd_path, "sd", [{"id": "flux.ink"}]))
    assert err.value.field == "loras[0].id"


def test_a_file_that_does_not_fit_the_model_is_a_clear_error(
    engine: Engine, lora_files: dict[str, Path], tiny_sd_path: Path, tmp_path: Path
) -> None:
    base, inked = (
        _generate(engine, tiny_sd_path, "sd"),
        _generate(engine, tiny_sd_path, "sd", ink=1),
    )
    # an SDXL LoRA mislabelled as SD: its cross-attention widths do not fit the SD UNet
    engine.loras.add(lora_files["sdxl.ink"], name="sd.wrong", family="sd")
    with pytest.raises(InvalidParams, match="cannot be applied to model") as err:
        engine.generate(_params(tiny_sd_path, "sd", [{"id": "sd.wrong"}]))
    assert err.value.field == "loras[0].id"
    # the model still works, with and without its other LoRAs
    assert np.array_equal(_generate(engine, tiny_sd_path, "sd"), base)
    assert np.array_equal(_generate(engine, tiny_sd_path, "sd", ink=1.0), inked)


# --- metadata -----------------------------------------------------------------------------------


def test_png_metadata_lists_the_loras_as_a1111_does(
    engine: Engine, lora_files: dict[str, Path], tiny_sd_path: Path
) -> None:
    loras = [{"id": "sd.ink", "weight": 0.8}, {"id": "sd.paper", "weight": 1}]
    result = engine.generate(_params(tiny_sd_path, "sd", loras))
    png = to_png_bytes(result.images[0], result.params)
    assert parse_png(png).loras == [
        {"id": "sd.ink", "weight": 0.8},
        {"id": "sd.paper", "weight": 1.0},
    ]
    text = format_a1111(result.params)
    assert text.splitlines()[0] == "a red circle <lora:sd.ink:0.8> <lora:sd.paper:1>"
    parsed = parse_a1111(text)
    assert parsed["prompt"] == "a red circle"
    assert parsed["loras"] == [{"id": "sd.ink", "weight": 0.8}, {"id": "sd.paper", "weight": 1.0}]


def test_a1111_lora_tags_are_read_wherever_they_are() -> None:
    text = "<lora:a> a cat, <lora:b.c:-0.25:0.5> in the rain <lora:d:x>\nSteps: 4, Seed: 1, Size: 64x64"
    parsed = parse_a1111(text)
    assert parsed["loras"] == [{"id": "a", "weight": 1.0}, {"id": "b.c", "weight": -0.25}]
    assert parsed["prompt"] == "a cat, in the rain <lora:d:x>"
    assert "loras" not in parse_a1111("a cat\nSteps: 4, Seed: 1, Size: 64x64")
