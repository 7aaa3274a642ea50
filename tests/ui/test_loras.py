"""The LoRA picker and the Train tab without a browser: the picker's choices and the request it
makes, and the train handler following a job on the stand-in generator with a stand-in trainer
(the browser test, ``test_training.py``, trains for real)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from easel.config import Settings
from easel.domain import LOCAL, GenerationParams, LoraRecord, TrainProgress, TrainSamples
from easel.imaging import png_bytes
from easel.jobs.standin import StandInGenerator
from easel.models.catalog import TRAIN_DEFAULT_FIELDS, ModelCatalog
from easel.services import Services, build_services
from easel.training.lora_config import LoraConfig
from easel.ui.access import ANYONE
from easel.ui.app import _Handlers
from easel.ui.loras import (
    MAX_PICKED,
    NONE,
    kept,
    lora_choices,
    lora_label,
    picked_loras,
    picker_note,
    picker_updates,
    rows_shown,
)
from easel.ui.training import (
    TRAINER_DEFAULTS,
    TrainHandlers,
    TrainRun,
    form_defaults,
    parse_words,
    text_encoder_trains,
    trainable,
)


def lora(name: str, family: str = "sd", trigger: str | None = "sks") -> LoraRecord:
    return LoraRecord(id=name, path=f"/loras/{name}.safetensors", family=family, trigger=trigger)


class StandInTrainer:
    """Reports ``steps`` steps and samples at step 0 and at the end, like ``LoraTrainer``."""

    def __init__(self, services: Services, steps_done: int | None = None) -> None:
        self.services = services
        self.steps_done = steps_done

    def train(
        self,
        job_id: str,
        params: GenerationParams,
        *,
        owner: str | None,
        on_progress: Callable[[TrainProgress], None],
        on_samples: Callable[[TrainSamples], None],
        is_canceled: Callable[[], bool],
    ) -> LoraRecord:
        assert params.steps and params.name
        pictures = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
        on_samples(TrainSamples(0, pictures, ["a red sks", "a blue sks"], 0.9))
        for step in range(1, params.steps + 1):
            on_progress(TrainProgress(step, params.steps, 1.0 / step, 1e-3, 0.1 * (4 - step)))
        on_samples(TrainSamples(params.steps, pictures, ["a red sks", "a blue sks"], 0.5))
        loras = self.services.loras
        loras.path_for(params.name).parent.mkdir(parents=True, exist_ok=True)
        loras.path_for(params.name).write_bytes(b"weights")
        record = dataclasses.replace(lora(params.name, trigger=params.trigger), steps=params.steps)
        return loras.save_record(record)


@pytest.fixture
def services(easel_home: Path) -> Iterator[Services]:
    services = build_services(Settings(home=easel_home), generator=StandInGenerator())
    for worker in services.workers:
        worker.trainer = StandInTrainer(services)
    yield services
    services.stop()


def dataset_files(folder: Path, count: int = 5, captions: bool = True) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = folder / f"{index}.png"
        image.write_bytes(png_bytes(Image.new("RGB", (64, 64), (40 * index, 90, 200))))
        paths.append(str(image))
        if captions:
            (folder / f"{index}.txt").write_text("a sks on a white background")
            paths.append(str(folder / f"{index}.txt"))
    return paths


def collect(updates: Any) -> list[tuple[Any, ...]]:
    """Every update of an async-generator handler, run on its own event loop."""

    async def run() -> list[tuple[Any, ...]]:
        return [update async for update in updates]

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


# --- the picker ---------------------------------------------------------------------------------


def test_choices_fit_the_family_and_name_the_trigger() -> None:
    records = [lora("zigzag"), lora("hexagon"), lora("ink", family="sdxl"), lora("x", trigger=None)]
    choices = lora_choices(records, "sd")
    assert choices == [NONE, ("hexagon (sks)", "hexagon"), ("x", "x"), ("zigzag (sks)", "zigzag")]
    assert lora_label(records[1]) == "hexagon (sks)"
    assert lora_choices(records, "flux") == [NONE]
    assert "No LoRA for flux models yet" in picker_note([NONE], "flux")
    assert picker_note(choices, "sd").startswith("3 LoRAs fit this model (sd)")


def test_the_request_takes_the_picked_rows_in_order() -> None:
    assert picked_loras(["", None, "", None], [1, 1, 1, 1]) is None
    assert picked_loras(["b", "", "a", None], [0.5, 2, None, 1]) == [
        {"id": "b", "weight": 0.5},
        {"id": "a", "weight": 1.0},  # a cleared weight box counts as 1
    ]


def test_rows_show_up_to_one_empty_row_and_never_hide_a_pick() -> None:
    assert rows_shown(["", None, None, None]) == 1
    assert rows_shown(["a", "", "", ""]) == 2
    assert rows_shown(["", "", "c", ""]) == 4  # row 3 picked: rows 1-3 and one more
    assert rows_shown(["a", "b", "c", "d"]) == MAX_PICKED
    choices = [NONE, ("hexagon (sks)", "hexagon")]
    assert kept("hexagon", choices) == "hexagon" and kept("ink", choices) == ""


def test_picker_follows_the_model_family(services: Services) -> None:
    for name, family in (("hexagon", "sd"), ("ink", "sdxl")):
        services.loras.path_for(name).parent.mkdir(parents=True, exist_ok=True)
        services.loras.path_for(name).write_bytes(b"weights")
        services.loras.save_record(lora(name, family=family))
    note, first, second = picker_updates(services, "tiny-shapes", ["hexagon", "ink"], LOCAL)
    assert "1 LoRA fits" in note
    assert first["choices"] == [NONE, ("hexagon (sks)", "hexagon")]
    assert first["value"] == "hexagon" and second["value"] == ""  # ink is for sdxl
    note, first = picker_updates(services, "sdxl-turbo", ["hexagon"], LOCAL)
    assert first["choices"] == [NONE, ("ink (sks)", "ink")] and first["value"] == ""


def test_generate_and_edit_send_the_picked_loras(services: Services, tmp_path: Path) -> None:
    services.loras.path_for("hexagon").parent.mkdir(parents=True, exist_ok=True)
    services.loras.path_for("hexagon").write_bytes(b"weights")
    services.loras.save_record(lora("hexagon"))
    services.start()
    ui = _Handlers(services)
    rows = ["hexagon", 0.8, "", 1.0, None, 1.0, None, 1.0]

    generated = collect(ui.generate("a sks", "", None, None, None, None, None, 0, True, 1, None,
                                    *rows))  # fmt: skip
    picture = Image.new("RGBA", (64, 64), (255, 255, 255, 255))
    edited = collect(ui.edit({"background": picture, "layers": []}, "img2img", "a sks", "", None,
                             0.5, 4, False, 0, 0, 0, 0, None, None, 0, True, *rows))  # fmt: skip

    assert "Done: 1 image" in generated[-1][3] and "Done: 1 image" in edited[-1][3]
    jobs = services.list_jobs()
    assert [job.task for job in jobs] == ["img2img", "txt2img"]
    assert all(job.params.loras == [{"id": "hexagon", "weight": 0.8}] for job in jobs)


# --- the Train tab ------------------------------------------------------------------------------


def test_form_defaults_are_the_trainers_under_the_models(
    services: Services, tiny_flux_path: Path
) -> None:
    config = LoraConfig(model="m", dataset="d", out_dir="o", name="n", trigger="t")
    assert TRAINER_DEFAULTS == {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in asdict(config).items()
        if key in TRAINER_DEFAULTS
    }
    assert set(TRAINER_DEFAULTS) <= set(TRAIN_DEFAULT_FIELDS)
    # tiny-shapes names its own (its easel.json); the form shows them when it is picked
    tiny = services.model_info("tiny-shapes", ANYONE)
    own = {k: v for k, v in tiny.record.train_defaults.items() if k in TRAINER_DEFAULTS}
    assert form_defaults(tiny) == {**TRAINER_DEFAULTS, **own}
    assert form_defaults(tiny)["prior_words"] == ["circle", "square", "triangle", "star", "cross"]
    steps, rank, rate, text_encoder, words = TrainHandlers(services).model_settings("tiny-shapes")
    assert (steps, text_encoder["value"], words) == (
        tiny.record.train_defaults["steps"],
        True,
        "circle, square, triangle, star, cross",
    )
    assert text_encoder["interactive"] is True and text_encoder_trains(tiny)
    # Flux's text encoders take no LoRA: the box is off and cannot be ticked
    ModelCatalog(services.settings).add("flux", str(tiny_flux_path))
    flux = TrainHandlers(services).model_settings("flux")[3]
    assert (flux["value"], flux["interactive"]) == (False, False)
    assert (rank, rate) == (8, 1e-3)
    assert form_defaults(None) == TRAINER_DEFAULTS
    assert parse_words(" circle,, square ,") == ["circle", "square"] and parse_words("") == []


def test_every_model_whose_family_trains_is_offered(services: Services) -> None:
    offered = {info.record.id for info in trainable(services.list_models())}
    assert "tiny-shapes" in offered and offered == {
        info.record.id for info in services.list_models() if "train_lora" in info.family.tasks
    }


def test_chart_has_every_series_from_its_first_point() -> None:
    run = TrainRun()
    assert run.chart() is None  # an empty chart until a point comes
    run.add_loss(0, 0.9, "held-out")
    frame = run.chart()
    assert frame is not None
    assert list(frame["series"]) == ["training", "held-out", "held-out"]
    assert math.isnan(frame["loss"][0]) and frame["loss"][2] == 0.9
    assert str(frame["step"].dtype) == "int64"  # steps on a number axis, not categories


def test_samples_come_newest_first_with_step_and_prompt() -> None:
    run = TrainRun()
    run.add_samples(0, [("a.png", "a red sks"), ("b.png", "a blue sks")])
    run.add_samples(100, [("c.png", "a red sks"), ("d.png", "a blue sks")])
    assert run.samples == [
        ("c.png", "step 100 · a red sks"),
        ("d.png", "step 100 · a blue sks"),
        ("a.png", "step 0 · a red sks"),
        ("b.png", "step 0 · a blue sks"),
    ]


def test_a_dataset_is_stored_or_refused_with_its_reason(services: Services, tmp_path: Path) -> None:
    ui = TrainHandlers(services)
    dataset, line = ui.store_dataset(dataset_files(tmp_path / "ok"))
    assert dataset is not None and "5 images, 5 captions" in line
    with pytest.warns(UserWarning, match="have no caption"):  # the pop-up, outside a page
        refused, line = ui.store_dataset(dataset_files(tmp_path / "bare", captions=False))
    assert refused is None and "Refused: 5 of 5 images have no caption" in line
    assert [d.id for d in services.list_datasets()] == [dataset]  # nothing kept of the refused
    assert ui.store_dataset(None)[0] is None  # files cleared


def test_train_follows_the_job_to_its_lora(services: Services, tmp_path: Path) -> None:
    services.start()
    ui = TrainHandlers(services)
    dataset, _ = ui.store_dataset(dataset_files(tmp_path / "ok"))

    updates = collect(ui.train(dataset, "tiny-shapes", "hexagon", "sks", 3, 4, 0.01))

    html, chart, samples, note, job_id = updates[-1]
    assert "Done: LoRA hexagon after 3 steps" in html and job_id is None
    assert "LoRA `hexagon` is ready" in note and "**sks**" in note
    assert [caption for _, caption in samples] == [
        "step 3 · a red sks", "step 3 · a blue sks", "step 0 · a red sks", "step 0 · a blue sks",
    ]  # fmt: skip
    points = chart.dropna()
    assert list(points[points.series == "held-out"].step) == [0, 3]
    assert list(points[points.series == "training"].step)[-1] == 3  # the last step always comes
    assert any("Training: step" in update[0] for update in updates if isinstance(update[0], str))
    (job,) = services.list_jobs()
    assert job.task == "train_lora" and job.priority == 0
    assert (job.params.dataset, job.params.steps, job.params.rank) == (dataset, 3, 4)


def test_train_without_a_dataset_says_what_to_do(services: Services) -> None:
    import gradio as gr

    with pytest.raises(gr.Error, match="dataset: upload one first"):
        collect(TrainHandlers(services).train(None, "tiny-shapes", "hexagon", "sks"))
    assert services.list_jobs() == []
