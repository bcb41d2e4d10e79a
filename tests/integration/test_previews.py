"""Candles and features previews: paging by date, validation by field, values equal to the indicator core."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine

from shared.domain.indicators import core as indicators
from tests.helpers import seed_bars


def pages(client: FlaskClient, url: str, key: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        body = client.get(url + (f"&cursor={cursor}" if cursor else "")).get_json()
        assert "error" not in body, body
        rows.extend(body[key])
        cursor = body["next_cursor"]
        if not cursor:
            return rows


def test_candles_pages_cover_the_range(client: FlaskClient, engine: Engine) -> None:
    bars = seed_bars(engine, ["PRV"], days=120)["PRV"]
    start, end = bars[10]["date"], bars[99]["date"]
    rows = pages(client, f"/api/candles?symbol=prv&start={start}&end={end}&limit=25", "candles")
    assert [r["date"] for r in rows] == [b["date"].isoformat() for b in bars[10:100]]
    assert rows[0]["close"] == bars[10]["close"] and rows[-1]["volume"] == bars[99]["volume"]
    everything = client.get("/api/candles?symbol=PRV&limit=5000").get_json()
    assert len(everything["candles"]) == 120 and everything["next_cursor"] is None


def test_features_are_the_indicator_core_cut_to_the_range(client: FlaskClient, engine: Engine) -> None:
    bars = seed_bars(engine, ["FEAT"], days=200)["FEAT"]
    close = np.array([b["close"] for b in bars])
    start = bars[5]["date"]
    rows = pages(client, f"/api/features?symbol=FEAT&indicator=sma&period=20&start={start}&limit=50", "rows")
    expected = indicators.sma(close, 20)[5:]
    assert len(rows) == 195
    for row, value in zip(rows, expected, strict=True):
        assert (row["sma"] is None and math.isnan(value)) or row["sma"] == value
    macd = client.get("/api/features?symbol=FEAT&indicator=macd&fast=5&slow=15&signal=4&limit=5000").get_json()
    line, signal, hist = indicators.macd(close, 5, 15, 4)
    assert macd["columns"] == ["macd", "signal", "histogram"] and macd["params"] == {"fast": 5, "slow": 15, "signal": 4}
    assert macd["rows"][-1]["histogram"] == hist[-1] and macd["rows"][-1]["signal"] == signal[-1]
    assert macd["rows"][-1]["macd"] == line[-1]
    bands = client.get("/api/features?symbol=FEAT&indicator=bollinger&limit=5").get_json()
    assert bands["params"] == {"period": 20, "k": 2.0} and bands["rows"][0]["upper"] is None


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("/api/candles?symbol=NOPE", "symbol"),
        ("/api/candles?symbol=bad%20symbol", "symbol"),
        ("/api/candles?symbol=PRV2&start=2023-03-01&end=2023-02-01", "end"),
        ("/api/candles?symbol=PRV2&start=March", "start"),
        ("/api/candles?symbol=PRV2&limit=0", "limit"),
        ("/api/candles", "symbol"),
        ("/api/features?symbol=PRV2&indicator=magic", "indicator"),
        ("/api/features?symbol=PRV2&indicator=sma&k=2", "k"),
        ("/api/features?symbol=PRV2&indicator=macd&fast=30&slow=10", "fast"),
        ("/api/features?symbol=PRV2&indicator=rsi&period=0", "period"),
        ("/api/features?symbol=PRV2&indicator=rsi&bogus=1", "bogus"),
    ],
)
def test_bad_queries_are_422_naming_the_field(client: FlaskClient, engine: Engine, query: str, field: str) -> None:
    seed_bars(engine, ["PRV2"], days=30)
    response = client.get(query)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert field in [e["field"] for e in response.get_json()["error"]["details"]["errors"]]


def test_previews_need_credentials(anon_client: FlaskClient) -> None:
    assert anon_client.get("/api/candles?symbol=X").status_code == 401
    assert anon_client.get("/api/features?symbol=X&indicator=sma").status_code == 401
