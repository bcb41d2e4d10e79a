"""Saved universes and presets end to end: CRUD, ownership, validation, audit, and runs made from them (real
worker)."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import Engine, select

from shared.infra.models import AuditLog, BacktestRun
from tests.helpers import seed_bars, wait_for_job

UNIVERSES = "/api/universes"
PRESETS = "/api/presets"
RUNS = "/api/runs"
DUAL_SMA = {"strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 20}}, "execution": {"fee_bps": 2}}


def error_of(response: Any, status: int, code: str = "validation_error") -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]


def fields_of(response: Any, status: int = 422) -> list[str]:
    details = error_of(response, status)["details"]
    return [e["field"] for e in details["errors"]] if "errors" in details else [details["field"]]


def actions(engine: Engine, resource_type: str) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(AuditLog.action).where(AuditLog.resource_type == resource_type).order_by(AuditLog.id)
        ).scalars()
        return list(rows)


# --- universes ----------------------------------------------------------------------------------------------------


def test_universe_crud_ownership_and_audit(
    client: FlaskClient, other_client: FlaskClient, admin_client: FlaskClient, user: Any, engine: Engine
) -> None:
    seed_bars(engine, ["UNA", "UNB", "UNC"], days=30)
    response = client.post(UNIVERSES, json={"name": "tech", "symbols": ["una", "UNB", "UNA", " unc "]})
    assert response.status_code == 201, response.get_json()
    created = response.get_json()
    url = f"{UNIVERSES}/{created['universe_id']}"
    assert response.headers["Location"] == url == created["url"]
    assert created["symbols"] == ["UNA", "UNB", "UNC"] and created["version"] == 1 and created["owner_id"] == user.id
    assert client.get(url).get_json() == created

    # A name is unique per user, not across users.
    error_of(client.post(UNIVERSES, json={"name": "tech", "symbols": ["UNA"]}), 409, "conflict")
    assert other_client.post(UNIVERSES, json={"name": "tech", "symbols": ["UNA"]}).status_code == 201

    updated = client.put(url, json={"symbols": ["UNC", "UNA"], "expected_version": 1}).get_json()
    assert updated["symbols"] == ["UNC", "UNA"] and updated["version"] == 2
    assert error_of(client.put(url, json={"name": "x", "expected_version": 1}), 409, "conflict")["details"] == {
        "field": "expected_version",
        "version": 2,
    }
    same = client.put(url, json={"symbols": ["UNC", "UNA"]}).get_json()
    assert same["version"] == 2 and same["updated_at"] == updated["updated_at"]

    # Someone else's universe does not exist for them; an admin may read it, not change it.
    for response in (other_client.get(url), other_client.put(url, json={"name": "mine"}), other_client.delete(url)):
        error_of(response, 404, "not_found")
    assert admin_client.get(url).status_code == 200
    error_of(admin_client.delete(url), 403, "forbidden")
    error_of(client.get(f"{UNIVERSES}/not-a-uuid"), 404, "not_found")

    assert client.delete(url).status_code == 204
    error_of(client.get(url), 404, "not_found")
    assert actions(engine, "universe") == ["universe.create", "universe.create", "universe.update", "universe.delete"]


def test_universe_validation_and_paging(client: FlaskClient, other_client: FlaskClient, engine: Engine) -> None:
    seed_bars(engine, ["VA", "VB"], days=10)
    assert fields_of(client.post(UNIVERSES, json={"name": "u", "symbols": ["VA", "NOPE", "VB", "ZZZ"]})) == [
        "symbols[1]",
        "symbols[3]",
    ]
    assert fields_of(client.post(UNIVERSES, json={"name": "u", "symbols": ["VA", "bad sym!"]})) == ["symbols[1]"]
    assert fields_of(client.post(UNIVERSES, json={"name": "u", "symbols": ["VA", 7]})) == ["symbols[1]"]
    assert fields_of(client.post(UNIVERSES, json={"name": "u", "symbols": []})) == ["symbols"]
    assert fields_of(client.post(UNIVERSES, json={"name": "  ", "symbols": ["VA"]})) == ["name"]
    assert fields_of(client.post(UNIVERSES, json={"name": "u", "symbols": ["VA"], "colour": 1})) == ["colour"]
    assert fields_of(client.post(UNIVERSES, json={"symbols": ["VA"]})) == ["name"]
    assert fields_of(client.put(f"{UNIVERSES}/{'0' * 32}", json={})) == ["body"]

    names = ["b2", "a1", "c3", "a2", "a_%"]
    for name in names:
        assert client.post(UNIVERSES, json={"name": name, "symbols": ["VA"]}).status_code == 201
    other_client.post(UNIVERSES, json={"name": "a0", "symbols": ["VB"]})
    seen, cursor = [], None
    while True:
        page = client.get(f"{UNIVERSES}?limit=2" + (f"&cursor={cursor}" if cursor else "")).get_json()
        assert len(page["universes"]) <= 2
        seen += [u["name"] for u in page["universes"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(names)
    assert [u["name"] for u in client.get(f"{UNIVERSES}?name_prefix=a_").get_json()["universes"]] == ["a_%"]
    assert client.get(f"{UNIVERSES}?limit=1").get_json()["universes"][0]["size"] == 1
    assert fields_of(client.get(f"{UNIVERSES}?cursor=garbage")) == ["cursor"]
    error_of(client.get(f"{UNIVERSES}?owner_id=someone"), 403, "forbidden")


def test_universe_size_is_capped(client: FlaskClient, flask_app: Any) -> None:
    limit = flask_app.extensions["alphaforge"].settings.max_symbols_per_job
    symbols = [f"S{i}" for i in range(limit + 1)]
    assert fields_of(client.post(UNIVERSES, json={"name": "big", "symbols": symbols})) == ["symbols"]


# --- presets ------------------------------------------------------------------------------------------------------


def test_preset_crud_idempotent_create_and_validation(
    client: FlaskClient, other_client: FlaskClient, engine: Engine
) -> None:
    response = client.post(PRESETS, json={"name": "fast sma", "config": DUAL_SMA})
    assert response.status_code == 201 and response.headers["Idempotent-Replayed"] == "false"
    preset = response.get_json()
    url = preset["url"]
    assert response.headers["Location"] == url and preset["strategy"] == "dual_sma"
    # Stored with every default spelled out, without symbols.
    assert preset["config"]["initial_cash"] == 10_000.0 and "symbols" not in preset["config"]
    assert preset["config"]["strategy"]["params"]["fast"] == 5

    # The same name and config (spelled differently: defaults given explicitly) finds it.
    again = client.post(PRESETS, json={"name": "fast sma", "config": {**DUAL_SMA, "initial_cash": 10_000}})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == preset
    # The same name with another config is a conflict on the name.
    other = client.post(PRESETS, json={"name": "fast sma", "config": {**DUAL_SMA, "initial_cash": 5_000}})
    assert error_of(other, 409, "conflict")["details"]["field"] == "name"
    assert other_client.post(PRESETS, json={"name": "fast sma", "config": DUAL_SMA}).status_code == 201

    # Every config field is checked by the engine's schema, named under config.
    bad = {"strategy": {"name": "dual_sma", "params": {"fast": 50, "slow": 20}}}
    assert fields_of(client.post(PRESETS, json={"name": "b", "config": bad}))[0].startswith("config.strategy")
    assert fields_of(client.post(PRESETS, json={"name": "b", "config": {"strategy": {"name": "nope"}}}))[0].startswith(
        "config.strategy"
    )
    assert fields_of(client.post(PRESETS, json={"name": "b", "config": {**DUAL_SMA, "initial_cash": -1}})) == [
        "config.initial_cash"
    ]
    assert fields_of(client.post(PRESETS, json={"name": "b", "config": {**DUAL_SMA, "symbols": ["X"]}})) == [
        "config.symbols"
    ]
    assert fields_of(client.post(PRESETS, json={"name": "b", "config": {**DUAL_SMA, "colour": 1}})) == ["config.colour"]
    assert fields_of(client.post(PRESETS, json={"name": "b", "config": []})) == ["config"]

    updated = client.put(url, json={"config": {**DUAL_SMA, "initial_cash": 20_000}, "expected_version": 1})
    assert updated.status_code == 200, updated.get_json()
    assert updated.get_json()["version"] == 2 and updated.get_json()["config"]["initial_cash"] == 20_000
    assert updated.get_json()["config_hash"] != preset["config_hash"]
    error_of(client.put(url, json={"name": "x", "expected_version": 1}), 409, "conflict")
    for response in (other_client.get(url), other_client.put(url, json={"name": "z"}), other_client.delete(url)):
        error_of(response, 404, "not_found")
    listed = client.get(f"{PRESETS}?limit=1").get_json()
    assert [p["name"] for p in listed["presets"]] == ["fast sma"] and listed["next_cursor"] is None
    assert client.delete(url).status_code == 204
    error_of(client.get(url), 404, "not_found")
    assert actions(engine, "preset") == ["preset.create", "preset.create", "preset.update", "preset.delete"]


# --- runs from universes and presets ------------------------------------------------------------------------------


def run_config(engine: Engine, run_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        config: dict[str, Any] = conn.execute(
            select(BacktestRun.config).where(BacktestRun.job_id == run_id)
        ).scalar_one()
        return config


def test_runs_over_a_saved_universe_and_from_a_preset(
    client: FlaskClient, other_client: FlaskClient, engine: Engine, celery_worker: Any
) -> None:
    symbols = ["RUA", "RUB", "RUC"]
    seed_bars(engine, symbols, days=120, seed=5)
    universe = client.post(UNIVERSES, json={"name": "three", "symbols": symbols}).get_json()
    preset = client.post(PRESETS, json={"name": "sma", "config": DUAL_SMA}).get_json()

    # Over a universe by name: the config holds its symbols, so the same run by id or by listing them is the same.
    by_name = client.post(RUNS, json={"universe": "three", **DUAL_SMA})
    assert by_name.status_code == 202, by_name.get_json()
    run_id = by_name.get_json()["run_id"]
    assert by_name.get_json()["symbols"] == 3 and run_config(engine, run_id)["symbols"] == symbols
    by_id = client.post(RUNS, json={"universe": universe["universe_id"], **DUAL_SMA})
    assert by_id.status_code == 200 and by_id.headers["Idempotent-Replayed"] == "true"
    assert by_id.get_json()["run_id"] == run_id
    listed = client.post(RUNS, json={"symbols": symbols, **DUAL_SMA})
    assert listed.status_code == 200 and listed.get_json()["run_id"] == run_id
    finished = wait_for_job(client, run_id)
    assert finished["status"] == "succeeded" and finished["progress"]["symbols_done"] == 3

    # From a preset over the same universe: the same config again, so the same run.
    from_preset = client.post(RUNS, json={"preset": preset["preset_id"], "universe": "three"})
    assert from_preset.status_code == 200 and from_preset.get_json()["run_id"] == run_id
    # Overrides merge into the preset: a nested field changes, its siblings stay.
    merged = client.post(RUNS, json={"preset": "sma", "symbols": ["RUA"], "strategy": {"params": {"fast": 7}}})
    assert merged.status_code == 202, merged.get_json()
    config = run_config(engine, merged.get_json()["run_id"])
    assert config["strategy"] == {"name": "dual_sma", "params": {"fast": 7, "slow": 20}}
    assert config["execution"]["fee_bps"] == 2 and config["symbols"] == ["RUA"]
    # Another strategy replaces the preset's strategy whole (its parameters would not fit).
    other = client.post(RUNS, json={"preset": "sma", "symbol": "RUB", "strategy": {"name": "buy_and_hold"}})
    assert other.status_code == 202, other.get_json()
    assert run_config(engine, other.get_json()["run_id"])["strategy"]["name"] == "buy_and_hold"
    assert wait_for_job(client, merged.get_json()["run_id"])["status"] == "succeeded"
    assert wait_for_job(client, other.get_json()["run_id"])["status"] == "succeeded"

    # Bad references and combinations are 422s naming the field; someone else's universe or preset is unknown.
    assert fields_of(client.post(RUNS, json={"universe": "nope", **DUAL_SMA})) == ["universe"]
    assert fields_of(client.post(RUNS, json={"universe": "three", "symbols": ["RUA"], **DUAL_SMA})) == ["universe"]
    assert fields_of(client.post(RUNS, json={"universe": 5, **DUAL_SMA})) == ["universe"]
    assert fields_of(client.post(RUNS, json={"preset": "nope", "symbols": ["RUA"]})) == ["preset"]
    assert fields_of(other_client.post(RUNS, json={"universe": universe["universe_id"], **DUAL_SMA})) == ["universe"]
    assert fields_of(other_client.post(RUNS, json={"preset": preset["preset_id"], "symbols": ["RUA"]})) == ["preset"]
    assert fields_of(client.post(RUNS, json={"preset": "sma"})) == ["symbols"]
    bad = client.post(RUNS, json={"preset": "sma", "symbols": ["RUA"], "strategy": {"params": {"fast": 50}}})
    assert fields_of(bad)[0].startswith("strategy")
    inverted = client.post(RUNS, json={"preset": "sma", "symbols": ["RUA"], "start_date": "2023-05-01",
                                        "end_date": "2023-02-01"})  # fmt: skip
    assert fields_of(inverted) == ["end_date"]

    # A universe changed later does not change the runs made over it.
    assert client.put(universe["url"], json={"symbols": ["RUA"]}).status_code == 200
    assert run_config(engine, run_id)["symbols"] == symbols
