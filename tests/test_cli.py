"""The `easel` CLI: generate, info, models; every user error is one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from easel.cli import main
from easel.engine.metadata import read_metadata
from tests.fixtures_models import TINY_HUB_ID


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _pixels(path: Path | str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def generated(
    easel_home: Path, tiny_sd_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> list[Path]:
    """Two images from one `easel generate` run that sets every option."""
    argv = [
        "generate", "a red circle, on grey",
        "-m", str(tiny_sd_path),
        "--negative-prompt", "blurry",
        "--steps", "3",
        "--guidance", "6.5",
        "--guidance-end", "0.5",
        "--size", "80x64",
        "--seed", "41",
        "-n", "2",
        "--scheduler", "euler_a",
        "-o", str(tmp_path / "out"),
    ]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    return [Path(line) for line in out.splitlines()]


def test_generate_writes_and_prints_one_png_per_image(generated: list[Path]) -> None:
    assert [p.name for p in generated] == ["easel-41.png", "easel-42.png"]
    assert Image.open(generated[0]).size == (80, 64)
    assert not np.array_equal(_pixels(generated[0]), _pixels(generated[1]))


def test_info_round_trips_every_parameter(
    generated: list[Path], tiny_sd_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(["info", str(generated[1]), "--json"], capsys)
    assert code == 0
    assert json.loads(out) == {
        "prompt": "a red circle, on grey",
        "model": str(tiny_sd_path),
        "task": "txt2img",
        "negative_prompt": "blurry",
        "num_inference_steps": 3,
        "guidance_scale": 6.5,
        "guidance_end": 0.5,
        "width": 80,
        "height": 64,
        "seed": 42,
        "num_images": 1,
        "scheduler": "euler_a",
        "strength": None,
        "image": None,
        "mask": None,
        "mask_blur": None,
        "only_masked": None,
        "outpaint": None,
        "style_image": None,
        "style_strength": None,
        "input_hashes": None,
        "loras": None,
        "dataset": None,
        "name": None,
        "trigger": None,
        "steps": None,
        "rank": None,
        "learning_rate": None,
        "train_text_encoder": None,
        "prior_words": None,
        "export_scale": None,
    }
    code, out, _ = _run(["info", str(generated[1])], capsys)
    assert out.splitlines() == [
        "a red circle, on grey",
        "Negative prompt: blurry",
        "Steps: 3, Sampler: Euler a, CFG scale: 6.5, Guidance end: 0.5, Seed: 42, "
        f"Size: 80x64, Model: {tiny_sd_path}, Version: easel 0.1.0",
    ]


def test_from_reproduces_the_pixels_exactly(
    generated: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    again = tmp_path / "again.png"
    code, out, err = _run(["generate", "--from", str(generated[1]), "-o", str(again)], capsys)
    assert code == 0, err
    assert out.strip() == str(again)
    assert np.array_equal(_pixels(again), _pixels(generated[1]))
    assert read_metadata(again)["easel"] == read_metadata(generated[1])["easel"]
    # an option given beside --from overrides the stored request
    argv = ["generate", "--from", str(generated[1]), "--seed", "41", "-o", str(tmp_path)]
    code, out, _ = _run(argv, capsys)
    assert np.array_equal(_pixels(out.strip()), _pixels(generated[0]))


def test_hub_id_in_the_offline_cache_generates_like_the_folder(
    easel_home: Path,
    tiny_hub_cache: Path,
    tiny_sd_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    request = ["a cat", "--steps", "2", "--size", "64x64", "--seed", "3"]
    outputs = []
    for index, model in enumerate((TINY_HUB_ID, str(tiny_sd_path))):
        code, out, err = _run(
            ["generate", *request, "-m", model, "-o", str(tmp_path / str(index))], capsys
        )
        assert code == 0, err
        outputs.append(_pixels(out.strip()))
    assert np.array_equal(*outputs)


def test_long_prompt_prints_a_dropped_tokens_warning(
    easel_home: Path, tiny_sd_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "a" * 100, "-m", str(tiny_sd_path), "--steps", "1", "--size", "64x64"]
    argv += ["-o", str(tmp_path)]
    code, _, err = _run(argv, capsys)
    assert code == 0
    assert "warning: the prompt is 25 tokens longer than the text encoder's limit" in err


def test_models_list_and_add(
    easel_home: Path, tiny_sdxl_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["models", "add", "mine", str(tiny_sdxl_path), "--description", "my tiny XL"]
    code, out, _ = _run([*argv, "--config", str(tiny_sdxl_path)], capsys)
    assert code == 0 and "added mine (sdxl)" in out
    code, out, _ = _run(["models", "list", "--json"], capsys)
    by_id = {m["id"]: m for m in json.loads(out)}
    assert by_id["mine"]["available"] is True and by_id["mine"]["family"] == "sdxl"
    assert by_id["mine"]["description"] == "my tiny XL"
    assert by_id["mine"]["config"] == str(tiny_sdxl_path)
    assert by_id["sd-turbo"]["available"] is False
    code, out, _ = _run(["models", "list"], capsys)
    assert out.splitlines()[0].split() == ["ID", "FAMILY", "HERE", "SOURCE"]
    assert any(line.split()[:3] == ["mine", "sdxl", "yes"] for line in out.splitlines())


def test_models_pull_offline_fails_fast(
    easel_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["models", "pull", "sd-turbo"], capsys)
    assert code == 2
    assert "offline" in err and err.count("\n") == 1


BAD_GENERATE = [
    (["-m", "tiny-shape"], "did you mean tiny-shapes"),
    (["-m", "sd-turbo"], "easel models pull sd-turbo"),
    (["--size", "100x64"], "width must be a multiple of 8 between 64 and 2048 (got 100)"),
    (["--size", "64x4096"], "height must be a multiple of 8 between 64 and 2048 (got 4096)"),
    (["--size", "big"], "size must be WIDTHxHEIGHT"),
    (["--steps", "0"], "num_inference_steps must be a whole number between 1 and 150 (got 0)"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--guidance", "99"], "guidance_scale must be a number between 0 and 30 (got 99.0)"),
    (["-n", "50"], "num_images must be a whole number between 1 and 8 (got 50)"),
    (["--scheduler", "heun"], "scheduler must be one of euler, euler_a, dpmpp_2m"),
    (["--prompt-typo"], "unrecognized arguments: --prompt-typo"),
]


@pytest.mark.parametrize("extra, message", BAD_GENERATE, ids=[m for _, m in BAD_GENERATE])
def test_bad_generate_input_is_one_line_and_exit_2(
    extra: list[str],
    message: str,
    easel_home: Path,
    tiny_sd_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["generate", "a cat", "-m", str(tiny_sd_path), "-o", str(tmp_path), *extra]
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert message in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert out == "" and not list(tmp_path.glob("*.png"))


def test_unwritable_output_is_a_one_line_error(
    easel_home: Path, tiny_sd_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = ["generate", "a cat", "-m", str(tiny_sd_path), "--steps", "1", "--size", "64x64"]
    code, _, err = _run([*argv, "-o", str(blocker / "out")], capsys)
    assert code == 2 and err.startswith(f"error: cannot write {blocker}") and err.count("\n") == 1


def test_empty_prompt_names_the_field(
    easel_home: Path, tiny_sd_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["generate", "  ", "-m", str(tiny_sd_path)], capsys)
    assert (code, err) == (2, "error: prompt must not be empty\n")


def test_without_m_the_bundled_default_model_is_used(
    easel_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(["generate", "a red circle", "--steps", "2", "-o", str(tmp_path)], capsys)
    assert code == 0, err
    params = read_metadata(out.strip())["easel"]
    assert params["model"] == "tiny-shapes" and params["width"] == 64


def test_unavailable_default_model_says_how_to_choose(
    easel_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EASEL_DEFAULT_MODEL", "sd15")
    code, _, err = _run(["generate", "a cat"], capsys)
    assert code == 2
    assert "default model 'sd15' is not available" in err
    assert "-m PATH" in err and "easel models list" in err


@pytest.mark.parametrize("content", [None, b"not a png at all"], ids=["missing", "garbage"])
def test_info_on_unreadable_image(
    content: bytes | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    code, _, err = _run(["info", str(path)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert str(path) in err


def test_real_entry_point_prints_no_traceback(easel_home: Path, tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    for argv in (["info", str(path)], ["generate", "x", "--steps", "?"], ["nonsense"]):
        done = subprocess.run(
            [sys.executable, "-m", "easel", *argv],
            capture_output=True,
            text=True,
            env={**os.environ, "EASEL_HOME": str(easel_home)},
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


# --- editing ------------------------------------------------------------------------------------


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """An input picture, a mask of its right half, a wrong-size mask and a fake PNG."""
    files = {name: tmp_path / f"{name}.png" for name in ("image", "mask", "small", "fake")}
    Image.new("RGB", (64, 64), (220, 30, 30)).save(files["image"])
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    mask.save(files["mask"])
    Image.new("L", (32, 32), 255).save(files["small"])
    files["fake"].write_text("not an image")
    return files


def test_inpaint_from_the_command_line_and_again_with_from(
    easel_home: Path,
    tiny_sd_path: Path,
    inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["generate", "a blue square", "-m", str(tiny_sd_path), "--steps", "3", "--seed", "9"]
    argv += ["--size", "64x64"]  # the family's default (512²) would be slow
    argv += ["--image", str(inputs["image"]), "--mask", str(inputs["mask"]), "--mask-blur", "2"]
    code, out, err = _run([*argv, "-o", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    meta = read_metadata(out.strip())
    assert meta["easel"]["task"] == "inpaint" and set(meta["easel"]["input_hashes"]) == {
        "image",
        "mask",
    }
    assert "Task: inpaint" in meta["parameters"] and "Mask blur: 2" in meta["parameters"]
    left = _pixels(out.strip())[:, :30]
    assert np.array_equal(left, _pixels(inputs["image"])[:, :30]), "kept beyond the band"
    # --from finds the same input files again and makes the same pixels
    code, again, err = _run(
        ["generate", "--from", out.strip(), "-o", str(tmp_path / "b.png")], capsys
    )
    assert code == 0 and "differ" not in err, err
    assert np.array_equal(_pixels(again.strip()), _pixels(out.strip()))
    # other inputs: a warning, since the pixels cannot be the same
    argv = ["generate", "--from", out.strip(), "--image", str(inputs["mask"])]
    code, _, err = _run([*argv, "-o", str(tmp_path / "c.png")], capsys)
    assert code == 0 and "input images differ" in err


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--image", "{fake}"], "image"),
        (["--image", "{image}", "--mask", "{small}"], "mask"),
        (["--image", "{image}", "--strength", "0"], "strength"),
        (["--image", "{image}", "--strength", "1.5"], "strength"),
        (["--image", "{image}", "--outpaint", "0,0,200,0"], "outpaint"),
        (["--image", "{image}", "--outpaint", "1,2"], "outpaint"),
        (["--image", "{tmp}/missing.png"], "image"),
    ],
)
def test_bad_edit_options_exit_2_naming_the_field(
    easel_home: Path,
    inputs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    field: str,
) -> None:
    names = {**{k: str(v) for k, v in inputs.items()}, "tmp": str(tmp_path)}
    argv = ["generate", "a cat", *[a.format(**names) for a in extra], "-o", str(tmp_path / "o")]
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and field in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_generate_leaves_openvino_to_the_server_unless_asked(
    easel_home: Path,
    tiny_sd_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # one image's command does not live to use a conversion it would start (docs/CLI.md)
    pytest.importorskip("openvino")
    from easel.models import loader

    monkeypatch.setattr(loader, "MAX_PARAMETERS", 0)  # the tiny UNet counts as a large one
    asked: list[int] = []  # auto's last question before it picks OpenVINO
    monkeypatch.setattr(loader, "_room_for_openvino", lambda n: asked.append(n) or False)
    argv = ["generate", "a red circle", "-m", str(tiny_sd_path), "--steps", "1"]
    code, _, err = _run([*argv, "--size", "64x64", "-o", str(tmp_path)], capsys)
    assert code == 0, err
    assert asked == []  # PyTorch, not auto's choice
    # a server's ModelManager with the same settings would have asked
    from easel.config import Settings
    from easel.models.catalog import ModelCatalog

    settings = Settings()
    loader.ModelManager(settings, ModelCatalog(settings)).get_pipeline(str(tiny_sd_path))
    assert len(asked) == 1
