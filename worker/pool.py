"""Pinned models: each loaded once per process, least recently used evicted under a memory budget."""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aigc_core.registry import ModelRef
from aigc_models import Generator
from worker import metrics


@dataclass(frozen=True)
class Loaded:
    model: Generator
    load_seconds: float
    loaded_now: bool


class ModelPool:
    """Keyed by name@version, so a pinned old version stays valid next to a newer one.

    ``estimate(ref)`` (bytes, e.g. the weights on disk) lets the pool evict *before* a load, so peak
    memory stays near the budget instead of budget + the new model.
    """

    def __init__(self, loader: Callable[[ModelRef], Generator], budget_bytes: int, *,
                 estimate: Callable[[ModelRef], int] | None = None):
        self._loader = loader
        self._budget = budget_bytes
        self._estimate = estimate
        self._models: OrderedDict[str, tuple[Generator, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads: Counter[str] = Counter()
        self.evictions: Counter[str] = Counter()
        metrics.track_pool(self)

    def get(self, ref: ModelRef) -> Loaded:
        with self._lock:
            if ref.tag in self._models:
                self._models.move_to_end(ref.tag)
                model, secs = self._models[ref.tag]
                return Loaded(model, secs, False)
            t0 = time.perf_counter()
            if self._estimate is not None:
                self._evict(incoming=self._estimate(ref))
            model = self._loader(ref)
            secs = time.perf_counter() - t0
            self.loads[ref.tag] += 1
            metrics.MODEL_LOADS.labels(ref.tag).inc()
            self._models[ref.tag] = (model, secs)
            self._evict(keep=ref.tag)
            return Loaded(model, secs, True)

    def _evict(self, keep: str | None = None, incoming: int = 0) -> None:
        """Least recently used first, until the pinned models (and ``incoming`` bytes) fit; never ``keep``."""
        while self.memory_bytes() + incoming > self._budget:
            tag = next((t for t in self._models if t != keep), None)
            if tag is None:
                return
            del self._models[tag]
            self.evictions[tag] += 1
            metrics.MODEL_EVICTIONS.labels(tag).inc()

    def memory_bytes(self) -> int:
        return sum(m.memory_bytes() for m, _ in self._models.values())

    def pinned(self) -> list[str]:
        return list(self._models)

    def pinned_info(self) -> list[tuple[str, int, float]]:
        """(name@version, bytes, load seconds) per pinned model, without the lock: a scrape never waits on a load."""
        for _ in range(3):
            try:
                return [(tag, m.memory_bytes(), secs) for tag, (m, secs) in list(self._models.items())]
            except RuntimeError:  # changed while we read it; read again
                continue
        return []
