"""The sandbox child: one shard of one job, forked from the zygote (shared/sandbox/zygote.py); it exits after.

What the fork gives it: an interpreter that never held a secret, with RestrictedPython, the policy, numpy and
``ta`` already imported, in the zygote's empty network namespace. It then confines itself before it reads any
user code (:func:`confine`): resource limits, an unprivileged uid (when the worker is root), no_new_privs and the
seccomp filter (the zygote's exported program: one ``prctl``). Nothing it does can reach the zygote or a sibling
(each is a copy-on-write copy of the zygote, which never runs user code); it serves one shard and dies.

Protocol (the parent is trusted, this process is not):

* its request: a sealed memfd, mapped read-only (shared/sandbox/wire.py): script, params, limits, mode and the
  shard's bars in one float64 blob;
* its answers, on its own pipe: one JSON line ``{"ready": true, "layers": {...}}`` once confined, then per item,
  in order, ``{"i": k, "value": x}`` or ``{"i": k, "error": {"type", "message", "line"}}``, plus ``"incidents":
  [[layer, reason, detail], ...]`` when a layer refused something for that item, and ``"output"`` /
  ``"output_dropped"`` (what ``print`` wrote, bounded) when the request asks ``capture_output``.
  Mode ``strategy`` answers ``{"i": k, "signals": {...}}`` (shared/sandbox/strategy_output.py) instead of a
  value; mode ``execute`` (no bars: a snippet) answers ``{"i": 0, "value": null, "locals": {...}}`` or its error.

Scripts see their bars as read-only float series built from the blob with one copy each
(shared/domain/sandbox/series.py), never a Python object per value, and dates as one tuple per distinct calendar.
The parent re-validates every line: nothing this process says is trusted.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import resource
import signal
import traceback
from typing import Any

from shared.domain.sandbox.policy import (
    RESULT_NAME,
    SCRIPT_FILENAME,
    PrintOutput,
    Violations,
    compile_script,
    script_globals,
)
from shared.domain.sandbox.series import series_from_bytes
from shared.sandbox import seccomp as sandbox_seccomp
from shared.sandbox.strategy_output import SignalError, check_signals
from shared.sandbox.wire import Request, read_request

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_PDEATHSIG = 1
NOBODY = 65534  # uid/gid of the sandbox when the worker runs as root
_MISSING = object()
MAX_VIOLATIONS_REPORTED = 5  # per item; the count of the rest is reported too
MAX_LOCALS = 200  # names an execute answer lists
MAX_LOCAL_CHARS = 1_000  # characters of one local's shown value


def _address_space_bytes() -> int:
    """What this process has mapped now (the zygote's interpreter, numpy, the request): the memory limit is
    granted on top of it."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def _apply_limits(limits: dict[str, Any], n_items: int) -> None:
    mem = _address_space_bytes() + int(limits["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = math.ceil(float(limits["symbol_timeout_s"]) * max(n_items, 1) + 5)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # no file writes
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no child processes (not enforced for root)
    resource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)  # loaded by the zygote, before any fork


def confine(limits: dict[str, Any], n_items: int, seccomp_program: sandbox_seccomp.Program) -> dict[str, bool]:
    """Every per-child layer, in order; returns which took effect. After this only the system calls of
    ``sandbox_seccomp.ALLOWED`` work.

    * resource limits (memory on top of what is mapped now, CPU seconds, no files, no processes);
    * never run user code as root: uid/gid 65534 (nobody) when the worker is root;
    * no new privileges ever (setuid binaries, file capabilities);
    * the seccomp filter.
    """
    _apply_limits(limits, n_items)
    root = os.geteuid() == 0
    layers = {"no_new_privs": False, "unprivileged_uid": not root}
    if root:
        zygote = os.getppid()
        with contextlib.suppress(OSError):
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            layers["unprivileged_uid"] = os.geteuid() == NOBODY
        # A change of uid clears the parent-death signal (the kernel's commit_creds): set it again, and make sure
        # the zygote did not die in between, or this child would outlive it.
        _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != zygote:
            os._exit(1)
    with contextlib.suppress(OSError, AttributeError):
        layers["no_new_privs"] = _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    layers["seccomp"] = seccomp_program.install() if layers["no_new_privs"] else False
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


def _shown(value: Any) -> Any:
    """An execute answer's view of one local: plain JSON scalars as they are, anything else as its bounded repr
    (the parent scrubs addresses from it)."""
    kind = type(value)
    if value is None or kind is bool or (kind is str and len(value) <= MAX_LOCAL_CHARS):
        return value
    if (kind is int and -(2**53) <= value <= 2**53) or (kind is float and math.isfinite(value)):
        return value
    try:
        return {"repr": repr(value)[:MAX_LOCAL_CHARS]}
    except Exception:  # a recursion, or memory
        return {"repr": f"<{kind.__name__}>"}


def _locals_of(namespace: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """What an executed snippet left in its top level: the names it bound, not its guards, builtins or inputs."""
    bound = [n for n in namespace if not n.startswith("_") and n not in inputs and n not in ("math", "statistics")]
    return {name: _shown(namespace[name]) for name in bound[:MAX_LOCALS]}


def _outcome(namespace: dict[str, Any], inputs: dict[str, Any], mode: str, max_chars: int,
             incidents: list[list[str]]) -> dict[str, Any]:  # fmt: skip
    if mode == "execute":
        return {"value": None, "locals": _locals_of(namespace, inputs)}
    if mode == "strategy":
        try:
            return {"signals": check_signals(namespace, len(inputs["close"]))}
        except SignalError as exc:
            message = str(exc)[:max_chars]
            incidents.append(["result", "invalid_signals", message])
            return {"error": {"type": "SignalError", "message": message, "line": None}}
    value = namespace.get(RESULT_NAME, _MISSING)
    if value is _MISSING:
        return {"error": {"type": "ResultError", "message": f"the script did not assign `{RESULT_NAME}`", "line": None}}
    try:
        return {"value": check_result(value)}
    except (TypeError, ValueError, OverflowError) as exc:
        error = _describe(exc, max_chars)
        incidents.append(["result", "invalid_result", str(error["message"])])
        return {"error": error}


def run_one(code: Any, inputs: dict[str, Any], mode: str, max_chars: int, output: PrintOutput) -> dict[str, Any]:
    """One execution with fresh globals: the script's answer, its error, and what the layers refused."""
    violations: Violations = []
    incidents: list[list[str]] = []
    namespace = script_globals(inputs, violations, output)
    try:
        exec(code, namespace)
        outcome = _outcome(namespace, inputs, mode, max_chars, incidents)
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


def _inputs(request: Request, entry: dict[str, Any], calendars: dict[int, tuple[str, ...]], params_json: str
            ) -> dict[str, Any]:  # fmt: skip
    names = request.header["series"]
    inputs: dict[str, Any] = {name: series_from_bytes(request.series(entry, k)) for k, name in enumerate(names)}
    index = int(entry["dates"])
    if index not in calendars:  # one tuple per distinct calendar of the shard: immutable, so shared safely
        calendars[index] = request.calendar(index)
    inputs["dates"] = calendars[index]
    inputs["symbol"] = entry["symbol"]
    inputs["params"] = json.loads(params_json)  # a fresh copy per symbol
    return inputs


def serve(request_fd: int, out_fd: int, seccomp_program: sandbox_seccomp.Program, zygote_layers: dict[str, bool]
          ) -> None:  # fmt: skip
    """The child's whole life after the fork: map the request, confine, answer every item."""
    request = read_request(request_fd)
    os.close(request_fd)
    header = request.header
    entries: list[dict[str, Any]] = header["items"]
    limits: dict[str, Any] = header["limits"]
    max_chars = int(limits["max_error_chars"])
    mode = str(header.get("mode") or "calculation")
    capture = bool(header.get("capture_output"))
    output_limit = int(header.get("output_chars") or 0)
    layers = {**zygote_layers, **confine(limits, len(entries), seccomp_program)}

    def emit(message: dict[str, Any]) -> None:
        data = json.dumps(message, allow_nan=True).encode() + b"\n"
        view = memoryview(data)
        while view:
            view = view[os.write(out_fd, view) :]

    emit({"ready": True, "layers": layers})  # start-up ends here: compiling is the script's first work
    params_json = json.dumps(header["params"])
    try:
        code = compile_script(header["script"])
    except Exception as exc:
        for index in range(max(len(entries), 1 if mode == "execute" else 0)):
            emit({"i": index, "error": _describe(exc, max_chars)})
        return
    calendars: dict[int, tuple[str, ...]] = {}
    runs = [{"params": json.loads(params_json)}] if mode == "execute" else None
    for index in range(len(runs) if runs is not None else len(entries)):
        inputs = runs[index] if runs is not None else _inputs(request, entries[index], calendars, params_json)
        output = PrintOutput(output_limit)
        answer = run_one(code, inputs, mode, max_chars, output)
        if capture:
            answer["output"], answer["output_dropped"] = output.text(), output.dropped
        emit({"i": index, **answer})
