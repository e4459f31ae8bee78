"""aigc gc on PostgreSQL and a real S3 server: the same behaviour as on SQLite, and batches that
never hold a running job's rows."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from aigc_core.db import database
from aigc_core.retention import collect_garbage
from aigc_core.schema import Item, ItemStatus, utcnow
from aigc_core.storage import S3Store
from tests.support.retention_rows import check_gc_removes_old_finished_jobs_only, make_job, rows_of

pytestmark = pytest.mark.integration


@pytest.fixture
def store(s3_bucket, s3_server):
    return S3Store(s3_bucket, "aigc", endpoint_url=s3_server.endpoint)


def test_gc_removes_old_finished_jobs_and_keeps_the_rest_on_postgresql_and_s3(pg_clean, store):
    check_gc_removes_old_finished_jobs_only(database(pg_clean), store)


def test_a_running_job_commits_while_gc_deletes(pg_clean, store):
    db = database(pg_clean)
    old = [make_job(db, store, items=40) for _ in range(3)]
    running = make_job(db, store, items=40, age=None)
    errors: list[BaseException] = []
    stop = threading.Event()

    def commits():  # a worker's micro-batch commits, one after another, during the whole gc
        try:
            while not stop.is_set():
                with db.session() as s:
                    s.execute(update(Item).where(Item.job_id == running, Item.index == 1)
                              .values(status=ItemStatus.running))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=commits)
    t.start()
    try:
        rep = collect_garbage(db, store, timedelta(days=30), objects=True, rows_per_statement=7)
    finally:
        stop.set()
        t.join(10)
    assert not errors and rep.jobs == 3 and rep.items == 120
    assert all(rows_of(db, j)["jobs"] == 0 for j in old) and rows_of(db, running)["items"] == 40


def test_orphan_prefixes_on_s3_are_found_by_folder_and_removed(pg_clean, store):
    from datetime import UTC, datetime

    from aigc_core.jobs import job_prefix

    db = database(pg_clean)
    known = make_job(db, store, items=2, age=None)  # running: never touched
    orphan = "e" * 32
    for i in range(3):
        store.put(f"{job_prefix(orphan)}/items/{i:06d}.tok.txt", b"late")
    store.put("jobs/readme.txt", b"not a job's prefix")
    assert set(store.folders("jobs/")) == {f"jobs/{known}/", f"jobs/{orphan}/"}
    newest = store.newest(f"jobs/{orphan}/")
    assert newest is not None and abs((datetime.now(UTC) - newest).total_seconds()) < 600
    # As if 31 days had passed: the orphan's objects are older than the cutoff.
    rep = collect_garbage(db, store, timedelta(days=30), orphans=True, now=utcnow() + timedelta(days=31))
    assert rep.orphan_prefixes == 1 and rep.objects == 3
    assert list(store.list(f"jobs/{orphan}/")) == [] and store.exists("jobs/readme.txt")
    assert rows_of(db, known)["items"] == 2 and list(store.list(f"jobs/{known}/"))
