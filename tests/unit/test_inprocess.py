"""The embedded worker's drain (worker/inprocess.py): how often it reconciles, and that it never stops
while a pass would still find work."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from aigc_core.schema import Chunk, ChunkStatus, JobStatus
from tests.unit.test_pipeline import FakeGen
from worker import inprocess
from worker.pool import ModelPool
from worker.runtime import Runtime


@pytest.fixture
def rt(client):
    return Runtime(client.settings, client.db, client.store, pool=ModelPool(lambda ref: FakeGen(), 1 << 40),
                   device="cpu")


@pytest.fixture
def passes(monkeypatch):
    """Every reconcile pass drain makes, in order; ``before[i]`` runs ahead of pass i."""
    calls: list[int] = []
    before: dict[int, object] = {}
    real = inprocess.reconcile

    def counted(*a, **kw):
        calls.append(len(calls))
        if hook := before.get(len(calls) - 1):
            hook()
        return real(*a, **kw)

    monkeypatch.setattr(inprocess, "reconcile", counted)
    monkeypatch.setattr(inprocess, "RECONCILE_EVERY_S", 1e9)  # only the passes the drain's logic asks for
    return calls, before


def test_a_job_of_many_chunks_is_reconciled_at_its_start_and_its_end_not_after_each_chunk(client, rt, passes):
    job = client.submit("text", model="tiny", items=[f"prompt {i}" for i in range(24)])  # 6 chunks of 4
    assert inprocess.drain(rt, job.id) == 6
    view = client.status(job.id)
    assert view.status == JobStatus.succeeded and view.counts["succeeded"] == 24
    # Before the first chunk; after the chunk that ended the job; the loop ends on that pass.
    assert len(passes[0]) == 2


def test_drain_runs_what_its_last_pass_wakes_before_it_stops(client, rt, passes):
    """A chunk the reconciler puts back in the outbox late (a lease that expired meanwhile) still runs
    in this drain: the loop stops only after a pass that left nothing to take."""
    job = client.submit("text", model="tiny", items=[f"prompt {i}" for i in range(8)])  # 2 chunks

    def hold_back_chunk_1():  # chunk 1 looks taken by a delivery that then died
        with client.db.session() as s:
            s.execute(update(Chunk).where(Chunk.job_id == job.id, Chunk.chunk_no == 1)
                      .values(status=ChunkStatus.published))

    def wake_chunk_1():  # the pass finds it: back in the outbox
        with client.db.session() as s:
            s.execute(update(Chunk).where(Chunk.job_id == job.id, Chunk.chunk_no == 1)
                      .values(status=ChunkStatus.pending))

    calls, before = passes
    before[0], before[1] = hold_back_chunk_1, wake_chunk_1
    assert inprocess.drain(rt, job.id) == 2
    assert client.status(job.id).status == JobStatus.succeeded
    assert len(calls) == 3  # the first; the one after chunk 0 ran out of work (woke chunk 1); after the end


def test_a_long_drain_still_reconciles_on_the_clock(client, rt, passes, monkeypatch):
    monkeypatch.setattr(inprocess, "RECONCILE_EVERY_S", 0.0)
    job = client.submit("text", model="tiny", items=[f"prompt {i}" for i in range(12)])  # 3 chunks
    assert inprocess.drain(rt, job.id) == 3
    assert len(passes[0]) >= 4  # before each chunk, and the last
