"""The model catalog: built-in entries, the user's own (EASEL_HOME/models.toml), and paths.

Pure Python (no torch). ``get`` accepts a catalog id, a hub id already in the local Hugging Face
cache, a local diffusers folder or a single ``.safetensors`` checkpoint.

    >>> catalog = ModelCatalog(Settings())
    >>> catalog.get("sd-turbo").source
    'stabilityai/sd-turbo'
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import json
import logging
import os
import re
import struct
import tomllib
from pathlib import Path
from typing import Any

from easel.config import Settings
from easel.domain import (
    MODEL_DEFAULTS_FILE,
    EaselError,
    InvalidParams,
    ModelNotFound,
    ModelRecord,
)
from easel.models.families import FAMILIES, family_for_pipeline, get_family
from easel.safejson import MAX_DEPTH, loads_bounded, open_regular, read_json_bounded

log = logging.getLogger(__name__)

TINY_SHAPES_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-shapes"

BUILTINS: tuple[ModelRecord, ...] = (
    ModelRecord(
        id="tiny-shapes",
        family="sd",
        source=str(TINY_SHAPES_DIR),
        description=(
            "Bundled 64x64 model of coloured shapes, trained by Easel (CPU friendly); "
            'name a background: "a red circle on a white background"'
        ),
        # its defaults (8 steps, guidance 2.5, 64x64, 32..128) are in the folder's easel.json
    ),
    ModelRecord(
        id="z-image-turbo",
        family="z-image",
        source="Tongyi-MAI/Z-Image-Turbo",
        description="Z-Image-Turbo 6B: 8 steps, no guidance",
    ),
    ModelRecord(
        id="sd-turbo",
        family="sd",
        source="stabilityai/sd-turbo",
        description="SD-Turbo (SD 2.1 distilled): 1 step at 512x512",
        defaults={"num_inference_steps": 1, "guidance_scale": 0.0, "scheduler": "euler_a"},
    ),
    ModelRecord(
        id="sdxl-turbo",
        family="sdxl",
        source="stabilityai/sdxl-turbo",
        description="SDXL-Turbo: 1 step at 512x512",
        defaults={
            "num_inference_steps": 1,
            "guidance_scale": 0.0,
            "width": 512,
            "height": 512,
            "scheduler": "euler_a",
        },
    ),
    ModelRecord(
        id="sd15",
        family="sd",
        source="stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Stable Diffusion 1.5",
    ),
    ModelRecord(
        id="sdxl",
        family="sdxl",
        source="stabilityai/stable-diffusion-xl-base-1.0",
        description="Stable Diffusion XL 1.0 base",
    ),
    ModelRecord(
        id="flux-schnell",
        family="flux",
        source="black-forest-labs/FLUX.1-schnell",
        description="FLUX.1 [schnell]: 4 steps, no guidance",
    ),
)

# pickle-based weight files: unpickling one may run any code (InvokeAI's remote code execution,
# CVE-2024-12029, came through them), so Easel loads weights only from .safetensors
PICKLED_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
CONVERT_HINT = (
    "convert it once, in a Python you trust, with "
    "`DiffusionPipeline.from_pretrained(FOLDER).save_pretrained(NEW_FOLDER)` (diffusers saves "
    "safetensors), or for a single checkpoint `StableDiffusionPipeline.from_single_file(FILE)"
    ".save_pretrained(NEW_FOLDER)`"
)

# the safetensors crate's own limit (MAX_HEADER_SIZE in safetensors/src/tensor.rs): a header
# longer than it can load is refused before a byte of it is read
MAX_SAFETENSORS_HEADER = 100_000_000
# what a path that is not a usable model gets, whatever the reason (missing, not a model,
# unreadable, crafted, pickled): the same words, so an error never tells whether a path exists
# on the server. `easel models add` (run where the files are) says why; the server logs it
UNUSABLE_PATH = (
    "no usable model at {path}: name a diffusers folder with model_index.json, or a "
    ".safetensors checkpoint (Easel loads weights only from .safetensors); "
    "`easel models add NAME PATH` run where the files are says why a path is refused"
)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# state-dict key fragments that identify a single-file checkpoint's family (first match wins)
_SINGLE_FILE_KEYS = (
    ("conditioner.embedders.1", "sdxl"),
    ("double_blocks.", "flux"),
    ("noise_refiner.", "z-image"),
    ("cap_embedder.", "z-image"),
    ("model.diffusion_model.input_blocks", "sd"),
)


# what an easel.json's ``train_lora`` may set, by kind: LoraConfig fields (which check the values)
TRAIN_DEFAULT_FIELDS = {
    "steps": "a whole number",
    "rank": "a whole number",
    "learning_rate": "a number",
    "train_text_encoder": "true or false",
    "prior_words": "a list of words",
    "export_scale": "a number",
}


def folder_defaults(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The defaults in ``folder``/easel.json, read once: generation's (``defaults``) and a LoRA
    fine-tune's (``train_lora``: each a known setting of the right kind; the ranges are
    LoraConfig's to check); ({}, {}) when there is no such file."""
    file = folder / MODEL_DEFAULTS_FILE
    if not file.is_file():
        return {}, {}
    try:
        data = read_json_bounded(file, field="model", what="it")
    except InvalidParams as exc:
        raise InvalidParams(f"cannot read {file}: {exc.message}", field="model") from None
    sections = []
    for key in ("defaults", "train_lora"):
        section = data.get(key, {}) if isinstance(data, dict) else None
        if not isinstance(section, dict):
            raise InvalidParams(f"{file}: `{key}` must be an object", field="model")
        sections.append(section)
    generation, training = sections
    for key, value in training.items():
        kind = TRAIN_DEFAULT_FIELDS.get(key)
        if kind is None:
            known = ", ".join(TRAIN_DEFAULT_FIELDS)
            raise InvalidParams(
                f"{file}: `train_lora` has no setting {key!r} (known: {known})", field="model"
            )
        if not _is_kind(value, kind):
            raise InvalidParams(
                f"{file}: `train_lora.{key}` must be {kind} (got {value!r:.80})", field="model"
            )
    return generation, training


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "true or false":
        return isinstance(value, bool)
    if kind == "a list of words":
        return isinstance(value, list) and all(isinstance(word, str) for word in value)
    number = int if kind == "a whole number" else int | float
    return isinstance(value, number) and not isinstance(value, bool)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (tests change it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id`` if it holds a complete diffusers pipeline."""
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=hub_cache_dir())
    if not isinstance(index, str):
        return None
    folder = Path(index).parent
    return folder if _pipeline_complete(folder) else None


def _pipeline_complete(folder: Path) -> bool:
    """Every component named in model_index.json has a non-empty subfolder."""
    try:
        names = _component_names(folder)
        return all((folder / n).is_dir() and any((folder / n).iterdir()) for n in names)
    except (InvalidParams, OSError):
        return False


def model_index(folder: Path, field: str = "model") -> dict[str, Any]:
    """``folder``/model_index.json, read bounded (see easel.safejson); InvalidParams(field) when
    it is missing, unreadable, malformed or not an object."""
    index = read_json_bounded(folder / "model_index.json", field=field)
    if not isinstance(index, dict):
        raise InvalidParams(f"{folder / 'model_index.json'} is not a JSON object", field=field)
    return index


def _component_names(folder: Path) -> builtins.list[str]:
    """The components model_index.json names (``"unet": ["diffusers", "UNet2DConditionModel"]``;
    not the ``_class_name`` keys, settings or ``[null, null]`` ones); InvalidParams for an entry
    that is not ``[library, class]`` or a name that is not a plain folder name (``../x``)."""
    names = []
    for name, spec in model_index(folder).items():
        if name.startswith("_") or not isinstance(spec, list):
            continue
        if len(spec) != 2 or not name.isidentifier():
            raise InvalidParams(
                f"model_index.json has a malformed component {name[:100]!r}", field="model"
            )
        if spec[0] is not None:
            names.append(name)
    return names


def pickled_weights(path: Path) -> builtins.list[Path]:
    """The pickled weight files loading ``path`` would read: the file itself when it is one
    (``.ckpt``, ``.bin``, ...), or in a diffusers folder those of each component that has no
    ``.safetensors`` beside them (diffusers falls back to a component's pickle; one with both
    loads its safetensors). [] for safetensors-only weights or a path that does not exist."""
    if path.is_file():
        return [path] if path.suffix.lower() in PICKLED_SUFFIXES else []
    if not path.is_dir():
        return []
    if not (path / "model_index.json").is_file():
        return _pickled_in(path)  # one component's folder (an IP-Adapter's image encoder)
    return [file for folder in _component_folders(path) for file in _pickled_in(folder)]


def check_safetensors(path: Path, field: str = "model") -> None:
    """Raise InvalidParams(field=``field``) when loading ``path`` (a weights file, a diffusers
    folder or one component's folder) would unpickle something; the message says how to
    convert it."""
    files = pickled_weights(path)
    if not files:
        return
    if files == [path]:
        what = f"{path.name} is a pickled checkpoint ({path.suffix})"
    else:
        names = ", ".join(str(f.relative_to(path)) for f in files[:4])
        more = f" and {len(files) - 4} more" if len(files) > 4 else ""
        what = f"{path} has pickled weights and no .safetensors for them ({names}{more})"
    raise InvalidParams(
        f"{what}: unpickling can run any code, so Easel loads weights only from .safetensors; "
        + CONVERT_HINT,
        field=field,
    )


def _component_folders(folder: Path) -> builtins.list[Path]:
    """The subfolders from_pretrained loads: those model_index.json names (every subfolder
    when it cannot be parsed)."""
    try:
        names = _component_names(folder)
    except InvalidParams:
        names = [p.name for p in folder.iterdir() if p.is_dir()]
    return [folder / name for name in sorted(names) if (folder / name).is_dir()]


def _pickled_in(folder: Path) -> builtins.list[Path]:
    """Pickled weights in one component's folder that has no .safetensors weights."""
    files = [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
    if any(f.suffix == ".safetensors" for f in files):
        return []
    return sorted(f for f in files if f.suffix.lower() in PICKLED_SUFFIXES)


def detect_family(path: Path) -> str:
    """Family of a local diffusers folder (model_index.json) or .safetensors checkpoint;
    InvalidParams for a pickled checkpoint (see check_safetensors)."""
    check_safetensors(path)
    if path.is_dir():
        try:
            class_name = model_index(path).get("_class_name")
            if not isinstance(class_name, str):
                raise InvalidParams("model_index.json has no _class_name", field="model")
        except InvalidParams as exc:
            raise InvalidParams(
                f"{path} is not a diffusers pipeline folder (no readable model_index.json: "
                f"{exc.message})",
                field="model",
            ) from None
        family = family_for_pipeline(class_name)
        if family is None:
            raise InvalidParams(
                f"{path} holds a {class_name}, which no Easel family serves "
                f"(supported: {', '.join(FAMILIES)})",
                field="model",
            )
        return family.name
    keys = _safetensors_keys(path)
    for fragment, family_name in _SINGLE_FILE_KEYS:
        if any(fragment in key for key in keys):
            return family_name
    raise InvalidParams(
        f"cannot tell the family of {path.name}; add it with "
        f"`easel models add ID {path} --family {{{','.join(FAMILIES)}}}`",
        field="family",
    )


def _safetensors_keys(path: Path) -> builtins.list[str]:
    return [k for k in safetensors_header(path) if k != "__metadata__"]


def safetensors_header(path: Path, field: str = "model") -> dict[str, Any]:
    """The JSON header of a .safetensors file: tensor name -> {dtype, shape, data_offsets}, and
    ``__metadata__`` (name -> text) when there is one.

    Read as the safetensors crate reads it, and never more: the 8-byte little-endian length is
    checked against MAX_SAFETENSORS_HEADER and the file's size before the header is read, the
    header's nesting and item count before it is parsed (easel.safejson), then its shape
    (an object of tensors with string dtypes, integer shapes and offsets inside the file).
    Raises InvalidParams(field=``field``) saying what is wrong.
    """
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _not_safetensors(path, f"it has {len(prefix)} bytes", field)
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_SAFETENSORS_HEADER:
                raise _not_safetensors(
                    path,
                    f"it declares a {length}-byte header; the format allows at most "
                    f"{MAX_SAFETENSORS_HEADER}",
                    field,
                )
            if length > size - 8:
                raise _not_safetensors(
                    path, f"it declares a {length}-byte header in a {size}-byte file", field
                )
            data = f.read(length)
    except OSError as exc:
        raise _not_safetensors(path, exc.strerror or type(exc).__name__, field) from None
    try:
        header = loads_bounded(
            data,
            what="its header",
            field=field,
            max_bytes=MAX_SAFETENSORS_HEADER,
            max_depth=MAX_DEPTH,
        )
    except InvalidParams as exc:
        raise _not_safetensors(path, exc.message, field) from None
    reason = _header_problem(header, size - 8 - length)
    if reason is not None:
        raise _not_safetensors(path, f"its header {reason}", field)
    return dict(header)


def _not_safetensors(path: Path, reason: str, field: str) -> InvalidParams:
    return InvalidParams(f"{path} is not a readable .safetensors file: {reason}", field=field)


def _header_problem(header: Any, data_bytes: int) -> str | None:
    """What is wrong with a parsed safetensors header (the crate's rules), or None."""
    if not isinstance(header, dict):
        return "is not a JSON object"
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                return "has a __metadata__ that is not an object of strings"
            continue
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
            return f"has no dtype for {name[:100]!r}"
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_size(n) for n in shape):
            return f"has a shape for {name[:100]!r} that is not a list of sizes"
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_size(n) for n in offsets)
            or not offsets[0] <= offsets[1] <= data_bytes
        ):
            return f"has data_offsets for {name[:100]!r} outside the file"
    return None


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


IP_ADAPTER_FAMILIES = ("sd", "sdxl")  # whose pipelines load IP-Adapters the same way


def check_ip_adapter(path: Path, family: str) -> Path:
    """The resolved IP-Adapter file for a ``family`` model; InvalidParams(field="ip_adapter")
    unless it is a .safetensors file with an ``image_encoder`` folder beside it."""
    if family not in IP_ADAPTER_FAMILIES:
        raise InvalidParams(
            f"ip_adapter is supported for {' and '.join(IP_ADAPTER_FAMILIES)} models "
            f"(got a {family} model)",
            field="ip_adapter",
        )
    if path.suffix != ".safetensors" or not path.is_file():
        raise InvalidParams(
            f"ip_adapter must be a .safetensors file (got {path})", field="ip_adapter"
        )
    if not (path.parent / "image_encoder" / "config.json").is_file():
        raise InvalidParams(
            f"ip_adapter needs its CLIP image encoder in {path.parent / 'image_encoder'}",
            field="ip_adapter",
        )
    check_safetensors(path.parent / "image_encoder", field="ip_adapter")
    return path.resolve()


def is_hub_id(text: str) -> bool:
    """True for an ``org/name`` Hugging Face repo id that is not an existing local path."""
    return bool(_HUB_ID_RE.match(text)) and not Path(text).expanduser().exists()


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "~", ".")) or text.endswith(".safetensors") or text.count("/") > 1


def _is_model_path(path: Path) -> bool:
    """A local diffusers folder or weights file (.safetensors, or a pickle that ``get`` then
    refuses); False for names the OS cannot even look up (too long, NUL bytes), which then end
    as an ordinary "unknown model" error."""
    try:
        suffixes = (".safetensors", *PICKLED_SUFFIXES)
        return path.exists() and (path.is_dir() or path.suffix.lower() in suffixes)
    except (OSError, ValueError):
        return False


def local_weights(source: str) -> Path | None:
    """Where ``source`` (a path or hub id) is on this machine: the path, or the hub id's
    complete snapshot in the Hugging Face cache; None when it is not here."""
    path = Path(source).expanduser()
    try:
        if path.exists():
            return path
    except (OSError, ValueError):
        return None
    if _looks_like_path(source) or not _HUB_ID_RE.match(source):
        return None
    return cached_snapshot(source)


class ModelCatalog:
    """Known models: built-ins plus entries in ``settings.user_models_file``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def list(self) -> builtins.list[ModelRecord]:
        """Every catalog entry (built-ins first), with ``available`` filled in."""
        return [self._with_availability(r) for r in self._records().values()]

    def get(self, id_or_path: str, *, paths: bool = True, explain: bool = False) -> ModelRecord:
        """The entry for a catalog id, a source, a cached hub id, or a local folder/file.

        With ``paths=False`` (a request from a key that may not name paths) only catalog ids
        and entries' sources match: whether a path exists on this machine is not revealed.
        Raises ModelNotFound (field "model") with near-name suggestions when nothing matches.
        A path or hub id that is not a usable model (missing, not a model, unreadable, crafted,
        pickled) gets the same ModelNotFound as one that does not exist, the path text aside,
        so no error tells whether a path exists; the reason is logged, and raised as it is with
        ``explain=True`` (the CLI, whose user owns the files).
        """
        records = self._records()
        if id_or_path in records:
            return self._checked(records[id_or_path])
        for record in records.values():
            if record.source == id_or_path:
                return self._checked(record)
        if not paths:
            raise ModelNotFound(
                f"unknown model {id_or_path!r}: name a catalog model ({', '.join(records)}; "
                "see GET /api/v1/models); a path or hub id is taken only from an admin key",
                field="model",
            )
        try:
            found = self._local(id_or_path)
        except (EaselError, OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            reason = exc.message if isinstance(exc, EaselError) else f"{exc}"
            if explain:
                raise InvalidParams(reason, field="model") from None
            log.info("model %r refused: %r", id_or_path, reason)
            found = None
        if found is None:
            raise ModelNotFound(self._not_found_message(id_or_path, records), field="model")
        return found

    def _local(self, id_or_path: str) -> ModelRecord | None:
        """The record of a local model folder or file, or of a hub id complete in the local
        cache; None when ``id_or_path`` names neither; EaselError or OSError when it names one
        that cannot be used (the reason, for ``get`` to keep or to log)."""
        path = Path(id_or_path).expanduser()
        if _is_model_path(path):
            path = path.resolve()
            record = self._with_availability(
                ModelRecord(
                    id=str(path), family=detect_family(path), source=str(path), builtin=False
                )
            )
            if not record.available:  # a pull cannot complete a path: it is not a model
                raise InvalidParams(
                    f"{path} is not a complete diffusers pipeline: a component that "
                    "model_index.json names is missing or empty",
                    field="model",
                )
            return record
        if _HUB_ID_RE.match(id_or_path) and not _looks_like_path(id_or_path):
            snapshot = cached_snapshot(id_or_path)
            if snapshot is not None:
                record = ModelRecord(
                    id=id_or_path, family=detect_family(snapshot), source=id_or_path, builtin=False
                )
                return self._with_availability(record)
        return None

    def add(
        self,
        model_id: str,
        source: str,
        *,
        family: str | None = None,
        description: str = "",
        config: str | None = None,
        defaults: dict[str, Any] | None = None,
        ip_adapter: str | None = None,
    ) -> ModelRecord:
        """Add (or replace) a user entry in models.toml and return it.

        ``source`` is a local diffusers folder, a ``.safetensors`` file or a hub id. The family is
        detected for local sources; a hub id that is not cached yet needs ``family``.
        """
        if not _ID_RE.match(model_id):
            raise InvalidParams(
                f"model id must be letters, digits, '.', '_' or '-' (got {model_id!r})", field="id"
            )
        if any(r.id == model_id for r in BUILTINS):
            raise InvalidParams(f"{model_id!r} is a built-in model id; pick another", field="id")
        path = Path(source).expanduser()
        if path.exists():
            source = str(path.resolve())
            try:
                check_safetensors(path.resolve(), field="source")
                family = family or detect_family(path.resolve())
            except OSError as exc:
                raise InvalidParams(f"cannot read {source}: {exc}", field="source") from None
        elif _looks_like_path(source) or not _HUB_ID_RE.match(source):
            raise ModelNotFound(f"no model folder or file at {source}", field="source")
        elif (snapshot := cached_snapshot(source)) is not None:
            check_safetensors(snapshot, field="source")
            family = family or detect_family(snapshot)
        if family is None:
            raise InvalidParams(
                f"family is required for {source} (one of {', '.join(FAMILIES)})", field="family"
            )
        get_family(family)
        if ip_adapter is not None:
            ip_adapter = str(check_ip_adapter(Path(ip_adapter).expanduser(), family))
        record = ModelRecord(
            id=model_id,
            family=family,
            source=source,
            description=description,
            defaults=dict(defaults or {}),
            builtin=False,
            config=config,
            ip_adapter=ip_adapter,
        )
        entries = self._read_user_entries()
        entries[model_id] = record
        self._write_user_entries(entries)
        return self._with_availability(record)

    def is_available(self, record: ModelRecord) -> bool:
        """True when loadable weights are on this machine: a local path, or complete in the HF
        cache, with no weights that would have to be unpickled."""
        try:
            local = local_weights(record.source)
            if local is None or pickled_weights(local):
                return False
            return _pipeline_complete(local) if local.is_dir() else True
        except OSError:  # a folder it may not list
            return False

    # --- internals ------------------------------------------------------------------------------

    def _records(self) -> dict[str, ModelRecord]:
        records = {r.id: r for r in BUILTINS}
        records.update(self._read_user_entries())
        return records

    def _checked(self, record: ModelRecord) -> ModelRecord:
        """``_with_availability``, after refusing weights that would have to be unpickled (an
        entry written in models.toml by hand, or added before Easel refused them)."""
        local = local_weights(record.source)
        if local is not None:
            check_safetensors(local)
        return self._with_availability(record)

    def _with_availability(self, record: ModelRecord) -> ModelRecord:
        """A copy with the family's tasks, the folder's own defaults (generation's and
        training's) under the entry's, and whether the weights are here."""
        tasks = FAMILIES[record.family].tasks if record.family in FAMILIES else record.tasks
        generation, training = folder_defaults(Path(record.source).expanduser())
        return dataclasses.replace(
            record,
            tasks=tasks,
            defaults={**generation, **record.defaults},
            train_defaults=training,
            available=self.is_available(record),
        )

    def _not_found_message(self, query: str, records: dict[str, ModelRecord]) -> str:
        if _looks_like_path(query):
            return UNUSABLE_PATH.format(path=query)
        close = difflib.get_close_matches(query, builtins.list(records), n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        if _HUB_ID_RE.match(query):
            hint += f"; it is not in the local Hugging Face cache: `easel models pull {query}`"
        return (
            f"unknown model {query!r}{hint}. Known models: {', '.join(records)} "
            "(add your own with `easel models add`)"
        )

    def _read_user_entries(self) -> dict[str, ModelRecord]:
        file = self.settings.user_models_file
        if not file.exists():
            return {}
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidParams(f"cannot read {file}: {exc}", field="models.toml") from None
        entries = {}
        for model_id, entry in data.get("models", {}).items():
            if not isinstance(entry, dict) or "source" not in entry or "family" not in entry:
                raise InvalidParams(
                    f"{file}: [models.{model_id}] needs `source` and `family`",
                    field="models.toml",
                )
            entries[model_id] = ModelRecord(
                id=model_id,
                family=entry["family"],
                source=entry["source"],
                description=entry.get("description", ""),
                defaults=dict(entry.get("defaults", {})),
                builtin=False,
                config=entry.get("config"),
                ip_adapter=entry.get("ip_adapter"),
            )
        return entries

    def _write_user_entries(self, entries: dict[str, ModelRecord]) -> None:
        lines = [
            "# Easel's user model catalog. `easel models add` rewrites this file: edit the entries",
            "# freely, but comments are not kept.",
            "",
        ]
        for record in entries.values():
            lines.append(f"[models.{_toml_key(record.id)}]")
            lines.append(f"family = {_toml_value(record.family)}")
            lines.append(f"source = {_toml_value(record.source)}")
            if record.description:
                lines.append(f"description = {_toml_value(record.description)}")
            if record.config:
                lines.append(f"config = {_toml_value(record.config)}")
            if record.ip_adapter:
                lines.append(f"ip_adapter = {_toml_value(record.ip_adapter)}")
            if record.defaults:
                body = ", ".join(f"{k} = {_toml_value(v)}" for k, v in record.defaults.items())
                lines.append(f"defaults = {{ {body} }}")
            lines.append("")
        file = self.settings.user_models_file
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".toml.tmp")
        tmp.write_text("\n".join(lines), encoding="utf-8")
        tmp.replace(file)  # atomic: a reader never sees half a file


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    # JSON's string escapes are valid TOML basic-string escapes; bool before int (bool is an int)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    raise InvalidParams(f"cannot store {value!r} in models.toml", field="defaults")
