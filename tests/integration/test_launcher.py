"""``alphaforge up``: process supervision and a real start/stop of the whole system.

The supervisor tests need no servers. The end-to-end test runs ``python -m shared.cli up`` against a fresh
database on the test PostgreSQL server and lets the launcher start its own embedded Redis in a temporary data
dir (so its worker and beat never touch the Redis the other tests use). It then checks that SIGTERM stops
everything: exit code 0 and not one process left behind.
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

from shared import dbadmin
from shared.db import make_engine
from shared.embedded import free_tcp_port
from shared.launcher import Supervisor
from shared.migrate import PROJECT_ROOT

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


def test_supervisor_notices_a_dead_child() -> None:
    sup = Supervisor()
    try:
        sup.start("sleeper", ["sleep", "300"])
        sup.start("quitter", ["sh", "-c", "exit 3"])
        assert sup.watch(poll_s=0.05) == 1
        dead = sup.exited()
        assert dead is not None and dead.name == "quitter" and dead.popen.returncode == 3
    finally:
        sup.stop(grace_s=5)


_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import sys
    from shared.launcher import Shutdown, ShutdownSignals, Supervisor

    signals = ShutdownSignals()
    signals.install()
    sup = Supervisor()
    try:
        with signals.deferred():
            sup.start("stubborn", ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"])
        print("ready", flush=True)
        code = sup.watch(poll_s=0.05)
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
        assert proc.stdout.readline().strip() == "ready"
        _wait_for(lambda: len(_descendants(proc.pid)) >= 3, 10, "grandchildren")
        tree = _descendants(proc.pid)
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
    cmd = [sys.executable, "-m", "shared.cli", "up"]
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
                assert conn.execute(text("SELECT count(*) FROM daily_bars")).scalar_one() > 200
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
