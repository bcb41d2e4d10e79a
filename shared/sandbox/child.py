"""The sandbox process: runs one user script over a batch of symbols, then exits.

Started by shared/sandbox/runner.py as ``python -I -c <boot> <project root>`` with an empty
environment, ``cwd=/`` and its own session. Protocol (the parent is trusted, this process is not):

* stdin: 8-byte big-endian length, then a pickle of the request (script, params, limits, items);
* stdout: one JSON line ``{"ready": true, "layers": {...}}`` once limits are applied, then per item, in
  order, ``{"i": k, "value": x}`` or ``{"i": k, "error": {"type", "message", "line"}}``, plus
  ``"incidents": [[layer, reason, detail], ...]`` when a layer refused something for that item.
  A request with ``"mode": "strategy"`` (a strategy script) answers ``{"i": k, "signals": {...}}``
  instead of ``"value"``: ``n`` (bars), ``warmup`` and either ``entries`` and ``exits`` (base64 of packed
  bits, least significant bit first) or ``position`` (base64 of little-endian float64); see
  :func:`check_signals`. Without ``mode`` the request is a calculation, answered exactly as before.

Set-up order: read the input, preload what the script imports (``ta`` needs numpy, which opens files),
apply resource limits, isolate (network namespace, no_new_privs, unprivileged uid), load the seccomp
filter, and only then compile and run user code. The parent re-validates every line: nothing this
process says is trusted.
"""

from __future__ import annotations

import base64
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
from collections.abc import Collection
from typing import Any, BinaryIO

from shared.domain.sandbox.policy import (
    ENTRIES_NAME,
    EXITS_NAME,
    INDICATOR_MODULE,
    POSITION_NAME,
    RESULT_NAME,
    SCRIPT_FILENAME,
    WARMUP_NAME,
    Violations,
    compile_script,
    imports_of,
    indicator_facade,
    script_globals,
)
from shared.sandbox import seccomp as sandbox_seccomp

SERIES = ("open", "high", "low", "close", "volume")
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
NOBODY = 65534  # uid/gid of the sandbox when the worker runs as root
_MISSING = object()
MAX_VIOLATIONS_REPORTED = 5  # per item; the count of the rest is reported too


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
    """The deepest line of the user script in the traceback (read from frames: no source file access)."""
    line = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == SCRIPT_FILENAME:
            line = lineno
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


class SignalError(ValueError):
    """A strategy script's series are not what the contract asks for (the message names the problem)."""


def pack_bits(values: tuple[bool, ...] | list[bool]) -> str:
    """Booleans as base64 of packed bits, least significant bit first (8 bars a byte)."""
    out = bytearray((len(values) + 7) // 8)
    for i, value in enumerate(values):
        if value:
            out[i >> 3] |= 1 << (i & 7)
    return base64.b64encode(bytes(out)).decode("ascii")


def _bools(name: str, value: Any, n: int) -> str:
    kind = type(value)
    if kind is not tuple and kind is not list:
        raise SignalError(f"{name} must be a tuple (or list) of booleans, one per bar, not {kind.__name__}")
    if len(value) != n:
        raise SignalError(f"{name} has {len(value):,} values; expected {n:,} (one per bar)")
    for i, item in enumerate(value):
        if type(item) is not bool:  # checked by type: no __bool__ of a script's object ever runs here
            raise SignalError(f"{name}[{i}] is {type(item).__name__}, not bool (True or False)")
    return pack_bits(value)


def _positions(value: Any, n: int) -> str:
    kind = type(value)
    if kind is not tuple and kind is not list:
        raise SignalError(f"{POSITION_NAME} must be a tuple (or list) of numbers, one per bar, not {kind.__name__}")
    if len(value) != n:
        raise SignalError(f"{POSITION_NAME} has {len(value):,} values; expected {n:,} (one per bar)")
    numbers = array("d")
    for i, item in enumerate(value):
        if type(item) is not float and type(item) is not int:
            raise SignalError(f"{POSITION_NAME}[{i}] is {type(item).__name__}, not a number")
        try:
            number = float(item)
        except OverflowError:
            raise SignalError(f"{POSITION_NAME}[{i}] is too large") from None
        if not -1.0 <= number <= 1.0:  # NaN fails this too
            raise SignalError(f"{POSITION_NAME}[{i}] is {number!r}; a target position is between -1 and 1")
        numbers.append(number)
    if sys.byteorder != "little":  # pragma: no cover - the wire format is little-endian
        numbers.byteswap()
    return base64.b64encode(numbers.tobytes()).decode("ascii")


def check_signals(namespace: dict[str, Any], n: int) -> dict[str, Any]:
    """A strategy script's output, checked by exact type and length and encoded compactly for the parent.

    Either ``entries`` and ``exits`` (booleans) or ``position`` (numbers in [-1, 1]), one per bar; optional
    ``warmup`` (int, the first bar the signals mean anything, default 0). The parent checks all of it again.
    """
    entries = namespace.get(ENTRIES_NAME, _MISSING)
    exits = namespace.get(EXITS_NAME, _MISSING)
    position = namespace.get(POSITION_NAME, _MISSING)
    warmup = namespace.get(WARMUP_NAME, 0)
    if type(warmup) is not int:
        raise SignalError(f"{WARMUP_NAME} must be an int, not {type(warmup).__name__}")
    if not 0 <= warmup < max(n, 1):
        raise SignalError(f"{WARMUP_NAME} is {warmup:,}; it must be a bar index from 0 to {max(n - 1, 0):,}")
    signals: dict[str, Any] = {"n": n, "warmup": warmup}
    if position is not _MISSING:
        if entries is not _MISSING or exits is not _MISSING:
            raise SignalError(f"assign either `{ENTRIES_NAME}` and `{EXITS_NAME}`, or `{POSITION_NAME}`, not both")
        signals[POSITION_NAME] = _positions(position, n)
        return signals
    if entries is _MISSING and exits is _MISSING:
        raise SignalError(
            f"the strategy script assigned neither `{ENTRIES_NAME}` and `{EXITS_NAME}` nor `{POSITION_NAME}`"
        )
    if entries is _MISSING or exits is _MISSING:
        given, absent = (ENTRIES_NAME, EXITS_NAME) if exits is _MISSING else (EXITS_NAME, ENTRIES_NAME)
        raise SignalError(f"the strategy script assigned `{given}` but not `{absent}`")
    signals[ENTRIES_NAME] = _bools(ENTRIES_NAME, entries, n)
    signals[EXITS_NAME] = _bools(EXITS_NAME, exits, n)
    return signals


def _run_one(
    code: Any, item: dict[str, Any], params_json: str, max_chars: int, strategy: bool = False
) -> dict[str, Any]:
    inputs: dict[str, Any] = {name: tuple(array("d", item[name])) for name in SERIES}
    indicators = sys.modules.get("shared.domain.sandbox.ta")
    if indicators is not None:  # `ta` skips re-checking and re-packing these exact tuples (trusted bytes)
        indicators._register_series(*((inputs[name], item[name]) for name in SERIES))
    inputs["dates"] = tuple(item["dates"])
    inputs["symbol"] = item["symbol"]
    inputs["params"] = json.loads(params_json)  # a fresh copy per symbol
    violations: Violations = []
    incidents: list[list[str]] = []
    namespace = script_globals(inputs, violations)
    try:
        exec(code, namespace)
        value = namespace.get(RESULT_NAME, _MISSING)
        outcome: dict[str, Any]
        if strategy:
            try:
                outcome = {"signals": check_signals(namespace, len(inputs["close"]))}
            except SignalError as exc:
                outcome = {"error": {"type": "SignalError", "message": str(exc)[:max_chars], "line": None}}
                incidents.append(["result", "invalid_signals", outcome["error"]["message"]])
        elif value is _MISSING:
            outcome = {
                "error": {"type": "ResultError", "message": f"the script did not assign `{RESULT_NAME}`", "line": None}
            }
        else:
            try:
                outcome = {"value": check_result(value)}
            except (TypeError, ValueError, OverflowError) as exc:
                outcome = {"error": _describe(exc, max_chars)}
                incidents.append(["result", "invalid_result", outcome["error"]["message"]])
    except BaseException as exc:
        outcome = {"error": _describe(exc, max_chars)}
        if isinstance(exc, MemoryError):
            incidents.append(["process", "memory_limit", outcome["error"]["message"]])
    for reason, detail in violations[:MAX_VIOLATIONS_REPORTED]:
        incidents.append(["language", reason, detail[:max_chars]])
    if len(violations) > MAX_VIOLATIONS_REPORTED:
        more = len(violations) - MAX_VIOLATIONS_REPORTED
        incidents.append(["language", "policy_violation", f"and {more} more refusals of the same run"])
    if incidents:
        outcome["incidents"] = incidents
    return outcome


def _wanted_modules(source: str) -> set[str]:
    try:
        return imports_of(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return set()  # the script gets its compile error later, under the limits


def confine(limits: dict[str, Any], n_items: int, preload: Collection[str] = ()) -> dict[str, bool]:
    """Apply every process-level layer, in order; returns which took effect. After this, only the
    system calls of ``sandbox_seccomp.ALLOWED`` work: anything that needs a file is loaded before."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # numpy must not start threads
    syscall_filter = sandbox_seccomp.Filter()  # before RLIMIT_NPROC: its fallback lookup runs ldconfig
    _apply_limits(limits, n_items)
    if INDICATOR_MODULE in preload:
        with contextlib.suppress(ImportError):  # then the script's `import ta` fails with a clear ImportError
            indicator_facade()
    layers = _isolate()
    layers["seccomp"] = syscall_filter.load()
    return layers


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
    layers = confine(limits, len(items), preload=_wanted_modules(request["script"]))

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
    strategy = request.get("mode") == "strategy"
    emit({"ready": True, "layers": layers})
    for index, item in enumerate(items):
        emit({"i": index, **_run_one(code, item, params_json, max_chars, strategy)})
