"""The OpenVINO CPU path: its images agree with the eager pipeline's (PSNR), nothing waits for
it, its conversions are cached on disk by the weights, and any failure falls back to eager."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from easel.models import loader
from easel.models.cpu_openvino import OpenVinoGraphs, decode_graphs, encode_graphs
from tests.models.test_loader import make_manager

openvino = pytest.importorskip("openvino")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def render(pipe: Any, steps: int = 4) -> np.ndarray:
    image = pipe(
        "a red circle",
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    return np.asarray(image)


def graphs_of(pipe: Any) -> OpenVinoGraphs:
    source = vars(pipe.unet)["forward"].graphs
    assert isinstance(source, OpenVinoGraphs)
    return source


def count_eager(pipe: Any) -> list[int]:
    """Counts the UNet calls that ran its own forward rather than a graph."""
    replay = vars(pipe.unet)["forward"]
    calls: list[int] = []
    eager = replay.eager

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return eager(*args, **kwargs)

    replay.eager = counted
    return calls


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_images_through_openvino_agree_with_the_eager_pipeline(
    dtype: str, tiny_sd_path: Path, easel_home: Path
) -> None:
    eager = make_manager(easel_home, dtype=dtype, cpu_backend="torch", cpu_graphs=False)
    expected = render(eager.get_pipeline(str(tiny_sd_path)).pipeline)

    manager = make_manager(easel_home, dtype=dtype, cpu_backend="openvino")
    pipe = manager.get_pipeline(str(tiny_sd_path)).pipeline
    graphs, decoder = graphs_of(pipe), decode_graphs(pipe.vae)
    encoder = encode_graphs(pipe.text_encoder)
    assert decoder is not None and encoder is not None
    first = render(pipe)  # nothing waits: the conversions start in the background
    for source in (graphs, decoder, encoder):
        assert source.settle(timeout=120)
        assert not source.failed and len(source.compiled) == 1  # one shape each
    eager_calls = count_eager(pipe)
    replays = [vars(pipe.vae)["decode"], vars(pipe.text_encoder)["forward"]]
    for replay in replays:
        replay.own, replay.eager = replay.eager, None  # neither may fall back now
    fast = render(pipe)
    for replay in replays:
        replay.eager = replay.own
    assert eager_calls == []  # every step through OpenVINO
    assert psnr(fast, expected) >= 40, psnr(fast, expected)
    assert psnr(first, expected) >= 40  # steps before and after the switch
    # it is a different computation (fusions, order), not the eager one by another road
    assert dtype == "float32" or not np.array_equal(fast, expected)


def test_sdxl_steps_run_through_openvino_with_their_added_conditioning(
    tiny_sdxl_path: Path, easel_home: Path
) -> None:
    eager = make_manager(easel_home, dtype="bfloat16", cpu_backend="torch", cpu_graphs=False)
    expected = render(eager.get_pipeline(str(tiny_sdxl_path)).pipeline)

    manager = make_manager(easel_home, dtype="bfloat16", cpu_backend="openvino")
    pipe = manager.get_pipeline(str(tiny_sdxl_path)).pipeline
    render(pipe)  # the UNet's calls carry text_embeds and time_ids: they start a conversion
    graphs = graphs_of(pipe)
    assert graphs.settle(timeout=120) and not graphs.failed and len(graphs.compiled) == 1
    eager_calls = count_eager(pipe)
    fast = render(pipe)
    assert eager_calls == []  # every step through OpenVINO
    # (and its VAE decoder, converted after the UNet: no conversion left running at the exit)
    assert decode_graphs(pipe.vae).settle(timeout=120)  # type: ignore[union-attr]
    assert psnr(fast, expected) >= 40, psnr(fast, expected)
    assert not np.array_equal(fast, expected)  # OpenVINO's computation, not the eager one


def test_conversion_is_cached_by_the_weights_and_reused(
    tiny_sd_path: Path, easel_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = make_manager(easel_home, cpu_backend="openvino")
    pipe = manager.get_pipeline(str(tiny_sd_path)).pipeline
    render(pipe, steps=1)
    assert graphs_of(pipe).settle(timeout=120)
    cache = easel_home / "cache" / "openvino"
    assert decode_graphs(pipe.vae).settle(timeout=120)  # type: ignore[union-attr]
    assert encode_graphs(pipe.text_encoder).settle(timeout=120)  # type: ignore[union-attr]
    files = sorted(f.name for folder in cache.iterdir() for f in folder.iterdir())
    assert files == sorted(
        f"{name}.{ext}"
        for name in ("unet", "vae-decoder", "text-encoder")
        for ext in ("xml", "bin")
    )

    # a second process with the same weights reads the file: no conversion
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("converted again")

    monkeypatch.setattr(openvino, "convert_model", refuse)
    again = make_manager(easel_home, cpu_backend="openvino")
    pipe = again.get_pipeline(str(tiny_sd_path)).pipeline
    render(pipe, steps=1)
    graphs = graphs_of(pipe)
    assert graphs.settle(timeout=120) and not graphs.failed and graphs.compiled

    # other weights are another model: converted apart (here refused, so it stays eager)
    changed = make_manager(easel_home, cpu_backend="openvino")
    pipe = changed.get_pipeline(str(tiny_sd_path)).pipeline
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(0.5)
    render(pipe, steps=1)
    graphs = graphs_of(pipe)
    assert graphs.settle(timeout=120) and graphs.failed and not graphs.compiled
    assert len(list(cache.iterdir())) == 3  # UNet, VAE, text encoder: not the changed UNet


def test_a_failed_conversion_leaves_the_eager_path_and_its_pixels(
    tiny_sd_path: Path, easel_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(openvino, "convert_model", broken)
    eager = make_manager(easel_home, cpu_backend="torch", cpu_graphs=False)
    expected = render(eager.get_pipeline(str(tiny_sd_path)).pipeline)
    pipe = make_manager(easel_home, cpu_backend="openvino").get_pipeline(str(tiny_sd_path))
    render(pipe.pipeline)
    graphs = graphs_of(pipe.pipeline)
    assert graphs.settle(timeout=60) and graphs.failed
    assert np.array_equal(render(pipe.pipeline), expected)  # eager, as if never captured
    assert not (easel_home / "cache" / "openvino").exists() or not any(
        f.suffix != ".partial" for f in (easel_home / "cache" / "openvino").iterdir()
    )


def test_auto_leaves_small_unets_to_the_traced_graphs(tiny_sd_path: Path, easel_home: Path) -> None:
    pipe = make_manager(easel_home, cpu_backend="auto").get_pipeline(str(tiny_sd_path)).pipeline
    assert not isinstance(vars(pipe.unet)["forward"].graphs, OpenVinoGraphs)
    pipe = make_manager(easel_home, cpu_backend="torch").get_pipeline(str(tiny_sd_path)).pipeline
    assert not isinstance(vars(pipe.unet)["forward"].graphs, OpenVinoGraphs)


def test_auto_keeps_pytorch_where_openvino_would_not_fit_in_memory(
    tiny_sd_path: Path, easel_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "MAX_PARAMETERS", 0)  # the tiny UNet counts as large
    for memory, expected in ((1 << 40, True), (1 << 10, False)):
        monkeypatch.setattr(loader.hardware, "memory_bytes", lambda m=memory: m)
        manager = make_manager(easel_home, cpu_backend="auto")
        pipe = manager.get_pipeline(str(tiny_sd_path)).pipeline
        assert isinstance(vars(pipe.unet)["forward"].graphs, OpenVinoGraphs) is expected


def test_a_conversion_under_way_does_not_hold_up_the_exit() -> None:
    # (a thread pool would run a minute's conversion, and everything queued, before exiting)
    code = (
        "import time\n"
        "from easel.models import cpu_openvino\n"
        "cpu_openvino._PREPARE.submit(time.sleep, 120)\n"
        "cpu_openvino._PREPARE.submit(time.sleep, 120)\n"
        "time.sleep(0.5)\n"
    )
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=100)
    assert time.monotonic() - started < 60


def test_the_easel_command_exits_with_its_own_code_while_a_conversion_runs() -> None:
    # stopped by the interpreter's exit inside OpenVINO's C++ code, the conversion's thread
    # crashed the process (status 134 or 139) after `easel generate` had written its image
    code = (
        "import sys, threading, time, torch, openvino\n"
        "from easel import cli\n"
        "from easel.models import cpu_openvino\n"
        "started = threading.Event()\n"
        "def convert():\n"
        "    net = torch.nn.Sequential(*[torch.nn.Conv2d(64, 64, 3, padding=1) for _ in range(400)])\n"
        "    started.set()\n"
        "    openvino.convert_model(net, example_input=torch.zeros(1, 64, 32, 32))\n"
        "cpu_openvino._PREPARE.submit(convert)\n"
        "started.wait()\n"
        "time.sleep(2)  # into the C++ conversion (about 4 s)\n"
        "assert cpu_openvino._PREPARE.unfinished == 1\n"
        "sys.argv = ['easel', 'generate', '--steps', '0', 'x']  # exits with 2\n"
        "cli.run()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "num_inference_steps must be" in done.stderr
