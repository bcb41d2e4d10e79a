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
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.domain.backtest import BacktestConfig, BacktestResult, Bars, BarsError, run_backtest
from shared.domain.backtest.grid import run_dual_sma_grid

Method = Literal["permutation", "bootstrap", "monte_carlo", "walk_forward"]
METHODS: tuple[Method, ...] = ("permutation", "monte_carlo", "bootstrap", "walk_forward")
METHOD_CODES = {"permutation": 1, "bootstrap": 2, "monte_carlo": 3}
TRADING_DAYS = 252


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PermutationSpec(_Spec):
    n: int = Field(default=200, ge=10, le=10_000, description="number of permutations")


class BootstrapSpec(_Spec):
    n: int = Field(default=1000, ge=10, le=100_000, description="number of bootstrap samples")
    block: int = Field(default=20, ge=1, le=1000, description="block length in bars")
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    chunk: int = Field(
        default=1000, ge=1, le=100_000, description="draws per task (a draw resamples returns: no backtest)"
    )


class MonteCarloSpec(_Spec):
    n: int = Field(default=200, ge=10, le=10_000, description="number of cost scenarios")
    fee_bps_sigma: float = Field(default=5.0, ge=0, le=500)
    slippage_bps_sigma: float = Field(default=5.0, ge=0, le=500)


SelectionMetric = Literal["sharpe", "return_pct", "return_ann_pct", "max_drawdown_pct", "win_rate_pct"]
SELECTION_COLUMNS: dict[str, str] = {
    "sharpe": "Sharpe Ratio",
    "return_pct": "Return [%]",
    "return_ann_pct": "Return (Ann.) [%]",
    "max_drawdown_pct": "Max. Drawdown [%]",  # negative: the largest value is the smallest drawdown
    "win_rate_pct": "Win Rate [%]",
}
"""Metrics walk-forward can choose parameters by (all maximised), and their columns in the grid's summary."""


class WalkForwardSpec(_Spec):
    in_sample: int = Field(default=504, ge=50, le=20_000, description="bars of each in-sample window")
    out_of_sample: int = Field(default=126, ge=10, le=20_000, description="bars of each out-of-sample window")
    anchored: bool = Field(default=False, description="in-sample windows all start at the first bar")
    fast: list[int] = Field(default=[5, 10, 20], min_length=1, max_length=200)
    slow: list[int] = Field(default=[50, 100, 200], min_length=1, max_length=200)
    chunk: int = Field(default=50, ge=1, le=10_000, description="symbols per task")
    metric: SelectionMetric = Field(
        default="sharpe", description="what the in-sample choice maximises (max_drawdown_pct: the smallest drawdown)"
    )

    @model_validator(mode="after")
    def _pairs(self) -> WalkForwardSpec:
        if not any(f < s for f in self.fast for s in self.slow):
            raise ValueError("the grid has no pair with fast < slow")
        return self


class ValidationSpec(_Spec):
    """Which validations a run performs (all off by default) and how the work is split into tasks."""

    permutation: PermutationSpec | None = None
    bootstrap: BootstrapSpec | None = None
    monte_carlo: MonteCarloSpec | None = None
    walk_forward: WalkForwardSpec | None = None
    chunk: int = Field(default=50, ge=1, le=10_000, description="permutation and Monte Carlo draws per task")

    def methods(self) -> list[Method]:
        """The enabled methods, in the order their tasks are planned."""
        return [m for m in METHODS if getattr(self, m) is not None]


def task_rng(seed: int, method: str, task_index: int) -> np.random.Generator:
    """The random stream of one task: a function of (run seed, method, task index) only."""
    return np.random.default_rng(np.random.SeedSequence([seed, METHOD_CODES[method], task_index]))


def sleeve_rng(seed: int, method: str, task_index: int, position: int) -> np.random.Generator:
    """One symbol's stream within a task (``position``: the symbol's index in the config's symbols)."""
    return np.random.default_rng(np.random.SeedSequence([seed, METHOD_CODES[method], task_index, position]))


def task_plan(n: int, chunk: int) -> list[tuple[int, int]]:
    """(task index, draws) of each task: ``n`` draws in chunks of ``chunk``."""
    return [(k, min(chunk, n - start)) for k, start in enumerate(range(0, n, chunk))]


@dataclass(frozen=True)
class Task:
    """One unit of validation work (a Celery task of the run): ``draws`` draws of ``method`` from task index
    ``task_index``; for walk-forward, the symbols at positions ``[task_index * chunk, + draws)``. ``work`` estimates
    its cost in backtests (the baseline included), for the run's progress and the configured bounds."""

    method: Method
    task_index: int
    draws: int
    work: int

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "task_index": self.task_index, "draws": self.draws, "work": self.work}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Task:
        return cls(raw["method"], int(raw["task_index"]), int(raw["draws"]), int(raw.get("work", 0)))


def task_positions(task: Task, spec: ValidationSpec) -> range | None:
    """The config positions of the symbols a task needs: a walk-forward task its own; any other task, all."""
    if task.method != "walk_forward":
        return None
    assert spec.walk_forward is not None
    first = task.task_index * spec.walk_forward.chunk
    return range(first, first + task.draws)


def _pairs(spec: WalkForwardSpec) -> list[tuple[int, int]]:
    return [(f, s) for f in spec.fast for s in spec.slow if f < s]


def plan(spec: ValidationSpec, symbols: int) -> list[Task]:
    """Every task of a run's validation over ``symbols`` symbols. Each task runs the ``symbols`` baseline
    backtests itself (it depends on no other task); a permutation or Monte Carlo draw is ``symbols`` backtests;
    a bootstrap draw resamples returns (no backtest); walk-forward runs one grid per window per symbol."""
    tasks: list[Task] = []
    for method in spec.methods():
        if method == "walk_forward":
            assert spec.walk_forward is not None
            pairs = len(_pairs(spec.walk_forward))
            chunk = spec.walk_forward.chunk
            tasks += [Task(method, k, d, d * (1 + pairs)) for k, d in task_plan(symbols, chunk)]
            continue
        if method == "bootstrap":
            assert spec.bootstrap is not None
            tasks += [Task(method, k, d, symbols) for k, d in task_plan(spec.bootstrap.n, spec.bootstrap.chunk)]
            continue
        n = getattr(spec, method).n
        tasks += [Task(method, k, d, symbols + d * symbols) for k, d in task_plan(n, spec.chunk)]
    return tasks


# --- the run as a portfolio ------------------------------------------------------------------------------------

_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def as_days(dates: Sequence[dt.date] | NDArray[np.datetime64]) -> NDArray[np.datetime64]:
    """``datetime64[D]`` of a list of dates; through ordinals, which is several times faster than numpy's own
    conversion of date objects (it matters for hundreds of curves of thousands of bars)."""
    if isinstance(dates, np.ndarray):
        return dates.astype("datetime64[D]")
    ordinals = np.fromiter((d.toordinal() for d in dates), dtype=np.int64, count=len(dates))
    return (ordinals - _EPOCH_ORDINAL).astype("datetime64[D]")


Curves = Sequence[tuple[Sequence[dt.date] | NDArray[np.datetime64], Sequence[float] | NDArray[np.float64]]]


def portfolio_curve(curves: Curves, initial_cash: float) -> tuple[NDArray[np.datetime64], NDArray[np.float64]]:
    """(dates, equity) of equal-cash sleeves summed on the union of their dates: a sleeve holds its cash before
    its first bar and its last equity after its last bar."""
    days = [as_days(d) for d, _ in curves]
    all_dates = np.unique(np.concatenate(days))
    total = np.zeros(len(all_dates))
    for own, (_, equity) in zip(days, curves, strict=True):
        positions = np.searchsorted(own, all_dates, side="right") - 1
        values = np.asarray(equity, dtype=np.float64)
        total += np.where(positions >= 0, values[np.clip(positions, 0, None)], initial_cash)
    return all_dates, total


def portfolio_returns(total: NDArray[np.float64], start_equity: float) -> NDArray[np.float64]:
    """Daily returns of a portfolio's equity, the first one from the starting cash."""
    series = np.concatenate([[start_equity], total])
    return np.asarray(series[1:] / series[:-1] - 1, dtype=np.float64)


def portfolio_sharpe(total: NDArray[np.float64], start_equity: float, risk_free_rate: float = 0.0) -> float:
    """Annualised Sharpe of daily excess returns (252 periods); NaN without variance."""
    excess = portfolio_returns(total, start_equity) - risk_free_rate / TRADING_DAYS
    std = float(np.std(excess, ddof=1)) if len(excess) > 1 else math.nan
    return float(np.mean(excess)) / std * math.sqrt(TRADING_DAYS) if std and math.isfinite(std) else math.nan


class Backtester(Protocol):
    """Backtests several symbols' bars at once: one result per bars, None where the strategy failed on them. A
    script strategy (``shared.library.strategy_scripts.ScriptBacktester``) runs its sandbox once per call; ``keep``
    asks it to keep those bars' signals (the baseline sleeves, re-run under shocked costs by Monte Carlo)."""

    def __call__(
        self, symbols: Sequence[str], bars: Sequence[Bars], config: BacktestConfig, keep: bool = False
    ) -> list[BacktestResult | None]: ...


SCRIPT_BATCH_BACKTESTS = 64
"""A script strategy's permutation draws go through the sandbox in batches of about this many backtests (one
sandbox process per batch: its start-up, ~0.1-0.3 s, is paid once per batch instead of once per draw)."""


@dataclass(frozen=True)
class Sleeves:
    """The symbols of a run that backtest (in the config's order), their bars cut to the config's range,
    their positions in ``config.symbols`` and their baseline equity curves."""

    config: BacktestConfig
    symbols: tuple[str, ...]
    positions: tuple[int, ...]
    bars: tuple[Bars, ...]
    dates: tuple[NDArray[np.datetime64], ...]
    equity: tuple[NDArray[np.float64], ...]
    _total: list[NDArray[np.float64]] = field(default_factory=list, compare=False, repr=False)
    backtester: Backtester | None = field(default=None, compare=False, repr=False)  # a script strategy's

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def start_equity(self) -> float:
        return self.config.initial_cash * len(self.symbols)

    def total(self) -> NDArray[np.float64]:
        """The baseline portfolio's equity on the union of dates."""
        if not self._total:
            self._total.append(portfolio_curve(list(zip(self.dates, self.equity, strict=True)),
                                               self.config.initial_cash)[1])  # fmt: skip
        return self._total[0]


def sleeves(
    bars: Mapping[str, Bars],
    config: BacktestConfig,
    positions: range | None = None,
    backtester: Backtester | None = None,
) -> Sleeves:
    """Each symbol's baseline backtest, as a run's shard does it (bars cut to the range, a ``BarsError`` drops
    the symbol, as it makes it a per-symbol error in the run). ``positions``: only the symbols at these
    positions of ``config.symbols`` (a walk-forward task needs its own symbols only). ``backtester``: a script
    strategy's (a symbol its script fails on is dropped, as it is that symbol's error in the run)."""
    kept: list[tuple[str, int, Bars, NDArray[np.datetime64], NDArray[np.float64]]] = []
    cuts: list[tuple[str, int, Bars]] = []
    for position, symbol in enumerate(config.symbols):
        if positions is not None and position not in positions:
            continue
        own = bars.get(symbol)
        if own is None:
            continue
        try:
            cut = own.between(config.start_date, config.end_date)
            if backtester is None:
                result = run_backtest(cut, config)
        except BarsError:
            continue
        if backtester is None:
            kept.append((symbol, position, cut, result.dates, result.equity))
        else:
            cuts.append((symbol, position, cut))
    if backtester is not None and cuts:
        results = backtester([c[0] for c in cuts], [c[2] for c in cuts], config, keep=True)
        for (symbol, position, cut), got in zip(cuts, results, strict=True):
            if got is not None:
                kept.append((symbol, position, cut, got.dates, got.equity))
    return Sleeves(
        config,
        tuple(k[0] for k in kept),
        tuple(k[1] for k in kept),
        tuple(k[2] for k in kept),
        tuple(k[3] for k in kept),
        tuple(k[4] for k in kept),
        backtester=backtester,
    )


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def baseline(s: Sleeves, method: Method) -> dict[str, Any]:
    """What a method's result compares its draws with (each task computes it; all tasks agree)."""
    if not len(s):
        return {}
    total = s.total()
    if method == "permutation":
        return _clean({"sharpe": portfolio_sharpe(total, s.start_equity, s.config.risk_free_rate)})
    if method == "bootstrap":
        return _clean({"stats": list(_path_stats(portfolio_returns(total, s.start_equity)))})
    if method == "monte_carlo":
        return {"final_equity": float(total[-1])}
    return {}


# --- permutation ---------------------------------------------------------------------------------------------


def permuted_bars(bars: Bars, rng: np.random.Generator) -> Bars:
    """The same bars with their bar-to-bar log returns shuffled jointly (each bar's open/high/low keep their
    ratio to its close, its volume moves with it); the first bar stays where it is."""
    close = bars.close
    log_close = np.log(close)
    steps = np.diff(log_close)
    order = rng.permutation(len(steps))
    new_close = np.exp(np.concatenate([[log_close[0]], log_close[0] + np.cumsum(steps[order])]))
    idx = np.concatenate([[0], order + 1])
    return Bars.from_arrays(
        open=new_close * bars.open[idx] / close[idx],
        high=new_close * bars.high[idx] / close[idx],
        low=new_close * bars.low[idx] / close[idx],
        close=new_close,
        volume=bars.volume[idx],
        dates=bars.dates,
    )


def _finite_or_floor(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def permutation_draws(s: Sleeves, seed: int, task_index: int, draws: int) -> Iterator[float]:
    """The portfolio Sharpe of ``draws`` permutations (NaN as -inf: it never beats the observed)."""
    rngs = [sleeve_rng(seed, "permutation", task_index, p) for p in s.positions]
    if s.backtester is not None:
        yield from _script_permutation_draws(s, rngs, draws)
        return
    for _ in range(draws):
        curves = []
        for bars, rng in zip(s.bars, rngs, strict=True):
            result = run_backtest(permuted_bars(bars, rng), s.config)
            curves.append((result.dates, result.equity))
        total = portfolio_curve(curves, s.config.initial_cash)[1]
        yield _finite_or_floor(portfolio_sharpe(total, s.start_equity, s.config.risk_free_rate))


def _script_permutation_draws(s: Sleeves, rngs: list[np.random.Generator], draws: int) -> Iterator[float]:
    """Permutation draws of a script strategy: the permuted bars go through the sandbox, a batch of draws per
    sandbox process. Each symbol's stream is consumed in draw order, as one draw at a time would (same numbers).
    A script that fails on permuted bars fails the task with the reason."""
    assert s.backtester is not None
    per_batch = max(1, SCRIPT_BATCH_BACKTESTS // max(len(s), 1))
    done = 0
    while done < draws:
        k = min(per_batch, draws - done)
        batch = [permuted_bars(bars, rng) for _ in range(k) for bars, rng in zip(s.bars, rngs, strict=True)]
        results = s.backtester(list(s.symbols) * k, batch, s.config)
        for j in range(k):
            curves = []
            for i, symbol in enumerate(s.symbols):
                result = results[j * len(s) + i]
                if result is None:
                    raise RuntimeError(f"the strategy script failed on permuted bars of {symbol}")
                curves.append((result.dates, result.equity))
            total = portfolio_curve(curves, s.config.initial_cash)[1]
            yield _finite_or_floor(portfolio_sharpe(total, s.start_equity, s.config.risk_free_rate))
        done += k


def permutation_result(observed: float, sharpes: Sequence[float], spec: PermutationSpec, seed: int) -> dict[str, Any]:
    values = np.asarray(sharpes, dtype=np.float64)
    at_least = int(np.sum(values >= _finite_or_floor(observed)))
    finite = values[np.isfinite(values)]
    return {
        "method": "permutation test of the portfolio Sharpe ratio against each symbol's shuffled bar returns",
        "params": spec.model_dump(),
        "seed": seed,
        "observed_sharpe": observed if math.isfinite(observed) else None,
        "p_value": (1 + at_least) / (1 + len(values)),
        "permuted_sharpe_mean": float(finite.mean()) if len(finite) else None,
        "permuted_sharpe_p95": float(np.quantile(finite, 0.95)) if len(finite) else None,
    }


# --- block bootstrap -----------------------------------------------------------------------------------------


def daily_returns(equity: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(equity[1:] / equity[:-1] - 1, dtype=np.float64)


def _path_stats(returns: NDArray[np.float64]) -> tuple[float, float, float]:
    """(annualised Sharpe, total return %, max drawdown %) of one return path."""
    std = float(np.std(returns, ddof=1)) if len(returns) > 1 else 0.0
    sharpe = float(np.mean(returns)) / std * math.sqrt(TRADING_DAYS) if std > 0 else 0.0
    path = np.cumprod(1 + returns)
    drawdown = float(np.min(path / np.maximum.accumulate(np.concatenate([[1.0], path]))[1:] - 1))
    return sharpe, (float(path[-1]) - 1) * 100, min(drawdown, 0.0) * 100


def bootstrap_task(
    returns: NDArray[np.float64], block: int, seed: int, task_index: int, draws: int
) -> list[tuple[float, float, float]]:
    return list(bootstrap_draws(returns, block, seed, task_index, draws))


def bootstrap_draws(
    returns: NDArray[np.float64], block: int, seed: int, task_index: int, draws: int
) -> Iterator[tuple[float, float, float]]:
    rng = task_rng(seed, "bootstrap", task_index)
    n = len(returns)
    blocks = -(-n // block)
    for _ in range(draws):
        starts = rng.integers(0, n, size=blocks)
        idx = (starts[:, None] + np.arange(block)[None, :]).ravel()[:n] % n
        yield _path_stats(returns[idx])


def bootstrap_result(
    observed: Sequence[float | None], samples: Sequence[Sequence[float]], spec: BootstrapSpec, seed: int
) -> dict[str, Any]:
    values = np.asarray(samples, dtype=np.float64).reshape(-1, 3)
    alpha = (1 - spec.confidence) / 2
    names = ("sharpe", "return_pct", "max_drawdown_pct")
    return {
        "method": "circular block bootstrap of the portfolio's daily returns, percentile intervals",
        "params": spec.model_dump(),
        "seed": seed,
        "intervals": {
            name: {
                "observed": observed[i],
                "low": _clean(float(np.quantile(values[:, i], alpha))),
                "high": _clean(float(np.quantile(values[:, i], 1 - alpha))),
            }
            for i, name in enumerate(names)
        },
    }


# --- Monte Carlo of costs ------------------------------------------------------------------------------------


def shocked_config(config: BacktestConfig, fee: float, slip: float) -> BacktestConfig:
    ex = config.execution
    update = {"fee_bps": min(ex.fee_bps + fee, 999.0), "slippage_bps": min(ex.slippage_bps + slip, 999.0)}
    return config.model_copy(update={"execution": ex.model_copy(update=update)})


def cost_shock_draws(s: Sleeves, spec: MonteCarloSpec, seed: int, task_index: int, draws: int) -> Iterator[float]:
    """The portfolio's final equity under ``draws`` cost shocks (one shock per draw, for every symbol)."""
    rng = task_rng(seed, "monte_carlo", task_index)
    for _ in range(draws):
        fee, slip = np.abs(rng.normal(0.0, 1.0, size=2)) * (spec.fee_bps_sigma, spec.slippage_bps_sigma)
        shocked = shocked_config(s.config, float(fee), float(slip))
        total = 0.0  # summed in symbol order, as portfolio_curve sums its last row
        if s.backtester is not None:  # the baseline's kept signals under the shocked costs: no sandbox run
            for symbol, result in zip(s.symbols, s.backtester(s.symbols, s.bars, shocked), strict=True):
                if result is None:
                    raise RuntimeError(f"the strategy script's signals for {symbol} do not run under shocked costs")
                total += float(result.equity[-1])
            yield total
            continue
        for bars in s.bars:
            total += float(run_backtest(bars, shocked).equity[-1])
        yield total


def cost_shock_result(baseline: float, finals: Sequence[float], spec: MonteCarloSpec, seed: int) -> dict[str, Any]:
    values = np.asarray(finals, dtype=np.float64)
    return {
        "method": "Monte Carlo of fee and slippage shocks (|normal| added to the configured costs), "
        "final portfolio equity",
        "params": spec.model_dump(),
        "seed": seed,
        "baseline_final_equity": baseline,
        "final_equity": {q: float(np.quantile(values, float(q))) for q in ("0.05", "0.25", "0.5", "0.75", "0.95")},
        "mean_final_equity": float(values.mean()),
    }


# --- walk-forward --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    in_start: int
    in_end: int  # exclusive
    out_end: int  # exclusive; the out-of-sample window is [in_end, out_end)


def windows(n: int, spec: WalkForwardSpec) -> list[Window]:
    out = []
    in_end = spec.in_sample
    while in_end < n:
        in_start = 0 if spec.anchored else in_end - spec.in_sample
        out.append(Window(in_start, in_end, min(in_end + spec.out_of_sample, n)))
        in_end += spec.out_of_sample
    return out


def _slice(bars: Bars, lo: int, hi: int) -> Bars:
    return Bars(
        open=bars.open[lo:hi], high=bars.high[lo:hi], low=bars.low[lo:hi], close=bars.close[lo:hi],
        volume=bars.volume[lo:hi], dates=bars.dates[lo:hi],
    )  # fmt: skip


def walk_forward(bars: Bars, config: BacktestConfig, spec: WalkForwardSpec) -> dict[str, Any]:
    """Re-choose (fast, slow) on each in-sample window by ``spec.metric``, then trade it out of sample. The
    out-of-sample run starts ``slow`` bars early so its averages are warm on the window's first bar (those bars
    come from the in-sample past: no look-ahead)."""
    if config.strategy.name != "dual_sma":
        raise ValueError("walk-forward re-optimises the dual_sma strategy's windows")
    cut = bars.between(config.start_date, config.end_date)
    pairs = [(f, s) for f in spec.fast for s in spec.slow if f < s]
    fast = np.array([p[0] for p in pairs], dtype=np.int64)
    slow = np.array([p[1] for p in pairs], dtype=np.int64)
    rows: list[dict[str, Any]] = []
    for w in windows(len(cut), spec):
        grid = run_dual_sma_grid(_slice(cut, w.in_start, w.in_end), fast, slow, config)
        sharpe = np.nan_to_num(grid.column("Sharpe Ratio"), nan=-np.inf)
        score = np.nan_to_num(grid.column(SELECTION_COLUMNS[spec.metric]), nan=-np.inf)
        best = int(np.argmax(score))
        chosen = {"fast": int(fast[best]), "slow": int(slow[best])}
        warm = max(0, w.in_end - chosen["slow"])
        params = config.strategy.params.model_copy(update=chosen)
        oos_config = config.model_copy(update={"strategy": config.strategy.model_copy(update={"params": params}),
                                               "start_date": None, "end_date": None})  # fmt: skip
        equity = run_backtest(_slice(cut, warm, w.out_end), oos_config).equity[w.in_end - warm :]
        rows.append({
            "in_sample": [str(cut.dates[w.in_start]), str(cut.dates[w.in_end - 1])],
            "out_of_sample": [str(cut.dates[w.in_end]), str(cut.dates[w.out_end - 1])],
            "chosen": chosen,
            "in_sample_sharpe": float(sharpe[best]) if math.isfinite(sharpe[best]) else None,
            "in_sample_score": float(score[best]) if math.isfinite(score[best]) else None,
            "out_of_sample_return_pct": (float(equity[-1]) / float(equity[0]) - 1) * 100 if len(equity) else None,
        })  # fmt: skip
    oos: list[float] = [r["out_of_sample_return_pct"] for r in rows if r["out_of_sample_return_pct"] is not None]
    compounded = (math.prod(1 + r / 100 for r in oos) - 1) * 100 if oos else None
    return {
        "method": ("anchored" if spec.anchored else "rolling")
        + f" walk-forward, parameters chosen by in-sample {spec.metric}",
        "params": spec.model_dump(),
        "windows": rows,
        "out_of_sample_return_pct": compounded,
    }


def walk_forward_draws(s: Sleeves, spec: WalkForwardSpec, task: Task, chunk: int) -> Iterator[list[Any] | None]:
    """For each config position in the task's range: ``[position, symbol, result]``, or None for a symbol that
    is not a sleeve (no bars in the range)."""
    index = {p: i for i, p in enumerate(s.positions)}
    lo = task.task_index * chunk
    for position in range(lo, lo + task.draws):
        i = index.get(position)
        yield None if i is None else [position, s.symbols[i], _clean(walk_forward(s.bars[i], s.config, spec))]


def walk_forward_result(per_symbol: Sequence[Sequence[Any]], spec: WalkForwardSpec) -> dict[str, Any]:
    """Per symbol, and the stitched out-of-sample return of equal-cash sleeves (never rebalanced, so the
    portfolio's return is the mean of the sleeves' compounded out-of-sample returns)."""
    ordered = sorted(per_symbol, key=lambda row: row[0])
    returns = [r["out_of_sample_return_pct"] for _, _, r in ordered if r["out_of_sample_return_pct"] is not None]
    return {
        "method": ("anchored" if spec.anchored else "rolling") + " walk-forward per symbol, parameters chosen by "
        f"in-sample {spec.metric}; portfolio: equal-cash sleeves of the stitched out-of-sample returns",
        "params": spec.model_dump(),
        "symbols": {symbol: result for _, symbol, result in ordered},
        "portfolio_out_of_sample_return_pct": float(np.mean(returns)) if returns else None,
        "symbols_with_windows": len(returns),
    }


# --- tasks and their combination -------------------------------------------------------------------------------


def task_draws(s: Sleeves, spec: ValidationSpec, seed: int, task: Task) -> Iterator[Any]:
    """One task's draws, one at a time (a caller may stop between two: its cancellation checkpoint). Without
    sleeves (no symbol backtests) there is nothing to draw from."""
    if not len(s) and task.method != "walk_forward":
        return iter(())
    if task.method == "permutation":
        return permutation_draws(s, seed, task.task_index, task.draws)
    if task.method == "bootstrap":
        assert spec.bootstrap is not None
        returns = portfolio_returns(s.total(), s.start_equity) if len(s) else np.zeros(0)
        if len(returns) < 2:
            return iter(())
        return bootstrap_draws(returns, spec.bootstrap.block, seed, task.task_index, task.draws)
    if task.method == "monte_carlo":
        assert spec.monte_carlo is not None
        return cost_shock_draws(s, spec.monte_carlo, seed, task.task_index, task.draws)
    assert spec.walk_forward is not None
    return walk_forward_draws(s, spec.walk_forward, task, spec.walk_forward.chunk)


@dataclass(frozen=True)
class Part:
    """What one task produced: its draws (floats; a bootstrap draw is three) and the baseline it compared with;
    walk-forward: ``[position, symbol, result]`` rows in ``detail["symbols"]``."""

    method: Method
    task_index: int
    values: NDArray[np.float64]
    detail: dict[str, Any]


def run_task(s: Sleeves, spec: ValidationSpec, seed: int, task: Task) -> Part:
    """One task, start to end, in this process (what a Celery task does, without its checkpoints). ``s`` may
    hold every symbol of the run (a walk-forward task picks its own)."""
    return make_part(s, task, list(task_draws(s, spec, seed, task)))


def make_part(s: Sleeves, task: Task, draws: Sequence[Any]) -> Part:
    if task.method == "walk_forward":
        rows = [row for row in draws if row is not None]
        return Part(task.method, task.task_index, np.zeros(0), {"symbols": rows, "draws": len(draws)})
    values = np.asarray(draws, dtype=np.float64).ravel()
    return Part(task.method, task.task_index, values, {"baseline": baseline(s, task.method), "draws": len(draws)})


def combine(spec: ValidationSpec, seed: int, planned: Sequence[Task], parts: Sequence[Part]) -> dict[str, Any]:
    """The validation result of a run from the parts its tasks stored (in task order, so the result is the same
    whatever order they finished in). A method whose tasks did not all finish (a cancelled run) says so."""
    out: dict[str, Any] = {"seed": seed, "chunk": spec.chunk, "methods": {}}
    for method in spec.methods():
        tasks = [t for t in planned if t.method == method]
        mine = sorted((p for p in parts if p.method == method), key=lambda p: p.task_index)
        planned_draws = sum(t.draws for t in tasks)
        done = len(mine)
        drawn = sum(int(p.detail.get("draws", 0)) for p in mine)
        if method == "walk_forward":
            assert spec.walk_forward is not None
            rows = [row for p in mine for row in p.detail.get("symbols", [])]
            result: dict[str, Any] | None = walk_forward_result(rows, spec.walk_forward) | {"seed": seed}
        else:
            base = next((p.detail.get("baseline") for p in mine if p.detail.get("baseline")), None)
            values = np.concatenate([p.values for p in mine]) if mine else np.zeros(0)
            result = _method_result(spec, method, seed, base, values)
        out["methods"][method] = {
            **(result or {"method": method, "params": getattr(spec, method).model_dump(), "seed": seed}),
            "draws": drawn,
            "draws_planned": planned_draws,
            "tasks_done": done,
            "tasks_total": len(tasks),
            "complete": done == len(tasks) and drawn == planned_draws,
        }
    return out


def _method_result(
    spec: ValidationSpec, method: Method, seed: int, base: dict[str, Any] | None, values: NDArray[np.float64]
) -> dict[str, Any] | None:
    if base is None or not len(values):
        return None
    if method == "permutation":
        assert spec.permutation is not None
        observed = base["sharpe"] if base.get("sharpe") is not None else math.nan
        return permutation_result(observed, values.tolist(), spec.permutation, seed)
    if method == "bootstrap":
        assert spec.bootstrap is not None
        return bootstrap_result(base["stats"], values.reshape(-1, 3).tolist(), spec.bootstrap, seed)
    assert spec.monte_carlo is not None
    return cost_shock_result(base["final_equity"], values.tolist(), spec.monte_carlo, seed)


def validate_in_process(
    bars: Mapping[str, Bars], config: BacktestConfig, spec: ValidationSpec, backtester: Backtester | None = None
) -> dict[str, Any]:
    """Every task of the run's validation, one after the other, here: the reference a distributed run equals."""
    s = sleeves(bars, config, backtester=backtester)
    planned = plan(spec, len(config.symbols))
    return combine(spec, config.seed, planned, [run_task(s, spec, config.seed, t) for t in planned])
