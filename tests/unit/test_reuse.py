"""Reuse of identical work (worker/reuse.py) with a fake backend on SQLite and a folder store: what is
compared, what is referred to, what gc keeps, what is counted, and what is never reused."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import pytest
from sqlalchemy import select, update

from aigc_core.registry import ModelRef
from aigc_core.retention import collect_garbage, delete_jobs
from aigc_core.schema import Artifact, Item, ItemStatus, Job, JobStatus, Model
from tests.support.hold import hold_after
from tests.unit.test_pipeline import FakeGen
from worker.chunk import ChunkResult, Claimed, JobInfo
from worker.inprocess import drain
from worker.pipeline import claim
from worker.pool import ModelPool
from worker.reuse import reuse_key, reuse_outputs
from worker.runtime import Runtime


class Loads:
    """A pool loader that counts loads: a fully reused job must never load its model."""

    def __init__(self):
        self.gen, self.loads = FakeGen(), 0

    def __call__(self, ref):
        self.loads += 1
        return self.gen


def run(client, job_id, **overrides) -> Loads:
    """Run a job's chunks in a fresh worker runtime (its own pool, nothing loaded yet)."""
    loads = Loads()
    # Sidecars on (not the default since issue 15): a generated output writes one, a reference none.
    rt = Runtime(client.settings.model_copy(update={"provenance_sidecars": True, **overrides}), client.db, client.store,
                 pool=ModelPool(loads, 1 << 40), device="cpu")
    drain(rt, job_id)
    return loads


def submit(client, prompts, *, model="tiny", seed=5, params=None, reuse=False):
    items = [{"custom_id": f"c{i}", "prompt": p} for i, p in enumerate(prompts)]
    return client.submit("text", model=model, items=items, seed=seed, params=params or {}, reuse=reuse)


PROMPTS = [f"Headline {i}: the council met" for i in range(6)]


def test_a_rerun_with_reuse_refers_to_every_output_writes_nothing_and_never_loads_the_model(client, tmp_path):
    first = submit(client, PROMPTS)
    assert run(client, first.id).loads == 1
    again = submit(client, PROMPTS, reuse=True)
    loads = run(client, again.id)  # with sidecars on: a reference writes none either
    assert loads.loads == 0 and loads.gen.calls == []  # nothing generated, the model never loaded
    view = client.status(again.id)
    assert view.status == JobStatus.succeeded and view.counts["succeeded"] == 6 and view.counts["reused"] == 6
    assert view.done == 6  # reused is a part of succeeded, not counted twice
    originals = {r.index: r for r in client.results(first.id)}
    for r in client.results(again.id):
        o = originals[r.index]
        assert (r.key, r.uri, r.sha256) == (o.key, o.uri, o.sha256)  # the original's object itself
        assert r.provenance["reused_from"] == {"job_id": first.id, "item_index": o.index, "key": o.key,
                                               "sha256": o.sha256}
        assert r.provenance["seed"] == o.provenance["seed"]  # what made it: the original's generation
    assert list(client.store.list(f"jobs/{again.id}/items/")) == []  # no object of its own
    with client.db.session() as s:
        assert set(s.scalars(select(Artifact.reused_from_job).where(Artifact.job_id == again.id))) == {first.id}
        assert set(s.scalars(select(Item.attempts).where(Item.job_id == again.id))) == {1}
    assert client.status(first.id).counts["reused"] == 0
    # The download has every output and its provenance, reused_from included.
    (r0,) = [r for r in client.results(again.id) if r.index == 0]
    dl = client.download(again.id, tmp_path / "dl")
    assert (dl / "items" / "000000.txt").read_bytes() == client.store.get(r0.key)
    assert '"reused_from"' in (dl / "items" / "000000.provenance.json").read_text()
    manifest = client.store.get(f"jobs/{again.id}/manifest.jsonl").decode()
    assert r0.key in manifest


def _age(client, *job_ids, days=30):
    """Make jobs old enough for ``aigc gc --older-than 7d``."""
    from datetime import timedelta

    from aigc_core.schema import utcnow

    with client.db.session() as s:
        s.execute(update(Job).where(Job.id.in_(job_ids)).values(created_at=utcnow() - timedelta(days=days),
                                                                finished_at=utcnow() - timedelta(days=days)))


def _gc(client, **kw):
    from datetime import timedelta

    return collect_garbage(client.db, client.store, timedelta(days=7), objects=True, **kw)


def _whole(client, job_id) -> bool:
    """Every output of the job reads back with its recorded sha256."""
    return all(hashlib.sha256(client.store.get(r.key)).hexdigest() == r.sha256 for r in client.results(job_id))


def test_gc_keeps_a_job_whose_outputs_a_kept_job_reuses_and_says_why(client):
    first = submit(client, PROMPTS[:2])
    run(client, first.id)
    again = submit(client, PROMPTS[:2], reuse=True)
    run(client, again.id)
    _age(client, first.id)  # the original is old, the job that reuses it is not
    for dry_run in (True, False):
        rep = _gc(client, dry_run=dry_run)
        assert rep.jobs == 0 and rep.kept == {"a kept job reuses its outputs": 1}, rep.line()
        assert "kept: 1 a kept job reuses its outputs" in rep.line()
    assert _whole(client, again.id) and _whole(client, first.id)
    with client.db.session() as s:
        assert s.get(Job, first.id).removing is False  # kept: its outputs stay reusable
    # Once the reusing job is old too, one run removes both, objects and all.
    _age(client, again.id)
    dry = _gc(client, dry_run=True)
    assert (dry.jobs, dry.kept, dry.artifacts, dry.objects) == (2, {}, 4, 8), dry.line()
    rep = _gc(client)
    # Objects: the original's 2 outputs and 2 sidecars, and each job's manifest and errors file.
    assert (rep.jobs, rep.kept, rep.artifacts, rep.objects) == (2, {}, 4, 8), rep.line()
    assert list(client.store.list("jobs/")) == []
    # The original is gone: the next identical request generates again and becomes the new original.
    third = submit(client, PROMPTS[:2], reuse=True)
    assert run(client, third.id).gen.calls != []
    assert client.status(third.id).counts["reused"] == 0


@pytest.mark.parametrize("jobs_per_batch", [200, 1])
def test_one_gc_run_removes_a_chain_of_jobs_that_reuse_each_other(client, jobs_per_batch):
    """B reuses A's outputs and generates one more; C reuses both: all old, one run takes all three,
    in one batch or one job per batch (then in rounds), and a dry run says so first."""
    a = submit(client, PROMPTS[:2])
    run(client, a.id)
    b = submit(client, PROMPTS[:3], reuse=True)
    run(client, b.id)
    c = submit(client, PROMPTS[:3], reuse=True)
    assert run(client, c.id).gen.calls == []
    with client.db.session() as s:
        refs = set(s.execute(select(Artifact.job_id, Artifact.reused_from_job)
                             .where(Artifact.reused_from_job.is_not(None))).all())
    assert refs == {(b.id, a.id), (c.id, a.id), (c.id, b.id)}
    _age(client, a.id, b.id, c.id)
    dry = _gc(client, dry_run=True, jobs_per_batch=jobs_per_batch)
    assert (dry.jobs, dry.kept, dry.artifacts) == (3, {}, 8), dry.line()
    rep = _gc(client, jobs_per_batch=jobs_per_batch)
    assert (rep.jobs, rep.kept, rep.artifacts) == (3, {}, 8), rep.line()
    assert list(client.store.list("jobs/")) == []


def test_a_chain_stays_whole_while_its_last_job_is_kept(client):
    a = submit(client, PROMPTS[:2])
    run(client, a.id)
    b = submit(client, PROMPTS[:3], reuse=True)
    run(client, b.id)
    c = submit(client, PROMPTS[2:3] + PROMPTS[1:2], reuse=True)  # other seeds: generates both
    run(client, c.id)
    d = submit(client, PROMPTS[:3], reuse=True)  # refers to A (items 0, 1) and B (item 2)
    run(client, d.id)
    _age(client, a.id, b.id, c.id)  # D is recent
    for dry_run in (True, False):
        rep = _gc(client, dry_run=dry_run, jobs_per_batch=1)
        assert (rep.jobs, rep.kept) == (1, {"a kept job reuses its outputs": 2}), rep.line()
    with client.db.session() as s:
        assert set(s.scalars(select(Job.id))) == {a.id, b.id, d.id}
        assert not any(s.scalars(select(Job.removing)))  # the kept ones stay reusable
    assert _whole(client, d.id)


def test_gc_waits_for_a_reuse_commit_holding_sqlites_write_lock_then_keeps_the_original(client, monkeypatch):
    """SQLite: the reuse commit takes the write lock before it checks the originals; gc, started while it
    holds it, waits, then sees the references and keeps the original."""
    import threading

    import worker.reuse

    first = submit(client, PROMPTS[:3])
    run(client, first.id)
    _age(client, first.id)
    again = submit(client, PROMPTS[:3], reuse=True)
    box: dict = {}
    hold = hold_after(monkeypatch, worker.reuse, "live_jobs")  # the write lock taken, nothing committed
    rerun = threading.Thread(target=lambda: box.update(loads=run(client, again.id)), daemon=True)
    rerun.start()
    assert hold.reached.wait(30)
    gc = threading.Thread(target=lambda: box.update(gc=_gc(client)), daemon=True)
    gc.start()
    gc.join(1.5)
    assert gc.is_alive(), "gc did not wait for the reuse commit"
    hold.go.set()
    rerun.join(60)
    gc.join(60)
    assert box["loads"].gen.calls == [] and client.status(again.id).counts["reused"] == 3
    assert box["gc"].jobs == 0 and box["gc"].kept == {"a kept job reuses its outputs": 1}, box["gc"].line()
    assert _whole(client, again.id)


def test_the_orphan_sweep_keeps_the_prefix_of_a_job_removed_by_hand_that_others_reuse(client):
    first = submit(client, PROMPTS[:2])
    run(client, first.id)
    again = submit(client, PROMPTS[:2], reuse=True)
    run(client, again.id)
    delete_jobs(client.db, [first.id])  # by hand: the rows go, the objects stay
    old = time.time() - 30 * 86_400
    for path in (client.store.root / "jobs" / first.id).rglob("*"):
        os.utime(path, (old, old))  # the prefix is old enough for the sweep
    rep = _gc(client, orphans=True)
    assert rep.orphan_prefixes == 0 and rep.jobs == 0 and _whole(client, again.id), rep.line()
    delete_jobs(client.db, [again.id])  # nobody refers to it now: the next sweep takes it
    assert _gc(client, orphans=True).orphan_prefixes == 1 and not list(client.store.list(f"jobs/{first.id}/"))


def test_a_job_that_reuses_its_own_outputs_keeps_nothing_alive(client):
    # Item seeds are the job's seed + index unless an OpenAI batch request brings its own, so a job
    # holds identical work when such a seed repeats: set here by hand. A reference within a job keeps
    # nothing alive.
    items = [{"custom_id": f"c{i}", "prompt": "the same"} for i in range(2)]
    job = client.submit("text", model="tiny", items=items, seed=5, reuse=True, chunk_size=1)
    with client.db.session() as s:
        s.execute(update(Item).where(Item.job_id == job.id).values(seed=5))
    gen = run(client, job.id).gen
    assert len([i for call in gen.calls for i in call]) == 1  # the second item reused the first's output
    (a, b) = sorted(client.results(job.id), key=lambda r: r.index)
    assert b.key == a.key and b.provenance["reused_from"]["job_id"] == job.id
    _age(client, job.id)
    rep = _gc(client)
    assert rep.jobs == 1 and rep.kept == {}, rep.line()


def test_an_original_whose_job_gc_is_removing_is_generated_instead(client):
    first = submit(client, PROMPTS[:3])
    run(client, first.id)
    with client.db.session() as s:  # what a gc run that stopped part way leaves
        s.execute(update(Job).where(Job.id == first.id).values(removing=True))
    again = submit(client, PROMPTS[:3], reuse=True)
    gen = run(client, again.id).gen
    assert sorted(i for call in gen.calls for i in call) == [0, 1, 2]
    view = client.status(again.id)
    assert view.status == JobStatus.succeeded and view.counts["reused"] == 0


@pytest.mark.parametrize("gc_first", [True, False])
def test_gc_and_a_reuse_commit_never_lose_an_output(client, monkeypatch, gc_first):
    """The race the mark closes: gc decides to remove the original between the reuse lookup and the
    reuse commit (its items generate), or right after the commit (the original is kept)."""
    import worker.reuse

    first = submit(client, PROMPTS[:3])
    run(client, first.id)
    _age(client, first.id)
    again = submit(client, PROMPTS[:3], reuse=True)
    real_lookup, real_commit, reports = worker.reuse.lookup, worker.reuse._commit, []

    def lookup_then_gc(*a, **k):
        found = real_lookup(*a, **k)
        assert found  # the original was found before gc removed it
        reports.append(_gc(client))
        return found

    def commit_then_gc(*a, **k):
        out = real_commit(*a, **k)
        reports.append(_gc(client))
        return out

    if gc_first:
        monkeypatch.setattr(worker.reuse, "lookup", lookup_then_gc)
    else:
        monkeypatch.setattr(worker.reuse, "_commit", commit_then_gc)
    gen = run(client, again.id).gen
    view = client.status(again.id)
    assert view.status == JobStatus.succeeded and view.counts["succeeded"] == 3
    if gc_first:
        assert reports[0].jobs == 1 and sorted(i for call in gen.calls for i in call) == [0, 1, 2]
        assert view.counts["reused"] == 0
    else:
        assert reports[0].jobs == 0 and reports[0].kept == {"a kept job reuses its outputs": 1}
        assert gen.calls == [] and view.counts["reused"] == 3
    assert _whole(client, again.id)


def test_only_identical_requests_are_reused(client):
    first = submit(client, PROMPTS[:4], params={"temperature": 0.7})
    run(client, first.id)
    changed = [PROMPTS[0], PROMPTS[1] + "!", PROMPTS[2], PROMPTS[3]]  # item 1's prompt differs
    same_but_one = submit(client, changed, params={"temperature": 0.7}, reuse=True)
    gen = run(client, same_but_one.id).gen
    assert sorted(i for call in gen.calls for i in call) == [1]  # only the changed item generated
    assert client.status(same_but_one.id).counts["reused"] == 3
    for params, seed in (({"temperature": 0.8}, 5), ({"temperature": 0.7}, 6)):  # a parameter, the seed
        job = submit(client, PROMPTS[:4], params=params, seed=seed, reuse=True)
        assert len([i for call in run(client, job.id).gen.calls for i in call]) == 4
        assert client.status(job.id).counts["reused"] == 0


def test_reuse_is_off_by_default(client):
    first = submit(client, PROMPTS[:2])
    run(client, first.id)
    again = submit(client, PROMPTS[:2])
    assert run(client, again.id).loads == 1
    assert client.status(again.id).counts["reused"] == 0


def test_a_model_whose_digest_is_unknown_never_reuses_nor_is_reused(client):
    with client.db.session() as s:
        s.execute(update(Model).where(Model.name == "tiny").values(digest=None))
    first = submit(client, PROMPTS[:2])
    run(client, first.id)
    with client.db.session() as s:
        assert set(s.scalars(select(Artifact.reuse_key).where(Artifact.job_id == first.id))) == {None}
    again = submit(client, PROMPTS[:2], reuse=True)
    assert run(client, again.id).loads == 1
    assert client.status(again.id).counts["reused"] == 0


def test_other_weights_are_never_reused(client, tiny_text_model, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_text_model, other)
    (other / "README.md").write_text("another checkpoint\n")  # another digest
    client.register_model("tiny-b", "text", other.as_uri(), defaults={"max_new_tokens": 8})
    first = submit(client, PROMPTS[:2])
    run(client, first.id)
    again = submit(client, PROMPTS[:2], model="tiny-b", reuse=True)
    assert run(client, again.id).loads == 1
    assert client.status(again.id).counts["reused"] == 0


@pytest.mark.parametrize("when", ["before", "between the lookup and the commit"])
def test_a_delivery_that_lost_its_items_commits_nothing(client, monkeypatch, when):
    first = submit(client, PROMPTS[:2])
    run(client, first.id)
    again = submit(client, PROMPTS[:2], reuse=True)
    rt = Runtime(client.settings, client.db, client.store, pool=ModelPool(Loads(), 1 << 40), device="cpu")
    job, token, claimed = claim(rt, again.id, 0)
    assert job is not None and len(claimed) == 2

    def take_over():  # another delivery took the items over (their lease ran out)
        with client.db.session() as s:
            s.execute(update(Item).where(Item.job_id == again.id).values(claim_token="someone-else"))

    if when == "before":
        take_over()
    else:
        import worker.reuse

        real = worker.reuse.lookup
        monkeypatch.setattr(worker.reuse, "lookup", lambda *a, **k: (real(*a, **k), take_over())[0])
    res = ChunkResult(again.id, 0)
    assert reuse_outputs(rt, job, token, claimed, res) == []  # not generated here either: not ours
    assert res.succeeded == 0
    with client.db.session() as s:
        assert s.scalars(select(Artifact.id).where(Artifact.job_id == again.id)).all() == []
        assert set(s.scalars(select(Item.status).where(Item.job_id == again.id))) == {ItemStatus.running}
        assert set(s.scalars(select(Item.attempts).where(Item.job_id == again.id))) == {0}
    assert list(client.store.list(f"jobs/{again.id}/")) == []


def test_a_redelivered_chunk_reuses_nothing_twice(client):
    first = submit(client, PROMPTS[:2])
    run(client, first.id)
    again = submit(client, PROMPTS[:2], reuse=True)
    run(client, again.id)
    rt = Runtime(client.settings, client.db, client.store, pool=ModelPool(Loads(), 1 << 40), device="cpu")
    from worker.pipeline import run_chunk

    assert run_chunk(rt, again.id, 0).claimed == 0  # the message again: every item is final
    with client.db.session() as s:
        assert len(s.scalars(select(Artifact.id).where(Artifact.job_id == again.id)).all()) == 2


# ---- the key ---------------------------------------------------------------------------------------

REF = ModelRef("m", 1, "text", "hf-causal-lm", "file:///m", digest="sha256:" + "0" * 64,
               defaults={"max_new_tokens": 8})


def _key(*, ref=REF, params=None, item_params=None, seed=1, prompt="p", messages=None, kind="text"):
    job = JobInfo("j", kind, params or {}, ref, reuse=True)
    return reuse_key(job, Claimed(1, 0, "c", prompt, item_params or {}, seed, 0, messages=messages))


def test_the_key_covers_digest_effective_parameters_prompt_messages_template_and_seed():
    base = _key()
    assert base == _key() and len(base) == 64
    assert _key(seed=2) != base and _key(prompt="q") != base
    assert _key(params={"temperature": 0.5}) != base and _key(item_params={"top_k": 3}) != base
    other = ModelRef("m", 2, "text", "hf-causal-lm", "file:///m2", digest="sha256:" + "1" * 64,
                     defaults={"max_new_tokens": 8})
    assert _key(ref=other) != base
    # The registry's defaults are effective parameters too.
    assert _key(ref=ModelRef(**{**REF.__dict__, "defaults": {"max_new_tokens": 9}})) != base
    # The same values written differently, or names the backend does not take, are the same work.
    assert _key(params={"temperature": 1}) == _key(params={"temperature": 1.0})
    assert _key(params={"stop": "x"}) == _key(params={"stop": ["x"]})
    assert _key(params={"unknown_to_text": 3}) == base
    assert _key(params={"max_new_tokens": 8}) == base  # the registry default set again by the job
    chat = [{"role": "user", "content": "hi"}]
    with_template = ModelRef(**{**REF.__dict__, "defaults": {"max_new_tokens": 8, "chat_template": "{{ x }}"}})
    assert _key(prompt="", messages=chat) != _key(prompt="", messages=[{"role": "user", "content": "ho"}])
    assert _key(prompt="", messages=chat, ref=with_template) != _key(prompt="", messages=chat)


@pytest.mark.parametrize("digest", [None, "", "  "])
def test_no_key_without_a_weights_digest(digest):
    assert _key(ref=ModelRef(**{**REF.__dict__, "digest": digest})) is None


# ---- where the count shows ---------------------------------------------------------------------------

def test_reused_shows_in_aigc_status_its_json_and_the_dashboards_counts(client, sqlite_settings):
    import json
    import os
    import subprocess
    import sys

    from scheduler.api.dashboard.data import view_of
    from scheduler.api.dashboard.views import templates

    first = submit(client, PROMPTS[:3])
    run(client, first.id)
    again = submit(client, PROMPTS[:3], reuse=True)
    run(client, again.id)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AIGC_")},
           "AIGC_DATABASE_URL": sqlite_settings.database_url, "AIGC_STORAGE_URL": sqlite_settings.storage_url}
    aigc = [sys.executable, "-m", "scheduler.cli", "status", again.id]
    shown = subprocess.run(aigc, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "3 ok (3 reused)" in shown.stdout, shown.stdout + shown.stderr
    as_json = json.loads(subprocess.run([*aigc, "--json"], env=env, capture_output=True, text=True, timeout=60).stdout)
    assert as_json["counts"]["reused"] == 3 and as_json["counts"]["succeeded"] == 3
    counts = templates.env.get_template("macros.html").module.counts  # type: ignore[attr-defined]
    with client.db.session() as s:
        finished, plain = view_of(s, again.id), view_of(s, first.id)  # counts stored on the finished job
    assert finished.counts["reused"] == 3 and '3 reused' in str(counts(finished))
    assert 'class="c-reused" title="succeeded by reusing an earlier identical output" hidden' in str(counts(plain))


def test_the_option_is_in_the_idempotency_payload_only_when_on():
    from aigc_core.spec import parse_spec

    spec = {"kind": "text", "model": "m", "items": [{"prompt": "a"}]}
    off, on = parse_spec(spec), parse_spec({**spec, "reuse": True})
    assert not off.reuse and on.reuse and off.payload_digest() != on.payload_digest()
    assert parse_spec({**spec, "reuse": False}).payload_digest() == off.payload_digest()
