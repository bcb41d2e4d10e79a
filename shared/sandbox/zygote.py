"""The sandbox zygote: a clean interpreter, prepared once, that forks one child per shard.

Started by the worker (shared/sandbox/forkserver.py) the way a sandbox process always was: ``python -I`` with an
empty environment, ``cwd=/``, its own session, every inherited descriptor closed but its control socket. It never
held a secret and never runs user code. Once, at start, it

* imports what children need (RestrictedPython, the policy, numpy with one thread, ``ta``) and compiles a script,
  so that a child's first script pays no import or warm-up;
* enters an empty network namespace (as root directly, otherwise inside an unprivileged user namespace), which
  every child inherits: no child can reach the database, the broker or anything else over a network;
* builds the seccomp filter and exports it as a BPF program, for each child to install with one ``prctl``;
* freezes its objects out of the garbage collector, so that children do not copy its pages by collecting them.

Then it serves its worker process over a SOCK_SEQPACKET socket (its descriptor is the boot's second argument),
one JSON message per packet:

* worker -> zygote: ``{"op": "fork"}`` with two descriptors, the child's request (a sealed memfd) and the write end
  of its answer pipe. The zygote forks; the child (shared/sandbox/child.py) keeps only those two descriptors, dies
  with the zygote (``PR_SET_PDEATHSIG``), confines itself and runs the shard.
* zygote -> worker: ``{"forked": pid, "baseline_kb": k}`` with a pidfd of the child (race-free kills; ``k`` is the
  zygote's resident memory, what the child starts with), or ``{"error": ...}``; then,
  when the child has ended, ``{"exited": pid, "status": s, "cpu_s": x, "maxrss_kb": y}`` from ``wait4``: the
  supervisor's measure of what the child used (CPU quotas count it).

What fork shares, and why it is safe enough: a child is a copy-on-write copy of the zygote, so nothing a script
changes (a module attribute, a cache, a builtin) reaches the zygote or a sibling: each child starts from the
zygote's pristine memory and is gone after its shard. What siblings do share is the address layout: ASLR is
randomized once per zygote, so one address leaked by one child describes every sibling's memory. That is why the
parent scrubs anything that looks like an address from every error and output before storing it, and why the
worker replaces its zygote after a bounded number of forks (``ALPHAFORGE_SANDBOX_ZYGOTE_FORKS``), re-randomizing.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import select
import signal
import socket
import sys
from typing import Any

from shared.sandbox import seccomp

_PR_SET_PDEATHSIG = 1
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_WARM_UP_SCRIPT = "import math\nimport ta\nx = [c for c in close]\nresult = ta.sma(close, 2)[-1] + len(x)"


def die_with_parent() -> None:
    """Linux: SIGKILL when the parent dies, so no zygote outlives its worker and no child its zygote."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _network_namespace() -> bool:
    """An empty network namespace for the zygote and so for every child (cheaper than one per child)."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET
    with contextlib.suppress(OSError, AttributeError):
        return bool(libc.unshare(flags) == 0)
    return False


def _prepare() -> tuple[seccomp.Program, dict[str, bool]]:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # numpy must not start threads (and unshare needs a single-threaded process)
    from shared.domain.sandbox.policy import compile_script, indicator_facade, script_globals
    from shared.domain.sandbox.series import series_of
    from shared.sandbox import child

    indicator_facade()  # numpy and ta
    warm = series_of([1.0, 2.0, 3.0])
    exec(compile_script(_WARM_UP_SCRIPT), script_globals({"close": warm}))
    child._libc()  # loaded once, here: a child's confinement opens no library
    program = seccomp.Program(seccomp.Filter().export())
    layers = {"network_namespace": _network_namespace()}
    return program, layers


def _send(control: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    socket.send_fds(control, [json.dumps(message).encode()], fds or [])


def _fork_child(control: socket.socket, fds: list[int], program: seccomp.Program, layers: dict[str, bool]) -> int:
    """Fork one child that serves the request in ``fds`` (request memfd, answer pipe). Returns its pid."""
    request_fd, out_fd = fds
    zygote = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != zygote:
            os._exit(1)
        low, high = sorted((request_fd, out_fd))
        os.closerange(3, low)  # the control socket, other children's pidfds: nothing but its own two
        os.closerange(low + 1, high)
        os.closerange(high + 1, 1 << 20)
        from shared.sandbox.child import serve

        serve(request_fd, out_fd, program, layers)
        code = 0
    finally:
        os._exit(code)


def serve_forks(control: socket.socket, program: seccomp.Program, layers: dict[str, bool]) -> None:
    """The zygote's loop: fork on request, report each child's end. Returns when the worker goes away."""
    poller = select.poll()
    poller.register(control, select.POLLIN)
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, pidfd); the pidfd is readable once the child ends
    while True:
        for fd, _ in poller.poll():
            if fd in children:
                pid, pidfd = children.pop(fd)
                poller.unregister(pidfd)
                os.close(pidfd)
                _, status, usage = os.wait4(pid, 0)
                report = {"exited": pid, "status": status, "cpu_s": usage.ru_utime + usage.ru_stime,
                          "maxrss_kb": usage.ru_maxrss}  # fmt: skip
                _send(control, report)
                continue
            try:
                data, fds, _, _ = socket.recv_fds(control, 4096, 2)
            except OSError:
                return
            if not data:
                return  # the worker closed its end
            try:
                if json.loads(data).get("op") != "fork" or len(fds) != 2:
                    _send(control, {"error": "bad request"})
                    continue
                pid = _fork_child(control, fds, program, layers)
            except OSError as exc:
                _send(control, {"error": f"fork failed: {exc.strerror}"})
                continue
            finally:
                for received in fds:
                    os.close(received)
            pidfd = os.pidfd_open(pid)
            children[pidfd] = (pid, pidfd)
            poller.register(pidfd, select.POLLIN)
            baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # what a child starts with, resident
            _send(control, {"forked": pid, "baseline_kb": baseline}, [pidfd])


def main(control_fd: int) -> None:
    die_with_parent()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    control = socket.socket(fileno=control_fd)
    program, layers = _prepare()
    gc.collect()
    gc.freeze()
    _send(control, {"ready": True, "layers": layers, "pid": os.getpid()})
    serve_forks(control, program, layers)
    sys.exit(0)
