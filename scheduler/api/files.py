"""/v1/files: upload (purpose=batch), list, retrieve, content, delete. The bytes live in the object
store under ``files/<id>``; the row says whose file it is."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sqlalchemy import select, tuple_

from aigc_core.schema import ApiFile
from scheduler.api.app import Api, ApiDep, Caller, CallerDep
from scheduler.api.errors import ApiError, not_found

router = APIRouter(prefix="/v1/files")

READ_CHUNK = 1 << 20


def file_object(f: ApiFile) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at.timestamp()),
            "filename": f.filename, "purpose": f.purpose, "status": "processed", "expires_at": None,
            "status_details": None}


def get_file(api: Api, who: Caller, file_id: str, param: str | None = None) -> ApiFile:
    with api.client.db.session() as s:
        f = s.get(ApiFile, file_id)
        if f is None or not who.owns(f.owner):
            raise not_found("file", file_id, param)
        s.expunge(f)
        return f


def store_file(api: Api, owner: str | None, file_id: str, filename: str, purpose: str, data: bytes) -> ApiFile:
    """Object first, row second: no row points at a missing object."""
    key = f"files/{file_id}"
    api.client.store.put(key, data, "application/jsonl")
    with api.client.db.session() as s:
        f = ApiFile(id=file_id, owner=owner, filename=filename, purpose=purpose, bytes=len(data), object_key=key)
        s.add(f)
        s.flush()
        s.expunge(f)
        return f


@router.post("")
async def upload(api: ApiDep, who: CallerDep, file: Annotated[UploadFile, File()],
                 purpose: Annotated[str, Form()]) -> dict[str, Any]:
    if purpose != "batch":
        raise ApiError(400, f"purpose {purpose!r} is not supported here; use 'batch'.", param="purpose",
                       code="invalid_value")
    cap = api.max_file_bytes
    parts, size = [], 0
    while chunk := await file.read(READ_CHUNK):
        size += len(chunk)
        if size > cap:
            raise ApiError(413, f"The file is larger than the limit of {cap} bytes (AIGC_API_MAX_FILE_BYTES).",
                           param="file", code="file_too_large")
        parts.append(chunk)
    name = (file.filename or "upload.jsonl").replace("/", "_")[:255]
    # the store and the database block: off the event loop
    f = await run_in_threadpool(store_file, api, who.owner, f"file-{uuid.uuid4().hex}", name, purpose,
                                b"".join(parts))
    return file_object(f)


@router.get("")
def list_files(api: ApiDep, who: CallerDep, purpose: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
               after: str | None = None, order: str = "desc") -> dict[str, Any]:
    q = select(ApiFile)
    if who.auth:
        q = q.where(ApiFile.owner == who.owner)
    if purpose:
        q = q.where(ApiFile.purpose == purpose)
    desc = order != "asc"
    if after:
        anchor = get_file(api, who, after, "after")
        row, mark = tuple_(ApiFile.created_at, ApiFile.id), tuple_(anchor.created_at, anchor.id)
        q = q.where(row < mark if desc else row > mark)
    order_by = (ApiFile.created_at.desc(), ApiFile.id.desc()) if desc else (ApiFile.created_at, ApiFile.id)
    with api.client.db.session() as s:
        rows = list(s.scalars(q.order_by(*order_by).limit(limit + 1)))
        data = [file_object(f) for f in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/{file_id}")
def retrieve(api: ApiDep, who: CallerDep, file_id: str) -> dict[str, Any]:
    return file_object(get_file(api, who, file_id))


@router.get("/{file_id}/content")
def content(api: ApiDep, who: CallerDep, file_id: str) -> Response:
    f = get_file(api, who, file_id)
    return Response(api.client.store.get(f.object_key), media_type="application/jsonl")


@router.delete("/{file_id}")
def delete(api: ApiDep, who: CallerDep, file_id: str) -> dict[str, Any]:
    f = get_file(api, who, file_id)
    with api.client.db.session() as s:
        row = s.get(ApiFile, f.id)
        if row is not None:
            s.delete(row)
    api.client.store.delete([f.object_key])
    return {"id": f.id, "object": "file", "deleted": True}
