"""Shard leases (jobs/leases.py) with real processes: a worker's main process is killed with SIGKILL while it runs
shards of a calculation job and of a backtest run, a second worker and Celery beat keep running, and the stranded
shards run again within 15 s of the kill, with the default lease settings; each symbol is stored exactly once.

Also: a heartbeat keeps a shard that runs several times its lease out of the reconciler's reach; a lapsed lease whose
holder is silent is judged even when no worker answers; the heartbeat stops with its task, whatever the outcome.
(A lapsed lease whose task a live worker still holds is left alone: tests/integration/test_reconciler.py.)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from shared.contract import TASK_RUN_BACKTEST_SHARD, create_celery, shard_enqueuer
from shared.domain.backtest import BacktestConfig
from shared.infra.config import Maintenance, SandboxLimits, Settings
from shared.infra.db import make_engine
from shared.infra.models import Job, JobResult, JobShard
from shared.jobs import calculations, leases, reconciler
from shared.jobs import pipeline as jobs
from shared.jobs.backtests import submit as runs
from shared.jobs.calculations import CalculationRequest
from tests.helpers import FINAL, ApiUser, seed_bars
from tests.integration.test_faults_worker_kill import Processes, kill_mid_work, wait_for

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

LEASE_REDIS_DB = 14
RERUN_BOUND_S = 15.0  # a shard whose worker died is re-run within 15 s
SLOW = "s = 0\nfor i in range(600000):\n    s += i\nresult = close[-1]"  # a few tenths of a second per symbol


@pytest.fixture
def lease_settings(settings: Settings) -> Iterator[Settings]:
    """A Redis database of its own and the DEFAULT lease and reconciler settings (only the nightly run off)."""
    base, _, _db = settings.require_redis_url().rpartition("/")
    own = settings.with_overrides(
        redis_url=f"{base}/{LEASE_REDIS_DB}", maintenance=replace(Maintenance(), nightly_schedule="off")
    )
    defaults = Maintenance()
    assert (own.maintenance.shard_lease_s, own.maintenance.shard_lease_renew_s, own.maintenance.reconcile_interval_s) \
        == (defaults.shard_lease_s, defaults.shard_lease_renew_s, defaults.reconcile_interval_s)  # fmt: skip
    client = redis.Redis.from_url(own.require_redis_url())
    client.flushdb()
    yield own
    client.flushdb()
    client.close()


@pytest.fixture
def lease_processes(lease_settings: Settings) -> Iterator[Processes]:
    procs = Processes(lease_settings)
    yield procs
    procs.stop_all()


def _held(factory: sessionmaker[Session], job_id: uuid.UUID, holder_prefix: str) -> dict[int, int]:
    """The job's running shards whose lease the given worker holds: shard id → attempts."""
    with factory() as session:
        rows = session.execute(
            select(JobShard.id, JobShard.attempts).where(
                JobShard.job_id == job_id, JobShard.status == "running", JobShard.lease_holder.startswith(holder_prefix)
            )
        ).all()
    return {shard_id: attempts for shard_id, attempts in rows}


def _kill_mid_job_and_measure(
    factory: sessionmaker[Session], app: Celery, procs: Processes, submit: Callable[[], uuid.UUID], tag: str
) -> tuple[uuid.UUID, dict[int, int], float, float]:
    """Workers A and B and beat; submit; SIGKILL A's main process while it holds running shards; return the job,
    the stranded shards (id → attempts at the kill), seconds from the kill until every one of them was claimed
    again (its attempts + 1), and until the job ended."""
    worker_a = procs.start(f"{tag}-a", "worker", "--hostname", f"{tag}-a@%h", "--concurrency", "2")
    procs.start(f"{tag}-b", "worker", "--hostname", f"{tag}-b@%h", "--concurrency", "2")
    procs.start(f"{tag}-beat", "beat", "--schedule", str(procs.settings.data_dir / f"{tag}-beat-schedule"))
    wait_for(lambda: len(app.control.ping(timeout=0.5)) >= 2, 90, "workers A and B")
    job_id = submit()

    def a_is_mid_job() -> bool:
        with factory() as session:
            done = session.scalar(select(func.count()).where(JobShard.job_id == job_id, JobShard.status == "succeeded"))
        return bool(_held(factory, job_id, f"{tag}-a@")) and (done or 0) >= 1

    killed_at = kill_mid_work(worker_a, a_is_mid_job, lambda: bool(_held(factory, job_id, f"{tag}-a@")), 90)
    stranded = _held(factory, job_id, f"{tag}-a@")  # what A held when its pool died: nobody renews these now
    assert stranded, "worker A finished its shards before it died: nothing to recover"

    def rerun() -> bool:
        with factory() as session:
            rows = session.execute(select(JobShard.id, JobShard.attempts).where(JobShard.id.in_(stranded))).all()
        return all(attempts > stranded[shard_id] for shard_id, attempts in rows)

    wait_for(rerun, 120, "the stranded shards to run again")
    rerun_s = time.monotonic() - killed_at

    def finished() -> bool:
        with factory() as session:
            return session.scalar(select(Job.status).where(Job.id == job_id)) in FINAL

    wait_for(finished, 180, "the job to finish after the kill")
    return job_id, stranded, rerun_s, time.monotonic() - killed_at


def _assert_each_symbol_once(factory: sessionmaker[Session], job_id: uuid.UUID, symbols: list[str]) -> Job:
    with factory() as session:
        final = session.get(Job, job_id)
        assert final is not None
        stored = session.execute(
            select(JobResult.symbol, func.count()).where(JobResult.job_id == job_id).group_by(JobResult.symbol)
        ).all()
        errors = session.scalars(select(JobResult.error).where(JobResult.job_id == job_id)).all()
    assert final.status == "succeeded", final.error
    assert (final.shards_done, final.symbols_done, final.symbols_failed) == (final.shards_total, len(symbols), 0)
    assert sorted(symbol for symbol, _ in stored) == sorted(symbols) and {n for _, n in stored} == {1}
    assert set(errors) == {None}
    return final


def _stranded_came_back(factory: sessionmaker[Session], stranded: dict[int, int], tag: str) -> None:
    with factory() as session:
        rows = session.execute(
            select(JobShard.requeues, JobShard.lease_holder, JobShard.status).where(JobShard.id.in_(stranded))
        ).all()
    # re-published by the reconciler (not by the broker: the messages sit in ``unacked`` for an hour), run by B
    assert all(r >= 1 and (holder or "").startswith(f"{tag}-b@") and s == "succeeded" for r, holder, s in rows), rows


def test_calculation_shards_of_a_killed_worker_run_again_within_15_s(
    clean_db: Engine, session_factory: sessionmaker[Session], lease_settings: Settings, lease_processes: Processes
) -> None:
    symbols = [f"LC{i:02d}" for i in range(40)]
    seed_bars(clean_db, symbols, days=30)
    app = create_celery(lease_settings)
    try:

        def submit() -> uuid.UUID:
            request = CalculationRequest(script=SLOW, column_name="c", symbols=symbols)
            return calculations.submit_calculation(session_factory, request, shard_size=2,
                                                   enqueue=shard_enqueuer(app)).id  # fmt: skip

        job_id, stranded, rerun_s, end_s = _kill_mid_job_and_measure(
            session_factory, app, lease_processes, submit, "lease-calc"
        )
    finally:
        app.close()
    _assert_each_symbol_once(session_factory, job_id, symbols)
    _stranded_came_back(session_factory, stranded, "lease-calc")
    maint = lease_settings.maintenance
    print(f"\n[lease] calculation: SIGKILL of worker A with {len(stranded)} shards running (lease "
          f"{maint.shard_lease_s} s, renewed every {maint.shard_lease_renew_s} s, reconciler every "
          f"{maint.reconcile_interval_s} s): running again {rerun_s:.1f} s after the kill, job ended {end_s:.1f} s "
          "after it")  # fmt: skip
    assert rerun_s <= RERUN_BOUND_S, f"the stranded shards ran again only {rerun_s:.1f} s after the kill"


def test_backtest_shards_of_a_killed_worker_run_again_within_15_s(
    clean_db: Engine,
    session_factory: sessionmaker[Session],
    lease_settings: Settings,
    lease_processes: Processes,
    user: ApiUser,
) -> None:
    symbols = [f"LB{i:02d}" for i in range(36)]
    seed_bars(clean_db, symbols, days=400)
    app = create_celery(lease_settings)
    try:

        def submit() -> uuid.UUID:
            config = BacktestConfig.model_validate(
                {"symbols": symbols, "strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 30}}}
            )
            return runs.submit_run(session_factory, runs.RunRequest(config, user.id), shard_size=3,
                                   enqueue=shard_enqueuer(app, TASK_RUN_BACKTEST_SHARD)).job.id  # fmt: skip

        job_id, stranded, rerun_s, end_s = _kill_mid_job_and_measure(
            session_factory, app, lease_processes, submit, "lease-run"
        )
    finally:
        app.close()
    _assert_each_symbol_once(session_factory, job_id, symbols)
    _stranded_came_back(session_factory, stranded, "lease-run")
    print(f"\n[lease] backtest run: SIGKILL of worker A with {len(stranded)} shards running: running again "
          f"{rerun_s:.1f} s after the kill, run ended {end_s:.1f} s after it")  # fmt: skip
    assert rerun_s <= RERUN_BOUND_S, f"the stranded shards ran again only {rerun_s:.1f} s after the kill"


# --- a live lease is left alone; a silent holder is not waited for --------------------------------------------------


def test_a_heartbeat_keeps_a_shard_that_runs_longer_than_its_lease(
    clean_db: Engine, session_factory: sessionmaker[Session], settings: Settings
) -> None:
    """A worker with a 1 s lease runs a shard of a thousand symbols; for four leases, a reconciler that would
    re-publish anything it sees (every task "vanished") runs pass after pass and never sees the shard: its lease
    keeps moving forward while its first attempt runs on."""
    base, _, _db = settings.require_redis_url().rpartition("/")
    short = settings.with_overrides(
        redis_url=f"{base}/{LEASE_REDIS_DB}",
        sandbox=SandboxLimits(symbol_timeout_s=20.0, memory_mb=512),
        maintenance=replace(Maintenance(), shard_lease_s=1.0, shard_lease_renew_s=0.25, nightly_schedule="off"),
    )
    with redis.Redis.from_url(short.require_redis_url()) as client:
        client.flushdb()
    symbols = [f"HB{i:03d}" for i in range(1000)]
    seed_bars(clean_db, symbols, days=5)
    # a tenth of a second or more per symbol: the shard runs for minutes, far past the look below, on any machine
    script = "s = 0\nfor i in range(1000000):\n    s += i\nresult = 1"
    window_s = 4 * short.maintenance.shard_lease_s
    procs = Processes(short)
    app = create_celery(short)
    passes, leases_seen = 0, set[object]()
    try:
        procs.start("heartbeat", "worker", "--hostname", "heartbeat@%h", "--concurrency", "1")
        wait_for(lambda: app.control.ping(timeout=0.5), 90, "the worker")
        request = CalculationRequest(script=script, column_name="c", symbols=symbols)
        job = calculations.submit_calculation(session_factory, request, shard_size=1000, enqueue=shard_enqueuer(app))

        def shard() -> JobShard:
            with session_factory() as session:
                return session.scalars(select(JobShard).where(JobShard.job_id == job.id)).one()

        wait_for(lambda: shard().status != "queued", 60, "the shard to start")
        started = time.monotonic()

        def never_asked(kind: str, queue: str, tasks: object) -> None:
            raise AssertionError(f"re-published a shard whose holder is alive: {tasks}")

        while (ran_s := time.monotonic() - started) < window_s:
            current = shard()
            assert current.status == "running" and (current.attempts, current.requeues) == (1, 0), (
                f"after {ran_s:.1f} s: {current.status}, attempt {current.attempts}, {current.requeues} requeues; "
                f"the worker's log ends:\n{procs.log('heartbeat')[-3000:]}"
            )
            leases_seen.add(current.lease_expires_at)
            report = reconciler.reconcile(session_factory, live_tasks=lambda ids: set(), requeue=never_asked,
                                          kinds=["calculation"], grace_s=0, max_requeues=3, queued=False)  # fmt: skip
            assert report.candidates == 0, report
            passes += 1
            time.sleep(0.1)
    finally:
        app.close()
        procs.stop_all()
    assert len(leases_seen) >= 3  # renewed while it ran
    print(f"\n[lease] a shard ran {ran_s:.1f} s on a {short.maintenance.shard_lease_s} s lease: {passes} reconciler "
          f"passes, {len(leases_seen)} lease expiries seen, never a candidate")  # fmt: skip


def test_a_lapsed_lease_is_judged_even_when_no_worker_answers(
    clean_db: Engine, session_factory: sessionmaker[Session]
) -> None:
    """No worker answered (``live_tasks`` None): queued shards wait for a pass that can tell, but a running shard
    whose lease lapsed is re-published (its holder's silence is the evidence; a worker that comes back, or a
    reconciler whose own worker cannot answer, must not keep it waiting). A running shard claimed without a lease
    is judged by the grace rule."""
    request = CalculationRequest(script="result = 1", column_name="c", symbols=["N1", "N2", "N3", "N4"])
    job = calculations.submit_calculation(session_factory, request, shard_size=1, enqueue=lambda tasks: None)
    with session_factory() as session, session.begin():
        ids = list(session.scalars(select(JobShard.id).where(JobShard.job_id == job.id).order_by(JobShard.index)))
        expired, live, unleased, queued = ids
        session.execute(update(Job).where(Job.id == job.id).values(status="running"))
        for shard_id, lease in ((expired, "now() - interval '1 second'"), (live, "now() + interval '1 minute'")):
            session.execute(update(JobShard).where(JobShard.id == shard_id).values(
                status="running", lease_holder="gone", lease_expires_at=text(lease)))  # fmt: skip
        session.execute(update(JobShard).where(JobShard.id == unleased).values(status="running"))
    published: list[int] = []

    def publish(kind: str, queue: str, tasks: Sequence[jobs.ShardTask]) -> None:
        published.extend(t.shard_id for t in tasks)

    def run(*, queued: bool) -> reconciler.ReconcileReport:
        return reconciler.reconcile(session_factory, live_tasks=lambda ids: None, requeue=publish,
                                    kinds=["calculation"], grace_s=0, max_requeues=3, queued=queued)  # fmt: skip

    frequent = run(queued=False)
    assert frequent.candidates == 1 and frequent.requeued == [expired] and published == [expired]
    full = run(queued=True)  # the re-published one (queued now), the unleased one and the queued one: none judged
    assert full.candidates == 3 and full.requeued == [] and full.skipped
    with session_factory() as session:
        rows = session.execute(select(JobShard.id, JobShard.requeues).where(JobShard.job_id == job.id)).all()
    assert {shard_id: requeues for shard_id, requeues in rows} == {expired: 1, live: 0, unleased: 0, queued: 0}


def test_the_heartbeat_renews_while_its_task_runs_and_stops_with_it(
    clean_db: Engine, session_factory: sessionmaker[Session], settings: Settings
) -> None:
    """The claim inside a heartbeat takes the lease; renewals move it; the thread ends with the block, also when
    the block raises (a retry, a failure); a claim outside any heartbeat takes no lease."""
    seed_bars(clean_db, ["T1"], days=5)
    request = CalculationRequest(script="result = 1", column_name="c", symbols=["T1"])
    job = calculations.submit_calculation(session_factory, request, shard_size=1, enqueue=lambda tasks: None)
    with session_factory() as session:
        shard_id = session.scalars(select(JobShard.id).where(JobShard.job_id == job.id)).one()
    lease_engine = make_engine(settings.require_database_url(), pool_size=1)

    def lease() -> tuple[str | None, object]:
        with session_factory() as session:
            row = session.execute(select(JobShard.lease_holder, JobShard.lease_expires_at)
                                  .where(JobShard.id == shard_id)).one()  # fmt: skip
        return row[0], row[1]

    terms = leases.LeaseTerms(holder="test pid 1", lease_s=30.0)
    try:
        with pytest.raises(RuntimeError), leases.Heartbeat(lease_engine, shard_id, terms, 0.05) as beat:
            assert jobs.start_shard(session_factory, shard_id) is not None
            holder, first = lease()
            assert holder == "test pid 1" and first is not None
            wait_for(lambda: beat.renewals >= 2 and lease()[1] != first, 10, "two renewals")
            raise RuntimeError("the service failed: the task retries")
        assert not beat._thread.is_alive()
        assert leases.current_terms() is None
        assert jobs.start_shard(session_factory, shard_id) is not None  # the retry, claimed outside a heartbeat
        assert lease() == (None, None)
    finally:
        lease_engine.dispose()
