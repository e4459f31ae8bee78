"""Reuse of identical work: the job option ``reuse``.

Every generated output is stored with a reuse key: the sha256 of a canonical JSON of what made it,
namely the model's weights digest (with its backend and load dtype), the effective parameters
(item > job > registry defaults, checked and normalised by the backend's contract, plus the contract's
project defaults, which fill what is unset), the rendered prompt (a chat item's messages and the
identity of its chat template; an item ``from`` another job uses the text read now), and the seed. A
model whose digest is unknown gets no key, so its outputs are never reused and never reuse.

With the option on, a chunk's keys are looked up once, right after the claim and before the model is
loaded (one IN query on a partial index): a chunk whose items all match never loads the model. A match
is a reference, not a copy: the reused row names the original's object (its key, uri, sha256; a text
output's detached C2PA manifest beside it), and its provenance says ``reused_from`` (job, item index,
key, sha256). Nothing is written to the store, so a reused item costs no request there.

What keeps a referenced object alive is ``aigc gc`` (aigc_core/retention.py): it never removes a job
that another job's row refers to, and it marks a job ``removing`` in the transaction that decides to
remove it. A reuse commits only against originals whose job is not marked: on PostgreSQL the commit
reads those job rows ``FOR SHARE`` (a gc that marks one waits for this commit, then sees its rows;
a commit that comes after the mark skips that original), on SQLite it takes the database's write lock
first, so gc's decision and the commit are serialised. Items whose original went meanwhile generate.
Fenced by the claim token as every commit is: a redelivered chunk claims only items still open, so
nothing is reused twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Select, func, insert, select, update
from sqlalchemy.orm import Session

from aigc_core.credentials import signing_mode
from aigc_core.schema import Artifact, Item, ItemStatus, Job, utcnow
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
    uri: str
    sha256: str
    size: int
    media_type: str
    duration_s: float | None
    provenance: dict[str, Any]


def reuse_outputs(rt: Runtime, job: JobInfo, token: str, items: list[Claimed], res: ChunkResult) -> list[Claimed]:
    """Each item with its reuse key; with the job option, the items that match an earlier output are
    committed as references to it. Returns the items still to generate."""
    keyed = with_keys(job, items)
    if not job.reuse:
        return keyed
    signed = signing_mode(rt.settings) == "required"
    with rt.db.session() as s:
        found = lookup(s, {c.reuse_key for c in keyed if c.reuse_key}, signed=signed)
    matched = [(c, found[c.reuse_key]) for c in keyed if c.reuse_key in found]
    if not matched:
        return keyed
    done, gone = _commit(rt, job, token, matched)
    res.succeeded += len(done)
    res.reused += len(done)
    if done:
        metrics.count_reused(job.model.tag, len(done))
        log.info("reused %d items", len(done), extra={"items": sorted(c.index for c, _ in matched if c.id in done)})
    # Not generated here: the items committed now, and those another delivery holds (not ours any more).
    taken = {c.id for c, _ in matched} - gone
    return [c for c in keyed if c.id not in taken]


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
    """The first (oldest) output of each key whose job gc is not removing, in one statement (an
    artifact exists only for a succeeded item; a reused row has no key, so an original is always a
    generated output); ``signed``: only outputs that carry C2PA credentials (signing is required
    here, and nothing unsigned is stored)."""
    if not keys:
        return {}
    rows = s.execute(lookup_statement(keys)).all()
    out = {}
    for r in rows:
        prov = dict(r.provenance or {})
        if signed and not (prov.get("c2pa") or {}).get("signed"):
            continue
        out[r.reuse_key] = Original(r.id, r.job_id, r[2], r.key, r.uri, r.sha256, r.size, r.media_type, r.duration_s,
                                    prov)
    return out


def lookup_statement(keys: set[str]) -> Select[Any]:
    """The lookup's one statement (tests/integration/test_reuse_pg.py explains its plan)."""
    first = (select(func.min(Artifact.id)).join(Job, Job.id == Artifact.job_id)
             .where(Artifact.reuse_key.in_(sorted(keys)), Job.removing.is_(False)).group_by(Artifact.reuse_key))
    return (select(Artifact.id, Artifact.job_id, Item.index, Artifact.key, Artifact.uri, Artifact.sha256, Artifact.size,
                   Artifact.media_type, Artifact.duration_s, Artifact.provenance, Artifact.reuse_key)
            .select_from(Artifact).join(Item, Item.id == Artifact.item_id).where(Artifact.id.in_(first)))


def live_jobs(s: Session, job_ids: set[str]) -> set[str]:
    """Of ``job_ids``, the jobs gc is not removing, held so until this transaction ends: on PostgreSQL
    their rows ``FOR SHARE`` (gc's mark waits for this transaction; one taken before is seen here);
    on SQLite a no-op write takes the database's write lock, so no gc transaction commits between this
    read and the caller's commit."""
    if not job_ids:
        return set()
    ids = sorted(job_ids)
    if s.get_bind().dialect.name == "sqlite":
        return set(s.scalars(update(Job).where(Job.id.in_(ids), Job.removing.is_(False))
                             .values(removing=Job.removing).returning(Job.id)
                             .execution_options(synchronize_session=False)))
    # In id order, as gc locks the rows it marks: neither waits for the other while holding what it needs.
    return set(s.scalars(select(Job.id).where(Job.id.in_(ids), Job.removing.is_(False)).order_by(Job.id)
                         .with_for_update(read=True)))


def _commit(rt: Runtime, job: JobInfo, token: str,
            matched: list[tuple[Claimed, Original]]) -> tuple[set[int], set[int]]:
    """One transaction: the items still this delivery's become succeeded (their attempt counted, as a
    generation's would be) with rows that refer to their originals. Returns the items committed, and
    those whose original's job gc is removing (or has removed) since the lookup: they generate."""
    others = {o.job_id for _, o in matched if o.job_id != job.id}  # a job's own outputs live as long as it
    with rt.db.session() as s:
        live = live_jobs(s, others) | {job.id}
        ok = [(c, o) for c, o in matched if o.job_id in live]
        gone = {c.id for c, o in matched if o.job_id not in live}
        done: set[int] = set()
        if ok:
            done = set(s.scalars(
                update(Item).where(Item.id.in_([c.id for c, _ in ok]), Item.claim_token == token,
                                   Item.status == ItemStatus.running)
                .values(status=ItemStatus.succeeded, attempts=Item.attempts + 1, finished_at=utcnow(),
                        lease_until=None, error=None)
                .returning(Item.id).execution_options(synchronize_session=False)))
        if rows := [_row(job, c, o) for c, o in ok if c.id in done]:
            s.execute(insert(Artifact), rows)
    return done, gone


def _row(job: JobInfo, c: Claimed, o: Original) -> dict[str, Any]:
    """A reused item's artifact: the original's object and digest, the original's provenance (what made
    these bytes) with where it came from."""
    prov = {**o.provenance, "reused_from": {"job_id": o.job_id, "item_index": o.item_index, "key": o.key,
                                            "sha256": o.sha256}}
    return {"item_id": c.id, "job_id": job.id, "key": o.key, "uri": o.uri, "sha256": o.sha256, "size": o.size,
            "media_type": o.media_type, "provenance": prov, "duration_s": o.duration_s, "reuse_key": None,
            "reused_from_id": o.artifact_id, "reused_from_job": o.job_id if o.job_id != job.id else None}
