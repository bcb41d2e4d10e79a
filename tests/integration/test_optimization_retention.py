"""Retention of optimisations: each owner keeps the newest N finished ones; older ones go with their result rows and
artifacts (real API, worker, database and artifact store); active ones are never touched; beat schedules it."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.contract import TASK_PRUNE_OPTIMIZATIONS, beat_schedule
from shared.infra.artifact_store import ArtifactStore
from shared.infra.config import Maintenance, Settings
from shared.infra.models import Job, Optimization, OptimizationResult, RunManifest
from shared.jobs.backtests import retention as run_retention
from tests.helpers import seed_bars
from tests.integration.test_optimizations import OPT, body, create, finished

pytestmark = pytest.mark.usefixtures("celery_worker")

SYMBOL = "OPTA"


def optimisation(client: FlaskClient, fast: int) -> str:
    doc = body(parameters={"fast": [fast, fast + 1], "slow": [20, 30]}, constraints=[])
    oid: str = create(client, doc)["optimization_id"]
    view = finished(client, oid)
    assert view["status"] == "succeeded" and view["best"] is not None, view
    deadline = time.monotonic() + 30  # the worker writes the artifacts after the outcome
    while (listing := client.get(f"{OPT}/{oid}/artifacts")).status_code == 409 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listing.status_code == 200, listing.get_data(as_text=True)
    return oid


def counts(factory: sessionmaker[Session], oid: str) -> tuple[int, int, int]:
    with factory() as session:
        return (
            int(session.scalar(select(func.count()).select_from(Job).where(Job.id == oid)) or 0),
            int(session.scalar(select(func.count()).select_from(Optimization).where(Optimization.job_id == oid)) or 0),
            int(
                session.scalar(
                    select(func.count()).select_from(OptimizationResult).where(OptimizationResult.job_id == oid)
                )
                or 0
            ),
        )


def test_each_owner_keeps_the_newest_finished_optimisations(
    client: FlaskClient,
    other_client: FlaskClient,
    clean_db: Engine,
    session_factory: sessionmaker[Session],
    settings: Settings,
) -> None:
    seed_bars(clean_db, [SYMBOL], days=200, seed=5)
    active = optimisation(client, 3)  # the oldest; made active again below: never pruned, never counted
    with session_factory.begin() as session:
        session.execute(update(Job).where(Job.id == active).values(status="running", finished_at=None))
    old = [optimisation(client, fast) for fast in (5, 7)]
    newest = optimisation(client, 9)
    theirs = optimisation(other_client, 11)  # another owner's single one stays
    with session_factory() as session:
        manifests = session.scalars(select(RunManifest).where(RunManifest.job_id.in_([*old, newest])))
        dirs: dict[str, Any] = {str(m.job_id): Path(m.location) for m in manifests}
    assert all(dirs[o].is_dir() for o in [*old, newest])
    assert all(counts(session_factory, o)[2] == 4 for o in old)

    store = ArtifactStore.from_settings(settings)
    assert run_retention.prune_optimizations(session_factory, store, keep=0) == run_retention.Pruned(0, 0)
    pruned = run_retention.prune_optimizations(session_factory, store, keep=1, batch=1)
    assert pruned == run_retention.Pruned(2, 2)
    for oid in old:
        assert counts(session_factory, oid) == (0, 0, 0)  # job, optimisation and result rows gone
        assert not dirs[oid].exists()  # artifacts gone through the store
        assert client.get(f"{OPT}/{oid}").status_code == 404
    for oid in (active, newest, theirs):
        assert counts(session_factory, oid)[:2] == (1, 1)
    assert dirs[newest].is_dir()
    assert client.get(f"{OPT}/{newest}/manifest/verify").get_json()["ok"] is True
    with session_factory() as session:  # manifests stay: the owner's chain must remain checkable
        assert session.scalar(select(func.count()).select_from(RunManifest).where(RunManifest.job_id.in_(old))) == 2
    assert run_retention.prune_optimizations(session_factory, store, keep=1) == run_retention.Pruned(0, 0)


def test_beat_schedules_optimisation_retention_beside_run_retention() -> None:
    settings = Settings(maintenance=replace(Maintenance(), retention_interval_s=77.0))
    entries = {entry["task"]: entry for entry in beat_schedule(settings).values()}
    entry = entries[TASK_PRUNE_OPTIMIZATIONS]
    assert entry["schedule"] == 77.0 and entry["options"]["queue"] == "maintenance"
    assert Settings.from_env({}).maintenance.optimization_retention_keep == 100
    env = {"ALPHAFORGE_OPTIMIZATION_RETENTION_KEEP": "3"}
    assert Settings.from_env(env).maintenance.optimization_retention_keep == 3
    assert Settings.from_env(env).child_env()["ALPHAFORGE_OPTIMIZATION_RETENTION_KEEP"] == "3"
