"""/api/v1/workers (the workers, for any key) and /metrics (Prometheus text, admin keys)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from easel.api.deps import PrincipalDep, ServicesDep
from easel.api.schemas import WorkerPublic
from easel.jobs.metrics import CONTENT_TYPE

router = APIRouter(tags=["system"])
metrics_router = APIRouter(tags=["system"])  # at the root: where Prometheus looks by default


@router.get("/workers")
def workers(services: ServicesDep, principal: PrincipalDep) -> list[WorkerPublic]:
    """Every worker: its node, device and process, loaded models, state, current job (its id
    only for the job's owner and admin keys), jobs done, busy share and model loads."""
    return [WorkerPublic.of(s) for s in services.list_workers(principal)]


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
            "description": "The Prometheus text exposition format (version 0.0.4).",
        }
    },
)
def metrics(services: ServicesDep, principal: PrincipalDep) -> Response:
    """Prometheus metrics (admin keys): queue depth by state, job duration and queue wait
    histograms by model and task, model loads and load seconds per worker, each worker's state,
    busy ratio and jobs done. See docs/OPERATIONS.md for a scrape config."""
    return Response(services.metrics_text(principal), media_type=CONTENT_TYPE)
