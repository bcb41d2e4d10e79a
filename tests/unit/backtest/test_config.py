"""Config: validation errors that name the field, canonical JSON and a hash stable across processes."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shared.domain.backtest.config import SYMBOL_PATTERN, BacktestConfig, StrategySpec
from shared.domain.backtest.strategies import REGISTRY

ROOT = Path(__file__).resolve().parents[3]


def base(**overrides: Any) -> dict[str, Any]:
    return {"symbols": ["AAPL"], "strategy": {"name": "dual_sma", "params": {"fast": 10, "slow": 30}}, **overrides}


def errors(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        BacktestConfig.model_validate(data)
    return [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in info.value.errors()]


def test_defaults_are_explicit_in_the_canonical_json() -> None:
    config = BacktestConfig.model_validate(base())
    doc = json.loads(config.canonical_json())
    assert doc["risk"] == {"model": "fixed_fraction", "params": {"fraction": 1.0}}
    assert doc["execution"]["fill"] == "next_open"
    assert doc["execution"]["convention"] == "native"
    assert doc["strategy"] == {"name": "dual_sma", "params": {"fast": 10, "slow": 30}}
    assert list(doc) == sorted(doc)
    assert " " not in config.canonical_json()


def test_same_meaning_same_hash() -> None:
    a = BacktestConfig.model_validate(base(execution={"fee_bps": 5, "allow_short": False}))
    b = BacktestConfig.model_validate(
        {
            "execution": {"fee_bps": 5.0},
            "strategy": {"params": {"slow": 30, "fast": 10}, "name": "dual_sma"},
            "symbols": ["aapl", "AAPL"],
            "risk": {"model": "fixed_fraction", "params": {"fraction": 1}},
        }
    )
    assert a.canonical_json() == b.canonical_json()
    assert a.config_hash == b.config_hash
    assert len(a.config_hash) == 64
    c = BacktestConfig.model_validate(base(execution={"fee_bps": 5.5}))
    assert c.config_hash != a.config_hash


def test_hash_is_stable_across_processes() -> None:
    data = base(
        risk={"model": "kelly_fraction"},
        execution={"slippage_model": {"model": "spread_pct", "params": {"spread_pct": 0.1}}},
    )
    here = BacktestConfig.model_validate(data).config_hash
    code = (
        "import json, sys; from shared.domain.backtest.config import BacktestConfig; "
        "print(BacktestConfig.model_validate(json.loads(sys.argv[1])).config_hash)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(data)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip() == here


def test_unknown_strategy_is_named() -> None:
    [(loc, msg)] = errors(base(strategy={"name": "sma_magic"}))
    assert loc == "strategy"
    assert "sma_magic" in msg and "dual_sma" in msg and "rsi_reversion" in msg


def test_unknown_strategy_parameter_is_named() -> None:
    [(loc, msg)] = errors(base(strategy={"name": "dual_sma", "params": {"fast": 5, "slwo": 20}}))
    assert loc == "strategy.dual_sma.params.slwo"
    assert "not permitted" in msg


def test_fast_not_below_slow_is_rejected() -> None:
    [(loc, msg)] = errors(base(strategy={"name": "dual_sma", "params": {"fast": 30, "slow": 30}}))
    assert loc == "strategy.dual_sma.params"
    assert "fast (30) must be less than slow (30)" in msg


@pytest.mark.parametrize(
    ("overrides", "where", "says"),
    [
        ({"risk": {"model": "martingale"}}, "risk", "martingale"),
        (
            {"risk": {"model": "kelly_fraction", "params": {"fraction": 1.5}}},
            "risk.kelly_fraction.params.fraction",
            "less than or equal to 1",
        ),
        (
            {"risk": {"model": "volatility_target", "params": {"window": 3}}},
            "risk.volatility_target.params.window",
            "not permitted",
        ),
        ({"execution": {"slippage_model": {"model": "magic"}}}, "execution.slippage_model", "magic"),
        (
            {"execution": {"slippage_model": {"model": "participation_rate", "params": {}}}},
            "execution.slippage_model.participation_rate.params.impact_bps",
            "required",
        ),
        ({"execution": {"fill": "tomorrow"}}, "execution.fill", "next_open"),
        ({"execution": {"fee_bps": -1}}, "execution.fee_bps", "greater than or equal to 0"),
        ({"execution": {"leverage": 2}}, "execution.leverage", "not permitted"),
        ({"initial_cash": 0}, "initial_cash", "greater than 0"),
        ({"symbols": ["good", "bad symbol"]}, "symbols", "symbols[1]"),
        ({"symbols": []}, "symbols", "at least 1"),
        ({"start_date": "2024-02-01", "end_date": "2024-01-01"}, "", "start_date (2024-02-01) is after end_date"),
        (
            {"strategy": {"name": "rsi_reversion", "params": {"lower": 70, "upper": 30}}},
            "strategy.rsi_reversion.params",
            "lower (70.0) must be less than upper (30.0)",
        ),
    ],
)
def test_errors_name_their_field(overrides: dict[str, Any], where: str, says: str) -> None:
    found = errors(base(**overrides))
    assert any(loc == where and says in msg for loc, msg in found), found


def test_backtesting_py_convention_rejects_what_it_cannot_honour() -> None:
    [(loc, msg)] = errors(
        base(
            execution={
                "convention": "backtesting_py",
                "fill": "next_close",
                "slippage_bps": 5,
                "fractional_units": True,
                "on_zero_volume": "wait",
            }
        )
    )
    assert loc == "execution"
    for field in ("fill", "slippage_bps", "fractional_units", "on_zero_volume"):
        assert field in msg
    [(loc, msg)] = errors(base(execution={"convention": "backtesting_py"}, risk={"model": "kelly_fraction"}))
    assert "fixed_fraction" in msg


def test_backtesting_py_convention_defaults_to_ignoring_volume() -> None:
    config = BacktestConfig.model_validate(base(execution={"convention": "backtesting_py"}))
    assert config.execution.on_zero_volume == "ignore"


def test_every_registered_strategy_is_configurable() -> None:
    (union, _) = typing.get_args(StrategySpec)
    names = {typing.get_args(spec.model_fields["name"].annotation)[0] for spec in typing.get_args(union)}
    assert names == set(REGISTRY) | {"script"}  # "script": a saved strategy script (shared.library.strategy_scripts)
    for name in REGISTRY:
        BacktestConfig.model_validate(base(strategy={"name": name}))
    BacktestConfig.model_validate(base(strategy={"name": "script", "script_id": str(uuid.UUID(int=1))}))


def test_symbol_rule_matches_the_importers() -> None:
    from shared.marketdata.bars import SYMBOL_PATTERN as IMPORTER_PATTERN

    assert SYMBOL_PATTERN.pattern == IMPORTER_PATTERN.pattern


def test_engine_package_imports_no_web_queue_or_database_code() -> None:
    code = (
        "import sys, pkgutil, importlib, shared.domain.backtest as b\n"
        "for m in pkgutil.iter_modules(b.__path__): importlib.import_module('shared.domain.backtest.' + m.name)\n"
        "bad = [m for m in ('flask', 'celery', 'sqlalchemy', 'psycopg2', 'redis', 'kombu', 'pandas', 'backtesting',"
        " 'vectorbt', 'api', 'worker', 'shared.infra.db', 'shared.infra.models') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
