"""Client.wait on PostgreSQL hears a job's end from the finalize step (LISTEN/NOTIFY) instead of
finding it at its next poll."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import update

from aigc_core.db import database
from aigc_core.jobs import finalize_if_done
from aigc_core.notify import FinishWatch, channel
from aigc_core.schema import Item, ItemStatus, JobStatus
from aigc_core.settings import Settings
from aigc_core.storage import open_store
from tests.support.retention_rows import WatchOnlyRunner, make_job

pytestmark = pytest.mark.integration


def _finish_later(db, store, job_id: str, after_s: float) -> threading.Thread:
    def run():
        time.sleep(after_s)
        with db.session() as s:
            s.execute(update(Item).where(Item.job_id == job_id).values(status=ItemStatus.succeeded))
        finalize_if_done(db, store, job_id)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_wait_returns_when_the_job_finishes_not_at_its_next_poll(pg_clean, tmp_path):
    from scheduler import Client

    settings = Settings(database_url=pg_clean, storage_url=f"file://{tmp_path}/data")
    client = Client(settings, runner=WatchOnlyRunner())
    db, store = database(pg_clean), open_store(settings.storage_url)
    job_id = make_job(db, store, items=4, age=None, status=JobStatus.running)
    t = _finish_later(db, store, job_id, after_s=0.5)
    t0 = time.monotonic()
    # A poll every 60 s: only the notification can end this wait within seconds.
    view = client.wait(job_id, poll_s=60, timeout=40)
    took = time.monotonic() - t0
    t.join()
    assert view.status == JobStatus.succeeded
    assert took < 10, f"wait took {took:.1f} s: it polled instead of hearing the job's end"


def test_another_jobs_end_does_not_wake_the_watch(pg_clean, tmp_path):
    db, store = database(pg_clean), open_store(f"file://{tmp_path}/data")
    mine = make_job(db, store, items=2, age=None, status=JobStatus.running)
    other = make_job(db, store, items=2, age=None, status=JobStatus.running)
    with FinishWatch(db, mine) as watch:
        assert watch.listening
        _finish_later(db, store, other, after_s=0).join()
        assert watch.wait(0.5) is False
        _finish_later(db, store, mine, after_s=0).join()
        assert watch.wait(10) is True


def test_a_watch_on_sqlite_polls(tmp_path):
    db = database(f"sqlite:///{tmp_path}/a.db")
    with FinishWatch(db, "0" * 32) as watch:
        assert not watch.listening
        t0 = time.monotonic()
        assert watch.wait(0.05) is False
        assert time.monotonic() - t0 >= 0.05


def test_channel_names_only_job_ids():
    assert channel("ab" * 16) == "aigc_job_" + "ab" * 16
    with pytest.raises(ValueError):
        channel('x"; DROP TABLE jobs; --')
