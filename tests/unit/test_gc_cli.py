"""``aigc gc`` from the shell: a dry run, then the real thing, with objects; a bad age is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

from aigc_core.db import Database
from aigc_core.jobs import job_prefix
from aigc_core.storage import LocalStore
from tests.support.retention_rows import make_job, rows_of


def test_aigc_gc_dry_run_then_removes_old_jobs_and_their_objects(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/a.db")
    db.ensure_schema()
    store = LocalStore(tmp_path / "data")
    old, recent = make_job(db, store, items=4), make_job(db, store, age=timedelta(days=3))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_") and k not in ("COLUMNS", "LINES")}
    env.update(AIGC_DATABASE_URL=f"sqlite:///{tmp_path}/a.db", AIGC_STORAGE_URL=f"file://{tmp_path}/data",
               AIGC_CACHE_DIR=str(tmp_path / "cache"))

    def aigc(*args):
        return subprocess.run([sys.executable, "-m", "scheduler.cli", "gc", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    dry = aigc("--older-than", "30d", "--objects", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 1 jobs" in dry.stdout and "4 items" in dry.stdout
    assert rows_of(db, old)["items"] == 4 and list(store.list(f"{job_prefix(old)}/"))

    done = aigc("--older-than", "30d", "--objects")
    assert done.returncode == 0, done.stderr
    assert "removed 1 jobs" in done.stdout and "10 objects" in done.stdout  # 4 outputs, 4 sidecars, 2 manifests
    assert rows_of(db, old)["jobs"] == 0 and list(store.list(f"{job_prefix(old)}/")) == []
    assert rows_of(db, recent)["items"] == 3

    bad = aigc("--older-than", "a month")
    assert bad.returncode != 0 and "unit" in (bad.stdout + bad.stderr)


def test_aigc_gc_orphans_removes_prefixes_of_jobs_the_database_no_longer_has(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/a.db")
    db.ensure_schema()
    store = LocalStore(tmp_path / "data")
    kept = make_job(db, store, items=2, age=timedelta(days=3))  # a known, recent job: untouched
    gone = make_job(db, store, items=3)
    fresh_orphan = "f" * 32
    store.put(f"{job_prefix(fresh_orphan)}/items/000000.tok.txt", b"a zombie's late PUT, just now")
    store.put("jobs/not-a-job-id/x.txt", b"nothing gc made")
    old = os.stat(store._path(f"{job_prefix(gone)}/manifest.jsonl")).st_mtime - 40 * 86_400
    for key in store.list(f"{job_prefix(gone)}/"):
        os.utime(store._path(key), (old, old))
    from sqlalchemy import delete

    from aigc_core.schema import Job

    with db.session() as s:  # gc without --objects took the rows and left the objects
        s.execute(delete(Job).where(Job.id == gone))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_") and k not in ("COLUMNS", "LINES")}
    env.update(AIGC_DATABASE_URL=f"sqlite:///{tmp_path}/a.db", AIGC_STORAGE_URL=f"file://{tmp_path}/data",
               AIGC_CACHE_DIR=str(tmp_path / "cache"))

    def aigc(*args):
        return subprocess.run([sys.executable, "-m", "scheduler.cli", "gc", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    n_gone = len(list(store.list(f"{job_prefix(gone)}/")))
    dry = aigc("--older-than", "30d", "--orphans", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 0 jobs" in dry.stdout and f"{n_gone} objects (of which under 1 orphan prefixes)" in dry.stdout
    assert len(list(store.list(f"{job_prefix(gone)}/"))) == n_gone
    done = aigc("--older-than", "30d", "--orphans")
    assert done.returncode == 0, done.stderr
    assert "1 orphan prefixes" in done.stdout
    assert list(store.list(f"{job_prefix(gone)}/")) == []
    assert list(store.list(f"{job_prefix(fresh_orphan)}/"))  # too recent to judge
    assert store.exists("jobs/not-a-job-id/x.txt")  # not a job's prefix
    assert rows_of(db, kept)["items"] == 2 and len(list(store.list(f"{job_prefix(kept)}/"))) == 6
    again = aigc("--older-than", "1000d", "--orphans")  # nothing under a prefix is that old now
    assert again.returncode == 0 and "orphan" not in again.stdout, again.stdout
