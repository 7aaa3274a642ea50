"""Workers: one thread per device that claims jobs, runs the generator, stores the images and
publishes events. One job at a time per worker, so a pipeline never serves two calls at once.

    worker = Worker("cpu-0", "cpu", db=db, queue=queue, images=images, events=events,
                    generator=engine)
    worker.start()          # thread: claim -> generate -> store -> publish, until stop()
    worker.run_once()       # or one job in the calling thread (tests, benchmarks)
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from PIL import Image

from easel.domain import (
    TASK_SPECS,
    CancelCheck,
    Canceled,
    EaselError,
    GenerationParams,
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
)
from easel.engine.metadata import to_png_bytes
from easel.imaging import png_bytes
from easel.jobs.db import Database
from easel.jobs.disk import is_storage_error, storage_failure
from easel.jobs.events import EventBus, EventType
from easel.jobs.images import ImageStore
from easel.jobs.queue import JobQueue

log = logging.getLogger(__name__)

PREVIEW_SIZE = 128  # longest side of preview images sent with progress events
IDLE_POLL_S = 0.5  # how long an idle worker sleeps when nobody wakes it
TRAIN_EVENT_EVERY_S = 0.5  # training steps can come faster than anyone reads them
RECORD_RETRY_S = (0.1, 5.0)  # first and longest wait between tries to record a job's end
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
    ) -> None:
        self.name = name
        self.device = device
        self.db = db
        self.queue = queue
        self.images = images
        self.events = events
        self.generator = generator
        self.trainer = trainer
        self.wakeup = wakeup or threading.Event()
        self._stopping = threading.Event()  # no new claims
        self._abort = threading.Event()  # stop the running job and requeue it
        self._thread: threading.Thread | None = None

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
        job = None if self._stopping.is_set() else self.queue.claim()
        if job is None:
            return False
        try:
            self._run(job)
        except Exception:  # a bug, not a fault of the store (those are retried in _record)
            log.exception(
                "worker %s: job %s: its outcome could not be recorded; it stays running "
                "until the server restarts (then it is requeued)",
                self.name,
                job.id,
            )
        return True

    def _run(self, job: JobRecord) -> None:
        run = self._train if TASK_SPECS[job.params.task].kind == "train" else self._generate
        try:
            # 2. announce it
            self.events.publish(job.id, "started", {"attempt": job.attempts, "worker": self.name})
            # 3. run the task, reporting steps and honouring cancel
            data, seconds = run(job)
        except Canceled:
            self._stop_canceled(job)
            return
        except EaselError as exc:
            self._fail(job, exc.message)
            return
        except Exception as exc:  # a worker survives any one job; the log keeps the traceback
            if reason := storage_failure(exc):  # the store failed, not the job
                log.warning("job %s failed: could not store its work: %s", job.id, exc)
                self._fail(job, f"could not store the job's work: {reason}")
            else:
                log.exception("job %s failed", job.id)
                self._fail(job, f"internal error: {type(exc).__name__}: {exc}")
            return
        # 4. finish: status and the final event, then speed for ETAs (of generations)
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

    def _generate(self, job: JobRecord) -> tuple[dict[str, object], float | None]:
        """Read the input images, generate, store the images with their metadata; returns the
        final event's data and the seconds the generation took."""
        started = time.perf_counter()
        result = self.generator.generate(
            job.params,
            inputs=self._inputs(job.params),
            on_progress=lambda progress: self._report_progress(job, progress),
            is_canceled=lambda: self._should_stop(job),
        )
        seconds = time.perf_counter() - started
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
        return {"images": images, "seconds": round(seconds, 3)}, seconds

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
                self._record(job, status, data, error)
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
    ) -> None:
        """The job's status and its last event in one transaction, so a crash can never leave
        a final job without its final event (SSE clients wait for it). A failed job's images
        (some of a batch) and the previews of its progress events are dropped first: whoever
        sees this event finds them gone."""
        if status is JobStatus.FAILED:
            self.images.discard(job.id)
        with self.db.transaction():
            ended = self.queue.finish(job.id, status, error)
            if ended is None:
                log.warning("job %s is no longer running here; its outcome is dropped", job.id)
                return
            if ended.status is not status:  # put back once too often: failed instead
                data = {"error": ended.error}
            self.events.drop_previews(job.id)
            self.events.publish(job.id, END_EVENTS[ended.status], data)


def _sample_ref(image: ImageRecord) -> dict[str, object]:
    """How events name a training sample: its id, URL and prompt."""
    return {"id": image.id, "url": f"/api/v1/images/{image.id}", "prompt": image.prompt}
