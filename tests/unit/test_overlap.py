"""Storing micro-batch k while k+1 generates (worker/overlap.py): the overlap happens, and every
guarantee of in-line storing holds: nothing succeeds before its object is stored, cancellation
commits the batch in flight first, a background storage error gives every attempt back, and no
upload is still running once the chunk returns or raises."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import update

from aigc_core.errors import StorageError
from aigc_core.jobs import job_prefix
from aigc_core.schema import Item, ItemStatus, JobStatus
from tests.unit.test_pipeline import CountingStore, FakeGen, items, runtime, submit
from worker.pipeline import run_chunk


class TrackingStore(CountingStore):
    """Each put takes ``delay`` s and counts as running meanwhile; ``fail_on(key)`` true: it raises."""

    def __init__(self, inner, delay: float, fail_on=lambda key: False):
        super().__init__(inner)
        self.delay, self.fail_on = delay, fail_on
        self.running, self.lock = 0, threading.Lock()

    def put(self, key, data, content_type="application/octet-stream"):
        with self.lock:
            self.running += 1
        try:
            time.sleep(self.delay)
            if self.fail_on(key):
                raise StorageError("S3 refused this one")
            return super().put(key, data, content_type)
        finally:
            with self.lock:
                self.running -= 1


def statuses(client, job_id) -> dict[str, ItemStatus]:
    return {k: i.status for k, i in items(client, job_id).items()}


@pytest.mark.parametrize("overlap", [True, False])
def test_batch_k_is_stored_while_k_plus_1_generates_and_succeeds_only_once_stored(client, overlap):
    job = submit(client, ["a", "b", "cc", "dd"])  # micro-batches of 2: c0 c1, then c2 c3
    seen = {}
    store = TrackingStore(client.store, 0.3)

    def hook(n):
        if n == 2:  # the second batch begins generating; batch 1's PUTs (0.3 s each) start about now
            deadline = time.monotonic() + 1.0
            while overlap and store.running == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            seen["puts_running"] = store.running
            seen["status"] = statuses(client, job.id)

    rt = runtime(client, FakeGen(hook), store, micro_batch_size=2, overlap_storage=overlap, storage_workers=4)
    res = run_chunk(rt, job.id, 0)
    assert res.succeeded == 4 and store.running == 0
    if overlap:
        assert seen["puts_running"] > 0  # batch 1's PUTs were under way
        # ...and its items not yet succeeded: the row follows the object, never the other way round
        assert seen["status"]["c0"] == seen["status"]["c1"] == ItemStatus.running
    else:
        assert seen["puts_running"] == 0
        assert seen["status"]["c0"] == seen["status"]["c1"] == ItemStatus.succeeded
    prompts = {"c0": "a", "c1": "b", "c2": "cc", "c3": "dd"}
    for r in client.results(job.id):  # each row names its object, stored with the output
        assert client.store.get(r.key) == prompts[r.custom_id][::-1].encode()


def test_overlap_saves_the_store_time_of_all_but_the_last_batch(client):
    prompts = [f"p{i}" for i in range(8)]  # four micro-batches of 2

    def timed(overlap: bool) -> float:
        job = submit(client, prompts, chunk_size=8)
        gen = FakeGen(lambda n: time.sleep(0.2))  # 0.2 s per batch, as long as its store
        rt = runtime(client, gen, TrackingStore(client.store, 0.2), micro_batch_size=2, storage_workers=4,
                     overlap_storage=overlap, provenance_sidecars=False)
        t0 = time.perf_counter()
        assert run_chunk(rt, job.id, 0).succeeded == 8
        return time.perf_counter() - t0

    in_line, overlapped = timed(False), timed(True)
    # In line: 4 x (0.2 + 0.2) = 1.6 s; overlapped: 4 x 0.2 + the last store 0.2 = 1.0 s.
    assert in_line > 1.5 and overlapped < in_line - 0.4, (in_line, overlapped)


def test_cancelling_while_a_batch_is_stored_commits_that_batch_first(client):
    job = submit(client, ["a", "b", "c", "d"])
    store = TrackingStore(client.store, 0.3)
    gen = FakeGen(hook=lambda n: client.cancel(job.id) if n == 1 else None)
    res = run_chunk(runtime(client, gen, store, micro_batch_size=2), job.id, 0)
    assert len(gen.calls) == 1 and (res.succeeded, res.cancelled) == (2, 2) and store.running == 0
    view = client.status(job.id)
    assert view.status == JobStatus.cancelled and view.counts["succeeded"] == 2
    for r in client.results(job.id):
        assert (r.status == ItemStatus.succeeded) == (r.key is not None)
        if r.key:
            assert client.store.get(r.key) == {"c0": b"a", "c1": b"b"}[r.custom_id]


def test_a_background_storage_error_gives_every_attempt_back_and_leaves_no_object(client):
    job = submit(client, ["a", "b", "cc", "dd"])
    store = TrackingStore(client.store, 0.2, fail_on=lambda key: "/000000." in key and key.endswith(".txt"))
    gen = FakeGen()
    rt = runtime(client, gen, store, micro_batch_size=2)
    with pytest.raises(StorageError, match="refused this one"):
        run_chunk(rt, job.id, 0)
    assert store.running == 0
    puts = len(store.puts)
    time.sleep(0.5)
    assert len(store.puts) == puts  # nothing written after the chunk raised
    assert rt.storage_failed
    rows = items(client, job.id).values()
    assert {(i.status, i.attempts) for i in rows} == {(ItemStatus.pending, 0)}
    assert list(client.store.list(f"{job_prefix(job.id)}/items/")) == []
    rt.store.fail_on = lambda key: False
    assert run_chunk(rt, job.id, 0).succeeded == 4


def test_an_interrupt_while_the_next_batch_generates_waits_for_the_batch_in_flight(client):
    job = submit(client, ["a", "b", "cc", "dd"])
    store = TrackingStore(client.store, 0.3)

    def hook(n):
        if n == 2:
            deadline = time.monotonic() + 1.0
            while store.running == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            seen["puts_running"] = store.running  # batch 1 is being stored...
            raise KeyboardInterrupt  # ...when the worker is interrupted

    rt = runtime(client, FakeGen(hook), store, micro_batch_size=2, storage_workers=4)
    seen = {}
    with pytest.raises(KeyboardInterrupt):
        run_chunk(rt, job.id, 0)
    assert seen["puts_running"] > 0
    assert store.running == 0  # no upload outlives the chunk
    puts = len(store.puts)
    time.sleep(0.5)
    assert len(store.puts) == puts
    rows = items(client, job.id)
    # The batch in flight finished and committed; the interrupted one went back with its attempt.
    assert rows["c0"].status == rows["c1"].status == ItemStatus.succeeded
    assert {(rows[k].status, rows[k].attempts, rows[k].lease_until) for k in ("c2", "c3")} == {
        (ItemStatus.pending, 1, None)}


def test_a_retried_chunk_stores_each_item_before_the_next_begins(client):
    job = submit(client, ["a", "b", "c"])
    with client.db.session() as s:  # a delivery began them all and died
        s.execute(update(Item).where(Item.job_id == job.id).values(attempts=1))
    store = TrackingStore(client.store, 0.2)
    running = []
    rt = runtime(client, FakeGen(lambda n: running.append(store.running)), store, micro_batch_size=2)
    assert run_chunk(rt, job.id, 0).succeeded == 3
    assert running == [0, 0, 0]  # item by item, and never a PUT under way while the next generates
