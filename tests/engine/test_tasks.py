"""Editing tasks on tiny real pipelines of every family: img2img, inpaint, outpaint, style."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from easel.config import Settings
from easel.domain import GenerationParams, InputImages, InvalidParams, Progress
from easel.engine.generate import Engine
from easel.imaging import band, pixel_hash
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager
from tests.engine.test_generate import FAMILY_FIXTURES
from tests.tiny_models import make_tiny_ip_adapter, make_tiny_sd


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    settings = Settings(home=tmp_path_factory.mktemp("tasks-home"), preview_every=1)
    return Engine(ModelManager(settings, ModelCatalog(settings)), settings)


def _picture(width: int = 64, height: int = 64) -> Image.Image:
    """A deterministic picture with structure: a gradient with a square on it."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (250, 20, 20)
    return Image.fromarray(pixels, "RGB")


def _mask(width: int = 64, height: int = 64, box: tuple[int, ...] = (40, 8, 60, 40)) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


def _params(model: Path, **overrides: object) -> GenerationParams:
    # 64x64 work size: an edit's default is the family's default area (512² for the tiny SD's
    # family, 1024² for Flux), too slow for tests (tests/models/test_params.py checks it)
    values: dict[str, object] = dict(
        prompt="a blue square",
        model=str(model),
        num_inference_steps=3,
        guidance_scale=5.0,
        seed=5,
        width=64,
        height=64,
    )
    values.update(overrides)
    return GenerationParams(**values)  # type: ignore[arg-type]


@pytest.fixture(params=list(FAMILY_FIXTURES))
def model(request: pytest.FixtureRequest) -> Path:
    path: Path = request.getfixturevalue(FAMILY_FIXTURES[request.param])
    return path


def test_inpaint_changes_only_the_mask_and_its_blur_band(engine: Engine, model: Path) -> None:
    image, mask = _picture(), _mask()
    steps: list[Progress] = []
    result = engine.generate(
        _params(model, task="inpaint", image="in", mask="m", mask_blur=3),
        inputs=InputImages(image=image, mask=mask),
        on_progress=steps.append,
    )
    out = np.asarray(result.images[0])
    assert result.images[0].size == image.size
    outside = np.asarray(band(mask, 3)) == 0
    assert np.array_equal(out[outside], np.asarray(image)[outside]), "untouched beyond the band"
    inside = np.asarray(mask) == 255
    assert np.abs(out[inside].astype(int) - np.asarray(image)[inside]).mean() > 5, "repainted"
    assert steps[-1].step == steps[-1].total == 3
    assert result.params.input_hashes == {"image": pixel_hash(image), "mask": pixel_hash(mask)}


def test_an_rgba_mask_repaints_where_alpha_is_zero(engine: Engine, tiny_sd_path: Path) -> None:
    image = _picture()
    alpha = Image.new("L", (64, 64), 255)
    alpha.paste(0, (40, 8, 60, 40))
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.putalpha(alpha)
    params = _params(tiny_sd_path, task="inpaint", image="in", mask="m", mask_blur=0)
    by_alpha = engine.generate(params, inputs=InputImages(image=image, mask=rgba)).images[0]
    by_white = engine.generate(params, inputs=InputImages(image=image, mask=_mask())).images[0]
    assert np.array_equal(np.asarray(by_alpha), np.asarray(by_white))


def test_only_masked_works_on_a_crop_and_keeps_the_rest(engine: Engine, tiny_sd_path: Path) -> None:
    image, mask = _picture(128, 96), _mask(128, 96, (100, 70, 120, 90))
    params = _params(
        tiny_sd_path, task="inpaint", image="in", mask="m", only_masked=True, width=64, height=64
    )
    out = engine.generate(params, inputs=InputImages(image=image, mask=mask)).images[0]
    assert out.size == (128, 96)
    outside = np.asarray(band(mask, 4)) == 0
    assert np.array_equal(np.asarray(out)[outside], np.asarray(image)[outside])


def test_outpaint_grows_the_canvas_and_keeps_the_original(engine: Engine, model: Path) -> None:
    image = _picture(48, 64)
    sides = {"left": 16, "top": 0, "right": 0, "bottom": 16}
    params = _params(model, task="outpaint", image="in", outpaint=sides, mask_blur=2, height=80)
    result = engine.generate(params, inputs=InputImages(image=image))
    out = np.asarray(result.images[0])
    assert result.images[0].size == (64, 80)
    # the original sits at x 16.., y 0..63; beyond 2 px of the new border it is unchanged
    assert np.array_equal(out[0:62, 18:64], np.asarray(image)[0:62, 2:48])
    assert not np.array_equal(out[0:62, 16:18], np.asarray(image)[0:62, 0:2]), "blended band"
    assert result.params.width == 64 and result.params.height == 80


def test_img2img_strength_sets_how_much_the_input_matters(engine: Engine, model: Path) -> None:
    # random weights reconstruct nothing, so compare two inputs' outputs under one seed: the
    # lower the strength, the more of each input survives and the further apart they stay
    first, second = _picture(), _picture().transpose(Image.Transpose.ROTATE_180)

    def gap(strength: float) -> float:
        params = _params(model, task="img2img", image="in", strength=strength)
        a, b = (
            engine.generate(params, inputs=InputImages(image=i)).images[0] for i in (first, second)
        )
        return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())

    assert gap(0.34) > gap(1.0)  # 0.34 × 3 steps: one step


def test_a_strength_that_makes_no_step_is_refused(engine: Engine, tiny_sd_path: Path) -> None:
    with pytest.raises(InvalidParams, match="must reach one step") as err:
        engine.generate(
            _params(tiny_sd_path, task="img2img", image="i", strength=0.2),
            inputs=InputImages(image=_picture()),
        )
    assert err.value.field == "strength"


def test_style_with_and_without_content(engine: Engine, model: Path) -> None:
    content, reference = _picture(), Image.new("RGB", (64, 64), (20, 200, 40))
    restyled = engine.generate(
        _params(model, task="style", image="c", style_image="r"),
        inputs=InputImages(image=content, style_image=reference),
    )
    fresh = engine.generate(
        _params(model, task="style", style_image="r"),
        inputs=InputImages(style_image=reference),
        on_progress=(steps := []).append,
    )
    assert restyled.images[0].size == fresh.images[0].size == (64, 64)
    assert steps[-1].step == steps[-1].total  # two calls, one progress bar


def test_tasks_share_the_loaded_weights(engine: Engine, tiny_sd_path: Path) -> None:
    manager = engine.models
    txt2img = manager.get_pipeline(str(tiny_sd_path), "txt2img").pipeline
    for task in ("img2img", "inpaint"):
        derived = manager.get_pipeline(str(tiny_sd_path), task).pipeline
        for name in ("unet", "vae", "text_encoder"):
            assert getattr(derived, name) is getattr(txt2img, name), f"{task} reloaded {name}"


def test_the_mask_must_match_the_image(engine: Engine, tiny_sd_path: Path) -> None:
    with pytest.raises(InvalidParams, match="mask must be the size of image") as err:
        engine.generate(
            _params(tiny_sd_path, task="inpaint", image="i", mask="m"),
            inputs=InputImages(image=_picture(), mask=_mask(32, 32, (0, 0, 8, 8))),
        )
    assert err.value.field == "mask"


def test_inpaint_with_guidance_ending_early_keeps_one_image(
    engine: Engine, tiny_sd_path: Path
) -> None:
    # the inpainting pipeline doubles its mask for CFG; ending guidance must halve it too
    result = engine.generate(
        _params(
            tiny_sd_path,
            task="inpaint",
            image="i",
            mask="m",
            guidance_end=0.5,
            num_inference_steps=4,
        ),
        inputs=InputImages(image=_picture(), mask=_mask()),
    )
    assert len(result.images) == 1 and result.images[0].size == (64, 64)


def test_a_dedicated_inpainting_checkpoint_inpaints_and_refuses_txt2img(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = make_tiny_sd(tmp_path_factory.mktemp("inpainting") / "sd-inpaint", inpainting=True)
    image, mask = _picture(), _mask()
    result = engine.generate(
        _params(model, task="inpaint", image="i", mask="m", guidance_end=0.5),
        inputs=InputImages(image=image, mask=mask),
    )
    outside = np.asarray(band(mask, 4)) == 0
    assert np.array_equal(np.asarray(result.images[0])[outside], np.asarray(image)[outside])
    unet = engine.models.get_pipeline(str(model), "inpaint").pipeline.unet
    assert unet.config.in_channels == 9
    with pytest.raises(InvalidParams, match="inpainting checkpoint") as err:
        engine.generate(_params(model))
    assert err.value.field == "task"


def test_style_uses_a_configured_ip_adapter_and_takes_it_out_after(
    tiny_sd_path: Path, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", preview_every=0)
    catalog = ModelCatalog(settings)
    adapter = make_tiny_ip_adapter(tmp_path / "ip-adapter", tiny_sd_path)
    catalog.add("ip", str(tiny_sd_path), ip_adapter=str(adapter), defaults={"width": 64})
    engine = Engine(ModelManager(settings, catalog), settings)
    plain = _params("ip", height=64)  # type: ignore[arg-type]
    before = np.asarray(engine.generate(plain).images[0])

    def style(colour: str, **fields: object) -> np.ndarray:
        reference = Image.new("RGB", (64, 64), colour)
        params = _params("ip", height=64, task="style", style_image="r", **fields)  # type: ignore[arg-type]
        image = engine.generate(params, inputs=InputImages(style_image=reference)).images[0]
        return np.asarray(image, dtype=float)

    red, blue = style("red"), style("blue")
    assert np.abs(red - blue).mean() > 0.5, "the reference steers the image"
    assert np.array_equal(red, style("red")), "deterministic"
    unet = engine.models.get_pipeline("ip", "txt2img").pipeline.unet
    assert unet.encoder_hid_proj is not None  # loaded while styles run
    assert np.array_equal(np.asarray(engine.generate(plain).images[0]), before)
    assert unet.encoder_hid_proj is None, "taken out for other tasks"


def test_an_ip_adapter_is_checked_when_added(tiny_sd_path: Path, tmp_path: Path) -> None:
    catalog = ModelCatalog(Settings(home=tmp_path / "home"))
    adapter = make_tiny_ip_adapter(tmp_path / "ip-adapter", tiny_sd_path)
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(adapter.read_bytes())  # no image_encoder beside it
    for source, family, path, message in [
        (tiny_sd_path, "flux", adapter, "supported for sd and sdxl"),
        (tiny_sd_path, None, lone, "image encoder"),
        (tiny_sd_path, None, tmp_path / "missing.safetensors", "must be a .safetensors file"),
    ]:
        with pytest.raises(InvalidParams, match=message) as err:
            catalog.add("x", str(source), family=family, ip_adapter=str(path))
        assert err.value.field == "ip_adapter"
