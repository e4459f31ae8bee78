"""The batch pipeline with a fake backend: isolation, redelivery, leases, cancellation, faults."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from aigc_core.errors import ModelLoadError, StorageError, TransientError
from aigc_core.jobs import job_prefix, sidecar_of
from aigc_core.schema import Artifact, Item, ItemStatus, JobStatus, utcnow
from aigc_models import Output
from worker.pipeline import run_chunk
from worker.pool import ModelPool
from worker.runtime import Runtime


class FakeGen:
    """Reverses the prompt; raises on prompts containing BOOM; can call a hook per batch."""

    device = "cpu"

    def __init__(self, hook=None):
        self.calls: list[list[int]] = []
        self.hook = hook

    def generate(self, reqs):
        self.calls.append([r.index for r in reqs])
        if self.hook:
            self.hook(len(self.calls))
        if any("BOOM" in r.prompt for r in reqs):
            raise RuntimeError("the backend exploded")
        return [Output(r.prompt[::-1].encode(), "text/plain; charset=utf-8", "txt", {"seed": r.seed}) for r in reqs]

    def memory_bytes(self):
        return 1

    def describe(self):
        return {"class": "FakeGen"}


class CountingStore:
    """Records the keys put; while ``puts_down``, every put fails as an S3 outage would."""

    def __init__(self, inner, puts_down: bool = False):
        self.inner, self.puts, self.puts_down = inner, [], puts_down

    def put(self, key, data, content_type="application/octet-stream"):
        if self.puts_down:
            raise StorageError("S3 is down")
        self.puts.append(key)
        return self.inner.put(key, data, content_type)

    def put_stream(self, key, chunks, content_type="application/octet-stream"):
        """Streamed objects (the manifest) go through ``put``, so the hooks below see them too."""
        return self.put(key, b"".join(chunks), content_type)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def runtime(client, gen, store=None, pool=None, **overrides) -> Runtime:
    # Sidecars on (not the default) unless a test says otherwise: two objects per item, the harder
    # case for every fencing check below, and each sidecar is held to its row.
    settings = client.settings.model_copy(update={"provenance_sidecars": True, **overrides})
    return Runtime(settings, client.db, store or CountingStore(client.store),
                   pool=pool or ModelPool(lambda ref: gen, 1 << 40), device="cpu")


def items(client, job_id):
    with client.db.session() as s:
        return {i.custom_id: i for i in s.scalars(select(Item).where(Item.job_id == job_id))}


def submit(client, prompts, **kw):
    return client.submit("text", model="tiny", items=[{"custom_id": f"c{i}", "prompt": p}
                                                      for i, p in enumerate(prompts)], **kw)


def test_one_bad_item_fails_alone_with_its_reason(client):
    job = submit(client, ["one", "two BOOM", "three", "four"])
    rt = runtime(client, FakeGen())
    res = run_chunk(rt, job.id, 0)
    assert (res.succeeded, res.failed) == (3, 1)
    it = items(client, job.id)
    assert it["c1"].status == ItemStatus.failed and "the backend exploded" in it["c1"].error
    assert {it[c].status for c in ("c0", "c2", "c3")} == {ItemStatus.succeeded}
    view = client.status(job.id)
    assert view.status == JobStatus.partially_failed
    errors = rt.store.get(f"jobs/{job.id}/errors.jsonl").decode().splitlines()
    assert [json.loads(e)["custom_id"] for e in errors] == ["c1"]


def test_redelivered_chunk_writes_each_output_once(client):
    job = submit(client, ["a", "b", "c", "d"])
    rt = runtime(client, FakeGen())
    first = run_chunk(rt, job.id, 0)
    puts_after_first = list(rt.store.puts)
    second = run_chunk(rt, job.id, 0)
    assert (first.claimed, second.claimed) == (4, 0)
    assert [k for k in rt.store.puts if "/items/" in k] == [k for k in puts_after_first if "/items/" in k]
    with client.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job.id)) == 4


def test_a_chunk_running_elsewhere_is_not_claimed_until_its_lease_expires(client):
    job = submit(client, ["a", "b"])
    import time

    gen = FakeGen()
    slow = runtime(client, gen, lease_s=2)
    other = runtime(client, gen)
    state = {}

    def redeliver_meanwhile(n):
        if n == 1:  # while the first delivery generates: a second one claims nothing...
            state["early"] = run_chunk(other, job.id, 0).claimed
            time.sleep(2.1)  # ...until the first one's lease has expired
            state["late"] = run_chunk(other, job.id, 0).succeeded

    gen.hook = redeliver_meanwhile
    first = run_chunk(slow, job.id, 0)
    assert state == {"early": 0, "late": 2}
    assert first.succeeded == 0  # the first delivery lost its claim and committed nothing
    with client.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job.id)) == 2
    # ...and wrote nothing over the winner's objects: each sidecar matches its committed row.
    assert not [k for k in slow.store.puts if "/items/" in k]
    for r in client.results(job.id):
        assert json.loads(client.store.get(r.key.replace(".txt", ".provenance.json"))) == r.provenance
    assert client.status(job.id).status == JobStatus.succeeded


class Shouting(FakeGen):
    """Another worker's output for the same item: different bytes, so an overwrite shows."""

    def generate(self, reqs):
        return [Output(o.data.upper(), o.media_type, o.ext, o.info) for o in super().generate(reqs)]


def test_a_zombie_deliverys_late_put_never_replaces_a_committed_output(client):
    """Delivery A passed its lease check and then stalled inside a PUT (a held connection, a SIGSTOP,
    botocore re-sending after a timeout) while its lease ran out; delivery B took the items over and
    committed. A's write lands afterwards: the committed objects and sidecars stay B's, and A's
    stray objects are removed."""
    import hashlib

    job = submit(client, ["alpha", "beta"])
    other = runtime(client, FakeGen())
    state = {}

    class StallingStore(CountingStore):
        def put(self, key, data, content_type="application/octet-stream"):
            if "/items/" in key and "taken" not in state:
                state["taken"] = True
                with client.db.session() as s:  # A's leases run out while its PUT hangs...
                    s.execute(update(Item).where(Item.job_id == job.id)
                              .values(lease_until=utcnow() - timedelta(seconds=1)))
                state["b"] = run_chunk(other, job.id, 0).succeeded  # ...B takes over and commits
            return super().put(key, data, content_type)  # then A's held bytes arrive

    zombie = runtime(client, Shouting(), store=StallingStore(client.store))
    a = run_chunk(zombie, job.id, 0)
    assert state["b"] == 2 and a.succeeded == 0
    results = list(client.results(job.id))
    assert {r.status for r in results} == {ItemStatus.succeeded}
    for r in results:
        body = client.store.get(r.key)
        assert hashlib.sha256(body).hexdigest() == r.sha256 and body.islower(), \
            "a zombie's bytes replaced a committed output"
        assert json.loads(client.store.get(sidecar_of(r.key))) == r.provenance
    # A's own objects (written beside B's, under A's claim) were removed when A found it lost.
    committed = {k for r in results for k in (r.key, sidecar_of(r.key))}
    assert set(client.store.list(f"{job_prefix(job.id)}/items/")) == committed


def test_cancel_mid_chunk_keeps_finished_outputs_and_starts_nothing_new(client):
    job = submit(client, ["a", "b", "c", "d"])  # one chunk of 4, micro-batches of 2
    gen = FakeGen(hook=lambda n: client.cancel(job.id) if n == 1 else None)
    res = run_chunk(runtime(client, gen), job.id, 0)
    assert len(gen.calls) == 1
    assert (res.succeeded, res.cancelled) == (2, 2)
    view = client.status(job.id)
    assert view.status == JobStatus.cancelled and view.final
    assert view.counts["succeeded"] == 2 and view.counts["cancelled"] == 2
    assert len([r for r in client.results(job.id) if r.uri]) == 2


def test_a_storage_fault_gives_the_items_back_and_a_retry_completes(client):
    job = submit(client, ["a", "b"])
    rt = runtime(client, FakeGen(), store=CountingStore(client.store, puts_down=True))
    with pytest.raises(TransientError):
        run_chunk(rt, job.id, 0)
    assert {i.status for i in items(client, job.id).values()} == {ItemStatus.pending}
    rt.store.puts_down = False
    assert run_chunk(rt, job.id, 0).succeeded == 2
    assert client.status(job.id).status == JobStatus.succeeded


def test_a_model_that_fails_to_load_fails_its_items_with_the_reason(client):
    job = submit(client, ["a", "b"])
    def broken(ref):
        raise ModelLoadError("weights are corrupt")

    rt = runtime(client, None, pool=ModelPool(broken, 1 << 30))
    res = run_chunk(rt, job.id, 0)
    assert res.failed == 2
    assert all("weights are corrupt" in i.error for i in items(client, job.id).values())
    assert client.status(job.id).status == JobStatus.failed


def test_an_item_that_killed_the_worker_each_time_fails_after_max_attempts(client):
    job = submit(client, ["a", "b"])
    with client.db.session() as s:  # as if three deliveries died mid-chunk
        s.execute(update(Item).where(Item.job_id == job.id, Item.custom_id == "c0")
                  .values(status=ItemStatus.running, attempts=3, lease_until=utcnow() - timedelta(1)))
    res = run_chunk(runtime(client, FakeGen(), max_attempts=3), job.id, 0)
    it = items(client, job.id)
    assert it["c0"].status == ItemStatus.failed and "gave up after 3 attempts" in it["c0"].error
    assert it["c1"].status == ItemStatus.succeeded and res.succeeded == 1


def test_retry_failed_runs_only_the_failed_items_again(client):
    job = submit(client, ["ok", "BOOM"])
    gen = FakeGen()
    rt = runtime(client, gen)
    run_chunk(rt, job.id, 0)
    assert client.status(job.id).status == JobStatus.failed or client.status(job.id).counts["failed"] == 1
    with client.db.session() as s:  # fix the poison so the retry can succeed
        s.execute(update(Item).where(Item.job_id == job.id, Item.custom_id == "c1").values(prompt="fine now"))
    assert client.retry_failed(job.id) == 1
    gen.calls.clear()
    run_chunk(rt, job.id, 0)
    assert gen.calls == [[1]]
    view = client.status(job.id)
    assert view.status == JobStatus.succeeded and view.counts["succeeded"] == 2


def test_provenance_is_in_the_sidecar_and_the_row(client):
    job = submit(client, ["hello"], seed=40, params={"temperature": 0.5})
    rt = runtime(client, FakeGen())
    run_chunk(rt, job.id, 0)
    (r,) = list(client.results(job.id))
    sidecar = json.loads(rt.store.get(sidecar_of(r.key)))
    assert sidecar == r.provenance
    p = r.provenance
    assert p["job_id"] == job.id and p["item_index"] == 0 and p["custom_id"] == "c0" and p["seed"] == 40
    assert p["model"]["name"] == "tiny" and p["model"]["version"] == 1
    assert p["model"]["weights_digest"].startswith("sha256:")
    assert p["params"]["temperature"] == 0.5 and p["params"]["max_new_tokens"] == 8
    assert p["output"]["sha256"] == r.sha256 and p["output"]["size"] == r.size == 5
    assert "torch" in p["versions"] and p["versions"]["aigc_runner"]
    assert p["worker"] and p["device"] == "cpu" and "generate_s" in p["timings"]
    assert len(p["prompt_sha256"]) == 64


def test_a_storage_fault_returns_only_once_no_upload_is_still_running(client):
    import threading
    import time

    class OneBadPut(CountingStore):
        running = 0
        lock = threading.Lock()

        def put(self, key, data, content_type="application/octet-stream"):
            if "/000000." in key and key.endswith(".txt"):
                raise StorageError("S3 refused this one")
            with self.lock:
                self.running += 1
            time.sleep(0.2)
            with self.lock:
                self.running -= 1
            return super().put(key, data, content_type)

    job = submit(client, ["a", "bb", "ccc"])
    rt = runtime(client, FakeGen(), OneBadPut(client.store), micro_batch_size=3)
    with pytest.raises(StorageError, match="refused this one"):
        run_chunk(rt, job.id, 0)
    assert rt.store.running == 0  # nothing writes after the items were given back
    assert {i.status for i in items(client, job.id).values()} == {ItemStatus.pending}
    # What the other uploads stored for the given-back items is nobody's output: removed.
    assert list(client.store.list(f"{job_prefix(job.id)}/items/")) == []


class SlowStore(CountingStore):
    """Each put takes ``delay`` seconds; ``on_put(key)`` runs first."""

    def __init__(self, inner, delay: float, on_put=None):
        super().__init__(inner)
        self.delay, self.on_put = delay, on_put

    def put(self, key, data, content_type="application/octet-stream"):
        if self.on_put:
            self.on_put(key)
        import time

        time.sleep(self.delay)
        return super().put(key, data, content_type)


def test_a_put_late_in_the_lease_renews_its_items_lease_first(client, monkeypatch):
    import worker.store as S

    renewed = []
    real_renew = S._renew
    monkeypatch.setattr(S, "_renew", lambda rt, token, ids: renewed.append(ids) or real_renew(rt, token, ids))
    job = submit(client, ["a", "bb"])
    rt = runtime(client, FakeGen(), SlowStore(client.store, 0.5), micro_batch_size=2, lease_s=1, storage_workers=1)
    assert run_chunk(rt, job.id, 0).succeeded == 2  # 2 s of PUTs on a 1 s lease: renewed as it went
    assert len([k for k in rt.store.puts if "/items/" in k]) == 4
    assert renewed and all(len(ids) == 1 for ids in renewed)  # one item's lease, before its late PUT


def test_a_slow_store_writes_nothing_for_an_item_another_delivery_took_meanwhile(client):
    job = submit(client, ["a", "bb"])

    def steal(key):  # while item 0 is stored, item 1's lease "expired" and another delivery claimed it
        if "/000000." in key and key.endswith(".provenance.json"):
            with client.db.session() as s:
                s.execute(update(Item).where(Item.job_id == job.id, Item.custom_id == "c1")
                          .values(claim_token="another-delivery"))

    rt = runtime(client, FakeGen(), SlowStore(client.store, 0.5, steal), micro_batch_size=2, lease_s=1,
                 storage_workers=1)
    assert run_chunk(rt, job.id, 0).succeeded == 1
    assert not any("/000001." in k for k in rt.store.puts)  # its PUT came late, asked, and was not ours
    assert items(client, job.id)["c1"].claim_token == "another-delivery"


def test_uploads_carry_the_chunks_log_context(client):
    from aigc_core import logs

    seen = []

    class Recording(CountingStore):
        def put(self, key, data, content_type="application/octet-stream"):
            seen.append(dict(logs._context.get()))
            return super().put(key, data, content_type)

    job = submit(client, ["a", "bb"])
    run_chunk(runtime(client, FakeGen(), Recording(client.store)), job.id, 0)
    assert len(seen) >= 4 and all(c.get("job_id") == job.id and c.get("chunk") == 0 for c in seen)


def test_an_interrupt_while_waiting_for_uploads_still_waits_for_those_running(client, monkeypatch):
    import threading

    import worker.store as S

    state = {"running": 0, "max": 0}
    lock = threading.Lock()

    class Tracking(SlowStore):
        def put(self, key, data, content_type="application/octet-stream"):
            with lock:
                state["running"] += 1
            try:
                return super().put(key, data, content_type)
            finally:
                with lock:
                    state["running"] -= 1

    real_wait = S.wait

    def interrupted_wait(fs, timeout=None, return_when="ALL_COMPLETED"):
        if return_when == S.FIRST_EXCEPTION:
            real_wait(fs, timeout=0.05)  # the uploads have begun...
            raise KeyboardInterrupt  # ...when the worker is interrupted
        return real_wait(fs, timeout=timeout, return_when=return_when)

    monkeypatch.setattr(S, "wait", interrupted_wait)
    job = submit(client, ["a", "bb", "ccc"])
    rt = runtime(client, FakeGen(), Tracking(client.store, 0.3), micro_batch_size=3)
    with pytest.raises(KeyboardInterrupt):
        run_chunk(rt, job.id, 0)
    assert state["running"] == 0  # none still writing once the interrupt is through
    assert {i.status for i in items(client, job.id).values()} == {ItemStatus.pending}


def test_storage_faults_do_not_use_up_an_items_attempts(client):
    job = submit(client, ["a", "b"])
    gen = FakeGen()
    rt = runtime(client, gen, store=CountingStore(client.store, puts_down=True), max_attempts=3)
    for _ in range(5):  # five transient faults in a row: more than max_attempts
        with pytest.raises(TransientError):
            run_chunk(rt, job.id, 0)
    assert len(gen.calls) == 5  # each delivery began generating (the store answered its probe)
    rt.store.puts_down = False
    assert run_chunk(rt, job.id, 0).succeeded == 2
    assert {i.attempts for i in items(client, job.id).values()} == {1}


def test_a_cancelled_job_whose_worker_died_mid_chunk_still_finishes(client):
    job = submit(client, ["a", "b", "c", "d"])
    with client.db.session() as s:  # a delivery claimed the chunk, then its worker died
        s.execute(update(Item).where(Item.job_id == job.id)
                  .values(status=ItemStatus.running, attempts=1, lease_until=utcnow() - timedelta(1)))
    client.cancel(job.id)
    assert not client.status(job.id).final
    res = run_chunk(runtime(client, FakeGen()), job.id, 0)  # the redelivery or the reconciler's message
    assert res.claimed == 0
    view = client.status(job.id)
    assert view.final and view.status == JobStatus.cancelled and view.counts["cancelled"] == 4


def test_a_retry_that_lands_while_the_job_is_being_finalized_is_not_lost(client):
    job = submit(client, ["ok", "BOOM"])
    gen = FakeGen()

    class RetryDuringManifest(CountingStore):
        def put(self, key, data, content_type="application/octet-stream"):
            if key.endswith("manifest.jsonl") and not getattr(self, "raced", False):
                self.raced = True
                with client.db.session() as s:
                    s.execute(update(Item).where(Item.job_id == job.id, Item.custom_id == "c1")
                              .values(prompt="fine now"))
                assert client.retry_failed(job.id) == 1
            return super().put(key, data, content_type)

    rt = runtime(client, gen, store=RetryDuringManifest(client.store))
    run_chunk(rt, job.id, 0)
    view = client.status(job.id)
    assert not view.final and view.counts["pending"] == 1  # the retried item is open, the job not final
    run_chunk(rt, job.id, 0)
    view = client.status(job.id)
    assert view.final and view.status == JobStatus.succeeded and view.counts["succeeded"] == 2


class OomGen(FakeGen):
    """Runs out of memory on batches larger than ``fits``, as a GPU would."""

    def __init__(self, fits: int):
        super().__init__()
        self.fits = fits

    def generate(self, reqs):
        import torch

        if len(reqs) > self.fits:
            self.calls.append([r.index for r in reqs])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().generate(reqs)


def test_out_of_memory_splits_the_batch_and_the_outputs_match_an_unsplit_run(client):
    prompts = [f"prompt number {i}" for i in range(12)]
    big = submit(client, prompts, seed=7, chunk_size=12)
    rt = runtime(client, OomGen(fits=3), micro_batch_size=8)
    res = run_chunk(rt, big.id, 0)
    assert (res.succeeded, res.failed) == (12, 0)
    # 8 -> 4 -> 2 fits; after that the cap holds: no more batches above it in this process.
    assert rt.batch_caps["tiny@1"] == 2
    sizes = [len(c) for c in rt.pool.get(client.model("tiny")).model.calls]
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) <= 2

    ref = submit(client, prompts, seed=7, chunk_size=12, idempotency_key="unsplit")
    run_chunk(runtime(client, FakeGen(), micro_batch_size=16), ref.id, 0)
    digests = {jid: {r.custom_id: r.sha256 for r in client.results(jid)} for jid in (big.id, ref.id)}
    assert digests[big.id] == digests[ref.id]


def test_out_of_memory_on_a_single_item_fails_that_item_with_the_reason(client):
    job = submit(client, ["a", "b"])
    res = run_chunk(runtime(client, OomGen(fits=0), micro_batch_size=2), job.id, 0)
    assert res.failed == 2
    assert all("OutOfMemoryError" in i.error for i in items(client, job.id).values())


@pytest.mark.parametrize("overlap", [False, True])
def test_an_unexpected_error_gives_the_items_back_at_once_with_the_attempt_counted(client, overlap):
    class BuggyStore(CountingStore):
        def put(self, key, data, content_type="application/octet-stream"):
            raise KeyError("a bug in the runner")

    job = submit(client, ["a", "b", "c"])
    gen = FakeGen()
    with pytest.raises(KeyError):
        run_chunk(runtime(client, gen, BuggyStore(client.store), micro_batch_size=2, overlap_storage=overlap),
                  job.id, 0)
    rows = items(client, job.id).values()
    assert {i.status for i in rows} == {ItemStatus.pending}  # not running until a lease expires
    # The first micro-batch began (its attempt counts); an item whose generation never began is not
    # charged. With overlap the second batch may have begun generating while the first was stored.
    began = sum(len(c) for c in gen.calls)
    assert began == (2 if not overlap else began) and began in (2, 3)
    assert sorted(i.attempts for i in rows) == sorted([1] * began + [0] * (3 - began))
    assert {i.lease_until for i in rows} == {None}
    assert run_chunk(runtime(client, FakeGen()), job.id, 0).succeeded == 3


@pytest.mark.parametrize("overlap", [False, True])
def test_while_the_store_stays_down_a_retry_generates_nothing(client, overlap):
    class DownStore(CountingStore):
        down = True

        def put(self, key, data, content_type="application/octet-stream"):
            if self.down:
                raise StorageError("S3 is down")
            return super().put(key, data, content_type)

        def exists(self, key):
            if self.down:
                raise StorageError("S3 is down")
            return self.inner.exists(key)

    job = submit(client, ["a", "b", "c", "d"])
    gen, store = FakeGen(), DownStore(client.store)
    rt = runtime(client, gen, store, micro_batch_size=2, overlap_storage=overlap)
    with pytest.raises(TransientError):
        run_chunk(rt, job.id, 0)
    # The first delivery learns of the outage by generating once (with overlap: the next batch may
    # have begun generating while the first one's PUT failed; never more than that).
    first = len(gen.calls)
    assert first == 1 if not overlap else first in (1, 2)
    for _ in range(3):  # retries during the outage: the store is asked first, nothing is generated
        with pytest.raises(StorageError):
            run_chunk(rt, job.id, 0)
    assert len(gen.calls) == first
    # Every attempt the failed delivery charged was given back, the overlapped batch's too.
    assert {(i.status, i.attempts) for i in items(client, job.id).values()} == {(ItemStatus.pending, 0)}
    store.down = False
    assert run_chunk(rt, job.id, 0).succeeded == 4 and len(gen.calls) == first + 2


def test_without_sidecars_each_item_costs_one_put_and_keeps_its_provenance_in_the_row(client):
    job = submit(client, ["one", "two", "three"], seed=41)
    rt = runtime(client, FakeGen(), provenance_sidecars=False)
    run_chunk(rt, job.id, 0)
    assert sorted(k for k in rt.store.puts if "/items/" in k) == sorted(r.key for r in client.results(job.id))
    assert all(r.provenance["seed"] == 41 + r.index for r in client.results(job.id))


def test_each_micro_batch_renews_the_lease_of_every_item_the_chunk_still_holds(client):
    job = submit(client, ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"], chunk_size=6)
    seen = []

    def hook(_n):  # the lease of the chunk's last item, as each micro-batch starts generating
        with client.db.session() as s:
            seen.append(s.scalar(select(Item.lease_until).where(Item.job_id == job.id, Item.index == 5)))

    res = run_chunk(runtime(client, FakeGen(hook=hook), micro_batch_size=2, lease_s=300), job.id, 0)
    assert res.succeeded == 6 and len(seen) == 3
    assert seen[0] < seen[1] < seen[2]  # renewed before every batch, not only its own
    assert all(t.replace(tzinfo=None) > utcnow().replace(tzinfo=None) + timedelta(seconds=250) for t in seen)


def test_a_batch_that_outlasts_half_its_lease_asks_again_and_skips_items_taken_meanwhile(client):
    import time

    job = submit(client, ["a", "bb", "ccc"], chunk_size=3)

    def hook(_n):  # while generating: item c0's lease "expired" and another delivery claimed it
        with client.db.session() as s:
            s.execute(update(Item).where(Item.job_id == job.id, Item.custom_id == "c0")
                      .values(claim_token="another-delivery"))
        time.sleep(1.1)  # past half of the 2 s lease

    rt = runtime(client, FakeGen(hook=hook), micro_batch_size=3, lease_s=2)
    assert run_chunk(rt, job.id, 0).succeeded == 2
    assert not any(k.endswith("/000000.txt") for k in rt.store.puts)  # nothing written over theirs
    assert items(client, job.id)["c0"].status == ItemStatus.running


def test_a_batch_well_inside_its_lease_stores_without_asking_again(client):
    from sqlalchemy import event

    job = submit(client, ["a", "bb", "ccc", "dddd"], chunk_size=4)
    seen = []

    def record(conn, cursor, statement, *_):
        seen.append(" ".join(statement.split()))

    event.listen(client.db.engine, "before_cursor_execute", record)
    try:
        assert run_chunk(runtime(client, FakeGen(), micro_batch_size=2, lease_s=600), job.id, 0).succeeded == 4
    finally:
        event.remove(client.db.engine, "before_cursor_execute", record)
    begins = [q for q in seen if q.startswith("UPDATE items SET attempts=CASE")]
    renewals = [q for q in seen if q.startswith("UPDATE items SET lease_until=")]  # _renew's statement
    # The begin before the model load and one per micro-batch renew the leases and charge the
    # attempts; nothing renews them again before storing.
    assert len(begins) == 3 and renewals == [], renewals


def test_a_models_own_micro_batch_size_wins_over_the_workers_and_is_not_a_generation_param(
        client, tiny_text_model):
    client.register_model("tiny-mb3", "text", tiny_text_model.as_uri(),
                          defaults={"max_new_tokens": 8, "micro_batch_size": 3})
    job = client.submit("text", model="tiny-mb3", items=["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "g"],
                        chunk_size=7)
    seen = []

    class Recording(FakeGen):
        def generate(self, reqs):
            seen.extend(r.params for r in reqs)
            return super().generate(reqs)

    gen = Recording()
    assert run_chunk(runtime(client, gen, micro_batch_size=2), job.id, 0).succeeded == 7
    assert [len(c) for c in gen.calls] == [3, 3, 1]
    assert all("micro_batch_size" not in p and p["max_new_tokens"] == 8 for p in seen)


def test_a_retried_chunk_charges_an_attempt_only_to_the_items_it_began(client):
    """The worker died on item c1 three times: c1 gives up; the items it never reached do not."""
    job = submit(client, ["a", "bb", "ccc", "dddd"], chunk_size=4)
    with client.db.session() as s:  # as after a delivery died generating c1 (alone: item by item)
        s.execute(update(Item).where(Item.job_id == job.id, Item.custom_id == "c1")
                  .values(attempts=2))
        s.execute(update(Item).where(Item.job_id == job.id, Item.custom_id == "c0")
                  .values(status=ItemStatus.succeeded))
    crashes = []

    def die_on_c1(n):  # item by item: the first batch generated is c1 (shortest prompt left)
        if not crashes:
            crashes.append(n)
            raise SystemExit("the worker process died")

    with pytest.raises(SystemExit):
        run_chunk(runtime(client, FakeGen(hook=die_on_c1), max_attempts=3), job.id, 0)
    it = items(client, job.id)
    assert (it["c1"].attempts, it["c2"].attempts, it["c3"].attempts) == (3, 0, 0)
    res = run_chunk(runtime(client, FakeGen(), max_attempts=3), job.id, 0)
    it = items(client, job.id)
    assert it["c1"].status == ItemStatus.failed and "gave up after 3 attempts" in it["c1"].error
    assert it["c2"].status == it["c3"].status == ItemStatus.succeeded and res.succeeded == 2


def test_a_model_load_that_crashes_each_time_counts_against_the_chunk_and_ends(client):
    """Found in review: attempts were charged only when generation began, so a load that killed the
    worker (or raised something unexpected) before it was redelivered forever."""
    job = submit(client, ["a", "b"])

    def crashing_load(ref):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    for _ in range(3):
        rt = runtime(client, FakeGen(), pool=ModelPool(crashing_load, 1 << 40), max_attempts=3)
        with pytest.raises(RuntimeError):
            run_chunk(rt, job.id, 0)
    # Each crash counts against the items it would have generated first (after the first crash,
    # item by item): the loop is bounded, and the other item is not blamed for every crash.
    assert sorted(i.attempts for i in items(client, job.id).values()) == [1, 3]
    run_chunk(runtime(client, FakeGen(), max_attempts=3), job.id, 0)
    assert sorted(i.status.value for i in items(client, job.id).values()) == ["failed", "succeeded"]
    assert client.status(job.id).final


def test_a_wrapped_out_of_memory_still_splits_the_batch(client):
    import torch

    class WrappingOom(FakeGen):
        def generate(self, reqs):
            if len(reqs) > 1:
                try:
                    raise torch.OutOfMemoryError("CUDA out of memory")
                except RuntimeError as e:  # as the diffusers backend wraps it
                    raise ValueError("pipeline failed") from e
            return super().generate(reqs)

    job = submit(client, ["a", "b", "c", "d"], chunk_size=4)
    rt = runtime(client, WrappingOom(), micro_batch_size=4)
    assert run_chunk(rt, job.id, 0).succeeded == 4 and rt.batch_caps["tiny@1"] == 1
