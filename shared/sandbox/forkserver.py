"""The worker's side of its sandbox zygote (shared/sandbox/zygote.py): start it, fork children, watch them end.

One zygote per worker process, and at most one live child per zygote (a shard's child has ended before the next is
forked), so a worker never runs more sandbox children than its concurrency. The zygote is started on first use (or
at pool-process start) and started again when it died: the death of a zygote costs the shard it was serving one
retried symbol, never a job. :meth:`ForkServer.spawn` has the zygote fork a child for a shard's request (a sealed
memfd) and hands back a :class:`ForkedChild` with the child's answer pipe and a pidfd to kill it by. After a
bounded number of forks the zygote is replaced, which re-randomizes the address layout its children share.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ZYGOTE_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); from shared.sandbox.zygote import main; main(int(sys.argv[2]))"
)
DEFAULT_MAX_FORKS = 500


class SandboxUnavailable(RuntimeError):
    """The sandbox could not be started or set up: an infrastructure fault, worth a retry."""


class ZygoteDied(SandboxUnavailable):
    """The zygote went away (killed, or its worker's end closed) while a child was working: retry the child."""


@dataclass(frozen=True)
class ExitReport:
    """How a child ended, as the zygote's ``wait4`` saw it."""

    status: int  # the raw wait status
    cpu_s: float  # user + system CPU seconds
    maxrss_kb: int

    @property
    def signal_name(self) -> str | None:
        if os.WIFSIGNALED(self.status):
            return signal.Signals(os.WTERMSIG(self.status)).name
        return None

    @property
    def exit_code(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None


class ForkedChild:
    """One forked sandbox child: its answer pipe (read here), its pidfd (to kill it) and its end report.

    The zygote's reply to the fork (the pid and pidfd) is read when first needed, not before the child's answers:
    a shard's start waits for one wake-up of the zygote, not two."""

    def __init__(self, server: ForkServer, generation: int, answers: int) -> None:
        self.server = server
        self.generation = generation
        self.answers = answers  # read end of the child's answer pipe
        self._pid: int | None = None
        self._pidfd = -1
        self.baseline_kb = 0  # resident memory it started with (its zygote's)
        self.report: ExitReport | None = None

    @property
    def pid(self) -> int:
        """The child's pid (SandboxUnavailable when the zygote could not fork it)."""
        if self._pid is None:
            self._pid, self._pidfd = self.server.fork_reply(self)
        return self._pid

    def kill(self) -> None:
        with contextlib.suppress(SandboxUnavailable, TimeoutError):
            self.pid  # noqa: B018 (the reply, if not read yet)
        if self._pidfd >= 0 and self.report is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def wait(self, timeout_s: float) -> ExitReport:
        """The child's end report, killing it first if it has not ended within ``timeout_s``. Raises ZygoteDied
        when the zygote is gone (then nobody can report: the child died with it)."""
        if self.report is None:
            try:
                self.report = self.server.wait_exit(self, timeout_s)
            except TimeoutError:
                self.kill()
                self.report = self.server.wait_exit(self, 10.0)
        return self.report

    def release(self) -> None:
        """Kill the child if it still runs and release its descriptors, without waiting for its end: the end report
        can still be collected (:meth:`wait`), or :meth:`ForkServer.forget` it."""
        try:
            self.kill()
        finally:
            for fd in (self._pidfd, self.answers):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._pidfd = self.answers = -1

    def close(self) -> ExitReport | None:
        """Release the child and collect its end. Returns the report (None when the zygote died first, or never
        forked it)."""
        self.release()
        try:
            return self.wait(10.0)
        except (SandboxUnavailable, TimeoutError):
            return None


class ForkServer:
    """A sandbox zygote for this process and the protocol to it. Thread-safe; children are forked one at a time."""

    def __init__(self, *, startup_timeout_s: float = 30.0, max_forks: int = DEFAULT_MAX_FORKS,
                 boot: str = ZYGOTE_BOOT) -> None:  # fmt: skip
        self.startup_timeout_s = startup_timeout_s
        self.max_forks = max_forks
        self.boot = boot  # tests may boot a zygote of their own; configuration cannot
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._ready: dict[str, Any] | None = None
        self._exits: dict[int, ExitReport] = {}
        self._pending: ForkedChild | None = None  # the last child whose fork reply is not read yet
        self._forgotten: set[int] = set()  # children whose end report nobody will ask for
        self._live: set[int] = set()  # children forked and not ended yet: one at a time
        self._forks = 0
        self.generation = 0  # bumped on every (re)start
        self.restarts = 0

    # --- the zygote process ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the zygote without waiting for it to be ready (the first spawn waits)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            self._discard()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", self.boot, str(PROJECT_ROOT), str(theirs.fileno())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={},
                    cwd="/",
                    close_fds=True,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,
                )
            except OSError as exc:
                ours.close()
                raise SandboxUnavailable(f"cannot start the sandbox zygote: {exc}") from exc
            finally:
                theirs.close()
            self._control = ours
            self._ready = None
            self._forks = 0
            self.generation += 1

    def _discard(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._proc is not None:
            if self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
            self._proc.wait()
            self._proc = None
        self._ready = None
        self._pending = None
        self._exits.clear()
        self._forgotten.clear()
        self._live.clear()

    def close(self) -> None:
        with self._lock:
            self._discard()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ready(self) -> dict[str, Any]:
        """Start the zygote if needed and wait for its ready message: ``{"layers": {...}, "pid": ...}``."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None or self._control is None:
                if self._proc is not None:
                    self.restarts += 1
                    log.warning("sandbox zygote %s ended (%s); starting a new one", self._proc.pid, self._proc.poll())
                self.start()
            if self._ready is None:
                message, _ = self._receive(self.startup_timeout_s)
                if message.get("ready") is not True:
                    self._discard()
                    raise SandboxUnavailable("the sandbox zygote did not start")
                self._ready = message
            return self._ready

    # --- messages ------------------------------------------------------------------------------------------------

    def _receive(self, timeout_s: float, until: Callable[[], bool] | None = None) -> tuple[dict[str, Any], list[int]]:
        """The next message from the zygote that is not an end report (those are filed away), or, with ``until``,
        nothing once ``until()`` holds."""
        assert self._control is not None
        deadline = time.monotonic() + timeout_s
        while until is None or not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the sandbox zygote did not answer in time")
            ready, _, _ = select.select([self._control], [], [], remaining)
            if not ready:
                continue
            try:
                data, fds, _, _ = socket.recv_fds(self._control, 4096, 1)
            except OSError:
                data, fds = b"", []
            if not data:
                self._zygote_gone()
            message = json.loads(data)
            if "exited" not in message:
                return message, fds
            pid = int(message["exited"])
            self._live.discard(pid)
            if pid in self._forgotten:
                self._forgotten.discard(pid)
                continue
            self._exits[pid] = ExitReport(int(message["status"]), float(message["cpu_s"]), int(message["maxrss_kb"]))
        return {}, []

    def _zygote_gone(self) -> None:
        pid = self.pid
        self._discard()
        self.restarts += 1
        raise ZygoteDied(f"the sandbox zygote {pid} went away")

    def spawn(self, request_fd: int) -> ForkedChild:
        """Have the zygote fork a child for the request in ``request_fd`` (a sealed memfd: shared/sandbox/wire.py;
        the caller keeps and closes it). Restarts a dead or worn-out zygote first. Returns at once: the child's
        answers tell when it is ready (its pipe ends at once if the fork failed)."""
        with self._lock:
            if self._forks >= self.max_forks:
                log.info("sandbox zygote %s served %s forks; replacing it", self.pid, self._forks)
                self._discard()
            self.ready()
            if self._pending is not None:  # the reply of an earlier child nobody asked for
                self.fork_reply(self._pending)
            if self._live:  # the last child was released (killed) but has not ended yet: never two at once
                self._receive(self.startup_timeout_s, until=lambda: not self._live)
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            try:
                assert self._control is not None
                try:
                    socket.send_fds(self._control, [b'{"op": "fork"}'], [request_fd, write_end])
                except OSError:
                    os.close(read_end)
                    self._zygote_gone()
            finally:
                os.close(write_end)
            self._forks += 1
            self._pending = ForkedChild(self, self.generation, read_end)
            return self._pending

    def fork_reply(self, child: ForkedChild) -> tuple[int, int]:
        """The zygote's reply to ``child``'s fork: (pid, pidfd)."""
        with self._lock:
            if child.generation != self.generation or self._control is None:
                raise ZygoteDied("the sandbox zygote that forked this child is gone")
            if child is not self._pending:
                raise SandboxUnavailable("a fork reply was read out of turn")
            self._pending = None
            message, fds = self._receive(self.startup_timeout_s)
            if "forked" not in message or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise SandboxUnavailable(f"the sandbox zygote could not fork: {message.get('error', message)}")
            child._pid, child._pidfd = int(message["forked"]), fds[0]
            child.baseline_kb = int(message.get("baseline_kb") or 0)
            self._live.add(child._pid)
            return child._pid, child._pidfd

    def forget(self, child: ForkedChild) -> None:
        """Nobody will ask for ``child``'s end report: drop it when it comes (or now, if it came)."""
        with self._lock:
            try:
                pid = child.pid
            except (SandboxUnavailable, TimeoutError):
                return
            if child.generation == self.generation and self._exits.pop(pid, None) is None:
                self._forgotten.add(pid)

    def wait_exit(self, child: ForkedChild, timeout_s: float) -> ExitReport:
        """The end report of ``child``; TimeoutError if it has not ended in time, ZygoteDied if nobody can tell."""
        with self._lock:
            pid = child.pid
            if child.generation != self.generation:
                raise ZygoteDied("the sandbox zygote that forked this child is gone")
            deadline = time.monotonic() + timeout_s
            while pid not in self._exits:
                if self._control is None:
                    raise ZygoteDied("the sandbox zygote that forked this child is gone")
                message, fds = self._receive(deadline - time.monotonic(), until=lambda: pid in self._exits)
                for fd in fds:
                    os.close(fd)
                if message:
                    log.warning("unexpected message from the sandbox zygote: %s", message)
            return self._exits.pop(pid)


_SERVERS: dict[int, ForkServer] = {}
_SERVERS_LOCK = threading.Lock()


def for_this_process(max_forks: int = DEFAULT_MAX_FORKS) -> ForkServer:
    """This process's zygote (a pool process forked from a worker that had one gets its own, never its parent's)."""
    with _SERVERS_LOCK:
        server = _SERVERS.get(os.getpid())
        if server is None:
            _SERVERS.clear()  # a parent's server: its socket is the parent's, not ours
            server = _SERVERS[os.getpid()] = ForkServer(max_forks=max_forks)
        return server
