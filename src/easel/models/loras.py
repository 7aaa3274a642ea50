"""The LoRA catalog: EASEL_HOME/loras holds ``NAME.safetensors`` with ``NAME.json`` beside it.

Pure Python (no torch): the weights are never opened here, only the JSON header of the
``.safetensors`` file (tensor names and shapes), which is enough to tell a LoRA's family.

    >>> loras = LoraCatalog(Settings())
    >>> record = loras.add(Path("ink.safetensors"), name="ink", family=None, base_model=None)
    >>> loras.get("ink").family        # guessed from the file's key names and widths
    'sdxl'

The trainer writes ``loras.path_for(name)`` and then calls ``save_record``; ``add`` copies a file
from elsewhere in (diffusers' LoRA format or kohya's: diffusers' ``load_lora_weights`` reads both).
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import math
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from easel.config import Settings
from easel.domain import InvalidParams, LoraNotFound, LoraRecord
from easel.models.catalog import PICKLED_SUFFIXES, safetensors_header
from easel.models.families import FAMILIES, get_family
from easel.safejson import read_json_bounded

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a whole name (fullmatch)
# what a train_lora request may ask for (easel.training.lora_config checks these; the API's
# schema states them)
TRIGGER_RE = re.compile(r"[^\s<>:\"]{1,64}")  # one word (fullmatch)
MAX_TRAIN_STEPS = 100_000
MAX_RANK = 256
MAX_PRIOR_WORDS = 16  # a fine-tune's prior words: each is one more pass over the dataset
TEXT_ENCODER_FAMILIES = ("sd", "sdxl")  # whose text encoders a LoRA can train (CLIP)
# a down (A) projection of a LoRA in any of the formats diffusers reads: peft (`lora_A`),
# diffusers' older `lora.down` / `to_k_lora.down`, kohya (`lora_down`)
_DOWN_KEY = re.compile(r"(lora_A|lora\.down|lora_down)\.weight$")
# in_features of a UNet's cross-attention key projection: the text encoder's width
_CROSS_WIDTHS = {768: "sd", 1024: "sd", 2048: "sdxl"}  # SD 1.x, SD 2.x, SDXL
_CROSS_KEY = re.compile(r"attn2[._](processor[._])?to_k")
# metadata kohya's sd-scripts (ss_base_model_version) and the ModelSpec (modelspec.architecture)
# write; first match wins
_METADATA_FAMILIES = (
    ("sdxl", "sdxl"),
    ("stable-diffusion-xl", "sdxl"),
    ("flux", "flux"),
    ("z-image", "z-image"),
    ("sd_v1", "sd"),
    ("sd_v2", "sd"),
    ("stable-diffusion-v1", "sd"),
    ("stable-diffusion-v2", "sd"),
)


def check_text_encoder_family(train_text_encoder: bool, family: str) -> None:
    """A LoRA on the text encoder needs a CLIP one (the sd and sdxl families)."""
    if train_text_encoder and family not in TEXT_ENCODER_FAMILIES:
        raise InvalidParams(
            f"train_text_encoder is supported for the {' and '.join(TEXT_ENCODER_FAMILIES)} "
            f"families only (CLIP encoders), not {family}",
            field="train_text_encoder",
        )


def parse_lora_arg(text: str) -> dict[str, Any]:
    """``--lora NAME[:WEIGHT]`` as a request's ``{"id", "weight"}`` (weight 1.0 when left out);
    InvalidParams(field="lora") for an empty name or a weight that is not a finite number."""
    name, sep, weight = text.partition(":")
    try:
        value = float(weight) if sep else 1.0
    except ValueError:
        value = math.nan
    if not name or not math.isfinite(value):
        raise InvalidParams(
            f"--lora must be NAME or NAME:WEIGHT, e.g. --lora ink:0.8 (got {text!r})", field="lora"
        )
    return {"id": name, "weight": value}


def check_name(name: str) -> str:
    """``name`` if it is a valid LoRA name (also a file name), else InvalidParams(field="name")."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidParams(
            "a LoRA name must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit (got {name!r})",
            field="name",
        )
    return name


def guess_family(header: dict[str, Any]) -> str | None:
    """The model family a LoRA's safetensors ``header`` is for, or None when it cannot be told.

    Reads the trainer's metadata where there is some, then key names: Flux and Z-Image by their
    transformer's block names; SDXL by its second text encoder, ``add_embedding`` or more than
    one transformer block per attention; SD vs SDXL otherwise by the width of the UNet's
    cross-attention input (768 SD 1.x, 1024 SD 2.x, 2048 SDXL).
    """
    metadata = header.get("__metadata__") or {}
    for field in ("modelspec.architecture", "ss_base_model_version"):
        value = str(metadata.get(field, "")).lower()
        for fragment, family in _METADATA_FAMILIES:
            if fragment in value:
                return family
    keys = [k for k in header if k != "__metadata__"]
    if any(
        f in k
        for k in keys
        for f in ("double_blocks", "single_blocks", "single_transformer_blocks")
    ) or any(k.startswith("transformer.transformer_blocks.") for k in keys):
        return "flux"
    if any(
        f in k for k in keys for f in ("noise_refiner", "context_refiner", "cap_embedder")
    ) or any(
        ".attention." in k and k.startswith(("transformer.layers.", "diffusion_model.layers."))
        for k in keys
    ):
        return "z-image"
    sdxl_prefixes = ("lora_te1_", "lora_te2_", "text_encoder_2.", "te2.")
    unet_keys = [k for k in keys if k.startswith(("lora_unet_", "unet."))]
    if any(k.startswith(sdxl_prefixes) for k in keys) or any(
        "add_embedding" in k or re.search(r"transformer_blocks[._][1-9]", k) for k in unet_keys
    ):
        return "sdxl"
    for key in unet_keys:
        shape = header[key].get("shape", []) if isinstance(header[key], dict) else []
        if _CROSS_KEY.search(key) and _DOWN_KEY.search(key) and len(shape) >= 2:
            return _CROSS_WIDTHS.get(int(shape[1]))
    if any(k.startswith("lora_te_") for k in keys):  # kohya's name for SD's one text encoder
        return "sd"
    return None


def lora_rank(header: dict[str, Any]) -> int | None:
    """The rank of the first down (A) projection in ``header``; None if it has none."""
    for key, info in header.items():
        if key != "__metadata__" and _DOWN_KEY.search(key) and isinstance(info, dict):
            shape = info.get("shape") or []
            if shape:
                return int(shape[0])
    return None


class LoraCatalog:
    """The LoRAs in ``settings.loras_dir``: each a ``NAME.safetensors`` with its ``NAME.json``
    (the LoraRecord's fields). A weights file without its JSON is not listed (``easel loras add``
    makes the JSON)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def folder(self) -> Path:
        return self.settings.loras_dir

    def list(self) -> builtins.list[LoraRecord]:
        """Every LoRA, by name."""
        if not self.folder.is_dir():
            return []
        names = sorted(p.stem for p in self.folder.glob("*.json") if NAME_RE.fullmatch(p.stem))
        return [self._read(name) for name in names if self.path_for(name).is_file()]

    def get(self, name: str) -> LoraRecord:
        """The LoRA called ``name``; LoraNotFound (404, field "lora") when there is none."""
        if isinstance(name, str) and NAME_RE.fullmatch(name):
            if (self.folder / f"{name}.json").is_file() and self.path_for(name).is_file():
                return self._read(name)
            if self.path_for(name).is_file():
                raise LoraNotFound(
                    f"{self.path_for(name)} has no {name}.json beside it; add the file with "
                    f"`easel loras add FILE --name {name}`",
                    field="lora",
                )
        known = ", ".join(r.id for r in self.list()) or "none yet"
        raise LoraNotFound(
            f"unknown LoRA {name!r} (known: {known}; add one with `easel loras add FILE` or train "
            "one with `easel train lora`)",
            field="lora",
        )

    def path_for(self, name: str) -> Path:
        """Where the weights of LoRA ``name`` are (or go): ``loras_dir/NAME.safetensors``."""
        return self.folder / f"{check_name(name)}.safetensors"

    def save_record(self, record: LoraRecord) -> LoraRecord:
        """Write ``record`` as ``NAME.json`` (atomically: a reader never sees half a file) and
        return it with ``path`` set. The weights must already be at ``path_for(record.id)``."""
        path = self.path_for(record.id)
        if not path.is_file():
            raise InvalidParams(f"no LoRA weights at {path}", field="name")
        get_family(record.family)
        created = record.created_at or datetime.now(UTC)
        record = dataclasses.replace(record, path=str(path), created_at=created)
        data = dataclasses.asdict(record)
        data["created_at"] = created.isoformat()
        _atomic_write(self.folder / f"{record.id}.json", json.dumps(data, indent=2).encode())
        return record

    def add(
        self,
        file: Path,
        *,
        name: str | None = None,
        family: str | None = None,
        base_model: str | None = None,
    ) -> LoraRecord:
        """Copy the LoRA ``file`` (a .safetensors in diffusers' or kohya's format) in as ``name``
        (default: the file's stem). ``family`` is guessed from the file when not given.

        Raises InvalidParams naming the field: "file" (missing, pickled, not a LoRA), "name"
        (malformed or taken), "family" (unknown, or needed because it cannot be guessed).
        """
        file = Path(file).expanduser()
        if file.suffix.lower() in PICKLED_SUFFIXES:
            raise InvalidParams(
                f"{file.name} is a pickled checkpoint ({file.suffix}), which can run code when "
                "loaded; Easel takes LoRAs only as .safetensors (convert it first, e.g. with "
                "kohya's or diffusers' conversion scripts)",
                field="file",
            )
        if file.suffix.lower() != ".safetensors" or not file.is_file():
            raise InvalidParams(f"no .safetensors file at {file}", field="file")
        header = safetensors_header(file, field="file")  # bounded, checked as the crate does
        if lora_rank(header) is None:
            raise InvalidParams(
                f"{file.name} holds no LoRA weights (no lora_A / lora_down tensors); a full "
                "model checkpoint is added with `easel models add`",
                field="file",
            )
        name = check_name(name if name is not None else file.stem)
        target = self.path_for(name)
        if target.exists() or (self.folder / f"{name}.json").exists():
            raise InvalidParams(
                f"a LoRA named {name!r} exists already; pick another name", field="name"
            )
        if family is None:
            family = guess_family(header)
            if family is None:
                raise InvalidParams(
                    f"cannot tell which model family {file.name} is for; give it "
                    f"(--family {{{','.join(FAMILIES)}}})",
                    field="family",
                )
        get_family(family)
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{name}.safetensors.partial")
        shutil.copyfile(file, partial)
        partial.replace(target)
        record = LoraRecord(
            id=name,
            path=str(target),
            family=family,
            base_model=base_model,
            rank=lora_rank(header),
            source="added",
            created_at=datetime.now(UTC),
            extra={"file": file.name},
        )
        return self.save_record(record)

    # --- internals ------------------------------------------------------------------------------

    def _read(self, name: str) -> LoraRecord:
        file = self.folder / f"{name}.json"
        data = read_json_bounded(file, field="lora")
        if not isinstance(data, dict):
            raise InvalidParams(f"{file} is not a JSON object", field="lora")
        try:
            known = {f.name for f in dataclasses.fields(LoraRecord)}
            values = {k: v for k, v in data.items() if k in known}
            if values.get("created_at"):
                values["created_at"] = datetime.fromisoformat(values["created_at"])
            values["id"], values["path"] = name, str(self.path_for(name))
            return LoraRecord(**values)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise InvalidParams(f"cannot read {file}: {exc}", field="lora") from None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
