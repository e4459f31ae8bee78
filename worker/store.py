"""Storing a micro-batch's outputs and committing its rows, fenced by the delivery's claim token and
its items' leases; failing, releasing and cancelling a delivery's items. Shared by the generation
pipeline (worker/pipeline.py) and fine-tuning (worker/finetune.py)."""


from __future__ import annotations

import contextvars
import functools
import hashlib
import logging
import time
from concurrent.futures import FIRST_EXCEPTION, wait
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, case, insert, select, text, true, update
from sqlalchemy.orm import InstrumentedAttribute

from aigc_core import __version__
from aigc_core.credentials import DETACHED_SUFFIX
from aigc_core.jobs import (
    DISCARDED_EVENT,
    item_key,
    record_event,
    sidecar_key,
    sidecar_of,
)
from aigc_core.schema import Artifact, Item, ItemStatus, Job, JobStatus, utcnow
from aigc_models import Output
from aigc_models.media import embed_metadata
from worker.chunk import ChunkResult, Claimed, JobInfo, requests_of
from worker.credentials import SigningFailed, sign_output
from worker.provenance import library_versions
from worker.runtime import Runtime

log = logging.getLogger("aigc.worker")


def store_and_commit(rt: Runtime, job: JobInfo, token: str, batch: list[Claimed], outputs, model,
                      res: ChunkResult, *, leased_at: float | None = None) -> None:
    """``leased_at``: when ``begin_batch`` began renewing the batch's leases (``time.time``), if known."""
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


def begin_batch(rt: Runtime, job_id: str, token: str, ids: list[int], charge: list[int] | None = None,
                busy: frozenset[int] = frozenset()) -> dict[int, int] | None:
    """One transaction before each micro-batch: None when the job was cancelled; else the batch's items
    still ours with their attempt charged ({id: attempt}), and the lease of every item the chunk still
    holds renewed (the chunk's heartbeat), except ``busy``: the batch being stored and committed
    meanwhile (worker/overlap.py), whose rows its own transaction holds."""
    with rt.db.session() as s:
        lease_write(s)
        if s.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.cancelled:
            return None
        held = and_(Item.claim_token == token, Item.status == ItemStatus.running)
        rows = s.execute(
            update(Item).where(held, Item.id.not_in(list(busy)) if busy else true())
            .values(lease_until=utcnow() + timedelta(seconds=rt.settings.lease_s),
                    attempts=case((Item.id.in_(ids if charge is None else charge), Item.attempts + 1),
                                  else_=Item.attempts))
            .returning(Item.id, Item.attempts).execution_options(synchronize_session=False)).all()
    wanted = set(ids)
    return {i: a for i, a in rows if i in wanted}


def lease_write(s) -> None:
    """A claim, a lease renewal or an attempt's charge need not wait for the WAL flush (about 2.4 ms
    a transaction on this machine's PostgreSQL, against 0.15 ms without). Lost in a database crash,
    a lease only ends sooner, a claim is undone (the commit's claim-token check keeps the next
    delivery from committing twice) and an attempt goes uncounted; and the next commit that does
    wait for the flush (an item's success) makes every earlier one durable with it, since the log
    is written in order. A worker's death loses none of them: the server has them."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SET LOCAL synchronous_commit = off"))


def _renew(rt: Runtime, token: str, ids: list[int]) -> set[int]:
    """The items still ours, with their lease renewed: checked again before storing."""
    with rt.db.session() as s:
        lease_write(s)
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
            "duration_s": out.info.get("duration_s"), "reuse_key": c.reuse_key}


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
        "params": requests_of(job, [c])[0].params, "seed": c.seed,
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


def fail(rt: Runtime, token: str, failures: dict[int, str]) -> None:
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


def release_quietly(rt: Runtime, token: str, *, charge_all: bool) -> None:
    """Release on the way out of a failure, the attempts counted (all of them charged now if the
    failure came before any generation began, or it would repeat forever); if the database is the
    failure, the leases expire instead."""
    try:
        release(rt, token, charge_all=charge_all)
    except Exception as e:
        log.warning("could not release the chunk's items (%s); they return when their lease expires", e)


def cancel_rest(rt: Runtime, token: str) -> int:
    with rt.db.session() as s:
        result = s.execute(update(Item).where(Item.claim_token == token, Item.status == ItemStatus.running)
                           .values(status=ItemStatus.cancelled, finished_at=utcnow(), lease_until=None)
                           .execution_options(synchronize_session=False))
        return cast("CursorResult[Any]", result).rowcount  # an UPDATE's result is a cursor's
