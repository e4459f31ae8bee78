"""Retention: ``aigc gc`` removes finished jobs older than an age, in short batched transactions.

A job goes with its items, artifacts, chunks and events (so does an abandoned streaming submit: a
``submitting`` job without an idempotency key, created before the cutoff, which nothing can
resume); with ``objects`` its whole prefix in the object store goes too (outputs, sidecars,
manifest, errors, checkpoints, and any orphan a zombie delivery wrote after the job finished: the
prefix is listed, not derived from the rows). Deletes run
a few thousand rows per statement, each in its own transaction, so locks are short and a running
job's commits never wait long behind gc (PostgreSQL takes row locks only on the rows it deletes).

Never removed: a job that is not finished, a job a registered model's lineage names (the fine-tune
that made it: its card and metrics stay inspectable), a job an unfinished job depends on
(``after`` / ``from``), a job whose API batch has not yet written its output file, and a job whose
outputs a kept job reuses (worker/reuse.py: the reused rows name the original's objects; such a job
goes in the same run as the last job that reuses it). Objects go before rows, so an interrupted run
leaves rows whose objects are gone, which the next run removes; never objects that no row leads to.
A job is marked ``removing`` in the transaction that decides to remove it, so no reuse refers to it
from then on (``_take``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from aigc_core.db import Database
from aigc_core.errors import SpecError
from aigc_core.jobs import job_prefix
from aigc_core.schema import (
    FINAL_JOB_STATES,
    ApiBatch,
    Artifact,
    Chunk,
    Item,
    Job,
    JobEvent,
    JobStatus,
    Model,
    utcnow,
)
from aigc_core.storage import ObjectStore

log = logging.getLogger("aigc.retention")

ROWS_PER_STATEMENT = 5_000  # one short transaction each: milliseconds of locks, not minutes
JOBS_PER_BATCH = 200
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_AGE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")

Progress = Callable[[str], None]


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` as a timedelta; anything else is a SpecError."""
    m = _AGE.match(str(text).lower())
    if not m or int(m.group(1)) == 0:
        raise SpecError(f"age {text!r}: give a positive number and a unit, s, m, h, d or w (e.g. 30d, 12h)")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


@dataclass
class GcReport:
    dry_run: bool
    cutoff: datetime
    jobs: int = 0
    items: int = 0
    artifacts: int = 0
    chunks: int = 0
    events: int = 0
    objects: int = 0
    orphan_prefixes: int = 0  # with orphans: prefixes of jobs the database no longer has
    kept: dict[str, int] = field(default_factory=dict)  # old finished jobs kept, by reason
    seconds: float = 0.0

    def line(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        kept = ", ".join(f"{n} {why}" for why, n in sorted(self.kept.items()) if n) or "none"
        return (f"gc {verb} {self.jobs} jobs finished before {self.cutoff:%Y-%m-%d %H:%M:%S} UTC: "
                f"{self.items} items, {self.artifacts} artifacts, {self.chunks} chunks, {self.events} events, "
                f"{self.objects} objects{self._orphans()}; kept: {kept} ({self.seconds:.1f} s)")

    def _orphans(self) -> str:
        return f" (of which under {self.orphan_prefixes} orphan prefixes)" if self.orphan_prefixes else ""


def protected_jobs(s: Session) -> dict[str, str]:
    """{job id: why it is kept}: jobs a registered model's lineage names, and jobs an unfinished job
    depends on. Both sets are small (models; open jobs), read whole."""
    keep: dict[str, str] = {}
    for (lineage,) in s.execute(select(Model.lineage)):
        if isinstance(lineage, dict) and lineage.get("job_id"):
            keep[str(lineage["job_id"])] = "a model's lineage"
    for (deps,) in s.execute(select(Job.depends_on).where(Job.finished_at.is_(None))):
        for d in deps or []:
            if isinstance(d, dict) and d.get("job"):
                keep.setdefault(str(d["job"]), "an unfinished job depends on it")
    # An API batch writes its output file from the job's rows when it is first read after the job
    # finished (scheduler/api/batches.py); until then the job is all there is.
    for job_id in s.scalars(select(ApiBatch.job_id).where(ApiBatch.status.is_(None), ApiBatch.job_id.is_not(None))):
        keep.setdefault(str(job_id), "an API batch has not written its output")
    return keep


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def removable(cutoff: datetime) -> ColumnElement[bool]:
    """Jobs gc may take: finished before ``cutoff``, or an abandoned streaming submit (``submitting``,
    no idempotency key to resume it by, created before ``cutoff``: scheduler/bulk.py)."""
    return or_(and_(Job.finished_at.is_not(None), Job.finished_at < cutoff, Job.status.in_(FINAL_JOB_STATES)),
               and_(Job.status == JobStatus.submitting, Job.idempotency_key.is_(None), Job.created_at < cutoff))


def _candidate_pages(db: Database, cutoff: datetime, page: int) -> Iterable[list[str]]:
    """Removable jobs, keyset-paged on the primary key."""
    after = ""
    while True:
        with db.session() as s:
            rows = list(s.scalars(select(Job.id).where(removable(cutoff), Job.id > after).order_by(Job.id).limit(page)))
        if rows:
            yield rows
        if len(rows) < page:
            return
        after = rows[-1]


def _delete_in_batches(db: Database, model: Any, job_ids: Sequence[str], rows: int) -> int:
    """DELETE ... WHERE pk IN (SELECT pk ... LIMIT rows), one transaction each, until none are left."""
    pk = model.id
    total = 0
    while True:
        with db.session() as s:
            sub = select(pk).where(model.job_id.in_(job_ids)).limit(rows).scalar_subquery()
            n = _rowcount(s.execute(delete(model).where(pk.in_(sub)), execution_options={"synchronize_session": False}))
        total += n
        if n < rows:
            return total


def _delete_chunks(db: Database, job_ids: Sequence[str], rows: int) -> int:
    total = 0
    while True:
        with db.session() as s:
            keys = s.execute(select(Chunk.job_id, Chunk.chunk_no).where(Chunk.job_id.in_(job_ids)).limit(rows)).all()
            for job_id in {k[0] for k in keys}:
                nums = [k[1] for k in keys if k[0] == job_id]
                s.execute(delete(Chunk).where(Chunk.job_id == job_id, Chunk.chunk_no.in_(nums)),
                          execution_options={"synchronize_session": False})
        total += len(keys)
        if len(keys) < rows:
            return total


def delete_jobs(db: Database, job_ids: Sequence[str], rows: int = ROWS_PER_STATEMENT) -> tuple[int, int, int, int]:
    """The jobs' rows, a bounded DELETE per transaction, the job rows last (a job row stays until
    everything under it is gone). Returns the artifacts, items, chunks and events removed."""
    counts = (_delete_in_batches(db, Artifact, job_ids, rows), _delete_in_batches(db, Item, job_ids, rows),
              _delete_chunks(db, job_ids, rows), _delete_in_batches(db, JobEvent, job_ids, rows))
    with db.session() as s:
        s.execute(delete(Job).where(Job.id.in_(job_ids)), execution_options={"synchronize_session": False})
    return counts


def _count(s: Session, model: Any, job_ids: Sequence[str]) -> int:
    return int(s.scalar(select(func.count()).select_from(model).where(model.job_id.in_(job_ids))) or 0)


REUSED_BY_A_KEPT_JOB = "a kept job reuses its outputs"


def _take(db: Database, rep: GcReport, page: list[str], gone: set[str]) -> tuple[list[str], list[str]]:
    """Of ``page``: the jobs to remove now, marked ``removing`` in the transaction that decides it, and
    those held because a job that stays refers to their outputs (worker/reuse.py), left unmarked for a
    later round. ``gone``: the jobs this run removed already (a dry run's would-be removals, whose rows
    are still there). Counts what a dry run would remove.

    The mark orders gc against a reuse commit. On PostgreSQL the mark waits for every commit holding
    the job's row ``FOR SHARE``, and the reference check after it, a later statement, sees what they
    committed; a reuse commit that comes after the mark finds it and refers to nothing here. On SQLite
    both sides take the database's write lock before the reads that decide, so they are serialised."""
    with db.session() as s:
        keep = protected_jobs(s)  # read again per batch: a job submitted meanwhile may depend on one
        ids = [j for j in page if j not in keep]
        for j in page:
            if j in keep:
                rep.kept[keep[j]] = rep.kept.get(keep[j], 0) + 1
        if not ids:
            return [], []
        # Re-read in this transaction: a job reopened meanwhile (retry_failed) is not finished any more.
        ids = list(s.scalars(select(Job.id).where(Job.id.in_(ids), removable(rep.cutoff))))
        # A first look without locks: an original that reruns keep referring to is neither locked nor
        # rewritten by every run.
        held = _held(s, ids, gone, dry_run=rep.dry_run)
        ids = [j for j in ids if j not in held]
        if ids and not rep.dry_run:
            # Locked in id order, as a reuse commit takes its FOR SHARE locks: neither waits holding what
            # the other needs. NO KEY: foreign-key checks on the job's rows are not blocked.
            ids = list(s.scalars(select(Job.id).where(Job.id.in_(ids), removable(rep.cutoff)).order_by(Job.id)
                                 .with_for_update(key_share=True)))
            ids = list(s.scalars(update(Job).where(Job.id.in_(ids), removable(rep.cutoff)).values(removing=True)
                                 .returning(Job.id).execution_options(synchronize_session=False)))
            if late := _held(s, ids, gone, dry_run=False):  # committed before the mark: seen now
                s.execute(update(Job).where(Job.id.in_(late)).values(removing=False),
                          execution_options={"synchronize_session": False})
                held |= late
                ids = [j for j in ids if j not in late]
        if rep.dry_run and ids:
            rep.items += _count(s, Item, ids)
            rep.artifacts += _count(s, Artifact, ids)
            rep.chunks += _count(s, Chunk, ids)
            rep.events += _count(s, JobEvent, ids)
    return ids, sorted(held)


def _held(s: Session, ids: list[str], gone: set[str], *, dry_run: bool) -> set[str]:
    """Of ``ids``, the jobs that must stay because a job that stays refers to their outputs: a job
    outside ``ids`` and ``gone``, or one of ``ids`` held itself (jobs chain: B reuses A's outputs and
    generates new ones that C reuses). Jobs that refer only to each other go together."""
    going, held = set(ids), set()
    pairs = _referrers(s, ids) if dry_run else None
    while going:
        if pairs is not None:
            refs = {a for a in going if pairs.get(a, set()) - going - gone}
        else:
            refs = _referred_from_outside(s, going)
        if not refs:
            break
        held |= refs
        going -= refs
    return held


def _referred_from_outside(s: Session, going: set[str]) -> set[str]:
    """Of ``going``, the jobs another job's rows (not one of ``going``) refer to: one probe of a partial
    index per job, stopping at the first such row. Jobs already removed have no rows left to count."""
    ids = sorted(going)
    outside = and_(Artifact.reused_from_job == Job.id, Artifact.job_id.not_in(ids))
    return set(s.scalars(select(Job.id).where(Job.id.in_(ids), exists().where(outside))))


def _referrers(s: Session, ids: list[str]) -> dict[str, set[str]]:
    """{job: the jobs whose rows refer to its outputs}, for a dry run, whose would-be removals still have
    their rows: it reads every reference to these jobs (a real run stops at the first)."""
    out: dict[str, set[str]] = {}
    for original, referrer in s.execute(select(Artifact.reused_from_job, Artifact.job_id)
                                        .where(Artifact.reused_from_job.in_(ids)).distinct()):
        if original is not None:
            out.setdefault(original, set()).add(referrer)
    return out


def collect_garbage(db: Database, store: ObjectStore | None, older_than: timedelta, *, objects: bool = False,
                    orphans: bool = False, dry_run: bool = False, rows_per_statement: int = ROWS_PER_STATEMENT,
                    jobs_per_batch: int = JOBS_PER_BATCH, progress: Progress | None = None,
                    now: datetime | None = None) -> GcReport:
    """Remove finished jobs whose ``finished_at`` is older than ``older_than`` (see the module doc).

    ``objects`` also removes each job's prefix in ``store``; ``orphans`` also the prefixes of jobs the
    database no longer has (``sweep_orphan_prefixes``). ``dry_run`` counts what would go and changes
    nothing. ``progress`` gets a line after each batch of jobs."""
    objects = objects or orphans  # else the jobs removed now would leave orphans for the next run
    if objects and store is None:
        raise SpecError("gc of objects needs the object store")
    t0 = time.monotonic()
    rep = GcReport(dry_run, (now or utcnow()) - older_than)
    taken: set[str] = set()  # the jobs removed (or, in a dry run, that would be) so far
    referenced: list[str] = []  # held: a job that stays refers to their outputs; asked again after the others

    def remove(ids: list[str]) -> None:
        if objects and store is not None:
            rep.objects += _objects(store, ids, dry_run)
        if not dry_run:
            artifacts, items, chunks, events = delete_jobs(db, ids, rows_per_statement)
            rep.artifacts += artifacts
            rep.items += items
            rep.chunks += chunks
            rep.events += events
        rep.jobs += len(ids)
        taken.update(ids)
        rep.seconds = time.monotonic() - t0
        if progress is not None:
            verb = "would remove" if dry_run else "removed"
            progress(f"gc: {verb} {rep.jobs} jobs, {rep.items} items, {rep.objects} objects so far "
                     f"({rep.seconds:.1f} s)")

    for page in _candidate_pages(db, rep.cutoff, jobs_per_batch):
        ids, held = _take(db, rep, page, taken)
        referenced += held
        if ids:
            remove(ids)
    # A held job goes once the jobs that refer to its outputs have gone: rounds over the held ones until
    # one removes nothing (a chain of n reusing jobs takes at most n rounds).
    while referenced:
        still: list[str] = []
        for i in range(0, len(referenced), jobs_per_batch):
            ids, held = _take(db, rep, referenced[i:i + jobs_per_batch], taken)
            still += held
            if ids:
                remove(ids)
        if len(still) == len(referenced):
            break
        referenced = still
    if referenced:
        rep.kept[REUSED_BY_A_KEPT_JOB] = rep.kept.get(REUSED_BY_A_KEPT_JOB, 0) + len(referenced)
    if orphans and store is not None:
        sweep_orphan_prefixes(db, store, rep, progress)
    rep.seconds = time.monotonic() - t0
    log.info("%s", rep.line())
    return rep


_JOB_FOLDER = re.compile(r"^jobs/([0-9a-f]{32})/$")
PREFIXES_PER_QUERY = 500


def sweep_orphan_prefixes(db: Database, store: ObjectStore, rep: GcReport, progress: Progress | None = None) -> None:
    """Objects under ``jobs/{id}/`` for an id the database has no job for: a gc run without
    ``objects``, a job removed by hand, a zombie delivery's PUT that landed after its job's prefix was
    removed. Only a prefix whose newest object is older than the cutoff goes: objects are written only
    after their job's row is committed, so a prefix without a row and with nothing new is nobody's;
    and never one whose outputs another job's rows still refer to (its job was removed by hand).
    The store is listed a folder at a time (one request per 1,000 jobs on S3), never key by key."""
    page: list[str] = []

    def settle() -> None:
        with db.session() as s:
            known = set(s.scalars(select(Job.id).where(Job.id.in_(page))))
            # A job removed by hand while other jobs' rows still name its outputs: those stay.
            if unknown := [j for j in page if j not in known]:
                known |= set(s.scalars(select(Artifact.reused_from_job).where(Artifact.reused_from_job.in_(unknown))
                                       .distinct()))
        for job_id in page:
            if job_id in known:
                continue
            prefix = f"{job_prefix(job_id)}/"
            newest = store.newest(prefix)
            if newest is None or newest >= rep.cutoff:
                continue  # empty, or written lately: not ours to judge yet
            rep.objects += _objects(store, [job_id], rep.dry_run)
            rep.orphan_prefixes += 1
        page.clear()
        if progress is not None and rep.orphan_prefixes:
            verb = "would remove" if rep.dry_run else "removed"
            progress(f"gc: {verb} {rep.orphan_prefixes} orphan job prefixes so far")

    for folder in store.folders("jobs/"):
        m = _JOB_FOLDER.match(folder)
        if m is None:
            continue  # not a job's prefix (keys are built only from server ids): never touched
        page.append(m.group(1))
        if len(page) == PREFIXES_PER_QUERY:
            settle()
    if page:
        settle()


OBJECTS_PER_DELETE = 1000  # one DeleteObjects request; a 1M-item job's 2M keys are never listed whole


def _objects(store: ObjectStore, job_ids: Sequence[str], dry_run: bool) -> int:
    """Every object under each job's prefix (listed, so orphans of late deliveries go too), deleted a
    page at a time as the listing goes."""
    n = 0
    for job_id in job_ids:
        page: list[str] = []
        for key in store.list(f"{job_prefix(job_id)}/"):
            page.append(key)
            if len(page) == OBJECTS_PER_DELETE:
                n += _drop(store, page, dry_run)
        n += _drop(store, page, dry_run)
    return n


def _drop(store: ObjectStore, page: list[str], dry_run: bool) -> int:
    n = len(page)
    if page and not dry_run:
        store.delete(list(page))
    page.clear()
    return n
