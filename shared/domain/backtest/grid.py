"""Parameter grids of the dual-SMA strategy in one compiled loop: every (fast, slow) pair on the same bars.

Each moving average is computed once (one row per window) and every pair runs the very same simulator
kernel as ``run_backtest``, so a grid cell equals the single run with those parameters (the tests check it);
only the summary metrics are kept per pair (no equity curves or trade lists), computed the same way as
``metrics.compute_metrics`` computes them (intraday bars too: the same calendar-day bins and periods per year).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from shared.domain._jit import kernel
from shared.domain.backtest import simulator as sim
from shared.domain.backtest.bars import Bars
from shared.domain.backtest.config import BacktestConfig, DualSmaSpec
from shared.domain.backtest.engine import entry_fractions, simulation_parameters
from shared.domain.backtest.metrics import period_bins, periods_per_year
from shared.domain.backtest.strategies import crossover_events
from shared.domain.indicators.engine import sma_matrix

# summary columns
G_EQUITY_FINAL = 0
G_RETURN = 1
G_RETURN_ANN = 2
G_VOLATILITY_ANN = 3
G_SHARPE = 4
G_MAX_DRAWDOWN = 5
G_TRADES = 6
G_WIN_RATE = 7
N_SUMMARY = 8

SUMMARY_NAMES = (
    "Equity Final [$]",
    "Return [%]",
    "Return (Ann.) [%]",
    "Volatility (Ann.) [%]",
    "Sharpe Ratio",
    "Max. Drawdown [%]",
    "# Trades",
    "Win Rate [%]",
)


@dataclass(frozen=True)
class GridResult:
    fast: NDArray[np.int64]
    slow: NDArray[np.int64]
    summary: NDArray[np.float64]  # one row per pair, columns SUMMARY_NAMES

    def column(self, name: str) -> NDArray[np.float64]:
        return self.summary[:, SUMMARY_NAMES.index(name)]


def all_pairs(lowest: int, highest: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Every (fast, slow) with lowest <= fast < slow <= highest."""
    fast, slow = np.triu_indices(highest - lowest + 1, k=1)
    return (fast + lowest).astype(np.int64), (slow + lowest).astype(np.int64)


@kernel
def _summarize(
    equity: NDArray[np.float64],
    bin_last: NDArray[np.int64],
    annual: int,
    risk_free_rate: float,
    trades: NDArray[np.float64],
    n_closed: int,
    out: NDArray[np.float64],
) -> None:
    """The grid's metrics, with the formulas of metrics.compute_metrics (daily bins given by ``bin_last``)."""
    n = len(equity)
    out[G_EQUITY_FINAL] = equity[n - 1]
    out[G_RETURN] = (equity[n - 1] - equity[0]) / equity[0] * 100
    # period returns (NaN-free) and their geometric mean
    m = 0
    returns = np.empty(len(bin_last))
    for j in range(1, len(bin_last)):
        r = equity[bin_last[j]] / equity[bin_last[j - 1]] - 1
        if not np.isnan(r):
            returns[m] = r
            m += 1
    # geometric mean of (1 + r): the product telescopes to last / first bin value, so one log instead of m
    non_positive = False
    for j in range(m):
        if returns[j] + 1 <= 0:
            non_positive = True
            break
    if non_positive:
        gmean = 0.0
    elif m == 0:
        gmean = np.nan
    else:
        gmean = np.exp(np.log(equity[bin_last[len(bin_last) - 1]] / equity[bin_last[0]]) / m) - 1
    annualized = (1 + gmean) ** annual - 1
    out[G_RETURN_ANN] = annualized * 100
    if m > 1:
        mean = 0.0
        for j in range(m):
            mean += returns[j]
        mean /= m
        acc = 0.0
        for j in range(m):
            d = returns[j] - mean
            acc += d * d
        var = acc / (m - 1)
    else:
        var = np.nan
    vol = np.sqrt((var + (1 + gmean) ** 2) ** annual - (1 + gmean) ** (2 * annual)) * 100
    out[G_VOLATILITY_ANN] = vol
    out[G_SHARPE] = (annualized * 100 - risk_free_rate * 100) / vol if vol != 0 else np.nan
    peak = equity[0]
    max_dd = 0.0
    for t in range(n):
        if equity[t] > peak:
            peak = equity[t]
        dd = 1 - equity[t] / peak
        if dd > max_dd:
            max_dd = dd
    out[G_MAX_DRAWDOWN] = -max_dd * 100
    out[G_TRADES] = n_closed
    if n_closed:
        wins = 0
        for k in range(n_closed):
            if trades[k, sim.T_PNL] > 0:
                wins += 1
        out[G_WIN_RATE] = wins / n_closed * 100
    else:
        out[G_WIN_RATE] = np.nan


@kernel
def _grid_kernel(
    open_: NDArray[np.float64],
    close: NDArray[np.float64],
    volume: NDArray[np.float64],
    averages: NDArray[np.float64],
    first_valid: NDArray[np.int64],
    fast_row: NDArray[np.int64],
    slow_row: NDArray[np.int64],
    start_offset: int,
    fractions: NDArray[np.float64],
    ip: NDArray[np.int64],
    fp: NDArray[np.float64],
    bin_last: NDArray[np.int64],
    annual: int,
    risk_free_rate: float,
    summary: NDArray[np.float64],
) -> None:
    n = len(close)
    equity = np.empty(n)
    position = np.empty(n)
    trades = np.zeros((n + 2, sim.N_TRADE_COLS))
    state = np.zeros(sim.N_STATE)
    for k in range(len(fast_row)):
        a = fast_row[k]
        b = slow_row[k]
        start = max(first_valid[a], first_valid[b]) + start_offset
        events = crossover_events(averages[a], averages[b], start)
        sim.simulate(open_, close, volume, events, fractions, ip, fp, equity, position, trades, state)
        _summarize(equity, bin_last, annual, risk_free_rate, trades, int(state[sim.S_N_CLOSED]), summary[k])


def run_dual_sma_grid(
    bars: Bars, fast: NDArray[np.int64], slow: NDArray[np.int64], config: BacktestConfig
) -> GridResult:
    """Run ``config`` (its strategy must be ``dual_sma``; its windows are replaced) for every pair.

    Each pair must satisfy 1 <= fast < slow (as the strategy's own validation requires).
    """
    if not isinstance(config.strategy, DualSmaSpec):
        raise ValueError("run_dual_sma_grid runs the dual_sma strategy")
    fast = np.asarray(fast, dtype=np.int64)
    slow = np.asarray(slow, dtype=np.int64)
    if fast.shape != slow.shape or fast.ndim != 1:
        raise ValueError("fast and slow must be 1-d arrays of the same length")
    if len(fast) and (fast.min() < 1 or (fast >= slow).any()):
        raise ValueError("every pair needs 1 <= fast < slow")
    bars = bars.between(config.start_date, config.end_date)
    windows, inverse = np.unique(np.r_[fast, slow], return_inverse=True)
    averages = sma_matrix(bars.close, windows.astype(np.int64))
    first_valid = np.isnan(averages).argmin(axis=1).astype(np.int64)
    fast_row = inverse[: len(fast)].astype(np.int64)
    slow_row = inverse[len(fast) :].astype(np.int64)
    annual, period_days = periods_per_year(bars.dates)
    bin_last = period_bins(bars.dates, period_days)
    ip, fp = simulation_parameters(config)
    fractions = entry_fractions(bars, config)
    offset = 1 if config.execution.convention == "backtesting_py" else 0
    summary = np.empty((len(fast), N_SUMMARY))
    _grid_kernel(
        bars.open, bars.close, bars.volume, averages, first_valid, fast_row, slow_row, offset, fractions,
        ip, fp, bin_last, annual, config.risk_free_rate, summary,
    )  # fmt: skip
    return GridResult(fast=fast, slow=slow, summary=summary)


__all__ = ["SUMMARY_NAMES", "GridResult", "all_pairs", "run_dual_sma_grid"]
