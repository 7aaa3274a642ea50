"""Dynamic batching in the engine: requests sharing pipeline calls, each as if it ran alone.

Pixels are compared exactly: a request's images in a batch must equal the same request run by
itself (engine.batching explains why that needs care and how it is kept).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import easel.models.cpu_graph as cpu_graph
from easel.config import Settings
from easel.domain import (
    Canceled,
    GenerationParams,
    GenerationRequest,
    GenerationResult,
    InputImages,
    ModelNotFound,
    Progress,
    batch_key,
)
from easel.engine.generate import Engine
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager
from tests.tiny_models import make_tiny_sd

FAMILY_FIXTURES = {
    "sd": "tiny_sd_path",
    "sdxl": "tiny_sdxl_path",
    "z-image": "tiny_zimage_path",
    "flux": "tiny_flux_path",
}


def _engine(home: Path, **settings: Any) -> Engine:
    config = Settings(home=home, preview_every=2, **settings)
    return Engine(ModelManager(config, ModelCatalog(config)), config)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    # eager denoisers (tracing each batch shape would cost seconds); the CPU graphs have their
    # own test below
    return _engine(tmp_path_factory.mktemp("batch-home"), max_batch=4, cpu_graphs=False)


def _params(model: Path | str, **overrides: Any) -> GenerationParams:
    values: dict[str, Any] = dict(
        prompt="a red circle",
        model=str(model),
        num_inference_steps=3,
        guidance_scale=5.0,
        width=64,
        height=64,
        seed=11,
    )
    values.update(overrides)
    return GenerationParams(**values)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _solo(engine: Engine, request: GenerationRequest) -> list[np.ndarray]:
    result = engine.generate(request.params, inputs=request.inputs)
    return [_pixels(i) for i in result.images]


def _images(outcome: GenerationResult | Exception) -> list[np.ndarray]:
    assert isinstance(outcome, GenerationResult), outcome
    return [_pixels(i) for i in outcome.images]


@contextmanager
def _denoiser_batches(engine: Engine, model: Path | str) -> Iterator[list[int]]:
    """The batch size of every denoiser call on ``model`` within the block."""
    pipe = engine.models.get_pipeline(str(model)).pipeline
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    sizes: list[int] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        sizes.append(len(x))

    hook = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield sizes
    finally:
        hook.remove()


@pytest.mark.parametrize("family", list(FAMILY_FIXTURES))
def test_batched_requests_equal_solo_requests_pixel_for_pixel(
    engine: Engine, family: str, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(FAMILY_FIXTURES[family])
    flow = family in ("z-image", "flux")
    common: dict[str, Any] = {"guidance_scale": 0.0} if flow else {}
    requests = [
        GenerationRequest(_params(path, prompt="a red circle", seed=1, **common)),
        GenerationRequest(_params(path, prompt="two blue squares, large", seed=2, **common)),
        GenerationRequest(_params(path, prompt="x", seed=3, num_images=2, **common)),
    ]
    with _denoiser_batches(engine, path) as batches:
        outcomes = engine.generate_batch(requests)
    # four images in one call: 3 steps of 4 rows (8 with the unconditional halves)
    assert batches == [4 if flow else 8] * 3
    for req, outcome in zip(requests, outcomes, strict=True):
        assert isinstance(outcome, GenerationResult)
        assert outcome.seeds == [req.params.seed + i for i in range(req.params.num_images)]
        for batched, alone in zip(_images(outcome), _solo(engine, req), strict=True):
            assert np.array_equal(batched, alone)
    # and the images differ from each other (different prompts and seeds)
    firsts = {_images(o)[0].tobytes() for o in outcomes}
    assert len(firsts) == 3


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batches_replayed_as_cpu_graphs_equal_solo(
    tmp_path: Path,
    tiny_sd_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    threads: int,
) -> None:
    # the traced graph of a batch records its sliced layers (engine.batching): it is kept
    # apart from the solo graph of the same input shape, and counts apart (one graph each)
    monkeypatch.setattr(cpu_graph, "MAX_GRAPHS", 1)
    # on several threads a channels-last GroupNorm of a 32x32 latent splits each image's sums
    # across threads at places that depend on the batch (pixels 2-3 levels off before
    # engine.batching sliced it); without guidance the solo call has one image per UNet call
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    request.addfinalizer(lambda: torch.set_num_threads(before))
    engine = _engine(tmp_path, max_batch=4, cpu_graphs=True)
    requests = [
        GenerationRequest(_params(tiny_sd_path, prompt=p, seed=s, guidance_scale=0.0))
        for p, s in [("a red circle", 1), ("a blue square", 2)]
    ]
    solo_first = _solo(engine, requests[0])[0]
    outcomes = engine.generate_batch(requests)
    pipe = engine.models.get_pipeline(str(tiny_sd_path)).pipeline
    assert len(vars(pipe.unet)["forward"].graphs.graphs) == 2  # (1 row, solo) and (2 rows, sliced)
    assert np.array_equal(_images(outcomes[0])[0], solo_first)
    assert np.array_equal(_images(outcomes[1])[0], _solo(engine, requests[1])[0])


def test_negative_prompts_are_each_requests_own(engine: Engine, tiny_sd_path: Path) -> None:
    requests = [
        GenerationRequest(_params(tiny_sd_path, negative_prompt="blurry", seed=4)),
        GenerationRequest(_params(tiny_sd_path, negative_prompt="dark, noisy", seed=4)),
    ]
    with _denoiser_batches(engine, tiny_sd_path) as batches:
        outcomes = engine.generate_batch(requests)
    assert batches == [4] * 3  # one call
    results = [_images(o)[0] for o in outcomes]
    assert not np.array_equal(results[0], results[1])  # same seed, other negative prompt
    for req, batched in zip(requests, results, strict=True):
        assert np.array_equal(batched, _solo(engine, req)[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_bundled_model_batches_equal_solo_through_the_guidance_end(
    tmp_path: Path, dtype: str
) -> None:
    # the bundled model ends guidance after five of its eight steps, so the denoiser sees the
    # images' guidance pairs and then single images; float32 convolutions of one image and
    # bfloat16 GEMMs of one image's rows against a batched GEMM moved these pixels by 4-10
    # levels before engine.batching (prompts and seeds that showed it)
    engine = _engine(tmp_path, dtype=dtype, max_batch=4, cpu_graphs=False)
    model = "tiny-shapes"
    requests = [
        GenerationRequest(GenerationParams(prompt=p, model=model, seed=s))
        for p, s in [("two yellow triangles", 102), ("a small purple star", 103), ("x", 1)]
    ]
    with _denoiser_batches(engine, model) as batches:
        outcomes = engine.generate_batch(requests)
    assert batches == [6] * 5 + [3] * 3
    for req, outcome in zip(requests, outcomes, strict=True):
        assert np.array_equal(_images(outcome)[0], _solo(engine, req)[0])


def test_cancel_inside_a_batch_ends_only_that_request(engine: Engine, tiny_sd_path: Path) -> None:
    log: list[tuple[str, str, object]] = []

    def request(name: str, seed: int, cancel_after: int | None = None) -> GenerationRequest:
        steps: list[int] = []

        def on_progress(progress: Progress) -> None:
            steps.append(progress.step)
            log.append(("progress", name, progress.step))

        return GenerationRequest(
            _params(tiny_sd_path, seed=seed, num_inference_steps=4, prompt=f"shape {name}"),
            on_progress=on_progress,
            is_canceled=lambda: cancel_after is not None and len(steps) >= cancel_after,
            on_end=lambda outcome: log.append(("end", name, type(outcome).__name__)),
        )

    requests = [request("a", 1), request("b", 2, cancel_after=1), request("c", 3)]
    with _denoiser_batches(engine, tiny_sd_path) as batches:
        outcomes = engine.generate_batch(requests)

    assert isinstance(outcomes[1], Canceled)
    # b ends at the end of the second step, before a and c hear of it; no progress after
    b_end = log.index(("end", "b", "Canceled"))
    assert log[:b_end] == [("progress", "a", 1), ("progress", "b", 1), ("progress", "c", 1)]
    assert [e for e in log[b_end:] if e[1] == "b"] == [("end", "b", "Canceled")]
    assert [e[2] for e in log if e[1] == "a"] == [1, 2, 3, 4, "GenerationResult"]
    # the others go on with the pixels they get alone; b's row is still computed (one call)
    assert batches == [6] * 4
    for i in (0, 2):
        assert np.array_equal(_images(outcomes[i])[0], _solo(engine, requests[i])[0])


def test_a_batch_stops_once_every_request_is_canceled(engine: Engine, tiny_sd_path: Path) -> None:
    calls: list[int] = []
    requests = [
        GenerationRequest(
            _params(tiny_sd_path, seed=seed, num_inference_steps=6),
            on_progress=lambda p: calls.append(p.step),
            is_canceled=lambda: len(calls) >= 3,
        )
        for seed in (1, 2, 3)
    ]
    with _denoiser_batches(engine, tiny_sd_path) as batches:
        outcomes = engine.generate_batch(requests)
    assert all(isinstance(o, Canceled) for o in outcomes)
    assert batches == [6, 6]  # stopped at the end of the second step, not after six


def test_incompatible_requests_do_not_share_a_call(engine: Engine, tiny_sd_path: Path) -> None:
    requests = [
        GenerationRequest(_params(tiny_sd_path, seed=1)),
        GenerationRequest(_params(tiny_sd_path, seed=2, num_inference_steps=2)),
        GenerationRequest(_params(tiny_sd_path, seed=3, width=96)),
        GenerationRequest(_params(tiny_sd_path, seed=4, guidance_scale=3.0)),
        GenerationRequest(_params(tiny_sd_path, seed=5, scheduler="ddim")),
        GenerationRequest(_params(tiny_sd_path, seed=6, negative_prompt="blurry")),
        GenerationRequest(_params(tiny_sd_path, seed=7)),  # the first one's batch
    ]
    keys = {batch_key(r.params) for r in requests}
    assert len(keys) == 6
    with _denoiser_batches(engine, tiny_sd_path) as batches:
        outcomes = engine.generate_batch(requests)
    # requests 0 and 6 together (4 rows with CFG), every other one alone (2 rows)
    assert batches == [4] * 3 + [2] * 2 + [2] * 3 + [2] * 3 + [2] * 3 + [2] * 3
    for req, outcome in zip(requests, outcomes, strict=True):
        assert np.array_equal(_images(outcome)[0], _solo(engine, req)[0])


def test_max_batch_splits_a_batch_into_calls_and_ends_each_request_when_done(
    tmp_path: Path, tiny_sd_path: Path
) -> None:
    engine = _engine(tmp_path, max_batch=2, cpu_graphs=False)
    ended: list[str] = []
    requests = [
        GenerationRequest(
            _params(tiny_sd_path, seed=seed),
            on_end=lambda outcome, seed=seed: ended.append(f"{seed}:{len(batches)}"),  # type: ignore[misc]
        )
        for seed in (1, 2, 3)
    ]
    with _denoiser_batches(engine, tiny_sd_path) as batches:
        outcomes = engine.generate_batch(requests)
    assert batches == [4] * 3 + [2] * 3  # two images, then one
    # the first two ended when their call was over, before the third's call ran
    assert ended == ["1:3", "2:3", "3:6"]
    for req, outcome in zip(requests, outcomes, strict=True):
        assert np.array_equal(_images(outcome)[0], _solo(engine, req)[0])


def test_a_bad_request_fails_alone(engine: Engine, tiny_sd_path: Path) -> None:
    requests = [
        GenerationRequest(_params(tiny_sd_path, seed=1)),
        GenerationRequest(_params("no-such-model", seed=2)),
        GenerationRequest(_params(tiny_sd_path, seed=3)),
    ]
    outcomes = engine.generate_batch(requests)
    assert isinstance(outcomes[1], ModelNotFound)
    assert isinstance(outcomes[0], GenerationResult) and isinstance(outcomes[2], GenerationResult)


def _picture(colour: tuple[int, int, int], size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), colour)
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(255 - colour[0], 90, colour[2] // 2))
    return image


def _mask(box: tuple[int, int, int, int], size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


@pytest.fixture(scope="module")
def tiny_inpainting_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("inpainting") / "sd-inpaint", inpainting=True)


def test_editing_requests_batch_with_their_own_input_images(
    engine: Engine, tiny_sd_path: Path, tiny_inpainting_path: Path
) -> None:
    def edit(model: Path, seed: int, colour: tuple[int, int, int], **fields: Any) -> Any:
        box = fields.pop("box", None)
        fields.setdefault("strength", 0.9)
        names = {"image": "in.png", "mask": "mask.png" if box else None}  # as the CLI names them
        params = _params(model, seed=seed, **names, **fields)
        mask = _mask(box) if box else None
        return GenerationRequest(params, inputs=InputImages(image=_picture(colour), mask=mask))

    batches_of = {
        "img2img": [
            edit(tiny_sd_path, 1, (200, 30, 30), task="img2img", strength=0.7),
            edit(tiny_sd_path, 2, (30, 30, 200), task="img2img", strength=0.7),
        ],
        "inpaint": [
            edit(tiny_sd_path, 3, (20, 160, 20), task="inpaint", box=(0, 0, 31, 63), mask_blur=2),
            edit(
                tiny_sd_path,
                4,
                (90, 90, 90),
                task="inpaint",
                box=(16, 16, 47, 47),
                only_masked=True,
            ),
        ],
        "outpaint": [
            edit(tiny_sd_path, 5, (250, 200, 0), task="outpaint", outpaint={"right": 16}, width=80),
            edit(tiny_sd_path, 6, (0, 90, 90), task="outpaint", outpaint={"left": 16}, width=80),
        ],
        "inpainting checkpoint": [
            edit(tiny_inpainting_path, 7, (200, 30, 30), task="inpaint", box=(0, 0, 31, 31)),
            edit(tiny_inpainting_path, 8, (30, 30, 200), task="inpaint", box=(8, 8, 63, 40)),
        ],
    }
    for name, requests in batches_of.items():
        model = requests[0].params.model
        with _denoiser_batches(engine, model) as batches:
            outcomes = engine.generate_batch(requests)
        assert set(batches) == {4}, name  # both images in each call (with the CFG halves)
        for req, outcome in zip(requests, outcomes, strict=True):
            assert np.array_equal(_images(outcome)[0], _solo(engine, req)[0]), name


def test_batch_key_names_what_jobs_may_differ_in() -> None:
    base = GenerationParams(prompt="a", model="m", width=64, height=64, seed=1, steps=None)
    same = [
        GenerationParams(prompt="b", model="m", width=64, height=64, seed=9, num_images=3),
        GenerationParams(prompt="a", model="m", width=64, height=64, image="other-input"),
    ]
    assert all(batch_key(p) == batch_key(base) for p in same)
    other = [
        GenerationParams(prompt="a", model="n", width=64, height=64),
        GenerationParams(prompt="a", model="m", width=64, height=32),
        GenerationParams(prompt="a", model="m", width=64, height=64, num_inference_steps=4),
        GenerationParams(prompt="a", model="m", width=64, height=64, negative_prompt="x"),
        GenerationParams(prompt="a", model="m", width=64, height=64, task="img2img"),
        GenerationParams(
            prompt="a", model="m", width=64, height=64, loras=[{"id": "l", "weight": 0.5}]
        ),
    ]
    assert len({batch_key(p) for p in [base, *other]}) == 1 + len(other)
    # a negative prompt's words are free; only whether there is one is not
    assert batch_key(dict_replace(base, negative_prompt="x")) == batch_key(
        dict_replace(base, negative_prompt="y")
    )
    assert batch_key(dict_replace(base, task="style")) is None
    assert batch_key(dict_replace(base, task="train_lora")) is None


def dict_replace(params: GenerationParams, **changes: Any) -> GenerationParams:
    return GenerationParams.from_dict({**params.to_dict(), **changes})
