"""Jobs as rows, as the runner leaves them, for the retention tests (SQLite and PostgreSQL alike)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aigc_core.jobs import item_key, job_prefix, sidecar_key
from aigc_core.schema import (
    Artifact,
    Chunk,
    ChunkStatus,
    Item,
    ItemStatus,
    Job,
    JobEvent,
    JobStatus,
    Model,
    new_id,
    utcnow,
)


def make_job(db, store, *, items: int = 3, age: timedelta | None = timedelta(days=40),
             status: JobStatus = JobStatus.succeeded, depends_on: list[dict[str, Any]] | None = None,
             orphan: bool = False, created_ago: timedelta | None = None, key: str | None = None) -> str:
    """A job of ``items`` items with their outputs and sidecars in ``store``, its manifest, chunks and
    events; finished ``age`` ago (None: still running). ``orphan``: a late delivery's output too."""
    now = utcnow()
    job_id = new_id()
    final = age is not None
    with db.session() as s:
        s.add(Job(id=job_id, kind="text", model_name="tiny", model_version=1, queue="text", status=status,
                  params={}, seed=1, meta={}, payload_digest="d" * 64, item_count=items, chunk_size=2,
                  depends_on=depends_on or [], idempotency_key=key,
                  created_at=now - (created_ago or age or timedelta()) - timedelta(minutes=5),
                  finished_at=now - age if age is not None else None,
                  succeeded_items=items if final else None, failed_items=0 if final else None,
                  cancelled_items=0 if final else None))
        s.flush()
        for c in range((items + 1) // 2):
            s.add(Chunk(job_id=job_id, chunk_no=c, status=ChunkStatus.done if final else ChunkStatus.published,
                        publish_count=1))
        s.add(JobEvent(job_id=job_id, type="finished" if final else "released", data={}))
        for i in range(items):
            done = final or i == 0
            it = Item(job_id=job_id, index=i, chunk_no=i // 2, custom_id=f"c{i}", prompt=f"p{i}", params={}, seed=i,
                      status=ItemStatus.succeeded if done else ItemStatus.pending, attempts=1)
            s.add(it)
            s.flush()
            if done:
                key = item_key(job_id, i, "txt", "tok")
                store.put(key, b"out")
                store.put(sidecar_key(job_id, i, "tok"), b"{}")
                s.add(Artifact(item_id=it.id, job_id=job_id, key=key, uri=store.uri(key), sha256="a" * 64, size=3,
                               media_type="text/plain", provenance={"seed": i}))
    if final:
        store.put(f"{job_prefix(job_id)}/manifest.jsonl", b"{}\n")
        store.put(f"{job_prefix(job_id)}/errors.jsonl", b"")
    if orphan:
        store.put(item_key(job_id, 0, "txt", "zombie"), b"late")
    return job_id


def register_lineage(db, job_id: str) -> None:
    """A model version whose lineage names ``job_id`` (the fine-tune that made it)."""
    with db.session() as s:
        s.add(Model(name=f"ft-{job_id[:6]}", version=1, kind="text", backend="text", uri="file:///m",
                    queue="text", defaults={}, lineage={"job_id": job_id, "base_model": "tiny@1"}))


def rows_of(db, job_id: str) -> dict[str, int]:
    from sqlalchemy import func, select

    with db.session() as s:
        owner = {Job: Job.id, Item: Item.job_id, Artifact: Artifact.job_id, Chunk: Chunk.job_id,
                 JobEvent: JobEvent.job_id}
        return {m.__tablename__: s.scalar(select(func.count()).select_from(m).where(col == job_id)) or 0
                for m, col in owner.items()}


def check_gc_removes_old_finished_jobs_only(db, store) -> None:
    """The behaviour both databases must show: old finished jobs (and their objects, orphans too) go;
    recent, running, lineage-named and depended-on jobs stay; a dry run changes nothing."""
    from aigc_core.retention import collect_garbage

    old = [make_job(db, store, items=7, orphan=True), make_job(db, store, items=1, status=JobStatus.failed)]
    recent = make_job(db, store, age=timedelta(days=2))
    running = make_job(db, store, age=None)
    trained = make_job(db, store, items=1)
    register_lineage(db, trained)
    needed = make_job(db, store)
    make_job(db, store, age=None, depends_on=[{"job": needed, "require": "succeeded"}])
    every = [*old, recent, running, trained, needed]
    before = {j: (rows_of(db, j), sorted(store.list(f"{job_prefix(j)}/"))) for j in every}

    dry = collect_garbage(db, store, timedelta(days=30), objects=True, dry_run=True)
    assert (dry.jobs, dry.items, dry.artifacts) == (2, 8, 8)
    assert dry.objects == 7 * 2 + 1 + 2 + 1 * 2 + 2  # outputs, sidecars, the orphan, manifests, errors
    assert dry.kept == {"a model's lineage": 1, "an unfinished job depends on it": 1}
    assert {j: (rows_of(db, j), sorted(store.list(f"{job_prefix(j)}/"))) for j in every} == before

    lines: list[str] = []
    rep = collect_garbage(db, store, timedelta(days=30), objects=True, rows_per_statement=3, progress=lines.append)
    assert (rep.jobs, rep.items, rep.artifacts, rep.objects) == (2, 8, 8, dry.objects)
    assert rep.chunks == 4 + 1 and rep.events == 2 and lines
    for j in old:
        assert rows_of(db, j) == {"jobs": 0, "items": 0, "artifacts": 0, "chunks": 0, "job_events": 0}
        assert list(store.list(f"{job_prefix(j)}/")) == []
    for j in (recent, running, trained, needed):
        assert (rows_of(db, j), sorted(store.list(f"{job_prefix(j)}/"))) == before[j]
    again = collect_garbage(db, store, timedelta(days=30), objects=True)
    assert again.jobs == 0


class WatchOnlyRunner:
    """A Client runner whose workers are elsewhere and which publishes nothing: ``wait`` only watches
    the database (what CeleryRunner's wait does), for jobs made with ``make_job`` and finished by hand."""

    publisher = None

    def dispatch(self, client, job_id):
        return None

    def drive(self, client, job_id, on_chunk):
        return None

    def warm(self, client, model):
        return None
