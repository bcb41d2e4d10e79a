"""Run artifacts end to end (real worker): files, manifest hashes, the per-owner chain, tamper detection."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import struct
import time
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import Engine, select, update

from shared.infra.models import RunManifest
from tests.helpers import seed_bars

RUNS = "/api/runs"


def wait_for_artifacts(client: FlaskClient, run_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        view: dict[str, Any] = client.get(f"{RUNS}/{run_id}/artifacts").get_json()
        if view["status"] == "ready":
            return view
        assert view["status"] == "pending", view
        assert time.monotonic() < deadline, f"no artifacts for {run_id} after {timeout_s} s"
        time.sleep(0.05)


def submit(client: FlaskClient, symbols: list[str], fast: int = 5) -> str:
    body = {"symbols": symbols, "strategy": {"name": "dual_sma", "params": {"fast": fast, "slow": 25}},
            "execution": {"fee_bps": 3}}  # fmt: skip
    response = client.post(RUNS, json=body)
    assert response.status_code == 202, response.get_json()
    run_id: str = response.get_json()["run_id"]
    return run_id


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_artifacts_manifest_chain_and_tampering(
    client: FlaskClient, other_client: FlaskClient, engine: Engine, celery_worker: Any
) -> None:
    symbols = ["ART1", "ART2", "ART3"]
    seed_bars(engine, symbols, days=260, seed=21)
    first = submit(client, symbols)
    view = wait_for_artifacts(client, first)
    run = client.get(f"{RUNS}/{first}").get_json()
    assert run["status"] == "succeeded" and run["links"]["artifacts"] == f"{RUNS}/{first}/artifacts"
    names = [f["name"] for f in view["files"]]
    assert names == ["chart.png", "equity.csv", "metrics.json", "trades.csv"]
    assert view["chain_prev"] is None  # the owner's first manifest

    downloaded = {}
    for entry in view["files"]:
        response = client.get(entry["url"])
        assert response.status_code == 200 and response.mimetype == entry["media_type"]
        downloaded[entry["name"]] = response.data
        assert len(response.data) == entry["size"]
        assert hashlib.sha256(response.data).hexdigest() == entry["sha256"]
    manifest_bytes = client.get(view["manifest_url"]).data
    manifest = json.loads(manifest_bytes)
    assert hashlib.sha256(manifest_bytes).hexdigest() == view["manifest_sha256"]
    assert manifest["files"] == [{k: f[k] for k in ("name", "size", "sha256")} for f in view["files"]]

    # The contents agree with the run.
    results = client.get(f"{RUNS}/{first}/results").get_json()["results"]
    metrics = json.loads(downloaded["metrics.json"])
    assert metrics["config_hash"] == run["config_hash"] and metrics["portfolio"] == run["portfolio"]
    assert {s: m["metrics"] for s, m in metrics["symbols"].items()} == {r["symbol"]: r["metrics"] for r in results}
    equity_rows = list(csv.DictReader(io.StringIO(downloaded["equity.csv"].decode())))
    assert float(equity_rows[-1]["equity"]) == run["portfolio"]["final_equity"]
    assert float(equity_rows[-1]["ART2"]) == metrics["symbols"]["ART2"]["metrics"]["Equity Final [$]"]
    trades = list(csv.DictReader(io.StringIO(downloaded["trades.csv"].decode())))
    assert len(trades) == sum(r["metrics"]["# Trades"] for r in results) > 0
    assert png_size(downloaded["chart.png"]) == (1100, 650)

    verified = client.get(f"{RUNS}/{first}/manifest/verify").get_json()
    assert verified["ok"] is True and all(f["ok"] for f in verified["files"])

    # A second run of the same owner chains to the first; a one-symbol run's chart has its trade markers.
    second = submit(client, ["ART1"], fast=7)
    second_view = wait_for_artifacts(client, second)
    assert second_view["chain_prev"] == view["manifest_sha256"]
    assert client.get(f"{RUNS}/{second}/manifest/verify").get_json()["ok"] is True

    # Tampering: a changed byte, a truncated file, a removed file; each is named.
    with engine.connect() as conn:
        directory = Path(conn.execute(select(RunManifest.location).where(RunManifest.job_id == first)).scalar_one())
    equity_file = directory / "equity.csv"
    original = equity_file.read_bytes()
    equity_file.write_bytes(original.replace(b"date", b"data", 1))
    check = client.get(f"{RUNS}/{first}/manifest/verify").get_json()
    assert check["ok"] is False
    assert {f["name"]: f["problem"] for f in check["files"]}["equity.csv"] == "sha256 differs from the manifest"
    equity_file.write_bytes(original[:-10])
    check = client.get(f"{RUNS}/{first}/manifest/verify").get_json()
    assert {f["name"]: f["problem"] for f in check["files"]}["equity.csv"].startswith("size ")
    equity_file.write_bytes(original)
    chart = directory / "chart.png"
    chart_bytes = chart.read_bytes()
    chart.unlink()
    check = client.get(f"{RUNS}/{first}/manifest/verify").get_json()
    assert {f["name"]: f["problem"] for f in check["files"]}["chart.png"] == "missing"
    assert client.get(f"{RUNS}/{first}/artifacts/chart.png").status_code == 404
    chart.write_bytes(chart_bytes)
    assert client.get(f"{RUNS}/{first}/manifest/verify").get_json()["ok"] is True

    # A rewritten manifest row (a file's hash replaced to match an altered file) breaks its own hash and the chain.
    forged = json.loads(json.dumps(manifest))
    forged["files"][1]["sha256"] = "0" * 64
    with engine.begin() as conn:
        conn.execute(update(RunManifest).where(RunManifest.job_id == first).values(manifest=forged))
    check = client.get(f"{RUNS}/{first}/manifest/verify").get_json()
    assert check["ok"] is False and check["manifest_ok"] is False and check["manifest_file_ok"] is False
    with engine.begin() as conn:
        conn.execute(update(RunManifest).where(RunManifest.job_id == first).values(manifest=manifest))
    with engine.begin() as conn:
        conn.execute(update(RunManifest).where(RunManifest.job_id == second).values(chain_prev="f" * 64))
    check = client.get(f"{RUNS}/{second}/manifest/verify").get_json()
    assert check["ok"] is False and check["chain_ok"] is False

    # Only listed names are served; someone else's run is a 404.
    assert client.get(f"{RUNS}/{first}/artifacts/secrets.txt").status_code == 404
    assert client.get(f"{RUNS}/{first}/artifacts/..%2Fmanifest.json").status_code == 404
    for path in (f"{RUNS}/{first}/artifacts", f"{RUNS}/{first}/artifacts/chart.png", f"{RUNS}/{first}/manifest/verify"):
        assert other_client.get(path).status_code == 404
