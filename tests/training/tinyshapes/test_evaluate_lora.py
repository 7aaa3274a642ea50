"""The hexagon dataset and the LoRA judge (`easel eval --lora`)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from easel.config import Settings
from easel.datasets import DatasetLimits, prepare_dataset
from easel.models.loras import LoraCatalog
from easel.training.job import publish_lora
from easel.training.lora import train_lora
from easel.training.lora_config import LoraConfig
from easel.training.tinyshapes.analyser import EXTRA_SHAPES, SHAPES, analyse
from easel.training.tinyshapes.evaluate_lora import (
    NEW_COLOURS,
    TRIGGER,
    evaluate_lora,
    format_markdown,
    main,
    make_dataset,
    new_cases,
    prior_prompts,
)


def test_the_dataset_is_hexagons_in_training_colours_captioned_with_the_trigger(tmp_path):
    folder = make_dataset(tmp_path / "hexagons", count=20)
    captions = [p.read_text().strip() for p in sorted(folder.glob("*.txt"))]
    assert len(captions) == 20 and all(f" {TRIGGER} " in c for c in captions)
    assert not any(colour in c.split() for c in captions for colour in NEW_COLOURS)
    for png in sorted(folder.glob("*.png")):
        found = analyse(Image.open(png), SHAPES + EXTRA_SHAPES).objects
        assert [o.shape for o in found] == ["hexagon"], png.name


def test_prior_prompts_are_the_models_usual_scenes_written_one_per_line(tmp_path):
    prompts = prior_prompts(64)
    assert len(set(prompts)) > 50 and not any(TRIGGER in p.split() for p in prompts)
    assert all(p.endswith("background") for p in prompts)
    assert main(["prior", str(tmp_path / "prior.txt")]) == 0
    assert (tmp_path / "prior.txt").read_text().splitlines() == prompts


def test_the_judge_asks_for_new_colours_only():
    cases = new_cases(40, seed=0)
    assert all(c.colour in NEW_COLOURS and c.background in NEW_COLOURS for c in cases)
    assert all(c.colour != c.background and TRIGGER in c.prompt for c in cases)
    assert len({(c.colour, c.background) for c in cases}) == 20  # every pair before repeats


def test_evaluate_lora_scores_a_trained_lora(random_shapes_model: Path, tmp_path, easel_home):
    # a LoRA of a few steps on the random model: the judge runs end to end and reports
    source = make_dataset(tmp_path / "source", count=6)
    prepare_dataset(source, tmp_path / "dataset", DatasetLimits())
    config = LoraConfig(
        model=str(random_shapes_model), dataset=str(tmp_path / "dataset"),
        out_dir=str(tmp_path / "run"), name="hex", trigger=TRIGGER, steps=2, batch_size=2,
        sample_every=0,
    )  # fmt: skip
    publish_lora(train_lora(config), config, LoraCatalog(Settings()))
    report = evaluate_lora(str(random_shapes_model), "hex", count=4, control=None,
                           out=tmp_path / "eval")  # fmt: skip
    assert len(report.cases) == 4 and 0 <= report.shape_rate <= 1
    assert report.decoded_shape_rate >= 0 and report.plain_with_lora is None
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["lora"] == "hex"
    assert Image.open(tmp_path / "eval" / "grid.png").size == (64 * 4, 64 * 2)
    assert "hexagon" in format_markdown(report)
