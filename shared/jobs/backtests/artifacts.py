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
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.domain.robustness.portfolio import PortfolioSum
from shared.errors import NotFound
from shared.infra.artifact_store import ArtifactStore
from shared.infra.db import session_scope
from shared.infra.models import BacktestRun, Job, JobResult, RunManifest
from shared.jobs.backtests import read
from shared.jobs.backtests.finalize import as_days

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


def _size_and_sha256(content: bytes | Path) -> dict[str, Any]:
    if isinstance(content, Path):
        with open(content, "rb") as f:
            return {"size": content.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    return {"size": len(content), "sha256": sha256_hex(content)}


# --- content ---------------------------------------------------------------------------------------------------
#
# Written as files into a scratch folder, a batch of the run's curves (``read.curve_batches``) or results at a time:
# what a build holds at once is bounded by ``ALPHAFORGE_RUN_BATCH_MB`` (``read.run_batch_bytes``), whatever the
# run's size; never a whole run's curves, nor a whole file.

RESULT_BATCH = 500  # results a statement of metrics.json reads (a symbol's metrics are ~1.5 KB)


def _result_batches(session: Session, job_id: uuid.UUID) -> Iterator[list[tuple[str, Any, Any]]]:
    """(symbol, metrics, error) of the run's results, in Python's order of the symbols, :data:`RESULT_BATCH` a time."""
    symbols = sorted(session.scalars(select(JobResult.symbol).where(JobResult.job_id == job_id)))
    for lo in range(0, len(symbols), RESULT_BATCH):
        batch = symbols[lo : lo + RESULT_BATCH]
        rows = session.execute(
            select(JobResult.symbol, JobResult.data["metrics"], JobResult.error).where(
                JobResult.job_id == job_id, JobResult.symbol.in_(batch)
            )
        ).all()
        found = {symbol: (symbol, metrics, error) for symbol, metrics, error in rows}
        yield [found[symbol] for symbol in batch if symbol in found]


def _metrics_json(session: Session, job: Job, run: BacktestRun, path: Path) -> None:
    """The run's document, its symbols' entries written as they are read (the bytes ``json.dumps(doc, indent=1)``
    of the whole document would be)."""
    doc = {
        "run_id": str(job.id),
        "status": job.status,
        "config_hash": run.config_hash,
        "config": run.config,
        "portfolio": run.portfolio,
        "symbols": {},
    }
    head = json.dumps(doc, indent=1, sort_keys=False, allow_nan=False).removesuffix("{}\n}")
    with open(path, "w", encoding="utf-8", newline="") as out:
        out.write(head)
        separator, tail = "{\n", "{}\n}"  # an entry is "symbol": its dumps at depth 0, indented to depth 2
        for batch in _result_batches(session, job.id):
            for symbol, metrics, error in batch:
                entry = json.dumps({"metrics": metrics, "error": error}, indent=1, allow_nan=False)
                out.write(f"{separator}  {json.dumps(symbol)}: " + entry.replace("\n", "\n  "))
                separator, tail = ",\n", "\n }\n}"
        out.write(tail)


def _sums(session: Session, job_id: uuid.UUID, initial_cash: float) -> tuple[PortfolioSum, PortfolioSum]:
    """The run's equity and buy and hold, its sleeves summed (``finalize.portfolio_curve``, a batch at a time)."""
    equity, benchmark = PortfolioSum(initial_cash), PortfolioSum(initial_cash)
    for batch in read.curve_batches(session, job_id, with_trades=False):
        equity.add([(c.dates, c.equity) for c in batch])
        benchmark.add([(c.dates, c.benchmark if c.benchmark is not None else c.equity) for c in batch])
    return equity, benchmark


def _fmt(value: float) -> str:
    return repr(float(value))


def _curve_files(
    session: Session, job_id: uuid.UUID, dates: np.ndarray, equity: np.ndarray, benchmark: np.ndarray, folder: Path
) -> read.StoredCurve | None:
    """``equity.csv`` (each symbol's equity on the run's dates; "" where the symbol has no bar) and ``trades.csv``
    into ``folder``, from one pass over the curves in symbol order: a batch's equity columns go to a scratch file of
    float64 blocks, then the CSV is written a few hundred rows at a time from them. Returns the curve of a
    one-symbol run (its chart marks its trades)."""
    n = len(dates)
    blocks: list[tuple[list[str], int]] = []  # each batch's symbols and where its block starts in the scratch file
    only: read.StoredCurve | None = None
    count = 0
    with open(folder / "trades.csv", "w", encoding="utf-8", newline="") as trades_out, \
            open(folder / "equity.columns", "w+b") as columns_file:  # fmt: skip
        trades = csv.writer(trades_out, lineterminator="\n")
        trades.writerow(["symbol", *TRADE_COLUMNS])
        for batch in read.curve_batches(session, job_id, with_benchmark=False, symbol_order=True):
            values = np.empty((n, len(batch)), dtype=np.float64)
            present = np.empty((n, len(batch)), dtype=np.bool_)
            for j, curve in enumerate(batch):
                own = as_days(curve.dates)  # an intraday curve's last value of each day, as in the portfolio
                at = np.clip(np.searchsorted(own, dates, side="right") - 1, 0, len(own) - 1)
                present[:, j] = own[at] == dates
                values[:, j] = np.asarray(curve.equity, dtype=np.float64)[at]
                for trade in curve.trades:
                    trades.writerow([curve.symbol, *("" if trade.get(k) is None else trade[k] for k in TRADE_COLUMNS)])
            blocks.append(([c.symbol for c in batch], columns_file.tell()))
            columns_file.write(values.tobytes())
            columns_file.write(present.tobytes())
            count += len(batch)
            only = batch[0] if count == 1 else None
            del batch, values, present
        symbols = [symbol for names, _ in blocks for symbol in names]
        rows_at_once = max(1, read.run_batch_bytes() // (64 * max(1, len(symbols))))  # a value: 9 bytes, ~55 as text
        peak = np.maximum.accumulate(equity)
        with open(folder / "equity.csv", "w", encoding="utf-8", newline="") as out:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(["date", "equity", "buy_and_hold", "drawdown_pct", *symbols])
            for lo in range(0, n, rows_at_once):
                hi = min(n, lo + rows_at_once)
                parts = []
                for names, offset in blocks:
                    width = len(names)
                    columns_file.seek(offset + lo * width * 8)
                    value = np.frombuffer(columns_file.read((hi - lo) * width * 8), dtype=np.float64)
                    columns_file.seek(offset + n * width * 8 + lo * width)
                    mask = np.frombuffer(columns_file.read((hi - lo) * width), dtype=np.bool_)
                    parts.append((value.reshape(hi - lo, width).tolist(), mask.reshape(hi - lo, width).tolist()))
                for i in range(lo, hi):
                    row = i - lo
                    per_symbol = [repr(x) if p else "" for v, m in parts for x, p in zip(v[row], m[row], strict=True)]
                    writer.writerow([str(dates[i]), _fmt(equity[i]), _fmt(benchmark[i]),
                                     _fmt((equity[i] / peak[i] - 1) * 100), *per_symbol])  # fmt: skip
                del parts
    (folder / "equity.columns").unlink()
    return only


def _chart_png(
    job: Job, run: BacktestRun, sleeves: int, only: read.StoredCurve | None, dates: np.ndarray, equity: np.ndarray,
    benchmark: np.ndarray,
) -> bytes:  # fmt: skip
    """Equity against buy and hold, drawdown underneath; trade entries and exits marked for a one-symbol run
    (``only``, its curve). A ``Figure`` with the Agg canvas, not pyplot: no global state, safe in any thread or
    process. Imported here: matplotlib costs every worker process a share of its start-up, and only artifact builds
    draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    x = dates.astype("datetime64[D]").astype("O")
    label = "portfolio" if only is None else only.symbol
    top.plot(x, equity, color="#1f77b4", linewidth=1.2, label=f"{label} ({run.strategy})")
    top.plot(x, benchmark, color="#7f7f7f", linewidth=1.0, label="buy and hold")
    if only is not None:
        index = {str(d): i for i, d in enumerate(dates)}
        trades = only.trades
        entries = [index[t["entry_date"][:10]] for t in trades if str(t.get("entry_date"))[:10] in index]
        exits = [index[t["exit_date"][:10]] for t in trades if str(t.get("exit_date"))[:10] in index]
        top.scatter(
            [x[i] for i in entries], equity[entries], marker="^", color="#2ca02c", s=22, label="entry", zorder=3
        )
        top.scatter([x[i] for i in exits], equity[exits], marker="v", color="#d62728", s=22, label="exit", zorder=3)
    top.set_ylabel("equity")
    top.set_title(f"run {job.id} · {sleeves} symbol(s) · config {run.config_hash[:12]}", fontsize=9)
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


def _validation_json(job: Job, run: BacktestRun, validation: dict[str, Any]) -> bytes:
    """The run's validation (shared.domain.robustness.combine): each method's result, params, seed, draws and tasks."""
    doc = {
        "run_id": str(job.id),
        "status": job.status,
        "config_hash": run.config_hash,
        "spec": run.validation,
        **validation,
    }
    return json.dumps(doc, indent=1, sort_keys=False, allow_nan=False).encode()


def write_files(session: Session, job: Job, run: BacktestRun, folder: Path) -> dict[str, Path]:
    """Every artifact of the finalized run as a file in ``folder``, by name (the stored portfolio and validation
    result; the curves and results read a batch at a time)."""
    files = {"metrics.json": folder / "metrics.json"}
    _metrics_json(session, job, run, files["metrics.json"])
    if run.validation_result is not None:
        files["validation.json"] = folder / "validation.json"
        files["validation.json"].write_bytes(_validation_json(job, run, run.validation_result))
    equity, benchmark = _sums(session, job.id, float(run.config.get("initial_cash", 10_000.0)))
    if equity.sleeves:
        only = _curve_files(session, job.id, equity.dates, equity.total, benchmark.total, folder)
        files["equity.csv"], files["trades.csv"] = folder / "equity.csv", folder / "trades.csv"
        files["chart.png"] = folder / "chart.png"
        files["chart.png"].write_bytes(
            _chart_png(job, run, equity.sleeves, only, equity.dates, equity.total, benchmark.total)
        )
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
        with tempfile.TemporaryDirectory(prefix="alphaforge-artifacts-") as folder:
            files = write_files(session, job, run, Path(folder))
            return _store_with_manifest(session, store, job_id, run.owner_id, run.config_hash, job.status, files)


def _store_with_manifest(
    session: Session,
    store: ArtifactStore,
    job_id: uuid.UUID,
    owner_id: str,
    config_hash: str,
    status: str,
    files: Mapping[str, bytes | Path],
) -> RunManifest:
    """Write the files (contents, or files on disk: streamed) and their manifest, chained to the owner's previous
    manifest (under the owner's lock)."""
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
        "files": [{"name": name, **_size_and_sha256(content)} for name, content in sorted(files.items())],
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
