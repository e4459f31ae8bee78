"""The embedded worker: with no broker, pending outbox rows are run here by the same pipeline code."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import select, update

from aigc_core.errors import TransientError
from aigc_core.jobs import _rowcount
from aigc_core.reconcile import reconcile
from aigc_core.schema import Chunk, ChunkStatus, utcnow
from worker.chunk import ChunkResult
from worker.pipeline import run_chunk
from worker.runtime import Runtime

log = logging.getLogger("aigc.worker")

RECONCILE_EVERY_S = 5.0  # while chunks run; and whenever one ends its job


def take_chunk(rt: Runtime, job_id: str | None = None) -> tuple[str, int] | None:
    """Mark the oldest pending outbox row as taken; it plays the part of the broker message."""
    with rt.db.session() as s:
        q = select(Chunk.job_id, Chunk.chunk_no).where(Chunk.status == ChunkStatus.pending)
        if job_id:
            q = q.where(Chunk.job_id == job_id)
        row = s.execute(q.order_by(Chunk.created_at, Chunk.chunk_no).limit(1)).first()
        if row is None:
            return None
        taken = _rowcount(s.execute(
            update(Chunk).where(Chunk.job_id == row.job_id, Chunk.chunk_no == row.chunk_no,
                                Chunk.status == ChunkStatus.pending)
            .values(status=ChunkStatus.published, published_at=utcnow(), publish_count=Chunk.publish_count + 1)
        ))
        return (row.job_id, row.chunk_no) if taken else None


def drain(rt: Runtime, job_id: str | None = None, *, on_chunk: Callable[[ChunkResult], None] | None = None,
          retries: int = 5) -> int:
    """Run every pending chunk (of one job, or all); returns how many chunks ran.

    The reconciler runs first, then again whenever a chunk ended its job (or gave up), at least every
    ``RECONCILE_EVERY_S`` while chunks run, and once more when the outbox looks empty: a chunk's own
    finalize already releases the jobs waiting for it, so a pass after every chunk (seven statements
    on PostgreSQL) would find nothing the next one does not. The loop ends only after a pass that
    found nothing to take."""
    n = 0
    force, last = True, 0.0
    while True:
        fresh = force or time.monotonic() - last >= RECONCILE_EVERY_S
        if fresh:
            reconcile(rt.db, rt.store, None, stale_after_s=rt.settings.republish_after_s)
            force, last = False, time.monotonic()
        taken = take_chunk(rt, job_id)
        if taken is None:
            if fresh:
                return n
            force = True  # empty since the last pass: one more, which may wake expired leases
            continue
        res = _run_with_retries(rt, *taken, retries=retries)
        n += 1
        if on_chunk and res is not None:
            on_chunk(res)
        if res is None or res.final_status is not None:
            force = True  # a job ended (or a chunk gave up): what waits on it is found now


def _run_with_retries(rt: Runtime, job_id: str, chunk_no: int, retries: int) -> ChunkResult | None:
    for attempt in range(retries + 1):
        try:
            return run_chunk(rt, job_id, chunk_no)
        except TransientError as e:
            wait = min(30.0, 0.5 * 2**attempt)
            log.warning("chunk %s/%d: %s; retry in %.1fs", job_id, chunk_no, e, wait,
                        extra={"job_id": job_id, "chunk": chunk_no})
            time.sleep(wait)
    log.error("chunk %s/%d: giving up for now; `aigc worker` picks it up again", job_id, chunk_no,
              extra={"job_id": job_id, "chunk": chunk_no})
    return None


def serve(rt: Runtime, poll_s: float = 1.0, stop: Callable[[], bool] = lambda: False) -> None:
    """``aigc worker`` with no broker: poll the outbox forever."""
    while not stop():
        if drain(rt) == 0:
            time.sleep(poll_s)
