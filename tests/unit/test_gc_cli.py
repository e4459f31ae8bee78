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
