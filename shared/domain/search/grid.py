"""A search's combos: each parameter's values (a list, or ``{start, stop, step}`` with ``stop`` inclusive) checked
against the strategy's own field rules, their cartesian product in parameter-name order without the combinations
the strategy rejects as a whole (dual SMA's ``fast >= slow``), or a seeded random sample of it; and the check that
a set of constraints can hold at all."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from shared.domain.backtest.strategies import REGISTRY
from shared.domain.search.spec import METRIC_DOMAIN, Constraint, OptimizationSpec, RandomSearch, Range
from shared.errors import ValidationFailed

MAX_RAW_GRID = 1_000_000
"""The cartesian product enumerated before combinations are checked (a random search samples from it)."""


def _field_adapter(strategy: str, name: str) -> TypeAdapter[Any]:
    info = REGISTRY[strategy].params.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)])  # type: ignore[arg-type]


def range_values(where: str, raw: list[float] | Range) -> list[float]:
    """A list as given, or a range's values (``stop`` inclusive); a 422 on ``where`` when empty or too long."""
    if isinstance(raw, Range):
        if raw.stop < raw.start:
            raise ValidationFailed.for_field(where, f"empty range: stop {raw.stop:g} is below start {raw.start:g}")
        count = math.floor((raw.stop - raw.start) / raw.step + 1e-9) + 1
        if count > MAX_RAW_GRID:
            raise ValidationFailed.for_field(where, f"{count:,} values; at most {MAX_RAW_GRID:,}")
        return [round(raw.start + i * raw.step, 10) for i in range(count)]
    return list(raw)


def parameter_values(strategy: str, name: str, raw: list[float] | Range) -> list[Any]:
    """One parameter's values (sorted, distinct), each checked against the strategy's own field rules."""
    where = f"parameters.{name}"
    params_model = REGISTRY[strategy].params
    if name not in params_model.model_fields:
        known = ", ".join(params_model.model_fields) or "none"
        raise ValidationFailed.for_field(where, f"unknown parameter of {strategy} (its parameters: {known})")
    values = range_values(where, raw)
    adapter = _field_adapter(strategy, name)
    is_int = params_model.model_fields[name].annotation is int
    out = set()
    for v in values:
        if is_int and float(v) != int(v):
            raise ValidationFailed.for_field(where, f"{v:g} is not a whole number ({name} is an integer)")
        try:
            out.add(adapter.validate_python(int(v) if is_int else float(v)))
        except PydanticValidationError as exc:
            raise ValidationFailed.for_field(where, f"{v:g}: {exc.errors()[0]['msg']}") from None
    return sorted(out)


@dataclass(frozen=True)
class Combos:
    names: tuple[str, ...]  # the optimised parameters, sorted
    values: list[tuple[Any, ...]]  # one tuple per combo, in combo-index order
    grid_size: int  # valid combos of the whole grid (random search samples from them)

    def params(self, index: int) -> dict[str, Any]:
        return dict(zip(self.names, self.values[index], strict=True))

    def __len__(self) -> int:
        return len(self.values)


def combos(spec: OptimizationSpec, script_axes: Sequence[Sequence[Any]] | None = None) -> Combos:
    """The spec's combos (deterministic): the valid grid, or the seeded sample of it. A script strategy's values
    come checked against its declared parameters (``script_axes``, one list per parameter in name order: see
    ``shared.jobs.optimizations.spec.combos``); a script has no cross-parameter rules."""
    strategy = spec.config.strategy.name
    names = tuple(spec.parameters)
    if strategy == "script":
        if script_axes is None:
            raise ValueError("a script strategy's combos need its declared parameters' values")
        axes = [list(a) for a in script_axes]
    else:
        axes = [parameter_values(strategy, n, spec.parameters[n]) for n in names]
    raw = math.prod(len(a) for a in axes)
    if raw > MAX_RAW_GRID:
        raise ValidationFailed.for_field(
            "parameters", f"the grid's cartesian product is {raw:,}; at most {MAX_RAW_GRID:,}"
        )
    base = spec.config.strategy.params.model_dump()
    valid: list[tuple[Any, ...]] = []
    if strategy == "script":
        valid = list(itertools.product(*axes))
    elif strategy == "dual_sma" and set(names) <= {"fast", "slow"}:  # the cross-field rule, without a model per combo
        for combo in itertools.product(*axes):
            p = {**base, **dict(zip(names, combo, strict=True))}
            if p["fast"] < p["slow"]:
                valid.append(combo)
    else:
        model = REGISTRY[strategy].params
        for combo in itertools.product(*axes):
            try:
                model.model_validate({**base, **dict(zip(names, combo, strict=True))})
            except PydanticValidationError:
                continue
            valid.append(combo)
    if not valid:
        raise ValidationFailed.for_field("parameters", f"no combination of these values is valid for {strategy}")
    chosen = valid
    if isinstance(spec.search, RandomSearch) and spec.search.budget < len(valid):
        rng = np.random.default_rng(spec.search.seed)
        picked = np.sort(rng.choice(len(valid), size=spec.search.budget, replace=False))
        chosen = [valid[int(i)] for i in picked]
    return Combos(names, chosen, len(valid))


def check_constraints(constraints: Sequence[Constraint]) -> None:
    """A 422 naming the constraint that can never hold (outside its metric's values, or against another)."""
    bounds = {m: [lo, hi, True, True] for m, (lo, hi) in METRIC_DOMAIN.items()}  # lo, hi, lo closed, hi closed
    for i, c in enumerate(constraints):
        b = bounds[c.metric]
        if c.op in (">=", ">"):
            if c.value > b[0] or (c.value == b[0] and c.op == ">"):
                b[0], b[2] = c.value, c.op == ">="
        elif c.value < b[1] or (c.value == b[1] and c.op == "<"):
            b[1], b[3] = c.value, c.op == "<="
        lo, hi, lo_closed, hi_closed = b
        if lo > hi or (lo == hi and not (lo_closed and hi_closed)):
            lo_, hi_ = METRIC_DOMAIN[c.metric]
            raise ValidationFailed.for_field(
                f"constraints[{i}]",
                f"{c.describe()} can never hold (with the constraints before it; {c.metric} lies in "
                f"[{lo_:g}, {hi_:g}])",
            )
