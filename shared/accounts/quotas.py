"""Sandbox CPU quotas: what each user's sandbox children used today, per budget, counted in PostgreSQL.

The measure is the supervisor's (``wait4`` in the zygote: user + system CPU of each child), never what a child says.
Each shard adds what its children used, in a transaction of its own, to ``compute_usage`` (the owner's row for the
UTC day and budget) and to its job's ``sandbox_cpu_s``. A submission past the budget is refused (429
``quota_exceeded`` naming it); a job whose owner runs out mid-way stops: each shard that starts after that gives
every symbol the reason instead of running. A shard already running finishes, so a budget can be passed by at most
the shards running when it ran out.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Final

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import QuotaExceeded
from shared.infra.config import QUEUE_BULK
from shared.infra.db import session_scope
from shared.infra.models import ComputeUsage, Job
from shared.infra.sandbox_config import ComputeQuotas

BUDGET_INTERACTIVE: Final = "interactive"
BUDGET_NIGHTLY: Final = "nightly"
BUDGETS: Final = (BUDGET_INTERACTIVE, BUDGET_NIGHTLY)


def budget_of(job: Job) -> str:
    """Nightly work (the bulk queue) has its own budget; everything a user submits shares the other."""
    return BUDGET_NIGHTLY if job.queue == QUEUE_BULK else BUDGET_INTERACTIVE


def limit_s(quotas: ComputeQuotas, budget: str) -> float | None:
    """The budget's CPU seconds a day, None when unlimited."""
    value = quotas.nightly_cpu_s if budget == BUDGET_NIGHTLY else quotas.interactive_cpu_s
    return value or None


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def _seconds_to_midnight(now: dt.datetime | None = None) -> int:
    now = now or dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return int((midnight - now).total_seconds()) + 1


def used_s(session: Session, owner_id: str, budget: str, day: dt.date | None = None) -> float:
    value = session.scalar(
        select(ComputeUsage.cpu_s).where(
            ComputeUsage.owner_id == owner_id, ComputeUsage.day == (day or today()), ComputeUsage.budget == budget
        )
    )
    return float(value or 0.0)


def budget_standing(session: Session, owner_id: str, budget: str, quotas: ComputeQuotas) -> dict[str, Any]:
    """One budget's used, limit and left CPU seconds today (``limit_s``/``left_s`` None: unlimited)."""
    used, limit = used_s(session, owner_id, budget), limit_s(quotas, budget)
    return {
        "used_s": round(used, 3),
        "limit_s": limit,
        "left_s": None if limit is None else round(max(limit - used, 0.0), 3),
        "resets_at": dt.datetime.combine(today() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC).isoformat(),
    }


def standing(session: Session, owner_id: str, quotas: ComputeQuotas) -> dict[str, dict[str, Any]]:
    """Every budget's :func:`budget_standing`."""
    return {budget: budget_standing(session, owner_id, budget, quotas) for budget in BUDGETS}


def exhausted(session: Session, owner_id: str | None, budget: str, quotas: ComputeQuotas) -> str | None:
    """Why ``owner_id`` may not start sandbox work on ``budget`` now (None: they may)."""
    limit = limit_s(quotas, budget)
    if owner_id is None or limit is None:
        return None
    used = used_s(session, owner_id, budget)
    if used < limit:
        return None
    return (f"the daily sandbox CPU budget '{budget}' ({limit:,.0f} s) is used up ({used:,.1f} s today); "
            "it resets at 00:00 UTC")  # fmt: skip


def check_submission(session: Session, owner_id: str | None, budget: str, quotas: ComputeQuotas) -> None:
    """429 ``quota_exceeded`` naming the budget when the owner has used it up today."""
    reason = exhausted(session, owner_id, budget, quotas)
    if reason is not None:
        raise QuotaExceeded(reason, retry_after_s=_seconds_to_midnight(),
                            details={"budget": budget, "limit_s": limit_s(quotas, budget)})  # fmt: skip


def charge(factory: sessionmaker[Session], job_id: uuid.UUID, owner_id: str | None, budget: str, cpu_s: float) -> None:
    """Add what a shard's children used to the job and to its owner's budget for today, in one transaction."""
    if cpu_s <= 0:
        return
    with session_scope(factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(sandbox_cpu_s=Job.sandbox_cpu_s + cpu_s))
        if owner_id is None:
            return
        statement = insert(ComputeUsage).values(owner_id=owner_id, day=today(), budget=budget, cpu_s=cpu_s)
        session.execute(statement.on_conflict_do_update(
            index_elements=[ComputeUsage.owner_id, ComputeUsage.day, ComputeUsage.budget],
            set_={"cpu_s": ComputeUsage.cpu_s + statement.excluded.cpu_s, "updated_at": dt.datetime.now(dt.UTC)},
        ))  # fmt: skip
