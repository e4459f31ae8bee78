"""Job state shared by the submit and the worker side: progress, finalization, manifest, results."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from aigc_core.db import Database
from aigc_core.errors import IdempotencyConflict, NotFound, SpecError
from aigc_core.notify import notify_finished
from aigc_core.schema import (
    OPEN_ITEM_STATES,
    Artifact,
    Chunk,
    ChunkStatus,
    Item,
    ItemStatus,
    Job,
    JobEvent,
    JobStatus,
    utcnow,
)
from aigc_core.storage import ObjectStore

RESULT_PAGE = 1000


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def item_key(job_id: str, index: int, ext: str, claim: str) -> str:
    """Object keys come from server ids only, one key per delivery (``claim``, its claim token): a
    delivery that lost its items (a zombie worker's late PUT, a retried request) writes beside the
    committed output, never over it. The Artifact row names the key that was committed."""
    return f"{job_prefix(job_id)}/items/{index:06d}.{claim}.{ext}"


def sidecar_key(job_id: str, index: int, claim: str) -> str:
    """The provenance sidecar; its own suffix, so it never collides with a JSON output."""
    return f"{job_prefix(job_id)}/items/{index:06d}.{claim}.provenance.json"


def sidecar_of(key: str) -> str:
    """The sidecar key written beside an output key made by ``item_key``."""
    folder, name = key.rsplit("/", 1)
    index, claim = name.split(".", 2)[:2]
    return f"{folder}/{index}.{claim}.provenance.json"


@dataclass(frozen=True)
class JobView:
    id: str
    kind: str
    model: str
    status: JobStatus
    counts: dict[str, int]
    item_count: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    metadata: dict[str, Any] = field(default_factory=dict)
    manifest_uri: str | None = None
    progress: dict[str, Any] | None = None  # the last training event of a fine-tuning job

    @property
    def done(self) -> int:
        """Items in a final state ("reused" is a part of "succeeded", not a state of its own)."""
        return sum(v for k, v in self.counts.items() if k in FINAL_ITEM_STATES)

    @property
    def final(self) -> bool:
        return self.status.final and self.finished_at is not None


@dataclass(frozen=True)
class Result:
    index: int
    custom_id: str
    status: ItemStatus
    uri: str | None
    key: str | None
    sha256: str | None
    size: int | None
    media_type: str | None
    error: str | None
    attempts: int
    provenance: dict[str, Any] = field(default_factory=dict)
    duration_s: float | None = None  # audio

    def manifest_line(self) -> dict[str, Any]:
        keys = ("index", "custom_id", "status", "uri", "sha256", "size", "media_type", "error")
        d = {k: getattr(self, k) for k in keys}
        d["status"] = self.status.value
        if self.duration_s is not None:
            d["duration_s"] = self.duration_s
        return d


FINAL_ITEM_STATES = frozenset(st.value for st in ItemStatus if st not in OPEN_ITEM_STATES)


def item_counts(s: Session, job_id: str, *, reuse: bool = False) -> dict[str, int]:
    """Items by state, and ``reused``: how many of the succeeded ones reuse an earlier output
    (counted only for a job with the reuse option, through a partial index of reused outputs)."""
    rows = s.execute(select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status))
    counts = {st.value: 0 for st in ItemStatus}
    counts.update({st.value if hasattr(st, "value") else st: n for st, n in rows})
    counts["reused"] = reused_count(s, job_id) if reuse else 0
    return counts


def reused_count(s: Session, job_id: str) -> int:
    return int(s.scalar(select(func.count()).select_from(Artifact)
                        .where(Artifact.job_id == job_id, Artifact.reused_from_id.is_not(None))) or 0)


def job_view(s: Session, job_id: str, store: ObjectStore | None = None) -> JobView:
    job = s.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    manifest = store.uri(f"{job_prefix(job_id)}/manifest.jsonl") if store and job.finished_at else None
    progress = None
    if job.kind == "finetune":
        progress = s.scalar(select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "train")
                            .order_by(JobEvent.id.desc()).limit(1))
    version = job.model_version if job.model_version is not None else "?"
    return JobView(
        job.id, job.kind, f"{job.model_name}@{version}", job.status, item_counts(s, job_id, reuse=job.reuse),
        job.item_count, job.created_at, job.started_at, job.finished_at, dict(job.meta or {}), manifest, progress,
    )


def iter_results(db: Database, job_id: str, *, with_provenance: bool = True) -> Iterator[Result]:
    """Every item in index order, paged so a 100,000-item job never sits in memory at once."""
    last = -1
    while True:
        with db.session() as s:
            cols = [Item.index, Item.custom_id, Item.status, Item.error, Item.attempts,
                    Artifact.uri, Artifact.key, Artifact.sha256, Artifact.size, Artifact.media_type,
                    Artifact.duration_s]
            if with_provenance:
                cols.append(Artifact.provenance)
            rows = s.execute(
                select(*cols).outerjoin(Artifact, Artifact.item_id == Item.id)
                .where(Item.job_id == job_id, Item.index > last).order_by(Item.index).limit(RESULT_PAGE)
            ).all()
        for r in rows:
            m = r._mapping  # by name: a Row's own .index is tuple.index
            yield Result(m["index"], m["custom_id"], ItemStatus(m["status"]), m["uri"], m["key"], m["sha256"],
                         m["size"], m["media_type"], m["error"], m["attempts"],
                         dict(m["provenance"] or {}) if with_provenance else {}, m["duration_s"])
        if len(rows) < RESULT_PAGE:
            return
        last = rows[-1]._mapping["index"]


def record_event(s: Session, job_id: str, type_: str, **data: Any) -> None:
    s.add(JobEvent(job_id=job_id, type=type_, data=data))


def _open_items(job_id: str):
    return select(Item.id).where(Item.job_id == job_id, Item.status.in_(OPEN_ITEM_STATES))


def has_open_items(s: Session, job_id: str) -> bool:
    """One indexed probe: does any item of the job still wait or run?"""
    return bool(s.scalar(_open_items(job_id).exists().select()))


def final_status(job: Job, counts: dict[str, int]) -> JobStatus:
    if job.status == JobStatus.cancelled:
        return JobStatus.cancelled
    if counts.get("failed", 0) == 0:
        return JobStatus.succeeded
    if counts.get("succeeded", 0) == 0:
        return JobStatus.failed
    return JobStatus.partially_failed


def finalize_if_done(db: Database, store: ObjectStore, job_id: str) -> JobStatus | None:
    """When no item is open: write manifest.jsonl and errors.jsonl, then mark the job final, once.

    Both files are streamed: read a page of rows at a time and written as they are read (a multipart
    upload on S3, a temporary file renamed into place on disk), so a million-item job's manifest is
    never whole in the worker's memory."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.finished_at is not None or has_open_items(s, job_id):
            return None  # the common case after a chunk: one indexed probe, not a count of the job
        counts = item_counts(s, job_id, reuse=job.reuse)
    prefix = job_prefix(job_id)
    # Object first, database second: a final job always has its whole manifest.
    store.put_stream(f"{prefix}/manifest.jsonl", manifest_chunks(db, job_id), "application/x-ndjson")
    errors = error_chunks(db, job_id) if counts.get("failed", 0) else iter(())
    store.put_stream(f"{prefix}/errors.jsonl", errors, "application/x-ndjson")
    sweep_orphans(db, store, job_id)
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:  # removed meanwhile (aigc gc never takes an open job, but a person might)
            return None
        status = final_status(job, counts)
        # Not if an item was reopened meanwhile (retry_failed): that job is not finished after all.
        done = _rowcount(s.execute(
            update(Job).where(Job.id == job_id, Job.finished_at.is_(None), ~_open_items(job_id).exists())
            .values(status=status, finished_at=utcnow(), succeeded_items=counts.get("succeeded", 0),
                    failed_items=counts.get("failed", 0), cancelled_items=counts.get("cancelled", 0),
                    reused_items=counts["reused"])
        ))
        if done:
            record_event(s, job_id, "finished", status=status.value, counts=counts)
            notify_finished(s, job_id, status.value)  # Client.wait hears it when this commits
            s.execute(update(Chunk).where(Chunk.job_id == job_id, Chunk.status == ChunkStatus.published)
                      .values(status=ChunkStatus.done))
    return status if done else None


def _rowcount(result: Any) -> int:
    """Rows an UPDATE or DELETE matched (``Session.execute`` is typed as returning a plain Result)."""
    return int(cast(CursorResult[Any], result).rowcount)


def _json_line(d: dict[str, Any]) -> str:
    return json.dumps(d, ensure_ascii=False) + "\n"


def manifest_chunks(db: Database, job_id: str) -> Iterator[bytes]:
    """manifest.jsonl a page of items at a time: one JSON line per item, in index order."""
    lines: list[str] = []
    wrote = False
    for r in iter_results(db, job_id, with_provenance=False):
        lines.append(_json_line(r.manifest_line()))
        if len(lines) >= RESULT_PAGE:
            yield "".join(lines).encode()
            lines.clear()
            wrote = True
    if lines or not wrote:
        yield ("".join(lines) or "\n").encode()  # a job without items has always had a manifest of one newline


def error_chunks(db: Database, job_id: str) -> Iterator[bytes]:
    """errors.jsonl a page of failed items at a time, in index order (keyset-paged on the index)."""
    last = -1
    while True:
        with db.session() as s:
            rows = s.execute(
                select(Item.index, Item.custom_id, Item.error, Item.attempts)
                .where(Item.job_id == job_id, Item.status == ItemStatus.failed, Item.index > last)
                .order_by(Item.index).limit(RESULT_PAGE)
            ).all()
        if rows:
            yield "".join(_json_line({"index": r[0], "custom_id": r[1], "error": r[2], "attempts": r[3]})
                          for r in rows).encode()
        if len(rows) < RESULT_PAGE:
            return
        last = rows[-1][0]


DISCARDED_EVENT = "outputs_discarded"


def sweep_orphans(db: Database, store: ObjectStore, job_id: str) -> int:
    """Remove the objects of deliveries that lost their items (no Artifact row names them).

    Only a job where that can have happened is listed: an item whose generation began more than once
    (another delivery took it over), or a delivery that recorded objects it could not remove. A
    zombie's PUT that lands even later stays an orphan no row, manifest or result points at.
    Best-effort: a store error leaves the orphans and is logged, it does not hold the job open."""
    import logging

    with db.session() as s:
        retried = s.scalar(select(Item.id).where(Item.job_id == job_id, Item.attempts > 1).limit(1))
        discarded = s.scalar(select(JobEvent.id).where(JobEvent.job_id == job_id,
                                                       JobEvent.type == DISCARDED_EVENT).limit(1))
        if retried is None and discarded is None:
            return 0
        keep = set()
        for (key,) in s.execute(select(Artifact.key).where(Artifact.job_id == job_id)):
            keep |= {key, sidecar_of(key), key + ".c2pa"}  # .c2pa: a text output's detached manifest
    try:
        orphans = [k for k in store.list(f"{job_prefix(job_id)}/items/") if k not in keep]
        if orphans:
            store.delete(orphans)
    except Exception as e:
        logging.getLogger("aigc.jobs").warning("could not remove orphaned outputs of job %s: %s", job_id, e)
        return 0
    return len(orphans)


def finish_chunk(s: Session, job_id: str, chunk_no: int) -> bool:
    """A published chunk whose items are all final is done: no scan of open work reads it again.
    Atomic with the check, so an item reopened meanwhile (retry_failed) keeps it open."""
    open_items = select(Item.id).where(Item.job_id == job_id, Item.chunk_no == chunk_no,
                                       Item.status.in_(OPEN_ITEM_STATES))
    return bool(_rowcount(s.execute(update(Chunk).where(Chunk.job_id == job_id, Chunk.chunk_no == chunk_no,
                                                        Chunk.status == ChunkStatus.published, ~open_items.exists())
                                    .values(status=ChunkStatus.done))))


def release_ready(db: Database, store: ObjectStore, job_id: str | None = None) -> list[tuple[str, int, str]]:
    """Release waiting jobs whose dependencies are all final; returns their chunks, now in the outbox.

    A dependency that had to succeed and did not fails the waiting job's items with the reason.
    """
    from aigc_core.registry import resolve  # imported here: registry is the heavier module

    released: list[tuple[str, int, str]] = []
    failed_jobs = []
    with db.session() as s:
        q = select(Job).where(Job.status == JobStatus.waiting).order_by(Job.created_at).limit(1000)
        for job in s.scalars(q.where(Job.id == job_id) if job_id else q):
            deps = {d["job"]: d["require"] for d in job.depends_on or []}
            states = dict(s.execute(select(Job.id, Job.status).where(Job.id.in_(list(deps)),
                                                                     Job.finished_at.is_not(None))).all())
            if len(states) < len(deps):
                continue
            reason = next((f"job {d} it waited for ended {states[d].value}" for d, req in deps.items()
                           if req == "succeeded" and states[d] != JobStatus.succeeded), None)
            if reason is None and job.model_version is None:
                try:
                    ref = resolve(s, job.model_name)
                    job.model_version, job.queue = ref.version, ref.queue
                except SpecError:
                    reason = f"model {job.model_name!r} was never registered by the jobs it waited for"
            job.status = JobStatus.queued
            if reason is not None:
                s.execute(update(Item).where(Item.job_id == job.id, Item.status == ItemStatus.pending)
                          .values(status=ItemStatus.failed, error=reason, finished_at=utcnow()))
                record_event(s, job.id, "released", failed=reason)
                failed_jobs.append(job.id)
                continue
            chunks = list(s.scalars(select(Chunk.chunk_no).where(Chunk.job_id == job.id,
                                                                 Chunk.status == ChunkStatus.held)))
            s.execute(update(Chunk).where(Chunk.job_id == job.id, Chunk.status == ChunkStatus.held)
                      .values(status=ChunkStatus.pending))
            record_event(s, job.id, "released", chunks=len(chunks))
            released += [(job.id, c, job.queue) for c in chunks]
    for jid in failed_jobs:
        finalize_if_done(db, store, jid)
    return released


# ---- job ids as people type them ------------------------------------------------------------------

JOB_ID_MIN_PREFIX = 6
_JOB_ID_CHARS = frozenset("0123456789abcdef")


def job_by_idempotency_key(s: Session, key: str | None, digest: str) -> str | None:
    """The job an idempotency key already made, if any; the same key with another payload is refused."""
    if not key:
        return None
    row = s.execute(select(Job.id, Job.payload_digest).where(Job.idempotency_key == key)).first()
    if row is None:
        return None
    if row.payload_digest != digest:
        raise IdempotencyConflict(f"idempotency key {key!r} was used for job {row.id} with a different payload")
    return row.id


def resolve_job_id(s: Session, text: str) -> str:
    """The job id that ``text`` names: a whole id, or a unique prefix of 6 or more of its hex
    characters, as the demo table, ``aigc wait`` and narrow tables print them (a trailing "…" is
    allowed, and any case). A whole id is returned without a query; the caller's lookup finds out
    whether it exists. Too short or ambiguous: SpecError; nothing matches: NotFound."""
    given = str(text).strip().rstrip("…").lower()
    if not given or not set(given) <= _JOB_ID_CHARS or len(given) > 32:
        raise NotFound(f"no job {text!r}: a job id is 32 hex characters, or a unique prefix of at least "
                       f"{JOB_ID_MIN_PREFIX} of them")
    if len(given) == 32:
        return given
    if len(given) < JOB_ID_MIN_PREFIX:
        raise SpecError(f"job id {text!r} is too short: give at least {JOB_ID_MIN_PREFIX} of its characters")
    # A range on the primary key (its index), and LIKE to be exact whatever the collation; a few rows.
    rows = s.scalars(select(Job.id).where(Job.id >= given, Job.id < given + "g", Job.id.like(given + "%"))
                     .order_by(Job.id).limit(6)).all()
    if not rows:
        raise NotFound(f"no job {text!r}")
    if len(rows) > 1:
        more = " and more" if len(rows) > 5 else ""
        raise SpecError(f"job id {text!r} is ambiguous: it starts {', '.join(rows[:5])}{more}; give more characters")
    return rows[0]
