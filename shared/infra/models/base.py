"""The declarative base, the enums stored as checked strings, and the check they share."""

from __future__ import annotations

import enum

from sqlalchemy.orm import DeclarativeBase


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
    INTERACTIVE = "interactive"  # a /try or /api/security/execute run: one shard, one answer


class UserRole(str, enum.Enum):
    USER = "user"
    ADMIN = "admin"


def enum_check(column: str, enum_cls: type[enum.Enum]) -> str:
    values = ", ".join(f"'{member.value}'" for member in enum_cls)
    return f"{column} IN ({values})"
