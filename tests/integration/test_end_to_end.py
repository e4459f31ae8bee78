"""Submit -> Redis -> real Celery worker -> S3 + PostgreSQL, with a tiny model fetched from S3."""

from __future__ import annotations

import hashlib
import json
import re
import time

import pytest
from sqlalchemy import func, select

from aigc_core.schema import Artifact, Chunk, ChunkStatus, Item, ItemStatus, JobStatus
from scheduler import Client

pytestmark = pytest.mark.integration


def _prompts(n, tag="Story"):
    return [{"custom_id": f"{tag.lower()}-{i}", "prompt": f"Headline: {tag} {i}\n\n"} for i in range(n)]


def test_two_jobs_through_a_celery_worker_land_in_s3_with_rows_and_one_model_load(deploy_client, workers):
    c = deploy_client
    workers(pool="solo")
    jobs = [c.submit("text", model="tiny", items=_prompts(20, t), seed=3) for t in ("City", "Sport")]
    views = [c.wait(j.id, timeout=120, poll_s=0.2) for j in jobs]
    assert [v.status for v in views] == [JobStatus.succeeded, JobStatus.succeeded]

    s3 = c.store
    for v in views:
        results = list(c.results(v.id))
        assert len(results) == 20 and all(r.status == ItemStatus.succeeded for r in results)
        for r in results:
            assert r.uri.startswith("s3://")
            assert re.search(rf"/jobs/{v.id}/items/{r.index:06d}\.[0-9a-f]{{32}}\.txt$", r.uri)
            assert hashlib.sha256(s3.get(r.key)).hexdigest() == r.sha256
            assert r.provenance["output"]["sha256"] == r.sha256  # in the row; no sidecar by default
            assert not s3.exists(r.key.replace(".txt", ".provenance.json"))
            assert r.provenance["model"]["uri"].startswith("s3://")
        manifest = s3.get(f"jobs/{v.id}/manifest.jsonl").decode().splitlines()
        assert [json.loads(m)["custom_id"] for m in manifest] == [r.custom_id for r in results]
        assert v.manifest_uri.endswith(f"jobs/{v.id}/manifest.jsonl")

    loads = [e for v in views for e in c.events(v.id) if e["type"] == "model_loaded"]
    assert len(loads) == 1, loads  # one worker process, one load, 6 chunks over 2 jobs


def test_a_worker_killed_mid_chunk_loses_no_item_and_commits_each_once(deploy_client, workers, deploy_settings):
    c = deploy_client
    env = {"AIGC_LEASE_S": "3", "AIGC_MICRO_BATCH_SIZE": "1", "AIGC_CHUNK_SIZE": "12"}
    w1 = workers(pool="solo", env=env)
    job = c.submit("text", model="tiny", items=_prompts(24), params={"max_new_tokens": 160, "stop_at_eos": False})

    def in_flight() -> set[int]:  # items whose generation began (attempt charged) and did not commit
        with c.db.session() as s:
            return set(s.scalars(select(Item.id).where(Item.job_id == job.id, Item.status == ItemStatus.running,
                                                       Item.attempts >= 1)))

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill on database state, not on a sleep
        done = c.status(job.id).counts["succeeded"]
        if 2 <= done < 12 and in_flight():
            break
        time.sleep(0.02)
    w1.kill()
    dying = in_flight()  # almost always the item it was generating; empty if it died between two items
    killed_at = c.status(job.id).counts
    assert 0 < killed_at["succeeded"] < 24 and killed_at["running"] > 0, killed_at

    workers(pool="solo", env=env)
    lease_client = Client(deploy_settings.model_copy(update={"lease_s": 3, "republish_after_s": 5}))
    deadline = time.monotonic() + 120
    while not (view := c.status(job.id)).final and time.monotonic() < deadline:
        lease_client.reconcile()  # the scheduler's periodic reconciler, run here on a short period
        time.sleep(0.5)
    assert view.status == JobStatus.succeeded, view.counts
    with c.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job.id)) == 24
        assert s.scalar(select(func.count(func.distinct(Artifact.item_id))).where(Artifact.job_id == job.id)) == 24
        attempts = dict(s.execute(select(Item.id, Item.attempts).where(Item.job_id == job.id)).all())
    # The item in flight when the worker died ran again; every other item ran exactly once.
    assert attempts == {i: 2 if i in dying else 1 for i in attempts}, (dying, attempts)


def test_submit_while_the_broker_is_down_is_kept_in_the_outbox_and_sent_later(deploy_client, deploy_settings,
                                                                               workers):
    down = Client(deploy_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    job = down.submit("text", model="tiny", items=_prompts(10))
    assert job.status == JobStatus.queued
    with down.db.session() as s:
        assert set(s.scalars(select(Chunk.status).where(Chunk.job_id == job.id))) == {ChunkStatus.pending}
    workers(pool="solo")
    rep = deploy_client.reconcile()  # Redis is reachable again
    assert rep.published == 2
    assert deploy_client.wait(job.id, timeout=60, poll_s=0.2).status == JobStatus.succeeded
