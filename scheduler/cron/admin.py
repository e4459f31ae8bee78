"""Operating schedules: list, show, pause, resume and run now (the ``aigc schedules`` commands)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from aigc_core.db import Database
from aigc_core.errors import NotFound
from aigc_core.schema import Job, Schedule, ScheduleRun, utcnow
from scheduler.cron.rules import Cron, as_utc, slot_str
from scheduler.cron.schedules import Fired, fire_slot, get_schedule, skip_to


def schedule_views(db: Database, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every schedule with its state, cursor, next slot and last run."""
    now = as_utc(now or utcnow())
    with db.session() as s:
        rows = list(s.scalars(select(Schedule).order_by(Schedule.name)))
        newest = select(func.max(ScheduleRun.id)).group_by(ScheduleRun.schedule)
        last = {r.schedule: r for r in s.scalars(select(ScheduleRun).where(ScheduleRun.id.in_(newest)))}
    return [_view(row, now, last.get(row.name)) for row in rows]


def schedule_detail(db: Database, name: str, *, runs: int = 20, now: datetime | None = None) -> dict[str, Any]:
    """One schedule with its job template and its latest runs (slot, job, outcome, job status)."""
    now = as_utc(now or utcnow())
    row = get_schedule(db, name)
    with db.session() as s:
        recent = s.execute(select(ScheduleRun, Job.status).outerjoin(Job, Job.id == ScheduleRun.job_id)
                           .where(ScheduleRun.schedule == name).order_by(ScheduleRun.slot.desc()).limit(runs)).all()
    view = _view(row, now, recent[0][0] if recent else None)
    view["template"] = row.template
    view["runs"] = [_run_dict(r, status.value if status else None) for r, status in recent]
    return view


def pause(db: Database, name: str, now: datetime | None = None) -> dict[str, Any]:
    """Stop firing NAME until ``resume``; a pause survives restarts and re-syncs of the file."""
    now = as_utc(now or utcnow())
    with db.session() as s:
        row = _locked(s, name)
        if row.paused_at is None:
            row.paused_at, row.updated_at = now, now
    return _view(row, now, None)


def resume(db: Database, name: str, now: datetime | None = None) -> dict[str, Any]:
    """Fire NAME again from its next slot: the slots of the pause are passed over, whatever its catch-up."""
    now = as_utc(now or utcnow())
    with db.session() as s:
        row = _locked(s, name)
        if row.paused_at is not None:
            row.last_slot = skip_to(row, Cron.parse(row.cron, row.timezone), now)
            row.paused_at, row.updated_at = None, now
    return _view(row, now, None)


def run_now(client, name: str, now: datetime | None = None) -> Fired:
    """Fire NAME once now, outside its cron (slot = this second), even if paused or at max_concurrent."""
    row = get_schedule(client.db, name)
    slot = slot_str(as_utc(now or utcnow()).replace(microsecond=0))
    fired = fire_slot(client, row, slot, Cron.parse(row.cron, row.timezone), stale_s=300.0, manual=True)
    if fired is not None:
        return fired
    with client.db.session() as s:  # this second's slot was fired already: report that run
        run = s.scalar(select(ScheduleRun).where(ScheduleRun.schedule == name, ScheduleRun.slot == slot))
    return Fired(name, slot, run.outcome, run.job_id, run.error)


def _locked(s, name: str) -> Schedule:
    row = s.scalar(select(Schedule).where(Schedule.name == name).with_for_update())
    if row is None:
        raise NotFound(f"no schedule {name!r}")
    return row


def _view(row: Schedule, now: datetime, last: ScheduleRun | None) -> dict[str, Any]:
    state = "disabled" if not row.enabled else "paused" if row.paused_at else "active"
    nxt = Cron.parse(row.cron, row.timezone).next_after(now) if state == "active" else None
    return {
        "name": row.name, "cron": row.cron, "timezone": row.timezone, "state": state,
        "catchup": row.catchup.value, "catchup_cap": row.catchup_cap, "max_concurrent": row.max_concurrent,
        "last_slot": row.last_slot, "next_slot": slot_str(nxt) if nxt else None,
        "paused_at": as_utc(row.paused_at).isoformat() if row.paused_at else None,
        "last_run": _run_dict(last, None) if last else None,
    }


def _run_dict(r: ScheduleRun, job_status: str | None) -> dict[str, Any]:
    return {"slot": r.slot, "outcome": r.outcome.value, "job_id": r.job_id, "job_status": job_status,
            "manual": r.manual, "error": r.error, "at": as_utc(r.created_at).isoformat()}
