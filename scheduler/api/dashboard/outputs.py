"""Output bytes: a short-lived presigned URL on S3, else streamed from the file store. The object key comes
from the item's committed Artifact row, never from the URL, and a local path must resolve inside the store."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from sqlalchemy import select

from aigc_core.errors import SpecError
from aigc_core.schema import Artifact, Item
from aigc_core.storage import LocalStore, S3Store, check_key
from scheduler.api.app import api_of
from scheduler.api.dashboard.session import viewer
from scheduler.api.dashboard.views import JOB_ID_CHARS, settings_of

router = APIRouter(include_in_schema=False)


@router.get("/outputs/{job_id}/{index}")
def output(request: Request, job_id: str, index: int) -> Response:
    viewer(request)  # a missing or expired session: the login page
    if not set(job_id) <= JOB_ID_CHARS or len(job_id) > 32:
        return _missing()
    client = api_of(request).client
    with client.db.session() as s:
        row = s.execute(select(Artifact.key, Artifact.media_type).join(Item, Item.id == Artifact.item_id)
                        .where(Item.job_id == job_id, Item.index == index)).first()
    if row is None:
        return _missing()
    key, media_type = row
    store = client.store
    if isinstance(store, S3Store):
        url = store.presign_get(check_key(key), settings_of(request).presign_s)
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "private, no-store"})
    if isinstance(store, LocalStore):
        path = inside(store.root, key)
        if path is None or not path.is_file():
            return _missing()
        return FileResponse(path, media_type=media_type, headers={
            "Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox"})
    return _missing()


def inside(root: Path, key: str) -> Path | None:
    """The file KEY names under ROOT, or None when the key is not a plain key or the path (symbolic links
    followed) leaves the store."""
    try:
        path = (root / check_key(key)).resolve()
    except (SpecError, OSError):
        return None
    return path if path.is_relative_to(root.resolve()) else None


def _missing() -> Response:
    return PlainTextResponse("not found", status_code=404)
