"""train_lora on tiny models of every family: the loss falls, the file is diffusers' own, a
cancelled or killed run goes on from its checkpoint."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors import safe_open

from easel.datasets import DatasetLimits, prepare_dataset
from easel.domain import Canceled, GenerationParams, InvalidParams
from easel.training.lora import swap_trigger, train_lora, with_trigger
from easel.training.lora_config import LoraConfig, config_from_params, lora_config

SIZE = 32


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: two threads on two cores that other work shares ran these tests 25 to
    70 times slower (each parallel region waits for the thread the other work delays)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_dataset(root: Path, count: int = 6) -> Path:
    """``count`` copies of one picture (an orange square on blue) with the trigger in the
    caption: a held-out copy measures how well the LoRA has learnt it."""
    source = root / "source"
    source.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (SIZE, SIZE), (30, 70, 230))
        image.paste((250, 140, 20), (8, 8, 24, 24))
        image.save(source / f"{i}.png")
        (source / f"{i}.txt").write_text("a zq square")
    prepare_dataset(source, root / "dataset", DatasetLimits())
    return root / "dataset"


def config(model: Path, tmp_path: Path, **changes) -> LoraConfig:
    values = dict(
        model=str(model),
        dataset=str(write_dataset(tmp_path)),
        out_dir=str(tmp_path / "run"),
        name="zq",
        trigger="zq",
        steps=16,
        batch_size=4,
        rank=4,
        learning_rate=3e-2,
        warmup_steps=0,
        size=SIZE,
        holdout=0.2,
        sample_every=16,
        sample_prompts=("a zq square",),
        sample_steps=2,
    )
    return LoraConfig(**(values | changes))


@pytest.mark.parametrize(
    "family", ["tiny_sd_path", "tiny_sdxl_path", "tiny_zimage_path", "tiny_flux_path"]
)
def test_a_few_steps_lower_the_held_out_loss_on_every_family(family, request, tmp_path, easel_home):
    model = request.getfixturevalue(family)
    result = train_lora(config(model, tmp_path))
    (before_step, before), (after_step, after) = result.heldout[0], result.heldout[-1]
    assert (before_step, after_step) == (0, 16)
    assert after < before * 0.98, result.heldout
    assert result.best_step == 16 and result.best_file and result.best_file.exists()
    run = tmp_path / "run"
    assert (run / "loss.png").exists() and (run / "samples" / "step000016.png").exists()
    assert json.loads((run / "summary.json").read_text())["steps"] == 16


def render(pipe: DiffusionPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipe("a zq square", num_inference_steps=2, height=SIZE, width=SIZE,
               generator=generator, output_type="np")  # fmt: skip
    return out.images[0]


def test_the_lora_file_loads_in_plain_diffusers_and_changes_the_output(
    tiny_sd_path, tmp_path, easel_home
):
    result = train_lora(config(tiny_sd_path, tmp_path, train_text_encoder=True))
    with safe_open(str(result.lora_file), "pt") as file:
        keys = list(file.keys())
    assert any(k.startswith("unet.") for k in keys) and any(
        k.startswith("text_encoder.") for k in keys
    )
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft warns when layers go unloaded
        pipe.load_lora_weights(str(result.lora_file))
    assert np.abs(render(pipe) - base).mean() > 1e-3
    # every trained layer arrived: attention, feed-forward and convolutions alike
    saved = {k.split(".lora_A")[0] for k in keys if k.startswith("unet.") and ".lora_A" in k}
    loaded = {f"unet.{n}" for n, m in pipe.unet.named_modules() if getattr(m, "lora_A", None)}
    assert (
        saved == loaded and any(".conv1" in k for k in saved) and any(".to_q" in k for k in saved)
    )


def test_cancel_keeps_a_checkpoint_and_the_next_run_continues_from_it(
    tiny_sd_path, tmp_path, easel_home
):
    cfg = config(tiny_sd_path, tmp_path, steps=10, checkpoint_every=100, sample_every=0)
    seen: list[int] = []

    def cancel_after_six() -> bool:
        return len(seen) >= 6

    with pytest.raises(Canceled):
        train_lora(cfg, on_step=lambda s: seen.append(s.step), is_canceled=cancel_after_six)
    assert seen == [1, 2, 3, 4, 5, 6]  # stopped at the step it was asked to
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")) == [
        "lora-step0000006.pt"
    ]
    resumed: list[int] = []
    result = train_lora(cfg, on_step=lambda s: resumed.append(s.step))
    assert resumed == [7, 8, 9, 10] and result.steps == 10


def test_prior_preservation_makes_its_class_images_once(tiny_sd_path, tmp_path, easel_home):
    cfg = config(tiny_sd_path, tmp_path, steps=2, sample_every=0, prior_prompts=("a square",),
                 prior_images=2)  # fmt: skip
    train_lora(cfg)
    assert len(list((tmp_path / "run" / "prior").glob("*.png"))) == 2


def lora_moves(model: Path, lora_file: Path, prompts: list[str]) -> dict[str, float]:
    """How far the LoRA moves the UNet's prediction for each prompt: the mean absolute change at
    the same noisy latents, over three noise levels."""
    pipe = DiffusionPipeline.from_pretrained(model)

    @torch.no_grad()
    def predictions() -> dict[str, torch.Tensor]:
        side = SIZE // pipe.vae_scale_factor
        noisy = torch.randn((3, pipe.unet.config.in_channels, side, side),
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        out = {}
        for prompt in prompts:
            embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0].repeat(3, 1, 1)
            out[prompt] = pipe.unet(noisy, torch.tensor([100, 500, 900]), embeds).sample
        return out

    before = predictions()
    pipe.load_lora_weights(str(lora_file))
    after = predictions()
    return {p: (after[p] - before[p]).abs().mean().item() for p in prompts}


def test_the_prior_keeps_its_prompts_where_the_base_model_had_them(
    tiny_sd_path, tmp_path, easel_home
):
    """Without a prior the LoRA moves every prompt's prediction alike (a tiny random model tells
    prompts apart poorly); with "a circle" as the prior it moves that prompt's under 0.6 as far,
    and the trigger's further than the prior's."""
    moves = {}
    for prior in ((), ("a circle",)):
        cfg = config(tiny_sd_path, tmp_path / str(len(prior)), sample_every=0, steps=48,
                     prior_prompts=prior, prior_images=2, prior_weight=4.0)  # fmt: skip
        lora = train_lora(cfg).lora_file
        moves[bool(prior)] = lora_moves(tiny_sd_path, lora, ["a circle", "a zq square"])
    assert moves[True]["a circle"] < 0.6 * moves[False]["a circle"], moves
    assert moves[True]["a zq square"] > 1.2 * moves[True]["a circle"], moves


def test_prior_words_keep_the_datasets_own_pictures_where_the_base_model_had_them(
    tiny_sd_path, tmp_path, easel_home
):
    """The dataset's "a zq square" pictures again as "a red square", towards the base model's
    prediction: the LoRA moves "a red square" under 0.6 as far as without, and "a zq square"
    further than "a red square"."""
    moves = {}
    for words in ((), ("red",)):
        cfg = config(tiny_sd_path, tmp_path / str(len(words)), sample_every=0, steps=48,
                     prior_words=words, prior_weight=4.0)  # fmt: skip
        lora = train_lora(cfg).lora_file
        moves[bool(words)] = lora_moves(tiny_sd_path, lora, ["a red square", "a zq square"])
    assert moves[True]["a red square"] < 0.6 * moves[False]["a red square"], moves
    assert moves[True]["a zq square"] > 1.2 * moves[True]["a red square"], moves


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-shapes"])
def test_prior_words_leave_out_exactly_the_convolutions_whose_input_no_prompt_changes(
    model, tiny_sd_path
):
    """Run the UNet on one noisy latent under two prompts and watch every ResNet's input: the
    text-only targets drop the convolutions of the ResNets whose input was the same."""
    from easel.models.catalog import TINY_SHAPES_DIR
    from easel.training.lora import _Sd

    pipe = DiffusionPipeline.from_pretrained(
        tiny_sd_path if model == "tiny-sd" else TINY_SHAPES_DIR
    )
    unet = pipe.unet
    resnets = {n: m for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D"}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in resnets}
    for name, resnet in resnets.items():
        resnet.register_forward_hook(lambda _m, args, _o, n=name: seen[n].append(args[0]))
    side = unet.config.sample_size
    latent = torch.randn(
        1, unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        for prompt in ("a red circle", "a zq square on the left"):
            embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            unet(latent, torch.tensor([500]), embeds)
    blind = {n for n in resnets if torch.equal(seen[n][0], seen[n][1])}
    assert blind and blind != set(resnets)  # some see the text and some do not
    targets = _Sd(pipe, torch.device("cpu"), xl=False, min_snr_gamma=0.0).targets(text_only=True)
    convs = {t.rsplit(".", 1)[0] for t in targets if t.endswith(("conv1", "conv2"))}
    assert convs == set(resnets) - blind
    assert "conv1" in _Sd.default_targets  # without prior words: every ResNet's


def test_swap_trigger_puts_the_word_in_the_triggers_place():
    assert (
        swap_trigger("a big red zq on the left", "zq", "circle") == "a big red circle on the left"
    )
    assert swap_trigger("a ZQ", "zq", "red circle") == "a red circle"
    assert swap_trigger("a big red zq on the left", "zq") == "a big red on the left"


def test_the_same_config_trains_the_same_lora_whatever_ran_before(
    tiny_sd_path, tmp_path, easel_home
):
    """peft draws the LoRA's first weights from torch's global generator, which other work moves."""
    tensors = []
    for run in ("a", "b"):
        torch.manual_seed(ord(run))  # the global generator as other work left it
        state = torch.random.get_rng_state()
        lora = train_lora(config(tiny_sd_path, tmp_path / run, steps=2, sample_every=0)).lora_file
        assert torch.equal(torch.random.get_rng_state(), state)  # and left as it was
        with safe_open(str(lora), "pt") as file:
            tensors.append({key: file.get_tensor(key) for key in file.keys()})
    assert tensors[0].keys() == tensors[1].keys() and tensors[0]
    assert all(torch.equal(tensors[0][key], tensors[1][key]) for key in tensors[0])


def test_the_export_scale_multiplies_the_saved_change(tiny_sd_path, tmp_path, easel_home):
    saved = []
    for scale in (1.0, 2.5):
        run = config(tiny_sd_path, tmp_path / str(scale), steps=2, sample_every=0,
                     train_text_encoder=True, export_scale=scale)  # fmt: skip
        with safe_open(str(train_lora(run).lora_file), "pt") as file:
            saved.append({key: file.get_tensor(key) for key in file.keys()})
    plain, scaled = saved
    ups = [key for key in plain if ".lora_B." in key]  # the change is lora_B @ lora_A
    assert any(k.startswith("text_encoder.") for k in ups) and plain[ups[0]].abs().sum() > 0
    for key, value in plain.items():
        expected = value * 2.5 if key in ups else value
        assert torch.allclose(scaled[key], expected), key


def test_captions_get_the_trigger_and_images_without_one_get_it_alone():
    assert with_trigger("a red hexagon", "zq") == "zq a red hexagon"
    assert with_trigger("a red zq", "zq") == "a red zq"
    assert with_trigger("  ", "zq") == "zq"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"rank": 1000}, "rank"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"name": "../evil"}, "name"),
        ({"trigger": "two words"}, "trigger"),
        ({"size": 40}, "size"),
        ({"holdout": 0.9}, "holdout"),
        ({"prior_words": ("circle", " ")}, "prior_words"),
        ({"prior_words": ("a t",)}, "prior_words"),  # the trigger itself
        ({"prior_words": "circle"}, "prior_words"),  # not a list (a crafted easel.json)
        ({"prior_words": ("x",) * 17}, "prior_words"),
        ({"prior_words": ("x" * 65,)}, "prior_words"),
        ({"prior_words": ("ci\x00rcle",)}, "prior_words"),
        ({"prior_words": ("circle\ud800",)}, "prior_words"),  # a lone surrogate
        ({"export_scale": 0.0}, "export_scale"),
        ({"train_text_encoder": "yes"}, "train_text_encoder"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(change, field):
    values = dict(model="m", dataset="d", out_dir="o", name="n", trigger="t") | change
    with pytest.raises(InvalidParams) as error:
        LoraConfig(**values)
    assert error.value.field == field


@pytest.mark.parametrize(("steps", "every"), [(8, 10), (120, 12), (600, 60), (5000, 100)])
def test_a_job_checkpoints_every_tenth_of_its_steps_and_samples_at_its_steps(steps, every):
    params = GenerationParams(
        prompt="", task="train_lora", model="tiny", name="n", trigger="zq", steps=steps,
        num_inference_steps=3, seed=5,
    )  # fmt: skip
    cfg = config_from_params(params, "data", "run")
    assert (cfg.steps, cfg.checkpoint_every, cfg.sample_steps, cfg.seed) == (steps, every, 3, 5)
    assert (cfg.rank, cfg.learning_rate) == (LoraConfig.rank, LoraConfig.learning_rate)


def test_a_models_training_defaults_fill_what_is_not_given():
    own = {"steps": 900, "prior_words": ["circle", "square"], "train_text_encoder": True,
           "batch_size": 64}  # fmt: skip
    base = dict(model="m", dataset="d", out_dir="o", name="n", trigger="t")
    cfg = lora_config(own, **base, steps=None, prior_words=None, rank=4)
    assert (cfg.steps, cfg.prior_words, cfg.train_text_encoder) == (900, ("circle", "square"), True)
    assert cfg.rank == 4 and cfg.batch_size == LoraConfig.batch_size  # only the training fields
    given = lora_config(own, **base, steps=5, prior_words=(), train_text_encoder=False)
    assert (given.steps, given.prior_words, given.train_text_encoder) == (5, (), False)
    params = GenerationParams(prompt="", task="train_lora", name="n", trigger="t", prior_words=[])
    assert config_from_params(params, "d", "o", own).prior_words == ()  # [] is none, not "unset"
    with pytest.raises(InvalidParams) as error:
        lora_config({"prior_words": ["t"]}, **base)  # the model's words still checked
    assert error.value.field == "prior_words"
