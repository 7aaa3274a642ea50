"""From-scratch training on a tiny config: loss falls, checkpoints resume, the pipeline loads."""

import argparse
import json
import random

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from easel.config import Settings
from easel.domain import Canceled
from easel.models.catalog import TINY_SHAPES_DIR, ModelCatalog
from easel.training.tinyshapes.config import add_arguments, config_from_args, preset
from easel.training.tinyshapes.data import (
    COLOURS,
    SHAPES,
    Scene,
    ShapeObject,
    caption,
    sample_scene,
)
from easel.training.tinyshapes.recipe import (
    ATTRIBUTE_CLASSES,
    LORA_DEFAULTS,
    AttributeProbe,
    LatentPool,
    attribute_labels,
    build_text_encoder,
    build_unet,
    build_vae,
    sampling_defaults,
    tokenize,
    train_base,
)
from easel.training.tinyshapes.tokenizer import caption_corpus, train_tokenizer


def _tiny(out_dir, **overrides):
    # Step caps, not the clock, end these runs; the budget is generous.
    settings = {
        "max_minutes": 20,
        "vae_max_steps": 30,
        "max_steps": 30,
        "decoder_share": 0.1,
        "decoder_max_steps": 5,
        "vae_lr": 2e-3,
        "lr": 2e-3,
    }
    return preset("tiny", out_dir=str(out_dir), **{**settings, **overrides})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("run")
    steps = []
    folder = train_base(_tiny(out_dir), on_step=steps.append)
    return out_dir, folder, steps


def _mean(values):
    return sum(values) / len(values)


def test_a_few_steps_reduce_both_losses(tiny_run):
    _, _, steps = tiny_run
    for stage in ("vae", "unet"):
        losses = [s.loss for s in steps if s.stage == stage]
        assert len(losses) == 30
        assert _mean(losses[-8:]) < 0.9 * _mean(losses[:8]), (stage, losses)
    assert [s.step for s in steps if s.stage == "unet"] == list(range(1, 31))
    assert [s.step for s in steps if s.stage == "decoder"] == list(range(1, 6))
    assert all(0 <= s.fraction <= 1 for s in steps)


def test_writes_a_loadable_pipeline_and_training_artifacts(tiny_run):
    out_dir, folder, _ = tiny_run
    for name in ("loss.png", "samples.png", "summary.json", "config.json"):
        assert (out_dir / name).stat().st_size > 0
    assert [p.name for p in sorted((out_dir / "checkpoints").glob("*.pt"))] == [
        "decoder-step0000005.pt",
        "unet-step0000030.pt",
        "vae-step0000030.pt",
    ]
    # stage 3 trained the decoder only: the exported encoder is stage 1's (up to float16)
    stage1 = torch.load(out_dir / "checkpoints" / "vae-step0000030.pt", weights_only=False)["model"]
    exported = AutoencoderKL.from_pretrained(folder / "vae").state_dict()
    for name in ("encoder.conv_in.weight", "quant_conv.weight"):
        torch.testing.assert_close(exported[name], stage1[name], atol=2e-3, rtol=1e-3)
    assert not torch.allclose(
        exported["decoder.conv_out.weight"], stage1["decoder.conv_out.weight"]
    )
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["unet_steps"] == 30 and summary["params"]["unet"] > 0
    assert (folder / "tokenizer" / "merges.txt").exists()
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    assert {pipeline.unet.dtype, pipeline.vae.dtype, pipeline.text_encoder.dtype} == {torch.float32}
    image = pipeline(
        "a red circle on a white background",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
    # the folder carries its recipe's sampling settings, and Easel serves it with them
    assert json.loads((folder / "easel.json").read_text()) == {
        "defaults": sampling_defaults(_tiny(out_dir)),
        "train_lora": LORA_DEFAULTS,
    }
    record = ModelCatalog(Settings(home=out_dir / "home")).get(str(folder))
    assert record.defaults["num_inference_steps"] == 2 and record.defaults["max_size"] == 128
    assert record.train_defaults["prior_words"] == list(SHAPES)  # LoRAs keep its shapes apart


def test_resumes_from_the_latest_checkpoint(tiny_run, tmp_path):
    out_dir, _, _ = tiny_run
    steps = []
    train_base(_tiny(out_dir, max_steps=33), on_step=steps.append)
    # the finished VAE stage is not repeated; the UNet continues from step 30
    assert [(s.stage, s.step) for s in steps] == [("unet", n) for n in range(31, 34)]


def test_cancel_saves_a_checkpoint_and_raises(tmp_path):
    steps = []
    with pytest.raises(Canceled):
        train_base(
            _tiny(tmp_path, vae_max_steps=3),
            on_step=steps.append,
            is_canceled=lambda: any(s.stage == "unet" and s.step >= 2 for s in steps),
        )
    assert (tmp_path / "checkpoints" / "unet-step0000002.pt").exists()


def test_latent_channels_reach_the_autoencoder_and_the_denoiser():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--preset", "tiny", "--latent-channels", "8"]))
    assert config.latent_channels == 8 and preset("tiny").latent_channels == 4
    no_decoder = config_from_args(parser.parse_args(["--decoder-share", "0"]))
    assert no_decoder.decoder_share == 0 and preset("gpu").decoder_share > 0
    small = config_from_args(parser.parse_args(["--vae-batch-size", "8"]))
    assert small.vae_batch_size == 8 and preset("cpu").vae_batch_size == 16
    hard = config_from_args(parser.parse_args(["--hard-share", "0.3"]))
    assert hard.hard_share == 0.3 and preset("cpu").hard_share == 0
    with torch.no_grad():
        latents = build_vae(config).encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 8, 32, 32)
    unet = build_unet(config, 32)
    assert unet.config.in_channels == unet.config.out_channels == 8


def test_the_shipped_model_carries_the_recipes_sampling_settings(easel_home):
    shipped = json.loads((TINY_SHAPES_DIR / "easel.json").read_text())
    # the preset it was made with, and the LoRA defaults its fine-tunes were measured with
    assert shipped == {"defaults": sampling_defaults(preset("gpu")), "train_lora": LORA_DEFAULTS}
    record = ModelCatalog(Settings(home=easel_home)).get("tiny-shapes")
    assert record.defaults == shipped["defaults"]
    assert record.train_defaults == LORA_DEFAULTS


def test_the_latent_pool_draws_distinct_examples_and_replaces_the_oldest_first():
    scenes = [Scene((ShapeObject(shape, "red"),), "white") for shape in SHAPES]
    pool = LatentPool(capacity=4, seed=0)
    pool.add(scenes[:3], torch.arange(3.0).view(3, 1))
    drawn_scenes, drawn = pool.draw(5)  # more than it holds: all three, once each
    assert sorted(drawn.flatten().tolist()) == [0.0, 1.0, 2.0]
    assert [drawn_scenes[i] for i in range(3)] == [scenes[int(v)] for v in drawn.flatten()]
    pool.add(scenes[3:5], torch.tensor([[3.0], [4.0]]))  # full at 4: 4 replaces 0, the oldest
    assert len(pool) == 4
    assert sorted(pool.draw(4)[1].flatten().tolist()) == [1.0, 2.0, 3.0, 4.0]
    assert pool.draw(2)[1].shape == (2, 1)


def test_attribute_labels_name_each_objects_attributes_and_skip_dropped_captions():
    one = Scene((ShapeObject("star", "red", "big", "left"),), "white")
    two = Scene(
        (
            ShapeObject("circle", "blue", "small", "top"),
            ShapeObject("cross", "pink", "medium", "bottom"),
        ),
        "black",
    )
    labels = attribute_labels([one, two, one], [True, True, False])
    assert labels.shape == (3, len(ATTRIBUTE_CLASSES))
    colours, none = list(COLOURS), [len(SHAPES), len(COLOURS), 3, 5]  # "no such object"
    star, circle, cross = (SHAPES.index(s) for s in ("star", "circle", "cross"))
    # background, then shape, colour, size, position of the first object, then of the second
    assert labels[0].tolist() == [colours.index("white"), star, colours.index("red"), 2, 1, *none]
    assert labels[1].tolist() == [
        colours.index("black"),
        *(circle, colours.index("blue"), 0, 3),
        *(cross, colours.index("pink"), 1, 4),
    ]
    assert labels[2].tolist() == [-100] * len(ATTRIBUTE_CLASSES)  # an empty caption says nothing
    assert (labels[:2] < torch.tensor(ATTRIBUTE_CLASSES)).all()


def test_the_attribute_probe_teaches_a_text_encoder_to_tell_positions_apart(tmp_path):
    # What the probe is for: a text encoder trained on its loss alone reads positions back.
    torch.manual_seed(0)
    rng = random.Random(0)
    tokenizer = train_tokenizer(tmp_path, caption_corpus(count=3000))
    config = preset("tiny")
    encoder, probe = build_text_encoder(config, tokenizer), AttributeProbe(config.text_width)
    optimizer = torch.optim.Adam([*encoder.parameters(), *probe.parameters()], lr=3e-3)

    def batch(size):
        scenes = [sample_scene(rng) for _ in range(size)]
        ids = tokenize(tokenizer, [caption(s, rng) for s in scenes], torch.device("cpu"))
        return encoder(ids)[0], attribute_labels(scenes, [True] * size)

    for _ in range(300):
        context, labels = batch(32)
        optimizer.zero_grad()
        probe.loss(context, labels).backward()
        optimizer.step()
    with torch.no_grad():
        context, labels = batch(256)
        logits = probe.logits(context)
    position = 4  # background, shape, colour, size, position of the first object
    accuracy = (logits[position].argmax(dim=1) == labels[:, position]).float().mean().item()
    assert accuracy > 0.9
