"""Row reads of optimisations, for views and for finalizing: the job and its optimisation, a window's stored rows,
the slices' tasks, progress in combos and the ranked table. Nothing here computes with the engine."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import and_, case, func, select, true
from sqlalchemy.orm import Session

from shared.domain.search.plan import Task
from shared.domain.search.scoring import failed_reasons
from shared.domain.search.spec import METRIC_NAMES, METRICS, OptimizationSpec
from shared.errors import NotFound
from shared.infra import pagination
from shared.infra.models import Job, JobShard, Optimization, OptimizationResult
from shared.jobs import pipeline as jobs


def find(session: Session, owner_id: str, spec_hash: str, data_sha256: str) -> tuple[Job, Optimization] | None:
    """The owner's optimisation of this spec on this data."""
    return jobs.job_with_record(
        session,
        Optimization,
        Optimization.job_id,
        Optimization.owner_id == owner_id,
        Optimization.spec_hash == spec_hash,
        Optimization.data_sha256 == data_sha256,
    )


def get(session: Session, job_id: uuid.UUID) -> tuple[Job, Optimization]:
    found = jobs.job_with_record(session, Optimization, Optimization.job_id, Job.id == job_id)
    if found is None:
        raise NotFound(f"optimization {job_id} not found", details={"optimization_id": str(job_id)})
    return found


def load_summary(
    session: Session, job_id: uuid.UUID, window: int
) -> tuple[NDArray[np.int64], list[dict[str, Any]], NDArray[np.float64]]:
    """A window's rows: combo indices, params and the metric matrix (NULL as NaN), by combo index."""
    rows = session.execute(
        select(
            OptimizationResult.combo_index,
            OptimizationResult.params,
            *(getattr(OptimizationResult, n) for n in METRIC_NAMES),
        )
        .where(OptimizationResult.job_id == job_id, OptimizationResult.window == window)
        .order_by(OptimizationResult.combo_index)
    ).all()
    index = np.array([r[0] for r in rows], dtype=np.int64)
    params = [r[1] for r in rows]
    summary = np.array([[math.nan if v is None else v for v in r[2:]] for r in rows], dtype=np.float64)
    return index, params, summary.reshape(len(rows), len(METRICS))


def job_tasks(session: Session, job_id: uuid.UUID) -> list[tuple[Task, str]]:
    rows = session.execute(
        select(JobShard.task, JobShard.status)
        .where(JobShard.job_id == job_id, JobShard.task.is_not(None))
        .order_by(JobShard.index)
    ).all()
    return [(Task.from_dict(t), status) for t, status in rows]


def progress_counts(session: Session, job_id: uuid.UUID) -> tuple[int, int]:
    """(combos scored, combos planned), over every window (rows stored so far: a running slice stores chunks)."""
    planned = sum(t.hi - t.lo for t, _ in job_tasks(session, job_id))
    done = session.scalar(
        select(func.count()).select_from(OptimizationResult).where(OptimizationResult.job_id == job_id)
    )
    return int(done or 0), planned


def _order(spec: OptimizationSpec) -> list[Any]:
    col = getattr(OptimizationResult, spec.objective.metric)
    primary = col.desc().nulls_last() if spec.objective.direction == "max" else col.asc().nulls_last()
    return [primary, OptimizationResult.combo_index]


def _passes(spec: OptimizationSpec) -> Any:

    conds = []
    for c in spec.constraints:
        col = getattr(OptimizationResult, c.metric)
        conds.append({">=": col >= c.value, "<=": col <= c.value, ">": col > c.value, "<": col < c.value}[c.op])
    return and_(true(), *conds)


@dataclass(frozen=True)
class RankedRow:
    rank: int | None  # 1-based among the rows that pass; None for a filtered-out row
    combo_index: int
    window: int
    params: dict[str, Any]
    metrics: dict[str, float | None]
    symbols: int
    passed: bool
    reasons: list[str]


def ranked_page(
    session: Session,
    job_id: uuid.UUID,
    spec: OptimizationSpec,
    *,
    window: int,
    cursor: str | None,
    limit: int,
    include_filtered: bool,
) -> tuple[list[RankedRow], int, int, str | None]:
    """A page of the ranked table: the rows passing every constraint, best first (ties: lower combo index; an
    undefined objective last); with ``include_filtered`` the rows that fail follow, each with its reasons. Also the
    (passing, total) counts and the next page's cursor: the last row's sort key and how many passing rows the pages
    so far held (the next page's ranks continue from it)."""
    passes = func.coalesce(_passes(spec), False)  # a NULL metric makes a condition NULL: such a row fails
    base = select(OptimizationResult).where(OptimizationResult.job_id == job_id, OptimizationResult.window == window)
    total = int(session.scalar(select(func.count()).select_from(base.subquery())) or 0)
    passing = int(session.scalar(select(func.count()).select_from(base.where(passes).subquery())) or 0)
    group = case((passes, 0), else_=1)
    objective = getattr(OptimizationResult, spec.objective.metric)
    order = (
        *((pagination.Sort(group),) if include_filtered else ()),
        pagination.Sort(objective, descending=spec.objective.direction == "max", nullable=True),
        pagination.Sort(OptimizationResult.combo_index),
    )
    parsers = (*((pagination.integer,) if include_filtered else ()), pagination.number, pagination.integer)
    ranked_before = 0
    start = None
    if cursor:
        *start, ranked_before = pagination.decode_cursor(cursor, (*parsers, pagination.integer))
    keyset: pagination.Keyset[Any] = pagination.Keyset(order, parsers, lambda row: row)
    query = (base if include_filtered else base.where(passes)).add_columns(group)
    rows = list(session.execute(keyset.after_key(query, start).limit(limit + 1)))
    out = []
    for r, row_group in rows[:limit]:
        metrics = {n: getattr(r, n) for n in METRIC_NAMES}
        reasons = failed_reasons(metrics, spec.constraints)
        ranked = row_group == 0 and not reasons
        ranked_before += 1 if ranked else 0
        out.append(
            RankedRow(
                ranked_before if ranked else None,
                r.combo_index,
                r.window,
                r.params,
                metrics,
                r.symbols,
                not reasons,
                reasons,
            )
        )
    next_cursor = None
    if len(rows) > limit:
        last, last_group = rows[limit - 1]
        key = (*((last_group,) if include_filtered else ()), getattr(last, spec.objective.metric), last.combo_index)
        next_cursor = pagination.encode_cursor([*key, ranked_before])
    return out, passing, total, next_cursor
