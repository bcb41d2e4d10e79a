"""Run retention: the newest N finished runs per owner stay; older ones go with their artifact directories."""

from __future__ import annotations

import uuid
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.domain.backtest import BacktestConfig
from shared.infra.artifact_store import ArtifactStore
from shared.infra.config import Settings
from shared.infra.models import BacktestRun, Job, JobShard, RunManifest
from shared.jobs.backtests import artifacts
from shared.jobs.backtests import shard as run_shards
from shared.jobs.backtests import submit as runs
from shared.jobs.backtests.retention import prune_runs
from tests.helpers import ApiUser, seed_bars


def finished_run(factory: sessionmaker[Session], store: ArtifactStore, owner: str, fast: int) -> uuid.UUID:
    """A run written by the service and run in this process (no worker needed), with its artifacts."""
    config = BacktestConfig.model_validate(
        {"symbols": ["RET1", "RET2"], "strategy": {"name": "dual_sma", "params": {"fast": fast, "slow": 30}}}
    )
    job_id = runs.submit_run(factory, runs.RunRequest(config, owner), shard_size=1, enqueue=lambda t: None).job.id
    with factory() as session:
        shard_ids = list(session.scalars(select(JobShard.id).where(JobShard.job_id == job_id)))
    for shard_id in shard_ids:
        assert run_shards.run_shard(factory, shard_id) is True
    assert artifacts.build_if_finished(factory, store, job_id) is not None
    return job_id


def test_prune_keeps_the_newest_finished_runs_per_owner(
    session_factory: sessionmaker[Session], engine: Engine, settings: Settings, user: ApiUser, other_user: ApiUser
) -> None:
    seed_bars(engine, ["RET1", "RET2"], days=120)
    store = ArtifactStore.from_settings(settings)
    mine = [finished_run(session_factory, store, user.id, fast) for fast in (3, 4, 5, 6, 7)]
    theirs = [finished_run(session_factory, store, other_user.id, fast) for fast in (3, 4)]
    active = runs.submit_run(
        session_factory,
        runs.RunRequest(BacktestConfig.model_validate({"symbols": ["RET1"], "strategy": {"name": "buy_and_hold"}}),
                        user.id),
        shard_size=1,
        enqueue=lambda t: None,
    ).job.id  # fmt: skip
    with session_factory() as session:
        dirs = {
            m.job_id: Path(m.location)
            for m in session.scalars(select(RunManifest).where(RunManifest.job_id.in_([*mine, *theirs])))
        }
    assert all(d.is_dir() for d in dirs.values())

    pruned = prune_runs(session_factory, store, keep=2)
    assert pruned.runs == 3 and pruned.artifact_dirs == 3
    with session_factory() as session:
        left = set(session.scalars(select(BacktestRun.job_id)))
        assert left == {*mine[-2:], *theirs, active}
        assert session.scalar(select(func.count()).select_from(Job).where(Job.id.in_(mine[:3]))) == 0
        owners = RunManifest.owner_id.in_([user.id, other_user.id])
        assert session.scalar(select(func.count()).select_from(RunManifest).where(owners)) == 7  # the chain stays
        newest = session.scalar(select(RunManifest).where(RunManifest.job_id == mine[-1]))
        assert newest is not None and artifacts.verify(session, store, newest)["ok"] is True
    assert not any(dirs[j].exists() for j in mine[:3]) and all(dirs[j].is_dir() for j in (*mine[-2:], *theirs))
    assert prune_runs(session_factory, store, keep=2) == type(pruned)(0, 0)  # nothing more to do
    assert prune_runs(session_factory, store, keep=0).runs == 0  # 0 keeps everything
