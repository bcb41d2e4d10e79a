"""What the sandbox costs, measured against its references in the same run.

    .venv/bin/python -m benchmarks.sandbox_overhead [--symbols 200] [--bars 2520] [--starts 200] [--jobs 40]
                                                    [--no-stack]

Four figures (medians and percentiles of this run; machines here are shared and noisy, so compare the ratios):

1. **start per shard**: a child forked from this process's zygote, from the request to its ready line (fork,
   limits, uid, no_new_privs, seccomp), p50 and p99, for a script without and with ``import ta``; beside it the
   reference, the start of a fresh ``python -I`` sandbox process as every shard paid before the zygote (the
   interpreter, the policy's imports and, for ``ta``, numpy), measured here too;
2. **ta.sma vs the same SMA as a loop**, end to end through sandbox children (shards of 50, every bar of every
   symbol, bars sent in bulk), and the same pair inside one process (the computation alone);
3. **the trivial one-symbol job** through the real stack (API, Redis, a Celery worker, PostgreSQL): submit ->
   final status seen by a poller, p50, against its floor, a Celery round trip (``celery.backend_cleanup``, a
   no-op with the Redis backend, its result awaited) plus a sandbox start; and ``/try`` round trips, p50;
4. the same script per symbol, sandboxed vs plain Python in this process.

``--no-stack`` skips (3): no servers needed.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np

from shared.domain.sandbox.policy import compile_script, indicator_facade, script_globals
from shared.domain.sandbox.series import series_from_bytes
from shared.infra.config import SandboxLimits
from shared.marketdata.bars import SymbolBars
from shared.sandbox import forkserver, runner, wire
from shared.sandbox.runner import run_script

SHARD = 50
LIMITS = SandboxLimits(symbol_timeout_s=30, memory_mb=1024)

TYPICAL_SCRIPT = """
import math
n = 20
window = close[-n:]
sma = sum(window) / n
returns = [math.log(close[i] / close[i - 1]) for i in range(len(close) - 252, len(close))]
mean = sum(returns) / len(returns)
vol = math.sqrt(sum((r - mean) ** 2 for r in returns) / (len(returns) - 1)) * math.sqrt(252)
result = (close[-1] / sma - 1) / vol
"""

LOOP_SMA_SCRIPT = """
n = 20
series = []
total = 0.0
for i in range(len(close)):
    total += close[i]
    if i >= n:
        total -= close[i - n]
    series.append(total / n if i >= n - 1 else float('nan'))
result = series[-1]
"""

TA_SMA_SCRIPT = """
import ta
series = ta.sma(close, 20)
result = series[-1]
"""

NOOP_SCRIPT = "result = None"

# The reference start: what a shard's fresh sandbox process did before its first line (shared/sandbox/child.py
# before the zygote): a new interpreter importing the policy, and for `ta` numpy and the indicator library.
_REFERENCE_BOOT = (
    "import sys, os; sys.path.insert(0, sys.argv[1]); from shared.domain.sandbox.policy import compile_script\n"
    "if sys.argv[2] == 'ta':\n"
    "    os.environ['OPENBLAS_NUM_THREADS'] = '1'; from shared.domain.sandbox.policy import indicator_facade; "
    "indicator_facade()\n"
    "os.write(1, b'ready\\n')"
)


def synthetic_bars(symbols: int, bars: int, seed: int = 11) -> list[SymbolBars]:
    rng = random.Random(seed)
    items = []
    for k in range(symbols):
        price, closes = rng.uniform(20, 400), array("d")
        for _ in range(bars):
            price *= math.exp(rng.gauss(0.0002, 0.02))
            closes.append(price)
        volume = array("d", (float(rng.randint(1_000, 1_000_000)) for _ in range(bars)))
        dates = np.datetime64("2000-01-03") + np.arange(bars)
        items.append(SymbolBars.from_dates(f"S{k:04d}", dates, closes, closes, closes, closes, volume))
    return items


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def fork_start(server: forkserver.ForkServer, script: str, item: SymbolBars) -> float:
    """Seconds from asking for a child to its ready line (the child then runs ``script`` and is collected)."""
    header = runner._request_header(script, {}, LIMITS, None, False)
    request = wire.write_request(header, [item])
    began = time.perf_counter()
    child = server.spawn(request)
    os.close(request)
    answers = runner._Answers(child, LIMITS)
    try:
        assert answers.read_message(LIMITS.startup_timeout_s).get("ready") is True
        started = time.perf_counter() - began
        assert "error" not in answers.read_message(LIMITS.symbol_timeout_s)
    finally:
        child.close()
    return started


def reference_start(with_ta: bool) -> float:
    """Seconds to start a fresh ``python -I`` sandbox process to its first line, as each shard did before."""
    root = str(runner.forkserver.PROJECT_ROOT)
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-I", "-c", _REFERENCE_BOOT, root, "ta" if with_ta else "-"],
                            stdout=subprocess.PIPE, env={}, cwd="/")  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    seconds = time.perf_counter() - began
    proc.wait()
    return seconds


def sandboxed(script: str, items: list[SymbolBars]) -> float:
    """Seconds to run ``script`` over ``items`` through sandbox children, one per shard of SHARD."""
    started = time.perf_counter()
    for i in range(0, len(items), SHARD):
        outcomes = run_script(script, {}, items[i : i + SHARD], LIMITS)
        bad = [o for o in outcomes if o.error is not None]
        if bad:
            raise RuntimeError(f"benchmark script failed: {bad[0].error}")
    return time.perf_counter() - started


def _inputs(item: SymbolBars) -> dict[str, Any]:
    series = {name: series_from_bytes(getattr(item, name)) for name in wire.SERIES}
    return {**series, "dates": item.dates, "symbol": item.symbol, "params": {}}


def plain(script: str, items: list[SymbolBars]) -> float:
    """Seconds to run ``script`` unrestricted in this process, fresh globals per symbol."""
    code = compile(script, "<plain>", "exec")
    inputs = [_inputs(item) for item in items]
    started = time.perf_counter()
    for data in inputs:
        namespace = dict(data)
        exec(code, namespace)
        assert math.isfinite(namespace["result"])
    return time.perf_counter() - started


def restricted_in_process(script: str, items: list[SymbolBars]) -> float:
    """Seconds to run ``script`` under the restricted policy in this process (inputs built beforehand; fresh
    guarded globals per symbol, as in the sandbox): the computation without the process around it."""
    code = compile_script(script)
    inputs = [_inputs(item) for item in items]
    started = time.perf_counter()
    for data in inputs:
        namespace = script_globals(data)
        exec(code, namespace)
        assert namespace["result"] is None or math.isfinite(namespace["result"])
    return time.perf_counter() - started


def median_of(rounds: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(rounds))


def starts(args: argparse.Namespace, items: list[SymbolBars]) -> float:
    server = forkserver.ForkServer()
    server.ready()
    try:
        print(f"\n1. sandbox start per shard ({args.starts} starts each; reference: {args.references} each)")
        p50 = 0.0
        for label, script, with_ta in (("without ta", NOOP_SCRIPT, False), ("with import ta", TA_SMA_SCRIPT, True)):
            fork_start(server, script, items[0])  # warm
            forked = [fork_start(server, script, items[0]) for _ in range(args.starts)]
            spawned = [reference_start(with_ta) for _ in range(args.references)]
            p50 = p50 or percentile(forked, 50)
            print(
                f"   {label:15s} forked p50 {1e3 * percentile(forked, 50):6.2f} ms  p99 "
                f"{1e3 * percentile(forked, 99):6.2f} ms   (goal <= 3 ms)   fresh process p50 "
                f"{1e3 * percentile(spawned, 50):6.1f} ms: {percentile(spawned, 50) / percentile(forked, 50):5.1f}x"
            )
    finally:
        server.close()
    return p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=200)
    parser.add_argument("--bars", type=int, default=2520)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--starts", type=int, default=200)
    parser.add_argument("--references", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--no-stack", action="store_true")
    args = parser.parse_args()
    items = synthetic_bars(args.symbols, args.bars)
    indicator_facade()  # `import ta` in this process too, for the in-process comparison
    n, rounds = len(items), args.rounds
    print(f"{n} symbols x {args.bars} bars, shards of {SHARD}, median of {rounds} rounds")
    start_p50 = starts(args, items)

    base_s = median_of(rounds, lambda: restricted_in_process(NOOP_SCRIPT, items))  # fresh globals per symbol
    loop_s = median_of(rounds, lambda: restricted_in_process(LOOP_SMA_SCRIPT, items)) - base_s
    ta_s = median_of(rounds, lambda: restricted_in_process(TA_SMA_SCRIPT, items)) - base_s
    loop_e2e = median_of(rounds, lambda: sandboxed(LOOP_SMA_SCRIPT, items))
    ta_e2e = median_of(rounds, lambda: sandboxed(TA_SMA_SCRIPT, items))
    print(f"\n2. SMA(20) over all {args.bars} bars, per symbol")
    print(f"   end to end through sandbox children: loop {1e3 * loop_e2e / n:.3f} ms, ta.sma {1e3 * ta_e2e / n:.3f} ms"
          f"   ratio {loop_e2e / ta_e2e:.1f}x   (goal >= 20x)")  # fmt: skip
    print(f"   in one process (restricted, fresh globals {1e3 * base_s / n:.3f} ms taken off): loop "
          f"{1e3 * loop_s / n:.3f} ms, ta.sma {1e3 * ta_s / n:.3f} ms   ratio {loop_s / ta_s:.1f}x")  # fmt: skip

    if not args.no_stack:
        from benchmarks.sandbox_stack import trivial_jobs

        trivial_jobs(args.jobs, start_p50)

    plain_s = median_of(rounds, lambda: plain(TYPICAL_SCRIPT, items))
    sandbox_s = median_of(rounds, lambda: sandboxed(TYPICAL_SCRIPT, items))
    print("\n4. a typical script, per symbol")
    print(f"   plain Python (in process)      {1e3 * plain_s / n:8.3f} ms")
    print(f"   sandboxed (end to end)         {1e3 * sandbox_s / n:8.3f} ms   ratio {sandbox_s / plain_s:.2f}x")


if __name__ == "__main__":
    main()
