"""Streaming submit: a job of any size from an iterable or a file, with bounded memory.

Items are read and validated a batch at a time (``STREAM_BATCH`` items, a whole number of chunks)
and written in one transaction per batch while the job is ``submitting``: its chunks are ``held``,
so no worker, ``wait`` or reconciler runs any of it until the last batch is written and one final
transaction makes the job ``queued`` (or ``waiting``) and its chunks pending. Only then are
messages published.

A crash mid-submit leaves a ``submitting`` job that nothing runs. Submitting again with the same
idempotency key resumes it: the batches already written are read again from the input (not
written), their running digest is checked against the one stored with the job, and writing goes
on from there. Without a key, ``aigc gc`` removes an abandoned ``submitting`` job once it is older
than its age limit.

The idempotency digest of a streamed job is a chain over its batches,
``h = sha256(h + sha256(batch))`` starting from the job's header, so it is checked batch by batch
without holding the items. Small jobs (one batch, given as a list) keep the one-transaction path
of ``Client.submit`` and its digest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import secrets
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from aigc_core.errors import IdempotencyConflict, SpecError
from aigc_core.jobs import record_event
from aigc_core.registry import generation_defaults
from aigc_core.retention import delete_jobs
from aigc_core.schema import Chunk, ChunkStatus, Item, Job, JobStatus, utcnow
from aigc_core.spec import JobSpec, check_limits, parse_spec

if TYPE_CHECKING:
    from scheduler.client import Client

STREAM_BATCH = 10_000  # items per transaction (rounded down to whole chunks)


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _take(it: Iterator[Any], n: int) -> list[dict[str, Any]]:
    return [{"prompt": i} if isinstance(i, str) else i for i in itertools.islice(it, n)]


def _renumber(e: SpecError, offset: int) -> SpecError:
    """A batch's errors say ``items[k]``; the user's input knows them as ``items[offset + k]``."""
    return SpecError(re.sub(r"items\[(\d+)\]", lambda m: f"items[{offset + int(m.group(1))}]", str(e)))


def batch_size(chunk_size: int) -> int:
    return max(chunk_size, STREAM_BATCH // chunk_size * chunk_size)


def submit_streaming(client: Client, header: dict[str, Any], items: Iterable[Any]) -> str:
    """Write the job a batch at a time; returns its id (the existing job's for a known key)."""
    from scheduler.client import _model_for

    settings, limits = client.settings, client.settings.limits
    chunk_size = parse_spec({**header, "items": []}).chunk_size or settings.chunk_size
    size = batch_size(chunk_size)
    key = header.get("idempotency_key")
    chain = hashlib.sha256(_canon({k: v for k, v in header.items() if k not in ("items", "idempotency_key")}))
    it = iter(items)
    batch = _take(it, size)
    if not batch:
        raise SpecError("items: a job needs at least one item")

    def spec_of(batch: list[dict[str, Any]], offset: int) -> JobSpec:
        filled = [b if "custom_id" in b else {**b, "custom_id": str(offset + k)} for k, b in enumerate(batch)]
        try:
            return parse_spec({**header, "items": filled})
        except SpecError as e:
            raise _renumber(e, offset) from None

    first = spec_of(batch, 0)
    with client.db.session() as s:
        # While a job is submitting, item_count is what is written so far and payload_digest the chain
        # over those batches.
        row = s.execute(select(Job.id, Job.status, Job.payload_digest, Job.item_count)
                        .where(Job.idempotency_key == key)).first() if key else None
        if row is None:
            ref = _model_for(s, first)
            seed = first.seed if first.seed is not None else secrets.randbelow(2**31)
            job = Job(kind=first.kind, model_name=ref.name if ref else first.model.partition("@")[0],
                      model_version=ref.version if ref else None, queue=ref.queue if ref else first.kind,
                      status=JobStatus.submitting, params=first.params, seed=seed, meta=first.metadata,
                      idempotency_key=key, payload_digest=chain.hexdigest(), item_count=0,
                      chunk_size=chunk_size, depends_on=[], reuse=first.reuse)
            s.add(job)
            s.flush()
            job_id, done, done_chain, created = job.id, 0, chain.hexdigest(), True
            record_event(s, job_id, "submitting", batch_items=size)
        else:
            job_id, created = row.id, False
            if row.status != JobStatus.submitting:
                done, done_chain = -1, row.payload_digest  # whole: only the digest is checked
            else:
                done, done_chain = row.item_count, row.payload_digest

    # On PostgreSQL a batch's write (COPY, commit) runs in a thread while the next batch is read and
    # validated here, so the database and this process work at the same time. One write at a time,
    # in order: each waits for the one before. SQLite writes inline.
    writer = ThreadPoolExecutor(1, thread_name_prefix="aigc-submit") \
        if client.db.engine.dialect.name == "postgresql" else None
    pending: tuple[Future[None], int] | None = None

    def settle() -> None:
        """Wait for the write in flight; bad input in it removes the job this call created."""
        nonlocal pending
        if pending is None:
            return
        future, at = pending
        pending = None
        try:
            future.result()
        except SpecError as e:
            if created:
                _abandon(client, job_id)
            raise _renumber(e, at) from None

    offset = 0
    try:
        while batch:
            spec = spec_of(batch, offset)
            chain = hashlib.sha256(chain.digest() + hashlib.sha256(_canon(batch)).digest())
            end = offset + len(batch)
            if end > limits.max_items_per_job:
                settle()
                if created:
                    _abandon(client, job_id)
                raise SpecError(f"items: more than {limits.max_items_per_job} items is over the limit of "
                                f"{limits.max_items_per_job} per job (AIGC_LIMIT_MAX_ITEMS_PER_JOB)")
            if done < 0 or end <= done:  # already written (a resumed submit), or a whole job: digest only
                if end == done and chain.hexdigest() != done_chain:
                    raise IdempotencyConflict(f"idempotency key {key!r}: the first {done} items differ from "
                                              f"those job {job_id} was being written with")
                offset, batch = end, _take(it, size)
                continue
            args = (client, job_id, spec, offset, chunk_size, chain.hexdigest())
            settle()
            if writer is not None:
                pending = (writer.submit(_write_batch, *args), offset)
            else:
                try:
                    _write_batch(*args)
                except SpecError as e:
                    if created:
                        _abandon(client, job_id)
                    raise _renumber(e, offset) from None
            done = offset = end
            batch = _take(it, size)  # while the write runs
        settle()
    finally:
        if writer is not None:  # the input failed: the write in flight still finishes (resumable)
            writer.shutdown(wait=True)

    if done < 0:
        if chain.hexdigest() != done_chain:
            raise IdempotencyConflict(f"idempotency key {key!r} was used for job {job_id} with a different payload")
        return job_id
    _finish(client, job_id, chain.hexdigest())
    return job_id


def _write_batch(client: Client, job_id: str, spec: JobSpec, offset: int, chunk_size: int, chain: str) -> None:
    from scheduler.client import _item_rows, _model_for, dependencies  # client imports this module

    with client.db.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != JobStatus.submitting:
            raise SpecError(f"job {job_id} is {job.status.value if job else 'gone'}: it was cancelled or "
                            "removed while its items were being written")
        ref = _model_for(s, spec)
        check_limits(spec, client.settings.limits, generation_defaults(ref.defaults if ref else None))
        deps = dependencies(s, spec)
        known = {d["job"] for d in job.depends_on or []}
        if any(d["job"] not in known for d in deps):
            job.depends_on = [*(job.depends_on or []), *(d for d in deps if d["job"] not in known)]
        rows = _item_rows(spec, ref, job_id, job.seed, chunk_size, offset)
        try:
            with s.begin_nested():
                _insert_items(s, rows)
        except _UNIQUE:  # (job_id, custom_id) is unique: one repeats an earlier batch's
            cids = [r["custom_id"] for r in rows]
            again = next(c for k in range(0, len(cids), 500) for c in s.scalars(
                select(Item.custom_id).where(Item.job_id == job_id, Item.custom_id.in_(cids[k : k + 500]))))
            raise SpecError(f"items[{cids.index(again)}].custom_id: {again!r} repeats an earlier "
                            "item's") from None
        now = utcnow()
        first, last = offset // chunk_size, (offset + len(rows) - 1) // chunk_size
        existing = set(s.scalars(select(Chunk.chunk_no).where(Chunk.job_id == job_id, Chunk.chunk_no >= first,
                                                               Chunk.chunk_no <= last)))
        new = [c for c in range(first, last + 1) if c not in existing]
        if new:
            s.execute(insert(Chunk), [{"job_id": job_id, "chunk_no": c, "status": ChunkStatus.held,
                                       "publish_count": 0, "created_at": now} for c in new])
        job.item_count = offset + len(rows)
        job.payload_digest = chain


def _unique_errors() -> tuple[type[Exception], ...]:
    try:  # COPY runs on psycopg's connection, so its error is psycopg's, not SQLAlchemy's
        from psycopg.errors import UniqueViolation
    except ImportError:
        return (IntegrityError,)
    return (IntegrityError, UniqueViolation)


_UNIQUE = _unique_errors()
_COPY_COLUMNS = ("job_id", "index", "chunk_no", "custom_id", "prompt", "source", "messages", "params", "seed",
                 "status", "attempts")


def _insert_items(s: Any, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL: one COPY (several times an executemany's rate); elsewhere an executemany."""
    if s.get_bind().dialect.name != "postgresql":
        for k in range(0, len(rows), 5000):
            s.execute(insert(Item), rows[k : k + 5000])
        return
    raw = s.connection().connection.driver_connection  # psycopg's, in this session's transaction

    def js(v: Any) -> str | None:
        if v is None:
            return None
        return "{}" if v == {} else json.dumps(v, ensure_ascii=False)  # most items have no params

    with raw.cursor() as cur, cur.copy(f"COPY items ({', '.join(_COPY_COLUMNS)}) FROM STDIN") as copy:
        for r in rows:
            copy.write_row((r["job_id"], r["index"], r["chunk_no"], r["custom_id"], r["prompt"], js(r["source"]),
                            js(r["messages"]), js(r["params"]), r["seed"], r["status"].value, r["attempts"]))


def _finish(client: Client, job_id: str, digest: str) -> None:
    """The last batch is in: the job becomes runnable in one transaction."""
    with client.db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        waits = bool(job.depends_on)
        job.status = JobStatus.waiting if waits else JobStatus.queued
        job.payload_digest = digest
        n_chunks = (job.item_count + job.chunk_size - 1) // job.chunk_size
        if not waits:
            s.execute(update(Chunk).where(Chunk.job_id == job_id, Chunk.status == ChunkStatus.held)
                      .values(status=ChunkStatus.pending))
        record_event(s, job_id, "submitted", items=job.item_count, chunks=n_chunks,
                     model=f"{job.model_name}@{job.model_version}" if job.model_version else job.model_name,
                     waits_for=[d["job"] for d in job.depends_on or []])


def _abandon(client: Client, job_id: str) -> None:
    """Bad input part way through a job this call created: it goes, rows and all, in gc's bounded
    deletes, so nothing of it is left behind (a resumed job keeps the batches written before, for a
    corrected input to resume)."""
    with client.db.session() as s:
        if s.scalar(select(Job.status).where(Job.id == job_id)) != JobStatus.submitting:
            return
    delete_jobs(client.db, [job_id])
