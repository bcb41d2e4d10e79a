"""Scale-out shown: a second worker on a second host, sharing nothing with the first but the network (and the
installed code, as the same image on both would be).

Host 1 is this machine's own network namespace: PostgreSQL, Redis and the S3-protocol test server (moto's; S3 is
outside the product) of this test, listening only on host 1's end of a veth link; the API (in this process),
Celery beat (a reconciler every second) and worker ``h1``, which consumes the ``bulk`` and ``maintenance`` queues.
Host 2 is a network namespace of its own (tests/virtual_hosts.py) with its own hostname, an empty /tmp of its own
(its data directory, HOME and TMPDIR are there; none of host 1's files can be reached) and worker ``h2``, which
consumes every queue, reaching the servers over the link.

1. One calculation job on ``bulk``: its shards run on both workers (Celery's own counts per worker).
2. A backtest run through the API: its shards go to ``interactive``, which only ``h2`` consumes, so its
   artifacts are built on host 2; the API on host 1 serves them, byte for byte, from the shared bucket.
3. ``h2`` is killed (SIGKILL) while it holds a shard: the reconciler on host 1 brings the shard back and ``h1``
   finishes the job, every symbol stored exactly once.

And hosts that start at once migrate one database one after the other (``test_hosts_migrating_...``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import psutil
import pytest
import redis
from celery import Celery
from flask import Flask
from moto.server import ThreadedMotoServer
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from shared.contract import TASK_RUN_BACKTEST_SHARD, TASK_RUN_CALCULATION_SHARD, create_celery, shard_enqueuer
from shared.infra import dbadmin, migrate
from shared.infra.config import QUEUE_BULK, QUEUE_MAINTENANCE, ArtifactStorage, Maintenance, SandboxLimits, Settings
from shared.infra.db import make_engine, make_session_factory
from shared.infra.models import Job, JobResult, JobShard, RunManifest
from shared.jobs import calculations
from shared.jobs.calculations import CalculationRequest
from shared.ops.embedded import EmbeddedRedis
from tests.conftest import ServerUrls
from tests.helpers import FINAL, authed_client, make_user, seed_bars
from tests.virtual_hosts import TcpPostgres, VirtualLink, namespaces_unavailable, popen_on_second_host

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUCKET = "af-scale-out"
SHARD_SIZE = 5
HOST2_DATA = "/tmp/alphaforge-host2"  # inside host 2's own /tmp
SCRIPT = "s = 0\nfor i in range(60000):\n    s += i\nresult = close[-1]"
SLOW_SCRIPT = "s = 0\nfor i in range(200000):\n    s += i\nresult = close[-1]"


@dataclass
class Cluster:
    link: VirtualLink
    base: Path
    settings: Settings  # host 1's
    app: Flask
    celery: Celery
    engine: Engine
    factory: sessionmaker[Session]
    s3: Any
    node1: str
    node2: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")[-4000:]

    def stats(self) -> dict[str, dict[str, int]]:
        """Tasks each live worker has run since it started (Celery's own count, per task name)."""
        replies = self.celery.control.inspect(timeout=2).stats() or {}
        return {node: dict(reply.get("total", {})) for node, reply in replies.items()}


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, cluster: Cluster | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            logs = "" if cluster is None else "".join(f"\n--- {n} ---\n{cluster.log(n)}" for n in cluster.procs)
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{logs}")
        time.sleep(0.1)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(f"cannot make a second host here: {reason}")
    link = VirtualLink.create()  # removes what it made if it fails
    base = Path(tempfile.mkdtemp(prefix="af-so-", dir="/tmp"))
    postgres = TcpPostgres(base / "h1" / "postgres", link.host_ip, link.subnet)
    redis_server = EmbeddedRedis(base / "h1" / "redis", host=link.host_ip)
    moto = ThreadedMotoServer(ip_address=link.host_ip, port=0, verbose=False)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    cleanups: list[Callable[[], None]] = []
    try:
        server_url = postgres.start()
        database_url = dbadmin.create_database(server_url, "alphaforge")
        migrate.upgrade(database_url)
        redis_url = redis_server.start()
        moto.start()
        moto_host, moto_port = moto.get_host_and_port()
        endpoint = f"http://{moto_host}:{moto_port}"
        store = ArtifactStorage(url=f"s3://{BUCKET}/runs", s3_endpoint_url=endpoint, s3_region="us-east-1",
                                s3_access_key_id="af-key", s3_secret_access_key="af-secret")  # fmt: skip
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="af-key",
                          aws_secret_access_key="af-secret")  # fmt: skip
        s3.create_bucket(Bucket=BUCKET)
        settings = Settings(
            database_url=database_url,
            redis_url=redis_url,
            data_dir=base / "h1",
            shard_size=SHARD_SIZE,
            worker_concurrency=1,
            enqueue_timeout_s=3.0,
            sandbox=SandboxLimits(symbol_timeout_s=3.0, memory_mb=512),
            jwt_secret_key="scale-out-test-secret-" + "x" * 32,
            maintenance=replace(Maintenance(), reconcile_interval_s=1.0, reconcile_grace_s=3.0),
            artifacts=store,
        )
        host2_settings = settings.with_overrides(data_dir=Path(HOST2_DATA))
        celery = create_celery(settings)
        cleanups.append(celery.close)
        app = create_app(settings)
        cleanups.append(app.extensions["alphaforge"].engine.dispose)
        engine = make_engine(database_url)
        cleanups.append(engine.dispose)

        host2_name = f"af-host2-{link.netns[-6:]}"
        node1, node2 = f"h1@{socket.gethostname()}", f"h2@{host2_name}"
        host1_env = {**os.environ, **settings.child_env(), "PYTHONUNBUFFERED": "1"}
        worker = [sys.executable, "-m", "worker"]
        for name, argv in (
            ("beat", [*worker, "beat", "--schedule", str(base / "h1" / "beat-schedule")]),
            ("h1", [*worker, "worker", "--hostname", node1, f"--queues={QUEUE_BULK},{QUEUE_MAINTENANCE}"]),
        ):
            with open(base / f"{name}.log", "wb") as log_file:
                procs[name] = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=host1_env, stdout=log_file,
                                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        # Host 2 inherits nothing of host 1's environment but PATH and the locale: its own data dir, HOME, TMPDIR.
        host2_env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "VIRTUAL_ENV")}
        host2_env |= host2_settings.child_env() | {
            "PYTHONUNBUFFERED": "1", "HOME": f"{HOST2_DATA}/home", "TMPDIR": f"{HOST2_DATA}/tmp"}  # fmt: skip
        # %h: Celery names the node after the hostname it sees, the UTS namespace's.
        procs["h2"] = popen_on_second_host(link, host2_name, [*worker, "worker", "--hostname", "h2@%h"],
                                           env=host2_env, cwd=PROJECT_ROOT, log_path=base / "h2.log")  # fmt: skip
        found = Cluster(link, base, settings, app, celery, engine, make_session_factory(engine), s3, node1, node2,
                        procs)  # fmt: skip

        def both_online() -> bool:
            for name, proc in procs.items():
                assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{found.log(name)}"
            replies = {node for reply in celery.control.ping(timeout=0.5) for node in reply}
            return {node1, node2} <= replies

        wait_for(both_online, 90, "both workers to answer a ping", found)
        yield found
    finally:
        for proc in procs.values():
            _kill_group(proc)
        for cleanup in reversed(cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        with contextlib.suppress(Exception):
            moto.stop()
        redis_server.stop()
        postgres.stop()
        link.destroy()
        shutil.rmtree(base, ignore_errors=True)


def submit_calculation(cluster: Cluster, owner_id: str, symbols: list[str], script: str) -> Job:
    """A calculation on the bulk queue (as the nightly recalculation sends them): both workers consume it."""
    request = CalculationRequest(script=script, column_name="c", symbols=symbols, owner_id=owner_id,
                                 queue=QUEUE_BULK)  # fmt: skip
    return calculations.submit_calculation(cluster.factory, request, shard_size=SHARD_SIZE,
                                           enqueue=shard_enqueuer(cluster.celery, queue=QUEUE_BULK))  # fmt: skip


def job_status(cluster: Cluster, job_id: object) -> str | None:
    with cluster.factory() as session:
        return session.scalar(select(Job.status).where(Job.id == job_id))


def assert_stored_once(cluster: Cluster, job_id: object, symbols: list[str]) -> None:
    with cluster.factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "succeeded", job and job.error
        stored = session.execute(
            select(JobResult.symbol, func.count(), func.count(JobResult.error))
            .where(JobResult.job_id == job_id)
            .group_by(JobResult.symbol)
        ).all()
    assert sorted(s for s, _, _ in stored) == sorted(symbols)
    assert {n for _, n, _ in stored} == {1} and {e for _, _, e in stored} == {0}
    assert (job.symbols_done, job.symbols_failed) == (len(symbols), 0)


def test_a_second_host_shares_the_work_serves_its_artifacts_and_is_healed(
    cluster: Cluster, test_password_hash: str
) -> None:
    started = time.monotonic()
    user = make_user(cluster.app, cluster.engine, "alice", test_password_hash)
    calc_symbols = [f"SO{i:03d}" for i in range(110)]
    seed_bars(cluster.engine, calc_symbols, days=30, seed=3)
    seed_bars(cluster.engine, ["RUNA", "RUNB"], days=200, seed=5)

    # Host 2 is another host: its own hostname, and none of host 1's files in its view of the file system.
    h2 = cluster.procs["h2"]
    host2_root = Path(f"/proc/{h2.pid}/root")
    assert psutil.Process(h2.pid).cmdline()[1:4] == ["-m", "worker", "worker"]  # the worker itself (SIGKILL below)
    assert (host2_root / HOST2_DATA.lstrip("/")).is_dir()
    assert not (host2_root / str(cluster.base).lstrip("/")).exists()
    assert cluster.base.is_dir()

    # 1. One job, its shards on both workers.
    first = calc_symbols[:60]  # 12 shards
    job = submit_calculation(cluster, user.id, first, SCRIPT)
    wait_for(lambda: job_status(cluster, job.id) in FINAL, 90, "the first job", cluster)
    assert_stored_once(cluster, job.id, first)
    stats = cluster.stats()
    per_worker = {node: stats[node].get(TASK_RUN_CALCULATION_SHARD, 0) for node in (cluster.node1, cluster.node2)}
    assert all(n >= 1 for n in per_worker.values()) and sum(per_worker.values()) >= 12, per_worker
    print(f"\n[scale-out] job of 12 shards: {per_worker} shard tasks per worker")

    # Both hosts reach the servers over the link: host 2 connects from its own address.
    with cluster.engine.connect() as conn:
        pg_clients = {str(a) for a in conn.execute(text("SELECT client_addr FROM pg_stat_activity")).scalars()}
    broker = redis.Redis.from_url(cluster.settings.require_redis_url())
    try:
        redis_clients = {c["addr"].rpartition(":")[0] for c in broker.client_list()}
    finally:
        broker.close()
    assert cluster.link.peer_ip in pg_clients and cluster.link.peer_ip in redis_clients, (pg_clients, redis_clients)

    # 2. A run through the API on host 1; its shards (interactive) and so its artifacts are host 2's.
    client = authed_client(cluster.app, user)
    body = {"symbols": ["RUNA", "RUNB"], "strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 25}}}
    response = client.post("/api/runs", json=body)
    assert response.status_code == 202, response.get_json()
    run_id = response.get_json()["run_id"]

    def artifacts_ready() -> bool:
        view = client.get(f"/api/runs/{run_id}/artifacts").get_json()
        assert view["status"] in ("pending", "ready"), view
        return bool(view["status"] == "ready")

    wait_for(artifacts_ready, 90, "the run's artifacts", cluster)
    stats = cluster.stats()
    assert stats[cluster.node2].get(TASK_RUN_BACKTEST_SHARD, 0) >= 1
    assert stats[cluster.node1].get(TASK_RUN_BACKTEST_SHARD, 0) == 0  # built where its last shard ran: host 2
    with cluster.engine.connect() as conn:
        location = conn.execute(select(RunManifest.location).where(RunManifest.job_id == run_id)).scalar_one()
    assert location == f"s3://{BUCKET}/runs/{user.id}/{run_id}"
    view = client.get(f"/api/runs/{run_id}/artifacts").get_json()
    assert [f["name"] for f in view["files"]] == ["chart.png", "equity.csv", "metrics.json", "trades.csv"]
    for entry in view["files"]:
        served = client.get(entry["url"])
        assert served.status_code == 200, entry
        assert hashlib.sha256(served.data).hexdigest() == entry["sha256"]
        key = f"runs/{user.id}/{run_id}/{entry['name']}"
        assert served.data == cluster.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert client.get(f"/api/runs/{run_id}/manifest/verify").get_json()["ok"] is True
    assert not (cluster.settings.data_dir / "artifacts").exists()  # neither host wrote them to its disk
    assert not (host2_root / HOST2_DATA.lstrip("/") / "artifacts").exists()

    # 3. Host 2's worker killed while it holds a shard: healed like any other worker.
    kill_symbols = calc_symbols[60:]  # 10 shards
    job = submit_calculation(cluster, user.id, kill_symbols, SLOW_SCRIPT)
    with cluster.factory() as session:
        task_ids = set(session.scalars(select(JobShard.task_id).where(JobShard.job_id == job.id)))
    stranded: list[int] = []

    def host2_is_frozen_holding_a_shard() -> bool:
        """Host 2 runs a shard of the job: freeze its worker (main and pool processes) and read which of the
        shards it held are unfinished; none (it finished between the two looks): let it go on and look again."""
        active = cluster.celery.control.inspect(destination=[cluster.node2], timeout=1).active() or {}
        held = [t["id"] for t in active.get(cluster.node2, []) if t["id"] in task_ids]
        if not held:
            return False
        os.killpg(h2.pid, signal.SIGSTOP)
        with cluster.factory() as session:
            stranded[:] = session.scalars(
                select(JobShard.id).where(JobShard.task_id.in_(held), JobShard.status != "succeeded")
            ).all()
        if not stranded:
            os.killpg(h2.pid, signal.SIGCONT)
        return bool(stranded)

    wait_for(host2_is_frozen_holding_a_shard, 60, "host 2 to run a shard of the job", cluster)
    os.kill(h2.pid, signal.SIGKILL)  # the main process; its pool and sandbox processes die with it (PDEATHSIG)
    killed_at = time.monotonic()
    h2.wait(timeout=10)
    held_shard = stranded[0]

    def held_shard_done() -> bool:
        with cluster.factory() as session:
            return session.scalar(select(JobShard.status).where(JobShard.id == held_shard)) == "succeeded"

    wait_for(held_shard_done, 60, "the shard host 2 held to be run again", cluster)
    healed_s = time.monotonic() - killed_at
    wait_for(lambda: job_status(cluster, job.id) in FINAL, 60, "the job after the kill", cluster)
    finished_s = time.monotonic() - killed_at
    assert_stored_once(cluster, job.id, kill_symbols)
    assert set(cluster.stats()) == {cluster.node1}  # only host 1's worker is left: it ran the shard again
    assert not list(cluster.settings.data_dir.glob("beat-schedule*"))  # beat keeps its schedule in Redis (redbeat)
    print(f"[scale-out] SIGKILL of host 2's worker: its shard ran again on host 1 {healed_s:.1f} s later, the job "
          f"finished {finished_s:.1f} s after the kill; whole test {time.monotonic() - started:.1f} s")  # fmt: skip


def test_hosts_migrating_one_database_at_once(test_servers: ServerUrls) -> None:
    """`up` on three hosts at once migrates the same empty database three times over: all must succeed (each waits
    for the lock, then finds the schema at head), not one of them fail on a table another has just made."""
    name = f"af_race_{secrets.token_hex(4)}"
    database_url = dbadmin.create_database(test_servers.server_database_url, name)
    try:
        env = {**os.environ, "DATABASE_URL": database_url}
        command = [sys.executable, "-m", "shared.ops.cli", "migrate"]
        migrations = [
            subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(3)
        ]
        outcomes = [proc.communicate(timeout=120) for proc in migrations]
        assert [proc.returncode for proc in migrations] == [0, 0, 0], [err.decode()[-2000:] for _, err in outcomes]
        engine = make_engine(database_url)
        try:
            with engine.connect() as conn:
                current = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        finally:
            engine.dispose()
        assert current == [migrate_head()]
    finally:
        dbadmin.drop_database(test_servers.server_database_url, name)


def migrate_head() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(migrate.alembic_config("postgresql://unused")).get_current_head()
    assert head is not None
    return head
