"""Compile every backtest kernel into numba's on-disk cache ahead of time.

    python -m shared.domain.backtest.warmup

A process that finds the cache loads each kernel in milliseconds; one that does not compiles them (about
15 s on this project's machines) on its first backtest. Run this once per deploy, as the user the workers
run as (numba only uses a cache folder it can write: the package's ``__pycache__`` or ``NUMBA_CACHE_DIR``),
e.g. in the image build or before starting the workers. It prints how long it took.
"""

from __future__ import annotations

import time

import numpy as np

from shared.domain.backtest import BacktestConfig, Bars, run_backtest
from shared.domain.backtest.grid import all_pairs, run_dual_sma_grid
from shared.domain.backtest.strategies import REGISTRY


def warm_up() -> float:
    """Run every strategy and risk model once on synthetic bars (compiling or loading every kernel)."""
    started = time.perf_counter()
    n = 300
    rng = np.random.default_rng(0)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, n)))
    bars = Bars.from_arrays(
        open=close, high=close * 1.01, low=close * 0.99, close=close, volume=np.full(n, 1e6),
        dates=np.datetime64("2020-01-01") + np.arange(n),
    )  # fmt: skip
    risks = [{"model": "fixed_fraction"}, {"model": "volatility_target"}, {"model": "kelly_fraction"}]
    for name in REGISTRY:
        for risk in risks:
            config = BacktestConfig.model_validate({"symbols": ["WARM"], "strategy": {"name": name}, "risk": risk})
            run_backtest(bars, config)
    grid_config = BacktestConfig.model_validate({"symbols": ["WARM"], "strategy": {"name": "dual_sma"}})
    run_dual_sma_grid(bars, *all_pairs(2, 5), grid_config)
    return time.perf_counter() - started


if __name__ == "__main__":
    print(f"backtest kernels ready in {warm_up():.1f} s")
