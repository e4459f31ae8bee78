"""What the broker holds: the chunks whose messages wait in a Redis queue or sit unacked with a worker.

The reconciler asks this before it decides a published chunk lost. A Redis restarted empty (or a
message dropped any other way) is then found on the next pass, not after ``republish_after_s``.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from functools import cached_property
from typing import Any

log = logging.getLogger("aigc.broker")

TASK = "worker.run_chunk"
# kombu's Redis transport keeps delivered, unacked messages here (acks_late: until the task ends).
UNACKED_KEY = "unacked"


# ... with the time each was delivered (a sorted set: delivery tag -> unix time).
UNACKED_INDEX_KEY = "unacked_index"


class RedisChunkProbe:
    """``probe(queue)`` -> {(job_id, chunk_no)} held for that queue, or None when it cannot tell.

    A message delivered to a worker more than ``unacked_stale_s`` ago is not counted as held: the
    reconciler asks only about chunks whose items are still pending, and a live worker claims a
    chunk's items as soon as it starts it. Such a message sits with a worker that died holding it
    (a retry's countdown message, say), where Redis would give it back only after the visibility
    timeout; publishing the chunk again costs at most a message that claims nothing.
    """

    def __init__(self, broker_url: str, ssl: dict[str, Any] | None = None, max_scan: int = 10_000,
                 unacked_stale_s: float | None = None):
        self.broker_url, self.ssl, self.max_scan = broker_url, ssl or {}, max_scan
        self.unacked_stale_s = unacked_stale_s

    @cached_property
    def _redis(self):
        import redis

        return redis.Redis.from_url(self.broker_url, socket_timeout=5, socket_connect_timeout=5, **self.ssl)

    def __call__(self, queue: str) -> set[tuple[str, int]] | None:
        try:
            r = self._redis
            # A very long queue is not read whole: the slow path (republish_after_s) covers it.
            if r.llen(queue) > self.max_scan or r.hlen(UNACKED_KEY) > self.max_scan:
                return None
            held = {c for raw in r.lrange(queue, 0, -1) if (c := chunk_of(raw)) is not None}
            stale = self._stale_tags(r)
            for tag, raw in r.hgetall(UNACKED_KEY).items():
                c = chunk_of(raw, unacked=True)
                if c is not None and tag not in stale:
                    held.add(c)
            return held
        except Exception as e:  # broker down or refusing: no opinion, so nothing is called lost
            log.warning("cannot read the broker's queue %s: %s", queue, e)
            return None

    def _stale_tags(self, r) -> set[bytes]:
        if self.unacked_stale_s is None:
            return set()
        # kombu stamps a delivery with the worker's clock and restores by its own: clocks are in sync.
        return set(r.zrangebyscore(UNACKED_INDEX_KEY, "-inf", time.time() - self.unacked_stale_s))


def chunk_of(raw: bytes | str, *, unacked: bool = False) -> tuple[str, int] | None:
    """The (job_id, chunk_no) a kombu Redis message carries, None for any other message."""
    try:
        msg = json.loads(raw)
        if unacked:  # [message, exchange, routing_key]
            msg = msg[0]
        if (msg.get("headers") or {}).get("task") != TASK:
            return None
        body = msg["body"]
        if (msg.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]  # task protocol 2: [args, kwargs, embed]
        return str(args[0]), int(args[1])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
