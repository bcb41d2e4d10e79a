"""Backtest engine: pure domain code on numpy arrays (no web, queue or database imports).

``run_backtest(bars, config)`` runs one symbol; ``run_dual_sma_grid`` runs a parameter grid in one kernel. Bars are
daily or coarser (``datetime64[D]`` dates) or intraday (UTC instants); ``format_bar_dates`` writes either as text.
"""

from shared.domain.backtest.bars import TIMEFRAMES, Bars, BarsError, format_bar_dates
from shared.domain.backtest.config import BacktestConfig
from shared.domain.backtest.engine import BacktestResult, Trades, run_backtest

__all__ = [
    "TIMEFRAMES",
    "BacktestConfig",
    "BacktestResult",
    "Bars",
    "BarsError",
    "Trades",
    "format_bar_dates",
    "run_backtest",
]
