"""Retention as beat runs it: a real beat and worker (their own Redis database) prune finished calculation jobs and
finished backtest runs (with their artifacts) on ``ALPHAFORGE_RETENTION_INTERVAL``, by the configured limits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.contract import TASK_PRUNE_JOBS, TASK_PRUNE_RUNS, beat_schedule, create_celery
from shared.infra.artifact_store import ArtifactStore
from shared.infra.config import Maintenance, Settings
from shared.infra.models import BacktestRun, Job, JobKind, RunManifest
from tests.helpers import ApiUser, seed_bars
from tests.integration.test_faults_worker_kill import Processes, wait_for
from tests.integration.test_retention import make_job
from tests.integration.test_run_retention import finished_run

RETENTION_REDIS_DB = 11


def test_beat_schedules_both_retentions_on_the_configured_interval() -> None:
    settings = Settings(maintenance=replace(Maintenance(), retention_interval_s=123.0))
    entries = {entry["task"]: entry for entry in beat_schedule(settings).values()}
    for task in (TASK_PRUNE_JOBS, TASK_PRUNE_RUNS):
        assert entries[task]["schedule"] == 123.0 and entries[task]["options"]["queue"] == "maintenance"
    assert Settings.from_env({"ALPHAFORGE_RUN_RETENTION_KEEP": "7"}).maintenance.run_retention_keep == 7
    assert Settings.from_env({}).maintenance.run_retention_keep == 100
    assert Settings.from_env({"ALPHAFORGE_RUN_RETENTION_KEEP": "0"}).maintenance.run_retention_keep == 0  # keep all


@pytest.fixture
def retention_settings(settings: Settings) -> Iterator[Settings]:
    base, _, _db = settings.require_redis_url().rpartition("/")
    scheduled = settings.with_overrides(
        redis_url=f"{base}/{RETENTION_REDIS_DB}",
        maintenance=replace(
            Maintenance(),
            retention_interval_s=1.0,
            retention_days=30,
            retention_max_jobs=2,
            run_retention_keep=1,
            nightly_schedule="off",
        ),
    )
    client = redis.Redis.from_url(scheduled.require_redis_url())
    client.flushdb()
    yield scheduled
    client.flushdb()
    client.close()


def test_the_scheduled_tasks_prune_jobs_and_runs(
    retention_settings: Settings, session_factory: sessionmaker[Session], engine: Engine, user: ApiUser
) -> None:
    seed_bars(engine, ["RET1", "RET2"], days=120)
    store = ArtifactStore.from_settings(retention_settings)
    runs = [finished_run(session_factory, store, user.id, fast) for fast in (3, 4, 5)]
    old = make_job(session_factory, user.id, status="succeeded", age_days=40)  # past the age limit
    recent = [make_job(session_factory, user.id, status="succeeded", age_days=d) for d in (3, 2, 1)]  # 1 over count
    queued = make_job(session_factory, user.id, status="queued", age_days=50)  # active: never touched
    with session_factory() as session:
        manifests = session.scalars(select(RunManifest).where(RunManifest.job_id.in_(runs)))
        dirs = {m.job_id: Path(m.location) for m in manifests}
    assert all(dirs[r].is_dir() for r in runs)

    procs = Processes(retention_settings)
    app = create_celery(retention_settings)
    try:
        procs.start("retention-worker", "worker", "--hostname", "retention@%h", "--concurrency", "1")
        procs.start("retention-beat", "beat", "--schedule", str(retention_settings.data_dir / "retention-beat"))

        def calculation_jobs() -> set[str]:
            with session_factory() as session:
                return {str(j) for j in session.scalars(select(Job.id).where(Job.kind == JobKind.CALCULATION.value))}

        def backtest_runs() -> set[object]:
            with session_factory() as session:
                return set(session.scalars(select(BacktestRun.job_id)))

        def pruned() -> bool:  # the rows go in one transaction, then their artifact directories
            rows_gone = calculation_jobs() == {*recent[1:], queued} and backtest_runs() == {runs[-1]}
            return rows_gone and not any(dirs[r].exists() for r in runs[:2])

        wait_for(pruned, 90, "beat's retention tasks to prune")
    finally:
        app.close()
        procs.stop_all()
    assert dirs[runs[-1]].is_dir()  # the kept run keeps its artifacts
    with session_factory() as session:
        manifests_left = select(func.count()).select_from(RunManifest).where(RunManifest.job_id.in_(runs))
        assert session.scalar(manifests_left) == 3  # manifests stay for the chain
    log = procs.log("retention-worker")
    assert TASK_PRUNE_RUNS in log and TASK_PRUNE_JOBS in log
    assert old not in calculation_jobs()
