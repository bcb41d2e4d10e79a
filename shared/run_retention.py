"""Retention of backtest runs: each owner keeps the newest N finished runs; older ones go with their artifacts.

A deleted run's job row goes (and with it, by cascade, its shards, results, curves and run record), and so does
its artifact directory. Its manifest row stays: the manifests chain per owner, and the next manifest's
``chain_prev`` must still be checkable. Active runs are never deleted and do not count against N.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from shared import runs
from shared.artifact_store import ArtifactStore
from shared.db import session_scope
from shared.errors import ServiceUnavailable
from shared.models import Job, RunManifest

log = logging.getLogger(__name__)

DEFAULT_KEEP_RUNS = 100

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


@dataclass(frozen=True)
class Pruned:
    runs: int
    artifact_dirs: int


def prune_runs(
    factory: sessionmaker[Session], store: ArtifactStore, *, keep: int = DEFAULT_KEEP_RUNS, batch: int = 500
) -> Pruned:
    """Delete every owner's finished runs beyond the newest ``keep`` (``keep`` 0: keep all), in batches; their
    artifacts go through ``store`` (the data directory's folders or the bucket's objects alike)."""
    if keep <= 0:
        return Pruned(0, 0)
    deleted = dirs = 0
    while True:
        with session_scope(factory) as session:
            params = {"finished": sorted(runs.FINAL_STATUSES), "keep": keep, "batch": batch}
            ids: list[uuid.UUID] = list(session.scalars(_EXCESS_RUNS, params))
            if not ids:
                return Pruned(deleted, dirs)
            locations = list(session.scalars(select(RunManifest.location).where(RunManifest.job_id.in_(ids))))
            session.execute(delete(Job).where(Job.id.in_(ids)))
        for location in locations:
            try:
                if store.delete_run(location):
                    dirs += 1
            except ServiceUnavailable:  # the runs are gone already; a store that is down keeps their files
                log.exception("run retention: artifacts at %s not deleted", location)
        deleted += len(ids)
        log.info("run retention: deleted %d runs beyond the newest %d per owner", len(ids), keep)
