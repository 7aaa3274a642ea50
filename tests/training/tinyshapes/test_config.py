"""tiny-shapes run settings: presets, command-line options, and the checks a `BaseConfig` makes
when built (the same for `easel train base`, `python -m ...recipe` and library callers)."""

import argparse
import re

import pytest

from easel import cli
from easel.domain import InvalidParams
from easel.training.commands import register
from easel.training.tinyshapes import recipe
from easel.training.tinyshapes.config import (
    PRESETS,
    BaseConfig,
    add_arguments,
    config_from_args,
    preset,
)


def test_presets_are_complete_configs():
    names = set(BaseConfig.__dataclass_fields__)
    for name, overrides in PRESETS.items():
        assert set(overrides) <= names, name
    assert preset("gpu").bf16 and preset("gpu").batch_size >= 256
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("huge")


@pytest.mark.parametrize(
    ("settings", "field", "message"),
    [
        ({"max_minutes": -1}, "max_minutes", "max_minutes (--max-minutes) must be greater than 0"),
        ({"latent_channels": 0}, "latent_channels", "latent_channels (--latent-channels) must be"),
        ({"decoder_batch_size": 0}, "decoder_batch_size", "decoder_batch_size must be at least 1"),
        ({"lr": 0.0}, "lr", "lr must be greater than 0 (got 0.0)"),
        ({"vae_share": 1.0}, "vae_share", "vae_share (--vae-share) must be at least 0 and below 1"),
        ({"hard_share": -0.5}, "hard_share", "hard_share (--hard-share) must be between 0 and 1"),
        (
            {"vae_share": 0.6, "decoder_share": 0.4},
            "decoder_share",
            "vae_share (--vae-share) + decoder_share (--decoder-share) must be at most 0.9",
        ),
    ],
)
def test_a_config_that_cannot_train_is_refused_naming_the_field(settings, field, message):
    with pytest.raises(InvalidParams, match="^" + re.escape(message)):
        BaseConfig(**settings)
    with pytest.raises(InvalidParams) as refused:
        preset("tiny", **settings)  # presets go through the same checks
    assert refused.value.field == field


def test_the_refusal_says_the_value_it_got():
    with pytest.raises(InvalidParams) as refused:
        BaseConfig(max_minutes=-1)
    assert refused.value.message == "max_minutes (--max-minutes) must be greater than 0 (got -1)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-minutes", "0"], "max_minutes (--max-minutes) must be greater than 0 (got 0.0)"),
        (
            ["--latent-channels", "0"],
            "latent_channels (--latent-channels) must be at least 1 (got 0)",
        ),
        (["--batch-size", "0"], "batch_size (--batch-size) must be at least 1 (got 0)"),
        (
            ["--vae-batch-size", "-8"],
            "vae_batch_size (--vae-batch-size) must be at least 1 (got -8)",
        ),
        (["--vae-share", "1"], "vae_share (--vae-share) must be at least 0 and below 1 (got 1.0)"),
        (
            ["--decoder-share", "-0.1"],
            "decoder_share (--decoder-share) must be at least 0 and below 1 (got -0.1)",
        ),
        (["--hard-share", "2"], "hard_share (--hard-share) must be between 0 and 1 (got 2.0)"),
        (
            ["--vae-share", "0.5", "--decoder-share", "0.5"],
            "vae_share (--vae-share) + decoder_share (--decoder-share) must be at most 0.9",
        ),
    ],
)
def test_train_command_refuses_bad_budgets(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "EXTRA_COMMANDS", [register])
    out = tmp_path / "run"
    assert cli.main(["train", "base", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()  # refused before anything was written


def test_the_training_script_refuses_bad_budgets_with_exit_code_2(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--out", str(out), "--vae-share", "1.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: vae_share (--vae-share) must be at least 0 and below 1 (got 1.5)" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    ("native", "vae_share", "decoder_share"), [(True, 0.45, 0.15), (False, 0.5, 0)]
)
def test_the_cpu_preset_gives_the_decoder_minutes_to_the_autoencoder_without_native_bf16(
    native, vae_share, decoder_share, monkeypatch
):
    monkeypatch.setattr("easel.training.tinyshapes.config.cpu_has_native_bf16", lambda: native)
    config = preset("cpu")
    assert (config.vae_share, config.decoder_share) == (vae_share, decoder_share)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    chosen = config_from_args(parser.parse_args(["--vae-share", "0.3", "--decoder-share", "0.1"]))
    assert (chosen.vae_share, chosen.decoder_share) == (0.3, 0.1)  # the user's choice wins
    assert preset("gpu").decoder_share == 0.2  # only the cpu preset depends on the CPU
