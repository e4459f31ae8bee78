"""The reconciler's re-publishing of chunks whose messages may have been lost."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from aigc_core.reconcile import reconcile
from aigc_core.schema import Chunk, ChunkStatus, utcnow


def _chunk_state(client, job_id):
    with client.db.session() as s:
        return s.scalar(select(Chunk.status).where(Chunk.job_id == job_id))


def test_a_chunk_republished_before_waits_longer_each_time(client):
    job = client.submit("text", model="tiny", items=["a"])
    sent = []

    def publish(queue, job_id, chunk_no):
        sent.append((job_id, chunk_no))

    def published(ago_s, count):
        with client.db.session() as s:
            s.execute(update(Chunk).where(Chunk.job_id == job.id).values(
                status=ChunkStatus.published, publish_count=count, published_at=utcnow() - timedelta(seconds=ago_s)))

    published(25, 3)  # sent three times already: the next one waits 3 x 10 s
    reconcile(client.db, client.store, publish, stale_after_s=10)
    assert sent == [] and _chunk_state(client, job.id) == ChunkStatus.published
    published(35, 3)
    reconcile(client.db, client.store, publish, stale_after_s=10)
    assert sent == [(job.id, 0)]
    published(15, 1)  # sent once: one period is enough
    reconcile(client.db, client.store, publish, stale_after_s=10)
    assert sent == [(job.id, 0), (job.id, 0)]
