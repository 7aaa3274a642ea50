"""The one place where Easel's parts are built and wired together.

The API, the web UI and the CLI all call the plain methods of :class:`Services`; none of them
builds a queue, a database or a model manager itself.

    services = build_services(Settings())                 # real engine, one worker per device
    services.start()                                      # recover interrupted jobs, start workers
    job = services.submit_job(GenerationParams(prompt="a red circle"))
    async for event in services.subscribe(job.id): ...    # queued, started, progress, ...
    services.stop()                                       # drain (settings.drain_timeout_s)

Tests and benchmarks pass ``generator=`` (anything with ``Engine.generate``'s signature) to run
without torch.
"""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import os
import re
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import IO, Any, Protocol

from easel.config import Settings
from easel.datasets import Dataset, DatasetLimits, load_dataset, prepare_upload, read_summary
from easel.domain import (
    IMAGE_FIELDS,
    LOCAL,
    TASK_SPECS,
    DatasetNotFound,
    DatasetRecord,
    EaselError,
    Forbidden,
    GenerationParams,
    ImageRecord,
    InvalidParams,
    JobNotFound,
    JobRecord,
    JobStatus,
    KeyRecord,
    LoraNotFound,
    LoraRecord,
    ModelNotAvailable,
    ModelRecord,
    Principal,
    Unauthorized,
    WorkerStatus,
    check_text,
)
from easel.imaging import check_structure, decode_image, pixel_hash, png_bytes
from easel.jobs.db import Database, inspect_database
from easel.jobs.disk import MIB, DiskGuard, DiskStatus
from easel.jobs.events import EventBus, JobEvent
from easel.jobs.images import DiskImageStore, ImageNotFound
from easel.jobs.keys import KeyStore, RateLimiter
from easel.jobs.metrics import Metrics
from easel.jobs.queue import QueueSummary, SqliteJobQueue, utcnow
from easel.jobs.ray_actor import make_engine
from easel.jobs.raypool import RayPool
from easel.jobs.retention import Pruner, RetentionPolicy
from easel.jobs.webhooks import WebhookPolicy, Webhooks, check_url
from easel.jobs.worker import Generator, Trainer, Worker
from easel.models.catalog import ModelCatalog
from easel.models.families import Family, get_family
from easel.models.loras import LoraCatalog, check_text_encoder_family
from easel.models.params import defaults_for, effective_family, resolve_params

PRIORITY_RANGE = (-100, 100)
TRAIN_REQUIRED = ("dataset", "name", "trigger")  # the fields a train_lora job must give
DATASET_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, like an uploaded image's id


def _texts(value: object, where: str) -> Iterator[tuple[str, str]]:
    """Every string in a request field's value, with where it is: ``loras[0].id`` for a value,
    the object's own name for a key (``outpaint``)."""
    if isinstance(value, str):
        yield value, where
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _texts(key, where)
            yield from _texts(item, f"{where}.{key}" if isinstance(key, str) else where)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _texts(item, f"{where}[{index}]")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LoadedModels(Protocol):
    """What Services asks a model manager: which models are in memory now."""

    def loaded(self) -> list[str]: ...


@dataclass
class ModelInfo:
    """A catalog entry as clients see it: merged defaults, the family's limits, loaded or not."""

    record: ModelRecord
    family: Family  # with the entry's limit overrides applied
    defaults: dict[str, Any]
    loaded: bool


@dataclass
class Services:
    """Everything a server needs, wired. Build with :func:`build_services`."""

    settings: Settings
    db: Database
    catalog: ModelCatalog
    loras: LoraCatalog
    queue: SqliteJobQueue
    images: DiskImageStore
    events: EventBus
    workers: list[Worker]
    keys: KeyStore
    disk: DiskGuard
    model_managers: list[LoadedModels] = field(default_factory=list)
    wakeup: threading.Event = field(default_factory=threading.Event)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    pruner: Pruner | None = None  # None: keep everything (settings.keep_*_days are 0)
    webhooks: Webhooks | None = None  # the outbox and its sender (build_services makes one)
    metrics: Metrics = field(default_factory=Metrics)  # the workers observe jobs into it
    pool: RayPool | None = None  # Ray actors for generation jobs (`serve --ray`)
    _home_lock: IO[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # what /metrics reads at each scrape
        self.metrics.watch(queue_counts=self.queue.counts, worker_statuses=self.worker_statuses)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Take EASEL_HOME for this process, requeue (or fail, or cancel) jobs a crash left
        running, then start the workers. Raises EaselError when another server holds EASEL_HOME.
        """
        self.lock_home()
        # each recovered job's new status and its event commit together
        with self.db.transaction():
            for job in self.queue.recover():
                if job.status is JobStatus.FAILED:
                    self.events.publish(job.id, "failed", {"error": job.error})
                elif job.status is JobStatus.CANCELED:
                    self.events.publish(job.id, "canceled", {"while": "running"})
                else:
                    self.events.publish(job.id, "requeued", {"reason": "server restarted"})
        for worker in self.workers:
            worker.start()
        if self.pool is not None:
            self.pool.start()
        if self.pruner is not None:
            self.pruner.start()
        if self.webhooks is not None:
            self.webhooks.start()  # pending deliveries of an earlier run go on

    def stop(self) -> None:
        """:meth:`drain` (if not done yet), end the webhook sender (what it has not sent
        stays in the outbox), then close the database."""
        self.drain()
        if self.webhooks is not None:
            self.webhooks.stop()
            self.webhooks.close()
        self.db.close()
        if self._home_lock is not None:
            self._home_lock.close()  # releases the flock
            self._home_lock = None

    def drain(self) -> None:
        """No new claims; running jobs get ``drain_timeout_s`` to finish, then go back to the
        queue (``requeued``). Event streams stay open meanwhile; end them after with
        ``events.stop_streams()``. Calling it again returns at once."""
        if self.pruner is not None:
            self.pruner.stop()  # first: it ends between batches, before the database closes
        threads = [
            threading.Thread(target=stop, args=(self.settings.drain_timeout_s,))
            for stop in [w.stop for w in self.workers]
            + ([self.pool.stop] if self.pool is not None else [])
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def lock_home(self) -> None:
        """Hold an exclusive lock on ``EASEL_HOME/easel.lock`` while this server runs: a second
        server's recovery would requeue the first one's running jobs and run them twice. The OS
        drops the lock when the process dies, so a crash leaves nothing stale behind. Taking it
        again in the same process is a no-op (``serve`` takes it before uvicorn starts, so the
        refusal is a one-line error rather than a failed lifespan)."""
        if self._home_lock is not None:
            return
        home = self.settings.home
        handle = (home / "easel.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise EaselError(
                f"another Easel server is using EASEL_HOME={home}; stop it, or set EASEL_HOME "
                "to another folder"
            ) from None
        self._home_lock = handle

    # --- keys and who asks ----------------------------------------------------------------------

    def keys_required(self) -> bool:
        """True once an API key was made (revoked ones count: revoking the last key must not
        turn the server keyless, open to anyone): then every request but health needs one."""
        return self.keys.any_made()

    def keyless_principal(self) -> Principal:
        """Who a request acts for on a server without keys: the local user, who may name model
        paths only while the server stays on loopback."""
        return replace(LOCAL, may_name_paths=is_loopback(self.settings.host))

    def authenticate(self, secret: str | None) -> Principal:
        """The principal for a request's API key (Bearer, or Basic's password), counted
        against its rate. Raises Unauthorized (401) without a valid key once keys exist,
        QuotaExceeded (429) past the key's requests per minute."""
        record = self.keys.authenticate(secret) if secret else None
        if record is not None:  # one read for the usual request: a valid key
            return self._admit(record)
        if not self.keys_required():
            return self.keyless_principal()
        raise Unauthorized(
            "an API key is required: send `Authorization: Bearer KEY` (make one with "
            "`easel keys create NAME`)"
            if not secret
            else "the API key is not valid (unknown or revoked)",
            field="authorization",
        )

    def session_principal(self, token: str | None, *, count: bool = True) -> Principal | None:
        """The principal of a web UI session cookie, or None when the token is not a live
        session of an active key. ``count``: the request counts against the key's rate (the
        page's own scripts, styles and heartbeats do not: one page load is ~120 of them)."""
        record = self.keys.session_key(token) if token else None
        if record is None:
            return None
        return self._admit(record) if count else record.principal()

    def principal_for(self, key_id: str) -> Principal:
        """The principal of an authenticated key id (the web UI's user name); the keyless one
        for "local" on a server without keys. Raises Unauthorized for a key now revoked."""
        if key_id == LOCAL.name and not self.keys_required():
            return self.keyless_principal()
        try:
            record = self.keys.get(key_id)
        except InvalidParams:
            record = None
        if record is None or record.revoked_at is not None:
            raise Unauthorized("this key was revoked; sign in again", field="authorization")
        return record.principal()

    def start_session(self, secret: str) -> str:
        """A web UI session for a valid key: the token its cookie holds."""
        record = self.keys.authenticate(secret)
        if record is None:
            raise Unauthorized("the API key is not valid (unknown or revoked)", field="key")
        return self.keys.start_session(record.id, days=self.settings.session_days)

    def end_session(self, token: str) -> None:
        self.keys.end_session(token)

    def _admit(self, record: KeyRecord) -> Principal:
        self.limiter.admit(record.id, record.rate_per_minute)
        return record.principal()

    def create_key(
        self,
        name: str,
        *,
        scopes: tuple[str, ...] = ("generate",),
        rate_per_minute: int | None = None,
        max_jobs: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new API key and its secret, shown once."""
        return self.keys.create(
            name, scopes=scopes, rate_per_minute=rate_per_minute, max_jobs=max_jobs
        )

    def list_keys(self, *, revoked: bool = False) -> list[KeyRecord]:
        return self.keys.list(revoked=revoked)

    def revoke_key(self, name: str) -> KeyRecord:
        return self.keys.revoke(name)

    @staticmethod
    def require(principal: Principal, scope: str) -> None:
        """Raise Forbidden (403) unless ``principal`` has ``scope`` (admin has every scope)."""
        if not principal.can(scope):
            raise Forbidden(
                f"this key lacks the {scope!r} scope (it has: {', '.join(sorted(principal.scopes))})",
                field="authorization",
            )

    # --- jobs -----------------------------------------------------------------------------------

    def submit_job(
        self,
        params: GenerationParams,
        *,
        priority: int = 0,
        principal: Principal = LOCAL,
        webhook: str | None = None,
    ) -> JobRecord:
        """Validate ``params`` against the model (no model load) and queue a job owned by
        ``principal``'s key; ``webhook``: a URL the job is POSTed to when it ends (hosts in
        ``settings.webhook_hosts`` only; see easel.jobs.webhooks).

        Raises Forbidden (403: a task outside the key's scopes), ModelNotFound (404),
        ModelNotAvailable (409), InvalidParams (422, names the field), QueueFull or
        QuotaExceeded (429); nothing is stored for a rejected request. Input images, datasets
        and LoRAs of other keys are unknown to it (as if they did not exist).
        """
        # 1. check what does not need the model
        spec = TASK_SPECS.get(params.task)
        self.require(
            principal, "train" if spec is not None and spec.kind == "train" else "generate"
        )
        self._check_limits(params, priority)
        if webhook is not None:
            webhook = check_url(webhook, self._webhook_policy())
        # 2. resolve defaults and check every field against the model's family
        name = params.model or self.settings.default_model
        # the owner's default model may be a path; a request may name one only when trusted
        record = self.catalog.get(
            name, paths=principal.may_name_paths or name == self.settings.default_model
        )
        if not record.available:
            raise ModelNotAvailable(
                f"model {record.id} is not on this machine; fetch it with "
                f"`easel models pull {record.id}`",
                field="model",
            )
        sizes = self._input_sizes(params, principal)
        family = get_family(record.family)
        resolved = resolve_params(
            params, record, family, sizes, loras=_VisibleLoras(self.loras, principal)
        )
        self._check_pixels(resolved)
        if TASK_SPECS[resolved.task].kind == "train":
            resolved = self._check_training(resolved, principal, record)
        # 3. store the job and its first event together (if the disk has room), then wake a
        # worker
        self.disk.check()
        with self.db.transaction():
            if TASK_SPECS[resolved.task].kind == "train":
                self._check_lora_name_free(resolved)  # in the transaction: no second claimant
            if sizes:  # again under the write lock: the pruner may have deleted one since
                self._input_sizes(resolved, principal)
            job = self.queue.submit(
                resolved,
                priority=priority,
                owner=principal.key_id,
                max_jobs=principal.max_jobs,
                webhook=webhook,
            )
            self.events.publish(
                job.id,
                "queued",
                {"position": self.job_position(job.id), "eta_seconds": self.job_eta(job.id)},
            )
        self.wakeup.set()
        return job

    def get_job(self, job_id: str, principal: Principal = LOCAL) -> JobRecord:
        """The job with its images; raises JobNotFound (404), also for another key's job."""
        job = self.queue.get(job_id)
        if not principal.sees(job.owner):
            raise JobNotFound(f"no job with id {job_id!r}", field="job_id")
        return job

    def list_jobs(
        self, status: JobStatus | None = None, limit: int = 50, principal: Principal = LOCAL
    ) -> list[JobRecord]:
        """The jobs ``principal`` sees (its own; an admin all), newest first, optionally one
        status."""
        return self.queue.list(status=status, owner=principal.owner_filter, limit=limit)

    def cancel_job(self, job_id: str, principal: Principal = LOCAL) -> JobRecord:
        """Cancel: a queued job never starts; a running one stops at its next step (its status
        turns ``canceled`` then). A finished job is returned unchanged."""
        self.get_job(job_id, principal)
        with self.db.transaction():
            before = self.queue.get(job_id).status
            job = self.queue.cancel(job_id)
            if before is JobStatus.QUEUED:
                self.events.publish(job_id, "canceled", {"while": "queued"})
        return job

    def webhook_secret(self, principal: Principal = LOCAL) -> str:
        """The secret that signs the deliveries of ``principal``'s jobs (derived from the
        server's, one per key: see easel.jobs.webhooks)."""
        if self.webhooks is None:
            raise EaselError("this server sends no webhooks")
        return self.webhooks.secret_for(principal.key_id)

    def _webhook_policy(self) -> WebhookPolicy:
        return (
            self.webhooks.policy
            if self.webhooks is not None
            else WebhookPolicy.from_settings(self.settings)
        )

    def job_position(self, job_id: str) -> int | None:
        """1-based place among waiting jobs (1 starts next); None unless queued."""
        return self.queue.position(job_id)

    def job_eta(self, job_id: str) -> float | None:
        """Estimated seconds until the job finishes; None while the speed is unknown."""
        return self.queue.eta_seconds(job_id, workers=self.worker_count())

    def queue_summary(self, principal: Principal = LOCAL) -> QueueSummary:
        """Job counts by status (all keys') and the running jobs ``principal`` sees."""
        summary = self.queue.summary()
        summary.running = [j for j in summary.running if principal.sees(j.owner)]
        return summary

    def active_jobs(self, principal: Principal = LOCAL) -> tuple[list[JobRecord], int]:
        """The running jobs ``principal`` sees (its own; an admin all), oldest first, and how
        many of the jobs it sees wait in the queue (what A1111's ``/progress`` reports)."""
        running = self.queue.list(
            status=JobStatus.RUNNING, owner=principal.owner_filter, limit=self.worker_count() + 8
        )
        owner = principal.owner_filter
        rows = self.db.query(
            "SELECT COUNT(*) FROM jobs WHERE status = 'queued'"
            + (" AND owner = ?" if owner is not None else ""),
            (owner,) if owner is not None else (),
        )
        return running[::-1], int(rows[0][0])

    def latest_preview(self, job_id: str, principal: Principal = LOCAL) -> str | None:
        """The newest preview image (a ``data:`` URL) among a job's progress events; None
        before the first. Raises JobNotFound (404), also for another key's job."""
        self.get_job(job_id, principal)
        rows = self.db.query(
            "SELECT json_extract(data, '$.preview') FROM events WHERE job_id = ? AND type = "
            "'progress' AND json_extract(data, '$.preview') IS NOT NULL ORDER BY id DESC LIMIT 1",
            (job_id,),
        )
        return str(rows[0][0]) if rows else None

    # --- workers and metrics --------------------------------------------------------------------

    def worker_statuses(self) -> list[WorkerStatus]:
        """Every worker's status now, as it is (the one place that knows all the workers: the
        API, the UI and /metrics read it)."""
        statuses = [worker.status() for worker in self.workers]
        return statuses + (self.pool.statuses() if self.pool is not None else [])

    def worker_count(self) -> int:
        """Workers that run generations (for ETAs): the Ray actors that are up, or the
        embedded workers."""
        if self.pool is not None:
            return max(self.pool.ready_workers, 1)
        return len(self.workers)

    def list_workers(self, principal: Principal = LOCAL) -> list[WorkerStatus]:
        """The workers as ``principal`` may see them: any key sees every worker, but the id
        of a job it does not own only with the ``admin`` scope (else ``job`` is None)."""
        return [
            status
            if principal.sees(status.job_owner)
            else replace(status, job=None, job_owner=None)
            for status in self.worker_statuses()
        ]

    def metrics_text(self, principal: Principal = LOCAL) -> bytes:
        """The Prometheus text of :attr:`metrics` (``easel.jobs.metrics``); raises Forbidden
        (403) without the ``admin`` scope (it counts every key's jobs)."""
        self.require(principal, "admin")
        return self.metrics.render()

    def disk_status(self) -> DiskStatus:
        """Free space on the disk holding EASEL_HOME, and whether it is under
        ``settings.min_free_disk_mb`` (then new jobs and uploads get 507 DiskFull)."""
        return self.disk.status()

    def retry_after_s(self) -> int:
        """Seconds a client should wait after QueueFull: until the running jobs are done."""
        seconds = self.queue.seconds_until_free(workers=self.worker_count())
        return max(1, min(3600, round(seconds))) if seconds is not None else 10

    def subscribe(self, job_id: str, last_event_id: int = 0) -> AsyncIterator[JobEvent]:
        """Events of a job after ``last_event_id`` (backlog, then live) until its final event.
        Safe to call on the event loop: nothing is read until iteration starts, whose first
        step raises JobNotFound for an unknown job (check with get_job first to fail earlier)."""
        return self.events.subscribe(job_id, last_event_id)

    # --- images ---------------------------------------------------------------------------------

    def list_images(
        self,
        query: str | None = None,
        limit: int = 50,
        kind: str | None = None,
        principal: Principal = LOCAL,
    ) -> list[ImageRecord]:
        """The stored images ``principal`` sees, newest first; ``query`` filters by prompt
        text (any case; at most ``max_prompt_chars``), ``kind`` ("generated" or "upload") by
        origin."""
        if query is not None:
            check_text(query, "q")
            if len(query) > self.settings.max_prompt_chars:
                raise InvalidParams(
                    f"q must be at most {self.settings.max_prompt_chars} characters "
                    f"(got {len(query)})",
                    field="q",
                )
        return self.images.list(query, limit, kind, owner=principal.owner_filter)

    def upload_image(self, data: bytes, principal: Principal = LOCAL) -> ImageRecord:
        """Check and store an input image (PNG, JPEG or WebP) for editing jobs.

        The bytes are decoded, not trusted by name: a non-image, another format, more than
        ``settings.max_upload_pixels`` pixels (refused from the header, before decoding) or a
        truncated file raises InvalidParams(field="file") and stores nothing.
        """
        if len(data) > self.settings.max_upload_bytes:
            raise InvalidParams(
                f"file must be at most {self.settings.max_upload_bytes} bytes (got {len(data)})",
                field="file",
            )
        self.require(principal, "generate")
        image = decode_image(data, field="file", max_pixels=self.settings.max_upload_pixels)
        return self.images.save_upload(
            image, png=png_bytes(image), sha256=pixel_hash(image), owner=principal.key_id
        )

    def submit_with_uploads(self, params: GenerationParams, principal: Principal) -> JobRecord:
        """``submit_job`` for a one-request protocol (OpenAI's edits, A1111's img2img) whose
        input images were uploaded for this request alone: a refused request leaves none of
        them behind."""
        try:
            return self.submit_job(params, principal=principal)
        except EaselError:
            for name in IMAGE_FIELDS:
                image_id = getattr(params, name)
                if isinstance(image_id, str):
                    self.discard_upload(image_id, principal)
            raise

    def discard_upload(self, image_id: str, principal: Principal = LOCAL) -> bool:
        """Delete an upload of ``principal``'s own key that no job names, row and file: what a
        one-request protocol (A1111's img2img) stored before the job it was for was refused,
        so that a refused request leaves nothing behind. Anything else (another key's image,
        a generated one, one a job names) is left alone; returns whether it was deleted."""
        names = " OR ".join(f"json_extract(params, '$.{name}') = :id" for name in IMAGE_FIELDS)
        with self.db.transaction() as conn:
            row = conn.execute(
                "DELETE FROM images WHERE id = :id AND kind = 'upload' AND owner IS :owner"
                f" AND NOT EXISTS (SELECT 1 FROM jobs WHERE {names}) RETURNING path",
                {"id": image_id, "owner": principal.key_id},
            ).fetchone()
        if row is None:
            return False
        (self.settings.images_dir / row[0]).unlink(missing_ok=True)
        return True

    def get_image(self, image_id: str, principal: Principal = LOCAL) -> ImageRecord:
        """One image's record; raises ImageNotFound (404), also for another key's image."""
        record = self.images.get(image_id)
        if not principal.sees(record.owner):
            raise ImageNotFound(f"no image with id {image_id!r}", field="image_id")
        return record

    def image_path(self, image_id: str, principal: Principal = LOCAL) -> Path:
        """The PNG file on disk (with its metadata chunks)."""
        self.get_image(image_id, principal)
        return self.images.path(image_id)

    def image_bytes(self, image_id: str, principal: Principal = LOCAL) -> bytes:
        """The PNG file's bytes."""
        return self.image_path(image_id, principal).read_bytes()

    def read_image_info(self, png: bytes) -> dict[str, Any]:
        """Generation parameters stored in a PNG: ``{"parameters": A1111 text, "easel": dict}``
        (either may be None); raises InvalidParams(field="image") for a non-image, or one
        that fails the upload checks (a bomb, a truncated file, megabytes of metadata)."""
        from easel.engine.metadata import read_metadata  # PIL only

        check_structure(png, "image", self.settings.max_upload_pixels)
        return read_metadata(png)

    # --- datasets -------------------------------------------------------------------------------

    def create_dataset(
        self,
        files: list[tuple[str, bytes]],
        *,
        allow_missing_captions: bool = False,
        principal: Principal = LOCAL,
    ) -> DatasetRecord:
        """Check and store a training dataset: ``files`` is one .zip, or images with their .txt
        captions and/or a metadata.jsonl, as (file name, bytes). Raises InvalidParams
        (field="dataset") naming what is wrong (see ``easel.datasets``); nothing is stored then.
        """
        self.require(principal, "train")
        total = sum(len(data) for _, data in files)
        limit = self.settings.max_dataset_upload_bytes
        if total > limit:
            raise InvalidParams(
                f"dataset upload must be at most {limit} bytes (got {total})", field="dataset"
            )
        self.disk.check()
        dataset_id = uuid.uuid4().hex
        limits = DatasetLimits.from_settings(
            self.settings, allow_missing_captions=allow_missing_captions
        )
        with self.db.transaction() as conn:  # the owner first: a crash leaves no unowned copy
            conn.execute(
                "INSERT INTO datasets (id, owner, created_at) VALUES (?, ?, ?)",
                (dataset_id, principal.key_id, utcnow()),
            )
        try:
            prepare_upload(files, self.settings.datasets_dir / dataset_id, limits)
        except BaseException:
            with self.db.transaction() as conn:
                conn.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,))
            raise
        return self.get_dataset(dataset_id, principal)

    def get_dataset(self, dataset_id: str, principal: Principal = LOCAL) -> DatasetRecord:
        """One dataset's counts; raises DatasetNotFound (404), also for another key's."""
        folder = self.dataset_path(dataset_id, principal)
        summary = read_summary(folder)
        return DatasetRecord(
            id=dataset_id,
            images=summary.images,
            captions=summary.captions,
            missing_captions=summary.missing_captions,
            created_at=summary.created_at,
            bytes=summary.bytes,
            owner=self._dataset_owner(dataset_id),
        )

    def list_datasets(self, principal: Principal = LOCAL) -> list[DatasetRecord]:
        """The stored datasets ``principal`` sees, newest first."""
        root = self.settings.datasets_dir
        names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        records = []
        for name in names:
            try:
                records.append(self.get_dataset(name, principal))
            except (DatasetNotFound, InvalidParams):
                continue  # another key's, a partial copy being written, or not a dataset
        return sorted(records, key=lambda r: r.created_at, reverse=True)

    def dataset_path(self, dataset_id: str, principal: Principal = LOCAL) -> Path:
        """The dataset's folder (what ``LoraConfig.dataset`` names); raises DatasetNotFound."""
        folder = self.settings.datasets_dir / dataset_id
        if (
            not DATASET_ID.fullmatch(dataset_id)
            or not (folder / "dataset.json").is_file()
            or not principal.sees(self._dataset_owner(dataset_id))
        ):
            raise DatasetNotFound(f"no dataset with id {dataset_id!r}", field="dataset")
        return folder

    def load_dataset(self, dataset_id: str, principal: Principal = LOCAL) -> Dataset:
        """The dataset's items (image paths, captions, sizes); raises DatasetNotFound."""
        return load_dataset(self.dataset_path(dataset_id, principal))

    def _dataset_owner(self, dataset_id: str) -> str | None:
        rows = self.db.query("SELECT owner FROM datasets WHERE id = ?", (dataset_id,))
        return rows[0][0] if rows else None

    # --- models ---------------------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        """Catalog entries with defaults, limits, availability and whether loaded now."""
        loaded = self._loaded_models()
        return [self._model_info(r, loaded) for r in self.catalog.list()]

    def model_info(self, id_or_path: str, principal: Principal = LOCAL) -> ModelInfo:
        """One model by catalog id, or by local path where ``principal`` may name paths (e.g.
        ``settings.default_model``); raises ModelNotFound (404)."""
        record = self.catalog.get(
            id_or_path,
            paths=principal.may_name_paths or id_or_path == self.settings.default_model,
        )
        return self._model_info(record, self._loaded_models())

    def _loaded_models(self) -> set[str]:
        return {m for manager in self.model_managers for m in manager.loaded()}

    @staticmethod
    def _model_info(record: ModelRecord, loaded: set[str]) -> ModelInfo:
        family = effective_family(record, get_family(record.family))
        return ModelInfo(
            record=record,
            family=family,
            defaults=defaults_for(record, family),
            loaded=record.id in loaded,
        )

    # --- LoRAs ----------------------------------------------------------------------------------

    def list_loras(self, principal: Principal = LOCAL) -> list[LoraRecord]:
        """The LoRAs ``principal`` may use, by name: those added by the owner (everyone's) and
        those its key trained (an admin: all)."""
        return [r for r in self.loras.list() if _lora_visible(r, principal)]

    def get_lora(self, name: str, principal: Principal = LOCAL) -> LoraRecord:
        """One LoRA; raises LoraNotFound (404), also for another key's."""
        return _VisibleLoras(self.loras, principal).get(name)

    # --- checks ---------------------------------------------------------------------------------

    def _input_sizes(
        self, params: GenerationParams, principal: Principal
    ) -> dict[str, tuple[int, int]]:
        """(width, height) of each stored image the request names; InvalidParams naming the
        field for an id that is not a stored image ``principal`` sees."""
        spec = TASK_SPECS.get(params.task)
        sizes = {}
        for name in spec.image_fields if spec else ():
            image_id = getattr(params, name)
            if not isinstance(image_id, str) or not image_id:
                continue  # resolve_params names the missing or malformed field
            try:
                record = self.get_image(image_id, principal)
                self.images.path(image_id)  # its file, too
            except ImageNotFound:
                raise InvalidParams(
                    f"{name}: no stored image with id {image_id!r}; upload it first with "
                    "POST /api/v1/images",
                    field=name,
                ) from None
            sizes[name] = (record.width, record.height)
        return sizes

    def _check_limits(self, params: GenerationParams, priority: int) -> None:
        """What holds for every request before its model is looked at: text is text (every
        string of every field, keys of objects and items of lists too), prompts are bounded,
        the priority is in range. The one place job text is checked, whatever the protocol."""
        for item in fields(params):
            for text, where in _texts(getattr(params, item.name), item.name):
                check_text(text, where)
        limit = self.settings.max_prompt_chars
        for name in ("prompt", "negative_prompt"):
            text = getattr(params, name)
            if isinstance(text, str) and len(text) > limit:
                raise InvalidParams(
                    f"{name} must be at most {limit} characters (got {len(text)})", field=name
                )
        low, high = PRIORITY_RANGE
        if (
            isinstance(priority, bool)
            or not isinstance(priority, int)
            or not low <= priority <= high
        ):
            raise InvalidParams(
                f"priority must be a whole number between {low} and {high} (got {priority!r})",
                field="priority",
            )

    def _check_training(
        self, params: GenerationParams, principal: Principal, record: ModelRecord
    ) -> GenerationParams:
        """A ``train_lora`` request: its settings pass the checks `LoraConfig` makes (the same
        as ``easel train lora``'s) and its dataset is stored. Returns the params with the
        training defaults (``record``'s, else LoraConfig's) filled in."""
        for name in TRAIN_REQUIRED:
            if not isinstance(getattr(params, name), str) or not getattr(params, name):
                raise InvalidParams(f"{name} is required for train_lora", field=name)
        assert params.dataset
        from easel.training.lora_config import config_from_params  # torch-free

        # what the worker builds, the model's training defaults filled in
        config = config_from_params(params, params.dataset, "", record.train_defaults)
        check_text_encoder_family(config.train_text_encoder, record.family)
        self.dataset_path(params.dataset, principal)
        return replace(
            params,
            steps=config.steps,
            rank=config.rank,
            learning_rate=config.learning_rate,
            train_text_encoder=config.train_text_encoder,
            prior_words=list(config.prior_words),
            export_scale=config.export_scale,
        )

    def _check_lora_name_free(self, params: GenerationParams) -> None:
        """No LoRA has the job's name, and no queued or running job will publish one by it
        (the second of two would have to fail after training, or replace the first's)."""
        assert params.name
        if self.loras.path_for(params.name).exists():
            raise InvalidParams(
                f"a LoRA named {params.name!r} exists already; pick another name", field="name"
            )
        if holder := self.queue.training_job_naming(params.name):
            raise InvalidParams(
                f"job {holder} is already training a LoRA named {params.name!r}; pick another "
                "name, or cancel that job first",
                field="name",
            )

    def _check_pixels(self, params: GenerationParams) -> None:
        assert params.width is not None and params.height is not None
        pixels = params.width * params.height * params.num_images
        budget = self.settings.max_pixels_per_job
        if pixels > budget:
            raise InvalidParams(
                f"width × height × num_images must be at most {budget} pixels "
                f"(got {params.width}×{params.height}×{params.num_images} = {pixels}); "
                "lower num_images or the size",
                field="num_images",
            )


def _lora_visible(record: LoraRecord, principal: Principal) -> bool:
    """Added LoRAs (no owner) are everyone's; a trained one is its key's (and admins')."""
    return record.owner is None or principal.sees(record.owner)


@dataclass
class _VisibleLoras:
    """The LoRA catalog as one key sees it (what ``resolve_params`` looks LoRAs up in)."""

    catalog: LoraCatalog
    principal: Principal

    def get(self, name: str) -> LoraRecord:
        try:
            record: LoraRecord | None = self.catalog.get(name)
        except LoraNotFound:
            record = None
        if record is None or not _lora_visible(record, self.principal):
            visible = [r.id for r in self.catalog.list() if _lora_visible(r, self.principal)]
            raise LoraNotFound(
                f"unknown LoRA {name!r} (known: {', '.join(visible) or 'none yet'})",
                field="lora",
            )
        return record


class HomeUnusable(EaselError):
    """EASEL_HOME cannot be used as it is: not writable, or a new database beside an earlier
    one's images (HTTP 503)."""

    status = 503


def check_home(settings: Settings, *, fresh_db: bool = False) -> None:
    """Refuse to start on a home that would fail later or lose work, with one line that says
    what is wrong and what to do (an EaselError: ``easel`` prints it and exits 2). Run before
    anything opens the database, since opening makes and migrates it; writes nothing but a
    missing EASEL_HOME folder.

    Refuses: a home or database this user cannot write; a database that is not SQLite, is
    damaged (``PRAGMA quick_check``) or newer than this code (:class:`DatabaseUnusable`); and a
    new database (missing, zero-length, never migrated) while ``images/`` holds PNGs, unless
    ``fresh_db``: those images' jobs and rows would be gone, a backup may bring them back.
    """
    home, db_path = settings.home, settings.db_path
    # 1. the folder: made when missing, and new files can be made in it
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HomeUnusable(
            f"cannot create EASEL_HOME={home} ({exc.strerror}); create it, or set EASEL_HOME "
            "to a folder this user can write",
            field="home",
        ) from None
    _check_writable(home, f"EASEL_HOME={home}")
    if settings.images_dir.is_dir():
        _check_writable(settings.images_dir, str(settings.images_dir))
    # 2. the database: SQLite, every page readable, a schema this code knows, writable
    version = inspect_database(db_path, quick_check=True)
    for name in ("easel.db", "easel.db-wal", "easel.db-shm"):
        if (home / name).is_file():
            try:
                (home / name).open("r+b").close()
            except OSError as exc:
                raise HomeUnusable(
                    f"cannot write {home / name} ({exc.strerror}); make it writable by this user",
                    field="home",
                ) from None
    # 3. a new database beside an earlier one's images would silently start a second history
    if not version and not fresh_db and _has_images(settings.images_dir):
        state = "empty" if db_path.exists() else "missing"
        raise HomeUnusable(
            f"{db_path} is {state} but {settings.images_dir} holds images: their jobs and "
            "records would be gone. Restore easel.db from a backup made with `easel backup` "
            "(or point EASEL_HOME at the backup), or start a new, empty queue beside the old "
            "files with `easel serve --fresh-db`",
            field="home",
        )


def _check_writable(folder: Path, name: str) -> None:
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".easel-write-check-")
    except OSError as exc:
        raise HomeUnusable(
            f"cannot write to {name} ({exc.strerror}); make it writable by this user, or set "
            "EASEL_HOME to another folder",
            field="home",
        ) from None
    os.close(handle)
    os.unlink(probe)


def _has_images(images_dir: Path) -> bool:
    return next(images_dir.rglob("*.png"), None) is not None if images_dir.is_dir() else False


def build_services(settings: Settings, *, generator: Generator | None = None) -> Services:
    """Wire everything for ``settings``.

    Without ``generator`` each worker gets its own real Engine (and model manager) on its
    device: one worker per CUDA device, or ``settings.cpu_workers`` on the CPU. With a
    ``generator`` (a stand-in), ``settings.cpu_workers`` workers share it.
    """
    db = Database(settings.db_path)
    queue = SqliteJobQueue(
        db, max_queued=settings.max_queued_jobs, max_attempts=settings.max_attempts
    )
    disk = DiskGuard(settings.home, settings.min_free_disk_mb * MIB)
    images = DiskImageStore(db, settings.images_dir, disk)
    events = EventBus(db)
    catalog = ModelCatalog(settings)
    loras = LoraCatalog(settings)
    wakeup = threading.Event()
    managers: list[LoadedModels] = []
    if generator is None:
        generators = _engines(settings, catalog, loras, managers)
    else:
        generators = [("cpu", generator)] * max(settings.cpu_workers, 1)
    policy = RetentionPolicy(settings.keep_jobs_days, settings.keep_uploads_days)
    webhooks = Webhooks(db, queue, WebhookPolicy.from_settings(settings))
    events.final_hooks.append(webhooks.enqueue)  # a job's end and its delivery: one commit
    metrics = Metrics()
    pool = None
    if settings.ray_address:
        # generations go to Ray actors; this process keeps one worker for training jobs
        pool = RayPool(
            settings,
            db=db,
            queue=queue,
            images=images,
            events=events,
            kick=wakeup,
            metrics=metrics,
            make_generator=make_engine if generator is None else _Same(generator),
        )
        generators = generators[:1]
    workers = [
        Worker(
            f"{device}-{i}" if pool is None else f"{device}-train",  # with Ray: training only
            device,
            db=db,
            queue=queue,
            images=images,
            events=events,
            generator=gen,
            trainer=None if generator is not None else _trainer(settings, loras, device),
            wakeup=wakeup,
            metrics=metrics,
            claim=None if pool is None else functools.partial(queue.claim, kind="train"),
            max_batch=settings.batch_limit(device),
            batch_window_s=settings.batch_window_ms / 1000,
        )
        for i, (device, gen) in enumerate(generators)
    ]
    return Services(
        settings=settings,
        db=db,
        catalog=catalog,
        loras=loras,
        queue=queue,
        images=images,
        events=events,
        workers=workers,
        keys=KeyStore(db),
        disk=disk,
        model_managers=managers,
        wakeup=wakeup,
        pruner=Pruner(db, settings.images_dir, policy, settings.prune_every_s)
        if policy.active
        else None,
        webhooks=webhooks,
        metrics=metrics,
        pool=pool,
    )


@dataclass(frozen=True)
class _Same:
    """A Ray worker's generator factory that gives every actor a copy of one generator (a
    stand-in: tests and benchmarks)."""

    generator: Generator

    def __call__(self, settings: Settings) -> Generator:
        return self.generator


def _trainer(settings: Settings, loras: LoraCatalog, device: str) -> Trainer:
    """What runs a worker's ``train_lora`` jobs on its device (torch loads only when a real
    engine is wanted); each job loads its own float32 copy of the model."""
    from easel.training.job import LoraTrainer

    return LoraTrainer(settings.model_copy(update={"device": device}), loras)


def _engines(
    settings: Settings, catalog: ModelCatalog, loras: LoraCatalog, managers: list[LoadedModels]
) -> list[tuple[str, Generator]]:
    """One (device, Engine) per worker; each Engine owns its ModelManager (no shared pipeline)."""
    # imported here: torch loads only when a real engine is wanted
    from easel.engine.generate import Engine
    from easel.models.loader import ModelManager, pick_device

    device = pick_device(settings.device)
    if device == "cuda":
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        devices = [device] * (max(settings.cpu_workers, 1) if device == "cpu" else 1)
    engines: list[tuple[str, Generator]] = []
    for dev in devices:
        own = settings.model_copy(update={"device": dev})
        manager = ModelManager(own, catalog)
        managers.append(manager)
        engines.append((dev, Engine(manager, own, loras=loras)))
    return engines
