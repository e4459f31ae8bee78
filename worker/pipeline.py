"""The batch pipeline: claim a chunk's items, generate in micro-batches, store objects, commit rows."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from dataclasses import replace
from datetime import timedelta

from sqlalchemy import and_, or_, select, tuple_, update

from aigc_core.errors import ModelLoadError, NotFound, StorageError, TransientError
from aigc_core.jobs import (
    finalize_if_done,
    finish_chunk,
    has_open_items,
    job_prefix,
    record_event,
    release_ready,
)
from aigc_core.logs import log_context
from aigc_core.reconcile import publish_chunks
from aigc_core.registry import resolve
from aigc_core.schema import Artifact, Item, ItemStatus, Job, JobStatus, utcnow
from aigc_models import Output
from worker import metrics
from worker.chunk import ChunkResult, Claimed, JobInfo, requests_of
from worker.finetune import run_finetune
from worker.overlap import StoreAhead
from worker.reuse import reuse_outputs
from worker.runtime import Runtime
from worker.store import (
    begin_batch,
    cancel_rest,
    fail,
    lease_write,
    release,
    release_quietly,
    store_and_commit,
)

log = logging.getLogger("aigc.worker")


def run_chunk(rt: Runtime, job_id: str, chunk_no: int) -> ChunkResult:
    """Run one chunk; safe to call twice for the same chunk (a redelivered message does no double work)."""
    with log_context(job_id=job_id, chunk=chunk_no):  # every line logged while it runs names the chunk
        return _run_chunk(rt, job_id, chunk_no)


def _run_chunk(rt: Runtime, job_id: str, chunk_no: int) -> ChunkResult:
    res = ChunkResult(job_id, chunk_no)
    job, token, items = claim(rt, job_id, chunk_no)
    res.claimed = len(items)
    if job is not None and items:  # claim gives items only with their job
        log.info("claimed %d items", len(items), extra={"job_id": job_id, "chunk": chunk_no})
        try:
            if job.kind == "finetune":
                _finetune(rt, job, token, items[0], res)
            else:
                _generate_chunk(rt, job, token, items, res)
        except TransientError as e:
            release(rt, token, res.charged)  # back to pending: the retry (or the reconciler) claims them
            if isinstance(e, StorageError):
                rt.storage_failed = True  # the next delivery checks the store before generating
            raise
        except BaseException:
            # Anything else (a bug, an interrupt): the items go back at once with this attempt counted,
            # instead of staying running until their lease expires.
            release_quietly(rt, token, charge_all=not res.charged)
            raise
        finally:
            metrics.count_items(job.model.tag, res.succeeded, res.failed, res.cancelled)
    with rt.db.session() as s:
        if items:
            # Lost in a database crash, a done chunk is read as open again: its items are final, so
            # the reconciler finds nothing in it to send, and finalize marks it done once more.
            lease_write(s)
            finish_chunk(s, job_id, chunk_no)
        # finalize_if_done probes the same way first; asking here saves most chunks a transaction.
        ended = not has_open_items(s, job_id)
    final = finalize_if_done(rt.db, rt.store, job_id) if ended else None
    res.final_status = getattr(final, "value", None)
    if final is not None:  # jobs waiting for this one start now, not at the reconciler's next pass
        released = release_ready(rt.db, rt.store)
        if released and rt.publish is not None:
            publish_chunks(rt.db, rt.publish, released)
    return res


def claim(rt: Runtime, job_id: str, chunk_no: int) -> tuple[JobInfo | None, str, list[Claimed]]:
    """One statement: unfinished items become ours (status running, a lease). The attempt is charged
    later, when an item's generation begins (``begin_batch``), so items a dead delivery never
    reached are not blamed for its death."""
    token, now = uuid.uuid4().hex, utcnow()
    with rt.db.session() as s:
        lease_write(s)
        job = s.get(Job, job_id)
        if job is None or job.status.final:
            if job is not None and job.status == JobStatus.cancelled:
                # Nothing starts; what a dead or released delivery left open ends as cancelled, so
                # the job can finish.
                s.execute(update(Item).where(
                    Item.job_id == job_id, Item.chunk_no == chunk_no,
                    or_(Item.status == ItemStatus.pending,
                        and_(Item.status == ItemStatus.running, Item.lease_until < now)))
                    .values(status=ItemStatus.cancelled, finished_at=now, lease_until=None)
                    .execution_options(synchronize_session=False))
            return None, token, []
        rows = s.execute(
            update(Item)
            .where(
                Item.job_id == job_id, Item.chunk_no == chunk_no,
                or_(Item.status == ItemStatus.pending,
                    and_(Item.status == ItemStatus.running, Item.lease_until < now)),
            )
            .values(status=ItemStatus.running, claim_token=token,
                    lease_until=now + timedelta(seconds=rt.settings.lease_s), worker=rt.worker_id, started_at=now)
            .returning(Item.id, Item.index, Item.custom_id, Item.prompt, Item.params, Item.seed, Item.attempts,
                       Item.source, Item.messages)
            .execution_options(synchronize_session=False)
        ).all()
        if not rows:
            return None, token, []
        if job.status == JobStatus.queued:
            s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
                      .values(status=JobStatus.running, started_at=now))
        info = JobInfo(job.id, job.kind, dict(job.params or {}), resolve(s, f"{job.model_name}@{job.model_version}"),
                       reuse=job.reuse)
    items = sorted((Claimed(*r) for r in rows), key=lambda c: c.index)
    # Items whose generation began max_attempts times and never finished (the worker died each time)
    # fail now.
    poison = [c for c in items if c.attempts >= rt.settings.max_attempts]
    if poison:
        fail(rt, token, {c.id: f"gave up after {c.attempts} attempts (the worker died each time)"
                          for c in poison})
    items = [c for c in items if c.attempts < rt.settings.max_attempts]
    return info, token, items


def _read_sources(rt: Runtime, token: str, items: list[Claimed]) -> list[Claimed]:
    """Items ``from`` another job take that item's text output as their prompt, read now; a chat item
    (one with messages: the job's system message) takes it as its last user message."""
    wanted = {(c.source["job"], c.source["custom_id"]) for c in items if c.source}
    if not wanted:
        return items
    with rt.db.session() as s:
        rows = s.execute(
            select(Item.job_id, Item.custom_id, Item.status, Artifact.key, Artifact.media_type)
            .outerjoin(Artifact, Artifact.item_id == Item.id)
            .where(tuple_(Item.job_id, Item.custom_id).in_(list(wanted)))
        ).all()
    found = {(r.job_id, r.custom_id): r for r in rows}
    out, failures = [], {}
    for c in items:
        if not c.source:
            out.append(c)
            continue
        ref = (c.source["job"], c.source["custom_id"])
        row = found.get(ref)
        if row is None or row.status != ItemStatus.succeeded or row.key is None:
            failures[c.id] = f"source item {ref[1]!r} of job {ref[0]} did not succeed"
        elif not row.media_type.startswith("text/"):
            failures[c.id] = f"source item {ref[1]!r} of job {ref[0]} is {row.media_type}, not text"
        else:
            try:
                text = rt.store.get(row.key).decode("utf-8")
                out.append(replace(c, prompt=text) if c.messages is None else
                           replace(c, messages=[*c.messages, {"role": "user", "content": text}]))
            except NotFound:
                failures[c.id] = f"the output of source item {ref[1]!r} of job {ref[0]} is missing from the store"
    if failures:
        fail(rt, token, failures)
    return out


def _finetune(rt: Runtime, job: JobInfo, token: str, item: Claimed, res: ChunkResult) -> None:
    charged = begin_batch(rt, job.id, token, [item.id])
    if not charged:  # cancelled, or no longer ours
        if charged is None:
            res.cancelled += cancel_rest(rt, token)
        return
    res.charged.add(item.id)
    item = replace(item, attempts=charged[item.id])
    try:
        run_finetune(rt, job, token, item, res)
    except TransientError:
        raise
    except Exception as e:  # a bad base model or dataset: the run fails with the reason, not in a loop
        log.exception("fine-tuning job %s failed", job.id)
        fail(rt, token, {item.id: f"fine-tuning failed: {type(e).__name__}: {e}"})
        res.failed += 1


def _generate_chunk(rt: Runtime, job: JobInfo, token: str, items: list[Claimed], res: ChunkResult) -> None:
    retried = any(c.attempts > 0 for c in items)  # a delivery of this chunk began and died before
    items = _read_sources(rt, token, items)
    items = reuse_outputs(rt, job, token, items, res)  # keyed; with the job option, identical work reused
    if not items:
        return
    # Similar lengths together: less padding per batch. Seeds are per item, so order does not matter.
    ordered = sorted(items, key=lambda c: len(c.prompt))
    # The model's own micro-batch size (its registry defaults) where it has one, else the worker's.
    wanted = job.model.defaults.get("micro_batch_size") or rt.settings.micro_batch_size
    size = min(max(1, int(wanted)), rt.batch_caps.get(job.model.tag, 1 << 30))
    if retried:
        # A delivery of this chunk died before: run it item by item, each committed alone, so an
        # item that kills the worker uses up only its own attempts, not its neighbours'.
        size = 1
    if job.model.tag not in rt.pool.pinned():
        # A load that kills the process (out of memory, a segfault) counts against the first
        # micro-batch, as its generation would: else the message is redelivered, and kills, forever.
        first = begin_batch(rt, job.id, token, [c.id for c in ordered[:size]])
        if first is None:
            res.cancelled += cancel_rest(rt, token)
            return
        res.charged.update(first)
    try:
        loaded = rt.pool.get(job.model)
    except ModelLoadError as e:
        fail(rt, token, {c.id: f"model load failed: {e}" for c in items})
        res.failed += len(items)
        return
    if loaded.loaded_now:
        with rt.db.session() as s:
            record_event(s, job.id, "model_loaded", model=job.model.tag, worker=rt.worker_id,
                         seconds=round(loaded.load_seconds, 3), device=rt.device)
    model = loaded.model
    if rt.storage_failed:
        # The store failed the last chunk: ask it before generating, so an outage costs no
        # generation that could not be stored (raises StorageError while it is still down).
        rt.store.exists(f"{job_prefix(job.id)}/items/.probe")
        rt.storage_failed = False
    # Batch k stores and commits while k+1 generates. Not for a retried chunk: there each item is
    # committed before the next begins, so an item that kills the worker costs no neighbour an attempt.
    ahead = StoreAhead(rt, rt.settings.overlap_storage and not retried)
    try:
        _generate_batches(rt, job, token, ordered, size, model, res, ahead)
        ahead.wait()  # the last batch: stored and committed (or its error raised) before the chunk ends
    finally:
        ahead.settle()  # on the way out of a failure: no upload still running once this returns


def _generate_batches(rt: Runtime, job: JobInfo, token: str, ordered: list[Claimed], size: int, model,
                      res: ChunkResult, ahead: StoreAhead) -> None:
    start = 0
    while start < len(ordered):
        ahead.check()  # the batch in flight failed already: stop before generating another
        size = min(size, rt.batch_caps.get(job.model.tag, size))  # an out-of-memory split lowers it
        batch = ordered[start : start + size]
        start += len(batch)
        leased_at = time.time()  # the wall clock, as the leases themselves
        mine = begin_batch(rt, job.id, token, [c.id for c in batch],
                            charge=[c.id for c in batch if c.id not in res.charged], busy=ahead.busy())
        if mine is None:  # cancelled: no new item starts; the batch in flight commits first
            ahead.wait()
            res.cancelled += cancel_rest(rt, token)
            return
        batch = [replace(c, attempts=mine[c.id]) for c in batch if c.id in mine]
        res.charged.update(c.id for c in batch)
        if not batch:
            continue
        t0 = time.perf_counter()
        outputs = _generate_isolated(rt, model, job, batch)
        secs = time.perf_counter() - t0
        metrics.observe_generation(job.model.tag, job.kind, secs, len(batch))
        log.info("generated %d items in %.3f s", len(batch), secs,
                 extra={"items": [c.index for c in batch], "attempts": [c.attempts for c in batch]})
        # The store thread adds to res.succeeded / failed / errors; this thread to charged / cancelled.
        ahead.submit([c.id for c in batch], store_and_commit, rt, job, token, batch, outputs, model, res,
                     leased_at=leased_at)


def _generate_isolated(rt: Runtime, model, job: JobInfo,
                       batch: list[Claimed]) -> list[tuple[Output | None, str | None, float]]:
    """Generate a batch; if it fails, each item alone, so one bad item never fails its neighbours.

    Out of memory is not the items' fault: the batch is split in halves and retried, and the size that
    fitted caps this model's micro-batches in this process from then on. Seeds are per item, so the
    outputs are the same as an unsplit run's."""
    cap = rt.batch_caps.get(job.model.tag)
    if cap is not None and len(batch) > cap:  # a split earlier in this batch found a smaller size
        return [r for k in range(0, len(batch), cap) for r in _generate_isolated(rt, model, job, batch[k : k + cap])]
    t0 = time.perf_counter()
    oom = False
    try:
        outs = model.generate(requests_of(job, batch))
        per = (time.perf_counter() - t0) / len(batch)
        return [(o, None, per) for o in outs]
    except Exception as e:  # a backend may raise anything; isolate before judging
        if len(batch) == 1:
            log.warning("item %d failed: %s", batch[0].index, e, extra={"job_id": job.id, "item": batch[0].index})
            return [(None, f"{type(e).__name__}: {e}", time.perf_counter() - t0)]
        oom = is_out_of_memory(e)
    # Out of the except block: the failed batch's frames (and their device memory) are freed now.
    if oom:
        half = (len(batch) + 1) // 2
        rt.batch_caps[job.model.tag] = min(half, rt.batch_caps.get(job.model.tag, half))
        log.warning("out of memory at a batch of %d; retrying as batches of %d", len(batch), half,
                    extra={"job_id": job.id})
        _free_device_memory()
        return (_generate_isolated(rt, model, job, batch[:half])
                + _generate_isolated(rt, model, job, batch[half:]))
    return [r for c in batch for r in _generate_isolated(rt, model, job, [c])]


def is_out_of_memory(e: BaseException | None) -> bool:
    """torch's OutOfMemoryError (CUDA and the rest), or an allocator's RuntimeError saying so, also
    when a backend wrapped it (its cause or context)."""
    torch = sys.modules.get("torch")  # a backend that never imported torch cannot raise its OOM
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    for _ in range(8):
        if e is None:
            return False
        if (oom is not None and isinstance(e, oom)) or (
                isinstance(e, (RuntimeError, MemoryError)) and "out of memory" in str(e).lower()):
            return True
        e = e.__cause__ or e.__context__
    return False


def _free_device_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
