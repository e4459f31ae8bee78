"""Streaming submit on PostgreSQL, where items go in by COPY: the same rows as the executemany path,
a custom_id repeated across batches refused by name, and a died submit resumed by its key."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from aigc_core.errors import SpecError
from aigc_core.schema import Chunk, ChunkStatus, Item, Job, JobStatus
from scheduler import Client, bulk

pytestmark = pytest.mark.integration

BATCH = 400


@pytest.fixture
def pgclient(pg_clean, tmp_path, monkeypatch):
    monkeypatch.setattr(bulk, "STREAM_BATCH", BATCH)
    c = Client(database_url=pg_clean, storage_url=(tmp_path / "store").as_uri(), broker_url=None, chunk_size=8,
               cache_dir=tmp_path / "cache", backends="null=bench.null:NullGenerator")
    (tmp_path / "null").mkdir()
    c.register_model("null", "text", (tmp_path / "null").as_uri(), backend="null")
    return c


def prompts(n, start=0):
    for i in range(start, start + n):
        yield {"custom_id": f"p{i:05d}", "prompt": f"headline {i}", **({"params": {"top_k": 5}} if i % 7 == 0 else {})}


def test_copied_rows_are_the_rows_an_insert_writes(pgclient):
    n = 3 * BATCH + 5
    streamed = pgclient.submit("text", model="null", items=prompts(n), seed=7)
    with pgclient.db.session() as s:
        got = s.execute(select(Item.index, Item.chunk_no, Item.custom_id, Item.prompt, Item.params, Item.seed,
                               Item.status, Item.source, Item.messages)
                        .where(Item.job_id == streamed.id).order_by(Item.index)).all()
        chunks = dict(s.execute(select(Chunk.status, func.count()).where(Chunk.job_id == streamed.id)
                                .group_by(Chunk.status)).all())
    want = [(i, i // 8, f"p{i:05d}", f"headline {i}", {"top_k": 5} if i % 7 == 0 else {}, 7 + i, "pending", None,
             None) for i in range(n)]
    assert [(*r[:6], r.status.value, r.source, r.messages) for r in got] == want
    assert streamed.status == JobStatus.queued and chunks == {ChunkStatus.pending: (n + 7) // 8}
    assert pgclient.wait(streamed.id, timeout=300).counts["succeeded"] == n


def test_a_custom_id_repeated_in_a_later_batch_is_refused_and_nothing_stays(pgclient):
    def dup():
        yield from prompts(BATCH + 3)
        yield {"custom_id": "p00002", "prompt": "again"}

    with pytest.raises(SpecError, match=rf"items\[{BATCH + 3}\]\.custom_id: 'p00002' repeats"):
        pgclient.submit("text", model="null", items=dup())
    with pgclient.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
        assert s.scalar(select(func.count()).select_from(Item)) == 0


def test_a_died_submit_resumes_by_its_key(pgclient):
    def dies():
        yield from prompts(2 * BATCH + 1)
        raise OSError("input gone")

    with pytest.raises(OSError):
        pgclient.submit("text", model="null", items=dies(), idempotency_key="nightly-1")
    with pgclient.db.session() as s:
        job = s.scalars(select(Job).where(Job.idempotency_key == "nightly-1")).one()
        assert job.status == JobStatus.submitting and job.item_count == 2 * BATCH
    view = pgclient.submit("text", model="null", items=prompts(3 * BATCH), idempotency_key="nightly-1")
    assert view.id == job.id and view.status == JobStatus.queued and view.item_count == 3 * BATCH
