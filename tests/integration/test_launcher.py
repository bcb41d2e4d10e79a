"""``alphaforge up``: process supervision and a real start/stop of the whole system.

The supervisor tests need no servers. The end-to-end test runs ``python -m shared.ops.cli up`` against a fresh
database on the test PostgreSQL server and lets the launcher start its own embedded Redis in a temporary data
dir (so its worker and beat never touch the Redis the other tests use). It then checks that SIGTERM stops
everything: exit code 0 and not one process left behind. What `up` restarts (kill -9 of each process, embedded
servers included) is in test_up_supervision.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import text

from shared.infra import dbadmin
from shared.infra.config import Supervision
from shared.infra.db import make_engine
from shared.infra.migrate import PROJECT_ROOT
from shared.ops.embedded import free_tcp_port
from shared.ops.supervisor import Restarts, Supervisor

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def _group(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(proc.pid) == pgid and _alive(proc):
                members.append(proc)
    return members


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        if _alive(proc):
            with contextlib.suppress(psutil.Error):
                proc.kill()


# A child whose grandchild leaves the process group (as the worker's sandbox processes do).
_ESCAPING_CHILD = "import subprocess, time; subprocess.Popen(['sleep', '300'], start_new_session=True); time.sleep(300)"


def test_supervisor_stops_children_grandchildren_and_stubborn_processes() -> None:
    sup = Supervisor()
    children = [
        sup.start("plain", ["sh", "-c", "sleep 300 & sleep 300 & wait"]),
        sup.start("escaping", [sys.executable, "-c", _ESCAPING_CHILD]),
        sup.start("stubborn", ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"]),  # ignores SIGTERM
    ]
    tree: list[psutil.Process] = []
    try:
        _wait_for(lambda: sum(len(_descendants(c.popen.pid)) for c in children) >= 5, 10, "grandchildren")
        tree = [psutil.Process(c.popen.pid) for c in children]
        tree += [p for c in children for p in _descendants(c.popen.pid)]
        assert sup.exited() is None

        started = time.monotonic()
        sup.stop(grace_s=1.0, leftover_grace_s=0.5)
        elapsed = time.monotonic() - started

        assert [p.pid for p in tree if _alive(p)] == []
        assert all(c.popen.returncode is not None for c in children)
        assert sup.children == []
        assert elapsed < 10
    finally:
        _kill_all(tree)


def test_restart_backoff_doubles_resets_when_stable_and_gives_up_past_the_budget() -> None:
    policy = Supervision(backoff_s=1.0, backoff_max_s=30.0, stable_after_s=60.0, max_restarts=7, window_s=1000.0)
    restarts = Restarts(policy, started_at=0.0)
    delays = [restarts.after_death(float(t)) for t in range(1, 8)]  # dies at once after every start
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert restarts.after_death(8.0) is None  # an 8th death within the window: more than max_restarts

    restarts = Restarts(policy, started_at=0.0)
    assert [restarts.after_death(1.0), restarts.after_death(2.0)] == [1.0, 2.0]
    restarts.started_at = 3.0
    assert restarts.after_death(3.0 + 60.0) == 1.0  # it stayed up stable_after_s: back to the shortest wait

    # An outage of a server it needs: the shortest wait, and nothing counted against the budget.
    strict = Restarts(Supervision(max_restarts=1, window_s=100.0), started_at=0.0)
    assert [strict.after_death(1.0, excused=True) for _ in range(5)] == [1.0] * 5
    assert strict.after_death(2.0) == 1.0 and strict.after_death(3.0) is None
    # Deaths older than the window no longer count; 0 allowed restarts: the first death gives up.
    windowed = Restarts(Supervision(max_restarts=1, window_s=10.0, stable_after_s=1000.0), started_at=0.0)
    assert windowed.after_death(1.0) == 1.0 and windowed.after_death(20.0) == 2.0
    assert windowed.after_death(21.0) is None
    assert Restarts(Supervision(max_restarts=0), started_at=0.0).after_death(1.0) is None


def test_supervisor_restarts_a_dying_child_with_backoff_then_gives_up() -> None:
    policy = Supervision(backoff_s=0.2, backoff_max_s=0.4, stable_after_s=60.0, max_restarts=3, window_s=60.0)
    sup = Supervisor(policy)
    try:
        sleeper = sup.start("sleeper", ["sleep", "300"])
        quitter = sup.start("quitter", ["sh", "-c", "exit 3"])
        sleeper_pid, pids = sleeper.popen.pid, {quitter.popen.pid}
        started = time.monotonic()

        def record() -> None:
            pids.add(quitter.popen.pid)

        assert sup.watch(poll_s=0.02, on_tick=record) == 1  # the 4th death within the window: give up
        elapsed = time.monotonic() - started
        assert len(pids) == 4 and quitter.popen.returncode == 3  # started once, restarted 3 times
        assert elapsed >= 0.2 + 0.4 + 0.4  # the backoff was waited (doubling, capped at backoff_max_s)
        assert sleeper.popen.poll() is None and sleeper.popen.pid == sleeper_pid  # the others are left alone
        print(f"\n[supervisor] 3 restarts with backoff, then gave up after {elapsed:.2f} s")
    finally:
        sup.stop(grace_s=5)


_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import sys
    from shared.infra.config import Supervision
    from shared.ops.supervisor import Shutdown, ShutdownSignals, Supervisor

    signals = ShutdownSignals()
    signals.install()
    # The quitter dies at once and then waits 60 s in backoff: signals must stop everything meanwhile.
    sup = Supervisor(Supervision(backoff_s=60.0, backoff_max_s=60.0), guard=signals.deferred)
    try:
        sup.start("stubborn", ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"])
        quitter = sup.start("quitter", ["sh", "-c", "sleep 300 & exit 3"])  # leaves a grandchild behind
        waiting = []

        def report_backoff() -> None:
            if quitter.restart_at is not None and not waiting:
                waiting.append(True)
                print(f"ready {quitter.pid}", flush=True)

        code = sup.watch(poll_s=0.05, on_tick=report_backoff)
    except Shutdown:
        code = 0
    finally:
        signals.begin_stopping()
        sup.stop(grace_s=2.0, leftover_grace_s=0.5)
    print("stopped", flush=True)
    sys.exit(code)
    """
)


def test_sigterm_stops_the_tree_even_when_repeated_during_shutdown() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SIGNAL_SCRIPT], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    tree: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        ready, quitter_pid = proc.stdout.readline().split()
        assert ready == "ready"  # the quitter died and waits in backoff
        _wait_for(lambda: len(_descendants(proc.pid)) >= 3, 10, "grandchildren")
        tree = _descendants(proc.pid) + _group(int(quitter_pid))  # and the orphan the quitter left in its group
        assert len(tree) == 4, [p.cmdline() for p in tree]
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # a second signal must not interrupt the cleanup
        assert proc.wait(timeout=20) == 0
        assert "stopped" in proc.stdout.read()
        assert [p.pid for p in tree if _alive(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_all(tree)


# --- the real thing -------------------------------------------------------------------------------------------


@pytest.fixture
def up_database(test_servers) -> Iterator[str]:
    name = f"af_up_{secrets.token_hex(4)}"
    url = dbadmin.create_database(test_servers.server_database_url, name)
    yield url
    dbadmin.drop_database(test_servers.server_database_url, name)


@pytest.fixture
def up_data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="af-up-", dir="/tmp"))  # short: unix socket paths live under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _http_status(url: str) -> int | None:
    try:
        with _NO_PROXY.open(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def _belongs_to_run(proc: psutil.Process, data_dir: Path, port: int) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
        if str(data_dir) in cmdline or f":{port}" in cmdline:
            return True
        return proc.environ().get("ALPHAFORGE_DATA_DIR") == str(data_dir)
    except psutil.Error:
        return False


def test_up_serves_health_and_stops_cleanly_on_sigterm(up_database: str, up_data_dir: Path) -> None:
    port, flower_port = free_tcp_port(), free_tcp_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALPHAFORGE_") and k not in ("REDIS_URL",)}
    env.update(
        DATABASE_URL=up_database,  # REDIS_URL unset: `up` starts an embedded Redis under the data dir
        ALPHAFORGE_DATA_DIR=str(up_data_dir),
        ALPHAFORGE_API_HOST="127.0.0.1",
        ALPHAFORGE_API_PORT=str(port),
        ALPHAFORGE_FLOWER_PORT=str(flower_port),
        ALPHAFORGE_WORKER_CONCURRENCY="1",
        ALPHAFORGE_DEMO_SYMBOLS="5",
        ALPHAFORGE_DEMO_YEARS="1",
    )
    log_path = up_data_dir / "up.log"
    cmd = [sys.executable, "-m", "shared.ops.cli", "up"]
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    tree: list[psutil.Process] = []

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    try:
        health = f"http://127.0.0.1:{port}/api/health"
        deadline = time.monotonic() + 60
        while _http_status(health) != 200:
            assert proc.poll() is None, f"`up` exited with {proc.returncode}:\n{log_tail()}"
            assert time.monotonic() < deadline, f"{health} did not answer 200 within 60 s:\n{log_tail()}"
            time.sleep(0.5)
        # Flower is up too, and never open (its generated credentials are in the banner).
        _wait_for(lambda: _http_status(f"http://127.0.0.1:{flower_port}/") == 401, 30, "Flower to ask for credentials")
        flower_login = json.loads((up_data_dir / "flower-auth.json").read_text())
        password = flower_login["password"]
        banner_line = f"Flower    http://127.0.0.1:{flower_port} (username 'ops', password '{password}')"
        _wait_for(lambda: banner_line in log_tail(), 10, "the banner")
        tree = _descendants(proc.pid)
        assert len(tree) >= 4, [p.cmdline() for p in tree]

        # The demo universe was loaded into the empty database.
        engine = make_engine(up_database, pool_size=1)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM symbols")).scalar() == 5
                assert conn.execute(text("SELECT sum(bars) FROM bar_series")).scalar_one() > 200
        finally:
            engine.dispose()

        # A second `up` on the same data dir refuses to start.
        second = subprocess.run(
            cmd,
            cwd=PROJECT_ROOT,
            env={**env, "ALPHAFORGE_API_PORT": str(free_tcp_port())},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert "already running" in second.stdout + second.stderr

        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`up` did not exit within 30 s of SIGTERM:\n{log_tail()}")
        assert code == 0, log_tail()

        leftovers = [p for p in tree if _alive(p)]
        leftovers += [p for p in psutil.process_iter() if _alive(p) and _belongs_to_run(p, up_data_dir, port)]
        assert leftovers == [], [(p.pid, p.cmdline()) for p in leftovers if _alive(p)]
        assert not (up_data_dir / "alphaforge.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_all(tree + _descendants(proc.pid))
