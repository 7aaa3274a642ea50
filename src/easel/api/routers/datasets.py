"""/api/v1/datasets: training datasets for LoRA fine-tunes (task ``train_lora``), uploaded as
one zip or as images with their captions, checked and stored under ``EASEL_HOME/datasets``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.datastructures import UploadFile

from easel.api.deps import PrincipalDep, ServicesDep, get_services
from easel.api.schemas import (
    DatasetCreated,
    DatasetDetail,
    DatasetItemPublic,
    DatasetPublic,
    ErrorBody,
    dataset_url,
)
from easel.datasets import DatasetLimits
from easel.domain import InvalidParams

router = APIRouter(prefix="/datasets", tags=["datasets"])

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")

# The multipart body as the docs show it: the route parses it itself (see read_upload).
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A .zip of images with .txt captions or a "
                            "metadata.jsonl (at its root or in one top folder)",
                        },
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "Or: images, their .txt captions and/or a "
                            "metadata.jsonl (repeat the field)",
                        },
                        "allow_missing_captions": {
                            "type": "boolean",
                            "default": False,
                            "description": "Accept images without a caption (the trainer "
                            "gives them the trigger word alone)",
                        },
                    },
                }
            }
        },
    }
}


@dataclass
class DatasetUpload:
    files: list[tuple[str, bytes]]  # (file name, bytes)
    allow_missing_captions: bool


async def read_upload(request: Request) -> DatasetUpload:
    """The multipart form, parsed here rather than by FastAPI's ``File()`` parameters, whose
    parser takes at most 1000 files: a dataset of 1000 images with captions sends 2000. The
    body is already in memory (BodySizeLimit buffers it), so this does no blocking I/O."""
    limits = DatasetLimits.from_settings(get_services(request).settings)
    form = await request.form(max_files=limits.max_members + 1, max_fields=16)
    try:
        given, many = form.getlist("file"), form.getlist("files")
        if given and many:
            raise InvalidParams("send either one zip as `file` or images as `files`", field="file")
        if len(given) > 1:
            raise InvalidParams("send one zip as `file` (got several)", field="file")
        uploads = given + many
        if not uploads:
            raise InvalidParams(
                "send a .zip as `file`, or images and their captions as repeated `files`",
                field="file",
            )
        files = []
        for upload in uploads:
            if not isinstance(upload, UploadFile):
                raise InvalidParams(
                    "`file` and `files` must be files (multipart/form-data with file names)",
                    field="files" if many else "file",
                )
            files.append((upload.filename or "", await upload.read()))
        flag = str(form.get("allow_missing_captions", "")).strip().lower()
        if flag not in TRUE + FALSE:
            raise InvalidParams(
                f"allow_missing_captions must be true or false (got {flag!r})",
                field="allow_missing_captions",
            )
        return DatasetUpload(files, allow_missing_captions=flag in TRUE)
    finally:
        await form.close()


@router.post(
    "",
    status_code=201,
    openapi_extra=UPLOAD_BODY,
    responses={
        400: {"model": ErrorBody, "description": "Malformed multipart body"},
        413: {"model": ErrorBody, "description": "Body larger than max_dataset_upload_bytes"},
        422: {
            "model": ErrorBody,
            "description": "Not a dataset: bad images, missing captions, unsafe zip members, "
            "too many images or bytes (the message names the files)",
        },
    },
)
def create_dataset(
    upload: Annotated[DatasetUpload, Depends(read_upload)],
    services: ServicesDep,
    principal: PrincipalDep,
    response: Response,
) -> DatasetCreated:
    """Store a training dataset (multipart: one zip as ``file``, or images and captions as
    repeated ``files``). Everything is checked before anything is kept: images are decoded
    (format by content, pixel budget from the header), zip members are unpacked with a running
    byte cap, and unsafe paths, symlinks, nested zips and images without a caption are refused
    with a 422 naming them; nothing is stored on error."""
    record = services.create_dataset(
        upload.files, allow_missing_captions=upload.allow_missing_captions, principal=principal
    )
    response.headers["Location"] = dataset_url(record.id)
    return DatasetCreated(
        id=record.id,
        url=dataset_url(record.id),
        images=record.images,
        captions=record.captions,
        missing_captions=record.missing_captions,
    )


@router.get("")
def list_datasets(services: ServicesDep, principal: PrincipalDep) -> list[DatasetPublic]:
    """The key's stored datasets (an admin key: everyone's), newest first."""
    return [DatasetPublic.of(d) for d in services.list_datasets(principal)]


@router.get(
    "/{dataset_id}",
    responses={404: {"model": ErrorBody, "description": "Unknown dataset"}},
)
def get_dataset(dataset_id: str, services: ServicesDep, principal: PrincipalDep) -> DatasetDetail:
    """One dataset: its counts and each image's name, caption and size."""
    record = services.get_dataset(dataset_id, principal)
    dataset = services.load_dataset(dataset_id, principal)
    return DatasetDetail(
        **DatasetPublic.of(record).model_dump(),
        items=[
            DatasetItemPublic(
                file=item.source, caption=item.caption, width=item.width, height=item.height
            )
            for item in dataset.items
        ],
    )
