"""The reconciler's re-publishing of chunks whose messages may have been lost."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select, update

from aigc_core.reconcile import reconcile
from aigc_core.schema import Artifact, Chunk, ChunkStatus, Item, ItemStatus, utcnow


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


def test_a_chunk_the_broker_no_longer_holds_is_published_again_on_the_next_pass(client):
    lost = client.submit("text", model="tiny", items=["a"])
    queued = client.submit("text", model="tiny", items=["b"])
    fresh = client.submit("text", model="tiny", items=["c"])
    sent, asked = [], []

    def publish(queue, job_id, chunk_no):
        sent.append(job_id)

    def held(queue):  # the broker still has a message for `queued` only
        asked.append(queue)
        return {(queued.id, 0)}

    with client.db.session() as s:
        for job_id, ago in ((lost.id, 60), (queued.id, 60), (fresh.id, 2)):
            s.execute(update(Chunk).where(Chunk.job_id == job_id).values(
                status=ChunkStatus.published, publish_count=1, published_at=utcnow() - timedelta(seconds=ago)))
    rep = reconcile(client.db, client.store, publish, stale_after_s=3600, held=held, lost_after_s=15)
    assert asked == ["text"] and rep.lost_messages == 1
    assert sent == [lost.id]  # not the one still queued, nor the one published 2 s ago

    # A broker that cannot answer is no evidence of loss: nothing is sent before stale_after_s.
    sent.clear()
    with client.db.session() as s:
        s.execute(update(Chunk).where(Chunk.job_id == lost.id).values(
            published_at=utcnow() - timedelta(seconds=60)))
    rep = reconcile(client.db, client.store, publish, stale_after_s=3600, held=lambda q: None, lost_after_s=15)
    assert sent == [] and rep.lost_messages == 0


def test_chunks_whose_items_are_all_final_are_done_and_reopen_with_retry_failed(client):
    """Done chunks are what keeps the reconciler's candidate scan and the outbox count to open work."""
    job = client.submit("text", model="tiny", items=[f"p{i}" for i in range(10)])  # chunks of 4: 3 chunks
    client.wait(job.id, timeout=120)
    with client.db.session() as s:
        assert set(s.scalars(select(Chunk.status).where(Chunk.job_id == job.id))) == {ChunkStatus.done}
        item = s.scalar(select(Item.id).where(Item.job_id == job.id, Item.index == 5))
        s.execute(delete(Artifact).where(Artifact.item_id == item))  # as if it had failed
        s.execute(update(Item).where(Item.id == item).values(status=ItemStatus.failed, error="x"))
    assert client.retry_failed(job.id) == 1
    with client.db.session() as s:
        states = dict(s.execute(select(Chunk.chunk_no, Chunk.status).where(Chunk.job_id == job.id)).all())
    assert states == {0: ChunkStatus.done, 1: ChunkStatus.pending, 2: ChunkStatus.done}
    client.wait(job.id, timeout=120)
    with client.db.session() as s:
        assert set(s.scalars(select(Chunk.status).where(Chunk.job_id == job.id))) == {ChunkStatus.done}
