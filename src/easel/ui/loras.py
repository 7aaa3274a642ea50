"""The LoRA picker of the Generate and Edit tabs: up to four LoRAs from ``services.list_loras()``
that fit the chosen model's family, each with a weight, sent as the job's ``loras``.

The choices and the request are plain functions (no Gradio); :func:`lora_picker` lays the
picker out (an accordion, closed by default) and :func:`wire_picker` keeps it in step with the
model dropdown and the LoRA folder.

    >>> lora_label(record)                             # a LoRA trained with trigger "sks"
    'hexagon (sks)'
    >>> picked_loras(["hexagon", "", None, None], [0.8, 1, 1, 1])
    [{'id': 'hexagon', 'weight': 0.8}]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from easel.domain import EaselError, LoraRecord, Principal
from easel.services import Services
from easel.ui.access import ANYONE, acting_for
from easel.ui.jobs import user_errors

MAX_PICKED = 4  # LoRAs one request may take from the picker (the queue allows more)
WEIGHT_RANGE = (-2.0, 2.0)  # the sliders' range (the queue accepts -4..4)
NONE = ("(none)", "")  # the first choice of every row: no LoRA


def lora_label(record: LoraRecord) -> str:
    """``"hexagon (sks)"``: the LoRA's name and, when known, its trigger word."""
    return f"{record.id} ({record.trigger})" if record.trigger else record.id


def lora_choices(records: Sequence[LoraRecord], family: str) -> list[tuple[str, str]]:
    """Dropdown choices ``(label, name)`` of the LoRAs made for ``family``, by name, after
    the "(none)" choice."""
    fitting = sorted((r for r in records if r.family == family), key=lambda r: r.id)
    return [NONE, *((lora_label(r), r.id) for r in fitting)]


def picker_note(choices: Sequence[tuple[str, str]], family: str) -> str:
    """The line above the rows: how many LoRAs fit, or where to get one."""
    count = len(choices) - 1
    if not count:
        return (
            f"No LoRA for {family} models yet: train one on the Train tab, or add a file "
            "with `easel loras add`."
        )
    noun = "LoRA fits" if count == 1 else "LoRAs fit"
    return f"{count} {noun} this model ({family}). Put a LoRA's trigger word in the prompt."


def picked_loras(
    names: Sequence[str | None], weights: Sequence[float | None]
) -> list[dict[str, Any]] | None:
    """The request's ``loras``: ``[{"id", "weight"}]`` for each row with a LoRA picked, in
    order; None when no row has one. A missing weight is 1. A LoRA picked twice is left for
    the queue to refuse (its message names the row)."""
    picked = [
        {"id": name, "weight": 1.0 if weight is None else float(weight)}
        for name, weight in zip(names, weights, strict=True)
        if name
    ]
    return picked or None


def rows_shown(names: Sequence[str | None]) -> int:
    """How many rows to show: every row up to the last picked one, plus one empty row to pick
    another (at most :data:`MAX_PICKED`), so a picked LoRA is never hidden."""
    last = max((i for i, name in enumerate(names) if name), default=-1)
    return min(MAX_PICKED, last + 2)


def kept(name: str | None, choices: Sequence[tuple[str, str]]) -> str:
    """A row's pick after the choices change: kept when it is still offered, else "(none)"."""
    return name if name and any(value == name for _, value in choices) else ""


# --- the components -----------------------------------------------------------------------------


@dataclass
class LoraPicker:
    """The picker's components (``prefix`` names their elem_ids: ``lora-1``, ``edit-lora-1``)."""

    accordion: gr.Accordion
    note: gr.Markdown
    rows: list[gr.Row]
    names: list[gr.Dropdown]
    weights: list[gr.Slider]
    refresh: gr.Button

    @property
    def inputs(self) -> list[Any]:
        """What a handler takes: name, weight, name, weight, ... (row by row)."""
        return [c for pair in zip(self.names, self.weights, strict=True) for c in pair]


def lora_picker(services: Services, model_id: str, prefix: str = "") -> LoraPicker:
    """Lay the picker out (inside a column): the LoRAs fitting ``model_id``'s family that
    belong to no key (each visitor's own are added when the page loads)."""
    choices, note = _choices(services, model_id, ANYONE)
    rows, names, weights = [], [], []
    with gr.Accordion("LoRAs", open=False, elem_id=f"{prefix}loras") as accordion:
        with gr.Row(equal_height=False):
            shown_note = gr.Markdown(note, elem_id=f"{prefix}lora-note")
            refresh = gr.Button(
                "Refresh", size="sm", scale=0, min_width=90, elem_id=f"{prefix}lora-refresh"
            )
        for index in range(MAX_PICKED):
            with gr.Row(visible=index == 0, elem_id=f"{prefix}lora-row-{index + 1}") as row:
                names.append(
                    gr.Dropdown(
                        choices=choices,
                        value="",
                        label=f"LoRA {index + 1}",
                        scale=3,
                        elem_id=f"{prefix}lora-{index + 1}",
                    )
                )
                weights.append(
                    gr.Slider(
                        *WEIGHT_RANGE,
                        value=1.0,
                        step=0.05,
                        label="Weight",
                        scale=2,
                        elem_id=f"{prefix}lora-weight-{index + 1}",
                    )  # fmt: skip
                )
            rows.append(row)
    return LoraPicker(accordion, shown_note, rows, names, weights, refresh)


def wire_picker(services: Services, picker: LoraPicker, model: gr.Dropdown) -> None:
    """Keep the picker in step: its choices follow the model (and Refresh re-reads the LoRA
    folder), and a row appears below the last picked one."""
    refresh = refresh_event(services, picker, model)
    model.change(*refresh, api_visibility="private")
    picker.refresh.click(*refresh, api_visibility="private")

    def show_rows(*names: str | None) -> list[Any]:
        shown = rows_shown(names)
        return [gr.update(visible=index < shown) for index in range(1, MAX_PICKED)]

    for name in picker.names:
        name.change(show_rows, picker.names, picker.rows[1:], api_visibility="private", queue=False)


def refresh_event(
    services: Services, picker: LoraPicker, model: gr.Dropdown
) -> tuple[Callable[..., tuple[Any, ...]], list[Any], list[Any]]:
    """``(fn, inputs, outputs)`` that re-read the LoRA folder into ``picker`` for ``model``'s
    family, offering the LoRAs the signed-in key may use: for Refresh, a model change, and
    events wired elsewhere (a tab shown, a LoRA trained)."""

    # (the request first: Gradio passes it only to parameters before ``*names``)
    def refresh(request: gr.Request, model_id: str | None, *names: str | None) -> tuple[Any, ...]:
        with user_errors():
            principal = acting_for(services, request)
        return picker_updates(services, model_id, names, principal)

    return refresh, [model, *picker.names], [picker.note, *picker.names]


def picker_updates(
    services: Services, model_id: str | None, names: Sequence[str | None], principal: Principal
) -> tuple[Any, ...]:
    """Updates for (note, each row's dropdown): the LoRAs fitting the model's family that
    ``principal`` may use now, each row keeping its pick while it still fits."""
    choices, note = _choices(services, model_id, principal)
    return note, *(gr.update(choices=choices, value=kept(n, choices)) for n in names)


def _choices(
    services: Services, model_id: str | None, principal: Principal
) -> tuple[list[tuple[str, str]], str]:
    try:
        info = services.model_info(model_id or services.settings.default_model, principal)
    except EaselError:  # a model the catalog lost: nothing fits it
        return [NONE], "Pick a model to see the LoRAs that fit it."
    family = info.record.family
    choices = lora_choices(services.list_loras(principal), family)
    return choices, picker_note(choices, family)
