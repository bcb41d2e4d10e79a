"""Parameter grid: our dual-SMA grid against vectorbt 1.2.0, measured side by side in one run, warm and cold.

vectorbt is a bench-only dependency (requirements-bench.txt; CI never installs it), so this runs in its own
virtualenv:

    python3.11 -m venv /tmp/af-bench && /tmp/af-bench/bin/pip install -r requirements-bench.txt
    /tmp/af-bench/bin/python -m benchmarks.grid_vs_vectorbt [--rounds 3] [--skip-cold]

Workload: every (fast, slow) with 2 <= fast < slow <= 100 (4,851 pairs) on backtesting.py's GOOG daily bars
(2,148 bars), both sides with the same conventions so that they compute the same thing: long-only (long on
the fast SMA crossing above the slow one, flat on crossing below), all cash in fractional units, fills at the
next bar's open, 0.2 % fees per fill, 10,000 initial cash.

* vectorbt: ``MA.run_combs`` + ``ma_crossed_above/below`` + ``Portfolio.from_signals`` (signals shifted one
  bar, ``price=open``), then ``total_return()``; a second line adds the summary our grid returns for every
  pair (Sharpe, max drawdown, trade count, win rate).
* ours: ``run_dual_sma_grid`` (every SMA once, then every pair through the same simulator kernel as
  ``run_backtest``) returning final equity, return, annual return and volatility, Sharpe, max drawdown,
  trade count and win rate per pair.

Agreement: the total returns of the two are compared pair by pair (the few differences come from crossings
decided on the last bits of an average: vectorbt's rolling mean is a plain running sum and its crossover
also fires after touching, ours follows backtesting.py/pandas).

Warm: median of ``--rounds`` calls in this process after one untimed call. Cold: a fresh interpreter per
side (subprocess) importing its library and running the grid once (data loading excluded): ours with numba's
on-disk cache in place (any earlier run, or ``python -m shared.domain.backtest.warmup``, writes it), ours with an
empty cache (first run after a deploy: everything compiles), and vectorbt (its JIT, no on-disk cache).
Machines here are shared and noisy: only ratios measured within one run are meaningful.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WINDOWS = (2, 100)
FEES = 0.002
CASH = 10_000.0


def goog_csv() -> Path:
    spec = importlib.util.find_spec("backtesting")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("backtesting (its GOOG test data) is not installed: pip install -r requirements-bench.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "test" / "GOOG.csv"


def load_goog() -> dict[str, np.ndarray]:
    """GOOG.csv as arrays (csv module: no pandas needed on our side)."""
    with goog_csv().open() as f:
        rows = list(csv.reader(f))
    body = rows[1:]
    columns = {name: i for i, name in enumerate(rows[0])}
    out: dict[str, np.ndarray] = {"dates": np.array([r[0][:10] for r in body], dtype="datetime64[D]")}
    for name in ("Open", "High", "Low", "Close", "Volume"):
        out[name] = np.array([float(r[columns[name]]) for r in body])
    return out


# --- ours ------------------------------------------------------------------------------------------------------


def ours_setup(data: dict[str, np.ndarray]) -> Any:
    from shared.domain.backtest import BacktestConfig, Bars
    from shared.domain.backtest.grid import all_pairs

    bars = Bars.from_arrays(
        open=data["Open"], high=data["High"], low=data["Low"], close=data["Close"], volume=data["Volume"],
        dates=data["dates"],
    )  # fmt: skip
    config = BacktestConfig.model_validate(
        {
            "symbols": ["GOOG"],
            "strategy": {"name": "dual_sma"},
            "initial_cash": CASH,
            "execution": {"fee_bps": FEES * 1e4, "fractional_units": True, "fill": "next_open"},
        }
    )
    fast, slow = all_pairs(*WINDOWS)
    return bars, fast, slow, config


def ours_run(setup: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from shared.domain.backtest.grid import run_dual_sma_grid

    bars, fast, slow, config = setup
    result = run_dual_sma_grid(bars, fast, slow, config)
    return result.fast, result.slow, result.column("Return [%]") / 100


# --- vectorbt --------------------------------------------------------------------------------------------------


def vbt_setup(data: dict[str, np.ndarray]) -> Any:
    import pandas as pd

    index = pd.DatetimeIndex(data["dates"].astype("datetime64[ns]"))
    return pd.Series(data["Close"], index=index), pd.Series(data["Open"], index=index)


def vbt_run(setup: Any, summary: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import vectorbt as vbt

    close, open_ = setup
    fast_ma, slow_ma = vbt.MA.run_combs(close, window=np.arange(WINDOWS[0], WINDOWS[1] + 1), r=2,
                                        short_names=["fast", "slow"])  # fmt: skip
    entries = fast_ma.ma_crossed_above(slow_ma).vbt.fshift(1, fill_value=False)
    exits = fast_ma.ma_crossed_below(slow_ma).vbt.fshift(1, fill_value=False)
    pf = vbt.Portfolio.from_signals(close, entries, exits, price=open_, fees=FEES, init_cash=CASH, freq="1D")
    total = pf.total_return()
    if summary:
        pf.sharpe_ratio()
        pf.max_drawdown()
        pf.trades.count()
        pf.trades.win_rate()
    fast = total.index.get_level_values(0).to_numpy(np.int64)
    slow = total.index.get_level_values(1).to_numpy(np.int64)
    return fast, slow, total.to_numpy(float)


# --- measuring -------------------------------------------------------------------------------------------------


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - started, out


def child(side: str) -> None:
    """Fresh interpreter: time the library import and the first grid (data loading excluded)."""
    data = load_goog()
    if side.startswith("ours"):
        t_import, _ = timed(__import__, "shared.domain.backtest.grid")
        setup = ours_setup(data)
        t_run, _ = timed(ours_run, setup)
    else:
        t_import, _ = timed(__import__, "vectorbt")
        setup = vbt_setup(data)
        t_run, _ = timed(vbt_run, setup)
    print(json.dumps({"import": t_import, "run": t_run}))


def cold(side: str) -> dict[str, float]:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="af-numba-empty-") as empty_cache:
        if side == "ours-empty-cache":
            env["NUMBA_CACHE_DIR"] = empty_cache
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.grid_vs_vectorbt", "--child", side],
            cwd=ROOT, env=env, check=True, capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - started
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--child", choices=["ours", "ours-empty-cache", "vectorbt"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    data = load_goog()
    ours = ours_setup(data)
    theirs = vbt_setup(data)
    n_pairs = len(ours[1])
    print(f"workload: {n_pairs:,} (fast, slow) pairs x {len(data['Close']):,} GOOG bars")

    ours_first, (o_fast, o_slow, o_ret) = timed(ours_run, ours)
    vbt_first, (v_fast, v_slow, v_ret) = timed(vbt_run, theirs)
    print(f"first call in this process: ours {ours_first:.2f} s, vectorbt {vbt_first:.2f} s (JIT)")

    order = {(int(f), int(s)): i for i, (f, s) in enumerate(zip(v_fast, v_slow, strict=True))}
    v_aligned = v_ret[[order[(int(f), int(s))] for f, s in zip(o_fast, o_slow, strict=True)]]
    rel = np.abs(o_ret - v_aligned) / np.maximum(np.abs(v_aligned), 1e-12)
    agree = int(np.sum(rel <= 1e-9))
    print(
        f"agreement: {agree:,} of {n_pairs:,} pairs have the same total return (rel. diff <= 1e-9); "
        f"median rel. diff {np.median(rel):.1e}, max {np.max(rel):.1e}"
    )

    ours_t, vbt_t, vbt_summary_t = [], [], []
    for _ in range(args.rounds):
        ours_t.append(timed(ours_run, ours)[0])
        vbt_t.append(timed(vbt_run, theirs)[0])
        vbt_summary_t.append(timed(vbt_run, theirs, summary=True)[0])
    o, v, vs = (statistics.median(x) for x in (ours_t, vbt_t, vbt_summary_t))
    print(f"warm, median of {args.rounds} rounds:")
    print(f"  ours                           {o:7.3f} s  ({n_pairs / o:,.0f} pairs/s, 8 metrics per pair)")
    print(f"  vectorbt (total return)        {v:7.3f} s  ratio {v / o:5.1f}x")
    print(f"  vectorbt (+ same summary)      {vs:7.3f} s  ratio {vs / o:5.1f}x")

    if not args.skip_cold:
        print("cold (fresh interpreter: import + first grid; data loading excluded):")
        results = {side: cold(side) for side in ("ours", "ours-empty-cache", "vectorbt")}
        labels = {
            "ours": "ours (numba cache present)",
            "ours-empty-cache": "ours (empty cache: compiles)",
            "vectorbt": "vectorbt",
        }
        for side, r in results.items():
            total = r["import"] + r["run"]
            print(
                f"  {labels[side]:30s} {total:7.2f} s  (import {r['import']:.2f} s, grid {r['run']:.2f} s, "
                f"process wall {r['wall']:.2f} s)"
            )
        ours_cold = results["ours"]["import"] + results["ours"]["run"]
        vbt_cold = results["vectorbt"]["import"] + results["vectorbt"]["run"]
        print(f"  ratio vectorbt / ours (cache present) {vbt_cold / ours_cold:5.1f}x   (goal: ours < 2 s)")


if __name__ == "__main__":
    main()
