"""A finished run's artifacts and their manifest: metrics JSON, equity and trades CSV, a PNG chart.

Files go to the artifact store (``shared.infra.artifact_store``: ``<data dir>/artifacts/<owner>/<run id>/`` by default,
or an S3 bucket); every write, read and check goes through it. The manifest lists each file's name, size and SHA-256 and
carries ``chain_prev``, the SHA-256 of the same owner's previous manifest; the manifest's own SHA-256 (of its
canonical JSON) is kept in PostgreSQL. Verification recomputes all of it: an altered, truncated or removed file,
an edited manifest, or a manifest taken out of the owner's chain is detected.

Built once per run, once it is finalized (its portfolio and validation result stored: ``.finalize``), by the worker
that finalized it (an advisory lock per run makes a concurrent second build wait and then find the first; one per
owner keeps the chain linear). The metrics and validation files carry the stored portfolio and validation result:
the same numbers the run's view shows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import NotFound
from shared.infra.artifact_store import ArtifactStore
from shared.infra.db import session_scope
from shared.infra.models import BacktestRun, Job, JobResult, RunManifest
from shared.jobs.backtests import read
from shared.jobs.backtests.finalize import as_days, portfolio_curve

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
MEDIA_TYPES = {
    "metrics.json": "application/json",
    "equity.csv": "text/csv",
    "trades.csv": "text/csv",
    "chart.png": "image/png",
    "validation.json": "application/json",
    "optimization.json": "application/json",
    "results.csv": "text/csv",
    "heatmap.png": "image/png",
    MANIFEST_NAME: "application/json",
}
TRADE_COLUMNS = ("entry_date", "exit_date", "size", "entry_price", "exit_price", "pnl", "return_pct", "commission")


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- content ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunData:
    job: Job
    run: BacktestRun
    results: list[JobResult]
    curves: list[read.StoredCurve]


def _metrics_json(data: RunData, portfolio: dict[str, Any] | None) -> bytes:
    doc = {
        "run_id": str(data.job.id),
        "status": data.job.status,
        "config_hash": data.run.config_hash,
        "config": data.run.config,
        "portfolio": portfolio,
        "symbols": {
            r.symbol: {"metrics": (r.data or {}).get("metrics"), "error": r.error}
            for r in sorted(data.results, key=lambda r: r.symbol)
        },
    }
    return json.dumps(doc, indent=1, sort_keys=False, allow_nan=False).encode()


def _series(data: RunData, initial_cash: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dates, equity, buy and hold) of the run: the symbol's own for one symbol, else the sleeves summed."""
    curves = [(c.dates, c.equity) for c in data.curves]
    dates, equity = portfolio_curve(curves, initial_cash)
    benchmarks = [(c.dates, c.benchmark if c.benchmark is not None else c.equity) for c in data.curves]
    _, benchmark = portfolio_curve(benchmarks, initial_cash)
    return dates, equity, benchmark


def _fmt(value: float) -> str:
    return repr(float(value))


def _equity_csv(data: RunData, dates: np.ndarray, equity: np.ndarray, benchmark: np.ndarray) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    curves = sorted(data.curves, key=lambda c: c.symbol)
    columns = []
    for c in curves:  # each symbol's equity on the run's dates; "" where the symbol has no bar
        own = as_days(c.dates)  # an intraday curve's last value of each day, as in the portfolio
        at = np.clip(np.searchsorted(own, dates, side="right") - 1, 0, len(own) - 1)
        present = own[at] == dates
        text = [repr(x) for x in np.asarray(c.equity, dtype=np.float64)[at].tolist()]
        columns.append([t if p else "" for t, p in zip(text, present.tolist(), strict=True)])
    peak = np.maximum.accumulate(equity)
    writer.writerow(["date", "equity", "buy_and_hold", "drawdown_pct", *(c.symbol for c in curves)])
    for i, day in enumerate(str(d) for d in dates):
        per_symbol = [column[i] for column in columns]
        writer.writerow([day, _fmt(equity[i]), _fmt(benchmark[i]), _fmt((equity[i] / peak[i] - 1) * 100), *per_symbol])
    return out.getvalue().encode()


def _trades_csv(data: RunData) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["symbol", *TRADE_COLUMNS])
    for curve in sorted(data.curves, key=lambda c: c.symbol):
        for trade in curve.trades:
            writer.writerow([curve.symbol, *("" if trade.get(k) is None else trade[k] for k in TRADE_COLUMNS)])
    return out.getvalue().encode()


def _chart_png(data: RunData, dates: np.ndarray, equity: np.ndarray, benchmark: np.ndarray) -> bytes:
    """Equity against buy and hold, drawdown underneath; trade entries and exits marked for a one-symbol run.
    A ``Figure`` with the Agg canvas, not pyplot: no global state, safe in any thread or process. Imported here:
    matplotlib costs every worker process a share of its start-up, and only artifact builds draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    x = dates.astype("datetime64[D]").astype("O")
    label = "portfolio" if len(data.curves) > 1 else data.curves[0].symbol
    top.plot(x, equity, color="#1f77b4", linewidth=1.2, label=f"{label} ({data.run.strategy})")
    top.plot(x, benchmark, color="#7f7f7f", linewidth=1.0, label="buy and hold")
    if len(data.curves) == 1:
        index = {str(d): i for i, d in enumerate(dates)}
        trades = data.curves[0].trades
        entries = [index[t["entry_date"][:10]] for t in trades if str(t.get("entry_date"))[:10] in index]
        exits = [index[t["exit_date"][:10]] for t in trades if str(t.get("exit_date"))[:10] in index]
        top.scatter(
            [x[i] for i in entries], equity[entries], marker="^", color="#2ca02c", s=22, label="entry", zorder=3
        )
        top.scatter([x[i] for i in exits], equity[exits], marker="v", color="#d62728", s=22, label="exit", zorder=3)
    top.set_ylabel("equity")
    top.set_title(f"run {data.job.id} · {len(data.curves)} symbol(s) · config {data.run.config_hash[:12]}", fontsize=9)
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    drawdown = (equity / np.maximum.accumulate(equity) - 1) * 100
    bottom.fill_between(x, drawdown, 0, color="#d62728", alpha=0.35, linewidth=0)
    bottom.set_ylabel("drawdown %")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def _validation_json(data: RunData, validation: dict[str, Any]) -> bytes:
    """The run's validation (shared.domain.robustness.combine): each method's result, params, seed, draws and tasks."""
    doc = {
        "run_id": str(data.job.id),
        "status": data.job.status,
        "config_hash": data.run.config_hash,
        "spec": data.run.validation,
        **validation,
    }
    return json.dumps(doc, indent=1, sort_keys=False, allow_nan=False).encode()


def render(
    data: RunData, portfolio: dict[str, Any] | None, validation: dict[str, Any] | None = None
) -> dict[str, bytes]:
    """Every artifact's bytes, by file name (pure: no database, no disk)."""
    files = {"metrics.json": _metrics_json(data, portfolio)}
    if validation is not None:
        files["validation.json"] = _validation_json(data, validation)
    if data.curves:
        initial_cash = float(data.run.config.get("initial_cash", 10_000.0))
        dates, equity, benchmark = _series(data, initial_cash)
        files["equity.csv"] = _equity_csv(data, dates, equity, benchmark)
        files["trades.csv"] = _trades_csv(data)
        files["chart.png"] = _chart_png(data, dates, equity, benchmark)
    return files


# --- build, read, verify ---------------------------------------------------------------------------------------


def _lock(session: Session, key: str) -> None:
    session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(key, 0))))


def build_if_finished(factory: sessionmaker[Session], store: ArtifactStore, job_id: uuid.UUID) -> RunManifest | None:
    """Build the run's artifacts once it is finalized (final, no shard open, portfolio and validation result
    stored); None before; the existing manifest if built."""
    with session_scope(factory) as session:
        _lock(session, f"artifacts:{job_id}")
        existing = session.scalar(select(RunManifest).where(RunManifest.job_id == job_id))
        if existing is not None:
            return existing
        job, run = read.get_run(session, job_id)
        if job.finalized_at is None:
            return None
        results = list(session.scalars(select(JobResult).where(JobResult.job_id == job_id)))
        data = RunData(job, run, results, read.load_curves(session, job_id))
        files = render(data, run.portfolio, run.validation_result)
        return _store_with_manifest(session, store, job_id, run.owner_id, run.config_hash, job.status, files)


def _store_with_manifest(
    session: Session,
    store: ArtifactStore,
    job_id: uuid.UUID,
    owner_id: str,
    config_hash: str,
    status: str,
    files: dict[str, bytes],
) -> RunManifest:
    """Write the files and their manifest, chained to the owner's previous manifest (under the owner's lock)."""
    location = store.run_location(owner_id, job_id)
    for name, content in files.items():
        store.put(location, name, content)
    _lock(session, f"manifests-of:{owner_id}")
    chain_prev = session.scalar(
        select(RunManifest.manifest_sha256)
        .where(RunManifest.owner_id == owner_id)
        .order_by(RunManifest.id.desc())
        .limit(1)
    )
    manifest = {
        "version": MANIFEST_VERSION,
        "run_id": str(job_id),
        "owner_id": owner_id,
        "config_hash": config_hash,
        "status": status,
        "files": [
            {"name": name, "size": len(content), "sha256": sha256_hex(content)}
            for name, content in sorted(files.items())
        ],
        "chain_prev": chain_prev,
    }
    store.put(location, MANIFEST_NAME, canonical(manifest))
    row = RunManifest(
        job_id=job_id,
        owner_id=owner_id,
        location=location,
        manifest=manifest,
        manifest_sha256=sha256_hex(canonical(manifest)),
        chain_prev=chain_prev,
    )
    session.add(row)
    session.flush()
    log.info("job %s: %d artifacts written to %s", job_id, len(files), location)
    return row


def write_manifest(
    factory: sessionmaker[Session],
    store: ArtifactStore,
    *,
    job_id: uuid.UUID,
    owner_id: str,
    config_hash: str,
    status: str,
    files: dict[str, bytes],
) -> RunManifest:
    """Another job kind's artifacts (an optimisation's) with a manifest in the same owner chain; built once per
    job (a concurrent second call waits on the job's lock and returns the first manifest)."""
    with session_scope(factory) as session:
        _lock(session, f"artifacts:{job_id}")
        existing = session.scalar(select(RunManifest).where(RunManifest.job_id == job_id))
        if existing is not None:
            return existing
        return _store_with_manifest(session, store, job_id, owner_id, config_hash, status, files)


def get_manifest(session: Session, job_id: uuid.UUID) -> RunManifest | None:
    return session.scalar(select(RunManifest).where(RunManifest.job_id == job_id))


def read_artifact(store: ArtifactStore, manifest: RunManifest, name: str) -> bytes:
    """A listed artifact (or the manifest) as stored; anything else is a 404, so no path can be smuggled."""
    listed = {f["name"] for f in manifest.manifest["files"]} | {MANIFEST_NAME}
    if name not in listed:
        raise NotFound(f"artifact {name[:64]} not found", details={"artifact": name[:64]})
    content = store.get(manifest.location, name)
    if content is None:
        raise NotFound(f"artifact {name} is listed but missing from storage", details={"artifact": name})
    return content


def verify(session: Session, store: ArtifactStore, manifest: RunManifest) -> dict[str, Any]:
    """Recompute every hash: files against the manifest, the manifest against its stored hash and the stored
    copy, and its place in the owner's chain (the previous manifest's hash, and the next one's ``chain_prev``)."""
    files = []
    for entry in manifest.manifest["files"]:
        content = store.get(manifest.location, entry["name"])
        problem = None
        if content is None:
            problem = "missing"
        elif len(content) != entry["size"]:
            problem = f"size {len(content)}, manifest says {entry['size']}"
        elif sha256_hex(content) != entry["sha256"]:
            problem = "sha256 differs from the manifest"
        files.append({"name": entry["name"], "ok": problem is None, "problem": problem})
    recorded = canonical(manifest.manifest)
    manifest_ok = sha256_hex(recorded) == manifest.manifest_sha256
    manifest_file_ok = store.get(manifest.location, MANIFEST_NAME) == recorded
    before = session.scalar(
        select(RunManifest.manifest_sha256)
        .where(RunManifest.owner_id == manifest.owner_id, RunManifest.id < manifest.id)
        .order_by(RunManifest.id.desc())
        .limit(1)
    )
    after = session.scalar(
        select(RunManifest.chain_prev)
        .where(RunManifest.owner_id == manifest.owner_id, RunManifest.id > manifest.id)
        .order_by(RunManifest.id)
        .limit(1)
    )
    chain_ok = manifest.chain_prev == before and manifest.manifest.get("chain_prev") == before
    next_ok = after is None or after == manifest.manifest_sha256
    ok = all(f["ok"] for f in files) and manifest_ok and manifest_file_ok and chain_ok and next_ok
    return {
        "ok": ok,
        "manifest_sha256": manifest.manifest_sha256,
        "manifest_ok": manifest_ok,
        "manifest_file_ok": manifest_file_ok,
        "chain_prev": manifest.chain_prev,
        "chain_ok": chain_ok,
        "next_in_chain_ok": next_ok,
        "files": files,
    }
