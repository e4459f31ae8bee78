"""The scheduler runs retention when AIGC_GC_OLDER_THAN is set: a beat entry, a thread, a report."""

from __future__ import annotations

from datetime import timedelta

import pytest

from aigc_core.settings import Settings
from scheduler.cron import beat
from tests.support.retention_rows import make_job, rows_of


@pytest.fixture
def gc_client(tmp_path, monkeypatch):
    from scheduler import Client

    def make(**kw):
        settings = Settings(database_url=f"sqlite:///{tmp_path}/a.db", storage_url=f"file://{tmp_path}/data",
                            cache_dir=tmp_path / "cache", broker_url=None, **kw)
        client = Client(settings)
        client.db.ensure_schema()
        monkeypatch.setitem(beat._state, "client", client)
        monkeypatch.setitem(beat._state, "gc_thread", None)
        return client
    return make


def test_beat_has_a_gc_entry_only_when_an_age_is_set():
    assert "gc" not in beat.make_app(Settings(broker_url="redis://127.0.0.1:1/0")).conf.beat_schedule
    app = beat.make_app(Settings(broker_url="redis://127.0.0.1:1/0", gc_older_than="30d", gc_every_s=600))
    entry = app.conf.beat_schedule["gc"]
    assert entry["task"] == "scheduler.gc" and entry["schedule"] == 600 and "scheduler.gc" in app.tasks


def test_an_age_that_is_not_one_is_refused_at_start():
    with pytest.raises(ValueError):
        Settings(gc_older_than="30 days")


def test_gc_runs_in_a_thread_and_removes_old_jobs_with_their_objects(gc_client):
    client = gc_client(gc_older_than="30d", gc_objects=True)
    old, recent = make_job(client.db, client.store), make_job(client.db, client.store, age=timedelta(days=1))
    out = beat.gc()
    assert out["gc"].startswith("started") and out["objects"] is True
    beat._state["gc_thread"].join(30)
    assert rows_of(client.db, old)["jobs"] == 0 and list(client.store.list(f"jobs/{old}/")) == []
    assert rows_of(client.db, recent)["items"] == 3


def test_gc_is_off_without_an_age(gc_client):
    client = gc_client()
    old = make_job(client.db, client.store)
    assert "off" in beat.gc()["gc"] and rows_of(client.db, old)["jobs"] == 1
