"""The process layer of the sandbox: the trusted parent side.

User code never runs in the worker process. For each shard a fresh interpreter is started
(``python -I``, empty environment, ``cwd=/``, own session, inherited descriptors closed); it applies
its resource limits before touching user code (shared/sandbox/child.py). This side enforces the
wall-clock deadline per symbol with a kill, caps what it reads, and re-checks every result. When a
symbol times out or kills its process, that symbol gets the error and a new process continues with
the symbols after it: one bad symbol never costs the others their results.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from shared.domain.sandbox.policy import ENTRIES_NAME, EXITS_NAME, POSITION_NAME
from shared.infra.config import SandboxLimits
from shared.infra.security import Incident, is_known
from shared.jobs.pipeline import Outcome
from shared.marketdata.bars import SymbolBars
from shared.sandbox.signals import ScriptSignals, StrategyOutcome

log = logging.getLogger(__name__)

_T = TypeVar("_T")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from shared.sandbox.child import main; main()"


class SandboxUnavailable(RuntimeError):
    """The sandbox process could not be started or set up: an infrastructure fault, worth a retry."""


class _ChildFault(Exception):
    """The child broke the protocol, died or ran out of time while working on one symbol."""

    def __init__(self, kind: str, message: str, layer: str = "supervisor", reason: str = "protocol_violation") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.incident = Incident(layer, reason, message)


# How the kernel ended a sandbox process, as (layer, reason, plain words).
_DEATHS = {
    "SIGXCPU": ("process", "cpu_limit", " (CPU time limit)"),
    "SIGSYS": ("seccomp", "seccomp_kill", " (a forbidden system call)"),
    "SIGKILL": ("process", "killed", " (killed, likely the memory limit)"),
}


def _encode_request(
    script: str, params: dict[str, Any], items: Sequence[SymbolBars], limits: SandboxLimits, mode: str | None = None
) -> bytes:
    request: dict[str, Any] = {
        "script": script,
        "params": params,
        "limits": asdict(limits),
        "items": [
            {
                "symbol": item.symbol,
                "dates": item.dates,
                "open": item.open.tobytes(),
                "high": item.high.tobytes(),
                "low": item.low.tobytes(),
                "close": item.close.tobytes(),
                "volume": item.volume.tobytes(),
            }
            for item in items
        ],
    }
    if mode is not None:  # a calculation's request stays exactly what it was
        request["mode"] = mode
    payload = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
    return len(payload).to_bytes(8, "big") + payload


def parse_message(line: bytes) -> dict[str, Any]:
    """One line from the child as a JSON object, or a protocol fault. The child may be compromised, so anything
    goes: malformed JSON, another type, or nesting deep enough to exhaust the parser's recursion."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        raise _ChildFault("SandboxError", "the sandbox broke the result protocol") from None
    if not isinstance(message, dict):
        raise _ChildFault("SandboxError", "the sandbox broke the result protocol")
    return message


class _Child:
    """One sandbox process and a bounded line reader over its stdout."""

    def __init__(self, limits: SandboxLimits) -> None:
        self.limits = limits
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, str(PROJECT_ROOT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={},
                cwd="/",
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            raise SandboxUnavailable(f"cannot start the sandbox process: {exc}") from exc
        self._buffer = b""

    def send(self, request: bytes) -> None:
        assert self.proc.stdin is not None
        watchdog = threading.Timer(self.limits.startup_timeout_s, self.kill)
        watchdog.start()
        try:
            self.proc.stdin.write(request)
            self.proc.stdin.close()
        except (BrokenPipeError, OSError) as exc:
            self.kill()
            raise SandboxUnavailable(f"sandbox process did not take its input: {exc}") from exc
        finally:
            watchdog.cancel()

    def read_message(self, timeout_s: float, cap: int | None = None) -> dict[str, Any]:
        """The next JSON line of at most ``cap`` bytes (default: the limits' line cap), within ``timeout_s``;
        raises _ChildFault otherwise."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        cap = self.limits.max_output_line_bytes if cap is None else cap
        while b"\n" not in self._buffer:
            if len(self._buffer) > cap:
                raise _ChildFault("SandboxError", f"the sandbox wrote more than {cap} bytes for one result",
                                  "supervisor", "output_limit")  # fmt: skip
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _ChildFault("TimeoutError", f"the script exceeded the {timeout_s:g} s time limit",
                                  "supervisor", "wall_clock_timeout")  # fmt: skip
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise self._death()
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        if len(line) > cap:
            raise _ChildFault("SandboxError", f"the sandbox wrote more than {cap} bytes for one result",
                              "supervisor", "output_limit")  # fmt: skip
        return parse_message(line)

    def _death(self) -> _ChildFault:
        """Why the child's output ended (it died, or closed its output and hangs)."""
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            return _ChildFault("SandboxError", "the sandbox process stopped answering")
        if code < 0:
            name = signal.Signals(-code).name
            layer, reason, hint = _DEATHS.get(name, ("process", "crashed", ""))
            return _ChildFault("SandboxError", f"the sandbox process was terminated by {name}{hint}", layer, reason)
        return _ChildFault("SandboxError", f"the sandbox process exited with status {code}", "process", "crashed")

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def scrub_addresses(text: str) -> str:
    """Memory addresses (``<function f at 0x7f...>``, what ``id()`` would give) never leave the sandbox."""
    return _ADDRESS.sub("0x…", text)


def storable_text(value: object, max_chars: int) -> str:
    """Untrusted text made safe to store: bounded, no NUL, no lone surrogates (PostgreSQL refuses both)."""
    text = str(value)[:max_chars].replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


MAX_INCIDENTS_PER_SYMBOL = 10


def _checked_incidents(raw: object, max_chars: int) -> tuple[Incident, ...]:
    """The child's own report of what it refused: only known (layer, reason) pairs, bounded."""
    if not isinstance(raw, list):
        return ()
    incidents = []
    for entry in raw[:MAX_INCIDENTS_PER_SYMBOL]:
        if isinstance(entry, list) and len(entry) == 3 and is_known(entry[0], entry[1]):
            incidents.append(Incident(entry[0], entry[1], scrub_addresses(storable_text(entry[2], max_chars))))
    return tuple(incidents)


def _checked_outcome(symbol: str, index: int, message: dict[str, Any], max_chars: int) -> Outcome:
    """Re-check the child's claim: the right symbol, a finite float or None, or a well-formed error."""
    if message.get("i") != index:
        raise _ChildFault("SandboxError", "the sandbox broke the result protocol (out-of-order result)")
    incidents = _checked_incidents(message.get("incidents"), max_chars)
    if "error" in message:
        err = message["error"]
        if not isinstance(err, dict):
            raise _ChildFault("SandboxError", "the sandbox broke the result protocol (bad error)")
        line = err.get("line")
        return Outcome(
            symbol,
            None,
            {
                "type": storable_text(err.get("type", "Error"), 100),
                "message": scrub_addresses(storable_text(err.get("message", ""), max_chars)),
                "line": line if type(line) is int and line > 0 else None,
            },
            incidents,
        )
    value = message.get("value", "missing")
    if value is None:
        return Outcome(symbol, None, None, incidents)
    try:
        number = float(value) if type(value) in (int, float) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number):
        raise _ChildFault("SandboxError", "the sandbox returned a value that is not a finite number")
    return Outcome(symbol, number, None, incidents)


# Which kernel-level layers the last sandbox process of this worker process reported as active.
SANDBOX_LAYERS: dict[str, bool] = {}


def _note_layers(layers: object) -> None:
    """Record the layers; say once per process, loudly, when one could not be applied on this host."""
    if not isinstance(layers, dict):
        return
    for name, active in layers.items():
        active = active is True
        if not active and SANDBOX_LAYERS.get(name, True):
            log.warning("sandbox layer %r is not active on this host", name)
        SANDBOX_LAYERS[str(name)] = active


def probe_layers(limits: SandboxLimits) -> dict[str, bool]:
    """Start one sandbox process with nothing to run and return the layers it could apply on this host."""
    child = _Child(limits)
    try:
        child.send(_encode_request("result = None", {}, [], limits))
        try:
            ready = child.read_message(limits.startup_timeout_s)
        except _ChildFault as fault:
            raise SandboxUnavailable(f"sandbox process failed to start: {fault.message}") from None
    finally:
        child.close()
    _note_layers(ready.get("layers"))
    return dict(SANDBOX_LAYERS)


def run_script(
    script: str,
    params: dict[str, Any],
    items: Sequence[SymbolBars],
    limits: SandboxLimits,
) -> list[Outcome]:
    """Run ``script`` once per item, each with fresh globals, in sandbox processes. One outcome per item."""

    def fault_outcome(item: SymbolBars, fault: _ChildFault) -> Outcome:
        return Outcome(item.symbol, None, {"type": fault.kind, "message": fault.message, "line": None},
                       (fault.incident,))  # fmt: skip

    return _run_items(
        script, params, items, limits, None,
        lambda item, index, message: _checked_outcome(item.symbol, index, message, limits.max_error_chars),
        fault_outcome, lambda item: None,
    )  # fmt: skip


def _run_items(
    script: str,
    params: dict[str, Any],
    items: Sequence[SymbolBars],
    limits: SandboxLimits,
    mode: str | None,
    check: Callable[[SymbolBars, int, dict[str, Any]], _T],
    on_fault: Callable[[SymbolBars, _ChildFault], _T],
    line_cap: Callable[[SymbolBars], int | None],
) -> list[_T]:
    """The supervision loop shared by calculations and strategies: one process for the items, a fresh one
    continuing after an item that timed out, died or broke the protocol (that item gets ``on_fault``)."""
    outcomes: list[_T] = []
    pending = list(items)
    while pending:
        child = _Child(limits)
        try:
            child.send(_encode_request(script, params, pending, limits, mode))
            try:
                ready = child.read_message(limits.startup_timeout_s)
            except _ChildFault as fault:
                raise SandboxUnavailable(f"sandbox process failed to start: {fault.message}") from None
            if ready.get("ready") is not True:
                raise SandboxUnavailable("sandbox process failed to start: no ready signal")
            _note_layers(ready.get("layers"))
            done = 0
            try:
                for index, item in enumerate(pending):
                    message = child.read_message(limits.symbol_timeout_s, line_cap(item))
                    outcomes.append(check(item, index, message))
                    done += 1
            except _ChildFault as fault:
                victim = pending[done]
                log.warning("sandbox fault on %s: %s", victim.symbol, fault.message)
                outcomes.append(on_fault(victim, fault))
                done += 1
            pending = pending[done:]
        finally:
            child.close()
    return outcomes


# --- strategy scripts -------------------------------------------------------------------------------------------


def signals_line_cap(n_bars: int, limits: SandboxLimits) -> int:
    """Bytes one strategy answer may take: its base64 series (a position is 8 bytes a bar, 4/3 of that in
    base64; entries and exits a bit a bar each), with room for the JSON around it, an error message and
    incidents; never below the calculation's line cap."""
    series = 4 * -(-8 * n_bars // 3)
    return max(limits.max_output_line_bytes, series + 8 * limits.max_error_chars + 16_384)


def _decode(raw: object, size: int, what: str) -> bytes:
    if type(raw) is not str or len(raw) != 4 * -(-size // 3):
        raise _ChildFault("SandboxError", f"the sandbox broke the result protocol ({what} has the wrong size)")
    try:
        data = base64.b64decode(raw.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise _ChildFault("SandboxError", f"the sandbox broke the result protocol ({what} is not base64)") from None
    if len(data) != size:
        raise _ChildFault("SandboxError", f"the sandbox broke the result protocol ({what} has the wrong size)")
    return data


def decode_bits(raw: object, n: int, what: str) -> NDArray[np.bool_]:
    """Packed bits (least significant first) back to ``n`` booleans; the padding bits must be zero."""
    data = np.frombuffer(_decode(raw, (n + 7) // 8, what), dtype=np.uint8)
    bits = np.unpackbits(data, bitorder="little").astype(np.bool_)
    if bits[n:].any():
        raise _ChildFault("SandboxError", f"the sandbox broke the result protocol ({what} has padding bits set)")
    return np.ascontiguousarray(bits[:n])


def decode_positions(raw: object, n: int) -> NDArray[np.float64]:
    """``n`` little-endian float64 targets, each finite and in [-1, 1]."""
    values = np.frombuffer(_decode(raw, 8 * n, POSITION_NAME), dtype="<f8").astype(np.float64)
    if not np.all(np.isfinite(values)) or np.any(np.abs(values) > 1.0):
        raise _ChildFault("SandboxError", "the sandbox broke the result protocol (position out of [-1, 1])")
    return values


def checked_signals(raw: object, n: int) -> ScriptSignals:
    """Re-check a strategy answer from the child: exact keys and types, ``n`` values per series, finite."""
    if type(raw) is not dict:
        raise _ChildFault("SandboxError", "the sandbox broke the result protocol (bad signals)")
    keys = set(raw)
    if keys not in ({"n", "warmup", ENTRIES_NAME, EXITS_NAME}, {"n", "warmup", POSITION_NAME}):
        raise _ChildFault("SandboxError", "the sandbox broke the result protocol (bad signals)")
    count, warmup = raw["n"], raw["warmup"]
    if type(count) is not int or count != n or type(warmup) is not int or not 0 <= warmup < max(n, 1):
        raise _ChildFault("SandboxError", "the sandbox broke the result protocol (wrong number of bars)")
    if POSITION_NAME in raw:
        return ScriptSignals(n, warmup, position=decode_positions(raw[POSITION_NAME], n))
    entries = decode_bits(raw[ENTRIES_NAME], n, ENTRIES_NAME)
    return ScriptSignals(n, warmup, entries=entries, exits=decode_bits(raw[EXITS_NAME], n, EXITS_NAME))


def _checked_strategy(item: SymbolBars, index: int, message: dict[str, Any], max_chars: int) -> StrategyOutcome:
    if message.get("i") != index:
        raise _ChildFault("SandboxError", "the sandbox broke the result protocol (out-of-order result)")
    if "error" in message:
        base = _checked_outcome(item.symbol, index, message, max_chars)
        return StrategyOutcome(item.symbol, None, base.error, base.incidents)
    if "value" in message:
        raise _ChildFault("SandboxError", "the sandbox broke the result protocol (a value for a strategy)")
    incidents = _checked_incidents(message.get("incidents"), max_chars)
    return StrategyOutcome(item.symbol, checked_signals(message.get("signals"), len(item.close)), None, incidents)


def run_strategy(
    script: str,
    params: dict[str, Any],
    items: Sequence[SymbolBars],
    limits: SandboxLimits,
) -> list[StrategyOutcome]:
    """Run a strategy script once per item (fresh globals each, one sandbox process for the batch, as for
    calculations); each item's signals re-checked here, or its error. One outcome per item, in order."""

    def fault_outcome(item: SymbolBars, fault: _ChildFault) -> StrategyOutcome:
        return StrategyOutcome(item.symbol, None, {"type": fault.kind, "message": fault.message, "line": None},
                               (fault.incident,))  # fmt: skip

    return _run_items(
        script, params, items, limits, "strategy",
        lambda item, index, message: _checked_strategy(item, index, message, limits.max_error_chars),
        fault_outcome, lambda item: signals_line_cap(len(item.close), limits),
    )  # fmt: skip
