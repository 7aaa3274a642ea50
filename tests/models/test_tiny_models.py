"""The tiny pipelines load back with from_pretrained and generate."""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import DiffusionPipeline

FIXTURES = ["tiny_sd_path", "tiny_sdxl_path", "tiny_zimage_path", "tiny_flux_path"]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_tiny_pipeline_round_trips(fixture: str, request: pytest.FixtureRequest) -> None:
    pipe = DiffusionPipeline.from_pretrained(request.getfixturevalue(fixture))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(1),
    ).images[0]
    assert image.size == (64, 64)
    assert len(set(image.getdata())) > 1  # not a blank image


def test_tiny_sd_default_is_64px_and_fast(tiny_sd_path) -> None:
    # one thread: on a shared, busy 2-core machine OpenMP barriers make 2 threads ~20x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = DiffusionPipeline.from_pretrained(tiny_sd_path)
        pipe.set_progress_bar_config(disable=True)
        pipe("warm up", num_inference_steps=1)
        start = time.perf_counter()
        image = pipe("a cat", num_inference_steps=4).images[0]
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert image.size == (64, 64)
    assert seconds < 1.0
