"""Backtest engine: pure domain code on numpy arrays (no web, queue or database imports).

``run_backtest(bars, config)`` runs one symbol; ``run_dual_sma_grid`` runs a parameter grid in one kernel.
"""

from shared.domain.backtest.bars import Bars, BarsError
from shared.domain.backtest.config import BacktestConfig
from shared.domain.backtest.engine import BacktestResult, Trades, run_backtest

__all__ = ["BacktestConfig", "BacktestResult", "Bars", "BarsError", "Trades", "run_backtest"]
