"""The layer rules at run time: the web side loads no torch, diffusers, engine or training code,
and the training script loads none of the server's packages.

lint-imports checks the import graph; this checks what importing really pulls in, through every
package on the way, in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = (
    "torch",
    "diffusers",
    "transformers",
    "easel.engine.generate",
    "easel.models.loader",
    "easel.training",
)


# What a bare GPU machine lacks (scripts/device_train.sh runs
# `python -m easel.training.tinyshapes.recipe` with only diffusers carried there); once, an import
# of the engine for one helper pulled them in.
SERVER_SIDE = (
    "easel.config",
    "platformdirs",
    "pydantic",
    "pydantic_settings",
    "fastapi",
    "uvicorn",
)


def _loaded_after(imports: str, names: tuple[str, ...]) -> list[str]:
    code = (
        f"import json, sys; import {imports}; "
        f"print(json.dumps([m for m in {names!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_api_and_ui_load_no_torch_engine_or_training() -> None:
    assert _loaded_after("easel.api.app, easel.ui.app, easel.services", HEAVY) == []


def test_the_training_settings_load_no_torch() -> None:
    # `easel --help` and `easel train base` read them before anything needs torch
    assert _loaded_after("easel.training.tinyshapes.config", HEAVY[:3]) == []


def test_the_training_script_loads_no_server_side_package() -> None:
    assert _loaded_after("easel.training.tinyshapes.recipe", SERVER_SIDE) == []
