"""Prometheus metrics: job durations and queue waits as histograms, observed when they happen;
queue depth and the workers' state, read from the queue and the workers at scrape time.

    metrics = Metrics()
    metrics.watch(queue_counts=queue.counts, worker_statuses=services.worker_statuses)
    metrics.observe_start(job)                     # the worker, right after its claim
    metrics.observe_end(job, "succeeded", 2.5)     # the worker, once the job's end is recorded
    metrics.render()                               # b"# HELP easel_job_duration_seconds ..."

Each ``Metrics`` owns its registry (not ``prometheus_client``'s global one): a process may
build many apps (tests do), and each app's ``/metrics`` shows its own server only.

What is exported (``worker`` is the worker's id, e.g. ``cpu-0``):

- ``easel_job_duration_seconds{model,task,status}`` histogram: claim to recorded end; status is
  the job's last event (``succeeded``, ``failed``, ``canceled``, ``requeued``).
- ``easel_queue_wait_seconds{model,task}`` histogram: submitted to started (a retried job's
  wait counts from its submission).
- ``easel_queue_jobs{state}`` gauge: jobs by status (queued, running, succeeded, ...).
- ``easel_worker_up{worker}`` gauge: 1 while it takes jobs (idle or busy), else 0.
- ``easel_worker_state{worker,state}`` gauge: 1 for the worker's state, 0 for the others.
- ``easel_worker_info{worker,node,device,pid}`` gauge, always 1.
- ``easel_worker_busy_ratio{worker}`` gauge: busy seconds over up seconds since it started.
- ``easel_worker_busy_seconds_total{worker}`` counter (``rate()`` of it: the recent ratio).
- ``easel_worker_jobs_total{worker}`` counter: jobs the worker ended, in any status.
- ``easel_worker_models_loaded{worker}`` gauge: models in its memory now.
- ``easel_model_loads_total{worker,model}`` and ``easel_model_load_seconds_total{worker,model}``
  counters: loads from disk and the seconds they took.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from easel.domain import WORKER_STATES, JobRecord, WorkerStatus

log = logging.getLogger(__name__)

# `text/plain; version=0.0.4`: the classic text format, which every Prometheus reads
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# from a stand-in's 50 ms job to an hour-long fine-tune or a wait behind one
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

UP_STATES = ("idle", "busy")  # easel_worker_up is 1 in these

QueueCounts = Callable[[], Mapping[str, int]]
WorkerStatuses = Callable[[], list[WorkerStatus]]


class Metrics:
    """The server's metrics in its own registry; :meth:`render` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.job_duration = Histogram(
            "easel_job_duration_seconds",
            "Seconds from a job's start (its claim by a worker) to its recorded end.",
            ("model", "task", "status"),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "easel_queue_wait_seconds",
            "Seconds from a job's submission to its start.",
            ("model", "task"),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._live = _LiveCollector()
        self.registry.register(self._live)

    def watch(self, *, queue_counts: QueueCounts, worker_statuses: WorkerStatuses) -> None:
        """Where scrape-time values come from: jobs by status, and every worker's status."""
        self._live.queue_counts = queue_counts
        self._live.worker_statuses = worker_statuses

    def observe_start(self, job: JobRecord) -> None:
        """A worker started ``job`` (as claimed: ``started_at`` set): its wait in the queue."""
        if job.started_at is None:
            return
        wait = (job.started_at - job.created_at).total_seconds()
        self.queue_wait.labels(job.model, job.task).observe(max(wait, 0.0))

    def observe_end(self, job: JobRecord, status: str, seconds: float) -> None:
        """``job``'s run ended with ``status`` (its last event's name) after ``seconds``."""
        self.job_duration.labels(job.model, job.task, status).observe(max(seconds, 0.0))

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Reads the queue's counts and the workers' statuses at each scrape."""

    def __init__(self) -> None:
        self.queue_counts: QueueCounts | None = None
        self.worker_statuses: WorkerStatuses | None = None

    def describe(self) -> Iterator[Metric]:
        # the names, without reading anything (the registry checks names for duplicates)
        yield from _families().values()

    def collect(self) -> Iterator[Metric]:
        f = _families()
        if self.queue_counts is not None:
            for name, count in sorted(self.queue_counts().items()):
                f["queue"].add_metric([name], count)
        for status in self.worker_statuses() if self.worker_statuses is not None else []:
            w = status.id
            f["info"].add_metric([w, status.node, status.device, str(status.pid)], 1)
            f["up"].add_metric([w], 1 if status.state in UP_STATES else 0)
            for name in WORKER_STATES:
                f["state"].add_metric([w, name], 1 if status.state == name else 0)
            f["busy_ratio"].add_metric([w], status.busy_ratio)
            f["busy_seconds"].add_metric([w], status.busy_s)
            f["jobs"].add_metric([w], status.jobs_done)
            f["models"].add_metric([w], len(status.models))
            for model in sorted(status.loads):
                f["loads"].add_metric([w, model], status.loads[model])
                f["load_seconds"].add_metric([w, model], status.load_seconds.get(model, 0.0))
        yield from f.values()


def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
    """The scrape-time metrics, empty (``collect`` fills them)."""
    worker = ["worker"]
    return {
        "queue": GaugeMetricFamily("easel_queue_jobs", "Jobs by status.", labels=["state"]),
        "info": GaugeMetricFamily(
            "easel_worker_info",
            "One per worker (always 1): where it runs.",
            labels=["worker", "node", "device", "pid"],
        ),
        "up": GaugeMetricFamily(
            "easel_worker_up", "1 while the worker takes jobs (idle or busy).", labels=worker
        ),
        "state": GaugeMetricFamily(
            "easel_worker_state",
            "1 for the worker's state (idle, busy, starting, stopping, stopped, dead), else 0.",
            labels=["worker", "state"],
        ),
        "busy_ratio": GaugeMetricFamily(
            "easel_worker_busy_ratio",
            "Share of the worker's up time spent running jobs (0..1).",
            labels=worker,
        ),
        "busy_seconds": CounterMetricFamily(
            "easel_worker_busy_seconds", "Seconds the worker spent running jobs.", labels=worker
        ),
        "jobs": CounterMetricFamily(
            "easel_worker_jobs", "Jobs the worker ended, in any status.", labels=worker
        ),
        "models": GaugeMetricFamily(
            "easel_worker_models_loaded", "Models in the worker's memory.", labels=worker
        ),
        "loads": CounterMetricFamily(
            "easel_model_loads",
            "Loads of a model from disk by a worker.",
            labels=["worker", "model"],
        ),
        "load_seconds": CounterMetricFamily(
            "easel_model_load_seconds",
            "Seconds a worker spent loading a model from disk.",
            labels=["worker", "model"],
        ),
    }
