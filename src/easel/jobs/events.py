"""Job events: persisted with increasing ids, delivered live to async subscribers.

Every event is written to the ``events`` table first (its row id is the SSE id, increasing
across restarts), then handed to the event loop. Workers run in threads, so the hand-over is the
one idiom of STYLE rule 6: ``loop.call_soon_threadsafe(inbox.put_nowait, event)``, and a single
async pump fans events out to the subscribers of that job.

A subscriber registers before it reads the backlog from the database, so an event is either in
the backlog, or delivered live, or both (deduplicated by id): a reconnect with ``Last-Event-ID``
misses nothing.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from easel.domain import JobNotFound, JobStatus
from easel.jobs.db import Database
from easel.jobs.queue import utcnow

EventType = Literal[
    "queued",
    "started",
    "progress",
    "succeeded",
    "failed",
    "canceled",
    "requeued",
    "server-stopping",
]
FINAL_EVENTS = frozenset({"succeeded", "failed", "canceled"})
# Not stored and not a job's: the last event of every stream still open when the server stops
# (id 0, so a client's Last-Event-ID stays at the job's last real event for its reconnect).
SERVER_STOPPING: EventType = "server-stopping"


@dataclass
class JobEvent:
    """One thing that happened to a job. ``data`` is JSON-ready (see docs/API.md per type)."""

    id: int
    job_id: str
    type: EventType
    data: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    @property
    def final(self) -> bool:
        """The last event of a subscription: the job's final one, or ``server-stopping``."""
        return self.type in FINAL_EVENTS or self.type == SERVER_STOPPING


class EventBus:
    """Publish from any thread; subscribe from the event loop."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[JobEvent] | None = None
        self._subscribers: dict[str, set[asyncio.Queue[JobEvent]]] = {}
        self._pump_task: asyncio.Task[None] | None = None  # held: the loop keeps weak refs
        self._attach_lock = threading.Lock()
        self._stopping = False  # set on the loop by the pump: subscriptions end
        # run inside the transaction of each final event (the webhook outbox's enqueue), so
        # what they write commits, or rolls back, with the job's end
        self.final_hooks: list[Callable[[JobEvent], None]] = []

    def publish(self, job_id: str, type: EventType, data: dict[str, Any] | None = None) -> JobEvent:
        """Persist an event and forward it to live subscribers once it has committed (with the
        transaction it is part of, if any): a subscriber never sees an event that a failed
        commit took back, such as a final event whose job is still running. A final event
        runs ``final_hooks`` in the same transaction. Safe from any thread."""
        payload = data or {}
        created = utcnow()
        with self.db.transaction() as conn:
            row = conn.execute(
                "INSERT INTO events (job_id, type, data, created_at) VALUES (?, ?, ?, ?)"
                " RETURNING id",
                (job_id, type, json.dumps(payload), created),
            ).fetchone()
            event = JobEvent(id=row[0], job_id=job_id, type=type, data=payload, created_at=created)
            if type in FINAL_EVENTS:
                for hook in self.final_hooks:
                    hook(event)
            self.db.after_commit(lambda: self._deliver(event))
        return event

    def _deliver(self, event: JobEvent) -> None:
        loop, inbox = self._loop, self._inbox
        if loop is not None and inbox is not None and not loop.is_closed():
            loop.call_soon_threadsafe(inbox.put_nowait, event)

    def drop_previews(self, job_id: str) -> None:
        """Remove the preview images from a finished job's stored progress events: they matter
        only while it runs, and are most of the table's bytes. Ids and steps stay for replay."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE events SET data = json_remove(data, '$.preview')"
                " WHERE job_id = ? AND type = 'progress'",
                (job_id,),
            )

    def history(self, job_id: str, after: int = 0) -> list[JobEvent]:
        """The job's persisted events with id > ``after``, oldest first."""
        rows = self.db.query(
            "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after)
        )
        return [
            JobEvent(
                id=r["id"],
                job_id=r["job_id"],
                type=r["type"],
                data=json.loads(r["data"]),
                created_at=r["created_at"],
            )
            for r in rows
        ]

    async def subscribe(self, job_id: str, last_event_id: int = 0) -> AsyncIterator[JobEvent]:
        """Events of one job after ``last_event_id``: the backlog, then live ones, until a final
        event (succeeded, failed, canceled), or the end of the backlog when the job is already
        final (e.g. a client that saw the final event reconnects with its id), or until a
        ``server-stopping`` event after :meth:`stop_streams`. Raises JobNotFound on the first
        step for an unknown job."""
        self._attach(asyncio.get_running_loop())
        mailbox: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._subscribers.setdefault(job_id, set()).add(mailbox)
        if self._stopping:
            mailbox.put_nowait(stopping_event(job_id))
        try:
            seen = last_event_id
            ended, backlog = await asyncio.to_thread(self._backlog, job_id, last_event_id)
            for event in backlog:
                seen = event.id
                yield event
                if event.final:
                    return
            if ended:
                return
            while True:
                event = await mailbox.get()
                if event.type == SERVER_STOPPING:
                    yield event
                    return
                if event.id > seen:  # else it was in the backlog, or is before last_event_id
                    seen = event.id
                    yield event
                if event.final:  # the job is over, whether or not the client needed this one
                    return
        finally:
            self._subscribers[job_id].discard(mailbox)
            if not self._subscribers[job_id]:
                del self._subscribers[job_id]

    def _backlog(self, job_id: str, after: int) -> tuple[bool, list[JobEvent]]:
        """Whether the job is final, and its events after ``after``. The status is read first:
        a job's final status commits with its final event, so when it reads final every event
        there will be is in the backlog, and waiting for more would wait forever."""
        rows = self.db.query("SELECT status FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(f"no job with id {job_id!r}", field="job_id")
        return JobStatus(rows[0][0]).final, self.history(job_id, after)

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the loop subscribers run on (the server's), starting the pump once per loop."""
        with self._attach_lock:
            if self._loop is loop:
                return
            self._inbox = asyncio.Queue()
            self._loop = loop
            self._pump_task = loop.create_task(self._pump(self._inbox))

    def stop_streams(self) -> None:
        """End every subscription, now and from now on, with a ``server-stopping`` event (the
        server is shutting down). It goes through the pump after the events already published,
        so a subscriber sees those first (e.g. the ``requeued`` of a drained job). Safe from any
        thread."""
        loop, inbox = self._loop, self._inbox
        if loop is not None and inbox is not None and not loop.is_closed():
            loop.call_soon_threadsafe(inbox.put_nowait, stopping_event(""))
        else:  # nobody has subscribed yet: whoever does is told at once
            self._stopping = True

    async def _pump(self, inbox: asyncio.Queue[JobEvent]) -> None:
        while True:
            event = await inbox.get()
            if event.type == SERVER_STOPPING:
                self._stopping = True
                for job_id, mailboxes in self._subscribers.items():
                    for mailbox in mailboxes:
                        mailbox.put_nowait(stopping_event(job_id))
                continue
            for mailbox in self._subscribers.get(event.job_id, ()):
                mailbox.put_nowait(event)


def stopping_event(job_id: str) -> JobEvent:
    """The ``server-stopping`` event a subscription of ``job_id`` ends with."""
    return JobEvent(
        id=0,
        job_id=job_id,
        type=SERVER_STOPPING,
        data={"reason": "the server is stopping; reconnect with Last-Event-ID once it is back"},
        created_at=utcnow(),
    )


async def with_ticks(events: AsyncIterator[Any], every_s: float) -> AsyncGenerator[Any, None]:
    """``events``, with None whenever ``every_s`` pass without one (an SSE keep-alive, a page
    refreshing its ETA). Closing it closes ``events`` (use ``contextlib.aclosing``)."""
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield event
    finally:
        if pending is not None and not pending.done():
            pending.cancel()  # ends ``events`` too (the cancellation runs its cleanup)
        elif isinstance(events, AsyncGenerator):
            await events.aclose()
