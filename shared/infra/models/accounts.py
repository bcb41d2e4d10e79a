"""Users, API keys and saved scripts (shared/accounts, shared/library)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
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
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from shared.infra.models.base import Base, UserRole, enum_check


class User(Base):
    """An account. ``id`` is a UUID in text form: it is what ``jobs.owner_id`` and ``security_events.owner_id``
    (String(64): a UUID or a short name) hold. Usernames are stored lower-cased, so uniqueness ignores case."""

    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint(enum_check("role", UserRole), name="ck_users_role"),
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


class ComputeUsage(Base):
    """Sandbox CPU seconds one owner used on one UTC day against one budget (shared/accounts/quotas.py)."""

    __tablename__ = "compute_usage"
    __table_args__ = (
        CheckConstraint("budget IN ('interactive', 'nightly')", name="ck_compute_usage_budget"),
        CheckConstraint("cpu_s >= 0", name="ck_compute_usage_cpu"),
    )

    owner_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    budget: Mapped[str] = mapped_column(String(16), primary_key=True)
    cpu_s: Mapped[float] = mapped_column(Double, nullable=False, default=0.0, server_default="0")
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
