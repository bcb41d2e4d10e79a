"""What happens around jobs: webhook deliveries, nightly runs, latest values, the audit log."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from shared.infra.models.base import Base


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
