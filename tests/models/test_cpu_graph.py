"""capture_unet: traced replays match the eager UNet, per shape; other calls stay eager."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from easel.models import cpu_graph
from easel.models.cpu_graph import capture_unet, release_unet
from tests.models.test_loader import make_manager


@pytest.fixture
def unet(tiny_sd_path: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").eval()


def inputs(batch: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 100 + size)
    sample = torch.randn(batch, 4, size, size, generator=generator)
    text = torch.randn(batch, 77, 32, generator=generator)
    return sample, text


def graphs(unet: UNet2DConditionModel) -> int:
    return len(unet.forward.graphs.graphs)  # type: ignore[attr-defined]


@torch.no_grad()
def test_replay_matches_eager_for_every_timestep_and_traces_once_per_shape(
    unet: UNet2DConditionModel,
) -> None:
    sample, text = inputs()
    expected = {t: unet(sample, torch.tensor(t), text).sample for t in (999, 500, 1)}
    assert capture_unet(unet)
    assert not capture_unet(unet)  # once is enough
    for t, want in expected.items():
        got = unet(sample, torch.tensor(t), encoder_hidden_states=text).sample
        # the timestep is an input of the graph, not a constant baked in at the first call
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert graphs(unet) == 1
    # another batch and size: a second graph, equally right
    other_sample, other_text = inputs(batch=1, size=12)
    want = type(unet).forward(unet, other_sample, torch.tensor(7), other_text).sample
    got = unet(other_sample, torch.tensor(7), other_text, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert graphs(unet) == 2


@torch.no_grad()
def test_graphs_see_weights_changed_in_place(unet: UNet2DConditionModel) -> None:
    sample, text = inputs()
    capture_unet(unet)
    before = unet(sample, torch.tensor(5), text).sample
    unet.conv_out.bias.add_(1.0)
    after = unet(sample, torch.tensor(5), text).sample
    torch.testing.assert_close(after, before + 1.0, rtol=1e-5, atol=1e-5)
    assert graphs(unet) == 1


@torch.no_grad()
def test_shapes_beyond_the_cap_run_eagerly(
    unet: UNet2DConditionModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_graph, "MAX_GRAPHS", 1)
    capture_unet(unet)
    small, small_text = inputs(size=8)
    unet(small, torch.tensor(5), small_text)  # the one graph allowed
    sample, text = inputs(size=16)
    got = unet(sample, torch.tensor(5), text).sample
    torch.testing.assert_close(got, type(unet).forward(unet, sample, torch.tensor(5), text).sample)
    assert graphs(unet) == 1


@torch.no_grad()
def test_calls_with_more_than_the_plain_inputs_run_eagerly(unet: UNet2DConditionModel) -> None:
    sample, text = inputs()
    capture_unet(unet)
    unet(sample, 10, text)  # a number, not a tensor
    unet(sample, torch.tensor(10), text, cross_attention_kwargs={"scale": 0.5})
    with torch.enable_grad():
        out = unet(sample, torch.tensor(10), text).sample
    assert out.requires_grad  # autograd saw the eager forward
    assert graphs(unet) == 0


@torch.no_grad()
def test_sdxl_calls_replay_with_their_added_conditioning(tiny_sdxl_path: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet").eval()
    generator = torch.Generator().manual_seed(4)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    pooled_width = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(2, pooled_width, generator=generator),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
    }
    want = unet(sample, torch.tensor(9), text, added_cond_kwargs=added).sample
    capture_unet(unet)
    got = unet(sample, torch.tensor(9), text, added_cond_kwargs=added).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert graphs(unet) == 1
    # the size ids are an input of the graph, not constants of the first call
    other = {**added, "time_ids": torch.tensor([[32.0, 32, 8, 8, 64, 64]] * 2)}
    got = unet(sample, torch.tensor(9), text, added_cond_kwargs=other).sample
    want = type(unet).forward(unet, sample, torch.tensor(9), text, added_cond_kwargs=other).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        got, unet(sample, torch.tensor(9), text, added_cond_kwargs=added).sample
    )
    # anything more (an IP-Adapter's image embeddings) runs eagerly
    with_image = {**added, "image_embeds": [torch.zeros(2, 1, 4)]}
    replay = vars(unet)["forward"]
    eager_calls: list[int] = []
    eager = replay.eager
    replay.eager = lambda *a, **k: eager_calls.append(1) or eager(*a, **k)
    unet(sample, torch.tensor(9), text, added_cond_kwargs=with_image)
    assert eager_calls == [1] and graphs(unet) == 1


def test_a_captured_unet_is_freed_with_its_last_reference(tiny_sd_path: Path) -> None:
    # the replay and the UNet refer to each other, and TorchScript keeps each graph's program
    # for the process's life: neither may keep the weights alive after a model is unloaded
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").eval()
    capture_unet(unet)
    sample, text = inputs()
    with torch.no_grad():
        unet(sample, torch.tensor(5), text)
    assert graphs(unet) == 1
    alive = weakref.ref(unet.conv_in.weight)
    del unet
    gc.collect()
    assert alive() is None


def test_large_unets_and_failed_traces_stay_eager(
    unet: UNet2DConditionModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_graph, "MAX_PARAMETERS", 1000)
    assert not capture_unet(unet)
    monkeypatch.undo()

    def broken_trace(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.jit, "trace", broken_trace)
    assert capture_unet(unet)
    sample, text = inputs()
    with torch.no_grad():
        out = unet(sample, torch.tensor(3), text).sample
        want = type(unet).forward(unet, sample, torch.tensor(3), text).sample
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert graphs(unet) == 0
    release_unet(unet)
    assert "forward" not in vars(unet)  # the class's forward again


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16 adds channels_last
def test_model_manager_captures_on_the_cpu_and_images_match_the_eager_pipeline(
    dtype: str, tiny_sd_path: Path, easel_home: Path
) -> None:
    def render(cpu_graphs: bool) -> np.ndarray:
        manager = make_manager(easel_home, dtype=dtype, cpu_graphs=cpu_graphs)
        pipe = manager.get_pipeline(str(tiny_sd_path)).pipeline
        assert ("forward" in vars(pipe.unet)) is cpu_graphs
        image = pipe(
            "a red circle",
            num_inference_steps=3,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(1),
        ).images[0]
        if cpu_graphs:
            assert graphs(pipe.unet) == 1  # one shape (batch 2 with guidance), traced once
        return np.asarray(image, int)

    assert np.abs(render(cpu_graphs=True) - render(cpu_graphs=False)).max() <= 1
