"""The Ray actor's side of a worker: one generator (a real Engine with its own model cache) in a
process of the cluster, streaming a job's progress back to the server.

The server (:mod:`easel.jobs.raypool`) keeps the queue, the image store and the events; an actor
only turns parameters and input images into images. What crosses the wire per job: the request
(a dict), its input images (PIL), progress items ``("progress", step, total, preview)`` with a
small preview, then one last item: ``("result", images, params, seconds, dropped_tokens,
info)``, ``("canceled", info)``, ``("error", class name, message, field, info)`` for an error
fit for a user, or ``("crash", text, info)``. ``info`` is the actor's state after the job (models
loaded, loads), so the dispatcher's view of it is fresh without another round trip.

Models, LoRAs and the model catalog come from the actor's own node (``EASEL_HOME`` there, or a
shared filesystem): nothing but requests and images travels.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from easel.config import Settings
from easel.domain import Canceled, EaselError, GenerationParams, InputImages, Progress
from easel.jobs.worker import PREVIEW_SIZE, Generator

GeneratorFactory = Callable[[Settings], Generator]


def make_engine(settings: Settings) -> Generator:
    """The default: a real Engine with its own ModelManager on the actor's device."""
    from easel.engine.generate import Engine
    from easel.models.catalog import ModelCatalog
    from easel.models.loader import ModelManager
    from easel.models.loras import LoraCatalog

    return Engine(
        ModelManager(settings, ModelCatalog(settings)), settings, loras=LoraCatalog(settings)
    )


class WorkerActor:
    """Runs one job at a time (a pipeline never serves two calls); ``cancel`` and ``info`` are
    answered while a job runs (the actor has a few threads)."""

    def __init__(self, settings_json: str, make_generator: GeneratorFactory = make_engine) -> None:
        import ray

        settings = Settings.model_validate_json(settings_json)
        # Ray shows an actor only the GPUs it reserved, as cuda:0..
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.node = ray.get_runtime_context().get_node_id()
        self.settings = settings.model_copy(update={"device": self.device})
        self.generator = make_generator(self.settings)
        self._one_job = threading.Lock()
        self._canceled: set[str] = set()

    def info(self) -> dict[str, Any]:
        """Who and where this actor is, and what it holds: the generator's ``describe()``
        (models, loads) with this process's node, host, pid and device."""
        describe = getattr(self.generator, "describe", None)
        info: dict[str, Any] = dict(describe()) if describe is not None else {}
        info.update(node=self.node, host=socket.gethostname(), pid=os.getpid(), device=self.device)
        manager = getattr(self.generator, "models", None)  # an Engine's ModelManager
        if manager is not None:  # how full its memory is: may it take one more model?
            info.update(
                used_bytes=manager.memory_bytes(),
                budget_bytes=int(self.settings.model_cache_gb * 1024**3),
            )
        return info

    def cancel(self, token: str) -> None:
        """Stop the job ``token`` at its next step (or before it starts)."""
        self._canceled.add(token)

    def generate(
        self, token: str, params: dict[str, Any], inputs: dict[str, Any]
    ) -> Iterator[tuple[Any, ...]]:
        """Run one job; yields its progress items, then its last item (see the module doc).
        The generation runs in a thread of its own so that its progress callbacks can be
        yielded as they come."""
        items: queue.Queue[tuple[Any, ...]] = queue.Queue()

        def on_progress(progress: Progress) -> None:
            preview = progress.preview
            if preview is not None:
                preview = preview.convert("RGB")
                preview.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
            items.put(("progress", progress.step, progress.total, preview))

        def run() -> None:
            with self._one_job:
                try:
                    result = self.generator.generate(
                        GenerationParams.from_dict(params),
                        inputs=InputImages(**inputs),
                        on_progress=on_progress,
                        is_canceled=lambda: token in self._canceled,
                    )
                    items.put(
                        (
                            "result",
                            result.images,
                            result.params.to_dict(),
                            result.seconds,
                            result.dropped_tokens,
                            self.info(),
                        )
                    )
                except Canceled:
                    items.put(("canceled", self.info()))
                except EaselError as exc:
                    items.put(("error", type(exc).__name__, exc.message, exc.field, self.info()))
                except Exception as exc:  # the server logs it and fails the job
                    items.put(("crash", f"{type(exc).__name__}: {exc}", self.info()))
                finally:
                    self._canceled.discard(token)

        threading.Thread(target=run, name=f"easel-job-{token[:8]}", daemon=True).start()
        while True:
            item = items.get()
            yield item
            if item[0] != "progress":
                return
