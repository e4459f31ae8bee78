"""Streaming submit (scheduler/bulk.py): batches in their own transactions while the job is
``submitting``, nothing runnable until it is whole, resumable by idempotency key."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from aigc_core.errors import IdempotencyConflict, SpecError
from aigc_core.schema import Chunk, ChunkStatus, Item, Job, JobStatus
from aigc_core.spec import iter_items_jsonl
from scheduler import Client, bulk

BATCH = 320  # ten chunks of 32 per transaction, so a few thousand items make many batches


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(bulk, "STREAM_BATCH", BATCH)


@pytest.fixture
def nclient(sqlite_settings, tmp_path, small_batches):
    """An embedded client with the benchmarks' null backend registered as ``null`` (no model to load)."""
    c = Client(sqlite_settings.model_copy(update={"backends": "null=bench.null:NullGenerator"}))
    (tmp_path / "null-model").mkdir()
    c.register_model("null", "text", (tmp_path / "null-model").as_uri(), backend="null")
    return c


def prompts(n: int, start: int = 0):
    for i in range(start, start + n):
        yield {"custom_id": f"p{i:06d}", "prompt": f"headline {i}"}


def rows(client, job_id):
    with client.db.session() as s:
        items = s.execute(select(Item.index, Item.custom_id, Item.seed, Item.chunk_no)
                          .where(Item.job_id == job_id).order_by(Item.index)).all()
        chunks = dict(s.execute(select(Chunk.status, func.count()).where(Chunk.job_id == job_id)
                                .group_by(Chunk.status)).all())
        job = s.get(Job, job_id)
        return items, chunks, job


def test_a_generator_larger_than_a_batch_is_written_whole_and_runs(nclient):
    n = 5 * BATCH + 17
    view = nclient.submit("text", model="null", items=prompts(n), seed=100)
    items, chunks, job = rows(nclient, view.id)
    assert view.status == JobStatus.queued and job.item_count == n
    assert [i.index for i in items] == list(range(n))
    assert [i.custom_id for i in items] == [f"p{i:06d}" for i in range(n)]
    assert [i.seed for i in items] == [100 + i for i in range(n)]
    cs = job.chunk_size
    assert all(i.chunk_no == i.index // cs for i in items)
    assert chunks == {ChunkStatus.pending: (n + cs - 1) // cs}
    assert [e["type"] for e in nclient.events(view.id)] == ["submitting", "submitted"]
    done = nclient.wait(view.id, timeout=300)
    assert done.status == JobStatus.succeeded and done.counts["succeeded"] == n


def test_items_without_custom_ids_are_numbered_across_batches(nclient):
    view = nclient.submit("text", model="null", items=(f"headline {i}" for i in range(2 * BATCH + 5)))
    items, _, _ = rows(nclient, view.id)
    assert [i.custom_id for i in items] == [str(i) for i in range(2 * BATCH + 5)]


def broken_after(n: int):
    yield from prompts(n)
    raise ConnectionError("the input went away")


def test_a_submit_that_dies_part_way_leaves_nothing_runnable_and_resumes_by_its_key(nclient):
    n = 4 * BATCH + 3
    with pytest.raises(ConnectionError):
        nclient.submit("text", model="null", items=broken_after(2 * BATCH + 50), idempotency_key="nightly")
    with nclient.db.session() as s:
        job_id = s.scalar(select(Job.id).where(Job.idempotency_key == "nightly"))
    items, chunks, job = rows(nclient, job_id)
    assert job.status == JobStatus.submitting and len(items) == 2 * BATCH  # whole batches only
    assert set(chunks) == {ChunkStatus.held}
    assert nclient.reconcile().published == 0  # nothing of it is sent
    assert nclient.status(job_id).status == JobStatus.submitting

    view = nclient.submit("text", model="null", items=prompts(n), idempotency_key="nightly")
    items, chunks, job = rows(nclient, job_id)
    assert view.id == job_id and view.status == JobStatus.queued
    assert [i.index for i in items] == list(range(n)) and job.item_count == n
    assert chunks == {ChunkStatus.pending: (n + job.chunk_size - 1) // job.chunk_size}
    # the same key and payload again: the same job, nothing written
    assert nclient.submit("text", model="null", items=prompts(n), idempotency_key="nightly").id == job_id
    assert rows(nclient, job_id)[0] == items


def test_a_resume_with_other_items_is_refused(nclient):
    with pytest.raises(ConnectionError):
        nclient.submit("text", model="null", items=broken_after(BATCH + 1), idempotency_key="k")
    changed = ({**it, "prompt": it["prompt"] + "!"} for it in prompts(3 * BATCH))
    with pytest.raises(IdempotencyConflict, match="differ"):
        nclient.submit("text", model="null", items=changed, idempotency_key="k")


def test_the_same_key_with_another_payload_after_the_job_is_whole_is_refused(nclient):
    nclient.submit("text", model="null", items=prompts(2 * BATCH), idempotency_key="k2")
    with pytest.raises(IdempotencyConflict):
        nclient.submit("text", model="null", items=prompts(2 * BATCH, start=1), idempotency_key="k2")


def test_a_bad_item_in_a_later_batch_names_its_place_and_leaves_no_job(nclient):
    def bad():
        yield from prompts(2 * BATCH + 7)
        yield {"custom_id": "x", "prompt": "y", "params": {"temperature": -1}}

    with pytest.raises(SpecError, match=rf"items\[{2 * BATCH + 7}\]\.params"):
        nclient.submit("text", model="null", items=bad())
    with nclient.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
        assert s.scalar(select(func.count()).select_from(Item)) == 0


def test_a_custom_id_repeated_across_batches_is_refused(nclient):
    def dup():
        yield from prompts(BATCH + 1)
        yield {"custom_id": "p000003", "prompt": "again"}

    with pytest.raises(SpecError, match=rf"items\[{BATCH + 1}\]\.custom_id: 'p000003' repeats"):
        nclient.submit("text", model="null", items=dup())
    with nclient.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_the_item_limit_holds_for_a_stream(nclient):
    limited = Client(nclient.settings.model_copy(update={"limits": nclient.settings.limits.model_copy(
        update={"max_items_per_job": 2 * BATCH})}))
    with pytest.raises(SpecError, match="over the limit"):
        limited.submit("text", model="null", items=prompts(2 * BATCH + 1))
    with limited.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_a_jsonl_file_is_read_lazily(nclient, tmp_path):
    f = tmp_path / "items.jsonl"
    f.write_text("".join(f'{{"custom_id": "c{i}", "prompt": "p {i}"}}\n' for i in range(3 * BATCH)) + "\n")
    it = iter_items_jsonl(f, nclient.settings.limits)
    assert next(it) == {"custom_id": "c0", "prompt": "p 0"}  # a generator: nothing else is read yet
    view = nclient.submit({"kind": "text", "model": "null", "items": iter_items_jsonl(f, nclient.settings.limits)})
    assert view.item_count == 3 * BATCH
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(SpecError, match="line 2"):
        list(iter_items_jsonl(tmp_path / "bad.jsonl", nclient.settings.limits))
