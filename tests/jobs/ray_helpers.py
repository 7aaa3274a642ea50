"""Helpers of the Ray pool tests (the cluster itself is the session fixture ``ray_cluster``)."""

from __future__ import annotations

import time
from collections.abc import Callable

from easel.domain import GenerationParams, JobStatus
from easel.services import Services

FINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}


def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_jobs(services: Services, ids: list[str], timeout: float = 120) -> None:
    until(lambda: all(services.queue.get(i).status in FINAL for i in ids), timeout, "the jobs")


def ready(services: Services, count: int = 2, timeout: float = 60) -> None:
    assert services.pool is not None
    until(lambda: services.pool.ready_workers == count, timeout, f"{count} ready actors")


def params(model: str, seed: int, steps: int = 2, size: int = 32) -> GenerationParams:
    return GenerationParams(
        prompt=f"a red circle {seed}",
        model=model,
        num_inference_steps=steps,
        width=size,
        height=size,
        seed=seed,
    )
