"""Dispatch simulation: model-affinity dispatch against FIFO and Ray Serve-style multiplexing.

A discrete-event simulation (one heap of events, a seeded RNG, pure Python, no Ray) of a cluster
of ``--workers`` GPU workers serving ``--models`` models. Each worker holds ``--slots`` models in
memory (fewer than there are models) and runs one job at a time. Jobs arrive as a Poisson process
at ``--load`` times what the cluster could serve if it never loaded a model (workers / job time),
each for a model drawn from a Zipf-like popularity (weight 1/k^``--zipf`` for the k-th model).
The cluster starts empty and its traffic ramps up over ``--ramp`` seconds; jobs arriving in the
first ``--warmup`` seconds are left out of the figures. ``--shift T`` reverses the popularity
order at T seconds (the rarest model becomes the most wanted). The same trace goes through:

- ``fifo``: the queue's head job to the worker free the longest; a worker without the job's model
  loads it, evicting its least recently used model.
- ``ray-serve``: Ray Serve's model multiplexing (``@serve.multiplexed``): a request goes to a
  replica that has its model, else to one of the replicas with the fewest models loaded, and after
  the matching timeout (1-2 s, ``RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S``) to any
  replica; replicas evict by LRU. Idealised: this router sees every replica's state, where Ray's
  probes two random candidates per try and backs off when both are busy.
- ``affinity``: Easel's :func:`easel.jobs.dispatch.assign`, the function the server's Ray pool
  calls, with the pool's default ``starve_after_s`` and its window of waiting jobs.

Every dispatcher is called when a job arrives or ends, coalesced over ``--tick`` seconds (a
dispatch round), and sees the oldest ``--window`` waiting jobs. Default figures are those of
Z-Image-Turbo on H100/H800-class GPUs (sources in docs/BENCHMARKS.md, "Dispatch simulation"):

- a job: 8 denoising steps (8 NFEs, the model card) at 0.125 s, so 1 s a job: the model card's
  "sub-second inference latency on enterprise-grade H800 GPUs" taken at its upper bound; each
  job's time varies uniformly by +-25 % (sizes and prompts differ);
- a load: 19.3 GB of bf16 weights (transformer 11.46 GB, Qwen3-4B text encoder 7.49 GB, VAE
  0.32 GB) in 12 s from local NVMe (published first loads of the model folder: 11.8-14.7 s);
- three slots per worker: three such models (58 GB) and the activations fit an 80 GB GPU.

Printed per dispatcher: throughput (jobs finished per second between the warm-up and the last
arrival), the wait to start (submit until the first denoising step: the queue, then the model
load the job waits for) mean and p95 over the measured jobs, the worst model's p95 and its ratio
to that mean, the queue wait alone, model loads per job, and wall milliseconds per dispatcher
call. Goals (issue 34): affinity's throughput >= 2x FIFO's; no model's p95 wait to start > 3x
the mean wait to start over all measured jobs of the same run. (``its p95 / p95``, the worst
model's p95 over all jobs' p95, tells unfairness between models from the shape of the waits:
mostly zero, a short tail.)

    .venv/bin/python bench/dispatch_sim.py                  # 1000 workers, 20 models, ~1-2 min
    .venv/bin/python bench/dispatch_sim.py --jobs 20000 --workers 100 --seed 2
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from easel.config import Settings
from easel.jobs.dispatch import Costs, WaitingJob, WorkerView, assign
from easel.jobs.raypool import WAITING_WINDOW


@dataclass(frozen=True)
class Job:
    id: int
    model: str
    arrival: float
    work_s: float  # seconds of denoising once its model is loaded
    match_timeout_s: float  # Ray Serve's per-request matching timeout, drawn in [1, 2) s


@dataclass
class Worker:
    id: str
    slots: int
    models: list[str] = field(default_factory=list)  # least recently used first
    busy: bool = False

    def view(self) -> WorkerView:
        return WorkerView(
            id=self.id, models=tuple(self.models), slots=self.slots, busy=int(self.busy)
        )


@dataclass(frozen=True)
class Config:
    workers: int
    models: int
    slots: int
    jobs: int
    load: float  # offered load, a fraction of workers / job_s
    zipf: float
    load_s: float
    step_s: float
    steps: int
    tick_s: float
    window: int
    ramp_s: float  # the arrival rate grows linearly from 0 over this time
    warmup_s: float  # jobs arriving before this are left out of the figures
    shift_s: float  # from this time on (if > 0) the popularity order is reversed
    seed: int

    @property
    def job_s(self) -> float:
        return self.steps * self.step_s


def make_trace(cfg: Config) -> list[Job]:
    """Poisson arrivals whose rate ramps up over ``ramp_s`` (a cluster warming up with its
    traffic), Zipf-like model popularity, +-25 % job times: one trace for every dispatcher."""
    rng = random.Random(cfg.seed)
    names = [f"m{k:02d}" for k in range(cfg.models)]
    weights = [1 / (k + 1) ** cfg.zipf for k in range(cfg.models)]
    rate = cfg.load * cfg.workers / cfg.job_s
    now = 0.0
    trace: list[Job] = []
    while len(trace) < cfg.jobs:
        now += rng.expovariate(rate)
        if cfg.ramp_s and rng.random() > now / cfg.ramp_s:
            continue  # thinning: rate * now / ramp_s during the ramp
        shifted = cfg.shift_s and now >= cfg.shift_s
        model = rng.choices(names[::-1] if shifted else names, weights)[0]
        work = cfg.job_s * rng.uniform(0.75, 1.25)
        trace.append(Job(len(trace), model, now, work, rng.uniform(1.0, 2.0)))
    return trace


# A dispatcher gets the time, the waiting jobs (oldest first) and the workers; it returns
# (job, worker) pairs. The simulation then loads models (LRU eviction) and runs the jobs.
Dispatcher = Callable[[float, list[Job], "Cluster"], list[tuple[Job, Worker]]]


class Cluster:
    """Workers, with indexes the hand-written dispatchers use: free workers by longest idle, and
    free holders of each model."""

    def __init__(self, cfg: Config) -> None:
        self.workers = [Worker(f"w{i:04d}", cfg.slots) for i in range(cfg.workers)]
        self.by_id = {w.id: w for w in self.workers}
        # free workers, ordered: the longest idle first
        self.free: dict[str, Worker] = {w.id: w for w in self.workers}
        self.free_holders: dict[str, dict[str, Worker]] = {}
        self.views = {w.id: w.view() for w in self.workers}

    def start(self, worker: Worker, model: str) -> bool:
        """Mark ``worker`` busy with a job of ``model``; True when it must load the model."""
        del self.free[worker.id]
        for held in worker.models:
            self.free_holders[held].pop(worker.id, None)
        worker.busy = True
        load = model not in worker.models
        if load:
            if len(worker.models) >= worker.slots:
                worker.models.pop(0)
        else:
            worker.models.remove(model)
        worker.models.append(model)
        self.views[worker.id] = worker.view()
        return load

    def finish(self, worker: Worker) -> None:
        worker.busy = False
        self.free[worker.id] = worker
        for held in worker.models:
            self.free_holders.setdefault(held, {})[worker.id] = worker
        self.views[worker.id] = worker.view()


def fifo(now: float, waiting: list[Job], cluster: Cluster) -> list[tuple[Job, Worker]]:
    """The head job to the worker free the longest, whatever it holds."""
    free = iter(list(cluster.free.values()))
    return list(zip(waiting, free, strict=False))


def ray_serve(now: float, waiting: list[Job], cluster: Cluster) -> list[tuple[Job, Worker]]:
    """Ray Serve multiplexing: a free replica holding the model; else a free one among the
    replicas with the fewest models; after the job's matching timeout, any free replica."""
    taken: set[str] = set()
    fewest = min(len(w.models) for w in cluster.workers)
    plan = []
    for job in waiting:
        if len(taken) == len(cluster.free):
            break
        holders = cluster.free_holders.get(job.model, {})
        pick = next((w for w in holders.values() if w.id not in taken), None)
        if pick is None:
            pick = next(
                (w for w in cluster.free.values() if w.id not in taken and len(w.models) == fewest),
                None,
            )
        if pick is None and now - job.arrival >= job.match_timeout_s:
            pick = next((w for w in cluster.free.values() if w.id not in taken), None)
        if pick is not None:
            taken.add(pick.id)
            plan.append((job, pick))
    return plan


def affinity(cfg: Config) -> Dispatcher:
    """Easel's dispatch: the real :func:`easel.jobs.dispatch.assign`, given what the pool knows."""
    starve_after_s = Settings.model_fields["ray_starve_after_s"].default
    costs = Costs(load_s=cfg.load_s, job_s=cfg.job_s)

    def dispatch(now: float, waiting: list[Job], cluster: Cluster) -> list[tuple[Job, Worker]]:
        by_id = {job.id: job for job in waiting}
        plan = assign(
            [WaitingJob(str(job.id), job.model, now - job.arrival) for job in waiting],
            list(cluster.views.values()),
            lambda model: costs,
            starve_after_s=starve_after_s,
        )
        return [(by_id[int(job_id)], cluster.by_id[worker_id]) for job_id, worker_id in plan]

    return dispatch


@dataclass(frozen=True)
class Started:
    arrival: float
    model: str
    queue_wait: float  # submit -> dispatched to a worker
    start_wait: float  # submit -> first denoising step (the queue, then any model load)


@dataclass
class Result:
    name: str
    throughput: float  # jobs/s finished while jobs arrive, after the warm-up
    started: list[Started]  # every job
    warm_from: float  # arrival time from which jobs count in the waits
    loads: int
    jobs: int
    dispatch_s: float  # wall seconds spent in the dispatcher
    calls: int


def simulate(name: str, dispatcher: Dispatcher, trace: list[Job], cfg: Config) -> Result:
    cluster = Cluster(cfg)
    waiting: dict[int, Job] = {}  # ordered: oldest first
    events: list[tuple[float, int, str, object]] = []  # (time, seq, kind, payload)
    seq = 0

    def push(at: float, kind: str, payload: object = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, payload))

    for job in trace[:1]:
        push(job.arrival, "arrive", 0)
    warm_from = cfg.warmup_s
    arrivals_end = trace[-1].arrival
    started: list[Started] = []
    loads = finished_in_window = calls = 0
    dispatch_s = 0.0
    dispatch_pending = False
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            assert isinstance(payload, int)
            waiting[payload] = trace[payload]
            if payload + 1 < len(trace):
                push(trace[payload + 1].arrival, "arrive", payload + 1)
        elif kind == "done":
            assert isinstance(payload, Worker)
            cluster.finish(payload)
            finished_in_window += warm_from <= now <= arrivals_end
        elif kind == "dispatch":
            dispatch_pending = False
            window = [job for _, job in zip(range(cfg.window), waiting.values(), strict=False)]
            began = time.perf_counter()
            plan = dispatcher(now, window, cluster)
            dispatch_s += time.perf_counter() - began
            calls += 1
            for job, worker in plan:
                del waiting[job.id]
                load = cluster.start(worker, job.model)
                loads += load
                begins = now + (cfg.load_s if load else 0.0)
                push(begins + job.work_s, "done", worker)
                started.append(
                    Started(job.arrival, job.model, now - job.arrival, begins - job.arrival)
                )
            if waiting and cluster.free and not dispatch_pending:
                # jobs left waiting for their model's holders: look again in a while even if
                # nothing happens (time-based rules: starvation, Ray's matching timeout)
                push(now + 0.25, "dispatch")
                dispatch_pending = True
            continue
        if waiting and cluster.free and not dispatch_pending:
            push(now + cfg.tick_s, "dispatch")
            dispatch_pending = True
    return Result(
        name,
        finished_in_window / (arrivals_end - warm_from),
        started,
        warm_from,
        loads,
        len(trace),
        dispatch_s,
        calls,
    )


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Figures:
    throughput: float
    mean: float  # wait to start, all measured jobs
    p95: float
    worst_model: str
    worst_p95: float  # the highest p95 wait to start of any one model
    queue_mean: float
    queue_p95: float
    loads_per_job: float


def figures(r: Result) -> Figures:
    by_model: dict[str, list[float]] = {}
    measured = [s for s in r.started if s.arrival >= r.warm_from]
    for s in measured:
        by_model.setdefault(s.model, []).append(s.start_wait)
    worst_model, worst = max(((m, p95(w)) for m, w in by_model.items()), key=lambda mw: mw[1])
    waits = [s.start_wait for s in measured]
    queue = [s.queue_wait for s in measured]
    return Figures(
        r.throughput,
        statistics.fmean(waits),
        p95(waits),
        worst_model,
        worst,
        statistics.fmean(queue),
        p95(queue),
        r.loads / r.jobs,
    )


def report(results: list[Result], cfg: Config, *, series_s: float) -> None:
    print(
        f"{cfg.workers} workers x {cfg.slots} slots, {cfg.models} models (Zipf {cfg.zipf}), "
        f"{cfg.jobs} jobs at {cfg.load:.0%} of {cfg.workers / cfg.job_s:.0f} jobs/s; "
        f"load {cfg.load_s:g} s, job {cfg.steps} x {cfg.step_s:g} s; seed {cfg.seed}; "
        f"arrivals ramp up over {cfg.ramp_s:g} s, measured from {cfg.warmup_s:g} s"
    )
    header = (
        "| dispatcher | jobs/s | x FIFO | wait to start: mean | p95 | worst model's p95 "
        "| its p95 / mean | its p95 / p95 | queue wait: mean | p95 | loads/job "
        "| dispatch ms/call |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    table = {r.name: figures(r) for r in results}
    fifo_tp = table["fifo"].throughput if "fifo" in table else None
    for r in results:
        f = table[r.name]
        ratio = f"{f.throughput / fifo_tp:.2f}" if fifo_tp else "-"
        print(
            f"| {r.name} | {f.throughput:.0f} | {ratio} | {f.mean:.2f} s | {f.p95:.2f} s "
            f"| {f.worst_p95:.2f} s ({f.worst_model}) | {f.worst_p95 / f.mean:.1f} "
            f"| {f.worst_p95 / f.p95:.2f} "
            f"| {f.queue_mean:.2f} s | {f.queue_p95:.2f} s | {f.loads_per_job:.3f} "
            f"| {1000 * r.dispatch_s / max(r.calls, 1):.2f} |"
        )
    if "affinity" in table:
        f = table["affinity"]
        if fifo_tp:
            print(f"goal: affinity >= 2x FIFO's throughput: {f.throughput / fifo_tp:.2f}x", end=" ")
            print("PASS" if f.throughput >= 2 * fifo_tp else "FAIL")
        print(
            f"goal: no model's p95 wait to start > 3x the mean wait to start (affinity): "
            f"{f.worst_p95:.2f} s vs 3 x {f.mean:.2f} s",
            "PASS" if f.worst_p95 <= 3 * f.mean else "FAIL",
        )
    if series_s:
        print(f"mean wait to start by arrival time ({series_s:g} s bins, warm-up included):")
        for r in results:
            bins: dict[int, list[float]] = {}
            for s in r.started:
                bins.setdefault(int(s.arrival // series_s), []).append(s.start_wait)
            cells = " ".join(f"{statistics.fmean(bins[k]):.1f}" for k in sorted(bins))
            print(f"  {r.name}: {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--slots", type=int, default=3, help="models a worker holds at once")
    parser.add_argument("--jobs", type=int, default=150_000)
    parser.add_argument("--load", type=float, default=0.8, help="offered load, x workers/job_s")
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    parser.add_argument("--load-s", type=float, default=12.0, help="seconds to load a model")
    parser.add_argument("--step-s", type=float, default=0.125, help="seconds per step")
    parser.add_argument("--steps", type=int, default=8, help="steps per job")
    parser.add_argument("--tick", type=float, default=0.02, help="dispatch coalescing, s")
    parser.add_argument(
        "--window", type=int, default=WAITING_WINDOW, help="waiting jobs a call sees"
    )
    parser.add_argument("--ramp", type=float, default=60, help="s of growing traffic first")
    parser.add_argument("--warmup", type=float, default=150, help="s not measured")
    parser.add_argument(
        "--shift", type=float, default=0, help="reverse the popularity at this time (s)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--series", type=float, default=0, help="print mean waits per N s")
    parser.add_argument(
        "--dispatchers", default="fifo,ray-serve,affinity", help="comma-separated subset"
    )
    args = parser.parse_args()
    cfg = Config(
        workers=args.workers,
        models=args.models,
        slots=args.slots,
        jobs=args.jobs,
        load=args.load,
        zipf=args.zipf,
        load_s=args.load_s,
        step_s=args.step_s,
        steps=args.steps,
        tick_s=args.tick,
        window=args.window,
        ramp_s=args.ramp,
        warmup_s=args.warmup,
        shift_s=args.shift,
        seed=args.seed,
    )
    dispatchers: dict[str, Dispatcher] = {
        "fifo": fifo,
        "ray-serve": ray_serve,
        "affinity": affinity(cfg),
    }
    trace = make_trace(cfg)
    if trace[-1].arrival <= cfg.warmup_s:
        parser.error(
            f"the last job arrives at {trace[-1].arrival:.0f} s, before --warmup "
            f"{cfg.warmup_s:g} s ends: raise --jobs or lower --warmup"
        )
    results = []
    for name in args.dispatchers.split(","):
        began = time.perf_counter()
        results.append(simulate(name, dispatchers[name], trace, cfg))
        print(f"  {name}: simulated in {time.perf_counter() - began:.1f} s", flush=True)
    report(results, cfg, series_s=args.series)


if __name__ == "__main__":
    main()
