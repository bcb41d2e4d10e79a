"""Bad input never gets a 500: every field of a valid body for each create endpoint (runs with validation, a run of
a strategy script, optimisations, presets, universes) is deleted or replaced by hostile values (wrong types, huge
numbers and strings, NUL, nesting), and each answer must be a 2xx or a 4xx in the one error shape."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine

from api.ratelimit import reset_rate_limits
from tests.helpers import seed_bars

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

HOSTILE: list[Any] = [
    None, -1, 0, 2.5, 10**30, 1e308, -1e308, True, "", "x", "\u0000", "9" * 5000, "2024-13-45",
    [], [1, 2], [None] * 3, {}, {"a": 1}, {"start": 1, "stop": 10**9, "step": 1e-9},
]  # fmt: skip

STRATEGY_SCRIPT = (
    "entries = tuple(c > o for c, o in zip(close, open))\nexits = tuple(c < o for c, o in zip(close, open))"
)


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if prefix:
        yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from paths(value, (*prefix, key))


def variants(doc: Any, path: tuple[Any, ...]) -> Iterator[Any]:
    for value in [KeyError, *HOSTILE]:
        new = copy.deepcopy(doc)
        parent = new
        for key in path[:-1]:
            parent = parent[key]
        if value is KeyError:
            parent.pop(path[-1])
        else:
            parent[path[-1]] = value
        yield new


def test_no_body_gets_a_server_error(client: FlaskClient, engine: Engine) -> None:
    seed_bars(engine, ["HBA", "HBB"], days=80)
    script = client.post(
        "/api/custom-calculations/scripts",
        json={"name": "s", "code": STRATEGY_SCRIPT, "kind": "strategy",
              "parameters": {"n": {"type": "int", "default": 3, "min": 1, "max": 10}}},
    ).get_json()  # fmt: skip
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("/api/runs", {
            "symbols": ["HBA", "HBB"], "strategy": {"name": "dual_sma", "params": {"fast": 3, "slow": 10}},
            "validation": {"permutation": {"n": 10}, "bootstrap": {"n": 20},
                           "walk_forward": {"in_sample": 50, "out_of_sample": 10, "fast": [3], "slow": [10]}},
            "name": "n", "start_date": "2020-01-01", "execution": {"fee_bps": 5, "slippage_bps": 1},
        }),
        ("/api/runs", {"symbol": "HBA", "strategy": {"name": "script", "script_id": script["script_id"],
                                                     "params": {"n": 2}}}),
        ("/api/optimizations", {
            "symbols": ["HBA", "HBB"], "strategy": "dual_sma", "execution": {"fee_bps": 10},
            "parameters": {"fast": {"start": 3, "stop": 9, "step": 2}, "slow": [10, 20]},
            "objective": {"metric": "sharpe", "direction": "max"},
            "constraints": [{"metric": "trades", "op": ">=", "value": 1}],
            "search": {"method": "random", "budget": 3, "seed": 1},
            "walk_forward": {"in_sample": 30, "out_of_sample": 10},
        }),
        ("/api/presets", {"name": "p", "config": {"strategy": {"name": "dual_sma"}, "execution": {"fee_bps": 1}}}),
        ("/api/universes", {"name": "u", "symbols": ["HBA", "HBB"]}),
    ]  # fmt: skip
    codes: dict[int, int] = {}
    server_errors = []
    for url, base in bodies:
        reset_rate_limits(client.application)
        assert client.post(url, json=base).status_code in (200, 201, 202), (url, client.post(url, json=base).json)
        for path in paths(base):
            for body in variants(base, path):
                reset_rate_limits(client.application)  # each body must meet validation, not the rate limit
                response = client.post(url, json=body)
                codes[response.status_code] = codes.get(response.status_code, 0) + 1
                if response.status_code >= 500:
                    server_errors.append((url, path, response.get_data(as_text=True)[:200]))
                elif response.status_code >= 400:
                    error = response.get_json()["error"]
                    assert set(error) == {"code", "message", "details"}, (url, path, error)
                for key, kind in (("run_id", "runs"), ("optimization_id", "optimizations")):
                    if key in (response.get_json() or {}):  # keep the active-jobs quota free
                        client.post(f"/api/{kind}/{response.get_json()[key]}/cancel")
    assert not server_errors, server_errors[:5]
    assert sum(codes.values()) > 1000 and codes.get(422, 0) > 900, codes  # the bodies did reach validation
