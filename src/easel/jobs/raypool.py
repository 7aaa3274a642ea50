"""Workers as Ray actors: the server keeps the queue, the images and the events; one dispatcher
thread hands jobs to actors anywhere in a Ray cluster, each job to an actor that already holds
its model where that pays (:mod:`easel.jobs.dispatch`).

    pool = RayPool(settings, db=db, queue=queue, images=images, events=events, kick=wakeup)
    pool.start()              # connect (or start a local cluster), start the actors
    pool.statuses()           # what GET /api/v1/workers shows
    pool.stop(drain_timeout_s=30)   # drain, then kill every actor Easel started

Each actor has a :class:`Slot` on the server: a :class:`~easel.jobs.worker.Worker` thread whose
generator is a :class:`RemoteGenerator` (the call goes over the wire, progress streams back)
and whose jobs come from the slot's inbox, filled by the dispatcher. So events, images,
cancellation, drains and the recording of a job's end are the embedded worker's code, once.

Failures. An actor whose process or node dies fails its call with ``ActorDiedError``: the
running job goes back to the queue (:class:`~easel.domain.WorkerLost`; one more attempt, failed
after ``max_attempts``), and the slot gets a new actor. Idle actors are pinged every
``HEALTH_EVERY_S``, so a dead one is replaced without waiting for a job. Images are stored by
the server under ids made of the job id and the image's index, so a retried job overwrites,
never doubles, its images. The number of actors follows ``ray_workers``, or the cluster's GPUs
(CPUs without GPUs) as nodes join and leave.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from PIL import Image

from easel import domain
from easel.config import Settings
from easel.domain import (
    CancelCheck,
    Canceled,
    EaselError,
    GenerationParams,
    GenerationResult,
    InputImages,
    JobRecord,
    JobStatus,
    Progress,
    ProgressCallback,
    WorkerLost,
    WorkerStatus,
)
from easel.jobs.db import Database
from easel.jobs.dispatch import Costs, WaitingJob, WorkerView, assign
from easel.jobs.events import EventBus
from easel.jobs.images import ImageStore
from easel.jobs.queue import SqliteJobQueue
from easel.jobs.ray_actor import GeneratorFactory, WorkerActor, make_engine
from easel.jobs.worker import Worker

if TYPE_CHECKING:
    from easel.jobs.metrics import Metrics

log = logging.getLogger(__name__)

HEALTH_EVERY_S = 2.0  # how often idle actors are pinged and the number of actors reconciled
CANCEL_POLL_S = 0.05  # how often a running job's cancel flag is read (a cancel reaches the
# actor within this, so within one step of any real model)
WAITING_WINDOW = 2000  # queued jobs the dispatcher looks at per round
DEFAULT_COSTS = Costs(load_s=10.0, job_s=5.0)  # until the cluster has measured a model
ACTOR_THREADS = 4  # a job, its cancel, and pings at once
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # a cluster Easel starts itself needs little


def _token_auth_like_auto() -> None:
    """Use the cluster token this machine holds (``ray start`` writes one, and its cluster
    requires it) for an explicit address too, as Ray itself does only for ``auto``;
    ``RAY_AUTH_MODE`` in the environment decides when set. Ray without token auth: nothing."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


class RemoteGenerator:
    """A :class:`~easel.jobs.worker.Generator` whose work runs on the slot's actor."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot

    def describe(self) -> dict[str, Any]:
        return self.slot.info

    def generate(
        self,
        params: GenerationParams,
        *,
        inputs: InputImages | None = None,
        on_progress: ProgressCallback | None = None,
        is_canceled: CancelCheck | None = None,
    ) -> GenerationResult:
        import ray
        from ray.exceptions import RayActorError

        actor = self.slot.actor
        token = uuid.uuid4().hex
        sent = {name: getattr(inputs, name) for name in ("image", "mask", "style_image")}
        done = threading.Event()

        def watch_cancel() -> None:  # a cancel reaches the actor even in the middle of a step
            while not done.wait(CANCEL_POLL_S):
                if is_canceled is not None and is_canceled():
                    actor.cancel.remote(token)
                    return

        threading.Thread(target=watch_cancel, daemon=True).start()
        try:
            stream = actor.generate.options(num_returns="streaming").remote(
                token, params.to_dict(), sent if inputs is not None else {}
            )
            for ref in stream:
                item = ray.get(ref)
                if item[0] == "progress":
                    if on_progress is not None:
                        on_progress(Progress(step=item[1], total=item[2], preview=item[3]))
                    continue
                self.slot.info = item[-1]
                return _outcome(item, params)
        except RayActorError as exc:
            self.slot.lost(actor)
            raise WorkerLost(f"worker {self.slot.name} died ({type(exc).__name__})") from None
        finally:
            done.set()
        raise WorkerLost(f"worker {self.slot.name} ended the job without a result")


def _outcome(item: tuple[Any, ...], params: GenerationParams) -> GenerationResult:
    """The GenerationResult of an actor's last item, or the error it reports, raised."""
    kind = item[0]
    if kind == "result":
        images: list[Image.Image] = item[1]
        resolved = GenerationParams.from_dict(item[2])
        return GenerationResult(
            images=images, params=resolved, seconds=item[3], dropped_tokens=item[4]
        )
    if kind == "canceled":
        raise Canceled()
    if kind == "error":
        error_class = getattr(domain, item[1], None)
        if not (isinstance(error_class, type) and issubclass(error_class, EaselError)):
            error_class = EaselError
        raise error_class(item[2], field=item[3])
    raise RuntimeError(f"on the worker: {item[1]}")


class Slot:
    """One actor as the server sees it: its handle, what it last said of itself, its inbox and
    the Worker thread that runs the jobs given to it."""

    def __init__(self, pool: RayPool, name: str) -> None:
        self.pool = pool
        self.name = name
        self.inbox: deque[JobRecord] = deque()
        self.in_flight = 0  # given and not yet over (in the inbox or running)
        self.running: JobRecord | None = None  # taken from the inbox by the worker thread
        self.info: dict[str, Any] = {"models": [], "loads": {}, "load_seconds": {}}
        self.actor: Any = None
        self.ready = False  # the actor answered its first ping
        self._ping: Any = None  # the pending ping's ObjectRef
        self._lock = threading.Lock()
        self.worker = Worker(
            name,
            pool.device,
            db=pool.db,
            queue=pool.queue,
            images=pool.images,
            events=pool.events,
            generator=RemoteGenerator(self),
            wakeup=threading.Event(),
            claim=self._take,
            after_job=self._over,
            metrics=pool.metrics,
        )

    # --- the actor ------------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start a new actor for this slot (after a death, too); ready once it answers."""
        with self._lock:
            self.actor = self.pool.new_actor(self.name)
            self.ready = False
            self.info = {"models": [], "loads": {}, "load_seconds": {}}
            self._ping = self.actor.info.remote()

    def lost(self, actor: Any) -> None:
        """``actor`` died (a call failed): replace it, once, whoever noticed first."""
        with self._lock:
            if actor is not self.actor:
                return
        log.warning("Ray worker %s died; starting a new one", self.name)
        self.pool.count_death()
        self.spawn()

    def check(self) -> None:
        """Read the last ping's answer (without waiting) and send the next: marks the actor
        ready, refreshes its info, and notices a death while it has no job."""
        import ray
        from ray.exceptions import RayActorError

        with self._lock:
            actor, ping = self.actor, self._ping
        ready, _ = ray.wait([ping], timeout=0)
        if not ready:
            return
        try:
            info = ray.get(ping)
        except RayActorError:
            self.lost(actor)
            return
        with self._lock:
            if actor is self.actor:
                if self.in_flight == 0:  # a running job's result brings fresher info
                    self.info = info
                self.ready = True
                self._ping = actor.info.remote()

    # --- jobs -----------------------------------------------------------------------------------

    def give(self, job: JobRecord) -> None:
        with self._lock:
            self.inbox.append(job)
            self.in_flight += 1
        self.worker.wakeup.set()

    def _take(self) -> JobRecord | None:
        with self._lock:
            self.running = self.inbox.popleft() if self.inbox else None
            return self.running

    def _over(self, job: JobRecord) -> None:
        with self._lock:
            self.in_flight -= 1
            self.running = None
        self.pool.job_over(job)

    def view(self) -> WorkerView:
        """What the dispatcher needs: held models (loaded, then those of the jobs given to it),
        how many fit, and its load."""
        with self._lock:
            loaded = list(self.info.get("models", []))
            given = [*([self.running] if self.running else []), *self.inbox]
            coming = [j.model for j in given if j.model not in loaded]
            in_flight = self.in_flight
            used = self.info.get("used_bytes") or 0
            budget = self.info.get("budget_bytes") or 0
        held = tuple(dict.fromkeys([*loaded, *coming]))
        # one more model fits when the mean one does; always room for one
        mean = used / len(loaded) if loaded else 0
        spare = 1 if not budget or used + mean <= budget else 0
        return WorkerView(
            id=self.name,
            models=held,
            slots=max(1, len(loaded) + spare),
            busy=in_flight,
            capacity=self.pool.settings.ray_jobs_per_worker,
        )

    def status(self) -> WorkerStatus:
        status = self.worker.status()
        with self._lock:
            ready, info = self.ready, self.info
        if not ready and status.state in ("idle", "busy"):
            status = _replace(status, state="starting")
        return _replace(status, node=str(info.get("node") or "?"), pid=int(info.get("pid") or 0))


def _replace(status: WorkerStatus, **changes: Any) -> WorkerStatus:
    from dataclasses import replace

    return replace(status, **changes)


class RayPool:
    """The actors, their slots, and the dispatcher thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database,
        queue: SqliteJobQueue,
        images: ImageStore,
        events: EventBus,
        kick: threading.Event,
        metrics: Metrics | None = None,
        make_generator: GeneratorFactory = make_engine,
    ) -> None:
        self.settings = settings
        self.db = db
        self.queue = queue
        self.images = images
        self.events = events
        self.kick = kick  # set on every submit and job end: dispatch again
        self.metrics = metrics
        self.make_generator = make_generator
        self.device = "cpu"  # "cuda" once the cluster has GPUs (decided at start)
        self.slots: list[Slot] = []
        self.deaths = 0
        self._costs: dict[str, list[float]] = {}  # model -> [job seconds EMA]
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._actor_class: Any = None
        self._next_slot = 0
        self._last_health = 0.0

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to the cluster (``auto``: the one this machine is in, else a new local one),
        start the actors and the dispatcher. Raises EaselError when Ray is missing or the
        cluster cannot be reached."""
        try:
            import ray
        except ImportError:
            raise EaselError(
                "--ray needs Ray: pip install 'easel[ray]'", field="ray_address"
            ) from None
        address = self.settings.ray_address or "auto"
        _token_auth_like_auto()
        options: dict[str, Any] = {
            "namespace": "easel",
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        # ray.init takes SIGTERM for itself (exit at once); the server's own handler drains
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            ray.init(address=address, **options)
        except ConnectionError as exc:
            if address != "auto":
                raise EaselError(
                    f"no Ray cluster at {address!r}: {exc}", field="ray_address"
                ) from None
            # none running on this machine: start one for this server (stopped with it)
            ray.init(object_store_memory=LOCAL_OBJECT_STORE_BYTES, **options)
        finally:
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
        self.device = "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
        self._actor_class = ray.remote(WorkerActor)
        self._reconcile()
        self._thread = threading.Thread(target=self._loop, name="easel-dispatch", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout_s: float) -> None:
        """Drain like the embedded workers (no new jobs, running ones get ``drain_timeout_s``,
        then go back to the queue), put back jobs given but not started, then kill every
        actor; a cluster Easel started itself is shut down with all its processes."""
        import ray

        self._stopping.set()
        self.kick.set()
        if self._thread is not None:
            self._thread.join()
        threads = [
            threading.Thread(target=s.worker.stop, args=(drain_timeout_s,)) for s in self.slots
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for slot in self.slots:
            for job in slot.inbox:  # given, never started: back to the queue as it was
                with self.db.transaction():
                    if self.queue.finish(job.id, JobStatus.QUEUED) is not None:
                        self.events.publish(job.id, "requeued", {"reason": "server stopping"})
            if slot.actor is not None:
                ray.kill(slot.actor, no_restart=True)
        # a cluster this server started goes down with every process of it; another one
        # just loses this driver
        ray.shutdown()
        self.slots = []

    def statuses(self) -> list[WorkerStatus]:
        return [slot.status() for slot in self.slots]

    @property
    def ready_workers(self) -> int:
        return sum(1 for s in self.slots if s.ready)

    # --- the actors -----------------------------------------------------------------------------

    def new_actor(self, name: str) -> Any:
        options: dict[str, Any] = {"max_concurrency": ACTOR_THREADS, "max_restarts": 0}
        if self.device == "cuda":
            options.update(num_gpus=1, num_cpus=1)
        else:
            options.update(num_cpus=self.settings.ray_cpus_per_worker)
        return self._actor_class.options(name=f"{name}-{uuid.uuid4().hex[:8]}", **options).remote(
            self.settings.model_dump_json(), self.make_generator
        )

    def count_death(self) -> None:
        self.deaths += 1

    def _target(self) -> int:
        """How many actors to keep: ``ray_workers``, else one per GPU (per
        ``ray_cpus_per_worker`` CPUs without GPUs) of the cluster's live nodes."""
        import ray

        if self.settings.ray_workers:
            return self.settings.ray_workers
        resources = ray.cluster_resources()
        if self.device == "cuda":
            return max(1, int(resources.get("GPU", 0)))
        return max(1, int(resources.get("CPU", 0) // self.settings.ray_cpus_per_worker))

    def _reconcile(self) -> None:
        """Ping every actor (noticing deaths), then add or retire slots to the target; only an
        idle slot is retired."""
        for slot in self.slots:
            slot.check()
        target = self._target()
        while len(self.slots) < target:
            slot = Slot(self, f"ray-{self._next_slot}")
            self._next_slot += 1
            slot.spawn()
            slot.worker.start()
            self.slots.append(slot)
        # past the target (nodes left): retire idle slots, those whose actor is not up first
        idle = sorted((s for s in self.slots if s.in_flight == 0), key=lambda s: s.ready)
        for slot in idle[: max(0, len(self.slots) - target)]:
            import ray

            self.slots.remove(slot)
            slot.worker.stop(0)
            ray.kill(slot.actor, no_restart=True)

    # --- dispatch -------------------------------------------------------------------------------

    def job_over(self, job: JobRecord) -> None:
        """A slot's job ended (in any way): learn its duration, dispatch again."""
        if job.started_at is not None:
            seconds = (datetime.now(UTC) - job.started_at).total_seconds()
            ema = self._costs.setdefault(job.model or "", [seconds])
            ema[0] += 0.3 * (seconds - ema[0])
        self.kick.set()

    def costs(self, model: str) -> Costs:
        """Seconds to load ``model`` (the cluster's mean so far) and one job of it."""
        loads = sum(s.info.get("loads", {}).get(model, 0) for s in self.slots)
        load_s = sum(s.info.get("load_seconds", {}).get(model, 0.0) for s in self.slots)
        job = self._costs.get(model)
        return Costs(
            load_s=load_s / loads if loads else DEFAULT_COSTS.load_s,
            job_s=job[0] if job else DEFAULT_COSTS.job_s,
        )

    def dispatch(self) -> int:
        """One round: give waiting jobs to actors (see :func:`easel.jobs.dispatch.assign`);
        returns how many were given."""
        ready = {s.name: s for s in self.slots if s.ready}
        views = [s.view() for s in ready.values()]
        if not any(v.busy < v.capacity for v in views):
            return 0
        now = datetime.now(UTC)
        waiting = [
            WaitingJob(w.id, w.model, (now - w.created_at).total_seconds())
            for w in self.queue.waiting(kind="generate", limit=WAITING_WINDOW)
        ]
        given = 0
        plan = assign(waiting, views, self.costs, starve_after_s=self.settings.ray_starve_after_s)
        for job_id, worker in plan:
            job = self.queue.claim_id(job_id)
            if job is not None:  # else canceled meanwhile
                ready[worker].give(job)
                given += 1
        return given

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if time.monotonic() - self._last_health >= HEALTH_EVERY_S:
                    self._last_health = time.monotonic()
                    self._reconcile()
                else:  # actors on their way are ready as soon as they answer
                    for slot in self.slots:
                        if not slot.ready:
                            slot.check()
                self.dispatch()
            except Exception:  # a failed round (a busy database, a cluster hiccup): retry
                log.exception("Ray dispatcher: a round failed")
            self.kick.wait(HEALTH_EVERY_S / 4)
            self.kick.clear()
