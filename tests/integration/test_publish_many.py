"""Chunks published through one Redis pipeline (CeleryPublisher.many): the same messages as one at a
time, every outbox row marked once sent, and a broker that refuses leaves the rows pending."""

from __future__ import annotations

import base64
import json

import pytest
import redis
from sqlalchemy import select

from aigc_core.db import database
from aigc_core.reconcile import PAIRS_PER_STATEMENT, publish_chunks
from aigc_core.schema import Chunk, ChunkStatus, Job, JobStatus, new_id
from scheduler.dispatch import TASK, CeleryPublisher

pytestmark = pytest.mark.integration


def _job_with_chunks(db, n: int) -> str:
    job_id = new_id()
    with db.session() as s:
        s.add(Job(id=job_id, kind="text", model_name="tiny", model_version=1, queue="q-many",
                  status=JobStatus.queued, params={}, seed=1, meta={}, payload_digest="d" * 64, item_count=n,
                  chunk_size=1, depends_on=[]))
        s.flush()
        s.add_all(Chunk(job_id=job_id, chunk_no=c, status=ChunkStatus.pending, publish_count=0) for c in range(n))
    return job_id


def _chunks(db, job_id):
    with db.session() as s:
        return s.execute(select(Chunk.chunk_no, Chunk.status, Chunk.publish_count)
                         .where(Chunk.job_id == job_id).order_by(Chunk.chunk_no)).all()


def test_many_sends_what_one_at_a_time_sends_and_marks_every_chunk(pg_clean, redis_url):
    db = database(pg_clean)
    n = PAIRS_PER_STATEMENT * 2 + 7  # three groups, the last one short
    job_id = _job_with_chunks(db, n)
    pub = CeleryPublisher(redis_url)
    sent, failed = publish_chunks(db, pub, [(job_id, c, "q-many") for c in range(n)])
    assert (sent, failed) == (n, 0)
    assert all(st == ChunkStatus.published and count == 1 for _, st, count in _chunks(db, job_id))
    r = redis.Redis.from_url(redis_url)
    batched = [json.loads(m) for m in r.lrange("q-many", 0, -1)]
    assert len(batched) == n
    pub("q-one", job_id, 5)  # the single path, for comparison
    one = json.loads(r.lrange("q-one", 0, -1)[0])
    bodies = [json.loads(base64.b64decode(x["body"]))[0] for x in batched]
    assert sorted(c for _, c in bodies) == list(range(n)) and {j for j, _ in bodies} == {job_id}
    m = batched[bodies.index([job_id, 5])]
    assert m["headers"]["task"] == one["headers"]["task"] == TASK
    assert m["headers"]["argsrepr"] == f"q-many job {job_id[:8]} chunk 5"
    assert one["headers"]["argsrepr"] == f"q-one job {job_id[:8]} chunk 5"
    assert m["content-type"] == one["content-type"] == "application/json"
    assert m["properties"]["delivery_info"]["routing_key"] == "q-many"
    # Apart from the ids, the queue and the label, the same message as send_task's, byte for byte.
    assert _sans_ids(m, "q-many") == _sans_ids(one, "q-one")
    assert json.loads(base64.b64decode(m["body"])) == json.loads(base64.b64decode(one["body"]))  # [args, kwargs, embed]


def _sans_ids(message: dict, queue: str) -> str:
    m = json.loads(json.dumps(message))
    for k in ("id", "root_id", "argsrepr"):
        m["headers"].pop(k)
    for k in ("correlation_id", "delivery_tag", "argsrepr"):
        m["properties"].pop(k)
    assert m["properties"]["delivery_info"].pop("routing_key") == queue
    m.pop("body")
    return json.dumps(m, sort_keys=True)


def test_a_broker_that_refuses_leaves_the_outbox_pending(pg_clean):
    db = database(pg_clean)
    job_id = _job_with_chunks(db, 20)
    pub = CeleryPublisher("redis://127.0.0.1:1/0")  # nothing listens there
    sent, failed = publish_chunks(db, pub, [(job_id, c, "q-many") for c in range(20)])
    assert (sent, failed) == (0, 20)
    assert all(st == ChunkStatus.pending and count == 0 for _, st, count in _chunks(db, job_id))
