"""How a Client's jobs get run, injected as httpx injects a transport.

``CeleryRunner`` publishes a job's chunks to the broker after submit and retry; workers elsewhere run
them and ``wait`` only watches. ``InProcessRunner`` (no broker: the embedded default) publishes
nothing and runs the job's chunks inside ``wait``, in this process. ``Client()`` picks one from the
settings; pass ``runner=`` to choose.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import select

from aigc_core.reconcile import publish_chunks
from aigc_core.schema import Chunk, ChunkStatus, Job, JobStatus
from aigc_core.settings import Settings
from scheduler.dispatch import CeleryPublisher

log = logging.getLogger("aigc.client")

if TYPE_CHECKING:
    from aigc_core.db import Database
    from scheduler.client import Client


class Runner(Protocol):
    @property
    def publisher(self) -> Callable[[str, str, int], None] | None:
        """The reconciler's way to send a chunk (queue, job_id, chunk_no); None: chunks wait in the outbox."""

    def dispatch(self, client: Client, job_id: str) -> None:
        """The job's pending chunks are ready (after submit or retry)."""

    def drive(self, client: Client, job_id: str, on_chunk: Callable[[], None]) -> None:
        """Called once by ``wait`` before it polls: run what this runner runs itself."""

    def warm(self, client: Client, model: str | None) -> None:
        """A job for ``model`` is about to be written and waited for here: get ready to run it."""


def publish_pending(db: Database, publisher: Callable[[str, str, int], None], job_id: str) -> None:
    """Send the job's pending chunks (the outbox marks each one published as it goes)."""
    with db.session() as s:
        rows = s.execute(
            select(Chunk.job_id, Chunk.chunk_no, Job.queue).join(Job, Job.id == Chunk.job_id)
            .where(Chunk.job_id == job_id, Chunk.status == ChunkStatus.pending).order_by(Chunk.chunk_no)
        ).all()
    publish_chunks(db, publisher, [(r.job_id, r.chunk_no, r.queue) for r in rows])


class CeleryRunner:
    """Chunks go to the broker as ``worker.run_chunk(job_id, chunk_no)``; workers run them."""

    def __init__(self, publisher: Callable[[str, str, int], None]):
        self.publisher = publisher

    @classmethod
    def from_settings(cls, settings: Settings) -> CeleryRunner:
        if not settings.broker_url:
            raise ValueError("a CeleryRunner needs AIGC_BROKER_URL")
        return cls(CeleryPublisher(settings.broker_url, settings.visibility_timeout_s, settings.broker_ssl()))

    def dispatch(self, client: Client, job_id: str) -> None:
        publish_pending(client.db, self.publisher, job_id)

    def drive(self, client: Client, job_id: str, on_chunk: Callable[[], None]) -> None:
        return None  # the workers run it; wait polls

    def warm(self, client: Client, model: str | None) -> None:
        return None  # the workers have their models pinned


class InProcessRunner:
    """The embedded worker: ``wait`` runs the job (and the jobs it waits for) here, loading torch then."""

    publisher: Callable[[str, str, int], None] | None = None

    def dispatch(self, client: Client, job_id: str) -> None:
        return None  # the chunks stay in the outbox until wait runs them

    def drive(self, client: Client, job_id: str, on_chunk: Callable[[], None]) -> None:
        from worker.inprocess import drain
        from worker.runtime import get_runtime

        rt = get_runtime(client.settings)
        with client.db.session() as s:
            waits = s.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.waiting
        # A waiting job's dependencies run here too: drain everything pending, not just this job.
        drain(rt, None if waits else job_id, on_chunk=lambda _: on_chunk())

    def warm(self, client: Client, model: str | None) -> None:
        """On a thread, while the job is written: import torch and the model's backend and pick the
        device, the seconds a cold ``submit --wait`` would otherwise spend before its first batch. The
        model itself is loaded by the pipeline, which charges a load that kills the process to the
        first micro-batch."""
        backend = None
        if model:
            with contextlib.suppress(Exception):  # an unknown model fails at submit, with its message
                backend = client.model(model).backend
        threading.Thread(target=_warm, args=(client.settings, backend), name="aigc-warm", daemon=True).start()


def _warm(settings: Settings, backend: str | None) -> None:
    import importlib

    try:
        from aigc_models.base import BACKENDS
        from worker.runtime import get_runtime

        target = {**BACKENDS, **settings.extra_backends()}.get(backend or "")
        if target:
            importlib.import_module(target.partition(":")[0])
        log.debug("warm: device %s", get_runtime(settings).device)  # imports torch, sets its threads
    except Exception as e:  # only a head start: the pipeline meets (and reports) the same failure
        log.debug("warming up failed: %s", e)


def default_runner(settings: Settings) -> Runner:
    return CeleryRunner.from_settings(settings) if settings.broker_url else InProcessRunner()
