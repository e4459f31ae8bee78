"""Reuse of identical work on PostgreSQL and SeaweedFS with the tiny text model fetched from S3: a rerun
with reuse refers to the original outputs and never loads the model; anything that differs generates;
gc and a reuse commit are ordered by the ``removing`` mark and ``FOR SHARE``."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, text, update

from aigc_core.registry import dir_digest
from aigc_core.retention import collect_garbage
from aigc_core.schema import JobEvent, JobStatus, Model
from aigc_core.settings import Settings
from tests.support.hold import hold_after
from worker import metrics
from worker.inprocess import drain
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

PROMPTS = [f"Headline: the council met on day {i}\n\n" for i in range(4)]


@pytest.fixture
def reuse_client(pg_clean, s3_bucket, s3_server, s3_model, tmp_path, one_torch_thread):
    """A client on the real servers whose jobs run in-process (no broker), each in a fresh worker."""
    from scheduler import Client

    settings = Settings(database_url=pg_clean, broker_url=None, storage_url=f"s3://{s3_bucket}/outputs",
                        s3_endpoint_url=s3_server.endpoint, cache_dir=tmp_path / "cache", chunk_size=4,
                        micro_batch_size=4, torch_threads=1)
    c = Client(settings)
    uri, digest = s3_model
    c.register_model("tiny", "text", uri, digest=digest, defaults={"max_new_tokens": 8})
    return c


def run(client, items, *, model="tiny", seed=3, params=None, reuse=False):
    """Submit, then run the job in a fresh worker runtime (its own pool: nothing loaded); returns the
    job's view, whether the worker loaded the model for it, and how many items it generated."""
    gen = _generated(f"{model}@1")
    job = client.submit("text", model=model, items=items, seed=seed, params=params or {}, reuse=reuse)
    rt = Runtime.from_settings(client.settings)
    try:
        drain(rt, job.id)
    finally:
        rt.db.engine.dispose()
        if "uploads" in rt.__dict__:
            rt.uploads.shutdown()
    with client.db.session() as s:
        loaded = bool(s.scalars(select(JobEvent.id).where(JobEvent.job_id == job.id,
                                                          JobEvent.type == "model_loaded")).all())
    return client.status(job.id), loaded, _generated(f"{model}@1") - gen


def _generated(tag: str) -> float:
    """Items this process generated for a model (the worker's generation-time histogram)."""
    return metrics.REGISTRY.get_sample_value("aigc_worker_generation_seconds_per_item_count",
                                             {"model": tag, "kind": "text"}) or 0.0


def _reused(tag: str) -> float:
    return metrics.REGISTRY.get_sample_value("aigc_worker_items_reused_total", {"model": tag}) or 0.0


def _age(c, job_id):
    with c.db.session() as s:  # old enough for gc
        s.execute(text("UPDATE jobs SET created_at = now() - interval '30 days', "
                       "finished_at = now() - interval '30 days' WHERE id = :id"), {"id": job_id})


def _gc(c):
    return collect_garbage(c.db, c.store, timedelta(days=7), objects=True)


def _whole(c, job_id) -> bool:
    return all(hashlib.sha256(c.store.get(r.key or "")).hexdigest() == r.sha256 for r in c.results(job_id))


def test_a_rerun_with_reuse_refers_to_every_output_and_never_loads_the_model(reuse_client, s3_bucket):
    c = reuse_client
    first, loaded, generated = run(c, PROMPTS)
    assert first.status == JobStatus.succeeded and loaded and generated == 4
    reused_before = _reused("tiny@1")
    again, loaded, generated = run(c, PROMPTS, reuse=True)
    assert again.status == JobStatus.succeeded and not loaded and generated == 0  # nothing generated
    assert again.counts["reused"] == 4 and again.counts["succeeded"] == 4 and _reused("tiny@1") - reused_before == 4
    originals = {r.index: r for r in c.results(first.id)}
    for r in c.results(again.id):
        o = originals[r.index]
        assert (r.key, r.uri, r.sha256) == (o.key, o.uri, o.sha256)
        assert r.uri.startswith(f"s3://{s3_bucket}/outputs/jobs/{first.id}/items/")
        assert r.provenance["reused_from"] == {"job_id": first.id, "item_index": o.index, "key": o.key,
                                               "sha256": o.sha256}
    assert list(c.store.list(f"jobs/{again.id}/items/")) == []  # not a request to the store per item
    # gc keeps the original while the job that reuses it is kept, and removes both once both are old.
    _age(c, first.id)
    report = _gc(c)
    assert report.jobs == 0 and report.kept == {"a kept job reuses its outputs": 1} and _whole(c, again.id)
    _age(c, again.id)
    report = _gc(c)
    assert report.jobs == 2 and not list(c.store.list(f"jobs/{first.id}/"))
    # The finished job's stored counts (the dashboard's listing) said reused too.
    assert again.counts["reused"] == 4


def test_the_dashboard_listing_counts_reused(reuse_client):
    c = reuse_client
    run(c, PROMPTS[:2])
    again, _, _ = run(c, PROMPTS[:2], reuse=True)
    from scheduler.api.dashboard.data import view_of

    with c.db.session() as s:
        assert view_of(s, again.id).counts["reused"] == 2


def _waits_for_a_lock(c, clause: str, timeout: float = 60) -> bool:
    """Whether a session of this test's database is waiting for a row lock in a statement with
    ``clause`` (polled until ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with c.db.session() as s:
            if s.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                             "AND wait_event_type = 'Lock' AND query LIKE :q"), {"q": f"%{clause}%"}):
                return True
        time.sleep(0.05)
    return False


def _in_thread(fn):
    box: dict = {}

    def go():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test's thread
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, box


def test_gc_waits_for_a_reuse_commit_that_holds_the_original_then_keeps_it(reuse_client, monkeypatch):
    """The reuse commit holds the original's job row FOR SHARE; gc's mark waits for it to commit and
    then sees its references: the original stays, every reused output reads back."""
    import worker.reuse

    c = reuse_client
    first, _, _ = run(c, PROMPTS)
    _age(c, first.id)
    hold = hold_after(monkeypatch, worker.reuse, "live_jobs")  # the originals' rows are held FOR SHARE
    rerun, rerun_box = _in_thread(lambda: run(c, PROMPTS, reuse=True))
    assert hold.reached.wait(60)
    gc, gc_box = _in_thread(lambda: _gc(c))
    assert _waits_for_a_lock(c, "FOR NO KEY UPDATE"), "gc's mark did not wait for the reuse commit"
    assert gc.is_alive()
    hold.go.set()
    rerun.join(60)
    gc.join(60)
    assert "error" not in rerun_box and "error" not in gc_box, (rerun_box, gc_box)
    again, _, generated = rerun_box["value"]
    assert again.counts["reused"] == 4 and generated == 0
    assert gc_box["value"].jobs == 0 and gc_box["value"].kept == {"a kept job reuses its outputs": 1}
    assert _whole(c, again.id) and _whole(c, first.id)


def test_a_reuse_commit_waits_for_gcs_mark_then_generates_instead(reuse_client, monkeypatch):
    """gc marks the original and has not committed yet; the reuse commit's FOR SHARE waits for it, then
    finds the mark and refers to nothing: its items generate, and nothing points at removed objects."""
    import aigc_core.retention

    c = reuse_client
    first, _, _ = run(c, PROMPTS)
    _age(c, first.id)
    # gc's first look, then its check after the mark: held there, the mark written and not committed.
    hold = hold_after(monkeypatch, aigc_core.retention, "_held", call=2)
    gc, gc_box = _in_thread(lambda: _gc(c))
    assert hold.reached.wait(60)
    rerun, rerun_box = _in_thread(lambda: run(c, PROMPTS, reuse=True))
    assert _waits_for_a_lock(c, "FOR SHARE"), "the reuse commit did not wait for gc's mark"
    hold.go.set()
    gc.join(60)
    rerun.join(120)
    assert "error" not in rerun_box and "error" not in gc_box, (rerun_box, gc_box)
    assert gc_box["value"].jobs == 1
    again, loaded, generated = rerun_box["value"]
    assert again.status == JobStatus.succeeded and again.counts["reused"] == 0 and generated == 4 and loaded
    assert _whole(c, again.id)


def test_what_differs_generates_and_reuse_is_off_by_default(reuse_client):
    c = reuse_client
    items = [{"custom_id": f"h{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    run(c, items)
    view, loaded, generated = run(c, items)  # the option is off by default
    assert loaded and generated == 4 and view.counts["reused"] == 0
    view, loaded, generated = run(c, items, seed=4, reuse=True)  # another seed for every item
    assert generated == 4 and view.counts["reused"] == 0
    changed = [items[0], {**items[1], "prompt": PROMPTS[1] + "More."}, {**items[2], "params": {"temperature": 0.5}},
               items[3]]  # a prompt and a parameter differ
    view, loaded, generated = run(c, changed, reuse=True)
    assert loaded and generated == 2 and view.counts["reused"] == 2
    reused = {r.index for r in c.results(view.id) if "reused_from" in r.provenance}
    assert reused == {0, 3}


def test_other_weights_or_unknown_weights_never_reuse(reuse_client, tiny_text_model, s3_server, s3_bucket, tmp_path):
    import shutil

    c = reuse_client
    run(c, PROMPTS)
    other = tmp_path / "other"
    shutil.copytree(tiny_text_model, other)
    (other / "NOTICE").write_text("another release of the same weights\n")
    for p in sorted(other.rglob("*")):
        if p.is_file():
            s3_server.client().upload_file(str(p), s3_bucket, f"models/tiny-b/1/{p.relative_to(other).as_posix()}")
    c.register_model("tiny-b", "text", f"s3://{s3_bucket}/models/tiny-b/1/", digest=dir_digest(other),
                     defaults={"max_new_tokens": 8})
    view, loaded, generated = run(c, PROMPTS, model="tiny-b", reuse=True)
    assert loaded and generated == 4 and view.counts["reused"] == 0
    with c.db.session() as s:  # a model whose digest is unknown: its outputs get no key and reuse nothing
        s.execute(update(Model).where(Model.name == "tiny-b").values(digest=None))
    first, _, _ = run(c, PROMPTS, model="tiny-b", seed=9)
    view, loaded, generated = run(c, PROMPTS, model="tiny-b", seed=9, reuse=True)
    assert loaded and generated == 4 and view.counts["reused"] == 0
    with c.db.session() as s:
        keys = s.scalars(text("SELECT reuse_key FROM artifacts WHERE job_id IN (:a, :b)"),
                         {"a": first.id, "b": view.id}).all()
    assert keys == [None] * 8


def test_the_lookup_reads_the_partial_index(reuse_client):
    """The lookup, one statement per chunk, is planned on ix_artifacts_reuse_key (not a scan of every
    artifact)."""
    from sqlalchemy.dialects import postgresql

    from worker.reuse import lookup_statement

    c = reuse_client
    stmt = lookup_statement({"a" * 64, "b" * 64}).compile(dialect=postgresql.dialect(),
                                                          compile_kwargs={"literal_binds": True})
    with c.db.session() as s:
        s.execute(text("SET LOCAL enable_seqscan = off"))  # a tiny table: ask whether the index can serve it
        plan = "\n".join(s.scalars(text(f"EXPLAIN {stmt}")).all())
    assert "ix_artifacts_reuse_key" in plan, plan
