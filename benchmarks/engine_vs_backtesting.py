"""One backtest: our engine against backtesting.py 0.6.6 on its GOOG data, measured side by side in one run.

    .venv/bin/python -m benchmarks.engine_vs_backtesting [--rounds 30] [--skip-cold]

Workload: the golden test's case, SmaCross(10, 20) on backtesting.py's GOOG daily bars (2,148 bars),
commission 0.2 % on entry and exit, exclusive orders (long/short). Both sides start from data already in
memory and include setting the backtest up: theirs ``Backtest(GOOG, SmaCross, ...).run()`` (which includes its
statistics), ours validating the config and ``run_backtest(bars, config)`` (signals, simulation, every metric).
Before timing it checks that both produce the same trades and final equity.

Warm: rounds alternate ours / theirs; the median per run of each is printed with the ratio theirs / ours.
Cold: a fresh interpreter per side (subprocess) that imports its library and runs once; ours with numba's
on-disk cache in place (any earlier run, or ``python -m shared.domain.backtest.warmup``, writes it).
Rolling std: the engine's rolling standard deviation (``shared.domain.indicators.engine.rolling_std``, the O(n)
NumPy core) against the two-pass O(n * window) numba kernel it replaced (kept here as the reference) and pandas'
``rolling(w).std(ddof=0)``, on GOOG's closes and on a million-value series, with the time ratios.
backtesting.py is AGPL and only a test/benchmark dependency (requirements-dev.txt).
Machines here are shared and noisy: only the ratio measured within one run is meaningful.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pandas as pd
from backtesting import Backtest, Strategy
from backtesting.lib import crossover
from backtesting.test import GOOG, SMA

from shared.domain.backtest import BacktestConfig, Bars, run_backtest
from shared.domain.indicators import engine as indicators

ROOT = Path(__file__).resolve().parent.parent

CONFIG = {
    "symbols": ["GOOG"],
    "strategy": {"name": "dual_sma", "params": {"fast": 10, "slow": 20}},
    "execution": {"convention": "backtesting_py", "fee_bps": 20, "allow_short": True},
}


class SmaCross(Strategy):
    fast = 10
    slow = 20

    def init(self) -> None:
        self.ma1 = self.I(SMA, self.data.Close, self.fast)
        self.ma2 = self.I(SMA, self.data.Close, self.slow)

    def next(self) -> None:
        if crossover(self.ma1, self.ma2):
            self.buy()
        elif crossover(self.ma2, self.ma1):
            self.sell()


def goog_bars() -> Bars:
    return Bars.from_arrays(
        open=GOOG["Open"].to_numpy(float),
        high=GOOG["High"].to_numpy(float),
        low=GOOG["Low"].to_numpy(float),
        close=GOOG["Close"].to_numpy(float),
        volume=GOOG["Volume"].to_numpy(float),
        dates=GOOG.index.values.astype("datetime64[D]"),
    )


def run_ours(bars: Bars) -> Any:
    return run_backtest(bars, BacktestConfig.model_validate(CONFIG))


def run_theirs() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Backtest(GOOG, SmaCross, commission=0.002, exclusive_orders=True).run()


@numba.njit(cache=False, nogil=True)
def old_rolling_std(values: np.ndarray, n: int, ddof: int) -> np.ndarray:
    """The engine's rolling std before the one indicator library: two passes per window, O(n * window)."""
    size = len(values)
    out = np.full(size, np.nan)
    for i in range(n - 1, size):
        mean = 0.0
        for j in range(i - n + 1, i + 1):
            mean += values[j]
        mean /= n
        acc = 0.0
        for j in range(i - n + 1, i + 1):
            d = values[j] - mean
            acc += d * d
        out[i] = np.sqrt(acc / (n - ddof)) if n - ddof > 0 else np.nan
    return out


def _best_of(func: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        func()
        times.append(time.perf_counter() - t)
    return min(times)


def rolling_std_speed(close: np.ndarray, rounds: int) -> None:
    """The rolling std against the old kernel and pandas, measured here, now, on the same data."""
    long_series = 100 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.01, 1_000_000)))
    old_rolling_std(close[:50], 5, 0)  # compile before timing
    print("rolling std (ddof 0), best of rounds; ratio = their time / ours:")
    for label, values, window, reps in (
        ("GOOG close", close, 20, rounds),
        ("GOOG close", close, 200, rounds),
        ("1M values", long_series, 20, 3),
        ("1M values", long_series, 250, 3),
    ):
        ours = _best_of(lambda v=values, w=window: indicators.rolling_std(v, w, 0), reps)
        old = _best_of(lambda v=values, w=window: old_rolling_std(v, w, 0), reps)
        series = pd.Series(values)
        theirs = _best_of(lambda s=series, w=window: s.rolling(w).std(ddof=0), reps)
        np.testing.assert_allclose(indicators.rolling_std(values, window, 0), old_rolling_std(values, window, 0),
                                   rtol=1e-9)  # fmt: skip
        print(
            f"  {label:10s} n={len(values):>9,} window {window:4d}: ours {ours * 1e3:8.3f} ms, "
            f"old kernel {old * 1e3:8.3f} ms ({old / ours:6.1f}x), "
            f"pandas {theirs * 1e3:8.3f} ms ({theirs / ours:5.1f}x)"
        )


def cold(side: str) -> dict[str, float]:
    """Fresh interpreter: import + one run, timed inside the child and as wall time around it."""
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine_vs_backtesting", "--child", side],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    child: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return {**child, "wall": wall}


def child(side: str) -> None:
    # Imports happened at module load for both sides (both libraries are imported above): time one run here
    # and report the interpreter's import time measured by the parent's wall clock minus the run.
    started = time.perf_counter()
    if side == "ours":
        run_ours(goog_bars())
    else:
        run_theirs()
    print(json.dumps({"first_run": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--skip-rolling", action="store_true", help="skip the rolling std comparison")
    parser.add_argument("--child", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    bars = goog_bars()
    ours = run_ours(bars)
    theirs = run_theirs()
    trades = theirs["_trades"]
    assert len(ours.trades) == len(trades) == 93, (len(ours.trades), len(trades))
    assert np.array_equal(ours.trades.size, trades["Size"].to_numpy(float))
    assert np.array_equal(ours.trades.entry_bar, trades["EntryBar"].to_numpy())
    assert ours.metrics["Equity Final [$]"] == theirs["Equity Final [$]"]
    print(
        f"same result: {len(trades)} trades, Equity Final {ours.metrics['Equity Final [$]']:,.2f}, "
        f"Sharpe {ours.metrics['Sharpe Ratio']:.4f}"
    )

    ours_s: list[float] = []
    theirs_s: list[float] = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        run_ours(bars)
        ours_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        run_theirs()
        theirs_s.append(time.perf_counter() - t)
    ours_med = statistics.median(ours_s)
    theirs_med = statistics.median(theirs_s)
    print(f"warm, median of {args.rounds} rounds:")
    print(f"  ours            {ours_med * 1e3:8.2f} ms per backtest (config validation + run + all metrics)")
    print(f"  backtesting.py  {theirs_med * 1e3:8.2f} ms per backtest (Backtest(...).run())")
    print(f"  ratio           {theirs_med / ours_med:8.1f}x faster (goal: >= 20x)")

    if not args.skip_rolling:
        rolling_std_speed(bars.close, args.rounds)

    if not args.skip_cold:
        ours_cold = cold("ours")
        theirs_cold = cold("theirs")
        print("cold (fresh interpreter: imports both libraries, then one run; numba cache present):")
        for name, c in (("ours", ours_cold), ("backtesting.py", theirs_cold)):
            print(f"  {name:15s} first run {c['first_run'] * 1e3:8.1f} ms, process wall {c['wall']:.2f} s")
        print(f"  ratio (first run) {theirs_cold['first_run'] / ours_cold['first_run']:6.1f}x")


if __name__ == "__main__":
    main()
