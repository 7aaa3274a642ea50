"""The persistent job queue: priority, owners taking turns, FIFO; positions, ETAs, atomic
claim, recovery.

Jobs live in SQLite (:mod:`easel.jobs.db`); a job's life is
``queued -> running -> succeeded | failed | canceled`` (a queued job may go straight to
``canceled``; a running job goes back to ``queued`` when the server stops under it).

Attempts. A job is started at most ``max_attempts`` times. The limit is enforced in one place,
:data:`PUT_BACK`, the statement that returns a running job to the queue, both when a drain stops
it (:meth:`SqliteJobQueue.finish` with ``queued``) and when start-up recovers it after a crash
(:meth:`SqliteJobQueue.recover`): a job already started ``max_attempts`` times fails there
instead of going back, so :meth:`SqliteJobQueue.claim` never sees one over the limit.

ETA. For each (model, width, height, device) the queue keeps an exponential moving average of
seconds per denoising step, ``s <- s + ALPHA * (observed - s)`` with ``ALPHA = 0.3`` (the first
observation sets ``s``). ``observed`` is a finished job's wall time divided by
``num_inference_steps * num_images``, so per-job overhead (text encoding, VAE decode) is spread
over the steps. A job's cost is ``s * steps * num_images``; the ETA of a queued job is
(remaining cost of the running jobs + cost of every job ahead of it + its own cost) / workers;
a running job's ETA is its own remaining cost. With several devices the slowest device's ``s``
is used. Unknown speed for any of those jobs -> ETA ``None``; a training job's speed is always
unknown (its progress events carry its own ETA). Both are one SQL query (jobs carry width and
height as columns for the join), since every submit and every GET computes them.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from easel.domain import (
    TASK_SPECS,
    GenerationParams,
    ImageRecord,
    JobNotFound,
    JobRecord,
    JobStatus,
    QueueFull,
    QuotaExceeded,
    TaskKind,
    batch_key,
)
from easel.jobs.db import Database

ALPHA = 0.3  # weight of the newest observation in the seconds-per-step moving average
# tasks whose steps are optimisation steps: no denoising speed applies, so their ETA is unknown
TRAIN_TASKS = ", ".join(f"'{name}'" for name, spec in TASK_SPECS.items() if spec.kind == "train")

# A running job back to the queue, fresh (no start time, step 0, no error), or failed once it
# has been started :max times. Parameters :max and :now; callers may append "AND ...".
PUT_BACK = (
    "UPDATE jobs SET"
    " status = CASE WHEN attempts >= :max THEN 'failed' ELSE 'queued' END,"
    " error = CASE WHEN attempts >= :max THEN 'interrupted ' || attempts || ' times"
    " (the server or its worker stopped while it ran); giving up' END,"
    " finished_at = CASE WHEN attempts >= :max THEN :now END,"
    " started_at = CASE WHEN attempts >= :max THEN started_at END,"
    " step = 0, cancel_requested = 0"
    " WHERE status = 'running'"
)


# The order waiting jobs start in, as a CTE ``places (seq, position)``: highest priority first;
# within a priority the owners (API keys) take turns, each owner's jobs oldest first (the n-th
# waiting job of every owner before the (n+1)-th of any), so one key's 500 jobs delay another
# key's one by at most one job. Within a turn, the owner whose last job started longest ago (or
# never) goes first: counting waiting jobs alone, the next of 500 would be the first waiting job
# again as soon as the one before it started, and win on submission order every time. Submission
# order breaks the remaining ties. One statement, so the claim and every position and ETA read
# the same order.
PLACES = (
    "WITH waiting AS (SELECT seq, priority, owner, ROW_NUMBER() OVER"
    " (PARTITION BY priority, owner ORDER BY seq) AS turn FROM jobs WHERE status = 'queued'),"
    " last_start AS MATERIALIZED (SELECT w.owner, (SELECT MAX(s.started_at) FROM jobs s"
    " WHERE s.owner IS w.owner) AS at FROM (SELECT DISTINCT owner FROM waiting) w),"
    " places AS (SELECT w.seq, ROW_NUMBER() OVER (ORDER BY w.priority DESC, w.turn, l.at, w.seq)"
    " AS position FROM waiting w JOIN last_start l ON l.owner IS w.owner) "
)


def _tasks_of(kind: TaskKind | None) -> str:
    """The SQL list of the task names of ``kind`` (all tasks when None)."""
    return ", ".join(
        f"'{name}'" for name, spec in TASK_SPECS.items() if kind is None or spec.kind == kind
    )


@dataclass(frozen=True)
class Waiting:
    """A queued job as a dispatcher sees it."""

    id: str
    model: str
    task: str
    created_at: datetime


def planned_steps(params: GenerationParams) -> int:
    """What a job's progress counts up to: a training job's optimisation steps, or a
    generation's denoising steps over all its images."""
    if TASK_SPECS[params.task].kind == "train":
        return params.steps or 0
    return (params.num_inference_steps or 0) * params.num_images


def utcnow() -> str:
    """Now as ISO 8601 UTC text (sorts as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


@dataclass
class QueueSummary:
    """Counts of jobs by status and the jobs running right now."""

    counts: dict[str, int]
    running: list[JobRecord] = field(default_factory=list)


class JobQueue(Protocol):
    """The queue's seam (STYLE rule 2): what a worker needs from it."""

    def claim(self) -> JobRecord | None: ...
    def claim_compatible(self, job: JobRecord, images: int) -> list[JobRecord]: ...
    def get(self, job_id: str) -> JobRecord: ...
    def set_progress(self, job_id: str, step: int, total: int) -> None: ...
    def cancel_requested(self, job_id: str) -> bool: ...
    def finish(
        self, job_id: str, status: JobStatus, error: str | None = None
    ) -> JobRecord | None: ...
    def record_speed(self, job: JobRecord, device: str, seconds: float) -> None: ...


class SqliteJobQueue:
    """Jobs in SQLite. Thread-safe: workers and request handlers share one instance."""

    def __init__(self, db: Database, *, max_queued: int, max_attempts: int) -> None:
        self.db = db
        self.max_queued = max_queued
        self.max_attempts = max_attempts

    # --- submit and read ------------------------------------------------------------------------

    def submit(
        self,
        params: GenerationParams,
        *,
        priority: int = 0,
        owner: str | None = None,
        max_jobs: int | None = None,
        webhook: str | None = None,
    ) -> JobRecord:
        """Add a job with resolved ``params`` (and a checked ``webhook`` URL, POSTed when it
        ends). Raises QueueFull when max_queued are waiting, QuotaExceeded when ``owner`` has
        ``max_jobs`` queued or running (counted in the same transaction as the insert, so a
        burst cannot slip past)."""
        assert params.model is not None, "submit resolved params (model set)"
        job_id = uuid.uuid4().hex
        with self.db.transaction() as conn:
            (queued,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
            if queued >= self.max_queued:
                raise QueueFull(
                    f"the queue is full ({queued} jobs waiting, limit {self.max_queued}); "
                    "retry later"
                )
            if max_jobs is not None:
                (mine,) = conn.execute(
                    "SELECT COUNT(*) FROM jobs WHERE owner IS ? AND status IN"
                    " ('queued', 'running')",
                    (owner,),
                ).fetchone()
                if mine >= max_jobs:
                    wait = self._remaining("j.owner IS ? AND j.status = 'running'", (owner,))
                    raise QuotaExceeded(
                        f"this key may have {max_jobs} jobs queued or running at once (it has "
                        f"{mine}); wait for one to finish",
                        retry_after_s=max(1, min(3600, round(wait))) if wait else 10,
                    )
            conn.execute(
                "INSERT INTO jobs (id, task, model, params, width, height, priority, owner,"
                " status, total_steps, created_at, webhook)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                (
                    job_id,
                    params.task,
                    params.model,
                    json.dumps(params.to_dict()),
                    params.width,
                    params.height,
                    priority,
                    owner,
                    planned_steps(params),
                    utcnow(),
                    webhook,
                ),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        """The job with its images; raises JobNotFound."""
        rows = self.db.query(SELECT_JOBS + " WHERE j.id = ?", (job_id,))
        if not rows:
            raise JobNotFound(f"no job with id {job_id!r}", field="job_id")
        return self._with_images([_job(rows[0])])[0]

    def list(
        self, *, status: JobStatus | None = None, owner: str | None = None, limit: int = 50
    ) -> builtins.list[JobRecord]:
        """Jobs newest first, optionally only one status and/or one owner."""
        where, args = [], []
        if status is not None:
            where.append("j.status = ?")
            args.append(str(status))
        if owner is not None:
            where.append("j.owner = ?")
            args.append(owner)
        sql = SELECT_JOBS
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.db.query(sql + " ORDER BY j.seq DESC LIMIT ?", (*args, limit))
        return self._with_images([_job(r) for r in rows])

    def position(self, job_id: str) -> int | None:
        """1 for the next job to start, 2 for the one after, ...; None unless queued."""
        rows = self.db.query(SELECT_JOBS + " WHERE j.id = ?", (job_id,))
        return rows[0]["position"] if rows else None

    def summary(self) -> QueueSummary:
        return QueueSummary(
            counts=self.counts(), running=self.list(status=JobStatus.RUNNING, limit=100)
        )

    def counts(self) -> dict[str, int]:
        """Jobs by status, every status named (0 for none)."""
        counts = {s.value: 0 for s in JobStatus}
        for row in self.db.query("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            counts[row[0]] = row[1]
        return counts

    # --- the worker's side ----------------------------------------------------------------------

    def claim(self, *, kind: TaskKind | None = None) -> JobRecord | None:
        """Atomically take the next job (see :data:`PLACES`: highest priority, then taking
        turns between owners, then oldest first), of tasks of ``kind`` only if given, and mark
        it running.

        One UPDATE ... RETURNING: two workers (or processes) can never claim the same row.
        """
        tasks = _tasks_of(kind)
        with self.db.transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, step = 0,"
                f" started_at = ? WHERE seq = ({PLACES} SELECT p.seq FROM places p"
                f" JOIN jobs j ON j.seq = p.seq WHERE j.task IN ({tasks})"
                " ORDER BY p.position LIMIT 1) RETURNING *",
                (utcnow(),),
            ).fetchone()
        return _job(row) if row is not None else None

    def claim_id(self, job_id: str) -> JobRecord | None:
        """Take the queued job ``job_id`` (a dispatcher's choice) and mark it running; None
        when it is no longer queued (canceled meanwhile)."""
        with self.db.transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, step = 0,"
                " started_at = ? WHERE id = ? AND status = 'queued' RETURNING *",
                (utcnow(), job_id),
            ).fetchone()
        return _job(row) if row is not None else None

    def waiting(self, *, kind: TaskKind | None = None, limit: int = 1000) -> builtins.list[Waiting]:
        """The first ``limit`` queued jobs (of tasks of ``kind`` only, if given) in the order
        they start in, for a dispatcher to choose from."""
        rows = self.db.query(
            f"{PLACES} SELECT j.id, j.model, j.task, j.created_at FROM places p"
            f" JOIN jobs j ON j.seq = p.seq WHERE j.task IN ({_tasks_of(kind)})"
            " ORDER BY p.position LIMIT ?",
            (limit,),
        )
        return [
            Waiting(r["id"], r["model"], r["task"], datetime.fromisoformat(r["created_at"]))
            for r in rows
        ]

    def claim_compatible(self, job: JobRecord, images: int) -> builtins.list[JobRecord]:
        """Atomically take queued jobs that may share ``job``'s pipeline calls (dynamic
        batching: equal ``domain.batch_key``), of ``images`` images in all at most, and mark
        them running; in queue order. Empty when ``job`` never batches.

        The rule: only the front of the queue joins. The jobs are taken from position 1 on and
        the first that may not join ends the search, whatever its priority or owner (as does
        one with more images than are left), so a batch never makes a job wait that would
        have started before one it took: the queue's order (priority, owners taking turns,
        age) holds exactly, and a higher-priority job is never skipped. Skipping past a job of
        another kind would merge more often, but on a CPU a batch of n costs nearly n solo
        runs, so the skipped job would wait for all of them.
        """
        key = batch_key(job.params)
        if key is None or images <= 0:
            return []
        with self.db.transaction() as conn:
            front = conn.execute(
                f"{PLACES} SELECT j.seq, j.params FROM places p JOIN jobs j ON j.seq = p.seq"
                " ORDER BY p.position LIMIT ?",
                (images,),  # each job has at least one image
            ).fetchall()
            taken: builtins.list[int] = []
            for row in front:
                params = GenerationParams.from_dict(json.loads(row["params"]))
                if batch_key(params) != key or params.num_images > images:
                    break
                taken.append(row["seq"])
                images -= params.num_images
            if not taken:
                return []
            marks = ",".join("?" * len(taken))
            rows = conn.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, step = 0,"
                f" started_at = ? WHERE seq IN ({marks}) AND status = 'queued' RETURNING *",
                (utcnow(), *taken),
            ).fetchall()
        order = {seq: i for i, seq in enumerate(taken)}
        return [_job(r) for r in sorted(rows, key=lambda r: order[r["seq"]])]

    def set_progress(self, job_id: str, step: int, total: int) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET step = ?, total_steps = ? WHERE id = ?", (step, total, job_id)
            )

    def finish(self, job_id: str, status: JobStatus, error: str | None = None) -> JobRecord | None:
        """Record a running job's final status, or ``queued`` to put it back (which fails it
        instead after ``max_attempts`` starts: see the module docstring). Returns the job as it
        is now; None, changing nothing, when it is no longer ``running`` (another process
        recovered it)."""
        now = utcnow()
        with self.db.transaction() as conn:
            if status is JobStatus.QUEUED:
                cursor = conn.execute(
                    PUT_BACK + " AND id = :id",
                    {"max": self.max_attempts, "now": now, "id": job_id},
                )
            else:
                cursor = conn.execute(
                    "UPDATE jobs SET status = ?, error = ?, finished_at = ?"
                    " WHERE id = ? AND status = 'running'",
                    (str(status), error, now if status.final else None, job_id),
                )
            return self.get(job_id) if cursor.rowcount == 1 else None

    def cancel(self, job_id: str) -> JobRecord:
        """A queued job becomes canceled now; a running one is flagged and stops at its next
        step (see :meth:`cancel_requested`). Final jobs are left as they are."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET status = 'canceled', finished_at = ?"
                " WHERE id = ? AND status = 'queued'",
                (utcnow(), job_id),
            )
            conn.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'",
                (job_id,),
            )
        return self.get(job_id)

    def training_job_naming(self, name: str) -> str | None:
        """The id of a queued or running training job that will publish a LoRA called
        ``name``, if there is one."""
        rows = self.db.query(
            "SELECT id FROM jobs WHERE status IN ('queued', 'running')"
            f" AND task IN ({TRAIN_TASKS}) AND json_extract(params, '$.name') = ?"
            " ORDER BY seq LIMIT 1",
            (name,),
        )
        return str(rows[0][0]) if rows else None

    def cancel_requested(self, job_id: str) -> bool:
        rows = self.db.query("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        return bool(rows and rows[0][0])

    def recover(self) -> builtins.list[JobRecord]:
        """At start-up: put jobs a dead process left ``running`` back in the queue, or fail them
        when they have been started ``max_attempts`` times, or cancel them when a cancel was
        requested while they ran. Returns the jobs it touched."""
        now = utcnow()
        with self.db.transaction() as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM jobs WHERE status = 'running'")]
            # a cancel the user asked for before the crash still holds: never run it again
            conn.execute(
                "UPDATE jobs SET status = 'canceled', finished_at = ?"
                " WHERE status = 'running' AND cancel_requested = 1",
                (now,),
            )
            conn.execute(PUT_BACK, {"max": self.max_attempts, "now": now})
        return [self.get(i) for i in ids]

    # --- speed and ETA --------------------------------------------------------------------------

    def record_speed(self, job: JobRecord, device: str, seconds: float) -> None:
        """Fold one finished job's wall time into the (model, size, device) moving average."""
        p = job.params
        steps = (p.num_inference_steps or 1) * p.num_images
        observed = seconds / max(steps, 1)
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO step_timings VALUES (?, ?, ?, ?, ?, 1)"
                " ON CONFLICT (model, width, height, device) DO UPDATE SET"
                " seconds_per_step = seconds_per_step + ? * (excluded.seconds_per_step"
                " - seconds_per_step), samples = samples + 1",
                (job.model, p.width, p.height, device, observed, ALPHA),
            )

    def eta_seconds(self, job_id: str, workers: int = 1) -> float | None:
        """Seconds until the job finishes (see the module docstring); None when unknown."""
        job = self.db.query("SELECT status, seq FROM jobs WHERE id = ?", (job_id,))
        if not job:
            raise JobNotFound(f"no job with id {job_id!r}", field="job_id")
        status, seq = job[0]
        if JobStatus(status).final:
            return 0.0
        if status == "running":
            return self._remaining("id = ?", (job_id,))
        ahead = self._remaining(
            "status = 'running' OR j.seq IN (SELECT seq FROM places WHERE position <="
            " (SELECT position FROM places WHERE seq = ?))",
            (seq,),
        )
        return None if ahead is None else ahead / max(workers, 1)

    def seconds_until_free(self, workers: int = 1) -> float | None:
        """Seconds until the running jobs are done (so waiting ones move up); None if unknown."""
        running = self._remaining("status = 'running'", ())
        return None if running is None else running / max(workers, 1)

    def _remaining(self, where: str, args: tuple[object, ...]) -> float | None:
        """Summed remaining cost of the jobs matching ``where``; None if any speed is unknown.
        One query: this runs on every submit and every GET of a queued job."""
        (total, unknown) = self.db.query(
            PLACES
            + "SELECT SUM(t.speed * MAX(j.total_steps - j.step, 0)), COUNT(*) - COUNT(t.speed)"
            " FROM jobs AS j LEFT JOIN (SELECT model, width, height, MAX(seconds_per_step) AS"
            " speed FROM step_timings GROUP BY model, width, height) AS t"
            " ON t.model = j.model AND t.width = j.width AND t.height = j.height"
            f" AND j.task NOT IN ({TRAIN_TASKS})"
            f" WHERE {where}",
            args,
        )[0]
        return None if unknown else float(total or 0.0)

    # --- helpers --------------------------------------------------------------------------------

    def _with_images(self, jobs: builtins.list[JobRecord]) -> builtins.list[JobRecord]:
        if not jobs:
            return jobs
        by_id = {j.id: j for j in jobs}
        marks = ",".join("?" * len(by_id))
        for row in self.db.query(
            f"SELECT * FROM images WHERE job_id IN ({marks}) ORDER BY idx", tuple(by_id)
        ):
            by_id[row["job_id"]].images.append(image_record(row))
        return jobs


# Jobs with their queue position, computed in the same statement as the status so a reader never
# sees a `queued` job without a position (a worker may claim it between two statements).
SELECT_JOBS = PLACES + "SELECT j.*, p.position FROM jobs j LEFT JOIN places p ON p.seq = j.seq"


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        task=row["task"],
        model=row["model"],
        params=GenerationParams.from_dict(json.loads(row["params"])),
        priority=row["priority"],
        status=JobStatus(row["status"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        owner=row["owner"],
        attempts=row["attempts"],
        step=row["step"],
        total_steps=row["total_steps"],
        error=row["error"],
        started_at=parse_time(row["started_at"]),
        finished_at=parse_time(row["finished_at"]),
        position=row["position"] if "position" in row.keys() else None,
        webhook=row["webhook"],
    )


def image_record(row: sqlite3.Row) -> ImageRecord:
    return ImageRecord(
        id=row["id"],
        job_id=row["job_id"],
        seed=row["seed"],
        path=row["path"],
        width=row["width"],
        height=row["height"],
        prompt=row["prompt"],
        created_at=datetime.fromisoformat(row["created_at"]),
        kind=row["kind"],
        owner=row["owner"],
    )
