"""The editing evaluator's cases and judges on true renders (a perfect edit passes, a wrong one
fails), and `easel eval --editing` end to end on a random-weights tiny SD pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from easel import cli
from easel.domain import InvalidParams
from easel.imaging import band, grow_canvas, paste_back
from easel.training.commands import register
from easel.training.tinyshapes.data import COLOURS, HELD_OUT, Scene, ShapeObject, render, to_pil
from easel.training.tinyshapes.evaluate_editing import (
    BORDER,
    FOLLOWS,
    KEPT,
    MEASURES,
    OBJECT_IN_MASK,
    STYLED,
    UNCHANGED,
    WHOLE,
    evaluate_editing,
    img2img_cases,
    inpaint_cases,
    judge_inpaint,
    judge_outpaint,
    judge_redrawn,
    judge_styled,
    outpaint_cases,
    style_cases,
)


def picture(scene: Scene, side: int = 64) -> Image.Image:
    return to_pil(render([scene], size=side))[0]


def asked(scene: Scene) -> tuple[str, str, str]:
    return scene.objects[0].colour, scene.objects[0].shape, scene.background


def test_cases_cover_every_held_out_combination_and_repeat() -> None:
    for build in (inpaint_cases, outpaint_cases, img2img_cases, style_cases):
        kwargs = {"strength": 0.3, "new_prompt": True} if build is img2img_cases else {}
        cases = build(2, 0, **kwargs)
        assert len(cases) == 2 * len(HELD_OUT)
        assert [c.prompt for c in build(2, 0, **kwargs)] == [c.prompt for c in cases]
        # the input pictures (img2img, style) or the objects asked for (inpaint, outpaint)
        held = [c.source if build in (img2img_cases, style_cases) else c.wanted for c in cases]
        assert {asked(scene) for scene in held} == set(HELD_OUT)


def drawn(image: Image.Image, background: str) -> np.ndarray:
    """Pixels that are not the background colour."""
    return (np.asarray(image) != COLOURS[background]).any(axis=2)


def test_inpaint_cases_replace_a_seen_object_under_a_mask_that_covers_the_new_one() -> None:
    for case in inpaint_cases(1, 0):
        old, new = case.source.objects[0], case.wanted.objects[0]
        assert old.shape != new.shape and old.colour != new.colour
        assert asked(case.source) not in HELD_OUT
        assert case.mask is not None
        mask = np.asarray(case.mask) > 0
        # every pixel of the asked object and of the old one may be painted, and not much more
        assert mask[drawn(picture(case.wanted), case.wanted.background)].all()
        assert mask[drawn(case.image, case.source.background)].all()
        assert mask.mean() < 0.5


def test_judge_inpaint() -> None:
    for side in (64, 128):
        case = inpaint_cases(1, 0, side=side)[3]
        assert case.mask is not None
        perfect = paste_back(case.image, picture(case.wanted, side), case.mask, 4)
        assert judge_inpaint(case, perfect, 4)[0] == {OBJECT_IN_MASK: True, UNCHANGED: True}
        # nothing repainted: the old object is still there
        assert judge_inpaint(case, case.image, 4)[0] == {OBJECT_IN_MASK: False, UNCHANGED: True}
    # one pixel changed beyond the band
    case = inpaint_cases(1, 0)[0]
    assert case.mask is not None
    perfect = paste_back(case.image, picture(case.wanted), case.mask, 4)
    assert not (np.asarray(band(case.mask, 4)) > 0)[0, 0]
    spoiled = perfect.copy()
    spoiled.putpixel((0, 0), (0, 0, 0))
    assert judge_inpaint(case, spoiled, 4)[0][UNCHANGED] is False
    # the asked object, but drawn outside the mask
    obj = case.wanted.objects[0]
    elsewhere = Scene(
        (ShapeObject(obj.shape, obj.colour, "small", "left"),), case.wanted.background
    )
    assert obj.position != "left"
    assert judge_inpaint(case, picture(elsewhere), 4)[0][OBJECT_IN_MASK] is False


def test_outpaint_cases_and_judge() -> None:
    cases = outpaint_cases(1, 0)
    cut = 0
    for case in cases:
        sides = case.params["outpaint"]
        width = 64 - sides.get("left", 0) - sides.get("right", 0)
        assert case.image.size == (width, 64 - sides.get("top", 0) - sides.get("bottom", 0))
        full = picture(case.wanted)
        assert judge_outpaint(case, full, 4)[0] == {BORDER: True, UNCHANGED: True, WHOLE: True}
        _, border = grow_canvas(case.image, sides)
        cut += bool(drawn(full, case.wanted.background)[np.asarray(border) > 0].any())
    assert 4 <= cut < len(cases)  # some crops go through the object, some do not
    # a border in another colour fails
    case = cases[0]
    pixels = np.asarray(picture(case.wanted)).copy()
    pixels[:, :16] = COLOURS["green" if case.wanted.background != "green" else "red"]
    checks, _ = judge_outpaint(case, Image.fromarray(pixels), 4)
    assert checks[BORDER] is False and checks[WHOLE] is False and checks[UNCHANGED] is True


def test_judge_img2img_and_style() -> None:
    case = img2img_cases(1, 0, strength=0.9, new_prompt=True)[0]
    assert case.source != case.wanted
    assert judge_redrawn(case, case.image, 0)[0] == {FOLLOWS: False, KEPT: True}
    assert judge_redrawn(case, picture(case.wanted), 0)[0] == {FOLLOWS: True, KEPT: False}
    for case in style_cases(1, 0):
        assert case.style_image is not None
        content, wanted = case.source.objects[0], case.wanted.objects[0]
        assert (wanted.shape, wanted.size, wanted.position) == (
            content.shape,
            content.size,
            content.position,
        )
        assert {wanted.colour, case.wanted.background}.isdisjoint(
            {content.colour, case.source.background}
        )
        assert judge_styled(case, picture(case.wanted), 0)[0] == {STYLED: True}
        assert judge_styled(case, case.image, 0)[0] == {STYLED: False}
    assert style_cases(1, 0, task="img2img")[0].style_image is None


def test_unknown_measure() -> None:
    with pytest.raises(InvalidParams, match="unknown nope"):
        evaluate_editing("tiny-shapes", measures=["nope"])


def test_eval_editing_command(
    random_shapes_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(cli, "EXTRA_COMMANDS", [register])
    out = tmp_path / "ed"
    args = ["eval", str(random_shapes_model), "--editing", "--limit", "1", "--steps", "4"]
    assert cli.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| inpaint | asked object in the mask | ≥ 80 % |" in printed
    report = json.loads((out / "report.json").read_text())
    assert [j["measure"] for j in report["judgements"]] == [m.name for m in MEASURES]
    # whatever a random model paints, the engine's paste-back keeps the rest bit for bit
    for judgement in report["judgements"]:
        assert judgement["checks"].get(UNCHANGED, True) is True
    # ... and it paints no asked object
    assert report["summaries"]["inpaint"]["rates"][OBJECT_IN_MASK] == 0.0
    assert report["steps"] == 4
    assert (out / "grid.png").exists() and len(list(out.glob("grid-*.png"))) == len(MEASURES)

    assert cli.main([*args, "--prompt", "a red circle on a white background"]) == 2
    assert "--prompt cannot be used with --editing" in capsys.readouterr().err
