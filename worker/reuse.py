"""Reuse of identical work: the job option ``reuse``.

Every generated output is stored with a reuse key: the sha256 of a canonical JSON of what made it,
namely the model's weights digest (with its backend and load dtype), the effective parameters
(item > job > registry defaults, checked and normalised by the backend's contract, plus the contract's
project defaults, which fill what is unset), the rendered prompt (a chat item's messages and the
identity of its chat template; an item ``from`` another job uses the text read now), and the seed. A
model whose digest is unknown gets no key, so its outputs are never reused and never reuse.

With the option on, a chunk's keys are looked up once, right after the claim and before the model is
loaded (one IN query on a partial index): a chunk whose items all match never loads the model. Each
match is copied server-side (S3 CopyObject; a hard link in a folder store) to this delivery's own key,
with its detached C2PA manifest and a provenance sidecar whose ``reused_from`` names the original
(job, item index, key, sha256). The copy is the new job's own object, so removing the old job (``aigc
gc``) never touches it. Object first, then the row, in one transaction fenced by the claim token as
``store_and_commit`` fences it: a redelivered chunk claims only items still open, so nothing is
reused twice, and the copies of a delivery that lost its items are removed.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import logging
from concurrent.futures import FIRST_EXCEPTION, wait
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from aigc_core.credentials import DETACHED_SUFFIX, signing_mode
from aigc_core.errors import NotFound
from aigc_core.jobs import DISCARDED_EVENT, item_key, record_event, sidecar_key, sidecar_of
from aigc_core.schema import Artifact, Item, ItemStatus, utcnow
from aigc_models.params import params_for
from worker import metrics
from worker.chunk import ChunkResult, Claimed, JobInfo, requests_of
from worker.runtime import Runtime

log = logging.getLogger("aigc.worker")

KEY_VERSION = 1  # part of every key: a change in what the key covers makes new keys, never false matches
GENERATED_KINDS = ("text", "image", "audio")


@dataclass(frozen=True)
class Original:
    """An earlier succeeded output with the same reuse key."""

    artifact_id: int
    job_id: str
    item_index: int
    key: str
    sha256: str
    size: int
    media_type: str
    duration_s: float | None
    provenance: dict[str, Any]


def reuse_outputs(rt: Runtime, job: JobInfo, token: str, items: list[Claimed], res: ChunkResult) -> list[Claimed]:
    """Each item with its reuse key; with the job option, the items that match an earlier output are
    committed as copies of it. Returns the items still to generate."""
    keyed = with_keys(job, items)
    if not job.reuse:
        return keyed
    signed = signing_mode(rt.settings) == "required"
    with rt.db.session() as s:
        found = lookup(s, {c.reuse_key for c in keyed if c.reuse_key}, signed=signed)
        matched = [(c, found[c.reuse_key]) for c in keyed if c.reuse_key in found]
        # Charged as a generation would be, in the same transaction: a delivery that dies while copying
        # counts an attempt, so the sweep at finalize removes its copies.
        mine = _charge(s, token, [c.id for c, _ in matched]) if matched else set()
    if not matched:
        return keyed
    res.charged.update(mine)
    taken = {c.id for c, _ in matched}  # committed here, or another delivery's now: not generated here
    matched = [(c, o) for c, o in matched if c.id in mine]
    rows, missing = _copy_all(rt, job, token, matched)
    done = _commit(rt, job, token, rows)
    res.succeeded += len(done)
    res.reused += len(done)
    if done:
        metrics.count_reused(job.model.tag, len(done))
        log.info("reused %d items", len(done), extra={"items": sorted(c.index for c, _ in matched
                                                                      if c.id in done)})
    return [c for c in keyed if c.id not in taken - missing]


def with_keys(job: JobInfo, items: list[Claimed]) -> list[Claimed]:
    """The items with their reuse keys (none where the model's weights digest is unknown)."""
    ref = job.model
    if job.kind not in GENERATED_KINDS or not (ref.digest or "").strip():
        return items  # unknown weights: no key, never reused either way
    schema = params_for(ref.backend, ref.kind, ref.defaults.get("model_type"))
    base = {"v": KEY_VERSION, "kind": job.kind, "backend": ref.backend, "weights_digest": ref.digest,
            "dtype": ref.defaults.get("dtype"), "project_defaults": schema.project_defaults()}
    return [replace(c, reuse_key=_key(base, schema, job, c)) for c in items]


def reuse_key(job: JobInfo, item: Claimed) -> str | None:
    """One item's key (None: its model's digest is unknown, or its parameters are refused)."""
    return with_keys(job, [item])[0].reuse_key


def _key(base: dict[str, Any], schema, job: JobInfo, c: Claimed) -> str | None:
    req = requests_of(job, [c])[0]
    asked = {k: v for k, v in req.params.items() if k in schema.model_fields and v is not None}
    try:
        params = schema.model_validate(asked).model_dump(mode="json", exclude_none=True)
    except ValidationError:
        return None  # the backend refuses these: the item fails there, nothing to reuse
    chat = c.messages is not None
    template = req.chat_template if chat else None
    material = {**base, "params": params, "seed": c.seed,
                "prompt": None if chat else c.prompt, "messages": c.messages if chat else None,
                # A registry template names itself; the checkpoint's own is fixed by the weights digest.
                "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None}
    try:
        raw = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):  # nothing JSON cannot say exactly is keyed
        return None
    return hashlib.sha256(raw.encode()).hexdigest()


def lookup(s: Session, keys: set[str], *, signed: bool = False) -> dict[str, Original]:
    """The first (oldest) output of each key, in one statement (an artifact exists only for a succeeded
    item); ``signed``: only outputs that carry C2PA credentials (signing is required here, and nothing
    unsigned is stored)."""
    if not keys:
        return {}
    first = (select(func.min(Artifact.id)).where(Artifact.reuse_key.in_(sorted(keys)))
             .group_by(Artifact.reuse_key))
    rows = s.execute(
        select(Artifact.id, Artifact.job_id, Item.index, Artifact.key, Artifact.sha256, Artifact.size,
               Artifact.media_type, Artifact.duration_s, Artifact.provenance, Artifact.reuse_key)
        .select_from(Artifact).join(Item, Item.id == Artifact.item_id).where(Artifact.id.in_(first))).all()
    out = {}
    for r in rows:
        prov = dict(r.provenance or {})
        if signed and not (prov.get("c2pa") or {}).get("signed"):
            continue
        out[r.reuse_key] = Original(r.id, r.job_id, r[2], r.key, r.sha256, r.size, r.media_type, r.duration_s, prov)
    return out


def _charge(s: Session, token: str, ids: list[int]) -> set[int]:
    """The items still this delivery's, their attempt counted."""
    return set(s.scalars(
        update(Item).where(Item.id.in_(ids), Item.claim_token == token, Item.status == ItemStatus.running)
        .values(attempts=Item.attempts + 1).returning(Item.id).execution_options(synchronize_session=False)))


def _copy_all(rt: Runtime, job: JobInfo, token: str,
              matched: list[tuple[Claimed, Original]]) -> tuple[list[dict[str, Any]], set[int]]:
    """Copies side by side on the upload threads: the rows to commit, and the items whose original is
    gone (its job removed meanwhile), which generate instead. After a store failure nothing is left
    behind and the failure is raised (the pipeline gives the items back)."""
    futures = [rt.uploads.submit(contextvars.copy_context().run, functools.partial(_copy_one, rt, job, token, c, o))
               for c, o in matched]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        for f in futures:
            f.cancel()
        wait(futures)
    ok = [r for f in futures if not f.cancelled() and f.exception() is None and (r := f.result()) is not None]
    failed = next((e for f in futures if not f.cancelled() and (e := f.exception()) is not None), None)
    if failed is not None:
        _discard(rt, job.id, [r["key"] for r in ok])
        raise failed
    missing = {c.id for (c, _), f in zip(matched, futures, strict=True) if f.result() is None}
    return ok, missing


def _copy_one(rt: Runtime, job: JobInfo, token: str, c: Claimed, o: Original) -> dict[str, Any] | None:
    """Object first (the output, then a text output's detached manifest), then its sidecar; None when
    the original is gone."""
    key = item_key(job.id, c.index, _ext(o.key), token)
    c2pa = o.provenance.get("c2pa") or {}
    try:
        uri = rt.store.copy(o.key, key)
        if c2pa.get("signed") and not c2pa.get("embedded", True):
            rt.store.copy(o.key + DETACHED_SUFFIX, key + DETACHED_SUFFIX)
    except NotFound:
        rt.store.delete([key, key + DETACHED_SUFFIX])
        return None
    prov = {**o.provenance, "reused_from": {"job_id": o.job_id, "item_index": o.item_index, "key": o.key,
                                            "sha256": o.sha256}}
    if rt.settings.provenance_sidecars:
        body = json.dumps(prov, ensure_ascii=False, indent=1, sort_keys=True).encode()
        rt.store.put(sidecar_key(job.id, c.index, token), body, "application/json")
    return {"item_id": c.id, "job_id": job.id, "key": key, "uri": uri, "sha256": o.sha256, "size": o.size,
            "media_type": o.media_type, "provenance": prov, "duration_s": o.duration_s, "reuse_key": None,
            "reused_from_id": o.artifact_id}


def _ext(key: str) -> str:
    """The extension of a key made by ``item_key``: ``{index}.{claim}.{ext}``."""
    return key.rsplit("/", 1)[-1].split(".", 2)[-1]


def _commit(rt: Runtime, job: JobInfo, token: str, rows: list[dict[str, Any]]) -> set[int]:
    """The items still this delivery's become succeeded with their rows, in one transaction; the copies
    made for items another delivery took meanwhile are removed."""
    done: set[int] = set()
    if rows:
        with rt.db.session() as s:
            done = set(s.scalars(
                update(Item).where(Item.id.in_([r["item_id"] for r in rows]), Item.claim_token == token,
                                   Item.status == ItemStatus.running)
                .values(status=ItemStatus.succeeded, finished_at=utcnow(), lease_until=None, error=None)
                .returning(Item.id).execution_options(synchronize_session=False)))
            if mine := [r for r in rows if r["item_id"] in done]:
                s.execute(insert(Artifact), mine)
    _discard(rt, job.id, [r["key"] for r in rows if r["item_id"] not in done])
    return done


def _discard(rt: Runtime, job_id: str, keys: list[str]) -> None:
    """Remove copies nobody committed; if the store refuses, the sweep at finalize removes them."""
    if not keys:
        return
    try:
        rt.store.delete([k for key in keys for k in (key, sidecar_of(key), key + DETACHED_SUFFIX)])
    except Exception as e:
        log.warning("could not remove %d uncommitted copies (%s); removed at finalize", len(keys), e)
        with rt.db.session() as s:
            record_event(s, job_id, DISCARDED_EVENT, count=len(keys))
