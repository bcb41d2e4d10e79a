"""Flower as `up` starts it: never open, credentials made up only in embedded mode, broker from config, no state."""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shared.errors import StartupError
from shared.infra.config import Settings
from shared.infra.migrate import PROJECT_ROOT
from shared.ops.bootstrap import resolve_flower_auth
from shared.ops.embedded import free_tcp_port
from shared.ops.launcher import child_commands

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def test_embedded_mode_generates_and_keeps_private_flower_credentials(tmp_path: Path) -> None:
    settings = Settings(database_url=None, redis_url="redis://127.0.0.1:1/0")
    user, password = resolve_flower_auth(settings, tmp_path)
    assert user == "ops" and len(password) >= 12
    path = tmp_path / "flower-auth.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"username": user, "password": password}
    assert resolve_flower_auth(settings, tmp_path) == (user, password)  # the next `up` prints the same
    given = settings.with_overrides(flower_basic_auth="alice:a-long-passphrase")
    assert resolve_flower_auth(given, tmp_path) == ("alice", "a-long-passphrase")


def test_outside_embedded_mode_flower_credentials_are_required(tmp_path: Path) -> None:
    settings = Settings(database_url="postgresql://db/x", redis_url="redis://r:6379/0")
    with pytest.raises(StartupError, match="FLOWER_BASIC_AUTH is not set"):
        resolve_flower_auth(settings, tmp_path)
    for weak in ("nopassword", "ops:short", ":a-long-passphrase", "a:a-long-passphrase,b:another-long-one"):
        with pytest.raises(StartupError, match="user:password"):
            resolve_flower_auth(settings.with_overrides(flower_basic_auth=weak), tmp_path)
    assert not (tmp_path / "flower-auth.json").exists()


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with _NO_PROXY.open(request, timeout=5) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except OSError:
        return 0, b""  # not listening yet


def test_flower_as_up_starts_it_asks_for_credentials_and_sees_the_workers(
    settings: Settings, celery_worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    flower_settings = settings.with_overrides(flower_port=free_tcp_port(), api_host="127.0.0.1")
    (argv,) = [argv for name, argv in child_commands(flower_settings) if name == "flower"]
    assert "--persistent=False" in argv and not any("auth" in a for a in argv)  # no secret on the command line
    auth = ("ops", "a-long-flower-passphrase")
    env = {**os.environ, **flower_settings.child_env(), "FLOWER_BASIC_AUTH": ":".join(auth)}
    log_path = tmp_path / "flower.log"
    with open(log_path, "wb") as log_file:  # cwd: a scratch dir, to see that nothing is persisted there
        proc = subprocess.Popen(argv, cwd=tmp_path, env={**env, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{flower_settings.flower_port}"
    try:
        deadline = time.monotonic() + 30
        while _get(f"{base}/healthcheck")[0] != 200:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
        assert _get(f"{base}/")[0] == 401
        assert _get(f"{base}/api/workers")[0] == 401
        assert _get(f"{base}/", ("ops", "wrong-password-here"))[0] == 401
        assert _get(f"{base}/", auth)[0] == 200
        deadline = time.monotonic() + 30
        while True:  # the broker from config: Flower finds the test worker there
            status, body = _get(f"{base}/api/workers?refresh=1", auth)
            if status == 200 and json.loads(body):
                break
            assert time.monotonic() < deadline, (status, body)
            time.sleep(0.5)
        status, body = _get(f"{base}/api/queues/length", auth)
        assert status == 200
        assert {"interactive", "bulk", "maintenance"} <= {q["name"] for q in json.loads(body)["active_queues"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    assert [p.name for p in tmp_path.iterdir() if p.name != "flower.log"] == []  # persistent state off
