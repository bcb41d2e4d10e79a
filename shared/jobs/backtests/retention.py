"""Retention of backtest runs and of optimisations: each owner keeps the newest N finished of each; older ones go
with their artifacts.

A deleted run's job row goes (and with it, by cascade, its shards, results, curves and run record), and so does
its artifact directory; an optimisation's job row takes its optimisation and result rows with it (cascade) and
its artifacts go the same way. Their manifest rows stay: the manifests chain per owner, and the next manifest's
``chain_prev`` must still be checkable. Active ones are never deleted and do not count against N.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import TextClause, delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import ServiceUnavailable
from shared.infra.artifact_store import ArtifactStore
from shared.infra.db import session_scope
from shared.infra.models import Job, RunManifest
from shared.jobs.backtests import read as runs

log = logging.getLogger(__name__)

DEFAULT_KEEP_RUNS = 100
DEFAULT_KEEP_OPTIMIZATIONS = 100

_EXCESS_RUNS = text(
    """
    SELECT job_id FROM (
        SELECT r.job_id, row_number() OVER (PARTITION BY r.owner_id ORDER BY r.created_at DESC, r.job_id DESC) AS rank
        FROM backtest_runs r JOIN jobs j ON j.id = r.job_id
        WHERE j.status = ANY(:finished)
    ) ranked
    WHERE rank > :keep
    ORDER BY job_id
    LIMIT :batch
    """
)


_EXCESS_OPTIMIZATIONS = text(
    """
    SELECT job_id FROM (
        SELECT o.job_id, row_number() OVER (PARTITION BY o.owner_id ORDER BY o.created_at DESC, o.job_id DESC) AS rank
        FROM optimizations o JOIN jobs j ON j.id = o.job_id
        WHERE j.status = ANY(:finished)
    ) ranked
    WHERE rank > :keep
    ORDER BY job_id
    LIMIT :batch
    """
)


@dataclass(frozen=True)
class Pruned:
    runs: int
    artifact_dirs: int


def prune_runs(
    factory: sessionmaker[Session], store: ArtifactStore, *, keep: int = DEFAULT_KEEP_RUNS, batch: int = 500
) -> Pruned:
    """Delete every owner's finished runs beyond the newest ``keep`` (``keep`` 0: keep all), in batches; their
    artifacts go through ``store`` (the data directory's folders or the bucket's objects alike)."""
    return _prune(factory, store, _EXCESS_RUNS, "runs", keep=keep, batch=batch)


def prune_optimizations(
    factory: sessionmaker[Session], store: ArtifactStore, *, keep: int = DEFAULT_KEEP_OPTIMIZATIONS, batch: int = 500
) -> Pruned:
    """Delete every owner's finished optimisations beyond the newest ``keep`` (``keep`` 0: keep all), with their
    result rows (cascade) and their artifacts (through ``store``). ``Pruned.runs`` counts optimisations here."""
    return _prune(factory, store, _EXCESS_OPTIMIZATIONS, "optimizations", keep=keep, batch=batch)


def _prune(
    factory: sessionmaker[Session], store: ArtifactStore, excess: TextClause, what: str, *, keep: int, batch: int
) -> Pruned:
    if keep <= 0:
        return Pruned(0, 0)
    deleted = dirs = 0
    while True:
        with session_scope(factory) as session:
            params = {"finished": sorted(runs.FINAL_STATUSES), "keep": keep, "batch": batch}
            ids: list[uuid.UUID] = list(session.scalars(excess, params))
            if not ids:
                return Pruned(deleted, dirs)
            locations = list(session.scalars(select(RunManifest.location).where(RunManifest.job_id.in_(ids))))
            session.execute(delete(Job).where(Job.id.in_(ids)))
        for location in locations:
            try:
                if store.delete_run(location):
                    dirs += 1
            except ServiceUnavailable:  # the rows are gone already; a store that is down keeps their files
                log.exception("%s retention: artifacts at %s not deleted", what, location)
        deleted += len(ids)
        log.info("%s retention: deleted %d beyond the newest %d per owner", what, len(ids), keep)
