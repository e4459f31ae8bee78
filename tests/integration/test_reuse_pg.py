"""Reuse of identical work on PostgreSQL and SeaweedFS with the tiny text model fetched from S3: a rerun
with reuse takes server-side copies and never loads the model; anything that differs generates."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text, update

from aigc_core.registry import dir_digest
from aigc_core.retention import collect_garbage
from aigc_core.schema import JobEvent, JobStatus, Model
from aigc_core.settings import Settings
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


def test_a_rerun_with_reuse_copies_every_output_server_side_and_never_loads_the_model(reuse_client, s3_server,
                                                                                        s3_bucket):
    c = reuse_client
    first, loaded, generated = run(c, PROMPTS)
    assert first.status == JobStatus.succeeded and loaded and generated == 4
    reused_before = _reused("tiny@1")
    again, loaded, generated = run(c, PROMPTS, reuse=True)
    assert again.status == JobStatus.succeeded and not loaded and generated == 0  # nothing generated
    assert again.counts["reused"] == 4 and again.counts["succeeded"] == 4 and _reused("tiny@1") - reused_before == 4
    originals = {r.index: r for r in c.results(first.id)}
    s3 = s3_server.client()
    for r in c.results(again.id):
        o = originals[r.index]
        assert r.sha256 == o.sha256 and r.uri.startswith(f"s3://{s3_bucket}/outputs/jobs/{again.id}/items/")
        assert r.provenance["reused_from"] == {"job_id": first.id, "item_index": o.index, "key": o.key,
                                               "sha256": o.sha256}
        head = s3.head_object(Bucket=s3_bucket, Key=f"outputs/{r.key}")
        assert head["ContentType"].startswith("text/plain") and c.store.get(r.key) == c.store.get(o.key)
    # The copies are the new job's own objects: removing the first job and its objects leaves them whole.
    with c.db.session() as s:  # old enough for gc
        s.execute(text("UPDATE jobs SET created_at = now() - interval '30 days', "
                       "finished_at = now() - interval '30 days' WHERE id = :id"), {"id": first.id})
    from datetime import timedelta

    report = collect_garbage(c.db, c.store, timedelta(days=7), objects=True)
    assert report.jobs == 1 and not list(c.store.list(f"jobs/{first.id}/"))
    import hashlib

    assert all(hashlib.sha256(c.store.get(r.key or "")).hexdigest() == r.sha256 for r in c.results(again.id))
    # The finished job's stored counts (the dashboard's listing) say reused too.
    from scheduler.api.dashboard.data import view_of

    with c.db.session() as s:
        assert view_of(s, again.id).counts["reused"] == 4


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
    """One IN query per chunk, planned on ix_artifacts_reuse_key (not a scan of every artifact)."""
    c = reuse_client
    with c.db.session() as s:
        s.execute(text("SET LOCAL enable_seqscan = off"))  # a tiny table: ask whether the index can serve it
        plan = "\n".join(s.scalars(text(
            "EXPLAIN SELECT min(id) FROM artifacts WHERE reuse_key IN ('a', 'b') GROUP BY reuse_key")).all())
    assert "ix_artifacts_reuse_key" in plan, plan
