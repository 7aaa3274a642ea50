"""What every tab that runs jobs shares: following a job's events for the page, and showing an
EaselError as a pop-up. Generate, Edit and Train submit through ``services`` and then read
:func:`follow_job` alike; each tab decides what a ``progress`` or ``succeeded`` event shows.

    job = services.submit_job(params, principal=acting_for(services, request))  # ui.access
    async for update in follow_job(services, job.id):
        if isinstance(update, Waiting):
            ...  # update.html: its place in the queue and the ETA, refreshed while it waits
        elif update.type == "progress":
            ...  # a JobEvent: started, progress, then one of succeeded / failed / canceled
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import gradio as gr

from easel.domain import EaselError
from easel.jobs.events import JobEvent, with_ticks
from easel.services import Services
from easel.ui import status

# While a job waits no event of its own arrives, yet its position moves: refresh this often.
REFRESH_S = 0.5


@dataclass(frozen=True)
class Waiting:
    """The job waits in the queue: its place now (1 starts next) and its ETA in seconds."""

    position: int | None
    eta_seconds: float | None

    @property
    def html(self) -> str:
        return status.queued_html(self.position, self.eta_seconds)


async def waiting_now(services: Services, job_id: str) -> Waiting:
    """Where the job waits now (read in a thread: it queries the database)."""
    position = await asyncio.to_thread(services.job_position, job_id)
    eta = await asyncio.to_thread(services.job_eta, job_id)
    return Waiting(position, eta)


async def follow_job(services: Services, job_id: str) -> AsyncIterator[JobEvent | Waiting]:
    """The job's events until its final one, for a page: while the job waits (until
    ``started``, and again after ``requeued`` when a draining server puts it back) its
    ``queued`` events and every quiet ``REFRESH_S`` become a fresh :class:`Waiting`, since
    other jobs finishing move it without an event of its own. Other events pass through."""
    waiting = True
    async for event in _events(services, job_id):
        if event is not None and event.type in ("started", "requeued"):
            waiting = event.type == "requeued"
        if event is None or event.type in ("queued", "requeued"):
            if waiting:
                yield await waiting_now(services, job_id)
            continue
        yield event


async def _events(services: Services, job_id: str) -> AsyncIterator[JobEvent | None]:
    """The job's events until its final one, and None after each quiet ``REFRESH_S``; the
    subscription ends cleanly when the page goes away."""
    async with contextlib.aclosing(with_ticks(services.subscribe(job_id), REFRESH_S)) as ticks:
        async for event in ticks:
            yield event
            if event is not None and event.final:
                return


@contextlib.contextmanager
def user_errors(title: str = "Error") -> Iterator[None]:
    """Show an EaselError as a pop-up with its message (which names the field), no traceback."""
    try:
        yield
    except EaselError as exc:
        raise gr.Error(exc.message, title=title) from None
