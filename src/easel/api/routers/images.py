"""/api/v1/images: the stored PNGs (with their metadata chunks) and a searchable list."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from easel.api.deps import ServicesDep
from easel.api.schemas import ErrorBody, ImagePublic

router = APIRouter(prefix="/images", tags=["images"])


@router.get("")
def list_images(
    services: ServicesDep,
    q: Annotated[str | None, Query(description="Keep images whose prompt contains this")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[ImagePublic]:
    """Stored images, newest first; ``q`` searches prompts (case-insensitive substring)."""
    return [ImagePublic.of(i) for i in services.list_images(q, limit)]


@router.get(
    "/{image_id}",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "The PNG with its parameters"},
        404: {"model": ErrorBody, "description": "Unknown image"},
    },
)
def get_image(image_id: str, services: ServicesDep) -> FileResponse:
    """The PNG file; its ``parameters`` (AUTOMATIC1111) and ``easel`` (JSON) text chunks hold
    everything needed to make the same pixels again."""
    return FileResponse(
        services.image_path(image_id),
        media_type="image/png",
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )
