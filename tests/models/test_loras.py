"""The LoRA catalog (files, names, family guessing), request validation of ``loras``, and the
CPU graphs' rule for LoRA layers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import save_file

from easel.config import Settings
from easel.domain import (
    GenerationParams,
    InvalidParams,
    LoraNotFound,
    LoraRecord,
    ModelNotFound,
    ModelRecord,
)
from easel.models.cpu_graph import capture_unet
from easel.models.families import get_family
from easel.models.loras import LoraCatalog, guess_family
from easel.models.params import MAX_LORAS, resolve_params
from tests.tiny_models import make_tiny_lora


@pytest.fixture
def loras(tmp_path: Path) -> LoraCatalog:
    return LoraCatalog(Settings(home=tmp_path / "home"))


def _file(path: Path, shapes: dict[str, tuple[int, ...]], **metadata: str) -> Path:
    """A .safetensors file of zero tensors with these names and shapes."""
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, path, metadata=metadata or None)
    return path


def _kohya_unet(width: int) -> dict[str, tuple[int, ...]]:
    base = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    return {f"{base}.lora_down.weight": (4, width), f"{base}.lora_up.weight": (320, 4)}


def _diffusers_unet(width: int) -> dict[str, tuple[int, ...]]:
    base = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    return {f"{base}.lora_A.weight": (8, width), f"{base}.lora_B.weight": (320, 8)}


# --- the catalog --------------------------------------------------------------------------------


def test_add_copies_the_file_in_and_lists_and_gets_it(
    loras: LoraCatalog, tiny_sd_path: Path, tmp_path: Path
) -> None:
    source = make_tiny_lora(tiny_sd_path, tmp_path / "ink.safetensors", "sd")
    record = loras.add(source, name=None, family="sd", base_model="tiny")
    assert record.id == "ink" and record.family == "sd" and record.source == "added"
    assert record.rank == 4 and record.base_model == "tiny"
    assert Path(record.path) == loras.path_for("ink") == loras.folder / "ink.safetensors"
    assert loras.path_for("ink").read_bytes() == source.read_bytes()
    stored = json.loads((loras.folder / "ink.json").read_text())
    assert stored["family"] == "sd" and stored["created_at"]
    assert [r.id for r in loras.list()] == ["ink"]
    assert loras.get("ink") == record
    with pytest.raises(InvalidParams, match="exists already") as err:
        loras.add(source, name="ink", family="sd")
    assert err.value.field == "name"


def test_save_record_is_what_the_trainer_calls(loras: LoraCatalog, tmp_path: Path) -> None:
    weights = loras.path_for("mine")
    weights.parent.mkdir(parents=True)
    _file(weights, _diffusers_unet(768))
    record = LoraRecord(
        id="mine", path="", family="sd", trigger="zkz", rank=8, steps=300, extra={"loss": 0.1}
    )
    saved = loras.save_record(record)
    assert saved.path == str(weights) and saved.created_at is not None
    assert loras.get("mine") == saved
    assert not list(loras.folder.glob(".*"))  # no partial file left behind
    with pytest.raises(InvalidParams, match="no LoRA weights"):
        loras.save_record(LoraRecord(id="ghost", path="", family="sd"))


def test_unknown_names_are_404_and_say_what_to_do(loras: LoraCatalog, tmp_path: Path) -> None:
    with pytest.raises(LoraNotFound, match="easel loras add") as err:
        loras.get("nothing")
    assert err.value.status == 404
    loras.folder.mkdir(parents=True)
    _file(loras.folder / "lone.safetensors", _diffusers_unet(768))
    with pytest.raises(LoraNotFound, match="has no lone.json"):
        loras.get("lone")
    assert loras.list() == []


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a b", "x" * 65, "ü", "ink\n", "a\x00"])
def test_bad_names_are_refused(loras: LoraCatalog, tmp_path: Path, name: str) -> None:
    source = _file(tmp_path / "x.safetensors", _diffusers_unet(768))
    with pytest.raises(InvalidParams, match="LoRA name") as err:
        loras.add(source, name=name, family="sd")
    assert err.value.field == "name"


def test_only_safetensors_loras_are_taken(loras: LoraCatalog, tmp_path: Path) -> None:
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"not really")
    with pytest.raises(InvalidParams, match="pickled checkpoint .* only as .safetensors"):
        loras.add(pickled, family="sd")
    with pytest.raises(InvalidParams, match="no .safetensors file"):
        loras.add(tmp_path / "missing.safetensors", family="sd")
    model = _file(tmp_path / "model.safetensors", {"model.diffusion_model.out.weight": (4, 4)})
    with pytest.raises(InvalidParams, match="holds no LoRA weights") as err:
        loras.add(model, family="sd")
    assert err.value.field == "file"
    with pytest.raises(ModelNotFound, match="unknown model family"):
        loras.add(_file(tmp_path / "y.safetensors", _diffusers_unet(768)), family="sd3")
    assert not loras.folder.exists() or not list(loras.folder.iterdir())


@pytest.mark.parametrize(
    ("shapes", "metadata", "family"),
    [
        (_kohya_unet(768), {}, "sd"),  # SD 1.x: CLIP-L's width
        (_kohya_unet(1024), {}, "sd"),  # SD 2.x: OpenCLIP-H's
        (_kohya_unet(2048), {}, "sdxl"),  # both SDXL encoders side by side
        (_diffusers_unet(768), {}, "sd"),
        (_diffusers_unet(2048), {}, "sdxl"),
        ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)}, {}, "sd"),
        ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1280)}, {}, "sdxl"),
        ({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 32)}, {}, "sdxl"),
        ({"unet.down_blocks.2.attentions.0.transformer_blocks.3.attn1.to_q.lora_A.weight": (4, 32)}, {}, "sdxl"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 3072)}, {}, "flux"),
        ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 32)}, {}, "flux"),
        ({"transformer.layers.0.attention.to_q.lora_A.weight": (4, 32)}, {}, "z-image"),
        ({"diffusion_model.noise_refiner.0.attention.qkv.lora_A.weight": (4, 32)}, {}, "z-image"),
        (_kohya_unet(64), {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        (_kohya_unet(64), {"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd"),
        (_diffusers_unet(32), {}, None),  # a width no real model has: cannot tell
    ],
)  # fmt: skip
def test_the_family_is_guessed_from_the_header(
    shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], family: str | None, tmp_path: Path
) -> None:
    from easel.models.catalog import safetensors_header

    path = _file(tmp_path / "x.safetensors", shapes, **metadata)
    assert guess_family(safetensors_header(path)) == family


def test_add_guesses_the_family_or_asks_for_it(loras: LoraCatalog, tmp_path: Path) -> None:
    guessed = loras.add(_file(tmp_path / "xl.safetensors", _kohya_unet(2048)))
    assert guessed.family == "sdxl" and guessed.rank == 4
    with pytest.raises(InvalidParams, match="cannot tell which model family") as err:
        loras.add(_file(tmp_path / "tiny.safetensors", _diffusers_unet(32)))
    assert err.value.field == "family"
    assert loras.add(tmp_path / "tiny.safetensors", family="sdxl").family == "sdxl"


# --- request validation -------------------------------------------------------------------------

MODEL = ModelRecord(id="m", family="sd", source="x", defaults={"width": 64, "height": 64})


class _Lookup:
    def __init__(self, **families: str) -> None:
        self.families = families

    def get(self, name: str) -> LoraRecord:
        if name not in self.families:
            raise LoraNotFound(f"unknown LoRA {name!r}", field="lora")
        return LoraRecord(id=name, path=f"{name}.safetensors", family=self.families[name])


def _resolve(loras: object) -> GenerationParams:
    params = GenerationParams(prompt="a cat", loras=loras)  # type: ignore[arg-type]
    return resolve_params(params, MODEL, get_family("sd"), loras=_Lookup(a="sd", b="sd", f="flux"))


def test_resolved_loras_have_float_weights_defaulting_to_one() -> None:
    resolved = _resolve([{"id": "a", "weight": 1}, {"id": "b"}])
    assert resolved.loras == [{"id": "a", "weight": 1.0}, {"id": "b", "weight": 1.0}]
    assert all(isinstance(x["weight"], float) for x in resolved.loras)
    assert _resolve(None).loras is None and _resolve([]).loras is None
    assert _resolve(resolved.loras).loras == resolved.loras  # resolving twice changes nothing


@pytest.mark.parametrize(
    ("loras", "field", "message"),
    [
        ([{"id": "nope"}], "loras[0].id", "unknown LoRA 'nope'"),
        ([{"id": "a"}, {"id": "f"}], "loras[1].id", "is for flux models; model m is a sd model"),
        ([{"id": "a", "weight": 4.5}], "loras[0].weight", "between -4 and 4"),
        ([{"id": "a", "weight": -4.01}], "loras[0].weight", "between -4 and 4"),
        ([{"id": "a", "weight": math.nan}], "loras[0].weight", "between -4 and 4"),
        ([{"id": "a", "weight": math.inf}], "loras[0].weight", "between -4 and 4"),
        ([{"id": "a", "weight": True}], "loras[0].weight", "between -4 and 4"),
        ([{"id": "a", "weight": "1"}], "loras[0].weight", "between -4 and 4"),
        ([{"id": "a"}, {"id": "a", "weight": 0.5}], "loras[1].id", "listed twice"),
        ([{"id": "a", "scale": 1}], "loras[0]", "must be"),
        (["a"], "loras[0]", "must be"),
        ({"id": "a"}, "loras", "must be a list"),
        ([{"id": "a"}] * (MAX_LORAS + 1), "loras", f"at most {MAX_LORAS}"),
    ],
)
def test_bad_loras_name_the_field(loras: object, field: str, message: str) -> None:
    with pytest.raises(InvalidParams, match=message) as err:
        _resolve(loras)
    assert err.value.field == field
    assert err.value.status == 422


def test_loras_need_a_catalog() -> None:
    params = GenerationParams(prompt="a cat", loras=[{"id": "a"}])
    with pytest.raises(InvalidParams) as err:
        resolve_params(params, MODEL, get_family("sd"))
    assert err.value.field == "loras[0].id"


# --- CPU graphs ---------------------------------------------------------------------------------


@torch.no_grad()
def test_graphs_replay_only_while_every_lora_layer_is_off(tiny_sd_path: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").eval()
    generator = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32)
    t = torch.tensor(10)
    assert capture_unet(unet)
    replay = unet.forward
    base = unet(sample, t, text).sample  # traced and replayed
    eager_calls = []
    eager = replay.eager  # type: ignore[attr-defined]
    replay.eager = lambda *a, **k: eager_calls.append(1) or eager(*a, **k)  # type: ignore[attr-defined]

    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    unet.add_adapter(config)
    with_lora = unet(sample, t, text).sample
    assert eager_calls == [1], "a live LoRA runs eagerly"
    assert not torch.equal(with_lora, base)
    torch.testing.assert_close(with_lora, type(unet).forward(unet, sample, t, text).sample)

    unet.disable_lora()
    assert torch.equal(unet(sample, t, text).sample, base), "off: the plain model, replayed"
    assert eager_calls == [1]
    unet.enable_lora()
    assert torch.equal(unet(sample, t, text).sample, with_lora)
    assert eager_calls == [1, 1]
