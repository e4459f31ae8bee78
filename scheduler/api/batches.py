"""/v1/batches: a validated input file becomes one job; the batch's status is read from the job, and
its output and error files are written from the committed artifacts once the job is final."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from sqlalchemy import select, tuple_, update
from sqlalchemy.exc import IntegrityError

from aigc_core.jobs import JobView
from aigc_core.schema import ApiBatch, ApiFile, JobStatus, utcnow
from scheduler.api.app import Api, ApiDep, Caller, CallerDep
from scheduler.api.errors import ApiError, not_found
from scheduler.api.files import get_file
from scheduler.openai_batch import (
    CHAT,
    ENDPOINTS,
    OutputNames,
    chat_supported,
    error_lines,
    output_lines,
    submit_requests,
)

router = APIRouter(prefix="/v1/batches")

WINDOW = "24h"


def _ts(d: datetime | None) -> int | None:
    return int(d.timestamp()) if d is not None else None


# ---- create ---------------------------------------------------------------------------------------

@router.post("")
def create(api: ApiDep, who: CallerDep, input_file_id: Annotated[str, Body()], endpoint: Annotated[str, Body()],
           completion_window: Annotated[str, Body()] = WINDOW,
           metadata: Annotated[dict[str, str] | None, Body()] = None) -> dict[str, Any]:
    if endpoint not in ENDPOINTS:
        raise ApiError(400, f"endpoint {endpoint!r} is not supported here; use one of {', '.join(ENDPOINTS)}.",
                       param="endpoint", code="invalid_value")
    if endpoint == CHAT and not chat_supported():
        # TODO(issue 13): map to chat items once they are in the job spec.
        raise ApiError(400, "/v1/chat/completions batches need chat items, which this build lacks; "
                       "use /v1/completions.", param="endpoint", code="unsupported_value")
    if completion_window != WINDOW:
        raise ApiError(400, f"completion_window must be {WINDOW!r}.", param="completion_window",
                       code="invalid_value")
    if metadata is not None and (len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items())):
        raise ApiError(400, "metadata: at most 16 pairs, keys up to 64 and values up to 512 characters.",
                       param="metadata", code="invalid_value")
    f = get_file(api, who, input_file_id, "input_file_id")
    if f.purpose != "batch":
        raise ApiError(400, f"file {f.id} has purpose {f.purpose!r}, not 'batch'.", param="input_file_id",
                       code="invalid_value")
    batch = ApiBatch(id=f"batch_{uuid.uuid4().hex}", owner=who.owner, endpoint=endpoint, input_file_id=f.id,
                     completion_window=completion_window, meta=metadata, created_at=utcnow())
    errors, job_id = _submit(api, batch, api.client.store.get(f.object_key))
    now = utcnow()
    if errors:
        batch.status, batch.failed_at = "failed", now
        batch.errors = {"object": "list", "data": errors}
    else:
        batch.job_id, batch.in_progress_at = job_id, now
    with api.client.db.session() as s:
        s.add(batch)
    return _retrieve(api, who, batch.id)


def _submit(api: Api, batch: ApiBatch, data: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """The errors (with line numbers) that leave the batch failed, or the id of the job it became."""
    errors, view = submit_requests(api.client, data, batch.endpoint, idempotency_key=batch.id,
                                   metadata={"openai_batch": batch.id, **(batch.meta or {})})
    return errors, view.id if view else None


# ---- read -----------------------------------------------------------------------------------------

@router.get("/{batch_id}")
def retrieve(api: ApiDep, who: CallerDep, batch_id: str) -> dict[str, Any]:
    return _retrieve(api, who, batch_id)


@router.get("")
def list_batches(api: ApiDep, who: CallerDep, after: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    q = select(ApiBatch.id)
    if who.auth:
        q = q.where(ApiBatch.owner == who.owner)
    if after:
        anchor = _get(api, who, after, "after")
        q = q.where(tuple_(ApiBatch.created_at, ApiBatch.id) < tuple_(anchor.created_at, anchor.id))
    with api.client.db.session() as s:
        ids = list(s.scalars(q.order_by(ApiBatch.created_at.desc(), ApiBatch.id.desc()).limit(limit + 1)))
    data = [_retrieve(api, who, i) for i in ids[:limit]]
    return {"object": "list", "data": data, "has_more": len(ids) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.post("/{batch_id}/cancel")
def cancel(api: ApiDep, who: CallerDep, batch_id: str) -> dict[str, Any]:
    b = _get(api, who, batch_id)
    if b.job_id is not None and b.status is None:
        with api.client.db.session() as s:
            s.execute(update(ApiBatch).where(ApiBatch.id == b.id, ApiBatch.cancelling_at.is_(None))
                      .values(cancelling_at=utcnow()))
        api.client.cancel(b.job_id)
    return _retrieve(api, who, batch_id)


def _get(api: Api, who: Caller, batch_id: str, param: str | None = None) -> ApiBatch:
    with api.client.db.session() as s:
        b = s.get(ApiBatch, batch_id)
        if b is None or not who.owns(b.owner):
            raise not_found("batch", batch_id, param)
        s.expunge(b)
        return b


def _retrieve(api: Api, who: Caller, batch_id: str) -> dict[str, Any]:
    b = _get(api, who, batch_id)
    view = api.client.status(b.job_id) if b.job_id else None
    if view is not None and view.final and b.status is None:
        _finalize(api, b, view)
        b = _get(api, who, batch_id)
    return batch_object(b, view)


def _status(b: ApiBatch, view: JobView | None) -> str:
    if b.status is not None:
        return b.status
    if view is None:
        return "validating"
    if view.final:
        return "finalizing"
    if view.status == JobStatus.cancelled or b.cancelling_at is not None:
        return "cancelling"
    return "in_progress"


def batch_object(b: ApiBatch, view: JobView | None) -> dict[str, Any]:
    counts = view.counts if view else {}
    total = view.item_count if view else 0
    return {
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "errors": b.errors,
        "input_file_id": b.input_file_id, "completion_window": b.completion_window, "status": _status(b, view),
        "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
        "created_at": _ts(b.created_at), "in_progress_at": _ts(b.in_progress_at),
        "expires_at": _ts(b.created_at + timedelta(hours=24)), "finalizing_at": _ts(b.finalizing_at),
        "completed_at": _ts(b.completed_at), "failed_at": _ts(b.failed_at), "expired_at": None,
        "cancelling_at": _ts(b.cancelling_at), "cancelled_at": _ts(b.cancelled_at),
        "request_counts": {"total": total, "completed": counts.get("succeeded", 0),
                           "failed": counts.get("failed", 0)},
        "metadata": b.meta, "model": view.model.partition("@")[0] if view else None,
    }


# ---- finalize -------------------------------------------------------------------------------------

def _finalize(api: Api, b: ApiBatch, view: JobView) -> None:
    """Write the output and error files (ids fixed by the batch's, so two writers agree) and mark the
    batch final. Built from the committed artifacts only: a restart loses nothing."""
    assert b.job_id is not None
    started = utcnow()
    created = _ts(view.finished_at) or _ts(started) or 0
    stem = b.id.removeprefix("batch_")
    names = OutputNames(stem, b.job_id)
    out_id = _write_file(api, b, f"file-{stem}-output", "batch_output.jsonl",
                         output_lines(api.client, view, b.endpoint, names, created))
    err_id = _write_file(api, b, f"file-{stem}-errors", "batch_errors.jsonl", error_lines(api.client, view, names))
    cancelled = view.status == JobStatus.cancelled
    now = utcnow()
    with api.client.db.session() as s:
        s.execute(update(ApiBatch).where(ApiBatch.id == b.id, ApiBatch.status.is_(None)).values(
            status="cancelled" if cancelled else "completed", output_file_id=out_id, error_file_id=err_id,
            finalizing_at=started, **({"cancelled_at": now} if cancelled else {"completed_at": now})))


def _write_file(api: Api, b: ApiBatch, file_id: str, name: str, lines: Iterator[bytes]) -> str | None:
    first = next(lines, None)
    if first is None:
        return None
    key = f"files/{file_id}"

    def chunks() -> Iterator[bytes]:
        yield first
        yield from lines

    info = api.client.store.put_stream(key, chunks(), "application/jsonl")
    try:
        with api.client.db.session() as s:
            s.add(ApiFile(id=file_id, owner=b.owner, filename=name, purpose="batch_output", bytes=info.size,
                          object_key=key))
    except IntegrityError:
        pass  # another request wrote the same file from the same artifacts
    return file_id
