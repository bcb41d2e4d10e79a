"""The process layer: a real sandbox child forked from a real zygote per batch, limits, kills and result checks."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from array import array
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest

from shared.infra.config import SandboxLimits
from shared.jobs.pipeline import Outcome
from shared.marketdata.bars import SymbolBars
from shared.sandbox.child import NOBODY
from shared.sandbox.runner import SANDBOX_LAYERS, _checked_outcome, _ChildFault, parse_message, run_script

LIMITS = SandboxLimits(symbol_timeout_s=2.0, memory_mb=256)


def bars(symbol: str, n: int = 50) -> SymbolBars:
    closes = array("d", [100.0 + i for i in range(n)])
    days = np.datetime64("2024-01-01") + np.arange(n)
    return SymbolBars.from_dates(symbol, days, closes, closes, closes, closes, [1000.0] * n)


def run(script: str, symbols: list[str], params: dict[str, object] | None = None) -> dict[str, Outcome]:
    return {o.symbol: o for o in run_script(script, params or {}, [bars(s) for s in symbols], LIMITS)}


def test_inputs_are_read_only_float_series_and_params_arrive() -> None:
    script = (
        "ok = isinstance(close[0], float) and isinstance(volume[0], float) and close.index(101.0) == 1\n"
        "ok = ok and list(close[:2]) == [100.0, 101.0] and sum(close * 2) == 2 * sum(close) and 149.0 in close\n"
        "ok = ok and isinstance(dates, tuple) and dates[0] == '2024-01-01'\n"
        "result = (close[-1] + params['k']) if ok and len(dates) == len(open) and symbol == 'AA' else None"
    )
    assert run(script, ["AA"], {"k": 0.5})["AA"] == Outcome("AA", 149.5, None)


def test_input_series_cannot_be_changed() -> None:
    for attempt, error in (
        ("close[0] = 1.0", "TypeError"),
        ("del close[0]", "TypeError"),
        ("close.append(1.0)", "AttributeError"),
        ("x = close.buffer_info()", "AttributeError"),
        ("close += close\nresult = len(close)", None),
    ):
        outcome = run(f"{attempt}\nresult = len(open)" if error else attempt, ["A"])["A"]
        assert (outcome.error or {}).get("type") == error, attempt
    # ``+=`` rebinds the name to a new array, as for a tuple: the next symbol's bars are as they were
    outcomes = run("close += close\nresult = len(close) + len(open)", ["A", "B"])
    assert [o.value for o in outcomes.values()] == [150.0, 150.0]


def test_print_output_is_captured_bounded_and_scrubbed() -> None:
    limits = replace(LIMITS, max_output_chars=50)
    script = "print('bars', len(close), symbol)\nprint(repr(lambda: 0))\nprint('x' * 100)\nresult = 1"
    outcome = run_script(script, {}, [bars("A")], limits, capture_output=True)[0]
    assert outcome.data is not None and outcome.data["output"].startswith("bars 50 A\n<function <lambda> at 0x…")
    assert outcome.data["output_dropped"] > 0 and len(outcome.data["output"]) <= 50
    assert run_script(script, {}, [bars("A")], limits)[0].data is None  # not asked: not kept


def test_each_symbol_gets_fresh_globals_and_a_fresh_params_copy() -> None:
    script = (
        "try:\n    seen = leaked\nexcept NameError:\n    seen = 0\n"
        "leaked = 1\nparams['hits'].append(symbol)\nresult = seen + len(params['hits'])"
    )
    outcomes = run(script, ["A", "B", "C"], {"hits": []})
    assert [o.value for o in outcomes.values()] == [1.0, 1.0, 1.0]


def test_errors_carry_type_message_and_script_line() -> None:
    outcome = run("x = 1\ny = {}\nresult = y['missing']", ["A"])["A"]
    assert outcome.error == {"type": "KeyError", "message": "'missing'", "line": 3}
    outcome = run("x = 1", ["A"])["A"]
    assert outcome.error is not None and outcome.error["type"] == "ResultError"


def test_error_text_is_made_storable() -> None:
    outcome = run("raise ValueError('nul\\x00 and lone \\ud800 surrogate')", ["A"])["A"]
    assert outcome.error is not None
    assert outcome.error["message"] == "nul\\x00 and lone \\ud800 surrogate"
    outcome.error["message"].encode("utf-8")


def test_timeout_kills_only_that_symbol() -> None:
    started = time.monotonic()
    outcomes = run("if symbol == 'B':\n    while True:\n        pass\nresult = 1", ["A", "B", "C"])
    assert outcomes["A"].value == 1.0 and outcomes["C"].value == 1.0
    assert outcomes["B"].error is not None and outcomes["B"].error["type"] == "TimeoutError"
    assert time.monotonic() - started < LIMITS.symbol_timeout_s + 5


def test_swallowing_exceptions_cannot_dodge_the_wall_clock() -> None:
    script = "while True:\n    try:\n        x = [0] * 10\n    except Exception:\n        pass"
    assert run(script, ["A"])["A"].error["type"] == "TimeoutError"  # type: ignore[index]


def test_memory_bomb_is_a_per_symbol_error() -> None:
    outcomes = run("if symbol == 'A':\n    x = 'a' * (10 ** 10)\nresult = 2", ["A", "B"])
    assert outcomes["A"].error is not None and outcomes["A"].error["type"] in {"MemoryError", "OverflowError"}
    assert outcomes["B"].value == 2.0


def test_results_are_checked() -> None:
    outcomes = run(
        "v = {'A': float('inf'), 'B': True, 'C': 'x', 'D': [1], 'E': 10 ** 400, 'F': None, 'G': 3}\nresult = v[symbol]",
        list("ABCDEFG"),
    )
    assert {s: (o.error or {}).get("type") for s, o in outcomes.items()} == {
        "A": "ValueError", "B": "TypeError", "C": "TypeError", "D": "TypeError", "E": "OverflowError",
        "F": None, "G": None,
    }  # fmt: skip
    assert outcomes["G"].value == 3.0 and outcomes["F"].value is None


def test_parent_rechecks_what_the_child_claims() -> None:
    assert _checked_outcome("A", 0, {"i": 0, "value": 1.5}, 100) == Outcome("A", 1.5, None)
    for bad in ({"i": 1, "value": 1.0}, {"i": 0, "value": "1"}, {"i": 0, "value": float("nan")},
                {"i": 0, "value": True}, {"i": 0, "value": 10**400}, {"i": 0, "error": "x"}):  # fmt: skip
        with pytest.raises(_ChildFault):
            _checked_outcome("A", 0, bad, 100)
    long = _checked_outcome("A", 0, {"i": 0, "error": {"type": "E", "message": "m" * 500, "line": -3}}, 100)
    assert long.error == {"type": "E", "message": "m" * 100, "line": None}


@pytest.mark.parametrize(
    "line", [b"", b"not json", b"[1, 2]", b'"text"', b"[" * 200_000 + b"]" * 200_000, b'{"i": 0' + b"\xff"]
)
def test_a_line_from_a_compromised_child_is_a_protocol_fault(line: bytes) -> None:
    """Whatever an escaped script makes its process write (even nesting that exhausts the JSON parser's
    recursion), the supervisor sees a protocol fault for that symbol, never an exception of its own."""
    with pytest.raises(_ChildFault, match="broke the result protocol"):
        parse_message(line)


def proc_limits(pid: int) -> dict[str, tuple[str, str]]:
    """Soft and hard limits from /proc (readable after the child changed its uid, unlike prlimit)."""
    limits: dict[str, tuple[str, str]] = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        limits[name] = (soft, hard)
    return limits


def sandbox_children() -> list[psutil.Process]:
    """The sandbox children of this process's zygotes (a fork keeps the zygote's command line)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "shared.sandbox.zygote" in " ".join(process.cmdline()) and process.ppid() != os.getpid():
                found.append(process)
    return found


def test_child_has_empty_environment_cwd_root_and_limits() -> None:
    seen: dict[str, object] = {}

    def inspect() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "uids" not in seen:
            for child in sandbox_children():
                with contextlib.suppress(psutil.Error):
                    if "env" not in seen:  # readable until the child drops its privileges
                        seen.update(env=child.environ(), cwd=child.cwd())
                with contextlib.suppress(psutil.Error, OSError):
                    limits = proc_limits(child.pid)
                    if limits["Max address space"] == ("unlimited", "unlimited"):
                        continue  # still reading its input: limits come before user code
                    uids = tuple(child.uids())
                    if os.geteuid() == 0 and 0 in uids:
                        continue  # privileges are dropped right after the limits: look again
                    seen.update(limits=limits, uids=uids)
            time.sleep(0.01)

    watcher = threading.Thread(target=inspect)
    watcher.start()
    run("s = 0\nfor i in range(8000000):\n    s += i\nresult = 1", ["A"])
    watcher.join()
    assert seen["env"] == {}
    assert seen["cwd"] == "/"
    limits = seen["limits"]
    assert isinstance(limits, dict)
    soft, hard = limits["Max address space"]  # the memory granted, on top of what the zygote had mapped
    assert soft == hard and LIMITS.memory_mb * 2**20 < int(soft) < (LIMITS.memory_mb + 1024) * 2**20
    assert limits["Max file size"] == ("0", "0") and limits["Max core file size"] == ("0", "0")
    assert limits["Max processes"] == ("0", "0") and limits["Max open files"] == ("8", "8")
    if os.geteuid() == 0:  # user code never runs as root, and has no network at all
        assert seen["uids"] == (NOBODY, NOBODY, NOBODY)
        assert SANDBOX_LAYERS == {
            "network_namespace": True,
            "no_new_privs": True,
            "unprivileged_uid": True,
            "seccomp": True,
        }


@pytest.mark.parametrize(
    ("sig", "layer", "reason"),
    [
        (signal.SIGSYS, "seccomp", "seccomp_kill"),  # what the kernel sends for a forbidden system call
        (signal.SIGXCPU, "process", "cpu_limit"),  # RLIMIT_CPU
        (signal.SIGKILL, "process", "killed"),  # the OOM killer, say
    ],
)
def test_a_kernel_kill_is_named_and_costs_only_that_symbol(sig: signal.Signals, layer: str, reason: str) -> None:
    def kill_the_sandbox() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for child in sandbox_children():
                with contextlib.suppress(psutil.Error):
                    if child.cpu_times().user > 0.3:
                        os.kill(child.pid, sig)  # root may signal it after the uid drop
                        return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_sandbox)
    killer.start()
    # A deadline far beyond the killer's: on a busy machine the child may need seconds of wall clock to reach its
    # 0.3 s of CPU, and the kernel's kill, not the supervisor's timeout, is what this test is about.
    patient = replace(LIMITS, symbol_timeout_s=60.0)
    script = "if symbol == 'A':\n    while True:\n        pass\nresult = close[-1]"
    outcomes = {o.symbol: o for o in run_script(script, {}, [bars("A"), bars("B")], patient)}
    killer.join()
    assert outcomes["A"].error is not None and sig.name in outcomes["A"].error["message"]
    assert [(i.layer, i.reason) for i in outcomes["A"].incidents] == [(layer, reason)]
    assert outcomes["B"] == Outcome("B", 149.0, None)
