"""The Generate form's presets, limits and notes per model (no browser)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from easel.config import Settings
from easel.domain import InvalidParams
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services
from easel.ui import status
from easel.ui.forms import model_choices, model_form, parse_size, size_presets


@pytest.fixture
def services(easel_home: Path) -> Iterator[Services]:
    services = build_services(Settings(home=easel_home), generator=StandInGenerator())
    yield services
    services.stop()


def test_presets_follow_the_family_limits(services: Services) -> None:
    form = model_form(services.model_info("z-image-turbo"))
    assert form.size == "1024×1024 (1:1)" and form.sizes[0] == form.size
    assert "1248×832 (3:2)" in form.sizes and "768×1360 (9:16)" in form.sizes
    for label in form.sizes:
        width, height = parse_size(label)
        assert width % 16 == 0 and height % 16 == 0  # Z-Image packs 2x2 patches of 8x latents
        assert 64 <= min(width, height) and max(width, height) <= 2048
    assert form.steps == 8 and form.guidance == 0.0 and form.schedulers == ("flow_euler",)
    assert not form.ends_guidance_early and form.guidance_end == 1.0  # no control for it


def test_tiny_shapes_opens_at_its_training_size(services: Services) -> None:
    form = model_form(services.model_info("tiny-shapes"))
    assert form.size == "64×64 (1:1)" and form.sizes[0] == form.size
    assert form.steps == 8 and form.guidance == 2.5
    assert form.ends_guidance_early and form.guidance_end == 0.67  # from its easel.json
    for label in form.sizes:
        width, height = parse_size(label)
        assert width % 8 == 0 and height % 8 == 0 and 32 <= min(width, height)
        assert max(width, height) <= 128
        a, b = map(int, re.search(r"\((\d+):(\d+)\)", label).groups())  # type: ignore[union-attr]
        assert abs(width / height / (a / b) - 1) < 0.06, label  # the label tells the truth
    assert "96×64 (3:2)" in form.sizes and "80×80 (1:1)" in form.sizes
    assert "120×56 (21:9)" not in form.sizes  # 2.14:1 is no 21:9


def test_presets_leave_out_ratios_that_do_not_fit() -> None:
    presets = size_presets(64, 64, multiple=8, min_size=56, max_size=96)
    assert presets[0] == "64×64 (1:1)"
    assert "72×56 (4:3)" in presets
    assert not any("21:9" in p for p in presets)  # 96×40 would be below 56 px


def test_missing_model_is_marked_with_the_pull_command(services: Services) -> None:
    info = services.model_info("sd-turbo")
    assert not info.record.available
    assert ("sd-turbo (not downloaded)", "sd-turbo") in model_choices([info])
    form = model_form(info)
    assert not form.available and "`easel models pull sd-turbo`" in form.note


@pytest.mark.parametrize("text", ["", "512", "wide", "x512"])
def test_bad_size_text_names_the_field(text: str) -> None:
    with pytest.raises(InvalidParams, match="size must look like 512x512") as caught:
        parse_size(text)
    assert caught.value.field == "size"


def test_typed_sizes_parse() -> None:
    assert parse_size("768x512") == (768, 512)
    assert parse_size("768 × 512 (3:2)") == (768, 512)


def test_status_lines() -> None:
    assert "position 2 in the queue · ETA ~12 s" in status.queued_html(2, 12.3)
    assert "ETA unknown" in status.queued_html(1, None)
    running = status.running_html(3, 8, 90)
    assert "step 3 of 8 · ETA ~2 min" in running
    assert re.search(r'<progress[^>]* value="3" max="8"', running)
    assert "&lt;b&gt;" in status.failed_html("<b>")  # errors are shown as text, not markup


def test_page_builds_with_a_mistyped_default_model(easel_home: Path) -> None:
    from easel.ui import build_ui

    settings = Settings(home=easel_home, default_model="no-such-model")
    services = build_services(settings, generator=StandInGenerator())
    try:
        demo = build_ui(services)
    finally:
        services.stop()
    model = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model")
    assert model.value == services.list_models()[0].record.id
