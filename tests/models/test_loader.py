"""ModelManager: loading by path and hub id, LRU eviction, unloading, from_pipe, pull offline."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from easel.config import Settings
from easel.domain import EaselError, ModelNotAvailable
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager, pick_device, pick_dtype, pipeline_bytes
from tests.fixtures_models import TINY_HUB_ID
from tests.tiny_models import populate_hub_cache

# flow models default to 1024 px; keep every call tiny
CALL = {"num_inference_steps": 2, "height": 64, "width": 64, "guidance_scale": 0.0}


def make_manager(easel_home: Path, **overrides: object) -> ModelManager:
    fields: dict = {"home": easel_home, "device": "cpu", "dtype": "float32", **overrides}
    settings = Settings(**fields)
    return ModelManager(settings, ModelCatalog(settings))


@pytest.mark.parametrize(
    ("fixture", "family", "cls"),
    [
        ("tiny_sd_path", "sd", "StableDiffusionPipeline"),
        ("tiny_sdxl_path", "sdxl", "StableDiffusionXLPipeline"),
        ("tiny_zimage_path", "z-image", "ZImagePipeline"),
        ("tiny_flux_path", "flux", "FluxPipeline"),
    ],
)
def test_each_family_loads_by_path_and_generates(
    fixture: str, family: str, cls: str, easel_home: Path, request: pytest.FixtureRequest
) -> None:
    manager = make_manager(easel_home)
    loaded = manager.get_pipeline(str(request.getfixturevalue(fixture)), "txt2img")
    assert loaded.family.name == family
    assert type(loaded.pipeline).__name__ == cls
    image = loaded.pipeline("a red circle", generator=torch.Generator().manual_seed(0), **CALL)
    assert image.images[0].size == (64, 64)


def test_hub_id_loads_from_offline_cache(tiny_hub_cache: Path, easel_home: Path) -> None:
    manager = make_manager(easel_home)
    record = manager.catalog.get(TINY_HUB_ID)
    assert record.available and record.family == "sd"
    loaded = manager.get_pipeline(TINY_HUB_ID)
    assert loaded.pipeline("a cat", **CALL).images[0].size == (64, 64)


@pytest.mark.parametrize(
    ("model_id", "fixture"),
    [
        ("sd-turbo", "tiny_sd_path"),
        ("sdxl-turbo", "tiny_sdxl_path"),
        ("z-image-turbo", "tiny_zimage_path"),
        ("flux-schnell", "tiny_flux_path"),
    ],
)
def test_builtin_ids_load_from_a_populated_offline_cache(
    model_id: str,
    fixture: str,
    tiny_hub_cache: Path,
    easel_home: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Stand-ins of the right family under the real repo ids: the path real models take."""
    manager = make_manager(easel_home)
    repo_id = manager.catalog.get(model_id).source
    populate_hub_cache(tiny_hub_cache, repo_id, request.getfixturevalue(fixture))
    loaded = manager.get_pipeline(model_id)
    assert loaded.record.id == model_id and loaded.record.available
    extra = {"max_sequence_length": 32} if loaded.family.kind == "flow" else {}
    image = loaded.pipeline("a cat", **extra, **CALL).images[0]
    assert image.size == (64, 64)


def test_catalog_entry_with_hub_source_loads_from_cache(
    tiny_hub_cache: Path, easel_home: Path
) -> None:
    manager = make_manager(easel_home)
    manager.catalog.add("tiny-hub", TINY_HUB_ID, family="sd")
    assert manager.get_pipeline("tiny-hub").record.source == TINY_HUB_ID


def test_not_downloaded_hub_model_fails_fast_naming_pull(
    tiny_hub_cache: Path, easel_home: Path
) -> None:
    manager = make_manager(easel_home)
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailable, match="easel models pull sd-turbo") as info:
        manager.get_pipeline("sd-turbo")
    assert info.value.field == "model"
    assert time.perf_counter() - start < 2


def test_pull_offline_fails_fast_with_one_line(tiny_hub_cache: Path, easel_home: Path) -> None:
    manager = make_manager(easel_home)
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailable, match="offline") as info:
        manager.pull("sd-turbo", progress=False)
    assert "\n" not in info.value.message
    assert time.perf_counter() - start < 2


def test_other_tasks_share_components_via_from_pipe(tiny_sd_path: Path, easel_home: Path) -> None:
    manager = make_manager(easel_home)
    txt = manager.get_pipeline(str(tiny_sd_path), "txt2img").pipeline
    img = manager.get_pipeline(str(tiny_sd_path), "img2img").pipeline
    inpaint = manager.get_pipeline(str(tiny_sd_path), "inpaint").pipeline
    assert type(img).__name__ == "StableDiffusionImg2ImgPipeline"
    assert type(inpaint).__name__ == "StableDiffusionInpaintPipeline"
    assert img.unet is txt.unet and inpaint.vae is txt.vae
    assert manager.loaded() == [str(tiny_sd_path)]
    # a second call returns the cached object, not a reload
    assert manager.get_pipeline(str(tiny_sd_path), "img2img").pipeline is img


@pytest.mark.parametrize("fixture", ["tiny_sdxl_path", "tiny_zimage_path", "tiny_flux_path"])
def test_from_pipe_works_for_every_family(
    fixture: str, easel_home: Path, request: pytest.FixtureRequest
) -> None:
    manager = make_manager(easel_home)
    path = str(request.getfixturevalue(fixture))
    base = manager.get_pipeline(path, "txt2img").pipeline
    for task in ("img2img", "inpaint"):
        derived = manager.get_pipeline(path, task).pipeline
        assert derived.vae is base.vae


def test_lru_evicts_least_recently_used_over_budget(
    tiny_sd_path: Path, tiny_sdxl_path: Path, tiny_flux_path: Path, easel_home: Path
) -> None:
    probe = make_manager(easel_home)
    sizes = {
        p: pipeline_bytes(probe.get_pipeline(str(p)).pipeline)
        for p in (tiny_sd_path, tiny_sdxl_path, tiny_flux_path)
    }
    # room for the two largest, not for all three
    budget = sorted(sizes.values())[-1] + sorted(sizes.values())[-2]
    manager = make_manager(easel_home, model_cache_gb=budget / 1024**3)
    manager.get_pipeline(str(tiny_sd_path))
    manager.get_pipeline(str(tiny_sdxl_path))
    manager.get_pipeline(str(tiny_sd_path))  # sd is now the most recently used
    manager.get_pipeline(str(tiny_flux_path))
    assert manager.loaded() == [str(tiny_sd_path), str(tiny_flux_path)]
    assert manager.memory_bytes() <= budget


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "fixture", ["tiny_sd_path", "tiny_sdxl_path", "tiny_zimage_path", "tiny_flux_path"]
)
def test_size_estimate_before_loading_matches_loaded_bytes(
    fixture: str, dtype: str, easel_home: Path, request: pytest.FixtureRequest
) -> None:
    manager = make_manager(easel_home, dtype=dtype)
    path = str(request.getfixturevalue(fixture))
    estimate = manager.estimate_bytes(manager.catalog.get(path))
    actual = pipeline_bytes(manager.get_pipeline(path).pipeline)
    assert abs(estimate - actual) <= 0.05 * actual, (estimate, actual)


def test_room_is_made_before_loading(
    tiny_sd_path: Path, tiny_zimage_path: Path, easel_home: Path
) -> None:
    probe = make_manager(easel_home)
    zimage_bytes = pipeline_bytes(probe.get_pipeline(str(tiny_zimage_path)).pipeline)
    manager = make_manager(easel_home, model_cache_gb=zimage_bytes * 1.01 / 1024**3)
    manager.get_pipeline(str(tiny_sd_path))
    evicted = weakref.ref(manager.get_pipeline(str(tiny_sd_path)).pipeline.unet)
    seen_during_load = []
    original = manager._load

    def spy(*args: object) -> object:
        gc.collect()
        seen_during_load.append(evicted() is None)  # sd already gone while z-image loads
        return original(*args)  # type: ignore[arg-type]

    manager._load = spy  # type: ignore[method-assign]
    manager.get_pipeline(str(tiny_zimage_path))
    assert seen_during_load == [True]
    assert manager.loaded() == [str(tiny_zimage_path)]


def test_unload_frees_the_weights(tiny_sd_path: Path, easel_home: Path) -> None:
    manager = make_manager(easel_home)
    loaded = manager.get_pipeline(str(tiny_sd_path))
    manager.get_pipeline(str(tiny_sd_path), "img2img")
    unet = weakref.ref(loaded.pipeline.unet)
    assert manager.memory_bytes() > 100_000
    del loaded
    assert manager.unload(str(tiny_sd_path)) is True
    gc.collect()
    assert unet() is None, "the UNet is still referenced after unload"
    assert manager.memory_bytes() == 0 and manager.loaded() == []
    assert manager.unload(str(tiny_sd_path)) is False


def test_unknown_task_is_rejected(tiny_sd_path: Path, easel_home: Path) -> None:
    with pytest.raises(EaselError, match="task must be one of txt2img, img2img, inpaint") as info:
        make_manager(easel_home).get_pipeline(str(tiny_sd_path), "upscale")
    assert info.value.field == "task"


def test_bf16_setting_gives_bf16_channels_last_on_cpu(tiny_sd_path: Path, easel_home: Path) -> None:
    manager = make_manager(easel_home, dtype="bfloat16")
    pipe = manager.get_pipeline(str(tiny_sd_path)).pipeline
    assert pipe.unet.dtype == torch.bfloat16
    conv = pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert pipe("a cat", num_inference_steps=2).images[0].size == (64, 64)


def test_vae_tiling_setting(tiny_sd_path: Path, easel_home: Path) -> None:
    pipe = make_manager(easel_home, vae_tiling=True).get_pipeline(str(tiny_sd_path)).pipeline
    assert pipe.vae.use_tiling


def test_pick_device_and_dtype() -> None:
    assert pick_device("cpu") == "cpu"
    assert pick_dtype("cpu", "float32") == torch.float32
    assert pick_dtype("cpu", "auto") in (torch.float32, torch.bfloat16)
    for bad in ("tpu", "cuda:x", "cpu:1"):
        with pytest.raises(EaselError, match="device must be") as info:
            pick_device(bad)
        assert info.value.field == "device"
    if not torch.cuda.is_available():
        with pytest.raises(EaselError, match="not available"):
            pick_device("cuda:0")
    with pytest.raises(EaselError, match="dtype must be"):
        pick_dtype("cpu", "int8")


_RSS_SCRIPT = """
import json, os, sys
from pathlib import Path
from easel.config import Settings
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager

def rss_mib():
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

model, home = sys.argv[1], sys.argv[2]
settings = Settings(home=home, device="cpu", dtype="bfloat16")
manager = ModelManager(settings, ModelCatalog(settings))
manager.get_pipeline(model)
manager.unload(model)  # the first round warms imports and the allocator
before = rss_mib()
manager.get_pipeline(model)
manager.get_pipeline(model, "img2img")
weights = manager.memory_bytes() / 2**20
loaded = rss_mib()
manager.unload(model)
print(json.dumps({"before": before, "loaded": loaded, "after": rss_mib(), "weights": weights}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_unload_returns_memory_to_the_os(tiny_sd_path: Path, tmp_path: Path) -> None:
    # an SD pipeline with a ~20M-parameter UNet, loaded in bf16 so weights are real copies
    # (fp32 safetensors may stay memory-mapped and barely show in RSS); measured in a fresh
    # process so memory freed by earlier tests cannot hide the load
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(128, 256),
        layers_per_block=2,
        sample_size=32,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    pipe.save_pretrained(tmp_path / "medium")
    del pipe
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "medium"), str(tmp_path / "home")],
        capture_output=True,
        text=True,
        check=True,
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["weights"] > 30
    assert m["loaded"] - m["before"] > 0.7 * m["weights"], m
    assert m["after"] - m["before"] < 0.2 * m["weights"], m
