"""Database schema (SQLAlchemy 2). The database is the source of truth; Redis only carries wake-ups."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import Enum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BigInteger keys do not autoincrement on SQLite; Integer there is the same 64-bit rowid.
BigId = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class JobStatus(str, Enum):
    # being written a batch at a time (a streamed submit): nothing runs it until it is whole
    submitting = "submitting"
    waiting = "waiting"  # for the jobs it depends on (after=, or items from another job's outputs)
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    partially_failed = "partially_failed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_JOB_STATES


FINAL_JOB_STATES = frozenset(
    {JobStatus.succeeded, JobStatus.partially_failed, JobStatus.failed, JobStatus.cancelled}
)


class ItemStatus(str, Enum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


OPEN_ITEM_STATES = (ItemStatus.pending, ItemStatus.running)


class ChunkStatus(str, Enum):
    held = "held"  # its job is waiting for another job
    pending = "pending"  # in the outbox, not yet on the broker
    published = "published"
    done = "done"  # every item final: the reconciler and the overview never read it again


def _enum(cls: type[Enum], name: str) -> SAEnum:
    return SAEnum(cls, name=name, native_enum=False, length=24, validate_strings=True)


class Model(Base):
    """A registered model version: name@version -> URI, with lineage for fine-tuned ones."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    backend: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(Text)
    revision: Mapped[str | None] = mapped_column(String(128))
    digest: Mapped[str | None] = mapped_column(String(80))
    queue: Mapped[str] = mapped_column(String(64))
    defaults: Mapped[dict[str, Any]] = mapped_column(default=dict)
    lineage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))
    model_name: Mapped[str] = mapped_column(String(128))
    # None while waiting for a fine-tune that registers the model; fixed when the job is released.
    model_version: Mapped[int | None] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(64))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    seed: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    payload_digest: Mapped[str] = mapped_column(String(64))
    item_count: Mapped[int] = mapped_column(Integer)
    chunk_size: Mapped[int] = mapped_column(Integer)
    # [{"job": id, "require": "succeeded" | "final"}]: released when every one is final.
    depends_on: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Written when the job finishes (its items by final state), so counting finished work over all
    # jobs reads the jobs table, not every item ever finished. None while the job is open.
    succeeded_items: Mapped[int | None] = mapped_column(Integer)
    failed_items: Mapped[int | None] = mapped_column(Integer)
    cancelled_items: Mapped[int | None] = mapped_column(Integer)
    # The job option ``reuse``: an item identical to an earlier succeeded one refers to its output
    # (worker/reuse.py); reused_items is written when the job finishes, as the counts above.
    reuse: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    reused_items: Mapped[int | None] = mapped_column(Integer)
    # Set by ``aigc gc`` in the transaction that decides to remove the job (aigc_core/retention.py): from
    # then on no reuse refers to its outputs. A run that stops before the job is gone leaves the mark,
    # which only keeps its outputs from being reused until a later run removes it.
    removing: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))

    items: Mapped[list[Item]] = relationship(back_populates="job", lazy="raise")


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("job_id", "index"),
        UniqueConstraint("job_id", "custom_id"),
        Index("ix_items_job_chunk_status", "job_id", "chunk_no", "status"),
        Index("ix_items_status_lease", "status", "lease_until"),  # the reconciler's expired-lease scan
        # Recent activity (items finished per second, workers seen, the last failures) reads a range of
        # this, not every item ever finished.
        Index("ix_items_status_finished", "status", "finished_at"),
        # A delivery's own items (heartbeat, commit, release) by its claim token, without scanning every
        # running item of the fleet; partial, so submitting (no token yet) does not pay for it.
        Index("ix_items_claim_token", "claim_token", postgresql_where=text("claim_token IS NOT NULL"),
              sqlite_where=text("claim_token IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    chunk_no: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(128))
    prompt: Mapped[str] = mapped_column(Text)
    # {"job": id, "custom_id": ...}: the prompt is that item's text output, read when the item runs.
    source: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # [{"role": ..., "content": ...}] for a chat item (rendered by the model's chat template); else None.
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    seed: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[ItemStatus] = mapped_column(_enum(ItemStatus, "item_status"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    lease_until: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="items", lazy="raise")


class Artifact(Base):
    """The one committed output of an item: object key, digest and provenance."""

    __tablename__ = "artifacts"
    __table_args__ = (
        # The reuse lookup: one IN query per chunk over the keys of generated outputs (reused ones have none).
        Index("ix_artifacts_reuse_key", "reuse_key", "id", postgresql_where=text("reuse_key IS NOT NULL"),
              sqlite_where=text("reuse_key IS NOT NULL")),
        # A job's reused count without reading its other artifacts.
        Index("ix_artifacts_reused_job", "job_id", postgresql_where=text("reused_from_id IS NOT NULL"),
              sqlite_where=text("reused_from_id IS NOT NULL")),
        # gc's question "does another job refer to this job's outputs?", one index probe per job.
        Index("ix_artifacts_reused_from_job", "reused_from_job", postgresql_where=text("reused_from_job IS NOT NULL"),
              sqlite_where=text("reused_from_job IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(Text)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(64))
    duration_s: Mapped[float | None] = mapped_column(Float)  # audio
    provenance: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # sha256 of what made a generated output (weights digest, effective parameters, rendered prompt,
    # seed: worker/reuse.py); None when the model's digest is unknown, and on reused outputs.
    reuse_key: Mapped[str | None] = mapped_column(String(64))
    # A reused output: the id of the artifact it reuses (no foreign key: a copy made before 0008 outlives
    # its original's job).
    reused_from_id: Mapped[int | None] = mapped_column(BigInteger)
    # A reused output that refers to another job's object (``key`` is under that job's prefix): gc keeps
    # that job while this row exists. None on generated outputs, on a reference within its own job, and
    # on the copies made before 0008 (their objects are their own).
    reused_from_job: Mapped[str | None] = mapped_column(String(32))


class Chunk(Base):
    """The outbox: one row per chunk; pending until the broker accepted its message."""

    __tablename__ = "chunks"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    chunk_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[ChunkStatus] = mapped_column(_enum(ChunkStatus, "chunk_status"), index=True)
    publish_count: Mapped[int] = mapped_column(Integer, default=0)
    published_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    """Things that happened to a job: model loads, retries, finalization, training metrics."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class CatchUp(str, Enum):
    """What a schedule does with slots missed while no scheduler ran (see scheduler/cron/schedules.py)."""

    none = "none"  # only a slot that is due now (within the grace period) fires
    latest = "latest"  # the newest missed slot fires, once
    all = "all"  # every missed slot fires, oldest first, at most catchup_cap of the newest


class RunOutcome(str, Enum):
    pending = "pending"  # claimed, being submitted; a later tick retries it if the claimer died
    submitted = "submitted"
    skipped_overlap = "skipped_overlap"  # max_concurrent of its jobs were still open
    failed = "failed"  # the template did not make a valid job; the error says why


class Schedule(Base):
    """A cron schedule (from schedules.yaml): a job template fired once per slot through Client.submit."""

    __tablename__ = "schedules"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    cron: Mapped[str] = mapped_column(String(128))
    timezone: Mapped[str] = mapped_column(String(64))
    template: Mapped[dict[str, Any]] = mapped_column(default=dict)
    catchup: Mapped[CatchUp] = mapped_column(_enum(CatchUp, "schedule_catchup"))
    catchup_cap: Mapped[int] = mapped_column(Integer)
    max_concurrent: Mapped[int] = mapped_column(Integer)
    # Declared in the file; the CLI's pause/resume is paused_at, so a re-sync never undoes a pause.
    enabled: Mapped[bool] = mapped_column(Boolean)
    paused_at: Mapped[datetime | None]
    # UTC ISO slot ("2026-03-29T01:00:00Z"): every slot up to here was fired or passed over.
    last_slot: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ScheduleRun(Base):
    """One slot of one schedule: the unique (schedule, slot) row is the claim that makes firing exactly-once."""

    __tablename__ = "schedule_runs"
    __table_args__ = (UniqueConstraint("schedule", "slot"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    schedule: Mapped[str] = mapped_column(ForeignKey("schedules.name", ondelete="CASCADE"))
    slot: Mapped[str] = mapped_column(String(20))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    outcome: Mapped[RunOutcome] = mapped_column(_enum(RunOutcome, "schedule_run_outcome"))
    manual: Mapped[bool] = mapped_column(Boolean, default=False)  # aigc schedules run-now
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A bearer key of the OpenAI-compatible API (scheduler/api/); only its sha256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class ApiFile(Base):
    """A file of the API (a batch's input, output or errors), its bytes in the object store."""

    __tablename__ = "api_files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiBatch(Base):
    """An OpenAI-style batch: one job (none when its input failed validation) plus what the API shows."""

    __tablename__ = "api_batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    # Set when the batch failed validation or its output was written; otherwise read from the job.
    status: Mapped[str | None] = mapped_column(String(16))
    meta: Mapped[dict[str, Any] | None]
    errors: Mapped[dict[str, Any] | None]
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
