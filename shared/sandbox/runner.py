"""The process layer of the sandbox: the trusted parent side.

User code never runs in the worker process. Each shard's symbols go to a child forked from this process's sandbox
zygote (shared/sandbox/forkserver.py, shared/sandbox/zygote.py): a clean interpreter with everything imported,
which confines itself before touching user code (shared/sandbox/child.py). This side enforces the wall-clock
deadline per symbol with a kill, caps what it reads, re-checks every answer and counts what each child used. When
a symbol times out or kills its child, that symbol gets the error and a new child continues with the symbols
after it: one bad symbol never costs the others their results. When the zygote itself dies, the symbol in
progress is retried on a new zygote: that is no fault of the script's.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from shared.domain.sandbox.policy import ENTRIES_NAME, EXITS_NAME, POSITION_NAME, names_of
from shared.infra.config import SandboxLimits
from shared.infra.security import Incident, is_known
from shared.jobs.pipeline import Outcome
from shared.marketdata.bars import SymbolBars
from shared.sandbox import forkserver, wire
from shared.sandbox.child import MAX_LOCAL_CHARS, MAX_LOCALS  # the child's own bounds, checked again here
from shared.sandbox.forkserver import ExitReport, ForkedChild, ForkServer, SandboxUnavailable, ZygoteDied
from shared.sandbox.signals import ScriptSignals, StrategyOutcome

log = logging.getLogger(__name__)

_T = TypeVar("_T")
MAX_ZYGOTE_DEATHS = 3  # per run: past this the shard is retried later (SandboxUnavailable)

__all__ = ["SandboxUnavailable", "SandboxUsage", "probe_layers", "run_script", "run_strategy"]


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


@dataclass
class SandboxUsage:
    """What the sandbox children of one run used, as the zygote measured them (``wait4``): CPU quotas count it.

    A run does not wait for its children's end reports: their answers are what a shard needs first. The caller
    :meth:`settle` s the usage after it stored them."""

    cpu_s: float = 0.0
    children: int = 0
    max_rss_kb: int = 0
    peak_memory_kb: int = 0  # the most one child added to what it started with (resident)
    unreported: int = 0  # children whose end nobody could report (their zygote died with them)
    item_seconds: list[float] = field(default_factory=list)  # wall time of each answer, from the one before
    pending: list[ForkedChild] = field(default_factory=list)

    def add(self, report: ExitReport) -> None:
        self.cpu_s += report.cpu_s
        self.children += 1
        self.max_rss_kb = max(self.max_rss_kb, report.maxrss_kb)

    def settle(self, timeout_s: float = 10.0) -> SandboxUsage:
        """Collect the end reports of the run's children (each was killed or has ended: this is quick)."""
        while self.pending:
            child = self.pending.pop()
            try:
                report = child.wait(timeout_s)
            except (SandboxUnavailable, TimeoutError):
                self.unreported += 1
            else:
                self.add(report)
                self.peak_memory_kb = max(self.peak_memory_kb, report.maxrss_kb - child.baseline_kb)
        return self


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


class _Answers:
    """A bounded line reader over one child's answer pipe."""

    def __init__(self, child: ForkedChild, limits: SandboxLimits) -> None:
        self.child = child
        self.limits = limits
        self._buffer = b""

    def read_message(self, timeout_s: float, cap: int | None = None) -> dict[str, Any]:
        """The next JSON line of at most ``cap`` bytes (default: the limits' line cap), within ``timeout_s``;
        raises _ChildFault otherwise (ZygoteDied when the child's zygote went away under it)."""
        fd = self.child.answers
        deadline = time.monotonic() + timeout_s
        cap = self.limits.max_output_line_bytes if cap is None else cap
        while b"\n" not in self._buffer:
            if len(self._buffer) > cap:
                raise _ChildFault("SandboxError", f"the sandbox wrote more than {cap} bytes for one result",
                                  "supervisor", "output_limit")  # fmt: skip
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.child.kill()
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
            report = self.child.wait(5.0)
        except TimeoutError:
            return _ChildFault("SandboxError", "the sandbox process stopped answering")
        name = report.signal_name
        if name is not None:
            layer, reason, hint = _DEATHS.get(name, ("process", "crashed", ""))
            return _ChildFault("SandboxError", f"the sandbox process was terminated by {name}{hint}", layer, reason)
        return _ChildFault("SandboxError", f"the sandbox process exited with status {report.exit_code}", "process",
                           "crashed")  # fmt: skip


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


def _checked_output(message: dict[str, Any]) -> dict[str, Any] | None:
    """What the script printed, when the request captured it: bounded text (addresses scrubbed) and how many
    characters past the bound were dropped."""
    if "output" not in message:
        return None
    dropped = message.get("output_dropped")
    text = message["output"] if type(message["output"]) is str else ""
    return {"output": scrub_addresses(storable_text(text, len(text))),
            "output_dropped": dropped if type(dropped) is int and dropped > 0 else 0}  # fmt: skip


def checked_error(err: object, max_chars: int) -> dict[str, Any]:
    """A well-formed ``{type, message, line}`` from the child's claim of one (storable, addresses scrubbed)."""
    if not isinstance(err, dict):
        raise _ChildFault("SandboxError", "the sandbox broke the result protocol (bad error)")
    line = err.get("line")
    return {
        "type": storable_text(err.get("type", "Error"), 100),
        "message": scrub_addresses(storable_text(err.get("message", ""), max_chars)),
        "line": line if type(line) is int and line > 0 else None,
    }


def _checked_outcome(symbol: str, index: int, message: dict[str, Any], max_chars: int) -> Outcome:
    """Re-check the child's claim: the right symbol, a finite float or None, or a well-formed error."""
    if message.get("i") != index:
        raise _ChildFault("SandboxError", "the sandbox broke the result protocol (out-of-order result)")
    incidents = _checked_incidents(message.get("incidents"), max_chars)
    output = _checked_output(message)
    if "error" in message:
        return Outcome(symbol, None, checked_error(message["error"], max_chars), incidents, output)
    value = message.get("value", "missing")
    if value is None:
        return Outcome(symbol, None, None, incidents, output)
    try:
        number = float(value) if type(value) in (int, float) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number):
        raise _ChildFault("SandboxError", "the sandbox returned a value that is not a finite number")
    return Outcome(symbol, number, None, incidents, output)


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


def probe_layers(limits: SandboxLimits, server: ForkServer | None = None) -> dict[str, bool]:
    """Fork one sandbox child with nothing to run and return the layers it could apply on this host. Without
    ``server``, a zygote of its own, closed after."""
    own = server is None
    zygote = ForkServer(startup_timeout_s=limits.startup_timeout_s) if server is None else server
    try:
        _run_items("result = None", {}, [], limits, _Protocol(None, lambda *a: None, lambda *a: None, lambda i: None),
                   server=zygote)  # fmt: skip
    finally:
        if own:
            zygote.close()
    return dict(SANDBOX_LAYERS)


def run_script(
    script: str,
    params: dict[str, Any],
    items: Sequence[SymbolBars],
    limits: SandboxLimits,
    *,
    capture_output: bool = False,
    usage: SandboxUsage | None = None,
    server: ForkServer | None = None,
) -> list[Outcome]:
    """Run ``script`` once per item, each with fresh globals, in sandbox children. One outcome per item; with
    ``capture_output``, each outcome's ``data`` holds what the script printed. ``usage`` gets what the children
    used; ``server`` is the zygote to fork from (default: this process's)."""

    def fault_outcome(item: SymbolBars, fault: _ChildFault) -> Outcome:
        return Outcome(item.symbol, None, {"type": fault.kind, "message": fault.message, "line": None},
                       (fault.incident,))  # fmt: skip

    protocol = _Protocol(
        None,
        lambda item, index, message: _checked_outcome(item.symbol, index, message, limits.max_error_chars),
        fault_outcome,
        lambda item: _output_line_cap(limits) if capture_output else None,
    )
    return _run_items(script, params, items, limits, protocol, capture_output=capture_output, usage=usage,
                      server=server)  # fmt: skip


def _output_line_cap(limits: SandboxLimits) -> int:
    """An answer with its print output: the output at its worst as JSON (``\\uXXXX`` is 6 bytes a character)."""
    return limits.max_output_line_bytes + 6 * limits.max_output_chars


@dataclass(frozen=True)
class _Protocol:
    """How one kind of run reads its children's answers."""

    mode: str | None
    check: Callable[[Any, int, dict[str, Any]], Any]  # (item, index, message) -> its outcome
    on_fault: Callable[[Any, _ChildFault], Any]  # the outcome of the item a fault ended
    line_cap: Callable[[Any], int | None]  # bytes its answer may take (None: the limits' default)


def _request_header(script: str, params: dict[str, Any], limits: SandboxLimits, mode: str | None,
                    capture_output: bool) -> dict[str, Any]:  # fmt: skip
    return {"script": script, "params": params, "limits": asdict(limits), "mode": mode,
            "capture_output": capture_output, "output_chars": limits.max_output_chars}  # fmt: skip


def _run_items(
    script: str,
    params: dict[str, Any],
    items: Sequence[Any],
    limits: SandboxLimits,
    protocol: _Protocol,
    *,
    capture_output: bool = False,
    usage: SandboxUsage | None = None,
    server: ForkServer | None = None,
) -> list[Any]:
    """The supervision loop of every kind of run: one child for the items, a fresh one continuing after an item
    that timed out, died or broke the protocol (that item gets ``on_fault``), or retrying the item after its
    zygote died. An ``execute`` run has one item and no bars."""
    zygote = server or forkserver.for_this_process(limits.zygote_forks)
    header = _request_header(script, params, limits, protocol.mode, capture_output)
    series = wire.series_needed(names_of(script), protocol.mode)
    outcomes: list[Any] = []
    pending = list(items)
    bars = [] if protocol.mode == "execute" else pending
    deaths = 0
    first = True
    while pending or first:
        request = wire.write_request(header, bars, series)
        try:
            child = zygote.spawn(request)
        except ZygoteDied as died:  # it went away between two shards: start another and go on
            deaths += 1
            if deaths > MAX_ZYGOTE_DEATHS:
                raise SandboxUnavailable(f"the sandbox zygote died {deaths} times in one run") from died
            continue
        finally:
            os.close(request)
        first = False
        answers = _Answers(child, limits)
        done = 0
        try:
            try:
                ready = answers.read_message(limits.startup_timeout_s)
            except _ChildFault as fault:
                raise SandboxUnavailable(f"sandbox process failed to start: {fault.message}") from None
            if ready.get("ready") is not True:
                raise SandboxUnavailable("sandbox process failed to start: no ready signal")
            _note_layers(ready.get("layers"))
            try:
                since = time.monotonic()
                for index, item in enumerate(pending):
                    message = answers.read_message(limits.symbol_timeout_s, protocol.line_cap(item))
                    outcomes.append(protocol.check(item, index, message))
                    now = time.monotonic()
                    if usage is not None:
                        usage.item_seconds.append(now - since)
                    since = now
                    done += 1
            except _ChildFault as fault:
                victim = pending[done]
                log.warning("sandbox fault on %s: %s", getattr(victim, "symbol", "a snippet"), fault.message)
                outcomes.append(protocol.on_fault(victim, fault))
                done += 1
        except ZygoteDied as died:
            deaths += 1
            log.warning("sandbox zygote died under a run (%s); retrying its item on a new zygote", died)
            if deaths > MAX_ZYGOTE_DEATHS:
                raise SandboxUnavailable(f"the sandbox zygote died {deaths} times in one run") from died
        finally:
            child.release()
            if usage is not None:
                usage.pending.append(child)
            else:
                zygote.forget(child)
        pending = pending[done:]
        bars = [] if protocol.mode == "execute" else pending
    return outcomes


# --- snippets (interactive execute) ------------------------------------------------------------------------------

SNIPPET = "-"  # the one item of an execute run: no symbol, no bars
_SAFE_INT = 2**53


def _checked_local(value: object) -> object:
    if value is None or type(value) is bool:
        return value
    if type(value) is int and -_SAFE_INT <= value <= _SAFE_INT:
        return value
    if type(value) is float and math.isfinite(value):
        return value
    if type(value) is str:
        return scrub_addresses(storable_text(value, MAX_LOCAL_CHARS))
    if type(value) is dict and set(value) == {"repr"} and type(value["repr"]) is str:
        return {"repr": scrub_addresses(storable_text(value["repr"], MAX_LOCAL_CHARS))}
    raise _ChildFault("SandboxError", "the sandbox broke the result protocol (bad locals)")


def checked_locals(raw: object) -> dict[str, object]:
    """An executed snippet's top-level names, re-checked: identifiers, each a JSON scalar or ``{"repr": text}``
    (bounded, addresses scrubbed), at most MAX_LOCALS of them."""
    if type(raw) is not dict:
        raise _ChildFault("SandboxError", "the sandbox broke the result protocol (bad locals)")
    checked: dict[str, object] = {}
    for name, value in list(raw.items())[:MAX_LOCALS]:
        if type(name) is not str or not name.isidentifier():
            raise _ChildFault("SandboxError", "the sandbox broke the result protocol (bad locals)")
        checked[name] = _checked_local(value)
    return checked


def run_snippet(
    script: str,
    params: dict[str, Any],
    limits: SandboxLimits,
    *,
    usage: SandboxUsage | None = None,
    server: ForkServer | None = None,
) -> Outcome:
    """Run a snippet once, with no bars (an interactive execute), in a sandbox child. Its outcome's ``data`` holds
    what it printed and, when it ran to the end, its top-level names (``locals``)."""

    def check(item: str, index: int, message: dict[str, Any]) -> Outcome:
        outcome = _checked_outcome(item, index, message, limits.max_error_chars)
        data = dict(outcome.data or {})
        if outcome.error is None:
            data["locals"] = checked_locals(message.get("locals"))
        return Outcome(item, None, outcome.error, outcome.incidents, data)

    def fault_outcome(item: str, fault: _ChildFault) -> Outcome:
        return Outcome(item, None, {"type": fault.kind, "message": fault.message, "line": None}, (fault.incident,))

    cap = _output_line_cap(limits) + 6 * MAX_LOCALS * (MAX_LOCAL_CHARS + 100)
    protocol = _Protocol("execute", check, fault_outcome, lambda item: cap)
    return _run_items(script, params, [SNIPPET], limits, protocol, capture_output=True, usage=usage,
                      server=server)[0]  # fmt: skip


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
    *,
    usage: SandboxUsage | None = None,
    server: ForkServer | None = None,
) -> list[StrategyOutcome]:
    """Run a strategy script once per item (fresh globals each, one sandbox child for the batch, as for
    calculations); each item's signals re-checked here, or its error. One outcome per item, in order."""

    def fault_outcome(item: SymbolBars, fault: _ChildFault) -> StrategyOutcome:
        return StrategyOutcome(item.symbol, None, {"type": fault.kind, "message": fault.message, "line": None},
                               (fault.incident,))  # fmt: skip

    protocol = _Protocol(
        "strategy",
        lambda item, index, message: _checked_strategy(item, index, message, limits.max_error_chars),
        fault_outcome,
        lambda item: signals_line_cap(len(item.close), limits),
    )
    return _run_items(script, params, items, limits, protocol, usage=usage, server=server)
