"""Backtest configuration: validated once at the boundary, canonical JSON, stable hash.

Every choice is explicit in the validated object (defaults filled in), so two configs that mean the same
backtest serialize to the same canonical JSON and hash to the same SHA-256, in any process, and the hash can
key stored results. Errors are pydantic ``ValidationError``s whose ``loc`` names the field (for a strategy
parameter: ``strategy.dual_sma.params.fast``); an unknown strategy, risk model or slippage model is a
``union_tag_invalid`` error on ``strategy`` / ``risk`` / ``execution.slippage_model`` listing the known names.

Conventions (``execution.convention``):

* ``native`` (default): the engine's own rules (see the README's "Backtest engine" section).
* ``backtesting_py``: backtesting.py 0.6.6's rules, to reproduce its numbers exactly: whole units, all-in
  sizing (``fixed_fraction``; 1.0 means backtesting.py's default ``size``), relative (+ fixed) commission on
  entry and exit, exclusive orders (every signal closes the open trade and opens a new one), fills at the next
  open, volume ignored, ``flatten_at_end`` = ``finalize_trades``. Settings it cannot honour are rejected.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import date
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool, StrictInt, field_validator, model_validator

from shared.domain.backtest.risk import FixedFractionParams, KellyFractionParams, VolatilityTargetParams
from shared.domain.backtest.strategies import (
    BollingerReversionParams,
    BuyAndHoldParams,
    DonchianBreakoutParams,
    DualSmaParams,
    RsiReversionParams,
)

# Same rule as shared.marketdata.bars.SYMBOL_PATTERN (which lives beside database code this package must not import);
# a unit test keeps the two equal.
SYMBOL_PATTERN = re.compile(r"[A-Z0-9][A-Z0-9.\-^=_]{0,31}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- strategy ------------------------------------------------------------------------------------------------


class DualSmaSpec(_Model):
    name: Literal["dual_sma"]
    params: DualSmaParams = DualSmaParams()


class RsiReversionSpec(_Model):
    name: Literal["rsi_reversion"]
    params: RsiReversionParams = RsiReversionParams()


class DonchianBreakoutSpec(_Model):
    name: Literal["donchian_breakout"]
    params: DonchianBreakoutParams = DonchianBreakoutParams()


class BollingerReversionSpec(_Model):
    name: Literal["bollinger_reversion"]
    params: BollingerReversionParams = BollingerReversionParams()


class BuyAndHoldSpec(_Model):
    name: Literal["buy_and_hold"]
    params: BuyAndHoldParams = BuyAndHoldParams()


PARAMETER_NAME = r"^[a-z][a-z0-9_]{0,39}$"
MAX_SCRIPT_PARAMETERS = 20
ParameterValue = StrictBool | StrictInt | Annotated[float, Field(strict=True, allow_inf_nan=False)]


class ScriptParams(RootModel[dict[Annotated[str, Field(pattern=PARAMETER_NAME)], ParameterValue]]):
    """A strategy script's parameter values by name (checked against the script's declared parameters by the
    API, which also fills in their defaults: ``shared.library.strategy_scripts.resolve_params``)."""

    model_config = ConfigDict(frozen=True)

    @field_validator("root")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > MAX_SCRIPT_PARAMETERS:
            raise ValueError(f"at most {MAX_SCRIPT_PARAMETERS} parameters")
        return value


class ScriptStrategySpec(_Model):
    """A saved strategy script of the run's owner. The API pins ``version`` (the latest when omitted)
    and completes ``params`` with the declared defaults before the config is hashed, so the hash names the
    exact code and parameters that run."""

    name: Literal["script"]
    script_id: uuid.UUID
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)
    params: ScriptParams = ScriptParams({})


StrategySpec = Annotated[
    DualSmaSpec
    | RsiReversionSpec
    | DonchianBreakoutSpec
    | BollingerReversionSpec
    | BuyAndHoldSpec
    | ScriptStrategySpec,
    Field(discriminator="name"),
]

# --- risk ----------------------------------------------------------------------------------------------------


class FixedFractionSpec(_Model):
    model: Literal["fixed_fraction"]
    params: FixedFractionParams = FixedFractionParams()


class VolatilityTargetSpec(_Model):
    model: Literal["volatility_target"]
    params: VolatilityTargetParams = VolatilityTargetParams()


class KellyFractionSpec(_Model):
    model: Literal["kelly_fraction"]
    params: KellyFractionParams = KellyFractionParams()


RiskSpec = Annotated[FixedFractionSpec | VolatilityTargetSpec | KellyFractionSpec, Field(discriminator="model")]

# --- slippage ------------------------------------------------------------------------------------------------


class _EmptyParams(_Model):
    pass


class SpreadPctParams(_Model):
    spread_pct: float = Field(gt=0, lt=20, description="quoted bid-ask spread in percent of price; a fill pays half")


class ParticipationRateParams(_Model):
    impact_bps: float = Field(gt=0, le=5000, description="slippage in bps when the order is 100 % of bar volume")
    exponent: float = Field(default=0.5, gt=0, le=2, description="impact = impact_bps * (order / volume) ** exponent")
    max_impact_bps: float = Field(default=100.0, gt=0, le=5000, description="cap of the impact, in bps")


class NoSlippageSpec(_Model):
    model: Literal["none"]
    params: _EmptyParams = _EmptyParams()


class SpreadPctSpec(_Model):
    model: Literal["spread_pct"]
    params: SpreadPctParams


class ParticipationRateSpec(_Model):
    model: Literal["participation_rate"]
    params: ParticipationRateParams


SlippageSpec = Annotated[NoSlippageSpec | SpreadPctSpec | ParticipationRateSpec, Field(discriminator="model")]

# --- execution -----------------------------------------------------------------------------------------------


class ExecutionConfig(_Model):
    convention: Literal["native", "backtesting_py"] = "native"
    fee_bps: float = Field(default=0.0, ge=0, lt=1000, description="commission per fill, in bps of the filled value")
    fixed_fee: float = Field(default=0.0, ge=0, le=1e6, description="commission per fill, in cash")
    slippage_bps: float = Field(default=0.0, ge=0, lt=1000, description="fill price moved against the trade, in bps")
    slippage_model: SlippageSpec = NoSlippageSpec(model="none")
    fill: Literal["next_open", "next_close", "this_close"] = "next_open"
    allow_short: bool = False
    fractional_units: bool = False
    flatten_at_end: bool = False
    on_zero_volume: Literal["wait", "cancel", "ignore"] = Field(
        default="wait", description="an order meeting a zero-volume bar waits for the next bar, is cancelled, or fills"
    )

    @model_validator(mode="before")
    @classmethod
    def _convention_defaults(cls, data: Any) -> Any:
        # backtesting.py ignores volume: in its convention that is the default (and the only allowed value).
        if isinstance(data, dict) and data.get("convention") == "backtesting_py" and "on_zero_volume" not in data:
            data = {**data, "on_zero_volume": "ignore"}
        return data

    @model_validator(mode="after")
    def _convention_rules(self) -> ExecutionConfig:
        if self.convention != "backtesting_py":
            return self
        problems = []
        if self.fill != "next_open":
            problems.append("fill must be 'next_open'")
        if self.slippage_bps != 0 or self.slippage_model.model != "none":
            problems.append("slippage_bps must be 0 and slippage_model 'none'")
        if self.fractional_units:
            problems.append("fractional_units must be false")
        if self.on_zero_volume != "ignore":
            problems.append("on_zero_volume must be 'ignore'")
        if problems:
            raise ValueError("the backtesting_py convention requires: " + "; ".join(problems))
        return self


Timeframe = Literal["1m", "5m", "15m", "30m", "1h", "1d", "1w", "1mo"]
Adjustment = Literal["none", "splits", "total_return"]


class BacktestConfig(_Model):
    symbols: list[str] = Field(min_length=1, max_length=5000)
    start_date: date | None = None
    end_date: date | None = None
    timeframe: Timeframe = Field(default="1d", description="bar timeframe; 1w and 1mo are resampled from daily bars")
    adjustment: Adjustment = Field(
        default="total_return",
        description="prices adjusted for splits and dividends (backward): a backtest's returns include dividends",
    )
    strategy: StrategySpec
    risk: RiskSpec = FixedFractionSpec(model="fixed_fraction")
    execution: ExecutionConfig = ExecutionConfig()
    initial_cash: float = Field(default=10_000.0, gt=0, le=1e12)
    risk_free_rate: float = Field(
        default=0.0, gt=-1, lt=1, description="annual; used by Sharpe, Sortino, Alpha and PSR"
    )
    psr_benchmark_sharpe: float = Field(default=1.0, ge=-10, le=10, description="annual Sharpe the PSR tests against")
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="recorded for reproducibility (the engine is exact)")

    @field_validator("symbols")
    @classmethod
    def _symbols(cls, value: list[str]) -> list[str]:
        seen: dict[str, None] = {}
        for i, raw in enumerate(value):
            symbol = raw.strip().upper()
            if not symbol.isascii() or SYMBOL_PATTERN.fullmatch(symbol) is None:
                raise ValueError(f"symbols[{i}]: invalid symbol {raw!r}")
            seen.setdefault(symbol, None)
        return list(seen)

    @model_validator(mode="after")
    def _consistent(self) -> BacktestConfig:
        if self.start_date and self.end_date and self.start_date > self.end_date:
            raise ValueError(f"start_date ({self.start_date}) is after end_date ({self.end_date})")
        if self.execution.convention == "backtesting_py" and self.risk.model != "fixed_fraction":
            raise ValueError("the backtesting_py convention sizes with risk model 'fixed_fraction' only")
        return self

    def canonical_json(self) -> str:
        """Sorted keys, no whitespace, every default spelled out: equal configs give equal text."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )

    @cached_property
    def config_hash(self) -> str:
        """SHA-256 of the canonical JSON (hex); computed once per (immutable) config."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()
