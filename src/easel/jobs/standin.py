"""A stand-in generator for tests, benchmarks and UI work without torch.

It follows :class:`easel.jobs.worker.Generator` exactly (progress per step, cancel between
steps, one image per seed) but draws a flat colour derived from the prompt and seed instead of
running a model, so the same request always gives the same pixels.

    services = build_services(settings, generator=StandInGenerator(seconds_per_step=0.01))
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any

from PIL import Image

from easel.domain import (
    CancelCheck,
    Canceled,
    GenerationParams,
    GenerationResult,
    InputImages,
    Progress,
    ProgressCallback,
)


class StandInGenerator:
    """Sleeps ``seconds_per_step`` per step; fails with ``error`` when the prompt contains
    ``fail_word`` (to exercise the failure path)."""

    def __init__(self, seconds_per_step: float = 0.0, *, fail_word: str = "<fail>") -> None:
        self.seconds_per_step = seconds_per_step
        self.fail_word = fail_word
        self.calls = 0
        self.last_inputs: InputImages | None = None  # what the worker passed, for tests

    def describe(self) -> dict[str, Any]:
        """Like ``Engine.describe``: this process, and no models (it loads none)."""
        return {
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "models": [],
            "loads": {},
            "load_seconds": {},
        }

    def generate(
        self,
        params: GenerationParams,
        *,
        inputs: InputImages | None = None,
        on_progress: ProgressCallback | None = None,
        is_canceled: CancelCheck | None = None,
    ) -> GenerationResult:
        assert params.seed is not None and params.width and params.height
        assert params.num_inference_steps is not None
        self.calls += 1
        self.last_inputs = inputs
        started = time.perf_counter()
        if self.fail_word in params.prompt:
            raise RuntimeError("stand-in failure requested by the prompt")
        total = params.num_inference_steps
        for step in range(1, total + 1):
            if is_canceled is not None and is_canceled():
                raise Canceled()
            if self.seconds_per_step:
                time.sleep(self.seconds_per_step)
            if on_progress is not None:
                preview = self._image(params, params.seed, 8) if step % 2 == 0 else None
                on_progress(Progress(step=step, total=total, preview=preview))
        images = [self._image(params, params.seed + i, None) for i in range(params.num_images)]
        return GenerationResult(images=images, params=params, seconds=time.perf_counter() - started)

    @staticmethod
    def _image(params: GenerationParams, seed: int, size: int | None) -> Image.Image:
        digest = hashlib.sha256(f"{params.prompt}|{seed}".encode()).digest()
        assert params.width and params.height
        shape = (size, size) if size else (params.width, params.height)
        return Image.new("RGB", shape, (digest[0], digest[1], digest[2]))
