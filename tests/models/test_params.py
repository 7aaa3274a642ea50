"""resolve_params: defaults per family and model, and one clear error per bad field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from easel.config import Settings
from easel.domain import GenerationParams, InvalidParams, ModelRecord
from easel.models.catalog import BUILTINS, ModelCatalog
from easel.models.families import FAMILIES, get_family
from easel.models.params import MAX_SEED, defaults_for, resolve_params

# the built-ins as the catalog serves them (tiny-shapes' defaults come from its folder)
RECORDS = {r.id: ModelCatalog(Settings(home=Path("/nonexistent"))).get(r.id) for r in BUILTINS}


def resolve(model: str = "sd15", **fields: object) -> GenerationParams:
    record = RECORDS[model]
    params = GenerationParams(**{"prompt": "a cat", **fields})  # type: ignore[arg-type]
    return resolve_params(params, record, get_family(record.family))


def test_family_defaults_fill_missing_fields() -> None:
    p = resolve("sd15")
    assert (p.num_inference_steps, p.guidance_scale, p.width, p.height, p.scheduler) == (
        25,
        7.0,
        512,
        512,
        "dpmpp_2m",
    )
    assert p.model == "sd15" and p.strength is None
    assert resolve("sdxl").width == 1024


def test_guidance_runs_to_the_end_unless_the_model_or_request_says_otherwise() -> None:
    assert resolve("sd15").guidance_end == 1.0
    assert resolve("sdxl").guidance_end == 1.0
    assert resolve("sd15", guidance_end=0.5).guidance_end == 0.5
    assert resolve("tiny-shapes").guidance_end == 0.67  # from its easel.json
    assert resolve("tiny-shapes", guidance_end=1).guidance_end == 1.0


def test_z_image_turbo_defaults() -> None:
    p = resolve("z-image-turbo")
    assert (p.num_inference_steps, p.guidance_scale, p.scheduler, p.width) == (
        8,
        0.0,
        "flow_euler",
        1024,
    )
    assert FAMILIES["z-image"].flow_shift == 3.0


def test_flux_schnell_defaults() -> None:
    p = resolve("flux-schnell")
    assert (p.num_inference_steps, p.guidance_scale, p.scheduler) == (4, 0.0, "flow_euler")


def test_model_defaults_override_family_defaults() -> None:
    p = resolve("sd-turbo")
    assert (p.num_inference_steps, p.guidance_scale, p.width) == (1, 0.0, 512)
    assert resolve("sdxl-turbo").width == 512
    assert resolve("tiny-shapes").width == 64


def test_explicit_values_win_over_defaults() -> None:
    p = resolve("sd-turbo", num_inference_steps=3, width=640, scheduler="ddim", seed=7)
    assert (p.num_inference_steps, p.width, p.scheduler, p.seed) == (3, 640, "ddim", 7)


def test_missing_seed_is_drawn_and_kept_in_range() -> None:
    seeds = {resolve().seed for _ in range(5)}
    assert len(seeds) > 1
    assert all(s is not None and 0 <= s <= MAX_SEED for s in seeds)


def test_img2img_gets_a_default_strength() -> None:
    assert resolve(task="img2img", image="an-id").strength == 0.75


def test_record_may_widen_size_limits() -> None:
    assert resolve("tiny-shapes", width=32, height=128).width == 32
    with pytest.raises(InvalidParams, match="between 32 and 128"):
        resolve("tiny-shapes", width=256)


def test_input_is_not_modified() -> None:
    params = GenerationParams(prompt="a cat")
    resolve_params(params, RECORDS["sd15"], get_family("sd"))
    assert params.width is None and params.seed is None


@pytest.mark.parametrize(
    ("model", "fields", "field", "message"),
    [
        ("sd15", {"prompt": ""}, "prompt", "prompt must not be empty"),
        ("sd15", {"prompt": "   "}, "prompt", "prompt must not be empty"),
        (
            "sd15",
            {"width": 100},
            "width",
            "width must be a multiple of 8 between 64 and 2048 (got 100)",
        ),
        ("sd15", {"height": 4096}, "height", "height must be a multiple of 8 between 64 and 2048"),
        ("sd15", {"width": 32}, "width", "between 64 and 2048 (got 32)"),
        ("z-image-turbo", {"width": 1000}, "width", "multiple of 16"),
        ("sd15", {"width": 512.0}, "width", "(got 512.0)"),
        ("sd15", {"num_inference_steps": 0}, "num_inference_steps", "between 1 and 150 (got 0)"),
        ("sd15", {"num_inference_steps": 151}, "num_inference_steps", "between 1 and 150"),
        ("sd15", {"guidance_scale": -1}, "guidance_scale", "between 0 and 30 (got -1)"),
        ("sd15", {"guidance_scale": float("nan")}, "guidance_scale", "between 0 and 30"),
        (
            "sd15",
            {"num_images": 0},
            "num_images",
            "num_images must be a whole number between 1 and 8",
        ),
        ("sd15", {"num_images": 9}, "num_images", "between 1 and 8 (got 9)"),
        ("sd15", {"seed": -1}, "seed", "seed must be a whole number between 0 and 4294967295"),
        (
            "sd15",
            {"scheduler": "plms"},
            "scheduler",
            "scheduler must be one of euler, euler_a, "
            "dpmpp_2m, dpmpp_2m_karras, ddim for sd models (got 'plms')",
        ),
        ("flux-schnell", {"scheduler": "euler"}, "scheduler", "one of flow_euler"),
        ("sd15", {"task": "upscale"}, "task", "task must be one of txt2img, img2img, inpaint"),
        ("sd15", {"task": "img2img", "image": "i", "strength": 0}, "strength", "above 0"),
        ("sd15", {"task": "img2img", "image": "i", "strength": 1.5}, "strength", "0 and 1"),
        ("sd15", {"num_inference_steps": True}, "num_inference_steps", "whole number"),
        ("sd15", {"guidance_end": 0}, "guidance_end", "guidance_end must be above 0"),
        ("sd15", {"guidance_end": 1.5}, "guidance_end", "between 0 and 1 (got 1.5)"),
        ("sd15", {"guidance_end": "half"}, "guidance_end", "guidance_end must be a number"),
        (
            "sdxl",
            {"guidance_end": 0.5},
            "guidance_end",
            "guidance_end must be 1 for sdxl models (got 0.5)",
        ),
        ("flux-schnell", {"guidance_end": 0.7}, "guidance_end", "must be 1 for flux models"),
    ],
)
def test_bad_fields_raise_invalid_params_naming_the_field(
    model: str, fields: dict, field: str, message: str
) -> None:
    with pytest.raises(InvalidParams) as info:
        resolve(model, **fields)
    assert info.value.field == field
    assert message in info.value.message
    assert "\n" not in info.value.message


def test_defaults_for_matches_what_resolve_fills() -> None:
    record = RECORDS["sd-turbo"]
    defaults = defaults_for(record, get_family("sd"))
    p = resolve("sd-turbo")
    assert {k: getattr(p, k) for k in defaults if k != "strength"} == {
        k: v for k, v in defaults.items() if k != "strength"
    }


def test_z_image_default_steps_are_eight_model_evaluations(tiny_zimage_path: Path) -> None:
    """Z-Image-Turbo is distilled for 8 transformer evaluations; check diffusers agrees."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_zimage_path)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    steps = resolve("z-image-turbo").num_inference_steps
    pipe(
        "a cat",
        num_inference_steps=steps,
        guidance_scale=0.0,
        height=64,
        width=64,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(calls) == 8


def test_every_family_default_passes_its_own_limits() -> None:
    for name, family in FAMILIES.items():
        record = ModelRecord(id=f"x-{name}", family=name, source="org/x", tasks=family.tasks)
        resolve_params(GenerationParams(prompt="a"), record, family)


def test_an_edit_works_at_the_inputs_aspect_near_the_models_default_size() -> None:
    family = get_family("sd")  # default 512x512, 64..2048, multiples of 8

    def edit(size: tuple[int, int], **fields: object) -> tuple[object, object]:
        p = resolve_params(
            GenerationParams(prompt="a cat", task="img2img", image="i", **fields),  # type: ignore[arg-type]
            RECORDS["sd15"],
            family,
            {"image": size},
        )
        return p.width, p.height

    assert edit((1024, 1024)) == (512, 512)  # large inputs are worked on at the trained size
    assert edit((256, 256)) == (512, 512)  # and small ones larger
    assert edit((1600, 900)) == (680, 384)  # the aspect kept, sides snapped to 8
    assert edit((4000, 60)) == (2048, 64)  # the limits win over the aspect
    assert edit((1024, 1024), width=256, height=320) == (256, 320)  # a given size is kept


def test_a_default_strength_rises_to_one_step_and_a_given_one_is_checked() -> None:
    style = {"task": "style", "style_image": "r"}
    assert resolve(**style, num_inference_steps=20).strength == 0.3
    assert resolve(**style, num_inference_steps=2).strength == 0.5  # 0.3 × 2 steps: none
    assert int(3 * resolve(**style, num_inference_steps=3).strength) == 1
    with pytest.raises(InvalidParams, match="must reach one step"):
        resolve(**style, num_inference_steps=2, strength=0.3)
