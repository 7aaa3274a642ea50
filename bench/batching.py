"""Dynamic batching: throughput at batch 1/2/4, and the queue wait that a batch window adds.

    .venv/bin/python bench/batching.py                # all: tiny-shapes, SD1.5-arch, queue
    .venv/bin/python bench/batching.py --parts sd15   # or tiny, queue (comma-separated)
    .venv/bin/python bench/batching.py --quick        # tiny-shapes and queue, fewer rounds

1. Engine throughput. ``--images`` images (distinct prompts and seeds, one per request) through
   ``Engine.generate_batch`` in calls of b = 1, 2, 4 requests, the batch sizes interleaved round
   by round (1, 2, 4, 1, 2, 4, ...); images/s, best and median round. "exact" is Easel: the
   batch computes its linear, GroupNorm and convolution layers in single-image slices
   (engine.batching), and the images are checked against the b = 1 ones, bit for bit. "naive" is the same call
   without the slicing: what batching would give if kernels rounded alike at every batch size,
   with the largest pixel difference from the b = 1 images. Models: the bundled tiny-shapes at
   its defaults (64², 8 steps, CFG to two thirds, CPU graphs on) and an SD1.5-architecture
   model with random weights (bench/engine_overhead.py) at ``--size`` (256²), 4 steps, CFG.
2. Queue. The real worker thread and engine on tiny-shapes, jobs submitted through Services;
   latency is ``finished_at - created_at`` from the job rows.
   a. a lone job with ``batch_window_ms`` 0, 20, 100 (interleaved): what the window costs
      when nothing comes;
   b. a burst of ``--burst`` jobs at once: seconds to drain with ``max_batch`` 1 and 4;
   c. jobs arriving at random (Poisson, seeded) at about the rate one worker serves solo
      jobs: mean and 90th-percentile latency with max_batch 1, 4 (window 0) and 4 (window
      20 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import easel.engine.generate as generate_module
import easel.models.cpu_graph as cpu_graph
from easel.config import Settings
from easel.domain import GenerationParams, GenerationRequest, GenerationResult, JobRecord
from easel.engine.generate import Engine
from easel.models.catalog import ModelCatalog
from easel.models.loader import ModelManager
from easel.services import Services, build_services

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_overhead import build_sd15_like  # noqa: E402

BATCHES = (1, 2, 4)
PROMPTS = [
    "a red circle",
    "a blue square on green",
    "two yellow triangles",
    "a small purple star",
    "a large orange circle",
    "a grey square, left",
    "a green triangle on red",
    "a white star on black",
]


def cpu() -> str:
    """The CPU's model name and the flags that matter here (lscpu)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    name = fields.get("Model name", "unknown CPU").strip()
    return f"{name}, {fields.get('CPU(s)', '?').strip()} CPUs, flags {' '.join(wanted)}"


@contextlib.contextmanager
def naive() -> Iterator[None]:
    """Batched calls without the single-image slices (engine.batching)."""
    exact = generate_module.solo_shapes
    generate_module.solo_shapes = lambda pipe, rows: contextlib.nullcontext()  # type: ignore[assignment]
    try:
        yield
    finally:
        generate_module.solo_shapes = exact


def images_of(outcomes: list[GenerationResult | Exception]) -> list[np.ndarray]:
    pixels = []
    for outcome in outcomes:
        assert isinstance(outcome, GenerationResult), outcome
        pixels += [np.asarray(i, dtype=np.int16) for i in outcome.images]
    return pixels


def engine_throughput(
    engine: Engine, params: GenerationParams, images: int, rounds: int, warm_up: bool = True
) -> dict[str, Any]:
    """Seconds per image and speed-up per batch size, exact and naive, and how the batched
    pixels compare. ``warm_up``: run every configuration once untimed first (CPU graphs trace
    each batch shape on first use); without, the first timed round gives the pixels."""
    requests = [
        GenerationRequest(
            GenerationParams.from_dict(
                {**params.to_dict(), "prompt": PROMPTS[i % len(PROMPTS)], "seed": 100 + i}
            )
        )
        for i in range(images)
    ]

    def run(batch: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for start in range(0, images, batch):
            out += images_of(engine.generate_batch(requests[start : start + batch]))
        return out

    modes: dict[str, Callable[[], Any]] = {"exact": contextlib.nullcontext, "naive": naive}
    configs = [("exact", 1)] + [(m, b) for m in modes for b in BATCHES[1:]]
    pixels: dict[tuple[str, int], list[np.ndarray]] = {}
    if warm_up:  # loads the model and traces every batch shape's CPU graph
        for mode, batch in configs:
            with modes[mode]():
                pixels[mode, batch] = run(batch)
    else:
        engine.generate_batch(requests[:1])  # loads the model
    times: dict[tuple[str, int], list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for mode, batch in configs:
            with modes[mode]():
                started = time.perf_counter()
                out = run(batch)
                times[mode, batch].append(time.perf_counter() - started)
            pixels.setdefault((mode, batch), out)
    solo = pixels["exact", 1]
    result: dict[str, Any] = {"rows": {}}
    base = times["exact", 1]
    for (mode, batch), runs in times.items():
        same = pixels[mode, batch]
        diff = max(int(np.abs(a - b).max()) for a, b in zip(same, solo, strict=True))
        # speed-up against batch 1 in the same round (interleaved), median over the rounds
        ratio = statistics.median(b / t for b, t in zip(base, runs, strict=True))
        per_image = (min(runs) / images, statistics.median(runs) / images)
        result["rows"][mode, batch] = (*per_image, ratio, diff)
    return result


def print_engine(title: str, result: dict[str, Any]) -> None:
    print(f"\n{title}\n")
    print("| batch | s/image best | s/image median | speed-up (exact) | naive s/image best |"
          " speed-up (naive) | naive max pixel diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    rows = result["rows"]
    for batch in BATCHES:
        best, median, ratio, diff = rows["exact", batch]
        assert diff == 0, f"batch {batch}: batched pixels differ from solo ones by {diff}"
        naive_cells = "— | — | —"
        if ("naive", batch) in rows:
            n_best, _, n_ratio, n_diff = rows["naive", batch]
            naive_cells = f"{n_best:.3g} | {n_ratio:.2f}× | {n_diff}"
        print(f"| {batch} | {best:.3g} | {median:.3g} | {ratio:.2f}× | {naive_cells} |")
    print("\nexact batches: pixels identical to batch 1 (checked for every image); speed-up: "
          "batch 1's time over the batch's in the same round, median of the rounds")  # fmt: skip


# --- the queue ----------------------------------------------------------------------------------


def wait_done(services: Services, jobs: list[JobRecord], timeout: float = 600) -> list[JobRecord]:
    deadline = time.monotonic() + timeout
    while True:
        now = [services.get_job(j.id) for j in jobs]
        if all(j.status.final for j in now):
            return now
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {len(jobs)} jobs")
        time.sleep(0.02)


def latency(job: JobRecord) -> float:
    assert job.finished_at is not None
    return (job.finished_at - job.created_at).total_seconds()


def queue_bench(home: Path, burst: int, arrivals: int, rounds: int) -> None:
    settings = Settings(home=home, preview_every=2, max_batch=4)
    services = build_services(settings)
    worker = services.workers[0]

    def submit(i: int) -> JobRecord:
        prompt = PROMPTS[i % len(PROMPTS)]
        return services.submit_job(GenerationParams(prompt=prompt, seed=1000 + i))

    def configure(max_batch: int, window_ms: float) -> None:
        worker.max_batch, worker.batch_window_s = max_batch, window_ms / 1000

    try:
        # load the model and trace every batch shape's CPU graph: batches of 1..4 jobs, run
        # by hand before the worker thread starts
        for n in (1, 2, 3, 4):
            configure(n, 0)
            jobs = [submit(i) for i in range(n)]
            worker.run_once()
            assert all(j.status.final for j in wait_done(services, jobs))
        services.start()
        solo = [latency(j) for j in (wait_done(services, [submit(i)])[0] for i in range(3))]
        solo_s = min(solo)

        # a. a lone job: the window is pure waiting, timed where it happens (the worker's
        # search for jobs to batch, between its claim and the generation's start) and as the
        # job's whole latency
        searching: list[float] = []
        batch_for = worker._batch_for

        def timed(job: JobRecord) -> list[JobRecord]:
            started = time.perf_counter()
            found = batch_for(job)
            searching.append(time.perf_counter() - started)
            return found

        worker._batch_for = timed  # type: ignore[method-assign]
        lone: dict[float, tuple[list[float], list[float]]] = {
            0: ([], []),
            20: ([], []),
            100: ([], []),
        }
        for r in range(2 * rounds):
            for window, (waits, latencies) in lone.items():
                configure(4, window)
                latencies.append(latency(wait_done(services, [submit(r)])[0]))
                waits.append(searching[-1])
                time.sleep(0.05)
        worker._batch_for = batch_for  # type: ignore[method-assign]
        print("\nqueue a. a lone job: the worker's wait for jobs to batch, and its latency (submit "
              "to succeeded)\n")  # fmt: skip
        print(
            "| batch_window_ms | added wait median (ms) | added wait max (ms) | latency median (s) |"
        )
        print("|---|---|---|---|")
        for window, (waits, latencies) in lone.items():
            print(f"| {window:g} | {statistics.median(waits) * 1000:.1f} | "
                  f"{max(waits) * 1000:.1f} | {statistics.median(latencies):.3f} |")  # fmt: skip

        # b. a burst: max_batch 1 against 4
        print(f"\nqueue b. a burst of {burst} jobs submitted at once: seconds to drain\n")
        print("| max_batch | best | median | images/s (best) | speed-up (median of rounds) |")
        print("|---|---|---|---|---|")
        drained: dict[int, list[float]] = {1: [], 4: []}
        for _ in range(max(1, rounds // 2)):
            for max_batch in drained:
                configure(max_batch, 0)
                jobs = [submit(i) for i in range(burst)]
                done = wait_done(services, jobs)
                first = min(j.created_at for j in done)
                last = max(j.finished_at for j in done if j.finished_at is not None)
                drained[max_batch].append((last - first).total_seconds())
        for max_batch, runs in drained.items():
            best = min(runs)
            ratio = statistics.median(a / b for a, b in zip(drained[1], runs, strict=True))
            print(f"| {max_batch} | {best:.2f} | {statistics.median(runs):.2f} | "
                  f"{burst / best:.2f} | {ratio:.2f}× |")  # fmt: skip

        # c. random arrivals at about the solo service rate
        gap = solo_s
        print(f"\nqueue c. {arrivals} jobs arriving at random, mean gap {gap * 1000:.0f} ms "
              f"(a solo job takes {solo_s * 1000:.0f} ms): latency (s)\n")  # fmt: skip
        print("| max_batch | batch_window_ms | mean | p90 | mean queue wait |")
        print("|---|---|---|---|---|")
        for max_batch, window in ((1, 0), (4, 0), (4, 20)):
            configure(max_batch, window)
            rng = random.Random(7)
            jobs = []
            for i in range(arrivals):
                jobs.append(submit(i))
                time.sleep(rng.expovariate(1 / gap))
            done = wait_done(services, jobs)
            lat = sorted(latency(j) for j in done)
            waits = [
                (j.started_at - j.created_at).total_seconds()
                for j in done
                if j.started_at is not None
            ]
            p90 = lat[int(0.9 * (len(lat) - 1))]
            print(f"| {max_batch} | {window} | {statistics.mean(lat):.2f} | {p90:.2f} | "
                  f"{statistics.mean(waits):.2f} |")  # fmt: skip
    finally:
        services.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-shapes only, fewer rounds")
    parser.add_argument("--parts", default="tiny,sd15,queue", help="which parts to run")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per configuration")
    parser.add_argument("--images", type=int, default=8, help="images per round (tiny-shapes)")
    parser.add_argument("--size", type=int, default=256, help="SD1.5-architecture image side")
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--arrivals", type=int, default=24)
    args = parser.parse_args()
    parts = {"tiny", "queue"} if args.quick else set(args.parts.split(","))
    rounds = 2 if args.quick else args.rounds
    # room for the naive batches' graphs as well (the product keeps 8 plain + 8 batch graphs)
    cpu_graph.MAX_GRAPHS = 16
    print(f"{cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as tmp:
        # PyTorch for the SD1.5-class UNet too: a model OpenVINO runs is not batched
        settings = Settings(
            home=Path(tmp) / "home", preview_every=0, max_batch=max(BATCHES), cpu_backend="torch"
        )
        engine = Engine(ModelManager(settings, ModelCatalog(settings)), settings)
        if "tiny" in parts:
            shapes = GenerationParams(prompt="", model="tiny-shapes")
            result = engine_throughput(engine, shapes, args.images, rounds)
            dtype = engine.models.get_pipeline("tiny-shapes").dtype
            print_engine(
                f"tiny-shapes (bundled), 64², 8 steps, {str(dtype).removeprefix('torch.')}, "
                f"CPU graphs on; {args.images} images a round, best and median of {rounds} "
                "rounds",
                result,
            )
            engine.models.unload("tiny-shapes")
        if "sd15" in parts:
            folder = build_sd15_like(Path(tmp) / "sd15-random", tiny=False)
            sd15 = GenerationParams(
                prompt="",
                model=str(folder),
                width=args.size,
                height=args.size,
                num_inference_steps=4,
                guidance_scale=7.5,
                scheduler="euler",
            )
            images, sd_rounds = 4, max(2, rounds - 2)
            result = engine_throughput(engine, sd15, images, sd_rounds, warm_up=False)
            dtype = engine.models.get_pipeline(str(folder)).dtype
            print_engine(
                f"SD1.5-architecture UNet + VAE, random weights, {args.size}², 4 steps, CFG 7.5, "
                f"euler, {str(dtype).removeprefix('torch.')}; {images} images a round, best and "
                f"median of {sd_rounds} rounds",
                result,
            )
        del engine
        if "queue" in parts:
            queue_bench(Path(tmp) / "queue-home", args.burst, args.arrivals, rounds)


if __name__ == "__main__":
    main()
