"""/api/v1/jobs: submit, read, list, cancel, and follow a job's events (SSE)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import TypeAdapter

from easel.api.deps import PrincipalDep, ServicesDep
from easel.api.schemas import ErrorBody, JobCreate, JobPublic
from easel.api.streams import EventStreamResponse, StreamSlots, client_of
from easel.domain import InvalidParams, JobRecord, JobStatus
from easel.jobs.events import JobEvent, with_ticks
from easel.services import Services

KEEPALIVE_S = 15.0  # SSE comment this often so proxies keep an idle stream open
MAX_EVENT_ID = 2**63 - 1  # SQLite's largest integer: a larger id cannot be compared in SQL
TIMESTAMP = TypeAdapter(datetime)  # events' times in the JSON form JobPublic's times take

router = APIRouter(prefix="/jobs", tags=["jobs"])
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Unknown job or model"},
    422: {"model": ErrorBody, "description": "A field is out of range (named in the error)"},
}


def job_public(services: Services, job: JobRecord) -> JobPublic:
    return JobPublic.of(
        job,
        position=job.position,
        eta_seconds=None if job.status.final else services.job_eta(job.id),
    )


@router.post(
    "",
    status_code=202,
    responses={
        **ERRORS,
        400: {"model": ErrorBody, "description": "Malformed JSON"},
        403: {"model": ErrorBody, "description": "The key lacks the task's scope"},
        409: {"model": ErrorBody, "description": "Model known but not on this machine"},
        413: {"model": ErrorBody, "description": "Body larger than max_body_bytes"},
        429: {
            "model": ErrorBody,
            "description": "Queue full, or the key's job or rate quota used up; see Retry-After",
        },
    },
)
def create_job(
    body: JobCreate, services: ServicesDep, principal: PrincipalDep, response: Response
) -> JobPublic:
    """Queue a job: a generation, an edit or a ``train_lora`` fine-tune (scope ``train``).
    Returns at once (202) with the job; follow it with GET or events."""
    job = services.submit_job(
        body.to_params(), priority=body.priority, principal=principal, webhook=body.webhook
    )
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    return job_public(services, job)


@router.get("")
def list_jobs(
    services: ServicesDep,
    principal: PrincipalDep,
    status: Literal["queued", "running", "succeeded", "failed", "canceled"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[JobPublic]:
    """The key's jobs (an admin key: everyone's), newest first, optionally only those with
    one status."""
    wanted = JobStatus(status) if status else None
    return [job_public(services, j) for j in services.list_jobs(wanted, limit, principal)]


@router.get("/{job_id}", responses=ERRORS)
def get_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JobPublic:
    """Status, queue position, ETA, progress, images, error, attempts and params of a job."""
    return job_public(services, services.get_job(job_id, principal))


@router.delete("/{job_id}", responses=ERRORS)
def cancel_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JobPublic:
    """Cancel: a queued job never starts; a running one stops at its next step (its status
    turns ``canceled`` a moment later). Cancelling a finished job changes nothing."""
    return job_public(services, services.cancel_job(job_id, principal))


@router.get(
    "/{job_id}/events",
    responses={
        **ERRORS,
        200: {"content": {"text/event-stream": {}}},
        429: {
            "model": ErrorBody,
            "description": "The client has max_streams_per_client streams open, or the key's "
            "rate is used up; see Retry-After",
        },
        503: {
            "model": ErrorBody,
            "description": "The server has max_streams streams open; see Retry-After",
        },
    },
    response_class=StreamingResponse,
)
async def job_events(
    request: Request,
    job_id: str,
    services: ServicesDep,
    principal: PrincipalDep,
    last_event_id: Annotated[
        str | None,
        Header(
            description="The id of the last event received: the stream starts after it",
            # what the route takes: the decimal digits of an event id (read below, so that
            # "²", which str.isdigit() accepts, or 5000 zeros, get a 422 naming the header);
            # a header is absent rather than null
            json_schema_extra=lambda schema: schema.update(
                anyOf=[{"type": "integer", "minimum": 0, "maximum": MAX_EVENT_ID}]
            ),
        ),
    ] = None,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_EVENT_ID, description="Same as Last-Event-ID")
    ] = None,
) -> StreamingResponse:
    """Server-Sent Events of one job: ``queued``, ``started``, ``progress``, ``succeeded``,
    ``failed``, ``canceled`` (and ``requeued`` after a restart). Each has an ``id``; reconnect
    with ``Last-Event-ID`` to get exactly the events after it. The stream ends after the final
    event, or after ``server-stopping`` (no ``id``) when the server shuts down. A client may
    hold ``max_streams_per_client`` streams at once (429 past it), the server ``max_streams``
    (503)."""
    since = after or 0
    if last_event_id is not None:
        text = last_event_id.strip()
        # ASCII digits only ("²".isdigit() is true), and no longer than the largest id
        digits = text.isascii() and text.isdigit() and len(text) <= len(str(MAX_EVENT_ID))
        if not digits or int(text) > MAX_EVENT_ID:
            raise InvalidParams(
                f"Last-Event-ID must be an event id from 0 to {MAX_EVENT_ID} "
                f"(got {last_event_id!r})",
                field="last_event_id",
            )
        since = int(text)
    slots: StreamSlots = request.app.state.streams
    slot = slots.take(client_of(principal, request.client.host if request.client else None))
    try:
        # 404 now, not mid-stream: a database read, off the loop
        await asyncio.to_thread(services.get_job, job_id, principal)
    except BaseException:
        slot.release()
        raise
    return EventStreamResponse(
        sse_stream(services.subscribe(job_id, since)),
        slot=slot,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def sse_format(event: JobEvent) -> str:
    created_at = TIMESTAMP.dump_python(datetime.fromisoformat(event.created_at), mode="json")
    data = {"job_id": event.job_id, "created_at": created_at, **event.data}
    # server-stopping has no id: a reconnect's Last-Event-ID stays the job's last real event
    id_line = f"id: {event.id}\n" if event.id else ""
    return f"{id_line}event: {event.type}\ndata: {json.dumps(data)}\n\n"


async def sse_stream(events: AsyncIterator[JobEvent]) -> AsyncIterator[str]:
    """Format events for SSE, with a keep-alive comment while nothing happens."""
    yield "retry: 1000\n\n"
    async with aclosing(with_ticks(events, KEEPALIVE_S)) as ticks:
        async for event in ticks:
            yield ": keep-alive\n\n" if event is None else sse_format(event)
