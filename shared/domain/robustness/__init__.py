"""Statistical validation of a backtest run: pure functions on bars and config (no queue, no database).

A run is validated as one portfolio of equal-cash sleeves (``portfolio_curve``: each symbol given the config's
``initial_cash``, never rebalanced); a one-symbol run is that symbol. :func:`sleeves` runs the baseline backtest
of each symbol exactly as a run's shard does and keeps those that ran.

Randomness is split into *tasks*: each method's ``n`` draws are cut into chunks of ``chunk`` draws (the bootstrap's
own ``bootstrap.chunk``: its draws are cheap), and task ``k``
draws from ``default_rng(SeedSequence([seed, method, k]))`` (the permutation test: one stream per symbol,
``SeedSequence([seed, method, k, position of the symbol in the config])``). A task's numbers therefore depend only
on the run's seed, the method, the task index (and the symbol's position), never on which worker ran it or how
many workers there were: one process, two, or a Celery cluster give the same numbers bit for bit. The seed is the
config's ``seed`` (``BacktestConfig.seed``, default 0).

Methods:

* ``permutation``: each symbol's bar-to-bar returns (open, high, low and close together, so each bar keeps its
  shape) are shuffled, prices rebuilt from the first bar, the strategy re-run on every symbol and the portfolio's
  Sharpe computed; the p-value is ``(1 + #{permuted Sharpe >= observed}) / (1 + n)`` (Phipson & Smyth: never 0).
* ``bootstrap``: circular block bootstrap of the portfolio's daily returns (blocks of ``block`` days keep
  short-range dependence); percentile intervals of Sharpe, total return and maximum drawdown.
* ``monte_carlo``: each draw re-runs every symbol with fees and slippage shocked upward by the absolute value of
  a normal draw (``fee_bps_sigma``, ``slippage_bps_sigma``; one shock per draw for the whole portfolio); the
  distribution of the portfolio's final equity.
* ``walk_forward`` (dual SMA), per symbol: rolling or anchored windows; on each in-sample window the (fast, slow)
  pair with the best Sharpe is chosen from the grid, then run on the following out-of-sample window.
  Deterministic; its tasks are chunks of ``walk_forward.chunk`` symbols. The portfolio figure is the stitched
  out-of-sample return of equal-cash sleeves (the mean of the symbols' compounded out-of-sample returns).

Modules: ``specs`` (the spec, the tasks and their random streams), ``portfolio`` (the run as equal-cash sleeves,
their curve, returns and Sharpe), ``methods`` (permutation, bootstrap, Monte Carlo), ``walk_forward`` and ``tasks``
(a task's draws and part, the combined result). Everything is imported from this package.
"""

from shared.domain.robustness.methods import (
    _path_stats,
    bootstrap_draws,
    bootstrap_result,
    bootstrap_task,
    cost_shock_draws,
    cost_shock_result,
    daily_returns,
    permutation_draws,
    permutation_result,
    permuted_bars,
    shocked_config,
)
from shared.domain.robustness.portfolio import (
    SCRIPT_BATCH_BACKTESTS,
    Backtester,
    Curves,
    Sleeves,
    as_days,
    portfolio_curve,
    portfolio_returns,
    portfolio_sharpe,
    sleeves,
)
from shared.domain.robustness.specs import (
    METHOD_CODES,
    METHODS,
    SELECTION_COLUMNS,
    BootstrapSpec,
    Method,
    MonteCarloSpec,
    PermutationSpec,
    SelectionMetric,
    Task,
    ValidationSpec,
    WalkForwardSpec,
    plan,
    sleeve_rng,
    task_plan,
    task_positions,
    task_rng,
)
from shared.domain.robustness.tasks import Part, baseline, combine, make_part, run_task, task_draws, validate_in_process
from shared.domain.robustness.walk_forward import (
    Window,
    _slice,
    walk_forward,
    walk_forward_draws,
    walk_forward_result,
    windows,
)
from shared.domain.stats import TRADING_DAYS

__all__ = [
    "METHODS",
    "METHOD_CODES",
    "SCRIPT_BATCH_BACKTESTS",
    "SELECTION_COLUMNS",
    "TRADING_DAYS",
    "Backtester",
    "BootstrapSpec",
    "Curves",
    "Method",
    "MonteCarloSpec",
    "Part",
    "PermutationSpec",
    "SelectionMetric",
    "Sleeves",
    "Task",
    "ValidationSpec",
    "WalkForwardSpec",
    "Window",
    "_path_stats",
    "_slice",
    "as_days",
    "baseline",
    "bootstrap_draws",
    "bootstrap_result",
    "bootstrap_task",
    "combine",
    "cost_shock_draws",
    "cost_shock_result",
    "daily_returns",
    "make_part",
    "permutation_draws",
    "permutation_result",
    "permuted_bars",
    "plan",
    "portfolio_curve",
    "portfolio_returns",
    "portfolio_sharpe",
    "run_task",
    "shocked_config",
    "sleeve_rng",
    "sleeves",
    "task_draws",
    "task_plan",
    "task_positions",
    "task_rng",
    "validate_in_process",
    "walk_forward",
    "walk_forward_draws",
    "walk_forward_result",
    "windows",
]
