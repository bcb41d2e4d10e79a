"""Typed SQLAlchemy 2.0 models: the system of record. Every change goes through an Alembic revision."""

from __future__ import annotations

import datetime as dt
import enum
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
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ShardStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobKind(str, enum.Enum):
    CALCULATION = "calculation"
    BACKTEST = "backtest"
    OPTIMIZATION = "optimization"


class UserRole(str, enum.Enum):
    USER = "user"
    ADMIN = "admin"


def _enum_check(column: str, enum_cls: type[enum.Enum]) -> str:
    values = ", ".join(f"'{member.value}'" for member in enum_cls)
    return f"{column} IN ({values})"


class Symbol(Base):
    __tablename__ = "symbols"

    symbol: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(Text)
    is_synthetic: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DailyBar(Base):
    __tablename__ = "daily_bars"

    symbol: Mapped[str] = mapped_column(String(32), ForeignKey("symbols.symbol", ondelete="CASCADE"), primary_key=True)
    date: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    open: Mapped[float] = mapped_column(Double, nullable=False)
    high: Mapped[float] = mapped_column(Double, nullable=False)
    low: Mapped[float] = mapped_column(Double, nullable=False)
    close: Mapped[float] = mapped_column(Double, nullable=False)
    volume: Mapped[int] = mapped_column(BigInteger, nullable=False)


class Job(Base):
    """One submitted job. Progress counters are updated only by the shard-completion transaction."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_enum_check("status", JobStatus), name="ck_jobs_status"),
        CheckConstraint(_enum_check("kind", JobKind), name="ck_jobs_kind"),
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_owner_status", "owner_id", "status"),
        CheckConstraint("(script_id IS NULL) = (script_version IS NULL)", name="ck_jobs_script_ref"),
        Index("ix_jobs_unfinalized", "kind", postgresql_where=text("finalized_at IS NULL")),
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
    start_date: Mapped[dt.date | None] = mapped_column(Date)
    end_date: Mapped[dt.date | None] = mapped_column(Date)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
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
    # When its kind's finalize hook ran (shared/jobs/pipeline.py finish_job); NULL before, or for a kind without one.
    finalized_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class JobShard(Base):
    """A batch of a job's symbols: the unit of one Celery task."""

    __tablename__ = "job_shards"
    __table_args__ = (
        UniqueConstraint("job_id", "index", name="uq_job_shards_job_index"),
        CheckConstraint(_enum_check("status", ShardStatus), name="ck_job_shards_status"),
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
    # A backtest run's validation task (shared/domain/robustness.py ``Task``: method, task index, draws, work) instead
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


class User(Base):
    """An account. ``id`` is a UUID in text form: it is what ``jobs.owner_id`` and ``security_events.owner_id``
    (String(64) since issue 2) hold. Usernames are stored lower-cased, so uniqueness ignores case."""

    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint(_enum_check("role", UserRole), name="ck_users_role"),
        CheckConstraint("username = lower(username)", name="ck_users_username_lower"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: str(uuid.uuid4()))
    username: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    password_hash: Mapped[str] = mapped_column(Text, nullable=False)  # argon2id, PHC string
    role: Mapped[str] = mapped_column(String(16), nullable=False, default=UserRole.USER.value)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="true", default=True)
    webhook_secret: Mapped[str | None] = mapped_column(String(64))  # signs this user's job callbacks (jobs/webhooks)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ApiKey(Base):
    """A long-lived credential for programs. Only the SHA-256 of the key is stored (the key is 256 random bits,
    so a slow password hash adds nothing); revoking keeps the row for the record."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_owner", "owner_id"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)  # shown in listings to tell keys apart
    key_sha256: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Script(Base):
    """A saved calculation script. ``version`` is the number of the current code in ``script_versions``."""

    __tablename__ = "scripts"
    __table_args__ = (
        UniqueConstraint("owner_id", "name", name="uq_scripts_owner_name"),
        Index("ix_scripts_owner_updated", "owner_id", "updated_at"),
        CheckConstraint("NOT nightly OR cardinality(universe) > 0", name="ck_scripts_nightly_universe"),
        CheckConstraint("kind IN ('calculation', 'strategy')", name="ck_scripts_kind"),
        CheckConstraint("kind = 'calculation' OR NOT nightly", name="ck_scripts_strategy_not_nightly"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    code: Mapped[str] = mapped_column(Text, nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    nightly: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false", default=False)
    universe: Mapped[list[str]] = mapped_column(ARRAY(String(32)), nullable=False, server_default="{}", default=list)
    # "calculation" (assigns ``result``) or "strategy" (assigns signals; shared/library/strategy_scripts.py), fixed at
    # creation; a strategy's declared parameters (name -> {type, default, min, max, description}), as of
    # ``version`` (each version keeps its own in ``script_versions``).
    kind: Mapped[str] = mapped_column(String(16), nullable=False, server_default="calculation", default="calculation")
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}", default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ScriptVersion(Base):
    """Every code text a script has had, numbered from 1; the highest is the current one."""

    __tablename__ = "script_versions"

    script_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("scripts.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(Text, nullable=False)
    code_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}", default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WebhookDelivery(Base):
    """One delivery attempt of a job's webhook: what the receiver answered, or why it could not be reached."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_job", "job_id", "attempt"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    )
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float | None] = mapped_column(Double)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class NightlyRun(Base):
    """One nightly recalculation: every script flagged ``nightly`` submitted as a job of its owner (bulk queue).

    ``submitted_at`` is set once every job is submitted; the run is finished when all its jobs are finished and
    their values harvested into ``script_latest_values``. While a run is not finished no other run starts."""

    __tablename__ = "nightly_runs"
    __table_args__ = (
        CheckConstraint("status IN ('running', 'finished')", name="ck_nightly_runs_status"),
        Index("ix_nightly_runs_status", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    trigger: Mapped[str] = mapped_column(String(16), nullable=False)  # schedule | manual
    requested_by: Mapped[str | None] = mapped_column(String(64))  # the admin who asked (manual runs)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="running")
    scripts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    jobs: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    submitted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class NightlyRunJob(Base):
    """A job of a nightly run, and whether its values were copied into ``script_latest_values`` yet. No foreign
    key to the job: retention may delete it after its values were harvested."""

    __tablename__ = "nightly_run_jobs"
    __table_args__ = (Index("ix_nightly_run_jobs_pending", "harvested_at"),)

    run_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("nightly_runs.id", ondelete="CASCADE"), primary_key=True
    )
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    script_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    script_version: Mapped[int] = mapped_column(Integer, nullable=False)
    harvested_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class ScriptLatestValue(Base):
    """The newest nightly value (or error) of a saved script for one symbol: what a screener reads in one call."""

    __tablename__ = "script_latest_values"

    script_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("scripts.id", ondelete="CASCADE"), primary_key=True
    )
    symbol: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[float | None] = mapped_column(Double)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    script_version: Mapped[int] = mapped_column(Integer, nullable=False)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)  # no FK: retention
    computed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class AuditLog(Base):
    """Who did what to which resource, and in which request. No foreign keys on purpose: the record must
    outlive the resource and the account (a failed login may even name a user that does not exist)."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_actor_created", "actor_id", "created_at"),
        Index("ix_audit_log_resource", "resource_type", "resource_id"),
        Index("ix_audit_log_created", "created_at"),
        Index("ix_audit_log_request", "request_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    actor_id: Mapped[str | None] = mapped_column(String(64))
    actor_username: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    resource_type: Mapped[str | None] = mapped_column(String(32))
    resource_id: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128))
    client_address: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)


class BacktestRun(Base):
    """A backtest job's run record: its validated config and the config's canonical hash.

    The job row (kind ``backtest``) carries status, shards and per-symbol results like any job; this row adds
    what only a run has. ``(owner_id, config_hash)`` is unique: submitting the same config again finds this run.
    """

    __tablename__ = "backtest_runs"
    __table_args__ = (
        UniqueConstraint("owner_id", "config_hash", name="uq_backtest_runs_owner_config"),
        Index("ix_backtest_runs_owner_created", "owner_id", "created_at"),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    owner_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str | None] = mapped_column(String(100))
    strategy: Mapped[str] = mapped_column(String(64), nullable=False)
    config: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    config_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    # Portfolio-level metrics of a finished multi-symbol run (equal-cash sleeves), computed once on first read.
    portfolio: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    # The run's validation spec (shared.domain.robustness.ValidationSpec; NULL: none) and, once the run is final, the
    # result combined from its tasks' parts (computed once, then kept).
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    validation_result: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    # A script strategy's exact code (the pinned version's text, copied at submission like a calculation job's
    # script): the run stays explainable and runnable after the script changes or is deleted.
    strategy_code: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class BacktestCurve(Base):
    """One symbol's daily equity curve in a run (for portfolio metrics, charts): written by the shard task."""

    __tablename__ = "backtest_curves"

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    symbol: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Compact (backtests.service.pack_curve / load_curves): dates as big-endian int32 days since 1970-01-01, equity and
    # benchmark as big-endian float64; arrays of dates and doubles cost ~15x more to write.
    dates: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    equity: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    # Buy and hold of the same cash from the first tradable bar (the chart's benchmark), and the closed trades.
    benchmark: Mapped[bytes | None] = mapped_column(LargeBinary)
    trades: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False, server_default="[]", default=list)


class RunValidationPart(Base):
    """What one validation task of a run produced: its draws as float64 bytes (a bootstrap draw is three
    values) and its baseline or, for walk-forward, its symbols' results (``detail``)."""

    __tablename__ = "run_validation_parts"

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    method: Mapped[str] = mapped_column(String(32), primary_key=True)
    task_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    draws: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    computed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RunManifest(Base):
    """The manifest of a run's artifacts: each file's name, size and SHA-256, chained to the owner's previous
    manifest (``chain_prev`` is that manifest's ``manifest_sha256``) so that an altered or removed file, or a
    rewritten manifest, is detectable. No foreign keys on purpose: the chain must outlive deleted runs."""

    __tablename__ = "run_manifests"
    __table_args__ = (
        UniqueConstraint("job_id", name="uq_run_manifests_job"),
        Index("ix_run_manifests_owner_id", "owner_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    owner_id: Mapped[str] = mapped_column(String(64), nullable=False)
    location: Mapped[str] = mapped_column(Text, nullable=False)  # the artifact directory
    manifest: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    manifest_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    chain_prev: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class SavedUniverse(Base):
    """A user's named list of symbols (``/api/universes``); a run may be created over it by id or name."""

    __tablename__ = "universes"
    __table_args__ = (
        UniqueConstraint("owner_id", "name", name="uq_universes_owner_name"),
        CheckConstraint("cardinality(symbols) > 0", name="ck_universes_symbols"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    symbols: Mapped[list[str]] = mapped_column(ARRAY(String(32)), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Preset(Base):
    """A user's named backtest config without symbols (``/api/presets``); a run may start from it.
    ``config_hash`` is the SHA-256 of the config's canonical JSON: creating the same name and config again
    finds this row."""

    __tablename__ = "presets"
    __table_args__ = (UniqueConstraint("owner_id", "name", name="uq_presets_owner_name"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    config: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    config_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Optimization(Base):
    """An optimisation job's record (``shared.jobs.optimizations``): its validated spec and the spec's canonical hash.

    The job row (kind ``optimization``) carries status and shards (one per slice of combos, ``JobShard.task``);
    ``(owner_id, spec_hash)`` is unique: submitting the same spec again finds this row. ``outcome`` (best
    combo with full metrics, walk-forward path) is computed once the job is final, then kept."""

    __tablename__ = "optimizations"
    __table_args__ = (
        UniqueConstraint("owner_id", "spec_hash", name="uq_optimizations_owner_spec"),
        Index("ix_optimizations_owner_created", "owner_id", "created_at"),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    owner_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str | None] = mapped_column(String(100))
    strategy: Mapped[str] = mapped_column(String(64), nullable=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    spec_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    combos: Mapped[int] = mapped_column(Integer, nullable=False)
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    # A script strategy's pinned code and declared parameters (kept: deleting the script keeps what ran).
    strategy_code: Mapped[str | None] = mapped_column(Text)
    script_parameters: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class OptimizationResult(Base):
    """One parameter combination's summary metrics in one optimisation (``window``: the walk-forward window
    whose in-sample period it was scored on; 0 for a plain optimisation). NaN metrics are stored as NULL."""

    __tablename__ = "optimization_results"

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    window: Mapped[int] = mapped_column(Integer, primary_key=True)
    combo_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    symbols: Mapped[int] = mapped_column(Integer, nullable=False)  # symbols with a result in this combo
    equity_final: Mapped[float | None] = mapped_column(Double)
    return_pct: Mapped[float | None] = mapped_column(Double)
    return_ann_pct: Mapped[float | None] = mapped_column(Double)
    volatility_ann_pct: Mapped[float | None] = mapped_column(Double)
    sharpe: Mapped[float | None] = mapped_column(Double)
    max_drawdown_pct: Mapped[float | None] = mapped_column(Double)
    trades: Mapped[float | None] = mapped_column(Double)
    win_rate_pct: Mapped[float | None] = mapped_column(Double)
