"""Supervision of ``alphaforge up``'s processes: start them, restart what dies, stop them all.

Every child runs in its own session/process group. A child or embedded server that dies is restarted after a
backoff (``Supervision.backoff_s``, doubling up to ``backoff_max_s``; back to the shortest wait once it stayed up
``stable_after_s``), each death and restart logged with its pid, how it ended, the attempt and the next wait.
Only a process that died more than ``max_restarts`` times within ``window_s`` stops the system: :meth:`watch`
returns 1 with the reason logged. The embedded servers (PostgreSQL, Redis) are *dependencies*: they are restarted
first, children wait while one is down, and a child that dies while a dependency is down or within
``stable_after_s`` of its restart is restarted without counting against its budget (it died of the outage, not
of itself).

Stopping sends SIGTERM to each child (the main process of gunicorn and Celery, which then shut down their own
workers gracefully), waits up to ``STOP_GRACE_S``, then SIGTERMs and finally SIGKILLs whatever is left in each
process group plus any descendant that moved to another group. The leftovers of a child that died are removed
the same way before it is started again (gunicorn workers still holding the API's port, for instance).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from shared.infra.config import Supervision
from shared.jobs import backoff

log = logging.getLogger("alphaforge.up")

STOP_GRACE_S = 20.0  # graceful shutdown budget of the children after SIGTERM
LEFTOVER_GRACE_S = 2.0  # then the rest of each process group gets SIGTERM, and after this SIGKILL


# --- signals -------------------------------------------------------------------------------------------------

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Shutdown(BaseException):
    """Raised in the main thread by the first SIGINT/SIGTERM/SIGHUP (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class ShutdownSignals:
    """The first SIGINT/SIGTERM/SIGHUP raises :class:`Shutdown`; later ones are only logged (cleanup goes on).

    Inside :meth:`deferred` (starting servers or children, where an exception in the middle could lose track of
    a process) the signal is remembered and raised when the block ends.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopping = False
        self._defer = 0
        self._previous: dict[int, _Handler] = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal was closed
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def begin_stopping(self) -> None:
        """From now on signals are ignored (we are already shutting down)."""
        self.stopping = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stopping or self.received is not None:
            log.warning("received %s while stopping; still stopping (up to %.0f s)", name, STOP_GRACE_S)
            return
        self.received = signum
        log.info("received %s: shutting down", name)
        if self._defer == 0:
            raise Shutdown(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        if self._defer == 0 and self.received is not None and not self.stopping:
            raise Shutdown(self.received)


# --- child processes -----------------------------------------------------------------------------------------


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def terminate(procs: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM, wait up to ``grace_s``, SIGKILL."""
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signum)
        deadline = time.monotonic() + wait_s
        while any(_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not any(_alive(p) for p in procs):
            return


def _group_members(pgids: set[int]) -> set[psutil.Process]:
    members: set[psutil.Process] = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(proc.pid) in pgids:
                members.add(proc)
    return members


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass
class Restarts:
    """One process's restart history: the backoff before its next start and the give-up rule."""

    policy: Supervision
    started_at: float = field(default_factory=time.monotonic)
    attempt: int = 0  # restarts in a row since it last stayed up for ``stable_after_s`` (logged)
    _step: int = 0  # the backoff's exponent: counted deaths in a row
    recent: deque[float] = field(default_factory=deque)  # when it died (counted deaths only), within the window

    def after_death(self, now: float, *, excused: bool = False) -> float | None:
        """The wait before the next start, or None when it died too often within the window (give up). An
        excused death (of an outage of a server it needs) waits the shortest time and counts for nothing."""
        policy = self.policy
        if now - self.started_at >= policy.stable_after_s:
            self.attempt = self._step = 0
        self.attempt += 1
        if excused:
            return policy.backoff_s
        while self.recent and now - self.recent[0] > policy.window_s:
            self.recent.popleft()
        self.recent.append(now)
        if len(self.recent) > policy.max_restarts:
            return None
        self._step += 1
        # no jitter: one process restarting, nobody to spread out from (the doubling of shared/jobs/backoff.py)
        return backoff.ceiling_s(self._step - 1, policy.backoff_s, policy.backoff_max_s)


@dataclass
class Child:
    """A child process `up` keeps running (``popen`` is the latest one; while ``restart_at`` is set it waits in
    backoff and ``popen`` is the one that died)."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    env: dict[str, str] | None = None
    cwd: Path | None = None
    restarts: Restarts = field(default_factory=lambda: Restarts(Supervision()))
    restart_at: float | None = None

    @property
    def pgid(self) -> int:
        return self.popen.pid  # start_new_session=True: the child leads its own session and process group

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_status(self) -> str | None:
        returncode = self.popen.poll()
        return None if returncode is None else describe_exit(returncode)


@dataclass
class Server:
    """An embedded server `up` started (shared/ops/embedded.py): the children depend on it."""

    name: str
    get_pid: Callable[[], int | None]
    get_exit_status: Callable[[], str | None]  # None while it runs, else how it ended
    restart: Callable[[], object]  # on the same data dir and port/socket, so that clients keep their URLs
    restarts: Restarts = field(default_factory=lambda: Restarts(Supervision()))
    restart_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self.get_pid()

    def exit_status(self) -> str | None:
        return self.get_exit_status()


class GiveUp(Exception):
    """A process died more often than the restart budget allows."""


class Supervisor:
    """Starts child processes, each in its own process group, restarts what dies (see the module docstring),
    and stops them all.

    ``guard`` wraps every start (a context manager: ``ShutdownSignals.deferred`` in `up`, so that a signal cannot
    arrive between creating a process and recording it).
    """

    def __init__(
        self,
        policy: Supervision | None = None,
        guard: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self.policy = policy or Supervision()
        self.guard = guard
        self.children: list[Child] = []
        self.servers: list[Server] = []
        self._dependency_back_at = float("-inf")  # when an embedded server last came back

    def start(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> Child:
        with self.guard():
            child = Child(name, list(argv), self._spawn(argv, env, cwd), dict(env) if env is not None else None, cwd,
                          Restarts(self.policy))  # fmt: skip
            self.children.append(child)
        log.info("started %s (pid %d): %s", name, child.pid, " ".join(argv))
        return child

    def add_server(
        self,
        name: str,
        *,
        pid: Callable[[], int | None],
        exit_status: Callable[[], str | None],
        restart: Callable[[], object],
    ) -> Server:
        server = Server(name, pid, exit_status, restart, Restarts(self.policy))
        self.servers.append(server)
        return server

    @staticmethod
    def _spawn(argv: Sequence[str], env: Mapping[str, str] | None, cwd: Path | None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def exited(self) -> Child | None:
        """The first child that is no longer running, if any."""
        for child in self.children:
            if child.popen.poll() is not None:
                return child
        return None

    def watch(self, poll_s: float = 0.5, on_tick: Callable[[], None] | None = None) -> int:
        """Supervise until a process used up its restart budget (returns 1, the reason logged). Signals interrupt
        this with :class:`Shutdown`."""
        while True:
            try:
                self.check()
            except GiveUp as exc:
                log.error("%s; stopping everything", exc)
                return 1
            if on_tick is not None:
                on_tick()
            time.sleep(poll_s)

    def check(self, now: float | None = None) -> None:
        """One round: notice deaths (scheduling their restarts) and restart what is due. Raises :class:`GiveUp`."""
        now = time.monotonic() if now is None else now
        for server in self.servers:
            if server.restart_at is None:
                self._notice(server, now, excused=False)
        dependency_down = any(s.restart_at is not None for s in self.servers)
        excused = dependency_down or now - self._dependency_back_at < self.policy.stable_after_s
        for child in self.children:
            if child.restart_at is None:
                self._notice(child, now, excused=excused)
        for server in self.servers:
            if server.restart_at is not None and now >= server.restart_at:
                self._restart_server(server)
        if any(s.restart_at is not None for s in self.servers):
            return  # children wait for their servers (they would only fail against a missing one)
        for child in self.children:
            if child.restart_at is not None and time.monotonic() >= child.restart_at:
                self._restart_child(child)

    def _notice(self, unit: Child | Server, now: float, *, excused: bool, status: str | None = None) -> None:
        status = status or unit.exit_status()
        if status is None:
            return
        delay = unit.restarts.after_death(now, excused=excused)
        if delay is None:
            policy = self.policy
            raise GiveUp(
                f"{unit.name} (pid {unit.pid}) {status}: it died {len(unit.restarts.recent)} times within "
                f"{policy.window_s:.0f} s (more than ALPHAFORGE_RESTART_MAX={policy.max_restarts} within "
                f"ALPHAFORGE_RESTART_WINDOW={policy.window_s:.0f} s)"
            )
        unit.restart_at = now + delay
        note = " (an embedded server was down: not counted as a failure)" if excused else ""
        log.warning("%s (pid %s) %s; restart attempt %d in %.1f s%s", unit.name, unit.pid, status,
                    unit.restarts.attempt, delay, note)  # fmt: skip

    def _restart_server(self, server: Server) -> None:
        old_pid = server.pid
        started = time.monotonic()
        try:
            with self.guard():
                server.restart()
        except Exception as exc:  # it failed to come back: that counts as another death
            server.restart_at = None
            self._notice(server, time.monotonic(), excused=False, status=f"did not start again ({exc})")
            return
        server.restart_at = None
        server.restarts.started_at = self._dependency_back_at = time.monotonic()
        log.warning("restarted %s (pid %s, was %s) in %.1f s", server.name, server.pid, old_pid,
                    time.monotonic() - started)  # fmt: skip

    def _restart_child(self, child: Child) -> None:
        old_pid = child.pid
        self._remove_leftovers(child)
        try:
            with self.guard():
                child.popen = self._spawn(child.argv, child.env, child.cwd)
        except OSError as exc:
            child.restart_at = None
            self._notice(child, time.monotonic(), excused=False, status=f"could not be started ({exc})")
            return
        child.restart_at = None
        child.restarts.started_at = time.monotonic()
        log.warning("restarted %s (pid %d, was %d)", child.name, child.pid, old_pid)

    def _remove_leftovers(self, child: Child) -> None:
        """What is left of a child that died: the rest of its process group (e.g. gunicorn workers still holding
        the API's port until they notice their master is gone)."""
        leftovers = [p for p in _group_members({child.pgid}) if _alive(p)]
        if leftovers:
            log.info("%s: stopping %d leftover processes of pid %d", child.name, len(leftovers), child.pid)
            terminate(leftovers, grace_s=LEFTOVER_GRACE_S)

    def _processes(self) -> set[psutil.Process]:
        """Every process of every child: its process group plus its descendants (even those in other groups)."""
        procs = _group_members({c.pgid for c in self.children})
        for child in self.children:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(child.popen.pid)
                procs.add(root)
                procs.update(root.children(recursive=True))
        return procs

    def _wait(self, procs: set[psutil.Process], timeout_s: float, *, leaders_only: bool = False) -> bool:
        """Wait until the children (or all ``procs`` and group members) are gone; True if they are."""
        deadline = time.monotonic() + timeout_s
        while True:
            for child in self.children:
                child.popen.poll()  # reap our own children
            if leaders_only:
                done = all(c.popen.returncode is not None for c in self.children)
            else:
                procs |= _group_members({c.pgid for c in self.children})
                done = not any(_alive(p) for p in procs)
            if done or time.monotonic() >= deadline:
                return done
            time.sleep(0.1)

    def stop(self, grace_s: float = STOP_GRACE_S, leftover_grace_s: float = LEFTOVER_GRACE_S) -> None:
        if not self.children:
            return
        procs = self._processes()
        running = [c for c in self.children if c.popen.poll() is None]
        if running:
            log.info("stopping %s", ", ".join(f"{c.name} (pid {c.popen.pid})" for c in running))
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.popen.send_signal(signal.SIGTERM)
        if not self._wait(procs, grace_s, leaders_only=True):
            log.warning(
                "still running after %.0f s: %s",
                grace_s,
                ", ".join(c.name for c in self.children if c.popen.returncode is None),
            )
        # Whatever is left over: the rest of each process group and descendants that changed group.
        procs |= self._processes()
        for signum, wait_s in ((signal.SIGTERM, leftover_grace_s), (signal.SIGKILL, 10.0)):
            for child in self.children:
                _signal_group(child.pgid, signum)
            for proc in procs:
                if _alive(proc):
                    with contextlib.suppress(psutil.Error):
                        proc.send_signal(signum)
            if self._wait(procs, wait_s):
                break
        else:
            log.error("processes survived SIGKILL: %s", sorted(p.pid for p in procs if _alive(p)))
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(timeout=1)
        self.children.clear()
