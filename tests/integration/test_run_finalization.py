"""A backtest run is finalized in a worker, never by a view: its portfolio and validation result exist by the time
its status reads final, and ``GET /api/runs/<id>`` answers the full view with the engine unavailable in the API
process. Runs that end with no shard left to finalize them (cancelled while every shard waited, a lost last shard,
a failed enqueue) are finalized by a worker task or by the reconciler's finalize pass."""

from __future__ import annotations

import importlib
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, Row, event, select, text, update
from sqlalchemy.orm import Session, sessionmaker

import shared.domain.backtest
import shared.domain.backtest.engine
import shared.domain.backtest.simulator
from shared.contract import TASK_RUN_BACKTEST_SHARD, create_celery, shard_enqueuer
from shared.domain import robustness
from shared.domain.backtest import BacktestConfig
from shared.domain.robustness import methods as robustness_methods
from shared.domain.robustness import portfolio as robustness_portfolio
from shared.domain.robustness import tasks as robustness_tasks
from shared.errors import ServiceUnavailable
from shared.infra.config import Settings
from shared.infra.models import BacktestRun, Job, JobShard
from shared.jobs import pipeline, reconciler
from shared.jobs.backtests import finalize, read, shard, submit
from tests.helpers import FINAL, ApiUser, seed_bars

# The package exports a function of the same name as this submodule: reach the module itself.
robustness_walk_forward = importlib.import_module("shared.domain.robustness.walk_forward")

RUNS = "/api/runs"
SYMBOLS = ["FIN0", "FIN1", "FIN2", "FIN3"]
VALIDATION = {"permutation": {"n": 10}, "bootstrap": {"n": 20, "block": 10}, "chunk": 5}
FINALIZERS: dict[str, pipeline.Finalize] = {"backtest": finalize.finalize_run}

ENGINE_ENTRY_POINTS = [
    (shared.domain.backtest, "run_backtest"),
    (shared.domain.backtest.engine, "run_backtest"),
    (shared.domain.backtest.engine, "compute_metrics"),
    (shared.domain.backtest.simulator, "simulate"),
    (shard, "run_backtest"),
    (robustness_methods, "run_backtest"),
    (robustness_portfolio, "run_backtest"),
    (robustness_walk_forward, "run_backtest"),
    (robustness, "sleeves"),
    (robustness_portfolio, "sleeves"),
    (robustness, "combine"),
    (robustness_tasks, "combine"),
    (robustness, "portfolio_curve"),
    (robustness_portfolio, "portfolio_curve"),
    (finalize, "portfolio_curve"),
    (finalize, "portfolio_metrics"),
    (finalize, "run_portfolio"),
    (finalize, "run_validation_result"),
    (finalize, "finalize_run"),
    (finalize, "curve_batches"),
    (finalize, "load_parts"),
    (read, "load_curves"),
    (read, "curve_batches"),
    (read, "load_parts"),
    (pipeline, "finalize_locked"),
    (pipeline, "finalize_job"),
]


def body(symbols: list[str] = SYMBOLS, validation: dict[str, Any] | None = VALIDATION) -> dict[str, Any]:
    return {"symbols": symbols, "strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 20}}, "seed": 7,
            **({"validation": validation} if validation else {})}  # fmt: skip


def forbid_engine_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine, numba and finalization entry point raises in this (the API's) process from now on."""

    def refusing(name: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"engine work in the API process: {name}")

        return refuse

    for module, name in ENGINE_ENTRY_POINTS:
        monkeypatch.setattr(module, name, refusing(f"{module.__name__}.{name}"))


def stored(factory: sessionmaker[Session], run_id: uuid.UUID) -> Row[Any]:
    """One snapshot of the job's status and finalization and the run's stored view rows."""
    with factory() as session:
        return session.execute(
            select(Job.status, Job.finalized_at, BacktestRun.portfolio, BacktestRun.validation_result)
            .join(BacktestRun, BacktestRun.job_id == Job.id)
            .where(Job.id == run_id)
        ).one()


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s"
        time.sleep(0.02)
    return value


def submit_nowhere(factory: sessionmaker[Session], settings: Settings, owner: str, spec: dict[str, Any]) -> uuid.UUID:
    """A run whose shards are published on a queue no worker reads: they stay queued."""
    celery = create_celery(settings)
    try:
        config = BacktestConfig.model_validate({k: v for k, v in spec.items() if k != "validation"})
        validation = robustness.ValidationSpec.model_validate(spec["validation"])
        submitted = submit.submit_run(
            factory, submit.RunRequest(config=config, owner_id=owner, validation=validation), shard_size=2,
            enqueue=shard_enqueuer(celery, TASK_RUN_BACKTEST_SHARD, queue=f"nobody-{secrets.token_hex(4)}"),
        )  # fmt: skip
    finally:
        celery.close()
    return submitted.job.id


def test_a_just_finished_run_is_viewed_without_engine_work(
    client: FlaskClient,
    engine: Engine,
    session_factory: sessionmaker[Session],
    celery_worker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed_bars(engine, SYMBOLS, days=200, seed=13)
    response = client.post(RUNS, json=body())
    assert response.status_code == 202, response.get_json()
    run_id = uuid.UUID(response.get_json()["run_id"])

    # The first snapshot in which the status is final already holds everything the view shows.
    final = wait_until(lambda: (row := stored(session_factory, run_id)).status in FINAL and row, 180, "run final")
    assert final.status == "succeeded" and final.finalized_at is not None
    assert final.portfolio is not None and final.portfolio["sleeves"] == len(SYMBOLS)
    assert final.validation_result is not None
    assert set(final.validation_result["methods"]) == {"permutation", "bootstrap"}

    forbid_engine_work(monkeypatch)
    with session_factory() as session, pytest.raises(AssertionError, match="engine work"):
        job, run = read.get_run(session, run_id)  # the patches are live: computing here would fail
        finalize.run_portfolio(session, job, run)
    view = client.get(f"{RUNS}/{run_id}")
    assert view.status_code == 200, view.get_json()
    shown = view.get_json()
    assert shown["status"] == "succeeded" and shown["progress"]["percent"] == 100.0
    assert [s["symbol"] for s in shown["symbols"]] == SYMBOLS and all(s["error"] is None for s in shown["symbols"])
    assert shown["portfolio"] == final.portfolio
    assert shown["validation"]["result"] == final.validation_result
    methods = shown["validation"]["result"]["methods"]
    assert methods["permutation"]["complete"] and methods["permutation"]["draws"] == 10
    assert methods["bootstrap"]["complete"] and methods["bootstrap"]["draws"] == 20
    assert client.get(f"{RUNS}/{run_id}/results").status_code == 200
    assert client.get(f"/api/jobs/{run_id}").get_json()["status"] == "succeeded"
    assert client.get(f"{RUNS}?limit=5").get_json()["runs"][0]["run_id"] == str(run_id)


def test_a_run_cancelled_while_every_shard_waited_is_finalized_by_a_worker(
    client: FlaskClient,
    settings: Settings,
    user: ApiUser,
    engine: Engine,
    session_factory: sessionmaker[Session],
    celery_worker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No shard task finishes to finalize it: the cancel sends the worker task that does (then the artifacts)."""
    seed_bars(engine, SYMBOLS[:2], days=120, seed=14)
    run_id = submit_nowhere(session_factory, settings, user.id, body(SYMBOLS[:2]))
    forbid_engine_work(monkeypatch)
    cancelled = client.post(f"{RUNS}/{run_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    row = wait_until(lambda: (r := stored(session_factory, run_id)).finalized_at is not None and r, 60, "finalized")
    assert row.portfolio is None  # no symbol ran: no curve
    view = client.get(f"{RUNS}/{run_id}").get_json()
    assert view["status"] == "cancelled" and view["validation"]["result"] == row.validation_result
    for block in view["validation"]["result"]["methods"].values():
        assert block["draws"] == 0 and block["tasks_done"] == 0 and not block["complete"]
    wait_until(lambda: client.get(f"{RUNS}/{run_id}/artifacts").get_json()["status"] == "ready", 60, "artifacts")


def test_the_reconciler_finalizes_ended_runs_nobody_finalized(
    client: FlaskClient, settings: Settings, user: ApiUser, engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    """A run cancelled while a shard ran whose worker then died (its lease lapses), and a run whose enqueue failed:
    the frequent pass closes the lost shard and finalizes the first; the full pass (past the grace) the second."""
    seed_bars(engine, SYMBOLS[:2], days=120, seed=15)
    lost_run = submit_nowhere(session_factory, settings, user.id, body(SYMBOLS[:2]))
    with session_factory() as session, session.begin():
        lost_shard = session.scalar(select(JobShard.id).where(JobShard.job_id == lost_run, JobShard.task.is_(None)))
        session.execute(update(JobShard).where(JobShard.id == lost_shard).values(status="running",
                        lease_holder="dead worker", lease_expires_at=text("now() - interval '1 minute'")))  # fmt: skip
    assert client.post(f"{RUNS}/{lost_run}/cancel").get_json()["status"] == "cancelled"  # a shard "runs": no task
    assert stored(session_factory, lost_run).finalized_at is None
    assert client.get(f"{RUNS}/{lost_run}").get_json()["validation"]["result"] is None

    def refuse(tasks: Any) -> None:
        raise ConnectionError("broker down")

    config = BacktestConfig.model_validate(body(SYMBOLS[:2], validation=None))
    with pytest.raises(ServiceUnavailable):
        submit.submit_run(session_factory, submit.RunRequest(config, user.id), shard_size=1, enqueue=refuse)
    with session_factory() as session:
        unqueued = session.scalar(select(Job.id).where(Job.id != lost_run, Job.status == "failed"))
    assert unqueued is not None and stored(session_factory, unqueued).finalized_at is None

    frequent = reconciler.finalize_ended(session_factory, finalizers=FINALIZERS, grace_s=3600, queued=False)
    assert frequent.finalized == [("backtest", lost_run)] and frequent.shards_closed == 1
    with session_factory() as session:
        closed = session.get(JobShard, lost_shard)
        assert closed is not None and closed.status == "cancelled" and closed.error == reconciler.LOST_AFTER_END
    row = stored(session_factory, lost_run)
    assert row.finalized_at is not None and row.validation_result is not None
    assert client.get(f"{RUNS}/{lost_run}").get_json()["validation"]["result"] == row.validation_result
    assert stored(session_factory, unqueued).finalized_at is None  # not lost, not past the grace: left alone

    full = reconciler.finalize_ended(session_factory, finalizers=FINALIZERS, grace_s=0, queued=True)
    assert full.finalized == [("backtest", unqueued)] and full.shards_closed == 0
    assert stored(session_factory, unqueued).finalized_at is not None
    again = reconciler.finalize_ended(session_factory, finalizers=FINALIZERS, grace_s=0, queued=True)
    assert again.finalized == [] and again.shards_closed == 0


def test_a_view_reads_the_job_and_its_run_from_one_snapshot(
    settings: Settings, engine: Engine, session_factory: sessionmaker[Session], user: ApiUser
) -> None:
    """The finalization that ends a run commits its status and its portfolio together; a view that read them in two
    statements could see the run before that commit and the job after it (final, without its portfolio). Here the
    commit lands right after the view's first statement: what the view returns is the state before it, whole."""
    seed_bars(engine, SYMBOLS, days=30)
    run_id = submit_nowhere(session_factory, settings, user.id, body(validation=None) | {"validation": {}})
    committed: list[bool] = []

    def finalize_meanwhile(*args: Any) -> None:
        if committed:
            return
        committed.append(True)
        with engine.begin() as conn:  # another connection: the worker's transaction that ends and finalizes the run
            conn.execute(update(Job).where(Job.id == run_id).values(status="succeeded", finalized_at=text("now()")))
            conn.execute(update(BacktestRun).where(BacktestRun.job_id == run_id).values(portfolio={"sleeves": 4}))

    event.listen(engine, "after_cursor_execute", finalize_meanwhile)
    try:
        with session_factory() as session:
            job, run = read.get_run(session, run_id)
    finally:
        event.remove(engine, "after_cursor_execute", finalize_meanwhile)
    assert committed
    assert (job.status, run.portfolio) == ("queued", None)
    with session_factory() as session:
        job, run = read.get_run(session, run_id)
    assert (job.status, run.portfolio) == ("succeeded", {"sleeves": 4})
