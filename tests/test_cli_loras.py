"""`easel loras list/add` and `easel generate --lora NAME[:WEIGHT]`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from easel.engine.metadata import read_metadata
from tests.test_cli import _run
from tests.tiny_models import make_tiny_lora


@pytest.fixture
def lora_files(tiny_sd_path: Path, tiny_flux_path: Path, tmp_path: Path) -> dict[str, Path]:
    return {
        "ink": make_tiny_lora(tiny_sd_path, tmp_path / "ink.safetensors", "sd", seed=1),
        "paper": make_tiny_lora(tiny_sd_path, tmp_path / "paper.safetensors", "sd", seed=2),
        "fluxy": make_tiny_lora(tiny_flux_path, tmp_path / "fluxy.safetensors", "flux"),
    }


@pytest.fixture
def added(
    easel_home: Path, lora_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> dict[str, Path]:
    for name, file in lora_files.items():
        family = [] if name == "fluxy" else ["--family", "sd"]  # the tiny SD's widths are no clue
        code, out, err = _run(["loras", "add", str(file), *family, "--base-model", "tiny"], capsys)
        assert code == 0, err
        assert f"--lora {name}" in out
    return lora_files


def test_loras_add_and_list(added: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["loras", "list"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == [
        "NAME", "FAMILY", "BASE", "MODEL", "TRIGGER", "RANK", "STEPS", "SOURCE"
    ]  # fmt: skip
    assert [line.split()[:2] for line in lines[1:]] == [
        ["fluxy", "flux"],
        ["ink", "sd"],
        ["paper", "sd"],
    ]
    assert lines[2].split() == ["ink", "sd", "tiny", "-", "4", "-", "added"]
    code, out, _ = _run(["loras", "list", "--json"], capsys)
    records = json.loads(out)
    assert [r["id"] for r in records] == ["fluxy", "ink", "paper"]
    assert records[1]["family"] == "sd" and records[1]["rank"] == 4


def test_loras_add_errors_are_one_line(
    easel_home: Path,
    lora_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = _run(["loras", "list"], capsys)
    assert code == 0 and "no LoRAs yet" in out
    for argv, message in [
        (["loras", "add", str(lora_files["ink"])], "cannot tell which model family"),
        (["loras", "add", str(lora_files["ink"]), "--family", "sd", "--name", "a b"], "LoRA name"),
        (["loras", "add", str(tmp_path / "x.pt"), "--family", "sd"], "pickled checkpoint"),
    ]:
        code, _, err = _run(argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def _generate(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return _run(["generate", "--steps", "2", "--seed", "5", "--size", "64x64", *argv], capsys)


def test_generate_applies_loras_and_from_reuses_them(
    added: dict[str, Path], tiny_sd_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ["a red circle", "-m", str(tiny_sd_path)]
    code, out, err = _generate([*model, "-o", str(tmp_path / "plain.png")], capsys)
    assert code == 0, err
    argv = [*model, "--lora", "ink:0.5", "--lora", "paper", "-o", str(tmp_path / "lora.png")]
    code, out, err = _generate(argv, capsys)
    assert code == 0, err
    meta = read_metadata(tmp_path / "lora.png")
    assert meta["easel"]["loras"] == [{"id": "ink", "weight": 0.5}, {"id": "paper", "weight": 1.0}]
    assert meta["parameters"].splitlines()[0] == "a red circle <lora:ink:0.5> <lora:paper:1>"

    code, out, err = _run(
        ["generate", "--from", str(tmp_path / "lora.png"), "-o", str(tmp_path / "again.png")],
        capsys,
    )
    assert code == 0, err

    def pixels(name: str) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / name).convert("RGB"))

    assert np.array_equal(pixels("again.png"), pixels("lora.png"))
    assert not np.array_equal(pixels("lora.png"), pixels("plain.png"))


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ("ink:", "--lora must be NAME or NAME:WEIGHT"),
        ("ink:heavy", "--lora must be NAME or NAME:WEIGHT"),
        (":1", "--lora must be NAME or NAME:WEIGHT"),
        ("ink:nan", "--lora must be NAME or NAME:WEIGHT"),
        ("nope", "unknown LoRA 'nope'"),
        ("fluxy", "is for flux models"),
        ("ink:9", "loras[0].weight must be a number between -4 and 4"),
    ],
)
def test_generate_refuses_bad_loras_with_exit_2(
    added: dict[str, Path],
    tiny_sd_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    lora: str,
    message: str,
) -> None:
    argv = ["a cat", "-m", str(tiny_sd_path), "--lora", lora, "-o", str(tmp_path)]
    code, out, err = _generate(argv, capsys)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.png"))


def _two_step_training(model: Path, tmp_path: Path) -> list[str]:
    """`easel train lora` arguments for two steps on four "a zq square" pictures."""
    source = tmp_path / "shapes"
    source.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (30, 70, 230 - 40 * i)).save(source / f"{i}.png")
        (source / f"{i}.txt").write_text("a zq square")
    return ["train", "lora", str(source), "--name", "zq", "--trigger", "zq", "-m", str(model),
            "--steps", "2", "--size", "32", "--batch-size", "2", "--sample-every", "0",
            "--out", str(tmp_path / "run")]  # fmt: skip


def test_train_lora_takes_prior_words_and_refuses_the_trigger_as_one(
    easel_home: Path, tiny_sd_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = _two_step_training(tiny_sd_path, tmp_path)
    code, _, err = _run([*train, "--prior-word", "red", "--prior-word", "ZQ"], capsys)
    assert code == 2 and "prior_words" in err and "'ZQ'" in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    code, _, err = _run([*train, "--prior-word", "red", "--prior-word", "blue"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["prior_words"] == ["red", "blue"]


def test_train_lora_takes_prior_prompts_from_a_file(
    easel_home: Path, tiny_sd_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prior.txt"
    prompts.write_text("a circle\n\n  a red star  \n")
    train = _two_step_training(tiny_sd_path, tmp_path)
    code, _, err = _run([*train, "--prior-prompts-file", str(tmp_path / "none.txt")], capsys)
    assert code == 2 and "--prior-prompts-file" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _run(
        [*train, "--prior-prompts-file", str(prompts), "--prior-images", "3"], capsys
    )
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["prior_prompts"] == ["a circle", "a red star"] and config["prior_images"] == 3
    assert len(list((tmp_path / "run" / "prior").glob("*.png"))) == 3
