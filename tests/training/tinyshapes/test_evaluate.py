"""evaluate() and `easel eval` on a random-weights tiny SD pipeline: near-chance scores, while the
same judge passes the real renders of the same prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from easel import cli
from easel.domain import InvalidParams
from easel.training.commands import register
from easel.training.tinyshapes.evaluate import (
    GROUPS,
    HELD_OUT,
    default_scenes,
    evaluate,
    frechet_distance,
)


def test_default_prompts_cover_every_held_out_combination() -> None:
    scenes = default_scenes()
    groups = {g: [s for group, s in scenes if group == g] for g in GROUPS}
    assert {len(v) for v in groups.values()} >= {32}
    held = {c for s in groups["held-out single"] for c in s.combos()}
    assert held == set(HELD_OUT)
    assert all(any(c in HELD_OUT for c in s.combos()) for s in groups["held-out two"])
    assert not any(
        c in HELD_OUT for g in ("seen single", "seen two") for s in groups[g] for c in s.combos()
    )
    assert default_scenes(seed=0) == scenes  # deterministic


def test_frechet_distance() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same spread, mean moved by (1, 2, 0): distance |shift|^2 = 5
    assert frechet_distance(a, a + [1.0, 2.0, 0.0]) == pytest.approx(5.0, abs=1e-6)
    # N(0, I) vs N(0, 4I) in 3-D: tr(I + 4I - 2*2I) = 3
    assert frechet_distance(a, 2 * rng.normal(size=(4000, 3))) == pytest.approx(3.0, rel=0.1)


def test_random_model_scores_near_chance(random_shapes_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = evaluate(str(random_shapes_model), limit=3, steps=2, out=out, device="cpu")

    # a random model draws noise: nothing is all right, attributes no better than guessing
    assert sum(report.generated.images.values()) == 12
    assert report.generated.all_right["all"] == 0.0
    for attribute in ("shape", "background", "count"):
        assert report.generated.attributes["all"][attribute] <= 0.25
    # ... while the analyser reads true renders of the same prompts
    assert report.real.all_right["all"] >= 0.9
    assert report.frechet_distance > 10 * max(report.frechet_floor, 1e-3)
    assert report.size == 64 and report.steps == 2
    # a random VAE cannot carry a shape either: the "perfect denoiser" ceiling is low too
    assert report.decoded.all_right["all"] <= 0.25

    data = json.loads((out / "report.json").read_text())
    assert len(data["judgements"]) == 12
    assert set(data["generated"]["all_right"]) == {*GROUPS, "all"}
    markdown = (out / "report.md").read_text()
    assert "| held-out single | 3 | 0.0% |" in markdown and "## Wrong images" in markdown
    grid = Image.open(out / "grid.png")
    assert grid.size == (8 * 136, 2 * 152)  # 12 tiles of 2x64 px + frame and mark strip
    # the first tile is framed red (wrong)
    assert grid.getpixel((1, 60))[0] > 180 and grid.getpixel((1, 60))[1] < 80
    assert not math.isnan(report.generated.shapes["circle"]["shape"])


def test_eval_command(
    random_shapes_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(cli, "EXTRA_COMMANDS", [register])
    out = tmp_path / "ev"
    code = cli.main(
        ["eval", str(random_shapes_model), "--out", str(out), "--limit", "1", "--steps", "1"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "All attributes right" in printed and "held-out single" in printed
    assert (out / "report.md").exists() and (out / "grid.png").exists()

    assert cli.main(["eval", str(random_shapes_model), "--limit", "0"]) == 2
    assert "--limit must be at least 1 (got 0)" in capsys.readouterr().err


def test_eval_with_own_prompts_and_bad_input(
    random_shapes_model: Path, tiny_sdxl_path: Path, tmp_path: Path, capsys
) -> None:
    prompts = [
        "a big red circle on a white background",
        "a blue star and a green cross, black background",
    ]
    report = evaluate(str(random_shapes_model), prompts=prompts, steps=1)
    assert [j.prompt for j in report.judgements] == prompts
    assert [j.group for j in report.judgements] == ["held-out single", "seen two"]
    # the folder's own guidance (easel.json), not the SD family's 7.0 to the last step
    assert (report.guidance_scale, report.guidance_end) == (3.0, 0.5)

    with pytest.raises(InvalidParams, match="prompts: cannot read object 'a purple dog'") as error:
        evaluate(str(random_shapes_model), prompts=["a purple dog on a white background"])
    assert error.value.field == "prompts"
    with pytest.raises(InvalidParams, match="guidance_end must be above 0") as error:
        evaluate(str(random_shapes_model), prompts=prompts, guidance_end=0)
    assert error.value.field == "guidance_end"
    with pytest.raises(InvalidParams, match="got a sdxl model"):
        evaluate(str(tiny_sdxl_path), limit=1, steps=1)
