"""Real ``aigc scheduler`` processes (Celery beat + the tick worker) against PostgreSQL and Redis.

Cron has minute resolution, so these schedules use croniter's sixth field, seconds
(``* * * * * */2``: every two seconds) and the processes tick every second
(``AIGC_SCHEDULER_TICK_S=1``). Daylight saving cannot be waited for: the DST test drives
``fire_due`` from four threads at once with fake clocks stepping through the fall-back night, on
the same PostgreSQL, so the claim races are real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select, text, update

from aigc_core.schema import Job, RunOutcome, Schedule, ScheduleRun
from scheduler import Client
from scheduler.cron.rules import parse_slot, slot_str
from scheduler.cron.schedules import fire_due, parse_schedules, sync_schedules
from tests.support.workers import ServiceProc

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
AIGC = shutil.which("aigc", path=str(Path(sys.executable).parent))


SchedulerProc = ServiceProc  # an `aigc scheduler` process


@pytest.fixture
def env(deploy_env, deploy_client, tmp_path) -> dict[str, str]:
    """The deployment's settings with a one-second tick; no schedules left from another test."""
    with deploy_client.db.session() as s:
        s.execute(text("TRUNCATE schedule_runs, schedules RESTART IDENTITY CASCADE"))
    return {**deploy_env, "AIGC_SCHEDULER_TICK_S": "1", "AIGC_RECONCILE_EVERY_S": "5",
            "AIGC_SCHEDULER_GRACE_S": "5"}


@pytest.fixture
def schedulers(env, tmp_path):
    """Start ``aigc scheduler`` processes (all at once), each in its own process group; stopped at the end."""
    started: list[SchedulerProc] = []

    def start(n: int = 1, **extra: str) -> list[SchedulerProc]:
        procs = []
        for _ in range(n):
            log_path = tmp_path / f"scheduler-{len(started)}.log"
            cmd = [AIGC, "scheduler"] if AIGC else [sys.executable, "-m", "scheduler.cli", "scheduler"]
            p = SchedulerProc(subprocess.Popen(cmd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                                               env={**os.environ, **env, **extra, "PYTHONUNBUFFERED": "1"},
                                               cwd=tmp_path, start_new_session=True), log_path)
            started.append(p)
            procs.append(p)
        deadline = time.monotonic() + 60
        for p in procs:
            while " ready." not in p.log():
                assert p.proc.poll() is None, f"aigc scheduler exited {p.proc.returncode}:\n{p.log()[-3000:]}"
                assert time.monotonic() < deadline, f"aigc scheduler not ready:\n{p.log()[-3000:]}"
                time.sleep(0.1)
        return procs

    yield start
    for p in started:
        p.stop()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [AIGC, *args] if AIGC else [sys.executable, "-m", "scheduler.cli", *args]
    return subprocess.run(cmd, env={**os.environ, **env, "COLUMNS": "200"}, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def runs(client, name: str) -> list[ScheduleRun]:
    with client.db.session() as s:
        return list(s.scalars(select(ScheduleRun).where(ScheduleRun.schedule == name).order_by(ScheduleRun.slot)))


def keyed_jobs(client, name: str) -> dict[str, str]:
    with client.db.session() as s:
        rows = s.execute(select(Job.idempotency_key, Job.id).where(Job.idempotency_key.like(f"schedule:{name}:%")))
        return {k: i for k, i in rows}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_two_schedulers_at_once_create_exactly_one_job_per_slot(env, deploy_client, schedulers, s3_server, s3_bucket,
                                                                 tmp_path):
    c = deploy_client
    s3_server.client().put_object(Bucket=s3_bucket, Key="inputs/briefing.jsonl",
                                  Body=b'{"custom_id": "brief", "prompt": "Briefing for {date:%A %d %B %H:%M:%S}"}\n')
    (tmp_path / "schedules.yaml").write_text(f"""
schedules:
  - name: every2s
    cron: "* * * * * */2"
    timezone: Europe/London
    catchup: all
    max_concurrent: 1000
    job: {{model: tiny, items_file: "s3://{s3_bucket}/inputs/briefing.jsonl", params: {{max_new_tokens: 4}}}}
  - name: overlap
    cron: "* * * * * */2"
    job: {{model: tiny, items: ["Overlap at {{date:%H:%M:%S}}"]}}
""")
    a, b = schedulers(2, AIGC_SCHEDULES_FILE=str(tmp_path / "schedules.yaml"))
    wait_for(lambda: len(runs(c, "every2s")) >= 5, 30, "five slots of every2s")
    a.stop()
    b.stop()

    every = runs(c, "every2s")
    assert all(r.outcome == RunOutcome.submitted for r in every), [(r.slot, r.outcome, r.error) for r in every]
    slots = [parse_slot(r.slot) for r in every]
    assert slots == [slots[0] + timedelta(seconds=2 * i) for i in range(len(slots))]  # none lost, none twice
    jobs = keyed_jobs(c, "every2s")
    assert jobs == {f"schedule:every2s:{r.slot}": r.job_id for r in every}  # one job per slot, and no other
    first = c.status(every[0].job_id)
    assert first.metadata["slot"] == every[0].slot
    with c.db.session() as s:
        prompt = s.scalar(text("SELECT prompt FROM items WHERE job_id = :j"), {"j": first.id})
    assert prompt == "Briefing for " + slots[0].astimezone(ZoneInfo("Europe/London")).strftime("%A %d %B %H:%M:%S")

    overlap = runs(c, "overlap")
    assert overlap[0].outcome == RunOutcome.submitted and len(overlap) >= 3
    assert {r.outcome for r in overlap[1:]} == {RunOutcome.skipped_overlap}  # its first job is still queued
    assert list(keyed_jobs(c, "overlap")) == [f"schedule:overlap:{overlap[0].slot}"]

    for p in (a, b):  # both beats sent ticks and both processes ran some
        assert "Sending due task schedules-tick" in p.log()
        assert "scheduler.tick[" in p.log() and "succeeded" in p.log()


def test_catch_up_after_a_scheduler_was_down_none_latest_and_all_with_a_cap(env, deploy_client, schedulers):
    c = deploy_client
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=15)
    cron = f"* * * * * {base.second}"  # once a minute; the newest slot was 15 s ago, the next is 45 s away
    job = {"model": "tiny", "items": ["Catch-up for {date:%H:%M:%S}"]}
    defs = parse_schedules({"schedules": [
        {"name": p, "cron": cron, "catchup": p.split("-")[0], "catchup_cap": 3, "max_concurrent": 10, "job": job}
        for p in ("none", "latest", "all-3")]})
    sync_schedules(c.db, defs)
    with c.db.session() as s:  # the last scheduler stopped 200 s ago: four slots were missed
        s.execute(update(Schedule).values(last_slot=slot_str(base - timedelta(seconds=200))))
    schedulers(1)  # no schedules file: the schedules are already in the database
    wait_for(lambda: len(runs(c, "all-3")) == 3 and len(runs(c, "latest")) == 1, 20, "the catch-up runs")
    time.sleep(2)  # two more ticks: nothing else may fire

    assert runs(c, "none") == []
    assert [r.slot for r in runs(c, "latest")] == [slot_str(base)]
    assert [r.slot for r in runs(c, "all-3")] == [slot_str(base - timedelta(seconds=s)) for s in (120, 60, 0)]
    with c.db.session() as s:  # every policy moved its cursor past the missed slots
        assert set(s.scalars(select(Schedule.last_slot))) == {slot_str(base)}
    with c.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 4


def test_pause_run_now_and_resume_from_the_cli_while_a_scheduler_runs(env, deploy_client, schedulers, tmp_path):
    c = deploy_client
    (tmp_path / "schedules.yaml").write_text(
        'schedules:\n  - {name: ticker, cron: "* * * * * */2", catchup: all, catchup_cap: 50, max_concurrent: 1000,'
        ' job: {model: tiny, items: ["Ticker {date:%H:%M:%S}"]}}\n')
    schedulers(1, AIGC_SCHEDULES_FILE=str(tmp_path / "schedules.yaml"))
    wait_for(lambda: len(runs(c, "ticker")) >= 2, 20, "two slots")

    assert cli(env, "schedules", "pause", "ticker").returncode == 0
    paused_at = datetime.now(UTC)
    time.sleep(4)
    assert max(parse_slot(r.slot) for r in runs(c, "ticker")) <= paused_at
    now = cli(env, "schedules", "run-now", "ticker")
    assert now.returncode == 0 and "submitted" in now.stdout, now.stdout + now.stderr
    manual = [r for r in runs(c, "ticker") if r.manual]
    assert len(manual) == 1 and manual[0].job_id == now.stdout.split()[0]

    resumed_at = datetime.now(UTC).replace(microsecond=0)
    assert cli(env, "schedules", "resume", "ticker").returncode == 0
    wait_for(lambda: sum(parse_slot(r.slot) > resumed_at for r in runs(c, "ticker") if not r.manual) >= 2, 20,
             "two slots after resume")
    cron_slots = [parse_slot(r.slot) for r in runs(c, "ticker") if not r.manual]
    assert not [s for s in cron_slots if paused_at < s <= resumed_at]  # the pause is not caught up
    assert len(keyed_jobs(c, "ticker")) == len(runs(c, "ticker"))
    shown = cli(env, "schedules", "show", "ticker").stdout
    assert "(run-now)" in shown and "active" in shown and manual[0].job_id in shown


def test_four_schedulers_racing_through_the_fall_back_night_make_one_job_per_slot(env, deploy_client,
                                                                                   deploy_settings):
    c = deploy_client
    job = {"model": "tiny", "items": ["At {date:%H:%M %Z}"]}
    sync_schedules(c.db, parse_schedules({"schedules": [
        {"name": "daily", "cron": "30 1 * * *", "timezone": "Europe/London", "catchup": "all",
         "max_concurrent": 99, "job": job},
        {"name": "halfhourly", "cron": "*/30 * * * *", "timezone": "Europe/London", "catchup": "all",
         "max_concurrent": 99, "job": job}]}), now=datetime(2026, 10, 24, 23, 10, tzinfo=UTC))
    clients = [Client(deploy_settings) for _ in range(4)]
    ticks = [datetime(2026, 10, 24, 23, 10, tzinfo=UTC) + timedelta(minutes=10 * i) for i in range(19)]
    barrier = threading.Barrier(len(clients))
    fired: list = []
    errors: list = []

    def scheduler(client):
        try:
            for t in ticks:
                barrier.wait(30)
                fired.extend(fire_due(client, t))
        except Exception as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=scheduler, args=(cl,)) for cl in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors

    expected = {
        "daily": ["2026-10-25T00:30:00Z"],  # 01:30 BST; not again at 01:30 GMT
        "halfhourly": ["2026-10-24T23:30:00Z", "2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z",
                       "2026-10-25T01:00:00Z", "2026-10-25T01:30:00Z", "2026-10-25T02:00:00Z"],
    }
    for name, want in expected.items():
        assert [r.slot for r in runs(c, name)] == want
        assert all(r.outcome == RunOutcome.submitted for r in runs(c, name))
        assert sorted(keyed_jobs(c, name)) == [f"schedule:{name}:{s}" for s in want]
        assert sorted(f.slot for f in fired if f.schedule == name) == want  # each slot fired by one thread only
