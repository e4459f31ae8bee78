"""Storing a micro-batch while the next one generates: at most one batch in flight.

The generation loop (worker/pipeline.py) hands each generated micro-batch to ``StoreAhead.submit``,
which first waits for the previous batch's ``store_and_commit`` to end, then starts this one's on
the runtime's committer threads and returns, so batch k's PUTs and commit run while batch k+1
generates. Every guarantee stays inside ``store_and_commit``: an item is marked succeeded only
after its object is stored, by the claim token, within its lease.

One batch in flight, not two: that hides the store whenever storing a batch takes no longer than
generating the next, and when it takes longer the store is the limit anyway (its PUTs already run
side by side on the upload threads: ``AIGC_STORAGE_WORKERS``). A second batch in flight would hold a
third batch of outputs in memory, and add a batch to what a crash throws away (and charges an attempt
for) without making the store any faster.

The chunk never returns or raises while a store is still running (``settle``): an item given back
is never written to afterwards. On cancellation the batch in flight is committed first, then the
rest is cancelled, as when storing was in line.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from aigc_core.errors import StorageError
from worker.runtime import Runtime

log = logging.getLogger("aigc.worker")


class StoreAhead:
    """The one store-and-commit in flight for a chunk's delivery (or none, when ``enabled`` is false:
    each batch is then stored in line, as before)."""

    def __init__(self, rt: Runtime, enabled: bool):
        self.rt, self.enabled = rt, enabled
        self._future: Future[Any] | None = None
        self._ids: frozenset[int] = frozenset()

    def busy(self) -> frozenset[int]:
        """The items being stored and committed now: the next ``begin_batch`` leaves their rows alone
        (their leases were renewed before they generated, and a late PUT renews its own: ``_hold``),
        so its transaction and the commit's never wait on each other's row locks."""
        return self._ids if self._future is not None else frozenset()

    def check(self) -> None:
        """Between batches: if the batch in flight already failed, raise its error now, before the
        next batch begins generating (and is charged an attempt) for nothing."""
        if self._future is not None and self._future.done():
            self.wait()

    def submit(self, ids: list[int], fn: Callable[..., None], /, *args: Any, **kwargs: Any) -> None:
        """Wait for the batch in flight (raising its error), then store this one: in the background,
        or here when overlap is off."""
        self.wait()
        if not self.enabled:
            fn(*args, **kwargs)
            return
        call = functools.partial(fn, *args, **kwargs)
        self._future = self.rt.committer.submit(contextvars.copy_context().run, call)  # with the log context
        self._ids = frozenset(ids)

    def wait(self) -> None:
        """Until the batch in flight is stored and committed; raises its error. If this wait is
        interrupted, the batch stays in flight for ``settle``."""
        f = self._future
        if f is None:
            return
        wait([f])
        self._future, self._ids = None, frozenset()
        f.result()

    def settle(self) -> None:
        """On the way out of a failure: wait for the batch in flight to end, never raising its error
        (the failure already under way decides what happens to the items); a storage error is still
        remembered, so the next delivery asks the store before it generates."""
        f = self._future
        if f is None:
            return
        wait([f])
        self._future, self._ids = None, frozenset()
        e = f.exception()
        if e is not None:
            if isinstance(e, StorageError):
                self.rt.storage_failed = True
            log.warning("the micro-batch stored in the background also failed: %s: %s", type(e).__name__, e)
