"""What the sandbox costs, and what the indicator library saves, measured side by side in one run.

    .venv/bin/python -m benchmarks.sandbox_overhead [--symbols 200] [--bars 2520] [--rounds 5]

No database or broker: synthetic bars in memory, so only the sandbox is measured. Three figures:

1. per-symbol cost of the same script sandboxed (``run_script``: fresh ``python -I`` process per shard of 50,
   rlimits, namespaces, seccomp, RestrictedPython guards, JSON results re-checked) vs plain Python
   (``exec`` of the unrestricted code in this process): the ratio is the sandbox's price;
2. ``ta.sma`` vs the same SMA written as a loop in the script (a rolling sum: the fastest loop there is),
   both computing the full 2,520-value series under the restricted policy in one process: the library's
   gain on the computation (goal: at least 20x), and the same pair end to end through sandbox processes;
3. the sandbox process's start-up (spawn, limits, layers, handshake), alone and amortized over a shard.

Medians of ``--rounds``; machines here are shared and noisy, so compare the ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np

from shared.domain.sandbox import ta
from shared.domain.sandbox.policy import compile_script, indicator_facade, script_globals
from shared.infra.config import SandboxLimits
from shared.marketdata.bars import SymbolBars
from shared.sandbox.child import SERIES
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


def sandboxed(script: str, items: list[SymbolBars]) -> float:
    """Seconds to run ``script`` over ``items`` through sandbox processes, one per shard of SHARD."""
    started = time.perf_counter()
    for i in range(0, len(items), SHARD):
        outcomes = run_script(script, {}, items[i : i + SHARD], LIMITS)
        bad = [o for o in outcomes if o.error is not None]
        if bad:
            raise RuntimeError(f"benchmark script failed: {bad[0].error}")
    return time.perf_counter() - started


def _inputs(item: SymbolBars) -> dict[str, Any]:
    return {
        "open": tuple(item.open), "high": tuple(item.high), "low": tuple(item.low), "close": tuple(item.close),
        "volume": tuple(item.volume), "dates": item.dates, "symbol": item.symbol, "params": {},
    }  # fmt: skip


def plain(script: str, items: list[SymbolBars]) -> float:
    """Seconds to run ``script`` unrestricted in this process, fresh globals per symbol."""
    code = compile(script, "<plain>", "exec")
    started = time.perf_counter()
    for item in items:
        namespace = _inputs(item)
        exec(code, namespace)
        assert math.isfinite(namespace["result"])
    return time.perf_counter() - started


def restricted_in_process(script: str, items: list[SymbolBars]) -> float:
    """Seconds to run ``script`` under the restricted policy in this process (inputs built beforehand;
    fresh guarded globals per symbol, as in the sandbox): the computation without the process around it."""
    code = compile_script(script)
    inputs = [_inputs(item) for item in items]
    # The child registers each symbol's tuples with the float64 bytes it received (so `ta` skips re-checking).
    series = [
        tuple((data[name], getattr(item, name).tobytes()) for name in SERIES)
        for item, data in zip(items, inputs, strict=True)
    ]
    started = time.perf_counter()
    for data, pairs in zip(inputs, series, strict=True):
        ta._register_series(*pairs)
        namespace = script_globals(data)
        exec(code, namespace)
        assert namespace["result"] is None or math.isfinite(namespace["result"])
    return time.perf_counter() - started


def median_of(rounds: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=200)
    parser.add_argument("--bars", type=int, default=2520)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    items = synthetic_bars(args.symbols, args.bars)
    indicator_facade()  # `import ta` in this process too, for the in-process comparison
    n, rounds = len(items), args.rounds
    print(f"{n} symbols x {args.bars} bars, shards of {SHARD}, median of {rounds} rounds")

    plain_s = median_of(rounds, lambda: plain(TYPICAL_SCRIPT, items))
    sandbox_s = median_of(rounds, lambda: sandboxed(TYPICAL_SCRIPT, items))
    print("\n1. the same script, per symbol")
    print(f"   plain Python (in process)      {1e3 * plain_s / n:8.3f} ms")
    print(f"   sandboxed (end to end)         {1e3 * sandbox_s / n:8.3f} ms")
    print(f"   ratio sandboxed / plain        {sandbox_s / plain_s:8.2f}x")

    base_s = median_of(rounds, lambda: restricted_in_process(NOOP_SCRIPT, items))  # fresh globals per symbol
    loop_s = median_of(rounds, lambda: restricted_in_process(LOOP_SMA_SCRIPT, items)) - base_s
    ta_s = median_of(rounds, lambda: restricted_in_process(TA_SMA_SCRIPT, items)) - base_s
    loop_e2e = median_of(rounds, lambda: sandboxed(LOOP_SMA_SCRIPT, items))
    ta_e2e = median_of(rounds, lambda: sandboxed(TA_SMA_SCRIPT, items))
    print(f"\n2. SMA(20) over all {args.bars} bars, per symbol (fresh globals, {1e3 * base_s / n:.3f} ms, taken off)")
    print(f"   loop in the script             {1e3 * loop_s / n:8.3f} ms   (restricted, in process)")
    print(f"   ta.sma                         {1e3 * ta_s / n:8.3f} ms   (restricted, in process)")
    print(f"   ratio loop / ta.sma            {loop_s / ta_s:8.1f}x   (goal >= 20x)")
    print(f"   end to end: loop {1e3 * loop_e2e / n:.3f} ms, ta.sma {1e3 * ta_e2e / n:.3f} ms "
          f"(ratio {loop_e2e / ta_e2e:.1f}x; includes process start and numpy import)")  # fmt: skip

    start_s = median_of(rounds, lambda: sandboxed(NOOP_SCRIPT, items[:1]))
    start_ta_s = median_of(rounds, lambda: sandboxed("import ta\n" + NOOP_SCRIPT, items[:1]))
    print("\n3. sandbox process start-up (spawn, limits, namespaces, seccomp, handshake)")
    print(f"   one process                    {1e3 * start_s:8.1f} ms   ({1e3 * start_ta_s:.1f} ms with `import ta`)")
    print(f"   amortized over a shard of {SHARD}   {1e3 * start_s / SHARD:8.2f} ms per symbol "
          f"({100 * (start_s / SHARD) / (sandbox_s / n):.0f}% of the typical script's sandboxed cost)")  # fmt: skip


if __name__ == "__main__":
    main()
