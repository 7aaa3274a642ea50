"""A CPU fast path for full-size SD 1.x/2.x and SDXL models: UNet, VAE decoder and (SD's)
text encoder through OpenVINO.

On a CPU, OpenVINO runs an SD 1.5-class UNet about twice as fast as PyTorch's eager bf16 (its
fused AMX/AVX-512 kernels, static shapes), and the VAE decoder and CLIP text encoder faster too:
measured side by side in docs/BENCHMARKS.md ("CPU backends"). `OpenVinoGraphs` compiles one
module; for the UNet it is a graph source for cpu_graph's replay (``capture_unet``), so LoRA,
IP-Adapter, dynamic batching's sliced calls and any call with more than a plain call's inputs
keep running the UNet's own forward, exactly as with the traced graphs of small UNets;
`capture_vae` and `capture_text_encoder` route the plain decode and encode calls.

Nothing waits for it. The first plain call of a module starts, on a background thread, its
conversion to OpenVINO's format (``ov.convert_model``: about 35 s for an SD 1.5 UNet on 2
cores, once per machine: the result is kept under ``EASEL_HOME/cache/openvino``, keyed by a
hash of the weights, and later starts read it in a second), then a compile for that call's
shapes (seconds; once per shape and process). Calls run eagerly until their shape's model is
ready, then through OpenVINO: the first image on a new machine or at a new size is made at
PyTorch's speed, and may switch to OpenVINO part-way through its steps. A process that ends
first leaves the conversion to a later start, which begins it again (the `easel` command exits
past it: `exit_if_busy`); hence `easel generate` keeps PyTorch unless asked (docs/CLI.md).

Outputs differ from the eager path's by rounding (OpenVINO fuses and orders operations its
own way): tests/models/test_cpu_openvino.py holds whole images to PSNR >= 40 dB against the
eager ones. Memory: a compiled model holds its own (repacked) copy of its module's weights
beside PyTorch's, which stay for the eager calls.

    >>> capture_unet(pipe.unet, OpenVinoGraphs(pipe.unet, settings.home / "cache/openvino"))
    >>> capture_vae(pipe.vae, cache), capture_text_encoder(pipe.text_encoder, cache)
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch

from easel.models.cpu_graph import Positional, shape_key, unet_forward
from easel.models.hardware import trim_heap

log = logging.getLogger(__name__)

# Compiled shapes per module (each may hold its own packed copy of the weights: ~1.7 GB for an
# SD 1.5 UNet in bf16); later shapes run eagerly
MAX_SHAPES = 3
# Converted modules kept on disk (one folder per set of weights, about their size in float16);
# the least recently used beyond this are deleted: four models' UNet, VAE decoder, text encoder
MAX_CACHED = 12


class _Background:
    """Runs submitted calls one at a time, in order, on a daemon thread: a conversion under way
    never holds up the process's exit (a thread pool's workers would be joined, and their queue
    run to its end, at exit). What it leaves half-written is a ``.partial`` folder."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[None], Callable[..., None], tuple[Any, ...]]]
        self._queue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.unfinished = 0  # calls submitted and not yet returned

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        future: Future[None] = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="easel-openvino", daemon=True
                )
                self._thread.start()
            self.unfinished += 1
        self._queue.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to whoever waits on the future
                    future.set_exception(exc)
            with self._lock:
                self.unfinished -= 1


# Conversions and compiles, one at a time for the whole process: each already uses every core
_PREPARE = _Background()
# a half-written conversion older than this was left by a crash
STALE_S = 3600.0
# bump when the converted graph changes (what it computes, its inputs), so old files are not used
FORMAT = 2


def exit_if_busy(code: int) -> None:
    """End the process now, with ``code``, if a conversion or compile is under way: the
    interpreter's exit would stop its thread inside OpenVINO's or TorchScript's C++ code, which
    aborts the process ("terminate called without an active exception", status 134 or 139)
    after its work is done: `easel serve` stopped in its first minute on a new model, say.
    Else return."""
    if _PREPARE.unfinished:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def available() -> bool:
    """Whether OpenVINO is installed (the ``openvino`` extra)."""
    return importlib.util.find_spec("openvino") is not None


def vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """A VAE's decode of whole latents (no tiles, no slices)."""
    out: torch.Tensor = type(vae)._decode(vae, latents, return_dict=False)[0]
    return out


class _Compiled:
    """One compiled shape: called like the UNet's graph, on torch tensors."""

    def __init__(self, compiled: Any, dtype: torch.dtype) -> None:
        self.request = compiled.create_infer_request()
        self.dtype = dtype
        self._lock = threading.Lock()  # an infer request serves one call at a time

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        inputs = [_numpy(x) for x in tensors]
        with self._lock:
            out = self.request.infer(inputs)[0]
            # the request's output buffer is reused by its next call
            result = torch.from_numpy(np.array(out, dtype=np.float32))
        result = result.to(self.dtype)
        if tensors[0].is_contiguous(memory_format=torch.channels_last) and result.ndim == 4:
            result = result.contiguous(memory_format=torch.channels_last)
        return result


def _float32(x: torch.Tensor) -> torch.Tensor:
    """Floating tensors as float32 (numpy has no bfloat16); token ids as they are."""
    return x.detach().float() if x.is_floating_point() else x.detach()


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.array(_float32(x).numpy(), order="C")  # (not ascontiguousarray: keeps 0-d)


class OpenVinoGraphs:
    """A graph source for cpu_graph's `_Replay`: a compiled OpenVINO model per input shape,
    prepared in the background (see the module docstring); None (eager) until it is ready."""

    follows_variants = False  # graph_variant calls run eagerly (see cpu_graph.batches_exactly)

    def __init__(
        self,
        module: torch.nn.Module,
        cache: Path,
        threads: int = 0,
        forward: Callable[..., torch.Tensor] = unet_forward,
        name: str = "unet",
    ) -> None:
        self.module = module
        self.forward = forward
        self.name = name
        self.cache = cache
        self.dtype = next(module.parameters()).dtype  # what the outputs are cast to
        self.threads = threads or torch.get_num_threads()
        self.compiled: dict[tuple[Any, ...], _Compiled] = {}
        self.failed = False
        self._xml: Path | None = None  # the converted model (dynamic shapes) on disk
        self._pending: dict[tuple[Any, ...], Future[None]] = {}
        self._lock = threading.Lock()

    def __call__(self, inputs: tuple[torch.Tensor, ...], variant: Hashable) -> Any:
        if variant is not None or self.failed:
            return None  # a variant changes the layers' Python forwards, which OpenVINO skips
        key = shape_key(inputs)
        with self._lock:
            ready = self.compiled.get(key)
            if ready is None and key not in self._pending:
                if len(self.compiled) + len(self._pending) < MAX_SHAPES:
                    examples = tuple(_float32(x).clone() for x in inputs)
                    self._pending[key] = _PREPARE.submit(self._prepare, key, examples)
            return ready

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until the shapes asked for so far are compiled (or failed); True if done."""
        with self._lock:
            pending = list(self._pending.values())
        _, not_done = wait(pending, timeout)
        return not not_done

    def _prepare(self, key: tuple[Any, ...], examples: tuple[torch.Tensor, ...]) -> None:
        try:
            import openvino as ov

            if self._xml is None:
                self._xml = self._converted(examples)
            # read for each compile and dropped after: a model held would keep its weights
            # mapped beside the compiled copy (measured: 1.7 GB more for an SD 1.5 UNet)
            model = ov.Core().read_model(self._xml)
            model.reshape(
                {port: list(x.shape) for port, x in zip(model.inputs, examples, strict=True)}
            )
            config = {
                "INFERENCE_PRECISION_HINT": "bf16" if self.dtype == torch.bfloat16 else "f32",
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": self.threads,
            }
            compiled = ov.Core().compile_model(model, "CPU", config)
            with self._lock:
                self.compiled[key] = _Compiled(compiled, self.dtype)
        except Exception as exc:  # any failure just means "no fast path": run eagerly
            log.warning("denoiser not compiled with OpenVINO, running it eagerly: %s", exc)
            self.failed = True
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def _converted(self, examples: tuple[torch.Tensor, ...]) -> Path:
        """The module in OpenVINO's format on disk: from the cache, or converted into it."""
        import openvino as ov

        folder = self.cache / self._weights_key()
        xml = folder / f"{self.name}.xml"
        if xml.exists():
            folder.touch()  # recently used
            return xml
        # converted from a float32 copy: OpenVINO's converter turns bfloat16 weights into NaNs
        # (2026.4). Float32 holds every bfloat16 value exactly, and so does the file's float16
        # for the range weights live in; the compiled model computes in bfloat16 again
        twin = _float32_copy(self.module)
        with torch.no_grad():
            model = ov.convert_model(Positional(twin, self.forward), example_input=examples)
        del twin
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        half = self.dtype == torch.bfloat16  # float32 weights stay float32
        ov.save_model(model, partial / xml.name, compress_to_fp16=half)
        del model
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)  # whole or absent: a crash mid-save leaves only a .partial
        _evict(self.cache, keep=folder)
        trim_heap()  # the float32 twin's memory, which glibc would keep
        return xml

    def _weights_key(self) -> str:
        """A hash of what the converted model computes: the module's class, config, weights."""
        digest = hashlib.blake2b(digest_size=16)
        kind = f"{FORMAT} {self.name} {type(self.module).__qualname__} {self.dtype}"
        digest.update(kind.encode())
        config = getattr(self.module, "config", {})
        if hasattr(config, "to_json_string"):  # transformers
            digest.update(config.to_json_string().encode())
        else:  # diffusers (a dict)
            digest.update(repr(sorted(dict(config).items())).encode())
        for name, tensor in self.module.state_dict().items():
            data = tensor.detach().contiguous().reshape(-1)
            digest.update(f"{name} {tuple(tensor.shape)} {data.dtype}".encode())
            digest.update(data.view(torch.uint8).numpy().data if data.numel() else b"")
        return digest.hexdigest()


class _DecodeReplay:
    """Replaces ``vae.decode``: whole-latent decodes through OpenVINO once compiled, else (and
    for tiles, slices, gradients) the VAE's own."""

    def __init__(self, vae: Any, graphs: OpenVinoGraphs) -> None:
        self.vae = vae
        self.eager = vae.decode
        self.graphs = graphs

    def __call__(
        self, z: torch.Tensor, return_dict: bool = True, generator: Any = None, **kwargs: Any
    ) -> Any:
        graph = None  # (an AutoencoderKL draws nothing from ``generator``)
        if (
            isinstance(z, torch.Tensor)
            and not kwargs
            and not torch.is_grad_enabled()
            and not getattr(self.vae, "use_tiling", False)
            and (z.shape[0] == 1 or not getattr(self.vae, "use_slicing", False))
        ):
            graph = self.graphs((z,), None)
        if graph is None:
            return self.eager(z, return_dict=return_dict, generator=generator, **kwargs)
        out = graph(z)
        if not return_dict:
            return (out,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=out)


def capture_vae(vae: Any, cache: Path, threads: int = 0) -> bool:
    """Route ``vae.decode``'s whole-latent calls through OpenVINO; False (nothing done) when
    its decode is already replaced on the instance or it is not a plain AutoencoderKL."""
    if type(vae).__name__ != "AutoencoderKL" or "decode" in vars(vae):
        return False
    graphs = OpenVinoGraphs(vae, cache, threads, forward=vae_decode, name="vae-decoder")
    vae.decode = _DecodeReplay(vae, graphs)
    return True


def text_forward(encoder: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """A CLIP text encoder's last hidden state for token ids (no mask, no other outputs)."""
    out: torch.Tensor = type(encoder).forward(encoder, input_ids, return_dict=False)[0]
    return out


class _EncodeReplay:
    """Replaces a CLIP text encoder's ``forward``: calls for the last hidden state alone (what
    SD 1.x/2.x pipelines ask) through OpenVINO once compiled, else its own forward."""

    def __init__(self, encoder: Any, graphs: OpenVinoGraphs) -> None:
        self.encoder = encoder
        self.eager = encoder.forward
        self.graphs = graphs

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
        graph = None
        if (
            isinstance(input_ids, torch.Tensor)
            and attention_mask is None
            and not any(kwargs.values())
            and not torch.is_grad_enabled()
        ):
            graph = self.graphs((input_ids,), None)
        if graph is None:
            return self.eager(input_ids, attention_mask=attention_mask, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=graph(input_ids))


def capture_text_encoder(encoder: Any, cache: Path, threads: int = 0) -> bool:
    """Route a CLIPTextModel's plain calls through OpenVINO; False (nothing done) for other
    encoders or one whose forward is already replaced on the instance."""
    if type(encoder).__name__ != "CLIPTextModel" or "forward" in vars(encoder):
        return False
    graphs = OpenVinoGraphs(encoder, cache, threads, forward=text_forward, name="text-encoder")
    encoder.forward = _EncodeReplay(encoder, graphs)
    return True


def decode_graphs(vae: Any) -> OpenVinoGraphs | None:
    """The OpenVINO graphs `capture_vae` gave ``vae``, if any."""
    replay = vars(vae).get("decode")
    return replay.graphs if isinstance(replay, _DecodeReplay) else None


def encode_graphs(encoder: Any) -> OpenVinoGraphs | None:
    """The OpenVINO graphs `capture_text_encoder` gave ``encoder``, if any."""
    replay = vars(encoder).get("forward")
    return replay.graphs if isinstance(replay, _EncodeReplay) else None


def _float32_copy(module: Any) -> torch.nn.Module:
    """A float32 twin of a diffusers or transformers model (its class, config and weights; not
    its hooks), made without initialising weights it is about to replace."""
    with torch.device("meta"):
        if hasattr(type(module), "from_config"):  # diffusers
            twin = type(module).from_config(module.config)
        else:  # transformers
            twin = type(module)(module.config)
    weights = {name: _float32(tensor) for name, tensor in module.state_dict().items()}
    twin.load_state_dict(weights, assign=True)
    # buffers left out of state dicts (e.g. CLIP's position ids) are still on "meta"
    for name, buffer in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        held = twin.get_submodule(owner)
        if held._buffers[leaf] is not None and held._buffers[leaf].is_meta:
            held._buffers[leaf] = _float32(buffer).clone()
    return twin.eval()


def _evict(cache: Path, keep: Path) -> None:
    """Delete the least recently used converted models beyond MAX_CACHED, and halves left by
    a crash (another process may be writing a recent one)."""
    folders = sorted(
        (f for f in cache.iterdir() if f.is_dir() and f != keep),
        key=lambda f: f.stat().st_mtime,
        reverse=True,
    )
    stale = time.time() - STALE_S
    done = [f for f in folders if f.suffix != ".partial"]
    left = [f for f in folders if f.suffix == ".partial" and f.stat().st_mtime < stale]
    for folder in done[MAX_CACHED - 1 :] + left:
        shutil.rmtree(folder, ignore_errors=True)
