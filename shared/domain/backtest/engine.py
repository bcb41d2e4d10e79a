"""``run_backtest(bars, config)``: one symbol's bars and a validated config in, plain results out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.domain.backtest import risk as risk_models
from shared.domain.backtest import simulator as sim
from shared.domain.backtest.bars import Bars, format_bar_dates
from shared.domain.backtest.config import BacktestConfig
from shared.domain.backtest.metrics import MetricValue, TradeColumns, compute_metrics
from shared.domain.backtest.strategies import REGISTRY, StrategySignals

_FILL_CODES = {"next_open": sim.FILL_NEXT_OPEN, "next_close": sim.FILL_NEXT_CLOSE, "this_close": sim.FILL_THIS_CLOSE}
_ZERO_VOLUME_CODES = {"wait": sim.ZERO_VOLUME_WAIT, "cancel": sim.ZERO_VOLUME_CANCEL, "ignore": sim.ZERO_VOLUME_IGNORE}
_SLIPPAGE_CODES = {
    "none": sim.SLIPPAGE_NONE,
    "spread_pct": sim.SLIPPAGE_SPREAD,
    "participation_rate": sim.SLIPPAGE_PARTICIPATION,
}
_RISK_CODES = {
    "fixed_fraction": risk_models.FIXED_FRACTION,
    "volatility_target": risk_models.VOLATILITY_TARGET,
    "kelly_fraction": risk_models.KELLY_FRACTION,
}


@dataclass(frozen=True)
class Trades:
    """Closed trades, one array element per trade (sizes negative for shorts, bars are indices)."""

    size: NDArray[np.float64]
    entry_bar: NDArray[np.int64]
    exit_bar: NDArray[np.int64]
    entry_price: NDArray[np.float64]
    exit_price: NDArray[np.float64]
    pnl: NDArray[np.float64]
    return_pct: NDArray[np.float64]
    commission: NDArray[np.float64]
    entry_date: NDArray[np.datetime64]
    exit_date: NDArray[np.datetime64]

    def __len__(self) -> int:
        return len(self.size)

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-ready list of trades (dates as :func:`~shared.domain.backtest.bars.format_bar_dates` writes them)."""
        entry_dates = format_bar_dates(self.entry_date)
        exit_dates = format_bar_dates(self.exit_date)
        return [
            {
                "size": float(self.size[i]),
                "entry_bar": int(self.entry_bar[i]),
                "exit_bar": int(self.exit_bar[i]),
                "entry_date": entry_dates[i],
                "exit_date": exit_dates[i],
                "entry_price": float(self.entry_price[i]),
                "exit_price": float(self.exit_price[i]),
                "pnl": float(self.pnl[i]),
                "return_pct": float(self.return_pct[i]) * 100,
                "commission": float(self.commission[i]),
            }
            for i in range(len(self))
        ]


@dataclass(frozen=True)
class OpenPosition:
    size: float
    entry_bar: int
    entry_date: str  # format_bar_dates
    entry_price: float


@dataclass(frozen=True)
class BacktestResult:
    metrics: dict[str, MetricValue]
    equity: NDArray[np.float64]  # per bar, marked at the close
    drawdown: NDArray[np.float64]  # per bar, fraction below the running peak
    position: NDArray[np.float64]  # units held at each close
    dates: NDArray[np.datetime64]  # the bars' dates: datetime64[D], or datetime64[s] instants intraday
    trades: Trades
    open_position: OpenPosition | None
    warmup: int
    orders: dict[str, int] = field(default_factory=dict)  # fills, cancelled (zero volume), unfilled (too small)
    config_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN and infinities become null; dates as ``format_bar_dates`` writes them)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            return value

        return {
            "config_hash": self.config_hash,
            "metrics": {k: clean(v) for k, v in self.metrics.items()},
            "equity_curve": {
                "dates": format_bar_dates(self.dates),
                "equity": [clean(float(x)) for x in self.equity],
                "drawdown_pct": [clean(float(x) * 100) for x in self.drawdown],
            },
            "trades": [{k: clean(v) for k, v in t.items()} for t in self.trades.to_records()],
            "open_position": None if self.open_position is None else vars(self.open_position),
            "orders": self.orders,
            "warmup_bars": self.warmup,
        }


def simulation_parameters(config: BacktestConfig) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """The simulator's integer and float parameter vectors for ``config``."""
    ex = config.execution
    ip = np.zeros(sim.N_IPARAMS, dtype=np.int64)
    fp = np.zeros(sim.N_FPARAMS, dtype=np.float64)
    ip[sim.I_COMPAT] = ex.convention == "backtesting_py"
    ip[sim.I_FILL] = _FILL_CODES[ex.fill]
    ip[sim.I_ALLOW_SHORT] = ex.allow_short
    ip[sim.I_FRACTIONAL] = ex.fractional_units
    ip[sim.I_FLATTEN] = ex.flatten_at_end
    ip[sim.I_ZERO_VOLUME] = _ZERO_VOLUME_CODES[ex.on_zero_volume]
    ip[sim.I_RISK] = _RISK_CODES[config.risk.model]
    ip[sim.I_SLIPPAGE] = _SLIPPAGE_CODES[ex.slippage_model.model]
    fp[sim.F_CASH] = config.initial_cash
    fp[sim.F_FEE_RATE] = ex.fee_bps / 1e4
    fp[sim.F_FIXED_FEE] = ex.fixed_fee
    fp[sim.F_SLIP_RATE] = ex.slippage_bps / 1e4
    slip = ex.slippage_model
    if slip.model == "spread_pct":
        fp[sim.F_HALF_SPREAD] = slip.params.spread_pct / 100 / 2
    elif slip.model == "participation_rate":
        fp[sim.F_IMPACT] = slip.params.impact_bps / 1e4
        fp[sim.F_IMPACT_EXPONENT] = slip.params.exponent
        fp[sim.F_IMPACT_CAP] = slip.params.max_impact_bps / 1e4
    if config.risk.model == "kelly_fraction":
        kp = config.risk.params
        ip[sim.I_KELLY_MIN_TRADES] = kp.min_trades
        fp[sim.F_KELLY_FRACTION] = kp.fraction
        fp[sim.F_KELLY_WARMUP] = kp.warmup_fraction
        fp[sim.F_KELLY_MAX] = kp.max_fraction
    return ip, fp


def strategy_signals(bars: Bars, config: BacktestConfig) -> StrategySignals:
    """Events of the configured strategy (``start`` one bar later in the backtesting.py convention)."""
    spec = config.strategy
    offset = 1 if config.execution.convention == "backtesting_py" else 0
    min_start = risk_models.first_sizable_bar(config.risk.params)
    return REGISTRY[spec.name].compute(bars, spec.params, offset, min_start)


def entry_fractions(bars: Bars, config: BacktestConfig) -> NDArray[np.float64]:
    """Per-bar fraction of equity an entry decided on that bar commits."""
    fractions = risk_models.decision_fractions(config.risk.model, config.risk.params, bars)
    if config.execution.convention == "backtesting_py":
        # backtesting.py's size must be < 1 to mean "fraction of equity"; its default is 1 - epsilon
        fractions = np.minimum(fractions, sim.FULL_EQUITY)
    return fractions


def run_backtest(bars: Bars, config: BacktestConfig) -> BacktestResult:
    """Backtest one symbol: strategy events -> risk fractions -> execution -> metrics.

    ``bars`` are cut to the config's date range first. Deterministic: the same bars and config give the same
    result, bit for bit (``config.seed`` is recorded only).
    """
    bars = bars.between(config.start_date, config.end_date)
    signals = strategy_signals(bars, config)
    first_trading_bar = max(signals.warmup, risk_models.first_sizable_bar(config.risk.params))
    return run_events(bars, signals.events, config, warmup=first_trading_bar)


def run_events(
    bars: Bars,
    events: NDArray[np.int8],
    config: BacktestConfig,
    *,
    warmup: int = 0,
    entry_scale: NDArray[np.float64] | None = None,
) -> BacktestResult:
    """Execute given events (``strategies.LONG/SHORT/FLAT/NONE``, one per bar) under ``config``'s execution,
    risk and metrics settings; ``config.strategy`` is not used. ``warmup`` is the first bar every signal input
    was defined (where "Buy & Hold" starts). ``entry_scale`` (one value in [0, 1] per bar) scales the risk
    model's fraction for an entry decided on that bar (a script's target position; Kelly sizing ignores it).
    The caller owns the causality of ``events``."""
    events = np.ascontiguousarray(events, dtype=np.int8)
    if events.shape != (len(bars),):
        raise ValueError(f"events: expected {len(bars)} values, got shape {events.shape}")
    fractions = entry_fractions(bars, config)
    if entry_scale is not None:
        fractions = np.ascontiguousarray(fractions * entry_scale, dtype=np.float64)
    ip, fp = simulation_parameters(config)
    n = len(bars)
    equity = np.empty(n)
    position = np.empty(n)
    table = np.zeros((n + 2, sim.N_TRADE_COLS))
    state = np.zeros(sim.N_STATE)
    sim.simulate(bars.open, bars.close, bars.volume, events, fractions, ip, fp, equity, position, table, state)

    k = int(state[sim.S_N_CLOSED])
    rows = table[:k]
    entry_bar = rows[:, sim.T_ENTRY_BAR].astype(np.int64)
    exit_bar = rows[:, sim.T_EXIT_BAR].astype(np.int64)
    trades = Trades(
        size=rows[:, sim.T_SIZE].copy(),
        entry_bar=entry_bar,
        exit_bar=exit_bar,
        entry_price=rows[:, sim.T_ENTRY_PRICE].copy(),
        exit_price=rows[:, sim.T_EXIT_PRICE].copy(),
        pnl=rows[:, sim.T_PNL].copy(),
        return_pct=rows[:, sim.T_RETURN].copy(),
        commission=rows[:, sim.T_COMMISSION].copy(),
        entry_date=bars.dates[entry_bar],
        exit_date=bars.dates[exit_bar],
    )
    metrics = compute_metrics(
        equity=equity,
        close=bars.close,
        dates=bars.dates,
        trades=TradeColumns(
            size=trades.size,
            entry_bar=entry_bar,
            exit_bar=exit_bar,
            pnl=trades.pnl,
            return_pct=trades.return_pct,
            commission=trades.commission,
        ),
        first_trading_bar=min(max(warmup, 0), n - 1),
        risk_free_rate=config.risk_free_rate,
        psr_benchmark_sharpe=config.psr_benchmark_sharpe,
        filled_value=float(state[sim.S_NOTIONAL]),
        fees_paid=float(state[sim.S_FEES]),
    )
    open_position = None
    if state[sim.S_POS] != 0:
        entry = int(state[sim.S_ENTRY_BAR])
        open_position = OpenPosition(
            size=float(state[sim.S_POS]),
            entry_bar=entry,
            entry_date=format_bar_dates(bars.dates[entry]),
            entry_price=float(state[sim.S_ENTRY_PRICE]),
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        drawdown = 1 - equity / np.maximum.accumulate(equity)
    return BacktestResult(
        metrics=metrics,
        equity=equity,
        drawdown=drawdown,
        position=position,
        dates=bars.dates,
        trades=trades,
        open_position=open_position,
        warmup=warmup,
        orders={
            "fills": int(state[sim.S_FILLS]),
            "cancelled_zero_volume": int(state[sim.S_CANCELLED]),
            "unfilled_too_small": int(state[sim.S_UNFILLED]),
            "bust_bar": int(state[sim.S_BUST]),
        },
        config_hash=config.config_hash,
    )
