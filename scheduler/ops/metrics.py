"""Prometheus gauges Flower lacks, read from the database and Redis at each scrape (``aigc metrics``).

Every value is read when Prometheus scrapes, so it is as fresh as the scrape and nothing is kept
between scrapes. Items per second is a gauge over the last 60 s of ``finished_at``; for a rate over
any range use ``rate(aigc_worker_items_total[5m])`` from the workers' own endpoints instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.ops.overview import (
    DEFAULT_QUEUES,
    RATE_WINDOW_S,
    BrokerProbe,
    finished_per_second,
    items_by_state,
    jobs_by_state,
    known_queues,
    outbox_by_queue,
)

log = logging.getLogger("aigc.metrics")


class AigcCollector(Collector):
    """Queue depth per queue, items and jobs by state, items/s, the outbox; one read per scrape."""

    def __init__(self, db, broker: BrokerProbe | None, window_s: float = RATE_WINDOW_S):
        self.db, self.broker, self.window_s = db, broker, window_s

    def describe(self) -> list[Metric]:
        return []  # registering must not read the database

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        up = GaugeMetricFamily("aigc_metrics_source_up", "1 if this scrape read the source, else 0",
                               labels=["source"])
        queues = list(DEFAULT_QUEUES)
        try:
            with self.db.session() as s:
                queues = known_queues(s)
                items, jobs = items_by_state(s), jobs_by_state(s)
                outbox = outbox_by_queue(s)
                rates = finished_per_second(s, self.window_s)
        except Exception as e:
            log.warning("metrics: database not read: %s", e)
            up.add_metric(["database"], 0)
        else:
            up.add_metric(["database"], 1)
            yield from _database_families(items, jobs, outbox, rates, queues, self.window_s)
        if self.broker is not None:
            try:
                depths, unacked = self.broker.queue_depths(queues), self.broker.unacked()
            except Exception as e:
                log.warning("metrics: broker not read: %s", e)
                up.add_metric(["broker"], 0)
            else:
                up.add_metric(["broker"], 1)
                depth = GaugeMetricFamily("aigc_queue_depth", "Messages waiting in the broker queue "
                                          "(all priority levels; not those a worker holds)", labels=["queue"])
                for q, n in sorted(depths.items()):
                    depth.add_metric([q], n)
                yield depth
                yield GaugeMetricFamily("aigc_broker_unacked_messages", "Messages delivered to a worker and "
                                        "not yet acknowledged (chunks running now, acks late)", value=unacked)
        yield up
        yield GaugeMetricFamily("aigc_metrics_collect_seconds", "Time this scrape took to read its sources",
                                value=time.perf_counter() - t0)


def _database_families(items, jobs, outbox, rates, queues, window_s) -> Iterator[Metric]:
    g = GaugeMetricFamily("aigc_items", "Items by state (GROUP BY status over all items)", labels=["state"])
    for st, n in items.items():
        g.add_metric([st], n)
    yield g
    g = GaugeMetricFamily("aigc_jobs", "Jobs by state", labels=["state"])
    for st, n in jobs.items():
        g.add_metric([st], n)
    yield g
    g = GaugeMetricFamily("aigc_items_per_second", f"Items that reached each final state in the last "
                          f"{window_s:g} s, per second", labels=["state"])
    for st, r in rates.items():
        g.add_metric([st], r)
    yield g
    g = GaugeMetricFamily("aigc_outbox_chunks", "Chunks not yet on the broker, per queue: pending (the "
                          "reconciler publishes them) or held (their job waits for another)", labels=["queue", "state"])
    for q in sorted(set(queues) | {q for q, _ in outbox}):
        for st in ("pending", "held"):
            g.add_metric([q, st], outbox.get((q, st), 0))
    yield g


def make_registry(db, broker: BrokerProbe | None, *, process: bool = True) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(AigcCollector(db, broker))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def serve(settings, port: int, addr: str = "0.0.0.0"):
    """Serve /metrics in a background thread; returns (server, thread)."""
    from prometheus_client import start_http_server

    from aigc_core.db import database

    broker = BrokerProbe(settings.broker_url, ssl=settings.broker_ssl()) if settings.broker_url else None
    registry = make_registry(database(settings.database_url), broker)
    result = start_http_server(port, addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return result
