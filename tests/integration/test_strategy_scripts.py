"""Strategy scripts end to end: saved as kind ``strategy`` with declared parameters, backtested as a run
through the API and a real Celery worker (the sandbox once per shard, then the engine per symbol), compared with
the built-in strategy it reimplements; parameter and ownership errors; per-symbol errors for wrong series;
hostile strategy scripts contained as in the attack suite, with their security events."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, select

from shared.infra.db import make_session_factory
from shared.infra.models import BacktestRun, SecurityEvent
from shared.jobs.backtests import read as runs
from tests.attacks import RUNTIME_ATTACKS, Attack
from tests.helpers import FINAL, seed_bars

pytestmark = pytest.mark.usefixtures("celery_worker")

SCRIPTS = "/api/custom-calculations/scripts"
RUNS = "/api/runs"

DUAL_SMA = """
import ta
fast = ta.sma(close, params['fast'])
slow = ta.sma(close, params['slow'])
entries = ta.crossover(fast, slow)
exits = ta.crossunder(fast, slow)
warmup = params['slow'] - 1
"""
DUAL_SMA_PARAMETERS = {
    "fast": {"type": "int", "default": 10, "min": 1, "max": 500, "description": "fast SMA bars"},
    "slow": {"type": "int", "default": 20, "min": 2, "max": 500},
}
LONG_SHORT = DUAL_SMA + (
    "position = []\nside = 0.0\nfor up, down in zip(entries, exits):\n"
    "    side = 1.0 if up else (-1.0 if down else side)\n    position.append(side)\n"
    "del entries, exits\n"
)


def save_strategy(client: FlaskClient, code: str, name: str = "sma", parameters: Any = None) -> dict[str, Any]:
    body = {"name": name, "code": code, "kind": "strategy", "parameters": parameters or {}}
    response = client.post(SCRIPTS, json=body)
    assert response.status_code == 201, response.get_json()
    return dict(response.get_json())


def wait_for_run(client: FlaskClient, run_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = client.get(f"{RUNS}/{run_id}").get_json()
        if body["status"] in FINAL:
            return body
        assert time.monotonic() < deadline, f"run {run_id} not finished: {body['progress']}"
        time.sleep(0.05)


def submit(client: FlaskClient, body: dict[str, Any], status: int = 202) -> dict[str, Any]:
    response = client.post(RUNS, json=body)
    assert response.status_code == status, response.get_json()
    return dict(response.get_json())


def results(client: FlaskClient, run_id: str) -> dict[str, dict[str, Any]]:
    page = client.get(f"{RUNS}/{run_id}/results?limit=1000").get_json()
    return {row["symbol"]: row for row in page["results"]}


def trades(engine: Engine, run_id: str) -> dict[str, list[dict[str, Any]]]:
    import uuid

    with make_session_factory(engine)() as session:
        return {c.symbol: c.trades for c in runs.load_curves(session, uuid.UUID(run_id))}


def field_error(response: Any) -> str:
    assert response.status_code == 422, response.get_json()
    return str(response.get_json()["error"]["details"]["errors"][0]["field"])


SYMBOLS = [f"STR{i}" for i in range(6)]


def test_a_script_reimplementing_dual_sma_gives_the_built_in_trades_and_metrics(
    client: FlaskClient, engine: Engine
) -> None:
    seed_bars(engine, SYMBOLS, days=400, seed=21)
    script = save_strategy(client, DUAL_SMA, parameters=DUAL_SMA_PARAMETERS)
    assert script["kind"] == "strategy" and script["parameters"]["fast"]["default"] == 10
    common = {"symbols": SYMBOLS, "execution": {"fee_bps": 5, "slippage_bps": 2}}

    built_in = submit(client, common | {"strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 20}}})
    scripted = submit(client, common | {"strategy": {"name": "script", "script_id": script["script_id"],
                                                     "params": {"fast": 5}}})  # fmt: skip
    want, got = wait_for_run(client, built_in["run_id"]), wait_for_run(client, scripted["run_id"])
    assert want["status"] == got["status"] == "succeeded", got
    # Pinned at submission: the version, every parameter (the default slow = 20 written out).
    assert got["strategy"] == "script"
    assert got["config"]["strategy"] == {"name": "script", "script_id": script["script_id"], "version": 1,
                                         "params": {"fast": 5, "slow": 20}}  # fmt: skip

    want_rows, got_rows = results(client, built_in["run_id"]), results(client, scripted["run_id"])
    assert set(got_rows) == set(SYMBOLS)
    for symbol in SYMBOLS:
        assert got_rows[symbol]["error"] is None
        assert got_rows[symbol]["metrics"] == want_rows[symbol]["metrics"], symbol
    want_trades, got_trades = trades(engine, built_in["run_id"]), trades(engine, scripted["run_id"])
    assert got_trades == want_trades and sum(len(t) for t in got_trades.values()) > 10
    assert got["portfolio"] == want["portfolio"]

    # The same config spelled with the version and the default: the same run (the hash is of the pinned config).
    again = submit(client, common | {"strategy": {"name": "script", "script_id": script["script_id"], "version": 1,
                                                  "params": {"fast": 5, "slow": 20}}}, status=200)  # fmt: skip
    assert again["run_id"] == scripted["run_id"]
    # A new version is pinned when no version is given; the old one stays runnable and is another run.
    assert client.put(f"{SCRIPTS}/{script['script_id']}", json={"code": DUAL_SMA + "\n# v2\n"}).status_code == 200
    v2 = submit(
        client, common | {"strategy": {"name": "script", "script_id": script["script_id"], "params": {"fast": 5}}}
    )
    assert v2["run_id"] != scripted["run_id"]
    assert client.get(f"{RUNS}/{v2['run_id']}").get_json()["config"]["strategy"]["version"] == 2
    with engine.connect() as conn:
        code = conn.scalar(select(BacktestRun.strategy_code).where(BacktestRun.job_id == v2["run_id"]))
    assert code is not None and code.endswith("# v2\n")
    wait_for_run(client, v2["run_id"])


def test_a_position_series_strategy_trades_long_and_short(client: FlaskClient, engine: Engine) -> None:
    seed_bars(engine, SYMBOLS[:3], days=400, seed=5)
    script = save_strategy(client, LONG_SHORT, parameters=DUAL_SMA_PARAMETERS)
    common = {"symbols": SYMBOLS[:3], "execution": {"allow_short": True}}
    built_in = submit(client, common | {"strategy": {"name": "dual_sma", "params": {"fast": 4, "slow": 15}}})
    scripted = submit(client, common | {"strategy": {"name": "script", "script_id": script["script_id"],
                                                     "params": {"fast": 4, "slow": 15}}})  # fmt: skip
    assert wait_for_run(client, scripted["run_id"])["status"] == "succeeded"
    wait_for_run(client, built_in["run_id"])
    want_rows, got_rows = results(client, built_in["run_id"]), results(client, scripted["run_id"])
    assert {s: r["metrics"] for s, r in got_rows.items()} == {s: r["metrics"] for s, r in want_rows.items()}
    got_trades = trades(engine, scripted["run_id"])
    assert got_trades == trades(engine, built_in["run_id"])
    assert any(t["size"] < 0 for ts in got_trades.values() for t in ts)  # it did go short
    # Without allow_short a short target is each symbol's error naming the problem.
    flat = submit(client, {"symbols": SYMBOLS[:3], "strategy": {"name": "script", "script_id": script["script_id"],
                                                                "params": {"fast": 4, "slow": 15}}})  # fmt: skip
    assert wait_for_run(client, flat["run_id"])["status"] == "failed"
    for row in results(client, flat["run_id"]).values():
        assert row["error"]["type"] == "SignalError" and "allow_short" in row["error"]["message"]


def test_a_script_that_peeks_at_the_next_close_still_fills_on_the_next_bar(client: FlaskClient, engine: Engine) -> None:
    """The script reads close[t + 1] to decide on bar t (a cheat the engine cannot see), yet its entry is filled
    at bar t + 1's open, never at bar t: next-bar fills are the engine's."""
    seed_bars(engine, ["PEEK"], days=120, seed=3)
    peek = (
        "n = len(close)\n"
        "entries = [close[t + 1] > close[t] * 1.01 if t + 1 < n else False for t in range(n)]\n"
        "exits = [close[t + 1] < close[t] if t + 1 < n else False for t in range(n)]\n"
    )
    script = save_strategy(client, peek, name="peek")
    run = submit(client, {"symbol": "PEEK", "strategy": {"name": "script", "script_id": script["script_id"]}})
    assert wait_for_run(client, run["run_id"])["status"] == "succeeded"
    with engine.connect() as conn:
        from shared.marketdata.bars import load_bars

        bars = load_bars(conn, ["PEEK"], None, None)["PEEK"]
    made = trades(engine, run["run_id"])["PEEK"]
    assert made
    for trade in made:
        t = trade["entry_bar"]
        assert trade["entry_price"] == bars.open[t]  # filled at the open of the bar after the decision
        assert bars.close[t] > bars.close[t - 1] * 1.01  # the script decided on bar t - 1 by peeking at close[t]


def test_parameter_and_ownership_errors_are_422_naming_the_field(
    client: FlaskClient, other_client: FlaskClient, engine: Engine
) -> None:
    seed_bars(engine, ["PRM"], days=60)
    mine = save_strategy(client, DUAL_SMA, parameters=DUAL_SMA_PARAMETERS)
    theirs = save_strategy(other_client, DUAL_SMA, parameters=DUAL_SMA_PARAMETERS)
    calc = client.post(SCRIPTS, json={"name": "calc", "code": "result = close[-1]"}).get_json()
    assert calc["kind"] == "calculation"

    def run(strategy: dict[str, Any]) -> Any:
        return client.post(RUNS, json={"symbol": "PRM", "strategy": {"name": "script", **strategy}})

    assert field_error(run({"script_id": theirs["script_id"]})) == "strategy.script_id"
    assert field_error(run({"script_id": "7b0c3a4e-1111-4222-8333-944455556666"})) == "strategy.script_id"
    assert field_error(run({"script_id": calc["script_id"]})) == "strategy.script_id"
    assert field_error(run({"script_id": mine["script_id"], "version": 9})) == "strategy.version"
    for params, name in [({"fastest": 3}, "fastest"), ({"fast": 0}, "fast"), ({"fast": 2.5}, "fast"),
                         ({"slow": True}, "slow"), ({"fast": 501}, "fast")]:  # fmt: skip
        assert field_error(run({"script_id": mine["script_id"], "params": params})) == f"strategy.params.{name}"
    assert run({"script_id": "not-a-uuid"}).status_code == 422
    # ...and a strategy is no calculation: it assigns no result.
    calculation = {"script_id": mine["script_id"], "stock_symbols": ["PRM"], "column_name": "c"}
    assert field_error(client.post("/api/custom-calculations/execute", json=calculation)) == "script_id"

    # Saving: bad declarations name the parameter; a calculation declares none; a strategy is never nightly.
    bad = {"name": "bad", "code": DUAL_SMA, "kind": "strategy"}
    assert field_error(client.post(SCRIPTS, json=bad | {"parameters": {"fast": {"type": "int", "default": "x"}}})
                       ).startswith("parameters.fast")  # fmt: skip
    assert field_error(client.post(SCRIPTS, json=bad | {"kind": "calculation", "parameters": {
        "a": {"type": "int", "default": 1}}})) == "parameters"  # fmt: skip
    assert field_error(client.post(SCRIPTS, json=bad | {"nightly": True, "universe": ["PRM"]})) == "nightly"
    # Changing declarations makes a version of their own; a run pinned to version 1 keeps version 1's.
    changed = client.put(f"{SCRIPTS}/{mine['script_id']}", json={"parameters": {"fast": {"type": "int",
                         "default": 3}, "slow": {"type": "int", "default": 9}}})  # fmt: skip
    assert changed.status_code == 200 and changed.get_json()["version"] == 2
    v1 = client.get(f"{SCRIPTS}/{mine['script_id']}/versions/1").get_json()
    assert v1["parameters"] == mine["parameters"]
    ok = run({"script_id": mine["script_id"], "version": 1})
    assert ok.status_code == 202 and wait_for_run(client, ok.get_json()["run_id"])["config"]["strategy"]["params"] == {
        "fast": 10, "slow": 20}  # fmt: skip


WRONG_SERIES = """
n = len(close) - 1 if symbol == 'SHORTER' else len(close)
entries = tuple(c > o for c, o in zip(close, open))[:n]
exits = tuple(not e for e in entries)
if symbol == 'INTS':
    exits = tuple(1 if e else 0 for e in exits)
"""


def test_wrong_length_or_type_is_the_symbol_s_error(client: FlaskClient, engine: Engine) -> None:
    bars = seed_bars(engine, ["SHORTER", "INTS", "FINE"], days=80)
    script = save_strategy(client, WRONG_SERIES, name="wrong")
    run = submit(client, {"symbols": ["SHORTER", "INTS", "FINE"], "strategy": {"name": "script",
                          "script_id": script["script_id"]}})  # fmt: skip
    view = wait_for_run(client, run["run_id"])
    assert view["status"] == "partial"
    rows = results(client, run["run_id"])
    n = len(bars["SHORTER"])
    assert rows["SHORTER"]["error"] == {
        "type": "SignalError",
        "message": f"entries has {n - 1:,} values; expected {n:,} (one per bar)",
        "line": None,
    }
    assert (
        rows["INTS"]["error"]["message"].startswith("exits[") and "is int, not bool" in rows["INTS"]["error"]["message"]
    )
    assert rows["FINE"]["error"] is None and rows["FINE"]["metrics"]["# Trades"] > 0
    job = client.get(f"/api/jobs/{run['run_id']}").get_json()
    assert job["rejections"]["by_reason"] == {"result.invalid_signals": 2}, job["rejections"]


# --- hostile strategy scripts ------------------------------------------------------------------------------------

SIGNALS = "entries = tuple(c > o for c, o in zip(close, open))\nexits = tuple(not e for e in entries)\n"


def strategy_form(attack: Attack) -> Attack:
    """A calculation attack (EVIL attacks, every symbol then returns a result) as a strategy: the same attack,
    then signals."""
    return Attack(attack.name, attack.script + SIGNALS, attack.error, attack.incident, attack.message)


REUSED = {
    "str.format traversal", "AttributeError.obj", "type.mro walk", "import os", "import subprocess",
    "import numpy directly", "statistics leaks sys", "ta facade hides numpy", "open is the bar series, not a file",
    "bare except swallowing the deadline", "int power bomb", "endless sorting", "list repeat", "growing list",
    "left shift", "huge range", "unbounded recursion", "print flood", "fake protocol lines",
    "huge exception message", "address leak through repr", "mutating the input series",
}  # fmt: skip


def evil(code: str) -> str:
    """``code`` for EVIL; honest signals for every other symbol."""
    indent = "\n".join("    " + line for line in code.strip("\n").splitlines())
    honest = "\n".join("    " + line for line in SIGNALS.strip("\n").splitlines())
    return f"if symbol == 'EVIL':\n{indent}\nelse:\n{honest}\n"


STRATEGY_ATTACKS = [strategy_form(a) for a in RUNTIME_ATTACKS if a.name in REUSED] + [
    Attack("entries of objects with a truth value", evil("entries = [[1]] * len(close)\nexits = [()] * len(close)"),
           "SignalError", ("result", "invalid_signals"), "entries[0] is list, not bool"),
    Attack("numpy-like fake: a dict indexed like a series",
           evil("entries = {i: True for i in range(len(close))}\nexits = entries"), "SignalError",
           ("result", "invalid_signals"), "not dict"),
    Attack("numpy-like fake: a range", evil("entries = range(len(close))\nexits = entries"), "SignalError",
           ("result", "invalid_signals"), "not range"),
    Attack("a generator for entries", evil("entries = (c > 0 for c in close)\nexits = entries"), "SignalError",
           ("result", "invalid_signals"), "not generator"),
    Attack("None in a position", evil("position = [None] * len(close)"), "SignalError", ("result", "invalid_signals"),
           "position[0] is NoneType, not a number"),
    Attack("huge output: ten million entries", evil("entries = (True,) * 10**7\nexits = entries"), "SignalError",
           ("result", "invalid_signals"), "entries has 10,000,000 values"),
    Attack("huge output: an 80 MB position", evil("position = [0.5] * 10**7"), "SignalError",
           ("result", "invalid_signals"), "position has 10,000,000 values"),
    Attack("infinite loop in a strategy", evil("while True:\n    pass"), "TimeoutError",
           ("supervisor", "wall_clock_timeout")),
    Attack("memory bomb in a strategy", evil("x = [0] * 10**9"), "MemoryError", ("process", "memory_limit")),
    Attack("escape via import in a strategy", evil("import os\nentries = exits = ()"), "SecurityViolation",
           ("language", "policy_violation")),
    # State must not leak from EVIL (first in the shard) to GOOD: a leak would give GOOD empty exits.
    Attack("mutating params for the next symbol",
           SIGNALS + "if symbol == 'EVIL':\n    params['poison'] = 1\nif 'poison' in params and symbol != 'EVIL':\n"
           "    exits = ()\n", None),
    Attack("globals leaking to the next symbol",
           SIGNALS + "try:\n    poisoned\n    exits = ()\nexcept NameError:\n    pass\npoisoned = 1\n", None),
]  # fmt: skip


@pytest.mark.parametrize("attack", STRATEGY_ATTACKS, ids=lambda a: a.name)
def test_hostile_strategy_script_is_contained(
    attack: Attack, client: FlaskClient, engine: Engine, celery_worker: subprocess.Popen[bytes]
) -> None:
    seed_bars(engine, ["EVIL", "GOOD"], days=60)
    script = save_strategy(client, attack.script, name="attack")
    run = submit(client, {"symbols": ["EVIL", "GOOD"], "strategy": {"name": "script",
                          "script_id": script["script_id"]}})  # fmt: skip
    view = wait_for_run(client, run["run_id"])
    rows = results(client, run["run_id"])
    good, evil = rows["GOOD"], rows["EVIL"]
    assert good["error"] is None and good["metrics"]["# Trades"] > 0, good
    if attack.error is None:
        assert view["status"] == "succeeded" and evil["error"] is None
    else:
        assert view["status"] == "partial", view
        assert evil["metrics"] is None and evil["error"]["type"] == attack.error, evil
        assert len(evil["error"]["message"]) <= 2_000
        if attack.message:
            assert attack.message in evil["error"]["message"], evil
    if attack.incident is not None:
        with engine.connect() as conn:
            events = conn.execute(
                select(SecurityEvent.layer, SecurityEvent.reason, SecurityEvent.symbol, SecurityEvent.job_id)
            ).all()
        assert (*attack.incident, "EVIL") in [(e.layer, e.reason, e.symbol) for e in events], events
        assert all(str(e.job_id) == run["run_id"] and e.symbol == "EVIL" for e in events)
    assert celery_worker.poll() is None, "the worker died"


# --- validation re-runs the script ---------------------------------------------------------------------------


def test_validation_of_a_script_strategy_equals_the_built_in_s(client: FlaskClient, engine: Engine) -> None:
    """Permutation (the permuted bars through the sandbox, in batches), Monte Carlo (the kept signals under
    shocked costs) and bootstrap of the script's run give the built-in dual_sma's numbers exactly."""
    symbols = ["VAL0", "VAL1", "VAL2"]
    seed_bars(engine, symbols, days=300, seed=8)
    script = save_strategy(client, DUAL_SMA, parameters=DUAL_SMA_PARAMETERS)
    validation = {"permutation": {"n": 30}, "monte_carlo": {"n": 12}, "bootstrap": {"n": 50}, "chunk": 15}
    common = {"symbols": symbols, "seed": 7, "execution": {"fee_bps": 3}, "validation": validation}
    params = {"fast": 5, "slow": 20}
    built_in = submit(client, common | {"strategy": {"name": "dual_sma", "params": params}})
    scripted = submit(client, common | {"strategy": {"name": "script", "script_id": script["script_id"],
                                                     "params": params}})  # fmt: skip
    want, got = wait_for_run(client, built_in["run_id"]), wait_for_run(client, scripted["run_id"])
    assert got["status"] == "succeeded", got
    want_methods, got_methods = want["validation"]["result"]["methods"], got["validation"]["result"]["methods"]
    assert got_methods["permutation"]["draws"] == 30 and got_methods["permutation"]["complete"]
    assert got_methods == want_methods

    # Walk-forward re-optimises dual_sma's grid: not for scripts. The permutation test is bounded by config.
    response = client.post(RUNS, json=common | {"strategy": {"name": "script", "script_id": script["script_id"]},
                                                "validation": {"walk_forward": {}}})  # fmt: skip
    assert field_error(response) == "validation.walk_forward"
    response = client.post(RUNS, json=common | {"strategy": {"name": "script", "script_id": script["script_id"]},
                                                "validation": {"permutation": {"n": 10_000}}})  # fmt: skip
    assert field_error(response) == "validation.permutation.n"
    assert "ALPHAFORGE_MAX_SCRIPT_VALIDATION_BACKTESTS" in response.get_json()["error"]["message"]
