"""Loading pipelines: device and dtype choice, an LRU cache under a memory budget, downloads.

    >>> manager = ModelManager(settings, ModelCatalog(settings))
    >>> loaded = manager.get_pipeline("sd-turbo", "txt2img")   # loads once, then cached
    >>> loaded.pipeline("a cat", num_inference_steps=1).images[0]
    >>> manager.get_pipeline("sd-turbo", "img2img")   # same weights, via from_pipe

Nothing here downloads except ``pull``: a hub model that is not in the local cache raises
ModelNotAvailable naming ``easel models pull ID`` instead of trying the network.
"""

from __future__ import annotations

import gc
import logging
import math
import re
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from easel.config import Settings
from easel.domain import EaselError, InvalidParams, LoraRecord, ModelNotAvailable, ModelRecord
from easel.models import cpu_openvino, hardware
from easel.models.catalog import (
    ModelCatalog,
    cached_snapshot,
    check_ip_adapter,
    check_safetensors,
    hub_cache_dir,
    is_hub_id,
    local_weights,
    model_index,
    safetensors_header,
)
from easel.models.cpu_graph import MAX_PARAMETERS, GraphSource, capture_unet, captured, release_unet
from easel.models.cpu_openvino import OpenVinoGraphs, capture_text_encoder, capture_vae
from easel.models.download import pull
from easel.models.families import Family, get_family
from easel.models.hardware import cpu_has_native_bf16, trim_heap

_INT_BYTES = {
    "I64": 8,
    "U64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

# LoRAs kept loaded per model; past this, the least recently used ones not in the request go
MAX_LOADED_LORAS = 16
# OpenVINO's peak per UNet parameter: 9.4 GB measured for SD 1.5's 860M (11 bytes), and a margin
OPENVINO_BYTES_PER_PARAMETER = 12

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# --- device and dtype ---------------------------------------------------------------------------


log = logging.getLogger(__name__)


def pick_device(setting: str = "auto") -> str:
    """The torch device for ``setting`` (auto, cpu, cuda, cuda:N or mps)."""
    if setting == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    match = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", setting)
    if match is None or (match[2] is not None and match[1] != "cuda"):
        raise EaselError(
            f"device must be auto, cpu, cuda, cuda:N or mps (got {setting!r})", field="device"
        )
    kind, index = match[1], int(match[2] or 0)
    usable = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and index < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not usable[kind]:
        raise EaselError(f"device {setting} is not available on this machine", field="device")
    return setting


def pick_dtype(device: str, setting: str = "auto") -> torch.dtype:
    """Weights dtype: explicit setting, else bf16 on CUDA (fp16 if unsupported), fp16 on mps,
    bf16 on CPUs with native bf16 and fp32 on other CPUs."""
    if setting != "auto":
        if setting not in _DTYPES:
            raise EaselError(
                f"dtype must be auto, float32, bfloat16 or float16 (got {setting!r})", field="dtype"
            )
        return _DTYPES[setting]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


# --- the cache ----------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A ready pipeline for one task of one model."""

    pipeline: DiffusionPipeline
    record: ModelRecord
    family: Family
    device: str
    dtype: torch.dtype


@dataclass
class _Adapter:
    """A LoRA loaded into a model, under the adapter name peft knows it by."""

    name: str
    stamp: tuple[int, int]  # the file's (mtime_ns, size) when loaded: a changed file reloads


@dataclass
class _Entry:
    record: ModelRecord
    family: Family
    pipelines: dict[str, DiffusionPipeline] = field(default_factory=dict)  # task -> pipeline
    nbytes: int = 0
    ip_adapter: bool = False  # the record's IP-Adapter is in the (shared) UNet now
    # LoRA id -> its loaded adapter, least recently used first
    loras: OrderedDict[str, _Adapter] = field(default_factory=OrderedDict)
    loras_on: bool = False  # some LoRA is enabled now
    adapters_made: int = 0  # for unique adapter names


def pipeline_bytes(pipeline: DiffusionPipeline) -> int:
    """Bytes held by the pipeline's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


class ModelManager:
    """Loads pipelines on demand and keeps the most recently used ones under a memory budget.

    One pipeline per model is loaded from disk; the other tasks' pipelines are derived from it
    with ``from_pipe`` and share its modules. Thread-safe; a pipeline itself must still be used
    by one caller at a time.
    """

    def __init__(self, settings: Settings, catalog: ModelCatalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(self.device, settings.dtype)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        # loads from disk per model id: how many, and the seconds they took (for /metrics).
        # Their own lock, and the last list of loaded models, so a status read never waits
        # for a load (which holds _lock for seconds)
        self._stats_lock = threading.Lock()
        self._loads: dict[str, int] = {}
        self._load_seconds: dict[str, float] = {}
        self._last_loaded: list[str] = []

    def get_pipeline(self, model: str, task: str = "txt2img") -> LoadedModel:
        """The pipeline serving ``task`` for ``model`` (catalog id, hub id or local path).

        Raises ModelNotFound, ModelNotAvailable (not downloaded) or InvalidParams (task).
        """
        record = self.catalog.get(model)
        family = get_family(record.family)
        if task not in family.pipelines:
            raise InvalidParams(
                f"task must be one of {', '.join(family.tasks)} (got {task!r})", field="task"
            )
        with self._lock:
            entry = self._entries.get(record.id)
            if entry is None:
                # make room first (from the weight files' headers), so old and new never
                # have to fit in memory together
                self._evict_over_budget(incoming=self.estimate_bytes(record))
                entry = _Entry(record, family)
                self.loaded()  # what loaded(wait=False) answers while this load runs
                started = time.perf_counter()
                entry.pipelines[task] = self._load(record, family, task)
                self._count_load(record.id, time.perf_counter() - started)
                entry.nbytes = pipeline_bytes(entry.pipelines[task])
                self._entries[record.id] = entry
                self._evict_over_budget(keep=record.id)  # in case the estimate was low
                _free_memory()  # what loading left behind (weights as read, then converted)
            elif task not in entry.pipelines:
                base = next(iter(entry.pipelines.values()))
                entry.pipelines[task] = _pipeline_class(family, task).from_pipe(base)
                entry.pipelines[task].set_progress_bar_config(disable=True)
            self._entries.move_to_end(record.id)
            return LoadedModel(entry.pipelines[task], entry.record, family, self.device, self.dtype)

    def use_ip_adapter(self, record: ModelRecord, scale: float | None) -> None:
        """Put the model's IP-Adapter (``record.ip_adapter``) into its UNet at ``scale``, or
        take it out (``scale`` None). Every task pipeline of the model shares the UNet, so
        this is model-wide: the engine calls it before each request (a no-op when nothing
        changes), since a UNet holding an adapter requires an image prompt on every call."""
        with self._lock:
            entry = self._entries.get(record.id)
            if entry is None or (scale is None and not entry.ip_adapter):
                return
            base = next(iter(entry.pipelines.values()))
            unet = base.unet
            graphs = captured(unet)
            release_unet(unet)  # graphs traced without the adapter must not replay with it
            if scale is None:
                base.unload_ip_adapter()
                encoder = None
            else:
                if not entry.ip_adapter:
                    if record.ip_adapter is None:
                        raise InvalidParams(
                            f"model {record.id} has no ip_adapter configured", field="model"
                        )
                    # safetensors with a safetensors image encoder, even if models.toml was
                    # edited by hand
                    path = check_ip_adapter(Path(record.ip_adapter), record.family)
                    base.load_ip_adapter(
                        str(path.parent),
                        subfolder="",
                        weight_name=path.name,
                        image_encoder_folder="image_encoder",
                    )
                    # diffusers casts the whole pipeline to the encoder's float32 here
                    base.to(self.device, self.dtype)
                base.set_ip_adapter_scale(scale)
                encoder = base.image_encoder
            for pipe in entry.pipelines.values():  # siblings made with from_pipe see it too
                if pipe is not base:
                    pipe.register_modules(
                        image_encoder=encoder, feature_extractor=base.feature_extractor
                    )
            entry.ip_adapter = scale is not None
            if scale is None:
                # OpenVINO's models were converted from the plain UNet, which is back: keep them
                self._capture(unet, graphs if isinstance(graphs, OpenVinoGraphs) else None)

    def use_loras(self, record: ModelRecord, loras: list[tuple[LoraRecord, float]]) -> None:
        """Apply ``loras`` (each with its weight) to the model, or none (an empty list).

        Model-wide, like use_ip_adapter: every task pipeline shares the denoiser and text
        encoders, so the engine calls this before each request. A LoRA is loaded once
        (``load_lora_weights``, under its own adapter name) and stays loaded, off when unused,
        while the model stays loaded (up to MAX_LOADED_LORAS; a changed file loads again);
        switching is ``set_adapters`` with the request's weights: the base model is never
        reloaded. A LoRA at weight 0 adds nothing and is left out.

        With no LoRA wanted the adapters are disabled (``disable_lora``): a disabled LoRA layer
        is exactly its base layer, so plain requests give the base model's pixels, and the CPU
        graphs (cpu_graph) replay again at full speed: they run eagerly only while a LoRA is on.
        Unloading instead would cost a reload from disk on the next LoRA request.

        Raises InvalidParams(field="loras[i].id") when a file cannot be applied to this model.
        """
        wanted = [(i, lora, weight) for i, (lora, weight) in enumerate(loras) if weight != 0]
        with self._lock:
            entry = self._entries.get(record.id)
            if entry is None:
                if not wanted:
                    return
                self.get_pipeline(record.id)
                entry = self._entries[record.id]
            base = next(iter(entry.pipelines.values()))
            if not wanted:
                if entry.loras_on:
                    base.disable_lora()
                    entry.loras_on = False
                return
            if not hasattr(base, "load_lora_weights"):
                raise InvalidParams(
                    f"{entry.family.name} models cannot take LoRAs",
                    field=f"loras[{wanted[0][0]}].id",
                )
            with warnings.catch_warnings():
                # peft's notes that a model holds several adapters (it is meant to) and, after
                # one is deleted, which adapter is active (set_adapters sets them all next)
                warnings.filterwarnings("ignore", "Already found a `peft_config`")
                warnings.filterwarnings("ignore", "Adapter .* was active which is now deleted")
                names = [self._load_lora(entry, base, i, lora, wanted) for i, lora, _ in wanted]
            base.enable_lora()
            base.set_adapters(names, adapter_weights=[weight for _, _, weight in wanted])
            entry.loras_on = True

    def _load_lora(
        self,
        entry: _Entry,
        base: Any,
        index: int,
        lora: LoraRecord,
        wanted: list[tuple[int, LoraRecord, float]],
    ) -> str:
        """The adapter name of ``lora`` in ``entry``'s model, loading it if need be."""
        path = Path(lora.path)
        try:
            stat = path.stat()
        except OSError:
            raise InvalidParams(
                f"LoRA {lora.id}: no weights file at {path}", field=f"loras[{index}].id"
            ) from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        loaded = entry.loras.get(lora.id)
        if loaded is not None and loaded.stamp == stamp:
            entry.loras.move_to_end(lora.id)
            return loaded.name
        if loaded is not None:  # the file changed (retrained or replaced)
            base.delete_adapters([loaded.name])
            del entry.loras[lora.id]
        keep = {other.id for _, other, _ in wanted}
        while len(entry.loras) >= MAX_LOADED_LORAS:
            oldest = next((k for k in entry.loras if k not in keep), None)
            if oldest is None:
                break
            base.delete_adapters([entry.loras.pop(oldest).name])
        # peft keeps adapters in module dicts, whose keys cannot hold the "." a LoRA name may
        entry.adapters_made += 1
        name = f"easel_{entry.adapters_made}"
        try:
            base.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:  # shapes that do not fit, keys diffusers cannot map, ...
            if any(name in names for names in base.get_list_adapters().values()):
                base.delete_adapters([name])
            entry.loras_on = True  # layers it left may be on: the next plain call turns all off
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InvalidParams(
                f"LoRA {lora.id} cannot be applied to model {entry.record.id}: {reason}",
                field=f"loras[{index}].id",
            ) from None
        entry.loras[lora.id] = _Adapter(name, stamp)
        entry.nbytes = pipeline_bytes(base)
        return name

    def loaded_loras(self, model: str) -> list[str]:
        """Ids of the LoRAs loaded into ``model`` (on or off), least recently used first."""
        with self._lock:
            entry = self._entries.get(model)
            return list(entry.loras) if entry is not None else []

    def loaded(self, *, wait: bool = True) -> list[str]:
        """Ids of the loaded models, least recently used first. ``wait=False``: while a load
        holds the cache (seconds), the list as it was before it, rather than waiting."""
        if not self._lock.acquire(blocking=wait):
            with self._stats_lock:
                return list(self._last_loaded)
        try:
            names = list(self._entries)
        finally:
            self._lock.release()
        with self._stats_lock:
            self._last_loaded = names
        return list(names)

    def loads(self) -> dict[str, int]:
        """Per model id, how many times it was loaded from disk (``from_pipe`` is no load)."""
        with self._stats_lock:
            return dict(self._loads)

    def load_seconds(self) -> dict[str, float]:
        """Per model id, the seconds its loads from disk took, in all."""
        with self._stats_lock:
            return dict(self._load_seconds)

    def memory_bytes(self) -> int:
        """Bytes of weights held by all loaded models."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def unload(self, model: str) -> bool:
        """Drop ``model`` (id or path) and free its memory; False if it was not loaded."""
        with self._lock:
            key = model if model in self._entries else self._resolve_id(model)
            entry = self._entries.pop(key, None) if key else None
            if entry is None:
                return False
            entry.pipelines.clear()
            del entry
            _free_memory()
            return True

    def pull(self, model_id: str, *, progress: bool = True) -> Path:
        """Download ``model_id`` into the Hugging Face cache (see ``download.pull``)."""
        return pull(self.catalog, model_id, progress=progress)

    # --- internals ------------------------------------------------------------------------------

    def _count_load(self, model: str, seconds: float) -> None:
        with self._stats_lock:
            self._loads[model] = self._loads.get(model, 0) + 1
            self._load_seconds[model] = self._load_seconds.get(model, 0.0) + seconds

    def _resolve_id(self, model: str) -> str | None:
        try:
            return self.catalog.get(model).id
        except EaselError:
            return None

    def _evict_over_budget(self, *, incoming: int = 0, keep: str | None = None) -> None:
        """Drop least recently used models until the loaded ones plus ``incoming`` bytes fit."""
        budget = int(self.settings.model_cache_gb * 1024**3)
        while self.memory_bytes() + incoming > budget:
            oldest = next((k for k in self._entries if k != keep), None)
            if oldest is None:
                return  # a model larger than the budget still loads, alone
            self._entries.pop(oldest)
            _free_memory()

    def estimate_bytes(self, record: ModelRecord) -> int:
        """Weight bytes ``record`` will take in ``self.dtype`` (0 when there is nothing to read)."""
        source = Path(record.source).expanduser()
        if not source.exists() and is_hub_id(record.source):
            source = cached_snapshot(record.source) or source
        if source.is_file():
            files = [source]
        else:  # the weights from_pretrained picks: not the "name.fp16.safetensors" variants
            files = [f for f in source.glob("*/*.safetensors") if f.name.count(".") == 1]
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        total = 0
        for file in files:
            for name, info in safetensors_header(file).items():
                if name == "__metadata__":
                    continue
                # floating-point weights are cast to the load dtype; others keep their size
                size = _INT_BYTES.get(info["dtype"], itemsize)
                total += math.prod(info["shape"]) * size
        return total

    def _load(self, record: ModelRecord, family: Family, task: str) -> DiffusionPipeline:
        # weights come only from .safetensors: a pickle (.bin, .ckpt) can run code when loaded.
        # The catalog refused them already; use_safetensors=True makes diffusers and
        # transformers raise rather than fall back to a component's .bin should one slip by
        local = local_weights(record.source)
        if local is not None:
            check_safetensors(local)
        if not record.available:
            raise ModelNotAvailable(_not_available_message(record), field="model")
        cls = _pipeline_class(family, task)
        source = Path(record.source).expanduser()
        kwargs: dict[str, Any] = {"torch_dtype": self.dtype}
        if source.is_file():
            pipe = _load_single_file(cls, record, family, kwargs)
        elif source.is_dir():
            pipe = cls.from_pretrained(source, use_safetensors=True, **kwargs)
        else:  # a hub id complete in the local cache (checked by record.available)
            pipe = cls.from_pretrained(
                record.source,
                cache_dir=hub_cache_dir(),
                local_files_only=True,
                use_safetensors=True,
                **kwargs,
            )
        self._place(pipe)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _place(self, pipe: DiffusionPipeline) -> None:
        """Move to the device and apply the memory/speed settings."""
        if self.settings.cpu_offload and self.device != "cpu":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        vae = getattr(pipe, "vae", None)
        if self.settings.vae_tiling and vae is not None:
            vae.enable_tiling()
        if self.device == "cpu" and self.dtype == torch.bfloat16:
            # oneDNN's bf16 convolutions are fastest on NHWC tensors
            for name in ("unet", "vae"):
                module = getattr(pipe, name, None)
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        unet = getattr(pipe, "unet", None)
        if unet is not None and self._capture(unet):
            threads = torch.get_num_threads()
            if vae is not None:
                capture_vae(vae, self._openvino_cache, threads=threads)
            encoder = getattr(pipe, "text_encoder", None)
            if encoder is not None:
                capture_text_encoder(encoder, self._openvino_cache, threads=threads)

    @property
    def _openvino_cache(self) -> Path:
        return self.settings.home / "cache" / "openvino"

    def _capture(self, unet: torch.nn.Module, graphs: GraphSource | None = None) -> bool:
        """On the CPU, replay the UNet's plain calls as graphs: OpenVINO's (``graphs`` if
        given, else per ``cpu_backend``), or traced ones for small UNets (``cpu_graphs``).
        True when OpenVINO runs them (then it may encode prompts and decode latents too)."""
        if self.device != "cpu":
            return False
        backend = self.settings.cpu_backend
        if graphs is None and backend != "torch":
            parameters = sum(p.numel() for p in unet.parameters())
            if not cpu_openvino.available():
                if backend == "openvino":
                    log.warning("cpu_backend is openvino but openvino is not installed")
            elif backend == "openvino" or (
                parameters > MAX_PARAMETERS and _room_for_openvino(parameters)
            ):
                graphs = OpenVinoGraphs(unet, self._openvino_cache, threads=torch.get_num_threads())
        if graphs is not None or self.settings.cpu_graphs:
            capture_unet(unet, graphs)  # traced graphs: small UNets only; see cpu_graph
        return isinstance(graphs, OpenVinoGraphs)


def _room_for_openvino(parameters: int) -> bool:
    """Whether the machine has the memory OpenVINO's path takes at its peak for a UNet of
    ``parameters`` (converting a float32 copy while the model is loaded: 9.4 GB for an SD
    1.5-class pipeline, 860M UNet parameters); where it has not, ``auto`` keeps PyTorch (2.9 GB
    for the same model)."""
    need, have = parameters * OPENVINO_BYTES_PER_PARAMETER, hardware.memory_bytes()
    if have is not None and have < need:
        log.info(
            "OpenVINO left out: it needs about %.1f GB for this model, the machine has %.1f GB; "
            "PyTorch runs it",
            need / 1e9,
            have / 1e9,
        )
        return False
    return True


def _pipeline_class(family: Family, task: str) -> type[DiffusionPipeline]:
    cls: type[DiffusionPipeline] = getattr(diffusers, family.pipelines[task])
    return cls


def _load_single_file(
    cls: type[DiffusionPipeline], record: ModelRecord, family: Family, kwargs: dict[str, Any]
) -> DiffusionPipeline:
    """A .safetensors checkpoint, configured from a local folder: ``record.config`` (a diffusers
    folder or cached hub id of the same architecture), else the family's cached reference repo.

    The configs are always found here first: left alone, diffusers would go online for them.
    SD/SDXL checkpoints hold the whole pipeline; Z-Image/Flux ones only the transformer, so the
    other components load from the config folder.
    """
    config = _config_folder(record, family)
    # diffusers loads the components a checkpoint lacks from the config folder, with no way
    # to pass use_safetensors down: refuse pickled weights there first
    check_safetensors(config)
    try:
        name = family.single_file_component
        if name is None:
            pipe: DiffusionPipeline = cls.from_single_file(  # type: ignore[attr-defined]
                record.source, config=str(config), local_files_only=True, **kwargs
            )
        else:
            class_name = model_index(config)[name][1]
            component = getattr(diffusers, class_name).from_single_file(
                record.source, config=str(config), subfolder=name, local_files_only=True, **kwargs
            )
            pipe = cls.from_pretrained(config, **{name: component}, use_safetensors=True, **kwargs)
    except Exception as exc:  # diffusers raises many kinds here; all mean "this file won't load"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotAvailable(
            f"cannot load {record.source} with configs from {config}: {reason}", field="model"
        ) from None
    return pipe


def _config_folder(record: ModelRecord, family: Family) -> Path:
    for candidate in (record.config, family.config_repo):
        if candidate is None:
            continue
        folder = Path(candidate).expanduser()
        if folder.is_dir():
            return folder
        snapshot = cached_snapshot(candidate) if is_hub_id(candidate) else None
        if snapshot is not None:
            return snapshot
        if candidate == record.config:
            break  # the user named configs we do not have: say so rather than guess
    raise ModelNotAvailable(
        f"{record.source} is a single-file checkpoint and needs its pipeline configs offline: "
        f'set `config = "FOLDER or hub id"` for it in models.toml'
        + (f", or run `easel models pull {family.config_repo}`" if family.config_repo else "")
        + (f" ({record.config} is neither a folder nor in the HF cache)" if record.config else ""),
        field="model",
    )


def _not_available_message(record: ModelRecord) -> str:
    if is_hub_id(record.source):
        return (
            f"model {record.id} ({record.source}) is not downloaded; "
            f"fetch it with `easel models pull {record.id}`"
        )
    return f"model {record.id}: no complete model at {record.source}"


def _free_memory() -> None:
    gc.collect()  # first, so that tensors held in cycles reach CUDA's cache and the heap
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()
