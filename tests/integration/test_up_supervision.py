"""`up` restarts what dies: a real ``python -m shared.ops.cli up`` on its own embedded PostgreSQL and Redis.

Each of the embedded Redis, the embedded PostgreSQL postmaster, the worker's main process, beat, the API's
gunicorn master and Flower is killed with SIGKILL in turn; each time a new process must take its place (a new
pid), the API must answer again and `up` must still run (the recovery time of each is printed). Then a job
submitted through the API runs end to end. Finally Flower's port is taken by someone else, so every restart of
Flower dies at once: `up` must give up within its restart window, exit 1 with the reason in its log, and leave
no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from shared.infra.migrate import PROJECT_ROOT
from shared.ops.embedded import free_tcp_port
from tests.integration.test_launcher import _alive, _belongs_to_run, _descendants, _kill_all, _wait_for

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
RESTART_MAX = 3
RESTART_WINDOW_S = 120


@pytest.fixture
def up_data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="af-sup-", dir="/tmp"))  # short: unix socket paths live under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _request(url: str, body: Any = None, token: str | None = None, timeout_s: float = 5) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with _NO_PROXY.open(req, timeout=timeout_s) as resp:
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return int(exc.code), None
    except (OSError, ValueError):
        return 0, None


def _child(up_pid: int, match: Callable[[list[str]], bool]) -> psutil.Process | None:
    """The live direct child of `up` whose command line matches."""
    for proc in psutil.Process(up_pid).children():
        try:
            cmdline = proc.cmdline()  # empty for a child caught between fork and exec, or exiting
            if _alive(proc) and cmdline and match(cmdline):
                return proc
        except psutil.Error:
            continue
    return None


def _postmaster(data_dir: Path) -> psutil.Process | None:
    try:
        pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        proc = psutil.Process(pid)
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    return proc if _alive(proc) and proc.name() == "postgres" else None


def _celery(command: str) -> Callable[[list[str]], bool]:
    return lambda cmd: cmd[1:4] == ["-m", "worker", command]


def test_up_restarts_every_process_it_runs_and_gives_up_on_one_that_keeps_dying(up_data_dir: Path) -> None:
    port, flower_port = free_tcp_port(), free_tcp_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALPHAFORGE_") and k not in ("REDIS_URL",)}
    env.pop("DATABASE_URL", None)  # both unset: `up` starts an embedded PostgreSQL and Redis of its own
    env.update(
        ALPHAFORGE_DATA_DIR=str(up_data_dir),
        ALPHAFORGE_API_HOST="127.0.0.1",
        ALPHAFORGE_API_PORT=str(port),
        ALPHAFORGE_FLOWER_PORT=str(flower_port),
        ALPHAFORGE_WORKER_CONCURRENCY="1",
        ALPHAFORGE_API_WORKERS="1",
        ALPHAFORGE_DEMO_SYMBOLS="3",
        ALPHAFORGE_DEMO_YEARS="1",
        ALPHAFORGE_NIGHTLY_SCHEDULE="off",
        ALPHAFORGE_RESTART_BACKOFF="0.5",
        ALPHAFORGE_RESTART_BACKOFF_MAX="2",
        ALPHAFORGE_RESTART_STABLE_AFTER="5",
        ALPHAFORGE_RESTART_MAX=str(RESTART_MAX),
        ALPHAFORGE_RESTART_WINDOW=str(RESTART_WINDOW_S),
    )
    log_path = up_data_dir / "up.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "shared.ops.cli", "up"], cwd=PROJECT_ROOT, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}/api"
    seen: set[psutil.Process] = set()

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-8000:]

    def healthy() -> bool:
        assert proc.poll() is None, f"`up` exited with {proc.returncode}:\n{log_tail()}"
        status, body = _request(f"{base}/health")
        return status == 200 and bool(body and body["workers"].get("count"))  # database, broker and a worker

    targets: list[tuple[str, Callable[[], psutil.Process | None]]] = [
        ("redis", lambda: _child(proc.pid, lambda cmd: "redis-server" in cmd[0])),
        ("postgres", lambda: _postmaster(up_data_dir)),
        ("worker", lambda: _child(proc.pid, _celery("worker"))),
        ("beat", lambda: _child(proc.pid, _celery("beat"))),
        ("api", lambda: _child(proc.pid, lambda cmd: "gunicorn" in cmd)),
        ("flower", lambda: _child(proc.pid, _celery("flower"))),
    ]
    try:
        _wait_for(healthy, 120, "the API to answer with a worker")
        recoveries: dict[str, float] = {}
        for name, find in targets:
            old = find()
            assert old is not None, f"no {name} process:\n{log_tail()}"
            seen.add(old)
            seen.update(_descendants(old.pid))
            old.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()

            def replaced(find: Callable[[], psutil.Process | None] = find, old_pid: int = old.pid) -> bool:
                new = find()
                return new is not None and new.pid != old_pid

            _wait_for(replaced, 60, f"a new {name} process:\n{log_tail()}")
            _wait_for(healthy, 60, f"the API to answer again after the kill of {name}:\n{log_tail()}")
            if name == "flower":
                _wait_for(lambda: _request(f"http://127.0.0.1:{flower_port}/")[0] == 401, 30, "Flower to answer")
            recoveries[name] = time.monotonic() - killed_at
            assert proc.poll() is None
        print("\n[supervision] kill -9, then restarted and answering again after: "
              + ", ".join(f"{name} {s:.1f} s" for name, s in recoveries.items()))  # fmt: skip
        text = log_path.read_text(errors="replace")
        for name, _ in targets:
            assert f"restarted {name} (pid" in text, text
        assert "was killed by SIGKILL; restart attempt" in text

        # After all of that, a job submitted through the API runs end to end.
        demo = json.loads((up_data_dir / "demo-account.json").read_text())
        status, tokens = _request(f"{base}/auth/login", demo)
        assert status == 200, status
        body = {"script": "result = close[-1]", "column_name": "last", "stock_symbols": ["SYN0001", "SYN0002"]}
        submitted_at = time.monotonic()
        status, job = _request(f"{base}/custom-calculations/execute", body, tokens["access_token"])
        assert status == 202, (status, job)

        def job_status() -> str | None:
            code, view = _request(f"{base}/jobs/{job['job_id']}", token=tokens["access_token"])
            return view["status"] if code == 200 else None

        _wait_for(lambda: job_status() in ("succeeded", "failed", "cancelled"), 60, f"the job:\n{log_tail()}")
        assert job_status() == "succeeded"
        print(f"[supervision] a job submitted after the restarts succeeded in {time.monotonic() - submitted_at:.1f} s")

        # Flower's port taken by another program: every restart of Flower dies at once, and `up` gives up.
        seen.update(_descendants(proc.pid))
        flower = targets[-1][1]()
        assert flower is not None
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, never past a listener
            flower.send_signal(signal.SIGKILL)
            flower.wait(timeout=10)
            _wait_for(lambda: _bind(squatter, flower_port), 10, "Flower's port to be free")
            squatter.listen()
            given_up_at = time.monotonic()
            try:
                code = proc.wait(timeout=RESTART_WINDOW_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`up` did not give up on Flower within {RESTART_WINDOW_S} s:\n{log_tail()}")
        print(f"[supervision] gave up on a Flower that cannot start in {time.monotonic() - given_up_at:.1f} s")
        assert code == 1, log_tail()
        text = log_path.read_text(errors="replace")
        assert f"more than ALPHAFORGE_RESTART_MAX={RESTART_MAX}" in text and "flower (pid" in text, text
        assert "stopping everything" in text
        leftovers = [p for p in seen if _alive(p)]
        leftovers += [p for p in psutil.process_iter() if _alive(p) and _belongs_to_run(p, up_data_dir, port)]
        assert leftovers == [], [(p.pid, p.cmdline()) for p in leftovers if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # let `up` stop what it runs; SIGKILL only if it does not
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # `up` killed by a failing test leaves its children behind: everything started for this run goes.
        _kill_all(list(seen) + [p for p in psutil.process_iter() if _belongs_to_run(p, up_data_dir, port)])


def _bind(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True
