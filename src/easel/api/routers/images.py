"""/api/v1/images: the stored PNGs (with their metadata chunks), a searchable list, and
uploads of input images for editing jobs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Query, Response, UploadFile
from fastapi.responses import FileResponse

from easel.api.deps import PrincipalDep, ServicesDep
from easel.api.schemas import ErrorBody, ImagePublic, Upload, image_url

router = APIRouter(prefix="/images", tags=["images"])


@router.get("")
def list_images(
    services: ServicesDep,
    principal: PrincipalDep,
    q: Annotated[str | None, Query(description="Keep images whose prompt contains this")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    kind: Annotated[
        Literal["generated", "upload"] | None, Query(description="Only generated or uploaded")
    ] = None,
) -> list[ImagePublic]:
    """The key's stored images (an admin key: everyone's), newest first; ``q`` searches
    prompts (case-insensitive substring)."""
    return [ImagePublic.of(i) for i in services.list_images(q, limit, kind, principal)]


@router.post(
    "",
    status_code=201,
    responses={
        400: {"model": ErrorBody, "description": "Malformed multipart body"},
        413: {"model": ErrorBody, "description": "File larger than max_upload_bytes"},
        422: {
            "model": ErrorBody,
            "description": "Not a PNG/JPEG/WebP, damaged, or too many pixels",
        },
    },
)
def upload_image(
    file: Annotated[UploadFile, File(description="A PNG, JPEG or WebP image")],
    services: ServicesDep,
    principal: PrincipalDep,
    response: Response,
) -> Upload:
    """Store an input image for editing jobs (``image``, ``mask``, ``style_image``). It is
    decoded and checked first (format by content, not name; pixel budget read from the header,
    so a decompression bomb is refused without decoding it); nothing is stored on error."""
    data = file.file.read(services.settings.max_upload_bytes + 1)
    record = services.upload_image(data, principal)
    response.headers["Location"] = image_url(record.id)
    return Upload(id=record.id, url=image_url(record.id), width=record.width, height=record.height)


@router.get(
    "/{image_id}",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "The PNG with its parameters"},
        404: {"model": ErrorBody, "description": "Unknown image"},
    },
)
def get_image(image_id: str, services: ServicesDep, principal: PrincipalDep) -> FileResponse:
    """The PNG file; its ``parameters`` (AUTOMATIC1111) and ``easel`` (JSON) text chunks hold
    everything needed to make the same pixels again."""
    return FileResponse(
        services.image_path(image_id, principal),
        media_type="image/png",
        # private: a shared cache must not hand one key's image to another
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )
