"""What ops watch, read from the database and the broker: queues, items, jobs, workers, failures.

Shared by the Prometheus collector (``scheduler.ops.metrics``) and ``aigc status`` (``scheduler.cli.ops``).
Torch-free, and the worker is never imported: workers are asked over the broker by name.
Scans of recent activity (items per second, workers seen, last failures) read index ranges of
items that are open or finished inside the window, so they stay cheap on a large items table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, cast

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from aigc_core.jobs import JobView, job_view
from aigc_core.schema import Chunk, ChunkStatus, Item, ItemStatus, Job, JobStatus, Model, utcnow

# Queues every deployment has (scheduler: the beat ticks); models may name more.
DEFAULT_QUEUES = ("text", "image", "audio", "train", "scheduler")
OPEN_JOB_STATES = (JobStatus.submitting, JobStatus.waiting, JobStatus.queued, JobStatus.running)
RATE_WINDOW_S = 60.0
# kombu's Redis transport keeps a queue as a list named after it, and messages sent with a
# priority in sibling lists "<queue>\x06\x16<step>" (priority_steps 0, 3, 6, 9; 0 is the plain name).
PRIORITY_SEP, PRIORITY_STEPS = "\x06\x16", (0, 3, 6, 9)


def _value(status: Any) -> str:
    return status.value if hasattr(status, "value") else str(status)


# ---- database -----------------------------------------------------------------------------------

def known_queues(s: Session) -> list[str]:
    """The default queues, every model's queue and the queue of every open job."""
    names = set(DEFAULT_QUEUES) | set(s.scalars(select(Model.queue).distinct()))
    names |= set(s.scalars(select(Job.queue).where(Job.status.in_(OPEN_JOB_STATES)).distinct()))
    return sorted(n for n in names if n)


def items_by_state(s: Session) -> dict[str, int]:
    """Items by state without reading finished jobs' items: their counts were written on the job when
    it finished; open jobs' items are counted (an index range per open job)."""
    counts = {st.value: 0 for st in ItemStatus}
    open_jobs = select(Job.id).where(Job.finished_at.is_(None))
    counts.update({_value(st): n for st, n in s.execute(
        select(Item.status, func.count()).where(Item.job_id.in_(open_jobs)).group_by(Item.status))})
    done = s.execute(select(func.coalesce(func.sum(Job.succeeded_items), 0),
                            func.coalesce(func.sum(Job.failed_items), 0),
                            func.coalesce(func.sum(Job.cancelled_items), 0))
                     .where(Job.finished_at.is_not(None))).one()
    for state, n in zip(("succeeded", "failed", "cancelled"), done, strict=False):
        counts[state] += int(cast(int, n))  # coalesce(..., 0) is never NULL; SQLAlchemy keeps sum's Optional
    return counts


def jobs_by_state(s: Session) -> dict[str, int]:
    counts = {st.value: 0 for st in JobStatus}
    counts.update({_value(st): n for st, n in s.execute(select(Job.status, func.count()).group_by(Job.status))})
    return counts


def outbox_by_queue(s: Session) -> dict[tuple[str, str], int]:
    """Chunks not yet on the broker, per (queue, state): pending (the reconciler sends them) or held."""
    rows = s.execute(select(Job.queue, Chunk.status, func.count()).join(Job, Job.id == Chunk.job_id)
                     .where(Chunk.status.in_([ChunkStatus.pending, ChunkStatus.held]))
                     .group_by(Job.queue, Chunk.status))
    return {(q, _value(st)): n for q, st, n in rows}


FINISHED = (ItemStatus.succeeded, ItemStatus.failed, ItemStatus.cancelled)


def finished_per_second(s: Session, window_s: float = RATE_WINDOW_S, now: datetime | None = None) -> dict[str, float]:
    """Items that reached each final state in the last ``window_s`` seconds, divided by the window:
    a range of ``ix_items_status_finished`` per state, however many items finished before."""
    since = (now or utcnow()) - timedelta(seconds=window_s)
    rows = s.execute(select(Item.status, func.count())
                     .where(Item.status.in_(FINISHED), Item.finished_at >= since)
                     .group_by(Item.status))
    rates = {st.value: 0.0 for st in FINISHED}
    rates.update({_value(st): n / window_s for st, n in rows})
    return rates


@dataclass(frozen=True)
class WorkerRow:
    name: str
    source: str  # "broker": it answered now; "database": it claimed items recently
    active: tuple[str, ...] = ()  # "job_id/chunk" it is running
    running_items: int = 0
    last_started: datetime | None = None


def workers_from_db(s: Session, since: datetime) -> list[WorkerRow]:
    """Worker processes (host:pid) that hold items now or finished items since ``since``, with the
    items they hold now. Both halves are index ranges (running items; items finished since)."""
    running = func.sum(case((Item.status == ItemStatus.running, 1), else_=0))
    rows = s.execute(select(Item.worker, running, func.max(Item.started_at))
                     .where(Item.worker.is_not(None),
                            or_(Item.status == ItemStatus.running,
                                and_(Item.status.in_(FINISHED), Item.finished_at >= since)))
                     .group_by(Item.worker).order_by(func.max(Item.started_at).desc()))
    return [WorkerRow(w, "database", (), int(n or 0), last) for w, n, last in rows]


@dataclass(frozen=True)
class Failure:
    job_id: str
    index: int
    custom_id: str
    error: str
    worker: str | None
    finished_at: datetime | None
    attempts: int


def last_failures(s: Session, limit: int = 10) -> list[Failure]:
    rows = s.execute(select(Item.job_id, Item.index, Item.custom_id, Item.error, Item.worker, Item.finished_at,
                            Item.attempts).where(Item.status == ItemStatus.failed, Item.finished_at.is_not(None))
                     .order_by(Item.finished_at.desc(), Item.id.desc()).limit(limit))
    # Unpacked, not r.index: the Row's typing reads .index as tuple.index (at run time the column wins).
    return [Failure(job_id, index, custom_id, error or "", worker, finished_at, attempts)
            for job_id, index, custom_id, error, worker, finished_at, attempts in rows]


def jobs_in_flight(s: Session, limit: int = 20) -> list[JobView]:
    ids = s.scalars(select(Job.id).where(Job.status.in_(OPEN_JOB_STATES)).order_by(Job.created_at).limit(limit))
    return [job_view(s, i) for i in list(ids)]


# ---- broker -------------------------------------------------------------------------------------

class BrokerProbe:
    """Queue depths straight from Redis, and the workers that answer a broadcast right now."""

    def __init__(self, broker_url: str, inspect_timeout: float = 1.0, ssl: dict[str, Any] | None = None):
        self.broker_url = broker_url
        self.inspect_timeout = inspect_timeout
        self.ssl = ssl  # Settings.broker_ssl()

    @property
    def is_redis(self) -> bool:
        return self.broker_url.split("://", 1)[0] in ("redis", "rediss")

    @cached_property
    def redis(self):
        import redis

        return redis.Redis.from_url(self.broker_url, socket_timeout=2, socket_connect_timeout=2, **(self.ssl or {}))

    def queue_depths(self, queues: Iterable[str]) -> dict[str, int]:
        """Messages waiting in each queue (every priority list summed); not those a worker holds unacked."""
        if not self.is_redis:
            raise RuntimeError(f"queue depth is read from Redis; the broker is {self.broker_url.split('://')[0]}")
        queues = list(queues)
        pipe = self.redis.pipeline(transaction=False)
        for q in queues:
            for step in PRIORITY_STEPS:
                pipe.llen(f"{q}{PRIORITY_SEP}{step}" if step else q)
        sizes = pipe.execute()
        n = len(PRIORITY_STEPS)
        return {q: int(sum(sizes[i * n:(i + 1) * n])) for i, q in enumerate(queues)}

    def unacked(self) -> int:
        """Messages delivered to a worker and not yet acknowledged (acks late: the chunks running now)."""
        return int(self.redis.hlen("unacked"))

    def active(self) -> dict[str, list[dict[str, Any]]]:
        """{worker name: its running tasks} from the workers that answer within the timeout."""
        from scheduler.dispatch import CeleryPublisher

        app = CeleryPublisher(self.broker_url, ssl=self.ssl).app
        return app.control.inspect(timeout=self.inspect_timeout).active() or {}


def workers_from_broker(active: dict[str, list[dict[str, Any]]]) -> list[WorkerRow]:
    rows = []
    for name, tasks in sorted(active.items()):
        running = tuple(f"{t['args'][0]}/{t['args'][1]}" if t.get("name") == "worker.run_chunk"
                        and len(t.get("args") or ()) >= 2 else str(t.get("name")) for t in tasks or ())
        rows.append(WorkerRow(name, "broker", running))
    return rows


# ---- the whole picture ----------------------------------------------------------------------------

@dataclass
class QueueRow:
    name: str
    depth: int | None  # None: no broker, or it could not be read
    outbox_pending: int = 0
    outbox_held: int = 0


@dataclass
class Overview:
    at: datetime
    queues: list[QueueRow]
    workers: list[WorkerRow]
    in_flight: list[JobView]
    failures: list[Failure]
    latest: list[JobView]
    items: dict[str, int]
    jobs: dict[str, int]
    rates: dict[str, float]
    unacked: int | None = None
    problems: list[str] = field(default_factory=list)


def gather_overview(db, broker: BrokerProbe | None, *, latest: list[JobView], failures: int = 10,
                    in_flight: int = 20, workers_since_s: float = 600.0, now: datetime | None = None) -> Overview:
    """Everything ``aigc status`` shows; a broker that cannot be reached is a problem line, not an error."""
    now = now or utcnow()
    with db.session() as s:
        queues = known_queues(s)
        outbox = outbox_by_queue(s)
        seen = workers_from_db(s, now - timedelta(seconds=workers_since_s))
        ov = Overview(now, [], seen, jobs_in_flight(s, in_flight), last_failures(s, failures), latest,
                      items_by_state(s), jobs_by_state(s), finished_per_second(s, RATE_WINDOW_S, now))
    depths: dict[str, int] = {}
    if broker is not None:
        try:
            depths = broker.queue_depths(queues)
            ov.unacked = broker.unacked()
        except Exception as e:
            ov.problems.append(f"broker queues not read: {type(e).__name__}: {e}")
        try:  # broker rows are Celery nodes that answered now; database rows are processes (host:pid)
            ov.workers = workers_from_broker(broker.active()) + ov.workers
        except Exception as e:
            ov.problems.append(f"workers not asked: {type(e).__name__}: {e}")
    for q in set(queues) | {q for q, _ in outbox}:
        ov.queues.append(QueueRow(q, depths.get(q) if broker is not None and depths else None,
                                  outbox.get((q, ChunkStatus.pending.value), 0),
                                  outbox.get((q, ChunkStatus.held.value), 0)))
    ov.queues.sort(key=lambda r: r.name)
    return ov
