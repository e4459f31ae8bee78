"""Finalize streams manifest.jsonl and errors.jsonl a page at a time: same bytes as the whole-list
version, nothing half-written visible, and the job final only once its manifest is whole."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select, update

import aigc_core.jobs as jobs
from aigc_core.errors import StorageError
from aigc_core.schema import Artifact, Item, ItemStatus, Job, JobStatus, utcnow
from aigc_core.storage import LocalStore


def test_local_put_stream_writes_the_chunks_as_one_object(tmp_path):
    store = LocalStore(tmp_path)
    info = store.put_stream("jobs/j/manifest.jsonl", (f"{i}\n".encode() for i in range(1000)), "application/x-ndjson")
    want = "".join(f"{i}\n" for i in range(1000)).encode()
    assert store.get("jobs/j/manifest.jsonl") == want and info.size == len(want)
    assert info.uri == store.uri("jobs/j/manifest.jsonl")
    assert store.put_stream("jobs/j/empty", iter(())).size == 0 and store.get("jobs/j/empty") == b""


def test_a_failed_local_stream_leaves_the_old_object_and_no_temporary_file(tmp_path):
    store = LocalStore(tmp_path)
    store.put("jobs/j/manifest.jsonl", b"old\n")

    def broken():
        yield b"half a manifest\n"
        raise StorageError("the database went away mid-read")

    with pytest.raises(StorageError):
        store.put_stream("jobs/j/manifest.jsonl", broken())
    assert store.get("jobs/j/manifest.jsonl") == b"old\n"
    assert sorted(p.name for p in (tmp_path / "jobs" / "j").iterdir()) == ["manifest.jsonl"]


def _finish_items(client, job_id: str, failed: set[int]) -> None:
    """Items final as a worker leaves them: failed with a reason, or succeeded with an Artifact."""
    with client.db.session() as s:
        for it in s.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.index)):
            it.attempts, it.finished_at = 1, utcnow()
            if it.index in failed:
                it.status, it.error = ItemStatus.failed, f"boom \"{it.index}\" é"
                continue
            it.status = ItemStatus.succeeded
            key = jobs.item_key(job_id, it.index, "txt", "tok")
            s.add(Artifact(item_id=it.id, job_id=job_id, key=key, uri=client.store.uri(key), sha256="ab" * 32,
                           size=it.index + 1, media_type="text/plain", provenance={"seed": it.seed}))


def _whole_list_manifest(client, job_id: str) -> tuple[bytes, bytes]:
    """What finalize wrote before it streamed (one list in memory, joined at the end)."""
    lines, errors = [], []
    for r in jobs.iter_results(client.db, job_id, with_provenance=False):
        lines.append(json.dumps(r.manifest_line(), ensure_ascii=False))
        if r.status == ItemStatus.failed:
            errors.append(json.dumps({"index": r.index, "custom_id": r.custom_id, "error": r.error,
                                      "attempts": r.attempts}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode(), ("\n".join(errors) + "\n" if errors else "").encode()


@pytest.mark.parametrize("failed", [set(), {1, 4, 5, 9}, set(range(11))])
def test_streamed_manifest_and_errors_are_byte_identical_to_the_whole_list_version(client, monkeypatch, failed):
    monkeypatch.setattr(jobs, "RESULT_PAGE", 3)  # several pages, and a last one that is not full
    job = client.submit("text", model="tiny", items=[{"custom_id": f"c{i}", "prompt": f"p{i}"} for i in range(11)])
    _finish_items(client, job.id, failed)
    manifest, errors = _whole_list_manifest(client, job.id)
    want = JobStatus.succeeded if not failed else JobStatus.failed if len(failed) == 11 else JobStatus.partially_failed
    assert jobs.finalize_if_done(client.db, client.store, job.id) == want
    prefix = jobs.job_prefix(job.id)
    assert client.store.get(f"{prefix}/manifest.jsonl") == manifest
    assert client.store.get(f"{prefix}/errors.jsonl") == errors
    assert len(manifest.splitlines()) == 11 and len(errors.splitlines()) == len(failed)


def test_a_manifest_that_cannot_be_written_leaves_the_job_open(client):
    job = client.submit("text", model="tiny", items=["a", "b"])
    _finish_items(client, job.id, set())

    class Down:
        def __init__(self, inner):
            self.inner = inner

        def put_stream(self, key, chunks, content_type="application/octet-stream"):
            next(iter(chunks))  # the upload started, then S3 went away
            raise StorageError("S3 is down")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    with pytest.raises(StorageError):
        jobs.finalize_if_done(client.db, Down(client.store), job.id)
    with client.db.session() as s:
        assert s.get(Job, job.id).finished_at is None  # object first: no final job without its manifest
    assert jobs.finalize_if_done(client.db, client.store, job.id) == JobStatus.succeeded


def test_a_job_reopened_while_its_manifest_streams_is_not_marked_final(client, monkeypatch):
    job = client.submit("text", model="tiny", items=["a", "b"])
    _finish_items(client, job.id, {1})
    real = jobs.manifest_chunks

    def reopen_midway(db, job_id):
        yield from real(db, job_id)
        with client.db.session() as s:  # retry_failed lands while the manifest is being written
            s.execute(update(Item).where(Item.job_id == job_id, Item.index == 1)
                      .values(status=ItemStatus.pending, error=None))

    monkeypatch.setattr(jobs, "manifest_chunks", reopen_midway)
    assert jobs.finalize_if_done(client.db, client.store, job.id) is None
    with client.db.session() as s:
        assert s.get(Job, job.id).finished_at is None
