"""Typed SQLAlchemy 2.0 models: the system of record. Every change goes through an Alembic revision.

One module per part of the system; everything is importable from here.
"""

from shared.infra.models.accounts import ApiKey, ComputeUsage, Script, ScriptVersion, User
from shared.infra.models.activity import AuditLog, NightlyRun, NightlyRunJob, ScriptLatestValue, WebhookDelivery
from shared.infra.models.base import Base, JobKind, JobStatus, ShardStatus, UserRole
from shared.infra.models.jobs import Job, JobResult, JobShard, SecurityEvent
from shared.infra.models.market import BarChunk, BarSeries, CorporateAction, Symbol
from shared.infra.models.research import (
    BacktestCurve,
    BacktestRun,
    Optimization,
    OptimizationResult,
    Preset,
    RunManifest,
    RunValidationPart,
    SavedUniverse,
)

__all__ = [
    "ApiKey",
    "AuditLog",
    "BacktestCurve",
    "BacktestRun",
    "BarChunk",
    "BarSeries",
    "Base",
    "ComputeUsage",
    "CorporateAction",
    "Job",
    "JobKind",
    "JobResult",
    "JobShard",
    "JobStatus",
    "NightlyRun",
    "NightlyRunJob",
    "Optimization",
    "OptimizationResult",
    "Preset",
    "RunManifest",
    "RunValidationPart",
    "SavedUniverse",
    "Script",
    "ScriptLatestValue",
    "ScriptVersion",
    "SecurityEvent",
    "ShardStatus",
    "Symbol",
    "User",
    "UserRole",
    "WebhookDelivery",
]
