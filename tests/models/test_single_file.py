"""Single .safetensors checkpoints load offline from local configs, and say what they lack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from easel.config import Settings
from easel.domain import ModelNotAvailable
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager
from tests.tiny_models import populate_hub_cache, save_zimage_single_file

CALL = {"num_inference_steps": 2, "height": 64, "width": 64, "guidance_scale": 0.0}


def make_manager(easel_home: Path) -> ModelManager:
    settings = Settings(home=easel_home, device="cpu", dtype="float32")
    return ModelManager(settings, ModelCatalog(settings))


def render(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(3)
    image = pipe("a cat", max_sequence_length=32, generator=generator, **CALL).images[0]
    return np.asarray(image)


@pytest.fixture
def zimage_file(tiny_zimage_path: Path, tmp_path: Path) -> Path:
    return save_zimage_single_file(tiny_zimage_path, tmp_path / "z-image-tiny.safetensors")


def test_transformer_only_checkpoint_with_config_folder_matches_the_folder(
    zimage_file: Path, tiny_zimage_path: Path, easel_home: Path
) -> None:
    manager = make_manager(easel_home)
    record = manager.catalog.add("z-file", str(zimage_file), config=str(tiny_zimage_path))
    assert record.family == "z-image"  # detected from the checkpoint's tensor names
    from_file = manager.get_pipeline("z-file").pipeline
    from_folder = manager.get_pipeline(str(tiny_zimage_path)).pipeline
    assert from_file.transformer is not from_folder.transformer
    weights, expected = from_file.transformer.state_dict(), from_folder.transformer.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)
    # The same weights, yet one pixel came out 1/255 apart on an AVX2-only CPU (torch 2.13,
    # diffusers 0.42.1): a rounding difference, where a wrongly loaded model changes every pixel.
    difference = np.abs(render(from_file).astype(int) - render(from_folder).astype(int))
    assert difference.max() <= 2


def test_without_config_the_cached_reference_repo_is_used(
    zimage_file: Path, tiny_zimage_path: Path, tiny_hub_cache: Path, easel_home: Path
) -> None:
    populate_hub_cache(tiny_hub_cache, "Tongyi-MAI/Z-Image-Turbo", tiny_zimage_path)
    pipe = make_manager(easel_home).get_pipeline(str(zimage_file)).pipeline
    assert type(pipe).__name__ == "ZImagePipeline"
    assert render(pipe).shape == (64, 64, 3)


def test_without_any_configs_the_message_says_what_to_set(
    zimage_file: Path, tiny_hub_cache: Path, easel_home: Path
) -> None:
    with pytest.raises(ModelNotAvailable, match="config = ") as info:
        make_manager(easel_home).get_pipeline(str(zimage_file))
    assert "easel models pull Tongyi-MAI/Z-Image-Turbo" in info.value.message
    assert "\n" not in info.value.message


def test_a_named_config_that_is_missing_is_reported(
    zimage_file: Path, tiny_zimage_path: Path, tiny_hub_cache: Path, easel_home: Path
) -> None:
    # even with the reference repo cached, a config the user named but lacks is not guessed
    populate_hub_cache(tiny_hub_cache, "Tongyi-MAI/Z-Image-Turbo", tiny_zimage_path)
    manager = make_manager(easel_home)
    manager.catalog.add("z-file", str(zimage_file), config="someone/missing-configs")
    with pytest.raises(ModelNotAvailable, match="someone/missing-configs is neither"):
        manager.get_pipeline("z-file")
