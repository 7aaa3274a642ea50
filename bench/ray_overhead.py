"""What a job costs on the Ray path over the embedded worker, side by side in one run.

    .venv/bin/python bench/ray_overhead.py [--jobs 40] [--steps 4]

Two servers' services in one process over two EASEL_HOMEs, both with the stand-in generator
(no model: what is measured is the path, not the work): the embedded worker thread, and two
Ray actors on a local Ray cluster this script starts. Jobs go one at a time, alternating
between the two; each is timed from submit to its final status in the database (polled every
millisecond, the same for both). Prints min / median / p95 per path and the median difference;
the goal of issue 34 is at most 20 ms more on the Ray path.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from easel.config import Settings
from easel.domain import GenerationParams, JobStatus
from easel.jobs.standin import StandInGenerator
from easel.services import Services, build_services

FINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}


def one_job(services: Services, steps: int, seed: int) -> float:
    started = time.perf_counter()
    job = services.submit_job(
        GenerationParams(
            prompt="a red circle",
            model="tiny-shapes",
            num_inference_steps=steps,
            width=64,
            height=64,
            seed=seed,
        )
    )
    while services.queue.get(job.id).status not in FINAL:
        time.sleep(0.001)
    seconds = time.perf_counter() - started
    assert services.queue.get(job.id).status is JobStatus.SUCCEEDED
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40, help="timed jobs per path")
    parser.add_argument("--steps", type=int, default=4, help="progress events per job")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths: dict[str, Services] = {}
        for name, ray in (("embedded", None), ("ray", "auto")):
            settings = Settings(
                home=Path(tmp) / name, ray_address=ray, ray_workers=2, ray_cpus_per_worker=1
            )
            services = build_services(settings, generator=StandInGenerator())
            services.start()
            paths[name] = services
        pool = paths["ray"].pool
        assert pool is not None
        while pool.ready_workers < 2:
            time.sleep(0.1)
        for services in paths.values():  # warm up: first calls, first events
            for seed in range(3):
                one_job(services, args.steps, seed)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for seed in range(args.jobs):
            for name, services in paths.items():
                times[name].append(one_job(services, args.steps, seed))
        for services in paths.values():
            services.stop()

    print(f"{args.jobs} jobs per path, {args.steps} steps each, stand-in generator\n")
    print("| path | min ms | median ms | p95 ms |")
    print("|---|---|---|---|")
    for name, values in times.items():
        ms = sorted(v * 1000 for v in values)
        p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
        print(f"| {name} | {ms[0]:.1f} | {statistics.median(ms):.1f} | {p95:.1f} |")
    extra = [r - e for r, e in zip(times["ray"], times["embedded"], strict=True)]
    print(f"\nRay path costs {statistics.median(extra) * 1000:+.1f} ms per job (median of pairs)")


if __name__ == "__main__":
    main()
