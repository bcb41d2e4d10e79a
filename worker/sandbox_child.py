"""The sandbox process: runs one user script over a batch of symbols, then exits.

Started by worker/sandbox_runner.py as ``python -I -c <boot> <project root>`` with an empty
environment, ``cwd=/`` and its own session. Protocol (the parent is trusted, this process is not):

* stdin: 8-byte big-endian length, then a pickle of the request (script, params, limits, items);
* stdout: one JSON line ``{"ready": true}`` once limits are applied, then per item, in order,
  ``{"i": k, "value": x}`` or ``{"i": k, "error": {"type", "message", "line"}}``.

The parent re-validates every line: nothing this process says is trusted.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import pickle
import resource
import signal
import sys
import traceback
from array import array
from typing import Any, BinaryIO

from shared.sandbox.policy import RESULT_NAME, SCRIPT_FILENAME, compile_script, script_globals

SERIES = ("open", "high", "low", "close", "volume")
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
NOBODY = 65534  # uid/gid of the sandbox when the worker runs as root
_MISSING = object()


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            raise EOFError("parent closed the input early")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _apply_limits(limits: dict[str, Any], n_items: int) -> None:
    mem = int(limits["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = math.ceil(float(limits["symbol_timeout_s"]) * max(n_items, 1) + 5)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # no file writes
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no child processes (not enforced for root)
    resource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))


def _isolate() -> dict[str, bool]:
    """Kernel-level isolation before user code runs; returns which layers took effect.

    * an empty network namespace: no TCP/UDP to anything, the worker's database and broker included
      (as root directly; otherwise through an unprivileged user namespace where the host allows one);
    * no new privileges ever (setuid binaries, file capabilities);
    * never run user code as root: uid/gid 65534 (nobody) when the worker is root.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    layers = {"network_namespace": False, "no_new_privs": False, "unprivileged_uid": not root}
    with contextlib.suppress(OSError, AttributeError):
        layers["network_namespace"] = libc.unshare(_CLONE_NEWNET if root else _CLONE_NEWUSER | _CLONE_NEWNET) == 0
    with contextlib.suppress(OSError, AttributeError):
        layers["no_new_privs"] = libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    if root:
        with contextlib.suppress(OSError):
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            layers["unprivileged_uid"] = os.geteuid() == NOBODY
    return layers


def _error_line(exc: BaseException) -> int | None:
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == SCRIPT_FILENAME:
            line = frame.lineno
    return line


def _describe(exc: BaseException, max_chars: int) -> dict[str, Any]:
    if isinstance(exc, MemoryError):
        message = "the script exceeded the memory limit"
    else:
        try:
            message = str(exc)
        except Exception:  # a hostile __str__
            message = "<unprintable message>"
    return {"type": type(exc).__name__[:100], "message": message[:max_chars], "line": _error_line(exc)}


def check_result(value: Any) -> float | None:
    """Only plain finite numbers (or None) leave the sandbox; anything else is the symbol's error."""
    if value is None:
        return None
    kind = type(value)
    if kind is bool:
        raise TypeError("result must be a number or None, not a bool")
    if kind is not int and kind is not float:
        raise TypeError(f"result must be a number or None, not {kind.__name__}")
    number = float(value)  # OverflowError for huge ints
    if not math.isfinite(number):
        raise ValueError(f"result must be finite, got {number!r}")
    return number


def _run_one(code: Any, item: dict[str, Any], params_json: str, max_chars: int) -> dict[str, Any]:
    inputs: dict[str, Any] = {name: tuple(array("d", item[name])) for name in SERIES}
    inputs["dates"] = tuple(item["dates"])
    inputs["symbol"] = item["symbol"]
    inputs["params"] = json.loads(params_json)  # a fresh copy per symbol
    namespace = script_globals(inputs)
    try:
        exec(code, namespace)
        value = namespace.get(RESULT_NAME, _MISSING)
        if value is _MISSING:
            return {
                "error": {"type": "ResultError", "message": f"the script did not assign `{RESULT_NAME}`", "line": None}
            }
        return {"value": check_result(value)}
    except BaseException as exc:
        return {"error": _describe(exc, max_chars)}


def _die_with_parent() -> None:
    """Linux: get SIGKILL if the worker process dies, so no sandbox outlives its supervisor."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def main() -> None:
    _die_with_parent()
    out = os.fdopen(os.dup(1), "wb")
    request = pickle.loads(_read_exact(sys.stdin.buffer, int.from_bytes(_read_exact(sys.stdin.buffer, 8), "big")))
    items: list[dict[str, Any]] = request["items"]
    limits: dict[str, Any] = request["limits"]
    max_chars = int(limits["max_error_chars"])
    # Nothing the script does may reach a real stream: fds 0-2 point at /dev/null from here on.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _apply_limits(limits, len(items))
    layers = _isolate()

    def emit(message: dict[str, Any]) -> None:
        out.write(json.dumps(message, allow_nan=True).encode() + b"\n")
        out.flush()

    try:
        code = compile_script(request["script"])
    except Exception as exc:
        emit({"ready": True, "layers": layers})
        for index in range(len(items)):
            emit({"i": index, "error": _describe(exc, max_chars)})
        return
    params_json = json.dumps(request["params"])
    emit({"ready": True, "layers": layers})
    for index, item in enumerate(items):
        emit({"i": index, **_run_one(code, item, params_json, max_chars)})
