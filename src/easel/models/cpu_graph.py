"""A CPU fast path for small denoisers: the UNet's forward replayed as a traced graph.

A small UNet on the CPU spends a large share of each call in Python: diffusers' blocks, attention
processors and module hooks run for every one of its ~700 operators, and the arithmetic
of a 16x16 latent is over in microseconds per operator. `capture_unet` records the operators once
per input shape with ``torch.jit.trace`` and replays them without that Python; the bundled
model's denoiser call then takes about 70 % of the time, and an image 75–80 %
(bench/tiny_shapes_latency.py, docs/BENCHMARKS.md).

    >>> capture_unet(pipe.unet)          # loader.ModelManager does this on the CPU
    >>> pipe("a red circle").images[0]   # the first call of each shape traces (about a second)

Only plain calls replay: sample, timestep tensor and text embeddings (and SDXL's pooled text
embeddings and size ids), under ``no_grad``. Anything else (an IP-Adapter's image embeddings,
ControlNet residuals, a LoRA's scale, gradients, a timestep given as a number) runs the model's
own forward, and so does every call once tracing has failed. The graphs
share the UNet's weight tensors, so weights changed in place show in them; whoever swaps its
modules otherwise must call `release_unet`.

PEFT (LoRA) layers wrap the UNet's linear layers and leave their weights alone. While any of
them is live (enabled, or merged into the weights) every call runs eagerly; once all are
disabled (diffusers' ``disable_lora``) a LoRA layer is exactly its base layer, so the graphs
replay again and give the plain model's pixels, whether they were traced before the LoRAs came
or while they were off (tests/models/test_loras.py holds them to it).

``torch.jit`` is deprecated in favour of ``torch.compile``, whose inductor backend (with
freezing) gave the same speed-up here but took 76 s to compile one shape on a 2-core CPU.
Should a later torch drop ``trace``, tracing fails and everything runs eagerly.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

log = logging.getLogger(__name__)

# Above this size the arithmetic dominates a call and the Python saved is noise (an SD 1.5 UNet
# has 860M parameters).
MAX_PARAMETERS = 50_000_000
# Graphs per UNet (one per batch size and image size in use); later shapes run eagerly. A graph
# costs about 26 MB whatever the model's size (the recorded program, measured on UNets of 7 to
# 100 MB of weights), and TorchScript keeps that memory for the life of the process even after
# the graph is dropped, so graphs are never evicted and replaced: their number is capped, for
# plain calls and for `graph_variant` calls apart (dynamic batching's sliced calls of 2..4
# images at one size take 6 graphs, which must not crowd out plain calls of other sizes).
MAX_GRAPHS = 8
# SDXL's extra conditioning (``added_cond_kwargs``), which plain calls may carry: graph inputs
# after the text embeddings, in this order
ADDED_CONDITIONING = ("text_embeds", "time_ids")


def unet_forward(
    unet: Any,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *added: torch.Tensor,
) -> torch.Tensor:
    """A UNet's plain call (its class's forward: not a replay put on the instance), on
    positional tensors: ``added`` is SDXL's (text_embeds, time_ids), or nothing."""
    conditioning = dict(zip(ADDED_CONDITIONING, added, strict=True)) if added else None
    out: torch.Tensor = type(unet).forward(
        unet,
        sample,
        timestep,
        encoder_hidden_states,
        added_cond_kwargs=conditioning,
        return_dict=False,
    )[0]
    return out


class Positional(torch.nn.Module):
    """``forward(module, *tensors) -> tensor`` as a module: what trace records, and what
    cpu_openvino converts."""

    def __init__(self, module: torch.nn.Module, forward: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.module = module
        self.call = forward

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.call(self.module, *tensors)


class _Traces:
    """Graphs for `_Replay` by ``torch.jit.trace``: one per shape key, recorded on first use."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.graphs: dict[tuple[Any, ...], Any] = {}
        self.failed = False
        self._lock = threading.Lock()

    def __call__(self, inputs: tuple[torch.Tensor, ...], variant: Hashable) -> Any:
        if self.failed:
            return None
        key = shape_key(inputs) + (variant,)
        with self._lock:
            plain = variant is None
            kept = sum((k[-1] is None) == plain for k in self.graphs)
            if key not in self.graphs and kept < MAX_GRAPHS:
                graph = self._trace(inputs)
                if graph is not None:
                    self.graphs[key] = graph
            return self.graphs.get(key)

    def _trace(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        """The traced graph for ``inputs``' shapes; None (and no more tries) if tracing fails."""
        try:
            with warnings.catch_warnings():
                # TorchScript announces its deprecation, and the tracer warns about every
                # Python branch on a size: both are expected here (the key covers the sizes)
                warnings.simplefilter("ignore")
                return torch.jit.trace(
                    Positional(self.unet, unet_forward), inputs, check_trace=False
                )
        except Exception as exc:  # any failure just means "no fast path": run eagerly
            log.warning("denoiser not traced, running it eagerly: %s", exc)
            self.failed = True
            return None


def shape_key(inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    """What a recorded graph is valid for: its inputs' shapes (diffusers branches on sizes in
    Python), dtypes, devices and memory layouts."""
    return tuple(
        (tuple(x.shape), x.dtype, x.device, x.is_contiguous(memory_format=torch.channels_last))
        for x in inputs
    )


# a source of graphs: (sample, timestep, text embeddings[, SDXL's text_embeds, time_ids]),
# variant -> a callable on those tensors returning the UNet's output, or None (run the eager
# forward this time)
GraphSource = Callable[[tuple[torch.Tensor, ...], Hashable], Any]


class _Replay:
    """Replaces ``unet.forward``: replays a graph for plain calls, else the eager forward."""

    def __init__(self, unet: torch.nn.Module, graphs: GraphSource) -> None:
        self.unet = unet
        self.eager = unet.forward
        self.graphs = graphs
        # who changed how the UNet's layers compute (see graph_variant): part of a graph's key
        self.variant: Hashable = None
        # the UNet's PEFT configs when its LoRA layers were last looked up, and those layers
        self._peft_configs: list[Any] = []
        self._lora_layers: list[Any] = []

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        graph = None
        added = _added(kwargs.get("added_cond_kwargs"))
        if (
            isinstance(timestep, torch.Tensor)
            and isinstance(encoder_hidden_states, torch.Tensor)
            and added is not None
            and not args
            and all(v is None for k, v in kwargs.items() if k != "added_cond_kwargs")
            and not torch.is_grad_enabled()
            and not self._lora_live()
        ):
            inputs = (sample, timestep, encoder_hidden_states, *added)
            graph = self.graphs(inputs, self.variant)
        if graph is None:
            return self.eager(
                sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs
            )
        out = graph(*inputs)
        if not return_dict:
            return (out,)
        return UNet2DConditionOutput(sample=out)

    def _lora_live(self) -> bool:
        """True while a PEFT (LoRA) layer of the UNet may change its output: enabled, or merged
        (a disabled merged layer unmerges in its Python forward, which a graph would skip)."""
        configs = getattr(self.unet, "peft_config", None)
        if not configs:
            return False
        held = list(configs.values())
        if len(held) != len(self._peft_configs) or any(
            a is not b for a, b in zip(held, self._peft_configs, strict=False)
        ):
            # adapters came or went (each brings a new config object; those seen are held
            # here, so a new one is never taken for an old one): find the layers again.
            # Scanning every module on every call would cost ~5 % of a small UNet's call.
            from peft.tuners.tuners_utils import BaseTunerLayer  # peft_config means peft

            self._peft_configs = held
            self._lora_layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        return any(m.merged or not m.disable_adapters for m in self._lora_layers)


def _added(conditioning: Any) -> tuple[torch.Tensor, ...] | None:
    """A call's ``added_cond_kwargs`` as graph inputs: none (SD), SDXL's two tensors, or None
    when it carries anything else (an IP-Adapter's image embeddings): then it runs eagerly."""
    if conditioning is None:
        return ()
    if not isinstance(conditioning, dict) or set(conditioning) != set(ADDED_CONDITIONING):
        return None
    tensors = tuple(conditioning[name] for name in ADDED_CONDITIONING)
    return tensors if all(isinstance(t, torch.Tensor) for t in tensors) else None


def capture_unet(unet: torch.nn.Module, graphs: GraphSource | None = None) -> bool:
    """Route ``unet``'s plain inference calls through graphs: ``graphs``' (cpu_openvino's),
    else traced ones. False (and nothing done) when traced graphs would be used on a UNet
    larger than MAX_PARAMETERS, or its forward is already replaced on the instance (captured
    before, or hooked by someone else, e.g. accelerate's offload)."""
    if "forward" in vars(unet):
        return False
    if graphs is None:
        if sum(p.numel() for p in unet.parameters()) > MAX_PARAMETERS:
            return False
        graphs = _Traces(unet)
    unet.forward = _Replay(unet, graphs)  # type: ignore[method-assign]
    return True


def batches_exactly(unet: torch.nn.Module | None) -> bool:
    """Whether a batched call of ``unet`` under `graph_variant` computes as its solo calls do:
    not when its solo calls replay graphs that a variant does not use (OpenVINO's), since the
    batch would then run the eager forward while each image alone would not."""
    graphs = captured(unet) if unet is not None else None
    return graphs is None or getattr(graphs, "follows_variants", True)


def captured(unet: torch.nn.Module) -> GraphSource | None:
    """The graph source `capture_unet` gave ``unet``, if any."""
    replay = vars(unet).get("forward")
    return replay.graphs if isinstance(replay, _Replay) else None


@contextmanager
def graph_variant(unet: torch.nn.Module | None, variant: Hashable) -> Iterator[None]:
    """Within the block, ``unet``'s calls trace and replay graphs of their own, keyed by
    ``variant``: for whoever changes how the UNet's layers compute for a while (engine.batching
    slices them), since a graph replays what was traced, not the layers' forwards of now. No
    effect on a UNet that `capture_unet` did not take."""
    replay = vars(unet).get("forward") if unet is not None else None
    if not isinstance(replay, _Replay):
        yield
        return
    before, replay.variant = replay.variant, variant
    try:
        yield
    finally:
        replay.variant = before


def release_unet(unet: torch.nn.Module) -> None:
    """Undo `capture_unet`: drop the graphs, and calls run the class's forward again."""
    if isinstance(vars(unet).get("forward"), _Replay):
        del unet.forward
