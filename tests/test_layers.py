"""The layer rule at run time: the web side loads no torch, diffusers, engine or training code.

lint-imports checks the direct imports; this checks what importing the API and UI really pulls in,
through services and jobs, in a fresh interpreter.
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


def test_api_and_ui_load_no_torch_engine_or_training() -> None:
    code = (
        "import json, sys; import easel.api.app, easel.ui.app, easel.services; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
