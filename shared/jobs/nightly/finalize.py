"""Harvesting a nightly run: a finished job's per-symbol results copied into ``script_latest_values`` (newest
wins) and the script's cached copy in Redis dropped; the run row is closed when every job was harvested."""

from __future__ import annotations

import logging
import uuid

import redis
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from shared.infra.db import session_scope
from shared.infra.models import Job, JobStatus, NightlyRunJob
from shared.jobs.nightly.read import cache_key

log = logging.getLogger(__name__)


_FINISHED = (JobStatus.SUCCEEDED.value, JobStatus.PARTIAL.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)


def harvest(factory: sessionmaker[Session], cache: redis.Redis | None, *, limit: int = 200) -> int:
    """Copy the results of finished nightly jobs into ``script_latest_values``; finish runs whose jobs are all
    harvested. Returns how many jobs were harvested. Safe to run concurrently (row locks, skip locked)."""
    harvested = 0
    with factory() as session:
        pending = session.execute(
            select(NightlyRunJob.run_id, NightlyRunJob.job_id)
            .outerjoin(Job, Job.id == NightlyRunJob.job_id)
            .where(NightlyRunJob.harvested_at.is_(None), (Job.status.in_(_FINISHED)) | (Job.id.is_(None)))
            .limit(limit)
        ).all()
    for run_id, job_id in pending:
        with session_scope(factory) as session:
            link = session.scalars(
                select(NightlyRunJob)
                .where(NightlyRunJob.run_id == run_id, NightlyRunJob.job_id == job_id)
                .where(NightlyRunJob.harvested_at.is_(None))
                .with_for_update(skip_locked=True)
            ).first()
            if link is None:
                continue
            session.execute(
                text(
                    """
                    INSERT INTO script_latest_values
                        (script_id, symbol, value, error, script_version, job_id, computed_at)
                    SELECT :script_id, r.symbol, r.value, r.error, :version, r.job_id, r.computed_at
                    FROM job_results r
                    WHERE r.job_id = :job_id AND EXISTS (SELECT 1 FROM scripts s WHERE s.id = :script_id)
                    ON CONFLICT (script_id, symbol) DO UPDATE
                    SET value = excluded.value, error = excluded.error, script_version = excluded.script_version,
                        job_id = excluded.job_id, computed_at = excluded.computed_at
                    WHERE script_latest_values.computed_at <= excluded.computed_at
                    """
                ),
                {"script_id": link.script_id, "version": link.script_version, "job_id": job_id},
            )  # fmt: skip
            link.harvested_at = session.scalar(select(func.now()))
            script_id = link.script_id
        harvested += 1
        _drop_cached(cache, script_id)
    with session_scope(factory) as session:
        session.execute(
            text(
                """
                UPDATE nightly_runs r SET status = 'finished', finished_at = now()
                WHERE r.status = 'running' AND r.submitted_at IS NOT NULL
                  AND NOT EXISTS (SELECT 1 FROM nightly_run_jobs j WHERE j.run_id = r.id AND j.harvested_at IS NULL)
                """
            )
        )
    return harvested


def _drop_cached(cache: redis.Redis | None, script_id: uuid.UUID) -> None:
    if cache is None:
        return
    try:
        cache.delete(cache_key(script_id))
    except redis.RedisError:
        log.warning("could not drop the cached latest values of script %s", script_id, exc_info=True)
