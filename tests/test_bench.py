"""The benchmark scripts' own logic (bench/gpu.py, bench/compare.py), on tiny inputs.

The scripts themselves run for minutes (bench/gpu.py on a GPU); these check the parts whose
mistakes would silently skew their figures: the peak FLOP/s a GPU's name maps to, the FLOP
count per image and per denoiser call, and the text-encoder key layout that lets OpenVINO's
older transformers load the same weights as Easel.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu() -> ModuleType:
    return load_script("gpu")


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_flops_follow_the_gpu_name(
    gpu: ModuleType, monkeypatch: pytest.MonkeyPatch, name: str, tflops: float | None
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: name)
    assert gpu.peak_tflops("cuda", None) == (name, tflops)
    assert gpu.peak_tflops("cuda", 123.0) == (name, 123.0)  # an explicit figure wins


def test_flops_are_counted_per_image_and_per_denoiser_call(gpu: ModuleType) -> None:
    denoiser = torch.nn.Linear(64, 32, bias=False)
    other = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 64)

    def image() -> Any:
        with torch.no_grad():
            for _ in range(3):  # three denoising steps
                y = denoiser(x)
            return other(y)  # and a decoder

    per_image, per_call, calls = gpu.count_flops(image, denoiser)
    assert calls == 3
    assert per_call == 2 * 8 * 64 * 32
    assert per_image == 3 * per_call + 2 * 8 * 32 * 16


def test_renamed_text_encoder_loads_the_same_weights(tmp_path: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    compare = load_script("compare")
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=77,
    )
    model = CLIPTextModel(config)
    model.save_pretrained(tmp_path)
    compare.published_text_keys(tmp_path / "model.safetensors")

    from safetensors.torch import load_file

    assert all(name.startswith("text_model.") for name in load_file(tmp_path / "model.safetensors"))
    loaded = CLIPTextModel.from_pretrained(tmp_path)
    for (name, mine), (_, theirs) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(mine, theirs), name
