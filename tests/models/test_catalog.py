"""ModelCatalog: built-ins, models.toml round trip, paths, suggestions, availability."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from easel.config import Settings
from easel.domain import EaselError, InvalidParams, ModelNotAvailable, ModelNotFound
from easel.models.catalog import BUILTINS, ModelCatalog, detect_family
from easel.models.loader import ModelManager
from tests.fixtures_models import TINY_HUB_ID
from tests.tiny_models import populate_hub_cache

BUILTIN_SOURCES = {
    "tiny-shapes": None,
    "z-image-turbo": "Tongyi-MAI/Z-Image-Turbo",
    "sd-turbo": "stabilityai/sd-turbo",
    "sdxl-turbo": "stabilityai/sdxl-turbo",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
}


@pytest.fixture
def catalog(easel_home: Path) -> ModelCatalog:
    return ModelCatalog(Settings(home=easel_home))


def test_builtins_are_listed_with_sources_and_families(catalog: ModelCatalog) -> None:
    records = {r.id: r for r in catalog.list()}
    assert list(records) == list(BUILTIN_SOURCES)
    for model_id, source in BUILTIN_SOURCES.items():
        if source:
            assert records[model_id].source == source
        assert records[model_id].tasks == (
            "txt2img",
            "img2img",
            "inpaint",
            "outpaint",
            "style",
            "train_lora",
        )
    assert records["z-image-turbo"].family == "z-image"
    assert records["flux-schnell"].family == "flux"
    assert records["sdxl-turbo"].family == "sdxl"
    assert records["tiny-shapes"].source.endswith("easel/assets/tiny-shapes")


def test_hub_models_are_unavailable_in_an_empty_cache(
    catalog: ModelCatalog, tiny_hub_cache: Path
) -> None:
    assert not catalog.get("sd-turbo").available
    assert catalog.get(TINY_HUB_ID).available


def test_incomplete_cache_snapshot_is_not_available(
    catalog: ModelCatalog, tiny_sd_path: Path, tiny_hub_cache: Path
) -> None:
    snapshot = populate_hub_cache(tiny_hub_cache, "stabilityai/sd-turbo", tiny_sd_path)
    assert catalog.get("sd-turbo").available
    for file in (snapshot / "unet").iterdir():
        file.unlink()
    assert not catalog.get("sd-turbo").available


def test_unknown_model_suggests_near_names(catalog: ModelCatalog) -> None:
    with pytest.raises(ModelNotFound, match="did you mean sd-turbo") as info:
        catalog.get("sd-trubo")
    assert info.value.field == "model"
    assert "\n" not in info.value.message


def test_unknown_hub_id_names_pull(catalog: ModelCatalog, tiny_hub_cache: Path) -> None:
    with pytest.raises(ModelNotFound, match="easel models pull someone/thing"):
        catalog.get("someone/thing")


def test_missing_path_is_reported(catalog: ModelCatalog, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no usable model at .*nothing.safetensors"):
        catalog.get(str(tmp_path / "nothing.safetensors"))


@pytest.mark.parametrize(
    ("fixture", "family"),
    [
        ("tiny_sd_path", "sd"),
        ("tiny_sdxl_path", "sdxl"),
        ("tiny_zimage_path", "z-image"),
        ("tiny_flux_path", "flux"),
    ],
)
def test_local_folder_is_accepted_directly(
    fixture: str, family: str, catalog: ModelCatalog, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(fixture)
    record = catalog.get(str(path))
    assert (record.family, record.source, record.available) == (family, str(path), True)


def test_folder_without_model_index_is_rejected(catalog: ModelCatalog, tmp_path: Path) -> None:
    with pytest.raises(InvalidParams, match="not a diffusers pipeline folder"):
        catalog.get(str(tmp_path), explain=True)  # the CLI's reason; the server's: no usable model
    with pytest.raises(ModelNotFound, match="no usable model at"):
        catalog.get(str(tmp_path))


@pytest.mark.parametrize(
    ("key", "family"),
    [
        ("model.diffusion_model.input_blocks.0.0.weight", "sd"),
        ("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
        ("double_blocks.0.img_attn.qkv.weight", "flux"),
        ("noise_refiner.0.attention.qkv.weight", "z-image"),
    ],
)
def test_single_file_family_is_detected_from_keys(key: str, family: str, tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(2)}, file)
    assert detect_family(file) == family


def test_single_file_of_unknown_family_asks_for_it(tmp_path: Path) -> None:
    file = tmp_path / "mystery.safetensors"
    save_file({"something.weight": torch.zeros(2)}, file)
    with pytest.raises(InvalidParams, match="--family") as info:
        detect_family(file)
    assert info.value.field == "family"


def test_single_file_needs_configs_offline_and_never_goes_online(
    easel_home: Path, tmp_path: Path, tiny_hub_cache: Path, tiny_sd_path: Path
) -> None:
    file = tmp_path / "ckpt.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, file)
    settings = Settings(home=easel_home, device="cpu", dtype="float32")
    manager = ModelManager(settings, ModelCatalog(settings))
    with pytest.raises(ModelNotAvailable, match="config = ") as info:
        manager.get_pipeline(str(file))
    assert "\n" not in info.value.message
    # with a config folder, a checkpoint that lacks weights fails with a one-line reason
    manager.catalog.add("ckpt", str(file), config=str(tiny_sd_path))
    with pytest.raises(ModelNotAvailable, match="cannot load .* with configs from") as info:
        manager.get_pipeline("ckpt")
    assert "\n" not in info.value.message


def test_models_toml_round_trip(catalog: ModelCatalog, easel_home: Path, tiny_sdxl_path) -> None:
    defaults = {
        "num_inference_steps": 3,
        "guidance_scale": 1.5,
        "scheduler": "euler",
        "tiling": True,
    }
    added = catalog.add(
        "my-xl", str(tiny_sdxl_path), description='A "quoted" \\ name', defaults=defaults
    )
    assert added.family == "sdxl" and added.available and not added.builtin
    catalog.add("remote", "someone/sd-thing", family="sd", config="/configs/sd")
    # a fresh catalog reads back exactly what was written
    again = ModelCatalog(Settings(home=easel_home))
    record = again.get("my-xl")
    assert record.defaults == defaults
    assert record.description == 'A "quoted" \\ name'
    assert record.source == str(tiny_sdxl_path)
    remote = again.get("remote")
    assert (remote.family, remote.config, remote.available) == ("sd", "/configs/sd", False)
    assert [r.id for r in again.list()][-2:] == ["my-xl", "remote"]
    data = tomllib.loads((easel_home / "models.toml").read_text())
    assert data["models"]["my-xl"]["family"] == "sdxl"


def test_add_rejects_bad_input(catalog: ModelCatalog, tmp_path: Path) -> None:
    with pytest.raises(InvalidParams, match="built-in") as info:
        catalog.add("sd-turbo", "someone/x", family="sd")
    assert info.value.field == "id"
    with pytest.raises(InvalidParams, match="family is required") as info:
        catalog.add("x", "someone/x")
    assert info.value.field == "family"
    with pytest.raises(EaselError, match="unknown model family 'sd3'"):
        catalog.add("x", "someone/x", family="sd3")
    with pytest.raises(ModelNotFound, match="no model folder") as info:
        catalog.add("x", str(tmp_path / "missing"))
    assert info.value.field == "source"
    with pytest.raises(InvalidParams, match="model id must be"):
        catalog.add("bad id!", "someone/x", family="sd")


def test_broken_models_toml_is_a_clear_error(catalog: ModelCatalog, easel_home: Path) -> None:
    (easel_home / "models.toml").write_text("[models.x\nsource=")
    with pytest.raises(InvalidParams, match="models.toml"):
        catalog.list()


def test_pure_python_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import easel.models.catalog, easel.models.params, easel.models.families; "
        "print('torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_builtin_ids_are_unique() -> None:
    assert len({r.id for r in BUILTINS}) == len(BUILTINS)


def test_a_name_too_long_for_the_filesystem_is_an_unknown_model(easel_home: Path) -> None:
    catalog = ModelCatalog(Settings(home=easel_home))
    with pytest.raises(ModelNotFound) as caught:
        catalog.get("a" * 300)
    assert caught.value.field == "model"


def test_a_folder_carries_its_own_defaults_under_the_entrys(
    catalog: ModelCatalog, tiny_sd_path: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "trained"
    shutil.copytree(tiny_sd_path, folder)
    (folder / "easel.json").write_text('{"defaults": {"guidance_scale": 2.5, "width": 64}}')
    assert catalog.get(str(folder)).defaults == {"guidance_scale": 2.5, "width": 64}
    catalog.add("mine", str(folder), defaults={"guidance_scale": 4.0})
    assert catalog.get("mine").defaults == {"guidance_scale": 4.0, "width": 64}
    # the entry in models.toml keeps only what was given to `add`
    assert "width" not in (catalog.settings.user_models_file).read_text()

    (folder / "easel.json").write_text('{"defaults": [1, 2]}')
    with pytest.raises(InvalidParams, match="easel.json: `defaults` must be an object"):
        catalog.get(str(folder), explain=True)
    (folder / "easel.json").write_text("{not json")
    with pytest.raises(InvalidParams, match="cannot read .*easel.json") as info:
        catalog.get("mine")
    assert info.value.field == "model"
