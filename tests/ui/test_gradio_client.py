"""The page's API stays usable: ``gradio_client`` generates through ``/generate``."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.ui.conftest import ServerProcess

pytestmark = pytest.mark.slow

PROMPT = "a green circle on a white background"


def test_generate_with_only_a_prompt(ui_server: ServerProcess, tmp_path: Path) -> None:
    from gradio_client import Client

    client = Client(ui_server.url + "/", verbose=False, download_files=tmp_path)
    gallery, seed, info, *_ = client.predict(PROMPT, api_name="/generate")

    assert len(gallery) == 1
    image = Image.open(gallery[0]["image"])
    assert image.size == (64, 64)  # the default model's own defaults filled the rest
    assert image.text["parameters"].startswith(PROMPT + "\n")  # the stored PNG, metadata kept
    assert f"Seed: {seed}" in info
    assert "Guidance end: 0.67" in info  # the model's default, as the form shows it
    assert gallery[0]["caption"] == f"seed {seed}"
    with ui_server.api() as api:
        (job,) = api.get("/jobs", params={"limit": 1}).json()
    assert job["params"]["prompt"] == PROMPT and job["status"] == "succeeded"


def test_guidance_end_reaches_the_job(ui_server: ServerProcess, tmp_path: Path) -> None:
    from gradio_client import Client

    client = Client(ui_server.url + "/", verbose=False, download_files=tmp_path)
    _, _, info, *_ = client.predict(PROMPT, guidance_end=1.0, api_name="/generate")
    assert "Guidance end" not in info  # guidance on every step: nothing to say
    with ui_server.api() as api:
        (job,) = api.get("/jobs", params={"limit": 1}).json()
    assert job["params"]["guidance_end"] == 1.0 and job["status"] == "succeeded"


def test_bad_input_is_an_error_naming_the_field(ui_server: ServerProcess) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(ui_server.url + "/", verbose=False)
    with pytest.raises(AppError, match=r"width must be a multiple of 8 between 32 and 128"):
        client.predict(PROMPT, size="100x64", api_name="/generate")
