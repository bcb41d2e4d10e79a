"""The job pipeline: jobs, shards, per-symbol results, sandbox rejections (shared/jobs)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from shared.infra.models.base import Base, JobKind, JobStatus, ShardStatus, enum_check


class Job(Base):
    """One submitted job. Progress counters are updated only by the shard-completion transaction."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(enum_check("status", JobStatus), name="ck_jobs_status"),
        CheckConstraint(enum_check("kind", JobKind), name="ck_jobs_kind"),
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_owner_status", "owner_id", "status"),
        CheckConstraint("(script_id IS NULL) = (script_version IS NULL)", name="ck_jobs_script_ref"),
        CheckConstraint("timeframe IN ('1m', '5m', '15m', '30m', '1h', '1d', '1w', '1mo')", name="ck_jobs_timeframe"),
        CheckConstraint("adjustment IN ('none', 'splits', 'total_return')", name="ck_jobs_adjustment"),
        CheckConstraint("sandbox_timeout_s IS NULL OR sandbox_timeout_s > 0", name="ck_jobs_sandbox_timeout"),
        CheckConstraint("sandbox_memory_mb IS NULL OR sandbox_memory_mb > 0", name="ck_jobs_sandbox_memory"),
        # The reconciler's finalize pass (shared/jobs/reconciler.py): ended jobs of a kind with a finalization not
        # yet done. Active jobs are in it too (few); ended ones leave it when finalized.
        Index("ix_jobs_unfinalized", "kind", "finished_at", postgresql_where=text("finalized_at IS NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    # Webhook (shared/jobs/webhooks.py): where the summary goes when the job ends, and how its delivery stands.
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_state: Mapped[str | None] = mapped_column(String(16))  # pending | delivered | failed
    callback_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0", default=0)
    callback_next_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    callback_last_error: Mapped[str | None] = mapped_column(Text)
    # Which Celery queue its shards go to (and go back to when the reconciler re-publishes them).
    queue: Mapped[str] = mapped_column(String(16), nullable=False, server_default="interactive", default="interactive")
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=JobStatus.QUEUED.value)
    # Every job the API writes has an owner; NULL only for jobs written before accounts existed (admins see those).
    owner_id: Mapped[str | None] = mapped_column(String(64), ForeignKey("users.id"))
    column_name: Mapped[str] = mapped_column(String(100), nullable=False)
    script: Mapped[str] = mapped_column(Text, nullable=False)  # the exact text that ran, whatever its source
    script_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    # When run from a saved script: which one and which version. No foreign key on purpose: deleting the script
    # must keep the job, its results and the record of what it ran.
    script_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    script_version: Mapped[int | None] = mapped_column(Integer)
    symbols: Mapped[list[str]] = mapped_column(ARRAY(String(32)), nullable=False)
    symbols_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    # The data it was submitted on (shared.marketdata.bars.DataStamp): the SHA-256 of its symbols' data versions and
    # the newest of them. NULL on jobs from before data versions.
    data_sha256: Mapped[str | None] = mapped_column(String(64))
    data_version: Mapped[int | None] = mapped_column(BigInteger)
    start_date: Mapped[dt.date | None] = mapped_column(Date)
    end_date: Mapped[dt.date | None] = mapped_column(Date)
    # What a calculation's scripts read (shared.marketdata.bars.load_bars); a run's and an optimisation's config says.
    timeframe: Mapped[str] = mapped_column(String(4), nullable=False, default="1d", server_default="1d")
    adjustment: Mapped[str] = mapped_column(String(16), nullable=False, default="none", server_default="none")
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    # A calculation's own sandbox limits, within the operator's bounds (NULL: the worker's), and print capture.
    sandbox_timeout_s: Mapped[float | None] = mapped_column(Double)
    sandbox_memory_mb: Mapped[int | None] = mapped_column(Integer)
    capture_output: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    sandbox_cpu_s: Mapped[float] = mapped_column(Double, nullable=False, default=0.0, server_default="0")
    shard_size: Mapped[int] = mapped_column(Integer, nullable=False)
    shards_total: Mapped[int] = mapped_column(Integer, nullable=False)
    shards_done: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    shards_failed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    symbols_total: Mapped[int] = mapped_column(Integer, nullable=False)
    symbols_done: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    symbols_failed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # When the job kind's finalization (shared/jobs/pipeline.Finalize: a run's portfolio and validation result) was
    # stored, in a worker, once the job had ended with no shard open; NULL while active, not yet finalized, or of a
    # kind without one. ``finalize_error``: why that finalization raised (then it is not retried by itself).
    finalized_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finalize_error: Mapped[str | None] = mapped_column(Text)


class JobShard(Base):
    """A batch of a job's symbols: the unit of one Celery task."""

    __tablename__ = "job_shards"
    __table_args__ = (
        UniqueConstraint("job_id", "index", name="uq_job_shards_job_index"),
        CheckConstraint(enum_check("status", ShardStatus), name="ck_job_shards_status"),
        Index("ix_job_shards_status", "status"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    )
    index: Mapped[int] = mapped_column(Integer, nullable=False)
    symbols: Mapped[list[str]] = mapped_column(ARRAY(String(32)), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=ShardStatus.QUEUED.value)
    task_id: Mapped[str] = mapped_column(String(64), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Self-healing (shared/jobs/reconciler.py): when the current task_id was published, and how often the reconciler
    # re-published the shard because its task had vanished (bounded; then the shard fails with the reason).
    enqueued_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    requeues: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0", default=0)
    # The running delivery's lease (shared/jobs/leases.py): who claimed the shard last (worker node name and pool pid)
    # and until when; renewed while its task runs. Expired on a running shard: its holder died or stalled, and the
    # reconciler re-publishes it at once. NULL: claimed without a lease (then the grace rule judges it).
    lease_holder: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # A backtest run's validation task (shared/domain/robustness ``Task``: method, task index, draws, work) instead
    # of symbols (``symbols`` is then empty); NULL for a shard of symbols.
    task: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))


class JobResult(Base):
    """One symbol's outcome: a value, or an error (type, message, script line)."""

    __tablename__ = "job_results"
    __table_args__ = (CheckConstraint("value IS NULL OR error IS NULL", name="ck_job_results_value_or_error"),)

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    symbol: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[float | None] = mapped_column(Double)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    # What a job kind keeps beside the one value (a backtest: the symbol's full metrics); NULL for calculations.
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    data_version: Mapped[int | None] = mapped_column(BigInteger)  # of the symbol's bars it was computed from
    computed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class SecurityEvent(Base):
    """One rejection of untrusted code by a sandbox layer: who, which job and symbol, which layer, why.

    No foreign keys on purpose: the record must outlive the job (retention) and the account it names.
    """

    __tablename__ = "security_events"
    __table_args__ = (
        Index("ix_security_events_job", "job_id"),
        Index("ix_security_events_created", "created_at"),
        Index("ix_security_events_owner_created", "owner_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    owner_id: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    symbol: Mapped[str | None] = mapped_column(String(32))
    layer: Mapped[str] = mapped_column(String(32), nullable=False)
    reason: Mapped[str] = mapped_column(String(64), nullable=False)
    detail: Mapped[str] = mapped_column(Text, nullable=False, default="")
