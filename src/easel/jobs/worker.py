"""Workers: one thread per device that claims jobs, runs the generator, stores the images and
publishes events. One pipeline call at a time per worker, so a pipeline never serves two calls
at once; a call may serve several compatible jobs (dynamic batching: ``max_batch``), each with
its own events, images and cancel.

    worker = Worker("cpu-0", "cpu", db=db, queue=queue, images=images, events=events,
                    generator=engine)
    worker.start()          # thread: claim -> generate -> store -> publish, until stop()
    worker.run_once()       # or one job in the calling thread (tests, benchmarks)
"""

from __future__ import annotations

import base64
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

from PIL import Image

from easel.domain import (
    TASK_SPECS,
    CancelCheck,
    Canceled,
    EaselError,
    GenerationParams,
    GenerationRequest,
    GenerationResult,
    ImageRecord,
    InputImages,
    JobRecord,
    JobStatus,
    LoraRecord,
    Progress,
    ProgressCallback,
    TrainProgress,
    TrainSamples,
    WorkerLost,
    WorkerState,
    WorkerStatus,
    batch_key,
)
from easel.engine.metadata import to_png_bytes
from easel.imaging import png_bytes
from easel.jobs.db import Database
from easel.jobs.disk import is_storage_error, storage_failure
from easel.jobs.events import EventBus, EventType
from easel.jobs.images import ImageStore
from easel.jobs.metrics import Metrics
from easel.jobs.queue import JobQueue

log = logging.getLogger(__name__)

PREVIEW_SIZE = 128  # longest side of preview images sent with progress events
IDLE_POLL_S = 0.5  # how long an idle worker sleeps when nobody wakes it
TRAIN_EVENT_EVERY_S = 0.5  # training steps can come faster than anyone reads them
RECORD_RETRY_S = (0.1, 5.0)  # first and longest wait between tries to record a job's end
BATCH_POLL_S = 0.005  # how often a worker looks for compatible jobs within its batch window
END_EVENTS: dict[JobStatus, EventType] = {  # a run's last event, by the job's status after it
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "canceled",
    JobStatus.QUEUED: "requeued",
}


class Generator(Protocol):
    """What a worker runs: the real :class:`easel.engine.generate.Engine`, or a stand-in."""

    def generate(
        self,
        params: GenerationParams,
        *,
        inputs: InputImages | None = None,
        on_progress: ProgressCallback | None = None,
        is_canceled: CancelCheck | None = None,
    ) -> GenerationResult: ...


class BatchGenerator(Generator, Protocol):
    """A generator that also makes several jobs' images in shared pipeline calls (the Engine;
    a worker batches only with one of these)."""

    def generate_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | Exception]: ...


class Trainer(Protocol):
    """What a worker runs for training tasks: :class:`easel.training.job.LoraTrainer`."""

    def train(
        self,
        job_id: str,
        params: GenerationParams,
        *,
        owner: str | None,
        on_progress: Callable[[TrainProgress], None],
        on_samples: Callable[[TrainSamples], None],
        is_canceled: CancelCheck,
    ) -> LoraRecord: ...


def preview_data_url(image: Image.Image) -> str:
    """A small JPEG of ``image`` as a ``data:`` URL (a few kB), for progress events."""
    small = image.convert("RGB")
    small.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Worker:
    """Runs jobs from ``queue`` on one device with one generator."""

    def __init__(
        self,
        name: str,
        device: str,
        *,
        db: Database,
        queue: JobQueue,
        images: ImageStore,
        events: EventBus,
        generator: Generator,
        trainer: Trainer | None = None,
        wakeup: threading.Event | None = None,
        claim: Callable[[], JobRecord | None] | None = None,
        after_job: Callable[[JobRecord], None] | None = None,
        metrics: Metrics | None = None,
        max_batch: int = 1,
        batch_window_s: float = 0.0,
    ) -> None:
        """``claim`` takes the next job (default: the queue's next; a dispatcher gives its own
        choice), ``after_job`` is called when a claimed job's run is over, however it ended;
        ``metrics`` gets each job's queue wait and duration. A generation job takes compatible
        queued jobs along, up to ``max_batch`` images in all, waiting up to ``batch_window_s``
        for them (only with a generator that has ``generate_batch``)."""
        self.name = name
        self.device = device
        self.db = db
        self.queue = queue
        self.images = images
        self.events = events
        self.generator = generator
        self.trainer = trainer
        self.wakeup = wakeup or threading.Event()
        self._claim = claim or queue.claim
        self._after_job = after_job
        self.max_batch = max_batch if hasattr(generator, "generate_batch") else 1
        self.batch_window_s = batch_window_s
        self._stopping = threading.Event()  # no new claims
        self._abort = threading.Event()  # stop the running job and requeue it
        self._thread: threading.Thread | None = None
        self.metrics = metrics
        # what status() reports; written by the worker's thread, read by request threads
        self._status_lock = threading.Lock()
        self._up_since = time.monotonic()
        self._running: dict[str, tuple[JobRecord, float]] = {}  # id -> (job, monotonic start)
        self._busy_since: float | None = None  # monotonic, while _running is not empty
        self._busy_s = 0.0  # before _busy_since
        self._jobs_done = 0

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"easel-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout_s: float) -> None:
        """Drain: claim nothing new, give the running job ``drain_timeout_s`` to finish, then
        stop it at its next step and put it back in the queue (nothing accepted is lost).
        Returns after at most twice ``drain_timeout_s``."""
        self._stopping.set()
        self.wakeup.set()
        if self._thread is None:
            return
        self._thread.join(drain_timeout_s)
        if self._thread.is_alive():
            self._abort.set()
            # a model load has no steps to stop at; past a second timeout the job stays
            # `running` in the database and the next start requeues it (one more attempt)
            self._thread.join(drain_timeout_s)
        if self._thread.is_alive():
            log.warning("worker %s: the running job did not stop; it will be requeued", self.name)

    def status(self) -> WorkerStatus:
        """This worker now: its state, current job, jobs done, busy and up time, and what its
        generator holds (``generator.describe()``: node, pid, loaded models, loads; without
        one, this process and no models). Safe to call from any thread."""
        now = time.monotonic()
        with self._status_lock:
            current = next(iter(self._running.values()), None)
            since = self._busy_since
            busy_s = self._busy_s + (now - since if since is not None else 0.0)
            jobs_done = self._jobs_done
        info: dict[str, Any] = {}
        describe = getattr(self.generator, "describe", None)
        if callable(describe):
            try:
                info = describe()
            except Exception:  # a status read must not fail with its generator
                log.exception("worker %s: its generator could not describe itself", self.name)
        job = current[0] if current is not None else None
        return WorkerStatus(
            id=self.name,
            node=str(info.get("node") or socket.gethostname()),
            device=self.device,
            pid=int(info.get("pid") or os.getpid()),
            state=self._state(busy=job is not None),
            models=list(info.get("models", [])),
            job=job.id if job is not None else None,
            job_owner=job.owner if job is not None else None,
            jobs_done=jobs_done,
            busy_s=busy_s,
            up_s=now - self._up_since,
            loads=dict(info.get("loads", {})),
            load_seconds=dict(info.get("load_seconds", {})),
        )

    def _state(self, *, busy: bool) -> WorkerState:
        thread = self._thread
        if thread is not None and not thread.is_alive():  # its loop ended
            return "stopped" if self._stopping.is_set() else "dead"
        if self._stopping.is_set():
            return "stopping" if thread is not None or busy else "stopped"
        return "busy" if busy else "idle"

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                busy = self.run_once()
            except Exception as exc:  # the claim failed (a full disk, an unreadable database)
                if is_storage_error(exc):  # no job is taken: it waits in the queue
                    log.warning("worker %s: could not claim a job: %s", self.name, exc)
                else:
                    log.exception("worker %s: could not claim a job", self.name)
                busy = False
            if not busy:
                self.wakeup.wait(IDLE_POLL_S)
                self.wakeup.clear()

    # --- one job --------------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue had none (or the worker is stopping)."""
        # 1. claim the next job atomically
        job = None if self._stopping.is_set() else self._claim()
        if job is None:
            return False
        # 2. compatible queued jobs join it (generations only), up to max_batch images
        jobs = [job, *self._batch_for(job)]
        for each in jobs:
            self._job_began(each)
        try:
            if len(jobs) == 1:
                self._run(job)
            else:
                self._run_batch(jobs)
        except Exception:  # a bug, not a fault of the store (those are retried in _record)
            log.exception(
                "worker %s: job %s: its outcome could not be recorded; it stays running "
                "until the server restarts (then it is requeued)",
                self.name,
                job.id,
            )
        finally:
            for each in jobs:
                self._job_left(each)
                if self._after_job is not None:
                    self._after_job(each)
        return True

    def _batch_for(self, job: JobRecord) -> list[JobRecord]:
        """Queued jobs that may share ``job``'s pipeline calls (``queue.claim_compatible``:
        the front of the queue only), claimed, up to ``max_batch`` images with ``job``'s:
        those waiting now, and those that arrive within ``batch_window_s``."""
        room = self.max_batch - job.params.num_images
        if room <= 0 or batch_key(job.params) is None:
            return []
        found: list[JobRecord] = []
        deadline = time.monotonic() + self.batch_window_s
        try:
            while True:
                more = self.queue.claim_compatible(job, room)
                found += more
                room -= sum(j.params.num_images for j in more)
                left = deadline - time.monotonic()
                if room <= 0 or left <= 0 or self._stopping.wait(min(BATCH_POLL_S, left)):
                    return found
        except Exception as exc:  # the store failed: go with what was claimed
            log.warning("worker %s: could not look for jobs to batch: %s", self.name, exc)
            return found

    def _job_began(self, job: JobRecord) -> None:
        """Bookkeeping for status() and metrics: ``job`` was claimed and runs here now."""
        now = time.monotonic()
        with self._status_lock:
            self._running[job.id] = (job, now)
            if self._busy_since is None:
                self._busy_since = now
        if self.metrics is not None:
            self.metrics.observe_start(job)

    def _job_left(self, job: JobRecord) -> None:
        """``job``'s run here is over, however it ended."""
        now = time.monotonic()
        with self._status_lock:
            if self._running.pop(job.id, None) is None:
                return
            self._jobs_done += 1
            if not self._running and self._busy_since is not None:
                self._busy_s += now - self._busy_since
                self._busy_since = None

    def _job_ended(self, job: JobRecord, status: JobStatus) -> None:
        """``job``'s end was recorded with ``status``: its duration, for the metrics."""
        with self._status_lock:
            began = self._running.get(job.id)
        if self.metrics is not None and began is not None:
            self.metrics.observe_end(job, END_EVENTS[status], time.monotonic() - began[1])

    def _run(self, job: JobRecord) -> None:
        if TASK_SPECS[job.params.task].kind != "train":
            self._run_batch([job])  # a generation: the batch of one
            return
        try:
            # 3. announce it
            self.events.publish(job.id, "started", {"attempt": job.attempts, "worker": self.name})
            # 4. run the task, reporting steps and honouring cancel
            outcome: tuple[dict[str, object], float | None] | Exception = self._train(job)
        except Exception as exc:
            outcome = exc
        self._conclude(job, outcome)

    def _run_batch(self, jobs: list[JobRecord]) -> None:
        """Generation jobs in shared pipeline calls: each announced, each with its own
        progress, previews and cancel, each ended as soon as its own images are stored (or it
        was canceled, or failed) while the others go on."""
        started = time.perf_counter()
        requests = []
        for job in jobs:
            try:
                # 3. announce it and read its input images
                data = {"attempt": job.attempts, "worker": self.name, "batch": len(jobs)}
                self.events.publish(job.id, "started", data)
                inputs = self._inputs(job.params)
            except Exception as exc:
                self._conclude(job, exc)
                continue
            requests.append(
                GenerationRequest(
                    job.params,
                    inputs,
                    on_progress=partial(self._report_progress, job),
                    is_canceled=partial(self._should_stop, job),
                    on_end=partial(self._generated, job, started),
                )
            )
        # 4. generate, reporting steps and honouring each job's cancel
        if not requests:
            return
        batch = getattr(self.generator, "generate_batch", None)
        if batch is not None:
            batch(requests)
            return
        for request in requests:  # a generator that makes one request at a time
            try:
                result: GenerationResult | Exception = self.generator.generate(
                    request.params,
                    inputs=request.inputs,
                    on_progress=request.on_progress,
                    is_canceled=request.is_canceled,
                )
            except Exception as exc:
                result = exc
            assert request.on_end is not None
            request.on_end(result)

    def _generated(
        self, job: JobRecord, started: float, outcome: GenerationResult | Exception
    ) -> None:
        """The generator's word on ``job``: store its images and record its end (while the
        rest of its batch may still run: nothing may escape)."""
        ended: tuple[dict[str, object], float | None] | Exception
        if isinstance(outcome, GenerationResult):
            try:
                ended = self._store(job, outcome, time.perf_counter() - started)
            except Exception as exc:  # its images could not be stored
                ended = exc
        else:
            ended = outcome
        try:
            self._conclude(job, ended)
        except Exception:  # a bug, not a fault of the store (those are retried in _record)
            log.exception(
                "worker %s: job %s: its outcome could not be recorded; it stays running "
                "until the server restarts (then it is requeued)",
                self.name,
                job.id,
            )

    def _conclude(
        self, job: JobRecord, outcome: tuple[dict[str, object], float | None] | Exception
    ) -> None:
        """Record how ``job``'s run ended: ``outcome`` is its final event's data with the
        seconds that go into the speed estimates (None: none do), or what stopped it."""
        if isinstance(outcome, Canceled):
            self._stop_canceled(job)
            return
        if isinstance(outcome, WorkerLost):  # the process running it died: another takes it
            log.warning("worker %s: job %s: %s; back to the queue", self.name, job.id, outcome)
            self._end(job, JobStatus.QUEUED, {"reason": f"worker lost: {outcome}"})
            return
        if isinstance(outcome, EaselError):
            self._fail(job, outcome.message)
            return
        if isinstance(outcome, Exception):  # a worker survives any one job; the log keeps it
            if reason := storage_failure(outcome):  # the store failed, not the job
                log.warning("job %s failed: could not store its work: %s", job.id, outcome)
                self._fail(job, f"could not store the job's work: {reason}")
            else:
                log.error("job %s failed", job.id, exc_info=outcome)
                self._fail(job, f"internal error: {type(outcome).__name__}: {outcome}")
            return
        data, seconds = outcome
        # 5. finish: status and the final event, then speed for ETAs (of generations)
        self._end(job, JobStatus.SUCCEEDED, data)
        if seconds is not None:
            try:
                self.queue.record_speed(job, self.device, seconds)
            except Exception as exc:  # only ETAs suffer; the job is recorded
                if not is_storage_error(exc):
                    raise
                log.warning("job %s: could not record its speed: %s", job.id, exc)

    def _should_stop(self, job: JobRecord) -> bool:
        return self._abort.is_set() or self.queue.cancel_requested(job.id)

    def _store(
        self, job: JobRecord, result: GenerationResult, seconds: float
    ) -> tuple[dict[str, object], float | None]:
        """Store a generation's images with their metadata; returns the final event's data
        (``seconds``: since its batch started) and the seconds its speed estimate gets: its
        share of a batch's compute (``compute_seconds``), or all of ``seconds``."""
        stored = [
            self.images.save(
                job_id=job.id,
                index=i,
                seed=seed,
                png=to_png_bytes(image, result.params, index=i),
                width=image.width,
                height=image.height,
                prompt=result.params.prompt,
            )
            for i, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True))
        ]
        images = [{"id": r.id, "url": f"/api/v1/images/{r.id}", "seed": r.seed} for r in stored]
        share = result.compute_seconds if result.compute_seconds is not None else seconds
        return {"images": images, "seconds": round(seconds, 3)}, share

    def _train(self, job: JobRecord) -> tuple[dict[str, object], float | None]:
        """A training job: progress events with loss, learning rate and ETA; sample images
        stored as the job's images as they come; the LoRA published at the end. Returns the
        final event's data (and no speed: the queue's ETAs are for denoising)."""
        started = time.perf_counter()
        last_event = 0.0

        def on_progress(progress: TrainProgress) -> None:
            nonlocal last_event
            self.queue.set_progress(job.id, progress.step, progress.total)
            now = time.monotonic()
            if now - last_event < TRAIN_EVENT_EVERY_S and progress.step < progress.total:
                return
            last_event = now
            data: dict[str, object] = {
                "step": progress.step,
                "total": progress.total,
                "loss": round(progress.loss, 6),
                "lr": progress.lr,
            }
            if progress.eta_s is not None:
                data["eta_seconds"] = round(progress.eta_s, 1)
            self.events.publish(job.id, "progress", data)

        def on_samples(batch: TrainSamples) -> None:
            stored = [
                self.images.save(
                    job_id=job.id,
                    index=batch.step * 10 + i,  # the same ids when a resumed run redoes a step
                    seed=None,
                    png=png_bytes(image),
                    width=image.width,
                    height=image.height,
                    prompt=prompt,
                    kind="sample",
                )
                for i, (image, prompt) in enumerate(zip(batch.images, batch.prompts, strict=True))
            ]
            data: dict[str, object] = {
                "step": batch.step,
                "samples": [_sample_ref(r) for r in stored],
            }
            if batch.heldout_loss is not None:
                data["heldout_loss"] = round(batch.heldout_loss, 6)
            self.events.publish(job.id, "progress", data)

        if self.trainer is None:
            raise EaselError("this worker cannot train (no trainer configured)")
        lora = self.trainer.train(
            job.id,
            job.params,
            owner=job.owner,
            on_progress=on_progress,
            on_samples=on_samples,
            is_canceled=lambda: self._should_stop(job),
        )
        # every sample of the job, those of a run before a restart too
        samples = [_sample_ref(r) for r in self.queue.get(job.id).images]
        return {
            "images": samples,
            "lora": {"id": lora.id, "url": f"/api/v1/loras/{lora.id}", "steps": lora.steps},
            "seconds": round(time.perf_counter() - started, 3),
        }, None

    def _inputs(self, params: GenerationParams) -> InputImages:
        names = TASK_SPECS[params.task].image_fields
        ids = {name: getattr(params, name) for name in names if getattr(params, name)}
        return InputImages(**{name: self.images.load(i) for name, i in ids.items()})

    def _report_progress(self, job: JobRecord, progress: Progress) -> None:
        self.queue.set_progress(job.id, progress.step, progress.total)
        data: dict[str, object] = {"step": progress.step, "total": progress.total}
        if progress.preview is not None:
            data["preview"] = preview_data_url(progress.preview)
        self.events.publish(job.id, "progress", data)

    def _stop_canceled(self, job: JobRecord) -> None:
        if self.queue.cancel_requested(job.id):
            self._end(job, JobStatus.CANCELED, {"while": "running"})
        else:  # aborted by a drain: back to the queue, it will run again after the restart
            self._end(job, JobStatus.QUEUED, {"reason": "server stopping"})

    def _fail(self, job: JobRecord, message: str) -> None:
        self._end(job, JobStatus.FAILED, {"error": message}, error=message)

    def _end(
        self,
        job: JobRecord,
        status: JobStatus,
        data: dict[str, object],
        error: str | None = None,
    ) -> None:
        """Record how the run ended, retrying while the store fails (a full disk, an I/O
        error): a job is never left ``running`` with nobody recording it. Meanwhile this
        worker takes no other job; a drain that gives up (``stop``) leaves the job to the
        start-up recovery, which requeues it."""
        delay = RECORD_RETRY_S[0]
        while True:
            try:
                ended = self._record(job, status, data, error)
                if ended is not None:
                    self._job_ended(job, ended.status)
                return
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                log.warning(
                    "worker %s: job %s: could not record its end (%s): %s; retrying in %.1f s",
                    self.name,
                    job.id,
                    status,
                    exc,
                    delay,
                )
            if self._abort.wait(delay):  # stopping: the next start requeues it
                log.warning(
                    "worker %s: job %s is left for the start-up recovery", self.name, job.id
                )
                return
            delay = min(delay * 2, RECORD_RETRY_S[1])

    def _record(
        self,
        job: JobRecord,
        status: JobStatus,
        data: dict[str, object],
        error: str | None = None,
    ) -> JobRecord | None:
        """The job's status and its last event in one transaction, so a crash can never leave
        a final job without its final event (SSE clients wait for it). A failed job's images
        (some of a batch) and the previews of its progress events are dropped first: whoever
        sees this event finds them gone. Returns the ended job (None: it was not running here)."""
        if status is JobStatus.FAILED:
            self.images.discard(job.id)
        with self.db.transaction():
            ended = self.queue.finish(job.id, status, error)
            if ended is None:
                log.warning("job %s is no longer running here; its outcome is dropped", job.id)
                return None
            if ended.status is not status:  # put back once too often: failed instead
                data = {"error": ended.error}
            self.events.drop_previews(job.id)
            self.events.publish(job.id, END_EVENTS[ended.status], data)
        return ended


def _sample_ref(image: ImageRecord) -> dict[str, object]:
    """How events name a training sample: its id, URL and prompt."""
    return {"id": image.id, "url": f"/api/v1/images/{image.id}", "prompt": image.prompt}
