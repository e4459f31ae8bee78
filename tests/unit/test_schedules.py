"""Cron schedules: the file, slots across daylight saving, templates, catch-up, overlap, pause, run-now,
and firing each slot once, against the embedded SQLite client with the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from aigc_core.errors import SpecError
from aigc_core.schema import Item, Job, RunOutcome, Schedule, ScheduleRun, utcnow
from scheduler import Client
from scheduler.cron.admin import pause, resume, run_now, schedule_detail, schedule_views
from scheduler.cron.rules import Cron, slot_str
from scheduler.cron.schedules import fire_due, load_schedules_file, parse_schedules, sync_schedules

U = UTC


def at(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def slots(expr: str, tz: str, a: str, b: str) -> list[str]:
    return [slot_str(s) for s in Cron.parse(expr, tz).slots(at(a), at(b))]


def sched(name="brief", cron="0 7 * * *", tz="UTC", **kw) -> dict:
    job = kw.pop("job", {"model": "tiny", "items": [{"custom_id": "b", "prompt": "Briefing for {date:%A %d %B}"}]})
    return {"name": name, "cron": cron, "timezone": tz, "job": job, **kw}


def define(client, *defs: dict, now: str) -> None:
    sync_schedules(client.db, parse_schedules({"schedules": list(defs)}), now=at(now))


def runs(client, name: str) -> list[tuple[str, str, str | None]]:
    with client.db.session() as s:
        rows = s.scalars(select(ScheduleRun).where(ScheduleRun.schedule == name).order_by(ScheduleRun.slot))
        return [(r.slot, r.outcome.value, r.job_id) for r in rows]


def job_keys(client) -> list[str]:
    with client.db.session() as s:
        return sorted(s.scalars(select(Job.idempotency_key)))


def prompts(client, job_id: str) -> list[str]:
    with client.db.session() as s:
        return list(s.scalars(select(Item.prompt).where(Item.job_id == job_id).order_by(Item.index)))


# ---- the file ---------------------------------------------------------------------------------

def test_schedules_file_parses_with_defaults_and_a_relative_items_file_becomes_a_uri(tmp_path):
    (tmp_path / "items.jsonl").write_text('{"custom_id": "a", "prompt": "x"}\n')
    (tmp_path / "schedules.yaml").write_text(
        "schedules:\n"
        "  - name: morning-briefing\n"
        "    cron: '0 7 * * *'\n"
        "    timezone: Europe/London\n"
        "    job: {kind: text, model: tiny, items: [{prompt: 'Briefing for {date:%A %d %B}'}]}\n"
        "  - name: nightly\n"
        "    cron: '30 1 * * *'\n"
        "    catchup: all\n"
        "    catchup_cap: 3\n"
        "    max_concurrent: 2\n"
        "    enabled: false\n"
        "    job: {model: tiny, items_file: items.jsonl, params: {max_new_tokens: 8}}\n")
    brief, nightly = load_schedules_file(tmp_path / "schedules.yaml")
    assert (brief.name, brief.timezone, brief.catchup.value, brief.max_concurrent, brief.enabled) == \
        ("morning-briefing", "Europe/London", "latest", 1, True)
    assert (nightly.catchup.value, nightly.catchup_cap, nightly.max_concurrent, nightly.enabled) == ("all", 3, 2, False)
    assert nightly.job.items_file == (tmp_path / "items.jsonl").as_uri()


@pytest.mark.parametrize(("change", "expected"), [
    ({"cron": "0 7 * *"}, "schedule 'brief': cron: '0 7 * *' has 4 fields"),
    ({"cron": "0 25 * * *"}, "schedule 'brief': cron: '0 25 * * *': hour 25 is out of range (0-23)"),
    ({"cron": "0 7 * * mon-someday"}, "schedule 'brief': cron: '0 7 * * mon-someday' is not a valid cron expression"),
    ({"cron": "0 0 30 2 *"}, "schedule 'brief': cron: '0 0 30 2 *' never fires"),
    ({"tz": "Europe/Atlantis"}, "schedule 'brief': timezone: 'Europe/Atlantis' is not an IANA timezone"),
    ({"catchup": "some"}, "schedule 'brief': catchup: Input should be 'none', 'latest' or 'all'"),
    ({"max_concurrent": 0}, "schedule 'brief': max_concurrent: Input should be greater than or equal to 1"),
    ({"every": "day"}, "schedule 'brief': every: Extra inputs are not permitted"),
    ({"job": {"items": [{"prompt": "x"}]}}, "schedule 'brief': job.model: Field required"),
    ({"job": {"model": "tiny"}}, "schedule 'brief': job: give items or items_file"),
    ({"job": {"model": "tiny", "items": [], "items_file": "s3://b/i.jsonl"}}, "job: give items or items_file"),
    ({"job": {"model": "tiny", "items": []}}, "schedule 'brief': job.items: a job needs at least one item"),
    ({"job": {"model": "tiny", "kind": "video", "items": ["x"]}}, "schedule 'brief': job.kind"),
    ({"job": {"model": "tiny", "items": [{"prompt": "x", "colour": 1}]}}, "schedule 'brief': job.items.0.colour"),
    ({"name": "two words"}, "schedule 'two words': name: String should match pattern"),
])
def test_a_bad_schedule_is_refused_naming_the_schedule_and_the_field(change, expected):
    raw = sched(**{k: v for k, v in change.items() if k in ("cron", "tz", "name", "job")})
    raw.update({k: v for k, v in change.items() if k not in ("cron", "tz", "name", "job")})
    with pytest.raises(SpecError) as e:
        parse_schedules({"schedules": [raw]}, source="schedules.yaml")
    assert str(e.value).startswith("schedules.yaml: ") and expected in str(e.value), str(e.value)


@pytest.mark.parametrize(("expr", "expected"), [
    ("*/61 * * * *", "minute step /61 is out of range (1-59)"),
    ("*/60 * * * *", "minute step /60 is out of range (1-59)"),
    ("0-59/90 * * * *", "minute step /90 is out of range (1-59)"),
    ("0 */24 * * *", "hour step /24 is out of range (1-23)"),
    ("0 0 */32 * *", "day-of-month step /32 is out of range (1-31)"),
    ("0 0 * */13 *", "month step /13 is out of range (1-12)"),
    ("0 0 * * */8", "day-of-week step /8 is out of range (1-7)"),
    ("* * * * * */61", "second step /61 is out of range (1-59)"),
    ("70 * * * *", "minute 70 is out of range (0-59)"),
    ("5-70 * * * *", "minute 70 is out of range (0-59)"),
    ("0 0 0 * *", "day-of-month 0 is out of range (1-31)"),
    ("0 0 * 13 *", "month 13 is out of range (1-12)"),
    ("0 0 * * 8", "day-of-week 8 is out of range (0-7)"),
    ("1,2,99 * * * *", "minute 99 is out of range (0-59)"),
])
def test_cron_fields_out_of_range_are_refused_naming_the_field(expr, expected):
    with pytest.raises(ValueError) as e:
        Cron.parse(expr)
    assert str(e.value) == f"cron: {expr!r}: {expected}"
    with pytest.raises(SpecError, match=r"schedule 'brief': cron: .*out of range"):
        parse_schedules({"schedules": [sched(cron=expr)]})


@pytest.mark.parametrize("expr", ["*/59 * * * *", "0 */23 * * *", "0 0 */31 * *", "0 0 * */12 *", "0 0 * * */7",
                                  "0 0 * * 7", "0-30/15 9-17 * jan-mar mon-fri", "0 0 L * *", "0 0 * * 1#2",
                                  "* * * * * */5", "@daily", "0 12 1,15 * *"])
def test_cron_fields_in_range_are_accepted(expr):
    assert Cron.parse(expr).next_after(at("2026-05-01T00:00:00Z")) is not None


def test_the_same_name_twice_and_a_file_that_is_not_a_list_are_refused(tmp_path):
    with pytest.raises(SpecError, match="schedule 'brief': the name is used twice"):
        parse_schedules({"schedules": [sched(), sched(cron="0 8 * * *")]})
    (tmp_path / "s.yaml").write_text("schedules: {brief: 1}\n")
    with pytest.raises(SpecError, match="expected a list of schedules"):
        load_schedules_file(tmp_path / "s.yaml")


# ---- slots and daylight saving (Europe/London: 2026-03-29 01:00 GMT -> 02:00 BST, 2026-10-25 back) ----

def test_a_fixed_time_in_the_spring_forward_gap_fires_once_at_the_jump():
    assert slots("30 1 * * *", "Europe/London", "2026-03-27T12:00:00Z", "2026-03-30T12:00:00Z") == [
        "2026-03-28T01:30:00Z",  # 01:30 GMT
        "2026-03-29T01:00:00Z",  # 01:30 does not exist: 02:00 BST, when the clocks jumped
        "2026-03-30T00:30:00Z",  # 01:30 BST
    ]


def test_a_wildcard_schedule_skips_the_wall_times_that_do_not_exist():
    assert slots("15 * * * *", "Europe/London", "2026-03-28T23:00:00Z", "2026-03-29T03:00:00Z") == [
        "2026-03-28T23:15:00Z", "2026-03-29T00:15:00Z", "2026-03-29T01:15:00Z", "2026-03-29T02:15:00Z"]


def test_a_fixed_time_in_the_repeated_hour_fires_once_in_the_first_pass():
    assert slots("30 1 * * *", "Europe/London", "2026-10-23T12:00:00Z", "2026-10-26T12:00:00Z") == [
        "2026-10-24T00:30:00Z", "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]


def test_a_wildcard_schedule_fires_in_both_passes_of_the_repeated_hour():
    got = slots("*/30 * * * *", "Europe/London", "2026-10-24T23:00:00Z", "2026-10-25T02:00:00Z")
    assert got == ["2026-10-24T23:30:00Z", "2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z",
                   "2026-10-25T01:00:00Z", "2026-10-25T01:30:00Z", "2026-10-25T02:00:00Z"]
    tz = Cron.parse("*/30 * * * *", "Europe/London").tz
    want = ["00:30", "01:00", "01:30", "01:00", "01:30", "02:00"]
    assert [at(s).astimezone(tz).strftime("%H:%M") for s in got] == want


def test_newest_latest_next_and_a_seconds_field():
    c = Cron.parse("0 7 * * *", "Europe/London")
    assert [slot_str(s) for s in c.slots(at("2026-06-01T00:00:00Z"), at("2026-06-05T12:00:00Z"), newest=2)] == \
        ["2026-06-04T06:00:00Z", "2026-06-05T06:00:00Z"]
    assert slot_str(c.latest(at("2026-12-01T06:59:59Z"))) == "2026-11-30T07:00:00Z"
    assert slot_str(c.next_after(at("2026-03-28T07:00:00Z"))) == "2026-03-29T06:00:00Z"
    assert slots("* * * * * */5", "UTC", "2026-01-01T00:00:00Z", "2026-01-01T00:00:16Z") == [
        "2026-01-01T00:00:05Z", "2026-01-01T00:00:10Z", "2026-01-01T00:00:15Z"]


# ---- firing -----------------------------------------------------------------------------------

def test_each_slot_fires_one_job_keyed_by_schedule_and_slot_with_the_date_rendered(client):
    define(client, sched(tz="Europe/London", job={"model": "tiny", "metadata": {"edition": "{date:%d %b}"},
                                                  "items": [{"custom_id": "b-{date}", "prompt": "Briefing for "
                                                             "{date:%A %d %B} ({slot}, {name}) {not a field}"}]}),
           now="2026-03-28T12:00:00Z")
    fired = fire_due(client, at("2026-03-29T06:00:30Z"))
    assert [(f.slot, f.outcome.value) for f in fired] == [("2026-03-29T06:00:00Z", "submitted")]
    assert fire_due(client, at("2026-03-29T06:00:45Z")) == []  # the next tick: nothing new
    assert job_keys(client) == ["schedule:brief:2026-03-29T06:00:00Z"]
    job = client.status(fired[0].job_id)
    assert prompts(client, job.id) == ["Briefing for Sunday 29 March (2026-03-29T06:00:00Z, brief) {not a field}"]
    assert job.metadata == {"edition": "29 Mar", "schedule": "brief", "slot": "2026-03-29T06:00:00Z"}
    with client.db.session() as s:
        assert list(s.scalars(select(Item.custom_id).where(Item.job_id == job.id))) == ["b-2026-03-29"]


def test_a_template_with_reuse_fires_jobs_with_the_option_and_without_it_by_default(client):
    define(client, sched(name="daily", job={"model": "tiny", "seed": 3, "reuse": True, "items": ["Same every day"]}),
           sched(name="plain", job={"model": "tiny", "items": ["x"]}), now="2026-03-28T12:00:00Z")
    fired = {f.job_id: f for f in fire_due(client, at("2026-03-29T07:00:30Z"))}
    with client.db.session() as s:
        rows = s.execute(select(Job.meta["schedule"].as_string(), Job.reuse).where(Job.id.in_(list(fired))))
        flags = dict(rows.all())
    assert flags == {"daily": True, "plain": False}


def test_a_second_scheduler_at_the_same_moment_creates_no_second_job(client, sqlite_settings):
    define(client, sched(cron="*/10 * * * *", max_concurrent=5), now="2026-05-01T09:55:00Z")
    other = Client(sqlite_settings)
    first = fire_due(client, at("2026-05-01T10:00:01Z"))
    second = fire_due(other, at("2026-05-01T10:00:02Z"))
    assert [f.outcome.value for f in first] == ["submitted"] and second == []
    assert runs(client, "brief") == [("2026-05-01T10:00:00Z", "submitted", first[0].job_id)]
    assert job_keys(client) == ["schedule:brief:2026-05-01T10:00:00Z"]


def test_a_new_schedule_does_not_fire_slots_from_before_it_existed(client):
    define(client, sched(catchup="all"), now="2026-05-01T12:00:00Z")
    assert fire_due(client, at("2026-05-01T12:00:10Z")) == []
    assert [f.slot for f in fire_due(client, at("2026-05-02T07:00:05Z"))] == ["2026-05-02T07:00:00Z"]


@pytest.mark.parametrize(("policy", "expected"), [
    ({"catchup": "none"}, []),
    ({"catchup": "latest"}, ["2026-05-05T07:00:00Z"]),
    ({"catchup": "all", "catchup_cap": 3}, ["2026-05-03T07:00:00Z", "2026-05-04T07:00:00Z", "2026-05-05T07:00:00Z"]),
])
def test_catch_up_after_the_scheduler_was_down_for_days(client, policy, expected):
    define(client, sched(max_concurrent=10, **policy), now="2026-05-01T06:00:00Z")
    fired = fire_due(client, at("2026-05-05T09:00:00Z"))  # down since before the 1 May slot
    assert [f.slot for f in fired] == expected
    assert all(f.outcome == RunOutcome.submitted for f in fired)
    assert [f.slot for f in fire_due(client, at("2026-05-05T09:00:15Z"))] == []  # missed slots stay passed over
    assert [f.slot for f in fire_due(client, at("2026-05-06T07:00:20Z"))] == ["2026-05-06T07:00:00Z"]


def test_catch_up_none_still_fires_a_slot_that_is_due_within_the_grace_period(client):
    define(client, sched(cron="*/5 * * * *", catchup="none", max_concurrent=10), now="2026-05-01T10:00:00Z")
    assert [f.slot for f in fire_due(client, at("2026-05-01T10:20:40Z"), grace_s=60)] == ["2026-05-01T10:20:00Z"]
    assert [f.slot for f in fire_due(client, at("2026-05-01T10:27:00Z"), grace_s=60)] == []  # 10:25 is 2 min late


def test_a_slot_is_skipped_while_the_previous_job_is_open_and_fires_once_it_ended(client):
    define(client, sched(cron="0 * * * *"), now="2026-05-01T09:30:00Z")
    (first,) = fire_due(client, at("2026-05-01T10:00:05Z"))
    (second,) = fire_due(client, at("2026-05-01T11:00:05Z"))
    assert (second.outcome, second.job_id) == (RunOutcome.skipped_overlap, None)
    assert "max_concurrent 1" in second.error
    client.cancel(first.job_id)  # the job is final now
    (third,) = fire_due(client, at("2026-05-01T12:00:05Z"))
    assert third.outcome == RunOutcome.submitted
    assert [r[1] for r in runs(client, "brief")] == ["submitted", "skipped_overlap", "submitted"]


def test_a_paused_schedule_fires_nothing_and_resume_does_not_catch_up_the_pause(client):
    define(client, sched(cron="0 * * * *", catchup="all", catchup_cap=10, max_concurrent=10),
           now="2026-05-01T09:30:00Z")
    assert len(fire_due(client, at("2026-05-01T10:00:05Z"))) == 1
    pause(client.db, "brief", now=at("2026-05-01T10:10:00Z"))
    assert fire_due(client, at("2026-05-01T13:00:05Z")) == []
    assert schedule_views(client.db, now=at("2026-05-01T13:00:05Z"))[0]["state"] == "paused"
    define(client, sched(cron="0 * * * *", catchup="all", catchup_cap=10, max_concurrent=10),
           now="2026-05-01T13:10:00Z")  # a re-sync of the file keeps the pause
    assert fire_due(client, at("2026-05-01T13:20:00Z")) == []
    view = resume(client.db, "brief", now=at("2026-05-01T13:30:00Z"))
    assert (view["state"], view["last_slot"], view["next_slot"]) == ("active", "2026-05-01T13:00:00Z",
                                                                     "2026-05-01T14:00:00Z")
    assert fire_due(client, at("2026-05-01T13:40:00Z")) == []
    assert [f.slot for f in fire_due(client, at("2026-05-01T14:00:03Z"))] == ["2026-05-01T14:00:00Z"]
    assert [r[0] for r in runs(client, "brief")] == ["2026-05-01T10:00:00Z", "2026-05-01T14:00:00Z"]


def test_run_now_fires_a_paused_schedule_once_even_over_max_concurrent(client):
    define(client, sched(cron="0 * * * *"), now="2026-05-01T09:30:00Z")
    fire_due(client, at("2026-05-01T10:00:05Z"))  # its job stays open: max_concurrent is reached
    pause(client.db, "brief")
    f = run_now(client, "brief", now=at("2026-05-01T10:17:42.5Z"))
    assert (f.slot, f.outcome) == ("2026-05-01T10:17:42Z", RunOutcome.submitted)
    again = run_now(client, "brief", now=at("2026-05-01T10:17:42.9Z"))  # the same second: the same run
    assert again.job_id == f.job_id and len(job_keys(client)) == 2
    detail = schedule_detail(client.db, "brief")
    assert [(r["slot"], r["manual"], r["job_status"]) for r in detail["runs"]] == [
        ("2026-05-01T10:17:42Z", True, "queued"), ("2026-05-01T10:00:00Z", False, "queued")]


def test_a_bad_template_records_a_failed_run_and_later_slots_still_fire(client):
    define(client, sched(cron="0 * * * *", job={"model": "no-such-model", "items": ["x"]}), now="2026-05-01T09:30:00Z")
    (f,) = fire_due(client, at("2026-05-01T10:00:05Z"))
    assert f.outcome == RunOutcome.failed and "no-such-model" in f.error
    assert [x.outcome for x in fire_due(client, at("2026-05-01T11:00:05Z"))] == [RunOutcome.failed]
    assert job_keys(client) == []


def test_a_run_left_pending_by_a_dead_scheduler_is_taken_over_and_keeps_its_job(client):
    define(client, sched(cron="0 * * * *", max_concurrent=10), now="2026-05-01T09:30:00Z")
    key = "schedule:brief:2026-05-01T10:00:00Z"
    submitted = client.submit("text", model="tiny", items=["Briefing for Friday 01 May"], idempotency_key=key,
                              metadata={"schedule": "brief", "slot": "2026-05-01T10:00:00Z"})
    with client.db.session() as s:  # it claimed the slot and submitted, then died before recording the job
        s.add(ScheduleRun(schedule="brief", slot="2026-05-01T10:00:00Z", outcome=RunOutcome.pending,
                          updated_at=utcnow() - timedelta(hours=1)))
        s.query(Schedule).update({"last_slot": "2026-05-01T10:00:00Z"})
    fired = fire_due(client, at("2026-05-01T10:20:00Z"), stale_s=300)
    assert [(f.slot, f.outcome.value, f.job_id) for f in fired] == [("2026-05-01T10:00:00Z", "submitted",
                                                                     submitted.id)]
    assert job_keys(client) == [key]
    assert "the first job stands" in fired[0].error  # its items differ from the template's rendering


def test_a_transient_failure_leaves_the_slot_pending_and_a_later_tick_submits_it(client, monkeypatch):
    from aigc_core.errors import StorageError

    define(client, sched(cron="0 * * * *"), now="2026-05-01T09:30:00Z")
    real_submit = client.submit
    monkeypatch.setattr(client, "submit", lambda *a, **k: (_ for _ in ()).throw(StorageError("S3 is away")))
    (f,) = fire_due(client, at("2026-05-01T10:00:05Z"))
    assert (f.outcome, runs(client, "brief")) == (RunOutcome.pending, [("2026-05-01T10:00:00Z", "pending", None)])
    assert fire_due(client, at("2026-05-01T10:00:20Z"), stale_s=300) == []  # not stale yet: left alone
    monkeypatch.setattr(client, "submit", real_submit)
    (g,) = fire_due(client, at("2026-05-01T10:00:40Z"), stale_s=0)
    assert (g.slot, g.outcome) == ("2026-05-01T10:00:00Z", RunOutcome.submitted)
    assert job_keys(client) == ["schedule:brief:2026-05-01T10:00:00Z"]


def test_a_fresh_pending_claim_is_left_to_its_owner(client):
    define(client, sched(cron="0 * * * *", max_concurrent=10), now="2026-05-01T09:30:00Z")
    with client.db.session() as s:
        s.add(ScheduleRun(schedule="brief", slot="2026-05-01T10:00:00Z", outcome=RunOutcome.pending))
    assert fire_due(client, at("2026-05-01T10:00:30Z"), stale_s=300) == []
    assert job_keys(client) == []


def test_an_items_file_is_read_at_each_firing(client, tmp_path):
    items = tmp_path / "items.jsonl"
    (tmp_path / "s.yaml").write_text("schedules:\n  - name: digest\n    cron: '0 * * * *'\n    max_concurrent: 9\n"
                                     "    job: {model: tiny, items_file: items.jsonl}\n")
    sync_schedules(client.db, load_schedules_file(tmp_path / "s.yaml"), now=at("2026-05-01T09:30:00Z"))
    items.write_text('{"custom_id": "a", "prompt": "News at {date:%H:%M}"}\n')
    (a,) = fire_due(client, at("2026-05-01T10:00:05Z"))
    items.write_text('{"custom_id": "a", "prompt": "Later news at {date:%H:%M}"}\n{"custom_id": "b", "prompt": "b"}\n')
    (b,) = fire_due(client, at("2026-05-01T11:00:05Z"))
    assert prompts(client, a.job_id) == ["News at 10:00"]
    assert prompts(client, b.job_id) == ["Later news at 11:00", "b"]
    items.unlink()
    (c,) = fire_due(client, at("2026-05-01T12:00:05Z"))
    assert c.outcome == RunOutcome.failed and "does not exist" in c.error


def test_firing_across_both_dst_changes_makes_one_job_per_real_slot(client):
    """Ticks every 10 minutes through both London changes: keys are UTC slots, one job each."""
    define(client, sched("daily", cron="30 1 * * *", tz="Europe/London", catchup="all", max_concurrent=99,
                         job={"model": "tiny", "items": ["Daily at {date:%H:%M %Z}"]}),
           sched("halfhourly", cron="*/30 * * * *", tz="Europe/London", catchup="all", max_concurrent=99,
                 job={"model": "tiny", "items": ["Half-hourly at {date:%H:%M %Z}"]}),
           now="2026-03-28T23:50:00Z")
    fired = []
    for start, end in (("2026-03-28T23:50:00Z", "2026-03-29T02:30:00Z"),
                       ("2026-10-24T23:20:00Z", "2026-10-25T02:10:00Z")):
        if start.startswith("2026-10"):
            for name in ("daily", "halfhourly"):  # as if the schedules were paused all summer
                pause(client.db, name, now=at(start))
                resume(client.db, name, now=at(start))
        t = at(start)
        while t <= at(end):
            fired += fire_due(client, t)
            t += timedelta(minutes=10)
    by = {n: [(f.slot, prompts(client, f.job_id)[0].split(" at ")[1]) for f in fired if f.schedule == n]
          for n in ("daily", "halfhourly")}
    assert by["daily"] == [("2026-03-29T01:00:00Z", "02:00 BST"), ("2026-10-25T00:30:00Z", "01:30 BST")]
    assert by["halfhourly"] == [
        ("2026-03-29T00:00:00Z", "00:00 GMT"), ("2026-03-29T00:30:00Z", "00:30 GMT"),
        ("2026-03-29T01:00:00Z", "02:00 BST"), ("2026-03-29T01:30:00Z", "02:30 BST"),
        ("2026-03-29T02:00:00Z", "03:00 BST"), ("2026-03-29T02:30:00Z", "03:30 BST"),
        ("2026-10-24T23:30:00Z", "00:30 BST"), ("2026-10-25T00:00:00Z", "01:00 BST"),
        ("2026-10-25T00:30:00Z", "01:30 BST"), ("2026-10-25T01:00:00Z", "01:00 GMT"),
        ("2026-10-25T01:30:00Z", "01:30 GMT"), ("2026-10-25T02:00:00Z", "02:00 GMT")]
    assert len(job_keys(client)) == len(set(job_keys(client))) == 14


def test_sync_updates_definitions_and_disables_schedules_removed_from_the_file(client):
    define(client, sched(), sched("extra", cron="0 9 * * *"), now="2026-05-01T00:00:00Z")
    result = sync_schedules(client.db, parse_schedules({"schedules": [sched(cron="0 8 * * *")]}),
                            now=at("2026-05-02T00:00:00Z"))
    assert result == {"brief": "updated", "extra": "disabled (not in the file)"}
    views = {v["name"]: v for v in schedule_views(client.db, now=at("2026-05-02T00:00:00Z"))}
    assert (views["brief"]["cron"], views["brief"]["state"], views["extra"]["state"]) == ("0 8 * * *", "active",
                                                                                          "disabled")
    assert views["brief"]["last_slot"] == "2026-05-01T08:00:00Z"  # a new cron starts from the change
    assert [f.schedule for f in fire_due(client, at("2026-05-03T09:00:05Z"))] == ["brief"]
    define(client, sched(cron="0 8 * * *"), sched("extra", cron="0 9 * * *"), now="2026-05-05T10:00:00Z")
    # enabled again in the file: the slots while it was disabled are passed over
    extra = {v["name"]: v for v in schedule_views(client.db, now=at("2026-05-05T10:00:00Z"))}["extra"]
    assert (extra["state"], extra["last_slot"]) == ("active", "2026-05-05T09:00:00Z")


# ---- the command line -------------------------------------------------------------------------

def test_schedules_commands_list_show_pause_resume_and_run_now(tmp_path, tiny_text_model):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_") and k not in ("COLUMNS", "LINES")}
    env.update(AIGC_DATABASE_URL=f"sqlite:///{tmp_path}/a.db", AIGC_STORAGE_URL=f"file://{tmp_path}/data",
               AIGC_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200")
    aigc = [sys.executable, "-m", "scheduler.cli"]

    def run(*args):
        return subprocess.run([*aigc, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert run("models", "register", "tiny", tiny_text_model.as_uri()).returncode == 0
    (tmp_path / "bad.yaml").write_text(
        "schedules:\n  - {name: brief, cron: '0 7 * *', job: {model: tiny, items: [x]}}\n")
    bad = run("schedules", "sync", "bad.yaml")
    assert bad.returncode == 2 and "schedule 'brief': cron:" in bad.stderr
    (tmp_path / "s.yaml").write_text("schedules:\n  - {name: brief, cron: '0 7 * * *', timezone: Europe/London, "
                                     "job: {model: tiny, items: ['Briefing for {date:%A}']}}\n")
    assert "brief: created" in run("schedules", "sync", "s.yaml").stdout
    assert "paused" in run("schedules", "pause", "brief").stdout
    assert json.loads(run("schedules", "list", "--json").stdout)[0]["state"] == "paused"
    now = run("schedules", "run-now", "brief")
    assert now.returncode == 0 and "submitted" in now.stdout
    job_id = now.stdout.split()[0]
    assert "active; next slot" in run("schedules", "resume", "brief").stdout
    shown = run("schedules", "show", "brief")
    assert job_id in shown.stdout and "(run-now)" in shown.stdout and "submitted" in shown.stdout
    assert run("schedules", "show", "nope").returncode == 1


def test_scheduler_without_a_broker_ticks_in_a_loop(tmp_path, tiny_text_model):
    """``aigc scheduler`` with no AIGC_BROKER_URL: no beat, the same tick in a plain loop."""
    from aigc_core.settings import Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path}/a.db", storage_url=f"file://{tmp_path}/data",
                        broker_url=None)
    Client(settings).register_model("tiny", "text", tiny_text_model.as_uri())
    (tmp_path / "s.yaml").write_text('schedules:\n  - {name: fast, cron: "* * * * * *", catchup: all, '
                                     'max_concurrent: 100, job: {model: tiny, items: ["At {date:%H:%M:%S}"]}}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")}
    env.update(AIGC_DATABASE_URL=settings.database_url, AIGC_STORAGE_URL=settings.storage_url,
               AIGC_SCHEDULES_FILE=str(tmp_path / "s.yaml"), AIGC_SCHEDULER_TICK_S="0.5")
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.cli", "scheduler"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = Client(settings)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None and \
                sum(r[1] == "submitted" for r in runs(client, "fast")) < 3:
            time.sleep(0.2)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    done = [r for r in runs(client, "fast") if r[1] == "submitted"]  # the last may be cut off mid-submit
    assert len(done) >= 3 and len(job_keys(client)) >= 3, output[-2000:]
    assert "no AIGC_BROKER_URL" in output


def test_sync_of_another_file_disables_nothing_unless_asked_with_prune(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_") and k not in ("COLUMNS", "LINES")}
    env.update(AIGC_DATABASE_URL=f"sqlite:///{tmp_path}/a.db", AIGC_STORAGE_URL=f"file://{tmp_path}/data",
               AIGC_CACHE_DIR=str(tmp_path / "cache"))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "scheduler.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    job = "job: {kind: audio, model: espeak-en, items: ['Briefing']}"
    (tmp_path / "s.yaml").write_text("schedules:\n" + "".join(
        f"  - {{name: {n}, cron: '0 7 * * *', {job}}}\n" for n in ("brief", "extra", "third")))
    (tmp_path / "other.yaml").write_text(f"schedules:\n  - {{name: brief, cron: '0 8 * * *', {job}}}\n")
    assert run("schedules", "sync", "s.yaml").returncode == 0

    r = run("schedules", "sync", "other.yaml")
    assert r.returncode == 0, r.stderr
    assert "brief: updated" in r.stdout and "disabled" not in r.stdout
    assert "2 schedules in the database are not in other.yaml (extra, third)" in r.stderr
    assert "--prune" in r.stderr
    states = {v["name"]: v["state"] for v in json.loads(run("schedules", "list", "--json").stdout)}
    assert states == {"brief": "active", "extra": "active", "third": "active"}

    r = run("schedules", "sync", "other.yaml", "--prune")
    assert r.returncode == 0, r.stderr
    assert "extra: disabled (not in the file)" in r.stdout and "third: disabled (not in the file)" in r.stdout
    states = {v["name"]: v["state"] for v in json.loads(run("schedules", "list", "--json").stdout)}
    assert states == {"brief": "active", "extra": "disabled", "third": "disabled"}
