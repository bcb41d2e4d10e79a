"""What a submission asks for and may ask for: the request, the configured bounds, and the spec's combos checked
against them (a strategy script's values against its declared parameters)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.domain.search import grid
from shared.domain.search.grid import Combos, check_constraints, range_values
from shared.domain.search.spec import OptimizationSpec, RandomSearch, Range
from shared.errors import ValidationFailed
from shared.library import strategy_scripts

SCRIPT_SLICE_COMBOS = 10
"""Default combos per slice of a script strategy (each combo is a sandbox run): many small slices spread over
workers (``ALPHAFORGE_SCRIPT_OPTIMIZATION_SLICE``)."""
MAX_SCRIPT_COMBOS = 200
"""Default bound on a script strategy's combos (``ALPHAFORGE_MAX_SCRIPT_COMBOS``)."""


def script_parameter_values(declared: Mapping[str, Any], name: str, raw: list[float] | Range) -> list[Any]:
    """A strategy script's parameter values, each checked against its declaration (type, min, max)."""
    where = f"parameters.{name}"
    if name not in declared:
        known = ", ".join(declared) or "none"
        raise ValidationFailed.for_field(where, f"the script declares no parameter {name!r} (it declares: {known})")
    decl = strategy_scripts.ParameterDecl.model_validate(declared[name])
    if decl.type == "bool":
        raise ValidationFailed.for_field(where, "a bool parameter is not optimised (give it in strategy.params)")
    out = set()
    for v in range_values(where, raw):
        if decl.type == "int" and float(v) != int(v):
            raise ValidationFailed.for_field(where, f"{v:g} is not a whole number ({name} is an int)")
        value: int | float = int(v) if decl.type == "int" else float(v)
        problem = strategy_scripts.check_value(decl, value)
        if problem:
            raise ValidationFailed.for_field(where, f"{v:g}: {problem}")
        out.add(value)
    return sorted(out)


def combos(spec: OptimizationSpec, declared: Mapping[str, Any] | None = None) -> Combos:
    """The spec's combos (``shared.domain.search.grid.combos``); a script strategy's values checked against its
    ``declared`` parameters."""
    if spec.config.strategy.name != "script":
        return grid.combos(spec)
    if declared is None:
        raise ValueError("a script strategy's combos need its declared parameters")
    return grid.combos(spec, [script_parameter_values(declared, n, spec.parameters[n]) for n in spec.parameters])


@dataclass(frozen=True)
class Limits:
    max_combos: int  # ALPHAFORGE_MAX_GRID_COMBOS
    max_backtests: int  # ALPHAFORGE_MAX_OPTIMIZATION_BACKTESTS
    slice_backtests: int  # ALPHAFORGE_OPTIMIZATION_SLICE
    max_script_combos: int = MAX_SCRIPT_COMBOS  # ALPHAFORGE_MAX_SCRIPT_COMBOS: a sandbox run per combo
    script_slice_combos: int = SCRIPT_SLICE_COMBOS  # ALPHAFORGE_SCRIPT_OPTIMIZATION_SLICE: combos per script slice
    max_bars: int = 20_000_000  # ALPHAFORGE_MAX_PORTFOLIO_BARS: a slice holds every symbol's bars


@dataclass(frozen=True)
class OptimizationRequest:
    spec: OptimizationSpec
    owner_id: str
    name: str | None = None
    callback_url: str | None = None  # checked by shared/jobs/webhooks.validate_callback_url before it gets here


def check(spec: OptimizationSpec, limits: Limits, declared: Mapping[str, Any] | None = None) -> Combos:
    """The combos, or a 422 naming the field: parameters, the configured bounds, the constraints."""
    check_constraints(spec.constraints)
    max_combos, what = limits.max_combos, "ALPHAFORGE_MAX_GRID_COMBOS"
    if spec.config.strategy.name == "script" and limits.max_script_combos < max_combos:
        max_combos, what = limits.max_script_combos, "ALPHAFORGE_MAX_SCRIPT_COMBOS"
    if isinstance(spec.search, RandomSearch) and spec.search.budget > max_combos:
        raise ValidationFailed.for_field(
            "search.budget", f"{spec.search.budget:,} combos; at most {max_combos:,} ({what})"
        )
    c = combos(spec, declared)
    if len(c) > max_combos:
        raise ValidationFailed.for_field(
            "parameters",
            f"the grid has {len(c):,} valid combos; at most {max_combos:,} per optimisation "
            f"({what}): narrow the ranges, or use a random search with a budget",
        )
    return c
