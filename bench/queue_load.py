"""Queue load benchmark: submit latency over HTTP and claim-run-store throughput.

A stand-in generator (no model, no torch: a flat 64x64 image) isolates Easel's own overhead:
SQLite writes, events, PNG encoding with metadata, HTTP handling.

1. submit: ``--jobs`` POST /api/v1/jobs from ``--clients`` threads (in a separate client process)
   against a real uvicorn server on loopback, while the worker runs those jobs; per-request
   latency p50/p99. Twice: with a zero-work stand-in, whose worker thread is pure Python and
   competes with the request handlers for the GIL (worst case), and with 2 ms sleeping steps,
   like a real model whose torch kernels release the GIL.
2. throughput: ``--jobs`` jobs queued directly, then one worker drains them: claim (one UPDATE
   ... RETURNING), generate, PNG with metadata, image row, progress and final events; jobs/s.

    .venv/bin/python bench/queue_load.py              # 1000 jobs; 1 then 4 client threads
    .venv/bin/python bench/queue_load.py --jobs 200   # quicker
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn

from easel.api.app import create_app
from easel.config import Settings
from easel.domain import GenerationParams, JobStatus
from easel.jobs.standin import StandInGenerator
from easel.models.catalog import ModelCatalog
from easel.services import Services, build_services

STEPS = 4  # denoising steps per job: each one is a progress row and an event


def make_settings(home: Path, jobs: int) -> Settings:
    """A home with a stand-in model entry: a diffusers folder with no weights (never loaded)."""
    folder = home / "standin-model"
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    settings = Settings(home=home, default_model="standin", max_queued_jobs=jobs + 1)
    ModelCatalog(settings).add(
        "standin", str(folder), defaults={"width": 64, "height": 64, "min_size": 32}
    )
    return settings


def wait_until_done(services: Services, jobs: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while services.queue_summary().counts[JobStatus.SUCCEEDED] < jobs:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {services.queue_summary().counts}")
        time.sleep(0.01)


def run_clients(port: int, jobs: int, clients: int) -> list[float]:
    """``clients`` threads POST ``jobs`` jobs in all; returns each request's latency (s)."""
    body = {"prompt": "a red circle", "num_inference_steps": STEPS}

    def client(count: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1") as http:
            for _ in range(count):
                start = time.perf_counter()
                response = http.post("/jobs", json=body)
                latencies.append(time.perf_counter() - start)
                assert response.status_code == 202, response.text
        return latencies

    shares = [jobs // clients + (i < jobs % clients) for i in range(clients)]
    with ThreadPoolExecutor(clients) as pool:
        return [x for part in pool.map(client, shares) for x in part]


def bench_submit(jobs: int, clients: int, step_s: float) -> list[float]:
    """Latency in seconds of each POST /api/v1/jobs while the worker runs the jobs with a
    stand-in taking ``step_s`` per step (sleeping, as torch kernels release the GIL)."""
    with tempfile.TemporaryDirectory() as tmp:
        generator = StandInGenerator(seconds_per_step=step_s)
        services = build_services(make_settings(Path(tmp), jobs), generator=generator)
        server = uvicorn.Server(
            uvicorn.Config(create_app(services), host="127.0.0.1", port=0, log_level="warning")
        )
        thread = threading.Thread(target=server.run)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        # the clients run in another process, like real ones: they do not share our GIL
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as proc:
            latencies = proc.submit(run_clients, port, jobs, clients).result()
        server.should_exit = True
        thread.join()
    return latencies


def bench_throughput(jobs: int) -> float:
    """Jobs per second through claim -> generate -> store -> publish, one worker."""
    with tempfile.TemporaryDirectory() as tmp:
        services = build_services(make_settings(Path(tmp), jobs), generator=StandInGenerator())
        for _ in range(jobs):
            services.submit_job(GenerationParams(prompt="a red circle", num_inference_steps=STEPS))
        start = time.perf_counter()
        services.start()
        wait_until_done(services, jobs)
        seconds = time.perf_counter() - start
        services.stop()
    return jobs / seconds


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 4], help="HTTP client threads (each run)"
    )
    args = parser.parse_args()

    rows = []
    for step_s in (0.0, 0.002):
        for clients in args.clients:
            ms = [x * 1000 for x in bench_submit(args.jobs, clients, step_s)]
            rows.append((step_s, clients, percentile(ms, 50), percentile(ms, 99), max(ms)))
    rate = bench_throughput(args.jobs)
    print(f"Submit latency, POST /api/v1/jobs over HTTP ({args.jobs} jobs, worker running):\n")
    print("| worker meanwhile | client threads | p50 | p99 | max | target p99 |")
    print("|---|---|---|---|---|---|")
    for step_s, clients, p50, p99, worst in rows:
        busy = f"{step_s * 1000:g} ms/step (GIL free)" if step_s else "zero-work (holds GIL)"
        print(f"| {busy} | {clients} | {p50:.1f} ms | {p99:.1f} ms | {worst:.1f} ms | < 50 ms |")
    print(f"\nThroughput, claim -> generate -> store -> publish, 1 worker, {STEPS} steps/job:\n")
    print("| jobs | jobs/s | target |")
    print("|---|---|---|")
    print(f"| {args.jobs} | {rate:.0f} | >= 200 |")


if __name__ == "__main__":
    main()
