"""The broker probe against a real Redis: which chunks kombu still holds, queued or unacked."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def test_the_redis_probe_reads_chunk_ids_from_queued_and_unacked_messages(redis_url):
    import redis

    from scheduler.dispatch import CeleryPublisher
    from scheduler.ops.broker import RedisChunkProbe

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    CeleryPublisher(redis_url)("probe-q", "job-a", 3)
    CeleryPublisher(redis_url)("probe-q", "job-b", 0)
    # Move one message to the unacked hash, as a worker holding it (acks_late) leaves it.
    raw = r.rpop("probe-q")
    r.hset("unacked", "tag-1", f'[{raw.decode()}, "", "probe-q"]')
    r.lpush("probe-q", b"not json", b'{"headers": {"task": "other.task"}, "body": "W10="}')
    assert RedisChunkProbe(redis_url)("probe-q") == {("job-a", 3), ("job-b", 0)}
    assert RedisChunkProbe(redis_url, max_scan=1)("probe-q") is None  # too long to read: no opinion
    assert RedisChunkProbe("redis://127.0.0.1:1/0")("probe-q") is None  # unreachable: no opinion


def test_a_message_a_worker_took_more_than_a_lease_ago_is_not_counted_as_held(redis_url):
    """A worker killed while it held messages (a retry's countdown message, say) leaves them in kombu's
    unacked hash until the visibility timeout (an hour by default): the probe must not count them."""
    import redis

    from scheduler.dispatch import CeleryPublisher
    from scheduler.ops.broker import RedisChunkProbe

    r = redis.Redis.from_url(redis_url)
    for job in ("job-old", "job-new"):
        CeleryPublisher(redis_url)("probe-q", job, 0)
    for tag, age in (("tag-old", 120), ("tag-new", 5)):
        raw = r.rpop("probe-q")
        r.hset("unacked", tag, f'[{raw.decode()}, "", "probe-q"]')
        r.zadd("unacked_index", {tag: time.time() - age})  # delivered `age` seconds ago, as kombu stamps it
    assert RedisChunkProbe(redis_url)("probe-q") == {("job-old", 0), ("job-new", 0)}
    assert RedisChunkProbe(redis_url, unacked_stale_s=60)("probe-q") == {("job-new", 0)}
