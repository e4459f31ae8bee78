"""aigc gc on SQLite and a local folder: what goes, what stays, batches, dry runs, ages."""

from __future__ import annotations

from datetime import timedelta

import pytest

from aigc_core.db import Database
from aigc_core.errors import SpecError
from aigc_core.jobs import job_prefix
from aigc_core.retention import collect_garbage, parse_age
from aigc_core.storage import LocalStore
from tests.support.retention_rows import check_gc_removes_old_finished_jobs_only, make_job, rows_of


@pytest.fixture
def db(tmp_path):
    d = Database(f"sqlite:///{tmp_path}/aigc.db")
    d.ensure_schema()
    return d


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "data")


def test_gc_removes_old_finished_jobs_and_keeps_the_rest(db, store):
    check_gc_removes_old_finished_jobs_only(db, store)


def test_without_objects_gc_removes_rows_and_leaves_the_store(db, store):
    job = make_job(db, store, items=5)
    keys = sorted(store.list(f"{job_prefix(job)}/"))
    rep = collect_garbage(db, store, timedelta(days=1))
    assert (rep.jobs, rep.items, rep.objects) == (1, 5, 0)
    assert rows_of(db, job)["jobs"] == 0 and sorted(store.list(f"{job_prefix(job)}/")) == keys


def test_a_job_finished_just_inside_the_age_stays(db, store):
    job = make_job(db, store, age=timedelta(hours=11))
    assert collect_garbage(db, store, parse_age("12h")).jobs == 0
    assert collect_garbage(db, store, parse_age("10h")).jobs == 1 and rows_of(db, job)["jobs"] == 0


def test_many_jobs_go_in_several_batches(db, store):
    jobs = [make_job(db, store, items=2) for _ in range(7)]
    lines: list[str] = []
    rep = collect_garbage(db, None, timedelta(days=1), jobs_per_batch=3, rows_per_statement=1, progress=lines.append)
    assert (rep.jobs, rep.items) == (7, 14) and len(lines) == 3
    assert all(rows_of(db, j)["jobs"] == 0 for j in jobs)


def test_objects_need_a_store():
    with pytest.raises(SpecError):
        collect_garbage(Database("sqlite://"), None, timedelta(days=1), objects=True)


@pytest.mark.parametrize("text,want", [("30d", timedelta(days=30)), ("12h", timedelta(hours=12)),
                                       ("90m", timedelta(minutes=90)), ("45s", timedelta(seconds=45)),
                                       (" 2W ", timedelta(weeks=2))])
def test_ages_are_a_number_and_a_unit(text, want):
    assert parse_age(text) == want


@pytest.mark.parametrize("text", ["", "30", "d", "0d", "-1d", "1.5h", "30 days", "1y"])
def test_other_ages_are_refused(text):
    with pytest.raises(SpecError):
        parse_age(text)


def test_a_job_whose_api_batch_has_not_written_its_output_stays(db, store):
    from aigc_core.schema import ApiBatch

    pending, written = make_job(db, store), make_job(db, store)
    with db.session() as s:
        s.add(ApiBatch(id="batch_a", job_id=pending, endpoint="/v1/completions", input_file_id="file-a",
                       completion_window="24h", status=None))
        s.add(ApiBatch(id="batch_b", job_id=written, endpoint="/v1/completions", input_file_id="file-b",
                       completion_window="24h", status="completed"))
    rep = collect_garbage(db, store, timedelta(days=1))
    assert rep.jobs == 1 and rep.kept == {"an API batch has not written its output": 1}
    assert rows_of(db, pending)["items"] == 3 and rows_of(db, written)["jobs"] == 0


def test_objects_are_deleted_a_page_at_a_time(db, store, monkeypatch):
    import aigc_core.retention as retention

    monkeypatch.setattr(retention, "OBJECTS_PER_DELETE", 4)
    pages: list[int] = []
    real = store.delete
    monkeypatch.setattr(store, "delete", lambda keys: (pages.append(len(keys)), real(keys)))
    job = make_job(db, store, items=5, orphan=True)  # 10 outputs and sidecars, an orphan, 2 manifests: 13
    assert collect_garbage(db, store, timedelta(days=1), objects=True).objects == 13
    assert pages == [4, 4, 4, 1] and list(store.list(f"{job_prefix(job)}/")) == []


def test_an_abandoned_streaming_submit_without_a_key_goes_and_one_with_a_key_stays(db, store):
    from aigc_core.schema import JobStatus

    def submitting(**kw):
        return make_job(db, store, age=None, status=JobStatus.submitting, **kw)

    abandoned, resumable = submitting(created_ago=timedelta(days=40)), submitting(created_ago=timedelta(days=40),
                                                                                   key="nightly-2026-10-01")
    fresh = submitting(created_ago=timedelta(hours=1))
    running = make_job(db, store, age=None, created_ago=timedelta(days=40))
    rep = collect_garbage(db, store, timedelta(days=30), objects=True)
    assert rep.jobs == 1 and rows_of(db, abandoned)["jobs"] == 0
    assert all(rows_of(db, j)["items"] == 3 for j in (resumable, fresh, running))
