"""Cron schedules: schedules.yaml -> ``schedules`` rows -> one job per slot through ``Client.submit``.

Exactly once per slot comes from the database, never from there being one scheduler: a slot is
claimed by inserting its ``ScheduleRun`` (unique on schedule + slot) and the job is submitted with
the idempotency key ``schedule:{name}:{slot}``. Any number of scheduler processes may call
``fire_due`` at once; a claim that loses the insert race does nothing. A claimer that dies between
claim and submit leaves the run ``pending``; a later tick takes it over after ``stale_s`` and
submits again with the same key, which returns the same job if the first submit got through.

Catch-up, for slots that passed while no scheduler ran (``last_slot`` is the cursor):
``none`` fires only the newest due slot and only if it is at most ``grace_s`` old; ``latest`` fires
the newest due slot however old; ``all`` fires the ``catchup_cap`` newest due slots, oldest first.
Slots passed over are not recorded. A paused (or disabled) schedule fires nothing, and on resume
the slots of the pause are passed over whatever the policy. ``max_concurrent`` counts the
schedule's jobs that are not final; a slot over it is recorded ``skipped_overlap``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from aigc_core.db import Database
from aigc_core.errors import AigcError, IdempotencyConflict, NotFound, SpecError, TransientError
from aigc_core.schema import FINAL_JOB_STATES, CatchUp, Job, RunOutcome, Schedule, ScheduleRun, utcnow
from aigc_core.settings import Settings
from aigc_core.spec import format_validation_error, items_file_location, load_yaml, parse_spec, read_items_file
from scheduler.cron.rules import Cron, as_utc, parse_slot, slot_str

log = logging.getLogger("aigc.schedules")

_PLACEHOLDER = re.compile(r"\{(date|slot|name)(?::([^{}]+))?\}")


class JobTemplate(BaseModel):
    """What each firing submits; strings in items and metadata may hold {date:FMT}, {slot}, {name}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = "text"
    model: str = Field(min_length=1, max_length=160)
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    chunk_size: int | None = None
    reuse: bool = False  # the job option: items identical to an earlier day's refer to its output
    items: list[dict[str, Any] | str] | None = None
    items_file: str | None = None  # a path next to the file, file:///path, or s3:// (aigc_core.spec's rule)


class ScheduleDef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    cron: str = Field(min_length=1, max_length=128)
    timezone: str = "UTC"
    job: JobTemplate
    catchup: CatchUp = CatchUp.latest
    catchup_cap: int = Field(10, ge=1, le=1000)
    max_concurrent: int = Field(1, ge=1, le=1000)
    enabled: bool = True


@dataclass(frozen=True)
class Fired:
    """What one slot came to: submitted (with its job), skipped_overlap, failed, or still pending."""

    schedule: str
    slot: str
    outcome: RunOutcome
    job_id: str | None = None
    error: str | None = None


# ---- the file ---------------------------------------------------------------------------------

def load_schedules_file(path: str | Path, *, settings: Settings | None = None) -> list[ScheduleDef]:
    path = Path(path)
    data = load_yaml(path)
    return parse_schedules(data, source=str(path), base_dir=path.resolve().parent, settings=settings)


def parse_schedules(data: Any, *, source: str = "schedules", base_dir: Path | None = None,
                    settings: Settings | None = None) -> list[ScheduleDef]:
    """Validate ``{"schedules": [...]}``; a SpecError names the schedule and the field. With
    ``settings``, an s3:// items_file is checked against the allowed buckets now (it always is when
    a slot fires)."""
    entries = data.get("schedules") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise SpecError(f"{source}: expected a list of schedules under 'schedules:'")
    defs: dict[str, ScheduleDef] = {}
    for i, raw in enumerate(entries):
        named = isinstance(raw, dict) and isinstance(raw.get("name"), str)
        where = f"{source}: schedule {raw['name']!r}" if named else f"{source}: schedules[{i}]"
        if not isinstance(raw, dict):
            raise SpecError(f"{where}: expected a mapping with name, cron and job")
        try:
            d = ScheduleDef.model_validate(raw)
        except ValidationError as e:
            raise SpecError(f"{where}: {format_validation_error(e)}") from None
        try:
            Cron.parse(d.cron, d.timezone)
        except ValueError as e:
            raise SpecError(f"{where}: {e}") from None
        if d.name in defs:
            raise SpecError(f"{where}: the name is used twice")
        defs[d.name] = _check_template(_resolve_items_file(d, base_dir, settings, where), where)
    return list(defs.values())


def _resolve_items_file(d: ScheduleDef, base_dir: Path | None, settings: Settings | None, where: str) -> ScheduleDef:
    """A local items_file becomes a file:// URI (it is read at each firing, from any working folder)."""
    f = d.job.items_file
    local = "://" not in f if f is not None else False
    if f is None or (settings is None and not local):
        return d  # an s3:// one is checked when a slot fires
    try:
        location = items_file_location(f, settings=settings, base_dir=base_dir)
    except SpecError as e:
        raise SpecError(f"{where}: job.{e}") from None
    if isinstance(location, str):
        return d
    return d.model_copy(update={"job": d.job.model_copy(update={"items_file": location.resolve().as_uri()})})


def _check_template(d: ScheduleDef, where: str) -> ScheduleDef:
    """Refuse at load what would fail every firing: the spec is validated with a rendered sample."""
    t = d.job
    if (t.items is None) == (t.items_file is None):
        raise SpecError(f"{where}: job: give items or items_file (one of them)")
    if t.items == []:
        raise SpecError(f"{where}: job.items: a job needs at least one item")
    ctx = _context(d.name, slot_str(utcnow()), Cron.parse(d.cron, d.timezone))
    sample = _job_kwargs(t, render(t.items, ctx) if t.items is not None else [{"prompt": "x"}], ctx)
    try:
        parse_spec(sample)
    except SpecError as e:
        raise SpecError(f"{where}: job.{e}") from None
    return d


# ---- templates --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Context:
    name: str
    slot: str
    local: datetime  # the slot on the schedule's wall clock


def _context(name: str, slot: str, cron: Cron) -> _Context:
    return _Context(name, slot, parse_slot(slot).astimezone(cron.tz))


def render(value: Any, ctx: _Context) -> Any:
    """``{date}`` (YYYY-MM-DD) or ``{date:%A %d %B}`` in the schedule's zone, ``{slot}``, ``{name}``;
    other braces are left alone."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: _fill(m.group(1), m.group(2), ctx), value)
    if isinstance(value, list):
        return [render(v, ctx) for v in value]
    if isinstance(value, dict):
        return {k: render(v, ctx) for k, v in value.items()}
    return value


def _fill(key: str, fmt: str | None, ctx: _Context) -> str:
    if key == "date":
        return ctx.local.strftime(fmt or "%Y-%m-%d")
    return ctx.slot if key == "slot" else ctx.name


def _job_kwargs(t: JobTemplate, items: list[Any], ctx: _Context) -> dict[str, Any]:
    meta = {**render(t.metadata, ctx), "schedule": ctx.name, "slot": ctx.slot}
    return {"kind": t.kind, "model": t.model, "items": [{"prompt": i} if isinstance(i, str) else i for i in items],
            "params": t.params, "seed": t.seed, "metadata": meta, "chunk_size": t.chunk_size, "reuse": t.reuse}


def build_job(client, template: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    """Client.submit keyword arguments for one slot; an items_file is read now, so it may change daily."""
    t = JobTemplate.model_validate(template)
    items = t.items if t.items is not None else _read_items(client, t.items_file or "")
    return _job_kwargs(t, render(items, ctx), ctx)


def _read_items(client, uri: str) -> list[dict[str, Any]]:
    return read_items_file(uri, settings=client.settings)


# ---- the database -----------------------------------------------------------------------------

def sync_schedules(db: Database, defs: list[ScheduleDef], *, now: datetime | None = None,
                   prune: bool = True) -> dict[str, str]:
    """Create or update a row per definition; with ``prune``, rows not in ``defs`` are disabled.
    Pause state (``paused_at``) and the cursor (``last_slot``) are the database's, never the file's."""
    now = as_utc(now or utcnow())
    result: dict[str, str] = {}
    for d in defs:
        try:
            with db.session() as s:
                result[d.name] = _upsert(s, d, now)
        except IntegrityError:  # another scheduler created it just now: update theirs
            with db.session() as s:
                result[d.name] = _upsert(s, d, now)
    if prune:
        with db.session() as s:
            for row in s.scalars(select(Schedule).where(Schedule.name.not_in([d.name for d in defs]),
                                                        Schedule.enabled.is_(True))):
                row.enabled, row.updated_at = False, now
                result[row.name] = "disabled (not in the file)"
    return result


def schedules_not_in(db: Database, names: list[str]) -> list[str]:
    """Enabled schedules in the database that ``names`` leaves out: what a prune would disable."""
    with db.session() as s:
        return list(s.scalars(select(Schedule.name).where(Schedule.name.not_in(names), Schedule.enabled.is_(True))
                              .order_by(Schedule.name)))


def _upsert(s, d: ScheduleDef, now: datetime) -> str:
    values = {"cron": d.cron, "timezone": d.timezone, "template": d.job.model_dump(mode="json", exclude_none=True),
              "catchup": d.catchup, "catchup_cap": d.catchup_cap, "max_concurrent": d.max_concurrent,
              "enabled": d.enabled}
    row = s.scalar(select(Schedule).where(Schedule.name == d.name).with_for_update())
    if row is None:
        s.add(Schedule(name=d.name, **values, created_at=now, updated_at=now))
        s.flush()
        return "created"
    changed = {k: v for k, v in values.items() if getattr(row, k) != v}
    if not changed:
        return "unchanged"
    if changed.get("enabled") is True or {"cron", "timezone"} & changed.keys():
        # Re-enabled, or a new cron: it starts from now; the old cron's missed slots are not the new one's.
        row.last_slot = skip_to(row, Cron.parse(d.cron, d.timezone), now)
    for k, v in changed.items():
        setattr(row, k, v)
    row.updated_at = now
    return "updated"


def _cursor(row: Schedule) -> datetime:
    return parse_slot(row.last_slot) if row.last_slot else as_utc(row.created_at)


def skip_to(row: Schedule, cron: Cron, now: datetime) -> str | None:
    latest = cron.latest(now)
    if latest is None:
        return row.last_slot
    return max(row.last_slot or "", slot_str(latest))


def get_schedule(db: Database, name: str) -> Schedule:
    with db.session() as s:
        row = s.scalar(select(Schedule).where(Schedule.name == name))
    if row is None:
        raise NotFound(f"no schedule {name!r}")
    return row


# ---- firing -----------------------------------------------------------------------------------

def fire_due(client, now: datetime | None = None, *, grace_s: float = 60.0, stale_s: float = 300.0) -> list[Fired]:
    """Fire the due slots of every enabled, unpaused schedule. Safe in any number of processes at once."""
    now = as_utc(now or utcnow())
    fired = _retry_stale(client, stale_s)
    with client.db.session() as s:
        active = list(s.scalars(select(Schedule).where(Schedule.enabled.is_(True), Schedule.paused_at.is_(None))
                                .order_by(Schedule.name)))
    for row in active:
        try:
            fired += _fire_schedule(client, row, now, grace_s, stale_s)
        except Exception:  # one broken schedule must not stop the others; its slot stays unclaimed
            log.exception("schedule %s: firing failed", row.name)
    return fired


def _fire_schedule(client, row: Schedule, now: datetime, grace_s: float, stale_s: float) -> list[Fired]:
    cron = Cron.parse(row.cron, row.timezone)
    due = cron.slots(_cursor(row), now, newest=row.catchup_cap if row.catchup == CatchUp.all else 1)
    if not due:
        return []
    newest = slot_str(due[-1])
    if row.catchup == CatchUp.none:
        due = [due[-1]] if (now - due[-1]).total_seconds() <= grace_s else []
    fired = [f for slot in due if (f := fire_slot(client, row, slot_str(slot), cron, stale_s)) is not None]
    with client.db.session() as s:  # slots passed over by the policy are done with too
        s.execute(update(Schedule).where(Schedule.name == row.name,
                                         or_(Schedule.last_slot.is_(None), Schedule.last_slot < newest))
                  .values(last_slot=newest))
    return fired


def fire_slot(client, row: Schedule, slot: str, cron: Cron, stale_s: float, *, manual: bool = False) -> Fired | None:
    run_id = _claim(client.db, row.name, slot, manual)
    if run_id is None:
        return None  # another process (or an earlier tick) has this slot
    return _execute(client, run_id, row, slot, cron, stale_s, check_overlap=not manual)


def _claim(db: Database, name: str, slot: str, manual: bool) -> int | None:
    try:
        with db.session() as s:
            run = ScheduleRun(schedule=name, slot=slot, outcome=RunOutcome.pending, manual=manual)
            s.add(run)
            s.flush()
            if not manual:
                s.execute(update(Schedule).where(Schedule.name == name,
                                                 or_(Schedule.last_slot.is_(None), Schedule.last_slot < slot))
                          .values(last_slot=slot))
            return run.id
    except IntegrityError:
        return None


def _execute(client, run_id: int, row: Schedule, slot: str, cron: Cron, stale_s: float, *,
             check_overlap: bool) -> Fired:
    db, key = client.db, f"schedule:{row.name}:{slot}"
    try:
        if check_overlap and (n := _open_runs(db, row.name, slot, stale_s)) >= row.max_concurrent:
            return _finish(db, run_id, row.name, slot, RunOutcome.skipped_overlap,
                           error=f"{n} earlier runs still open (max_concurrent {row.max_concurrent})")
        job = client.submit(**build_job(client, row.template, _context(row.name, slot, cron)), idempotency_key=key)
        return _finish(db, run_id, row.name, slot, RunOutcome.submitted, job_id=job.id)
    except IdempotencyConflict:  # an earlier attempt submitted it, and the items file changed since
        with db.session() as s:
            job_id = s.scalar(select(Job.id).where(Job.idempotency_key == key))
        return _finish(db, run_id, row.name, slot, RunOutcome.submitted, job_id=job_id,
                       error="the template changed after the first attempt; the first job stands")
    except TransientError as e:  # stays pending: a later tick tries again with the same key
        log.warning("schedule %s slot %s: %s; will retry", row.name, slot, e)
        try:
            with db.session() as s:
                s.execute(update(ScheduleRun).where(ScheduleRun.id == run_id).values(error=str(e)))
        except TransientError:
            pass  # the database itself is away; the run is still pending
        return Fired(row.name, slot, RunOutcome.pending, error=str(e))
    except AigcError as e:
        return _finish(db, run_id, row.name, slot, RunOutcome.failed, error=str(e))


def _open_runs(db: Database, name: str, slot: str, stale_s: float) -> int:
    """This schedule's other runs whose job is not final, or that another process is submitting now."""
    fresh = utcnow() - timedelta(seconds=stale_s)
    with db.session() as s:
        return s.scalar(
            select(func.count()).select_from(ScheduleRun).outerjoin(Job, Job.id == ScheduleRun.job_id)
            .where(ScheduleRun.schedule == name, ScheduleRun.slot != slot,
                   or_(and_(ScheduleRun.outcome == RunOutcome.submitted, Job.status.not_in(list(FINAL_JOB_STATES))),
                       and_(ScheduleRun.outcome == RunOutcome.pending, ScheduleRun.updated_at > fresh)))
        ) or 0


def _finish(db: Database, run_id: int, name: str, slot: str, outcome: RunOutcome, *,
            job_id: str | None = None, error: str | None = None) -> Fired:
    with db.session() as s:
        s.execute(update(ScheduleRun).where(ScheduleRun.id == run_id)
                  .values(outcome=outcome, job_id=job_id, error=error, updated_at=utcnow()))
    log.info("schedule %s slot %s: %s %s", name, slot, outcome.value, job_id or error or "",
             extra={"job_id": job_id} if job_id else None)
    return Fired(name, slot, outcome, job_id, error)


def _retry_stale(client, stale_s: float) -> list[Fired]:
    """Take over runs left pending longer than ``stale_s`` (their claimer died or hit a transient error)."""
    cutoff = utcnow() - timedelta(seconds=stale_s)
    with client.db.session() as s:
        rows = s.execute(select(ScheduleRun, Schedule).join(Schedule, Schedule.name == ScheduleRun.schedule)
                         .where(ScheduleRun.outcome == RunOutcome.pending, ScheduleRun.updated_at < cutoff)
                         .order_by(ScheduleRun.id).limit(100)).all()
    fired = []
    for run, sched in rows:
        with client.db.session() as s:  # compare-and-set: one process takes each over
            took = s.execute(update(ScheduleRun).where(ScheduleRun.id == run.id,
                                                       ScheduleRun.outcome == RunOutcome.pending,
                                                       ScheduleRun.updated_at == run.updated_at)
                             .values(updated_at=utcnow())).rowcount
        if took:
            fired.append(_execute(client, run.id, sched, run.slot, Cron.parse(sched.cron, sched.timezone),
                                  stale_s, check_overlap=not run.manual))
    return fired
