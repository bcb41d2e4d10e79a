"""What `up` does about accounts: a JWT secret and a demo account in embedded mode, nothing made up outside it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from shared.accounts.passwords import verify_password
from shared.errors import StartupError
from shared.infra.config import Settings
from shared.infra.migrate import PROJECT_ROOT
from shared.infra.models import User
from shared.ops.bootstrap import ensure_demo_account, is_embedded_mode, resolve_jwt_secret
from shared.ops.embedded import free_tcp_port


def test_embedded_mode_generates_and_keeps_a_private_jwt_secret(tmp_path: Path) -> None:
    settings = Settings(database_url=None, redis_url="redis://127.0.0.1:1/0")
    assert is_embedded_mode(settings)
    secret = resolve_jwt_secret(settings, tmp_path)
    assert len(secret) >= 32
    path = tmp_path / "jwt-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_jwt_secret(settings, tmp_path) == secret  # tokens survive a restart
    given = "g" * 40
    assert resolve_jwt_secret(settings.with_overrides(jwt_secret_key=given), tmp_path) == given


def test_outside_embedded_mode_no_secret_is_made_up(tmp_path: Path) -> None:
    settings = Settings(database_url="postgresql://db/x", redis_url="redis://r:6379/0")
    assert not is_embedded_mode(settings)
    with pytest.raises(StartupError, match="JWT_SECRET_KEY is not set"):
        resolve_jwt_secret(settings, tmp_path)
    with pytest.raises(StartupError, match="at least 32"):
        resolve_jwt_secret(settings.with_overrides(jwt_secret_key="short"), tmp_path)
    assert not (tmp_path / "jwt-secret").exists()
    assert resolve_jwt_secret(settings.with_overrides(jwt_secret_key="s" * 32), tmp_path) == "s" * 32


def test_up_refuses_to_start_without_a_secret_when_both_servers_are_external(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALPHAFORGE_") and k != "JWT_SECRET_KEY"}
    env.update(DATABASE_URL="postgresql://nobody@127.0.0.1:1/none", REDIS_URL="redis://127.0.0.1:1/0",
               ALPHAFORGE_DATA_DIR=str(tmp_path), ALPHAFORGE_API_PORT=str(free_tcp_port()))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "shared.ops.cli", "up"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "JWT_SECRET_KEY is not set" in done.stdout + done.stderr


def test_demo_account_is_created_reused_and_reset(settings: Settings, clean_db: Engine, tmp_path: Path) -> None:
    url = settings.require_database_url()
    username, password = ensure_demo_account(url, tmp_path)
    saved = json.loads((tmp_path / "demo-account.json").read_text())
    assert saved == {"username": username, "password": password} and username == "demo"
    assert stat.S_IMODE((tmp_path / "demo-account.json").stat().st_mode) == 0o600
    assert ensure_demo_account(url, tmp_path) == (username, password)  # the next `up` prints the same

    (tmp_path / "demo-account.json").unlink()  # credentials lost: a new password, same account
    _, new_password = ensure_demo_account(url, tmp_path)
    assert new_password != password
    with clean_db.connect() as conn:
        rows = conn.execute(select(User.username, User.role, User.password_hash)).all()
    assert [(r.username, r.role) for r in rows] == [("demo", "user")]
    assert verify_password(rows[0].password_hash, new_password) and not verify_password(rows[0].password_hash, password)
