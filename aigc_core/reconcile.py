"""The outbox and the reconciler: the database is the truth, the broker only carries wake-ups."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from typing import TypeVar

from sqlalchemy import ColumnElement, and_, select, update

from aigc_core.db import Database
from aigc_core.jobs import finalize_if_done, release_ready
from aigc_core.schema import OPEN_ITEM_STATES, Chunk, ChunkStatus, Item, ItemStatus, Job, utcnow
from aigc_core.storage import ObjectStore

log = logging.getLogger("aigc.reconcile")
T = TypeVar("T")

# Row-value lists sent in one statement stay this short: PostgreSQL parses `(a, b) IN ((..), ..)` by
# recursion and fails past about 7,500 pairs ("stack depth limit exceeded"), which wedged the
# reconciler exactly when a large backlog needed waking.
PAIRS_PER_STATEMENT = 500

# publish(queue, job_id, chunk_no) sends one message; it raises if the broker refuses.
Publish = Callable[[str, str, int], None]
# held(queue) -> the (job_id, chunk_no) whose messages the broker still holds (queued or unacked), or
# None when it cannot tell (down, or the queue is too long to read).
Held = Callable[[str], "set[tuple[str, int]] | None"]


@dataclass
class ReconcileReport:
    published: int = 0
    publish_failed: int = 0
    expired_leases: int = 0
    stale_chunks: int = 0
    lost_messages: int = 0
    finalized: list[str] = field(default_factory=list)
    released: int = 0


def publish_chunks(db: Database, publish: Publish, chunks: Iterable[tuple[str, int, str]]) -> tuple[int, int]:
    """Publish (job_id, chunk_no, queue) rows, a group at a time, each group's outbox rows marked
    published once it is sent; stop at the first broker failure. Returns (sent, failed).

    A publisher with a ``many`` method sends a group in one round trip (``CeleryPublisher.many``: one
    Redis pipeline), which is what makes a million-item job's 31,250 messages take seconds."""
    todo = list(chunks)
    many = getattr(publish, "many", None)
    sent = 0
    for group in batched(todo, PAIRS_PER_STATEMENT):
        try:
            if many is not None:
                many([(queue, job_id, chunk_no) for job_id, chunk_no, queue in group])
            else:
                for job_id, chunk_no, queue in group:
                    publish(queue, job_id, chunk_no)
        except Exception as e:  # the broker's client raises many types; the outbox rows stay pending
            log.warning("publish failed (%s); %d chunks stay in the outbox for the reconciler", e, len(todo) - sent)
            return sent, len(todo) - sent
        with db.session() as s:
            for cond in chunks_in((job_id, chunk_no) for job_id, chunk_no, _ in group):
                s.execute(update(Chunk).where(cond)
                          .values(status=ChunkStatus.published, published_at=utcnow(),
                                  publish_count=Chunk.publish_count + 1))
        sent += len(group)
    return sent, 0


def _lost(s, candidates, held: Held, before) -> list[tuple[str, int]]:
    """Chunks published before ``before`` with pending items whose message the broker no longer holds."""
    old = [r for r in candidates if _aware(r.published_at) < before]
    lost: list[tuple[str, int]] = []
    for queue in sorted({r.queue for r in old}):
        in_broker = held(queue)
        if in_broker is None:
            continue
        # Read again after asking the broker: a chunk claimed (or published again) meanwhile is not lost.
        mine = [(r.job_id, r.chunk_no) for r in old if r.queue == queue and (r.job_id, r.chunk_no) not in in_broker]
        if not mine:
            continue
        still: set[tuple[str, int]] = set()
        for cond in chunks_in(mine):
            still.update((r.job_id, r.chunk_no) for r in s.execute(
                select(Chunk.job_id, Chunk.chunk_no).distinct()
                .join(Item, and_(Item.job_id == Chunk.job_id, Item.chunk_no == Chunk.chunk_no))
                .where(cond, Chunk.status == ChunkStatus.published,
                       Chunk.published_at < before, Item.status == ItemStatus.pending)))
        lost += [c for c in mine if c in still]
    if lost:
        log.warning("%d published chunks have no message in the broker (lost); publishing them again", len(lost))
    return lost


def batched(seq: Sequence[T], n: int) -> Iterator[list[T]]:
    for i in range(0, len(seq), n):
        yield list(seq[i : i + n])


def chunks_in(pairs: Iterable[tuple[str, int]]) -> Iterator[ColumnElement[bool]]:
    """``(job_id, chunk_no) in pairs`` as several short conditions, each one job's chunk numbers, a
    few hundred at a time: an index range on the primary key each, where a long row-value list is
    planned badly and, past about 7,500 pairs, does not parse at all on PostgreSQL."""
    by_job: dict[str, list[int]] = {}
    for job_id, chunk_no in pairs:
        by_job.setdefault(job_id, []).append(chunk_no)
    for job_id, nums in sorted(by_job.items()):
        for part in batched(sorted(nums), PAIRS_PER_STATEMENT):
            yield and_(Chunk.job_id == job_id, Chunk.chunk_no.in_(part))


def _aware(t):
    """SQLite returns naive datetimes for timezone-aware columns; they are UTC."""
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def reconcile(db: Database, store: ObjectStore, publish: Publish | None, *, stale_after_s: int,
              job_id: str | None = None, limit: int = 10_000, held: Held | None = None,
              lost_after_s: float = 15.0) -> ReconcileReport:
    """Re-publish what was lost, wake chunks whose leases expired, and finalize finished jobs.

    A published chunk with pending items is lost when the broker, asked through ``held``, holds no
    message for it (a Redis restarted empty; a task that failed outright): it is published again on
    this pass once ``lost_after_s`` passed since its last publish. Without an answer from the broker
    it waits ``stale_after_s`` (backing off). With ``publish=None`` (the embedded worker) chunks are
    put back in the outbox instead.
    """
    rep = ReconcileReport()
    rep.released = len(release_ready(db, store, job_id))
    now = utcnow()
    with db.session() as s:
        scope = [Item.job_id == job_id] if job_id else []
        expired = s.execute(
            select(Item.job_id, Item.chunk_no).where(Item.status == ItemStatus.running,
                                                    Item.lease_until < now, *scope).distinct().limit(limit)
        ).all()
        oldest = now - timedelta(seconds=min(stale_after_s, lost_after_s) if held else stale_after_s)
        candidates = s.execute(
            select(Chunk.job_id, Chunk.chunk_no, Chunk.published_at, Chunk.publish_count, Job.queue)
            .join(Item, and_(Item.job_id == Chunk.job_id, Item.chunk_no == Chunk.chunk_no))
            .join(Job, Job.id == Chunk.job_id)
            .where(Chunk.status == ChunkStatus.published, Chunk.published_at < oldest,
                   Item.status == ItemStatus.pending, *scope).distinct().limit(limit)
        ).all()
        # Backs off: the n-th re-publish waits n periods, so a chunk that is only waiting in a long
        # queue does not collect a message every period.
        stale = [r for r in candidates
                 if _aware(r.published_at) < now - timedelta(seconds=stale_after_s * max(1, r.publish_count))]
        stale_keys = {(r.job_id, r.chunk_no) for r in stale}
        candidates = [r for r in candidates if (r.job_id, r.chunk_no) not in stale_keys]
        lost = _lost(s, candidates, held, now - timedelta(seconds=lost_after_s)) if held else []
        rep.expired_leases, rep.stale_chunks, rep.lost_messages = len(expired), len(stale), len(lost)
        wake = {(r.job_id, r.chunk_no) for r in [*expired, *stale]} | set(lost)
        for cond in chunks_in(wake):
            s.execute(update(Chunk).where(cond)
                      .values(status=ChunkStatus.pending))
        pending: list[tuple[str, int, str]] = [(j, n, q) for j, n, q in s.execute(
            select(Chunk.job_id, Chunk.chunk_no, Job.queue).join(Job, Job.id == Chunk.job_id)
            .where(Chunk.status == ChunkStatus.pending, *([Chunk.job_id == job_id] if job_id else []))
            .order_by(Chunk.created_at).limit(limit)
        )]
        open_items = select(Item.id).where(Item.job_id == Job.id, Item.status.in_(OPEN_ITEM_STATES))
        done_jobs = list(s.scalars(
            select(Job.id).where(Job.finished_at.is_(None), ~open_items.exists(),
                                 *([Job.id == job_id] if job_id else []))
            .order_by(Job.created_at).limit(1000)
        ))
    for jid in done_jobs:
        if finalize_if_done(db, store, jid):
            rep.finalized.append(jid)
    if rep.finalized:  # jobs waiting for these can start now, in this same pass
        released = release_ready(db, store)
        rep.released += len(released)
        pending = [*pending, *released]
    if publish is not None and pending:
        rep.published, rep.publish_failed = publish_chunks(db, publish, pending)
    return rep
