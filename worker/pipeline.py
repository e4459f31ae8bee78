"""The batch pipeline: claim a chunk's items, generate in micro-batches, store objects, commit rows."""

from __future__ import annotations

import contextvars
import functools
import hashlib
import logging
import sys
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, wait
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, case, insert, or_, select, text, tuple_, update
from sqlalchemy.orm import InstrumentedAttribute

from aigc_core import __version__
from aigc_core.credentials import DETACHED_SUFFIX
from aigc_core.errors import ModelLoadError, NotFound, StorageError, TransientError
from aigc_core.jobs import (
    DISCARDED_EVENT,
    finalize_if_done,
    finish_chunk,
    item_key,
    job_prefix,
    record_event,
    release_ready,
    sidecar_key,
    sidecar_of,
)
from aigc_core.logs import log_context
from aigc_core.reconcile import publish_chunks
from aigc_core.registry import ModelRef, generation_defaults, resolve
from aigc_core.schema import Artifact, Item, ItemStatus, Job, JobStatus, utcnow
from aigc_models import GenRequest, Output
from aigc_models.media import embed_metadata
from worker import metrics
from worker.credentials import SigningFailed, sign_output
from worker.provenance import library_versions
from worker.runtime import Runtime

log = logging.getLogger("aigc.worker")


@dataclass(frozen=True)
class Claimed:
    id: int
    index: int
    custom_id: str
    prompt: str
    params: dict[str, Any]
    seed: int
    attempts: int
    source: dict[str, Any] | None = None
    messages: list[dict[str, str]] | None = None  # a chat item (the prompt is then empty)


@dataclass
class ChunkResult:
    job_id: str
    chunk_no: int
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    final_status: str | None = None
    errors: dict[str, int] = field(default_factory=dict)
    # Items whose attempt this delivery charged (their generation began): a transient fault gives
    # those back; items it never reached were never charged.
    charged: set[int] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "charged"}


@dataclass(frozen=True)
class JobInfo:
    id: str
    kind: str
    params: dict[str, Any]
    model: ModelRef


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
            _release_quietly(rt, token, charge_all=not res.charged)
            raise
        finally:
            metrics.count_items(job.model.tag, res.succeeded, res.failed, res.cancelled)
    if items:
        with rt.db.session() as s:
            finish_chunk(s, job_id, chunk_no)
    final = finalize_if_done(rt.db, rt.store, job_id)
    res.final_status = getattr(final, "value", None)
    if final is not None:  # jobs waiting for this one start now, not at the reconciler's next pass
        released = release_ready(rt.db, rt.store)
        if released and rt.publish is not None:
            publish_chunks(rt.db, rt.publish, released)
    return res


def claim(rt: Runtime, job_id: str, chunk_no: int) -> tuple[JobInfo | None, str, list[Claimed]]:
    """One statement: unfinished items become ours (status running, a lease). The attempt is charged
    later, when an item's generation begins (``_begin_batch``), so items a dead delivery never
    reached are not blamed for its death."""
    token, now = uuid.uuid4().hex, utcnow()
    with rt.db.session() as s:
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
        info = JobInfo(job.id, job.kind, dict(job.params or {}), resolve(s, f"{job.model_name}@{job.model_version}"))
    items = sorted((Claimed(*r) for r in rows), key=lambda c: c.index)
    # Items whose generation began max_attempts times and never finished (the worker died each time)
    # fail now.
    poison = [c for c in items if c.attempts >= rt.settings.max_attempts]
    if poison:
        _fail(rt, token, {c.id: f"gave up after {c.attempts} attempts (the worker died each time)"
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
        _fail(rt, token, failures)
    return out


def _finetune(rt: Runtime, job: JobInfo, token: str, item: Claimed, res: ChunkResult) -> None:
    from worker.finetune import run_finetune

    charged = _begin_batch(rt, job.id, token, [item.id])
    if not charged:  # cancelled, or no longer ours
        if charged is None:
            res.cancelled += _cancel_rest(rt, token)
        return
    res.charged.add(item.id)
    item = replace(item, attempts=charged[item.id])
    try:
        run_finetune(rt, job, token, item, res)
    except TransientError:
        raise
    except Exception as e:  # a bad base model or dataset: the run fails with the reason, not in a loop
        log.exception("fine-tuning job %s failed", job.id)
        _fail(rt, token, {item.id: f"fine-tuning failed: {type(e).__name__}: {e}"})
        res.failed += 1


def _generate_chunk(rt: Runtime, job: JobInfo, token: str, items: list[Claimed], res: ChunkResult) -> None:
    retried = any(c.attempts > 0 for c in items)  # a delivery of this chunk began and died before
    items = _read_sources(rt, token, items)
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
        first = _begin_batch(rt, job.id, token, [c.id for c in ordered[:size]])
        if first is None:
            res.cancelled += _cancel_rest(rt, token)
            return
        res.charged.update(first)
    try:
        loaded = rt.pool.get(job.model)
    except ModelLoadError as e:
        _fail(rt, token, {c.id: f"model load failed: {e}" for c in items})
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
    start = 0
    while start < len(ordered):
        size = min(size, rt.batch_caps.get(job.model.tag, size))  # an out-of-memory split lowers it
        batch = ordered[start : start + size]
        start += len(batch)
        leased_at = time.time()  # the wall clock, as the leases themselves
        mine = _begin_batch(rt, job.id, token, [c.id for c in batch],
                            charge=[c.id for c in batch if c.id not in res.charged])
        if mine is None:  # cancelled: no new item starts
            res.cancelled += _cancel_rest(rt, token)
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
        _store_and_commit(rt, job, token, batch, outputs, model, res, leased_at=leased_at)


def _requests(job: JobInfo, batch: list[Claimed]) -> list[GenRequest]:
    """Each item's request: the params it sets, item > job > registry defaults (a None sets nothing),
    with the layer each came from; the backend fills the rest from the checkpoint, then its defaults."""
    layers = (("registry", generation_defaults(job.model.defaults)), ("job", job.params))
    template = job.model.defaults.get("chat_template")
    out = []
    for c in batch:
        params: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name, layer in (*layers, ("item", c.params or {})):
            for k, v in layer.items():
                if v is not None:
                    params[k], sources[k] = v, name
        out.append(GenRequest(c.index, c.prompt, params, c.seed, messages=c.messages, sources=sources,
                              chat_template=template))
    return out


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
        outs = model.generate(_requests(job, batch))
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


def _store_and_commit(rt: Runtime, job: JobInfo, token: str, batch: list[Claimed], outputs, model,
                      res: ChunkResult, *, leased_at: float | None = None) -> None:
    """``leased_at``: when ``_begin_batch`` began renewing the batch's leases (``time.time``), if known."""
    if leased_at is not None and 0 <= time.time() - leased_at < rt.settings.lease_s / 2:
        # The leases renewed just before generating have most of their time left: no other delivery
        # can have claimed these items (a claim takes only expired leases), so no round trip to ask.
        mine = {c.id for c in batch}
    else:
        leased_at = time.time()
        mine = _renew(rt, token, [c.id for c in batch])
    # A PUT in the last fifth of the lease renews its item's lease first (_hold).
    deadline = leased_at + 0.8 * rt.settings.lease_s
    # An item whose lease expired and was claimed by another delivery is theirs now: write nothing.
    outputs = [r if c.id in mine else (None, None, 0.0) for c, r in zip(batch, outputs, strict=True)]
    limit = rt.settings.limits.max_audio_seconds
    outputs = [(None, f"audio of {o.info['duration_s']:.1f} s is over the limit of {limit:.0f} s", s_)
               if o is not None and (o.info.get("duration_s") or 0) > limit else (o, err, s_)
               for o, err, s_ in outputs]
    ok = [(c, o, secs) for c, (o, err, secs) in zip(batch, outputs, strict=True) if o is not None]
    failures = {c.id: err for c, (o, err, _) in zip(batch, outputs, strict=True) if o is None and err is not None}
    artifacts = _store_all(rt, job, token, model, ok, deadline)
    failures.update({a["item_id"]: a["error"] for a in artifacts if "error" in a})  # C2PA signing required
    artifacts = [a for a in artifacts if "error" not in a]
    with rt.db.session() as s:
        done = set()
        if artifacts:
            done = set(s.scalars(
                update(Item).where(Item.id.in_([a["item_id"] for a in artifacts]),
                                   Item.claim_token == token, Item.status == ItemStatus.running)
                .values(status=ItemStatus.succeeded, finished_at=utcnow(), lease_until=None, error=None)
                .returning(Item.id).execution_options(synchronize_session=False)
            ))
            rows = [a for a in artifacts if a["item_id"] in done]
            if rows:
                s.execute(insert(Artifact), rows)
        _fail_in(s, token, failures)
    # Items another delivery took meanwhile: what this one stored for them is nobody's output.
    _discard(rt, job.id, [a["key"] for a in artifacts if a["item_id"] not in done])
    res.succeeded += len(done)
    res.failed += len(failures)
    for err in failures.values():
        res.errors[err] = res.errors.get(err, 0) + 1


def _store_all(rt: Runtime, job: JobInfo, token: str, model, ok: list[tuple[Claimed, Output, float]],
               deadline: float) -> list[dict[str, Any]]:
    """Each output stored side by side on the runtime's upload threads (each with the log context);
    the rows to commit for those still ours. After the first failure, or an interrupt, the uploads not
    yet begun are dropped, and this returns (raises) only when none is still running: an item given
    back is never written to afterwards."""
    futures = [rt.uploads.submit(contextvars.copy_context().run,
                                 functools.partial(_store_one, rt, job, token, model, *a, deadline)) for a in ok]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        for f in futures:
            f.cancel()  # only those not yet begun
        wait(futures)
    failed = next((e for f in futures if not f.cancelled() and (e := f.exception()) is not None), None)
    if failed is not None:
        # The items go back uncommitted: the objects stored for them are nobody's output.
        _discard(rt, job.id, [r["key"] for f in futures
                              if not f.cancelled() and f.exception() is None and (r := f.result()) and "key" in r])
        raise failed
    return [r for f in futures if (r := f.result()) is not None]


def _discard(rt: Runtime, job_id: str, keys: list[str]) -> None:
    """Remove the objects (and sidecars) of outputs that were not committed. Their keys are this
    delivery's own, so nothing committed is touched. If the store refuses, the job is marked for the
    sweep at finalize (``sweep_orphans``) instead."""
    if not keys:
        return
    try:
        rt.store.delete([k for key in keys for k in (key, sidecar_of(key))])
        return
    except Exception as e:  # the store is often what failed: leave it to the sweep
        log.warning("could not remove %d uncommitted outputs (%s); removed at finalize", len(keys), e)
    try:
        with rt.db.session() as s:
            record_event(s, job_id, DISCARDED_EVENT, count=len(keys))
    except Exception as e:
        log.warning("could not record uncommitted outputs for the sweep: %s", e)


def _begin_batch(rt: Runtime, job_id: str, token: str, ids: list[int],
                 charge: list[int] | None = None) -> dict[int, int] | None:
    """One transaction before each micro-batch: None when the job was cancelled; else the batch's items
    still ours with their attempt charged ({id: attempt}), and the lease of every item the chunk still
    holds renewed (the chunk's heartbeat)."""
    with rt.db.session() as s:
        if s.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.cancelled:
            return None
        rows = s.execute(
            update(Item).where(Item.claim_token == token, Item.status == ItemStatus.running)
            .values(lease_until=utcnow() + timedelta(seconds=rt.settings.lease_s),
                    attempts=case((Item.id.in_(ids if charge is None else charge), Item.attempts + 1),
                                  else_=Item.attempts))
            .returning(Item.id, Item.attempts).execution_options(synchronize_session=False)).all()
    wanted = set(ids)
    return {i: a for i, a in rows if i in wanted}


def _lease_write(s) -> None:
    """A lease renewal need not wait for the WAL flush: lost in a database crash, the lease only ends
    sooner, and the commit's claim-token check still keeps a second delivery from committing twice."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SET LOCAL synchronous_commit = off"))


def _renew(rt: Runtime, token: str, ids: list[int]) -> set[int]:
    """The items still ours, with their lease renewed: checked again before storing."""
    with rt.db.session() as s:
        _lease_write(s)
        return set(s.scalars(
            update(Item).where(Item.id.in_(ids), Item.claim_token == token, Item.status == ItemStatus.running)
            .values(lease_until=utcnow() + timedelta(seconds=rt.settings.lease_s))
            .returning(Item.id).execution_options(synchronize_session=False)))


def _store_one(rt: Runtime, job: JobInfo, token: str, model, c: Claimed, out: Output, gen_seconds: float,
                deadline: float) -> dict[str, Any] | None:
    """Object first, then its provenance sidecar; the database row comes after both. None when the
    item turned out to be another delivery's before a PUT (nothing more is written for it)."""
    t0 = time.perf_counter()
    key = item_key(job.id, c.index, out.ext, token)
    prov = provenance(rt, job, model, c, out, gen_seconds)
    data = embed_metadata(out.data, out.media_type, prov)  # PNG text chunk, WAV INFO chunk
    try:  # C2PA content credentials: inside a PNG/WAV, a detached manifest for text (worker/credentials.py)
        signed = sign_output(rt.settings, data, out.media_type, prov)
    except SigningFailed as e:  # signing is required: the item fails with the reason, nothing is stored
        return {"item_id": c.id, "error": str(e)}
    data = signed.data
    sha = hashlib.sha256(data).hexdigest()
    prov["output"] = {"sha256": sha, "size": len(data), "media_type": out.media_type,
                      **{k: v for k, v in out.info.items() if k not in LIFTED_INFO}}
    held = _hold(rt, token, c.id, deadline)
    if held is None:
        return None
    info = rt.store.put(key, data, out.media_type)
    if signed.detached is not None:
        rt.store.put(key + DETACHED_SUFFIX, signed.detached, "application/c2pa")
    prov["timings"]["store_s"] = round(time.perf_counter() - t0, 4)
    if rt.settings.provenance_sidecars:
        if _hold(rt, token, c.id, held) is None:
            _discard(rt, job.id, [key])
            return None
        rt.store.put(sidecar_key(job.id, c.index, token), _json(prov), "application/json")
    return {"item_id": c.id, "job_id": job.id, "key": key, "uri": info.uri, "sha256": sha,
            "size": len(data), "media_type": out.media_type, "provenance": prov,
            "duration_s": out.info.get("duration_s")}


def _hold(rt: Runtime, token: str, item_id: int, deadline: float) -> float | None:
    """Before a PUT: past ``deadline`` (most of the lease gone, wall clock) the item's lease is renewed
    first, so a slow store never writes over another delivery's object. Returns the deadline to keep,
    or None when the item is no longer ours."""
    if time.time() <= deadline:
        return deadline
    now = time.time()
    return now + 0.8 * rt.settings.lease_s if _renew(rt, token, [item_id]) else None


# Output.info entries that belong at the top of the provenance, not under "output".
LIFTED_INFO = ("params", "param_sources", "prompt_sha256", "chat_template_sha256")


def provenance(rt: Runtime, job: JobInfo, model, c: Claimed, out: Output, gen_seconds: float) -> dict:
    """What made this output; embedded in the file where its format allows, and in the sidecar."""
    ref = job.model
    # A backend that reports the parameters that ran (and where each came from) is believed over the
    # request; a chat backend reports the hash of the prompt it rendered, and of its template.
    lifted = {k: out.info[k] for k in LIFTED_INFO if k in out.info}
    return {
        "job_id": job.id, "item_index": c.index, "custom_id": c.custom_id, "attempt": c.attempts,
        "model": {"name": ref.name, "version": ref.version, "uri": ref.uri, "revision": ref.revision,
                  "weights_digest": ref.digest, "backend": ref.backend, **model.describe()},
        "params": _requests(job, [c])[0].params, "seed": c.seed,
        "prompt_sha256": hashlib.sha256(c.prompt.encode()).hexdigest(), "source": c.source, **lifted,
        "worker": rt.worker_id, "device": rt.device,
        "versions": {"aigc_runner": __version__, **library_versions()},
        "timings": {"generate_s": round(gen_seconds, 4)},
        "created_at": utcnow().isoformat(),
    }


def _json(d: dict) -> bytes:
    import json

    return json.dumps(d, ensure_ascii=False, indent=1, sort_keys=True).encode()


def _fail_in(s, token: str, failures: dict[int, str]) -> None:
    by_reason: dict[str, list[int]] = {}
    for item_id, reason in failures.items():
        by_reason.setdefault(reason[:2000], []).append(item_id)
    for reason, ids in by_reason.items():
        s.execute(update(Item).where(Item.id.in_(ids), Item.claim_token == token, Item.status == ItemStatus.running)
                  .values(status=ItemStatus.failed, error=reason, finished_at=utcnow(), lease_until=None)
                  .execution_options(synchronize_session=False))


def _fail(rt: Runtime, token: str, failures: dict[int, str]) -> None:
    with rt.db.session() as s:
        _fail_in(s, token, failures)


def release(rt: Runtime, token: str, give_back: set[int] | frozenset[int] = frozenset(), *,
            charge_all: bool = False) -> None:
    """Give uncommitted items back (pending, no lease). After a transient fault the attempts this
    delivery charged (``give_back``) are returned too: an S3 or database blip is not a crash, and must
    not use up an item's attempts. ``charge_all`` counts an attempt for every item instead."""
    attempts: ColumnElement[int] | InstrumentedAttribute[int]
    if charge_all:
        attempts = Item.attempts + 1
    elif give_back:
        attempts = case((Item.id.in_(list(give_back)), Item.attempts - 1), else_=Item.attempts)
    else:
        attempts = Item.attempts
    with rt.db.session() as s:
        s.execute(update(Item).where(Item.claim_token == token, Item.status == ItemStatus.running)
                  .values(status=ItemStatus.pending, lease_until=None, claim_token=None, attempts=attempts)
                  .execution_options(synchronize_session=False))


def _release_quietly(rt: Runtime, token: str, *, charge_all: bool) -> None:
    """Release on the way out of a failure, the attempts counted (all of them charged now if the
    failure came before any generation began, or it would repeat forever); if the database is the
    failure, the leases expire instead."""
    try:
        release(rt, token, charge_all=charge_all)
    except Exception as e:
        log.warning("could not release the chunk's items (%s); they return when their lease expires", e)


def _cancel_rest(rt: Runtime, token: str) -> int:
    with rt.db.session() as s:
        result = s.execute(update(Item).where(Item.claim_token == token, Item.status == ItemStatus.running)
                           .values(status=ItemStatus.cancelled, finished_at=utcnow(), lease_until=None)
                           .execution_options(synchronize_session=False))
        return cast("CursorResult[Any]", result).rowcount  # an UPDATE's result is a cursor's
