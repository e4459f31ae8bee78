"""Per-process worker metrics for Prometheus: model loads, pinned models, generation time, items (and
reused items), storage errors.

Each worker process serves its own registry (``AIGC_WORKER_METRICS_PORT``): the first free port from
that one up, so the children of a prefork worker take consecutive ports. A registry of our own, not
prometheus_client's global one, so Flower (which imports ``worker.app``) never shows empty worker series.
"""

from __future__ import annotations

import logging
import os
import socket
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aigc_core.errors import StorageError

log = logging.getLogger("aigc.worker")

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Tiny CPU models take milliseconds per item, diffusion on a busy GPU minutes.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

MODEL_LOADS = Counter("aigc_worker_model_loads", "Models loaded into this process (name@version)",
                      ["model"], registry=REGISTRY)
MODEL_EVICTIONS = Counter("aigc_worker_model_evictions", "Pinned models evicted under the memory budget",
                          ["model"], registry=REGISTRY)
GENERATION_SECONDS = Histogram("aigc_worker_generation_seconds_per_item", "Generation time per item: each "
                               "micro-batch's time divided by its items, observed once per item",
                               ["model", "kind"], buckets=SECONDS_BUCKETS, registry=REGISTRY)
ITEMS = Counter("aigc_worker_items", "Items this process finished, by final state", ["model", "state"],
                registry=REGISTRY)
ITEMS_REUSED = Counter("aigc_worker_items_reused", "Items this process finished by reusing an earlier "
                       "identical output (the job option reuse); also counted as succeeded", ["model"],
                       registry=REGISTRY)
STORAGE_ERRORS = Counter("aigc_worker_storage_errors", "Object store requests that failed (StorageError)",
                         ["op"], registry=REGISTRY)

_pools: weakref.WeakSet = weakref.WeakSet()
_server: dict[int, int] = {}  # pid -> port: one server per process, never one inherited across fork


def track_pool(pool) -> None:
    """The pool's pinned models are read at each scrape."""
    _pools.add(pool)


def observe_generation(model: str, kind: str, seconds: float, n_items: int) -> None:
    if n_items <= 0:
        return
    child, per = GENERATION_SECONDS.labels(model, kind), seconds / n_items
    for _ in range(n_items):
        child.observe(per)


def count_items(model: str, succeeded: int, failed: int, cancelled: int) -> None:
    for state, n in (("succeeded", succeeded), ("failed", failed), ("cancelled", cancelled)):
        if n:
            ITEMS.labels(model, state).inc(n)


def count_reused(model: str, n: int) -> None:
    if n:
        ITEMS_REUSED.labels(model).inc(n)


class _PoolCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("aigc_worker_info", "This worker process (host:pid, as in items.worker)",
                                 labels=["worker"])
        info.add_metric([f"{socket.gethostname()}:{os.getpid()}"], 1)
        yield info
        pinned: dict[str, tuple[int, float]] = {}
        for pool in list(_pools):  # one pool per runtime; a model pinned in two counts its memory twice
            for tag, nbytes, secs in pool.pinned_info():
                b, s = pinned.get(tag, (0, 0.0))
                pinned[tag] = (b + nbytes, max(s, secs))
        yield GaugeMetricFamily("aigc_worker_pinned_models", "Models pinned in this process", value=len(pinned))
        size = GaugeMetricFamily("aigc_worker_pinned_model_bytes", "Memory of each pinned model", labels=["model"])
        load = GaugeMetricFamily("aigc_worker_pinned_model_load_seconds", "How long each pinned model took to "
                                 "load", labels=["model"])
        for tag, (nbytes, secs) in sorted(pinned.items()):
            size.add_metric([tag], nbytes)
            load.add_metric([tag], secs)
        yield size
        yield load


REGISTRY.register(_PoolCollector())


class InstrumentedStore:
    """Counts the object store's failed requests by operation; otherwise the store itself."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except StorageError:
                STORAGE_ERRORS.labels(name).inc()
                raise

        return call


def start_server(port: int | None, addr: str = "0.0.0.0", tries: int = 64) -> int | None:
    """Serve this process's metrics on the first free port from ``port``; None when unset or none is free."""
    if not port:
        return None
    pid = os.getpid()
    if pid in _server:
        return _server[pid]
    from prometheus_client import start_http_server

    for p in range(port, min(port + tries, 65536)):
        try:
            start_http_server(p, addr, registry=REGISTRY)
        except OSError:
            continue
        _server[pid] = p
        log.info("worker metrics on http://%s:%d/metrics", addr, p)
        return p
    log.warning("worker metrics: no free port in %d-%d", port, port + tries - 1)
    return None
