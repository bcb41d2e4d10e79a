"""Retention: finished calculation jobs (with their shards and results) are deleted after an age, and beyond a
number per owner. Active jobs are never touched.

Deletes go in small batches (each its own transaction), so a large backlog never holds long locks on ``jobs``
while workers finalize shards. Shards and results go with their job (foreign keys ``ON DELETE CASCADE``);
security events and audit rows are kept on purpose (they must outlive the job). Nightly values survive too:
``script_latest_values`` keeps its own copy.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from shared.infra.db import session_scope
from shared.infra.models import JobKind, JobStatus

log = logging.getLogger(__name__)

FINISHED = (JobStatus.SUCCEEDED.value, JobStatus.PARTIAL.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)
BATCH = 500


@dataclass(frozen=True)
class PruneReport:
    by_age: int
    by_count: int


def _delete_in_batches(factory: sessionmaker[Session], select_ids_sql: str, params: dict[str, object]) -> int:
    total = 0
    while True:
        with session_scope(factory) as session:
            deleted = session.execute(
                text(f"DELETE FROM jobs WHERE id IN ({select_ids_sql} LIMIT :batch)"), {**params, "batch": BATCH}
            ).rowcount  # type: ignore[attr-defined]
        total += int(deleted or 0)
        if not deleted or deleted < BATCH:
            return total


def prune(
    factory: sessionmaker[Session],
    *,
    max_age_days: int,
    max_jobs_per_owner: int,
    kinds: Collection[str] = (JobKind.CALCULATION.value,),
) -> PruneReport:
    """Delete finished jobs of ``kinds`` older than ``max_age_days`` (0: no age limit), then each owner's finished
    jobs beyond the newest ``max_jobs_per_owner`` (0: no count limit)."""
    params: dict[str, object] = {"kinds": list(kinds), "finished": list(FINISHED)}
    by_age = 0
    if max_age_days > 0:
        by_age = _delete_in_batches(
            factory,
            "SELECT id FROM jobs WHERE kind = ANY(:kinds) AND status = ANY(:finished)"
            " AND coalesce(finished_at, created_at) < now() - make_interval(days => :days)"
            " ORDER BY coalesce(finished_at, created_at)",
            {**params, "days": max_age_days},
        )
    by_count = 0
    if max_jobs_per_owner > 0:
        by_count = _delete_in_batches(
            factory,
            "SELECT id FROM (SELECT id, row_number() OVER (PARTITION BY owner_id"
            " ORDER BY coalesce(finished_at, created_at) DESC, id DESC) AS rank"
            " FROM jobs WHERE kind = ANY(:kinds) AND status = ANY(:finished)) ranked WHERE rank > :keep",
            {**params, "keep": max_jobs_per_owner},
        )
    if by_age or by_count:
        log.info("retention: deleted %d jobs older than %d days and %d beyond %d per owner",
                 by_age, max_age_days, by_count, max_jobs_per_owner)  # fmt: skip
    return PruneReport(by_age, by_count)
