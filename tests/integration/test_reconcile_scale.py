"""The reconciler at a large backlog, on PostgreSQL: it must keep working exactly when most is lost."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select, text

from aigc_core.db import Database
from aigc_core.reconcile import reconcile
from aigc_core.schema import Chunk, ChunkStatus, Item, ItemStatus, Job, JobStatus, utcnow
from aigc_core.storage import LocalStore

pytestmark = pytest.mark.integration

LOST = int(__import__("os").environ.get("AIGC_TEST_LOST_CHUNKS", 100_000))


def _backlog(db: Database, n: int) -> str:
    """One job of ``n`` one-item chunks, all published ten minutes ago and never run: what a Redis
    restarted empty leaves behind."""
    long_ago = utcnow() - timedelta(minutes=10)
    with db.session() as s:
        s.execute(insert(Job).values(id="backlog", kind="text", model_name="m", model_version=1, queue="text",
                                     status=JobStatus.queued, params={}, seed=0, meta={}, payload_digest="0",
                                     item_count=n, chunk_size=1, depends_on=[]))
        for start in range(0, n, 20_000):
            part = range(start, min(n, start + 20_000))
            s.execute(insert(Item), [{"job_id": "backlog", "index": i, "chunk_no": i, "custom_id": str(i),
                                      "prompt": "p", "params": {}, "seed": i, "status": ItemStatus.pending,
                                      "attempts": 0} for i in part])
            s.execute(insert(Chunk), [{"job_id": "backlog", "chunk_no": i, "status": ChunkStatus.published,
                                       "publish_count": 1, "published_at": long_ago, "created_at": long_ago}
                                      for i in part])
    with db.engine.connect() as c:  # what autovacuum does within a minute of a bulk insert
        c.execute(text("ANALYZE items, chunks, jobs"))
        c.commit()
    return "backlog"


def test_the_reconciler_republishes_100000_lost_chunks_in_bounded_passes(pg_clean, tmp_path):
    db = Database(pg_clean)
    _backlog(db, LOST)
    sent: set[tuple[str, int]] = set()
    reports = []
    while len(sent) < LOST and len(reports) < 20:
        rep = reconcile(db, LocalStore(tmp_path), lambda q, j, c: sent.add((j, c)), stale_after_s=3600,
                        held=lambda q: set(), lost_after_s=15)  # the broker answers: it holds nothing
        reports.append(rep)
    assert len(sent) == LOST
    # Bounded work per pass (10,000 chunks), each pass making progress: eleven passes at most.
    assert len(reports) <= 11 and all(0 < r.published <= 10_000 and r.publish_failed == 0 for r in reports)
    with db.session() as s:
        left = s.scalar(select(func.count()).select_from(Chunk).where(Chunk.status != ChunkStatus.published))
    assert left == 0
