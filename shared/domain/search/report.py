"""An optimisation's artifacts as bytes (pure): ``optimization.json``, ``results.csv`` (every window's rows,
ranked, with ``passed`` and the reasons) and, for two parameters without walk-forward, ``heatmap.png``."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.domain.search.scoring import best_index, failed_reasons, metrics_view, rank
from shared.domain.search.spec import METRIC_NAMES, METRICS, OptimizationSpec

WindowRows = tuple[int, NDArray[np.int64], list[dict[str, Any]], NDArray[np.float64]]
"""A window's stored rows: (window, combo indices, params, metric matrix)."""


def results_csv(
    spec: OptimizationSpec,
    index: NDArray[np.int64],
    params: Sequence[dict[str, Any]],
    summary: NDArray[np.float64],
    window: int = 0,
) -> bytes:
    """Every combo of a window, ranked (passing rows first, best first), with ``passed`` and the reasons."""
    order = rank(summary, spec.objective, spec.constraints)
    rest = np.setdiff1d(np.arange(len(summary)), order, assume_unique=True)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = list(spec.parameters)
    writer.writerow(["rank", "window", "combo_index", *names, *METRIC_NAMES, "passed", "reasons"])
    for position, i in enumerate([*order.tolist(), *rest.tolist()]):
        metrics = metrics_view(summary[i])
        reasons = failed_reasons(metrics, spec.constraints)
        writer.writerow(
            [
                position + 1 if position < len(order) else "",
                window,
                int(index[i]),
                *(params[i].get(n) for n in names),
                *("" if metrics[m] is None else repr(metrics[m]) for m in METRIC_NAMES),
                not reasons,
                "; ".join(reasons),
            ]
        )
    return out.getvalue().encode()


def heatmap_png(
    spec: OptimizationSpec, params: Sequence[dict[str, Any]], summary: NDArray[np.float64], title: str
) -> bytes:
    """The objective over a two-parameter grid (blank: invalid, not drawn, or failing a constraint)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x_name, y_name = list(spec.parameters)
    xs = sorted({p[x_name] for p in params})
    ys = sorted({p[y_name] for p in params})
    grid = np.full((len(ys), len(xs)), np.nan)
    col = summary[:, METRIC_NAMES.index(spec.objective.metric)]
    passing = np.zeros(len(summary), dtype=np.bool_)
    passing[rank(summary, spec.objective, spec.constraints)] = True
    xi = {v: i for i, v in enumerate(xs)}
    yi = {v: i for i, v in enumerate(ys)}
    for k, p in enumerate(params):
        if passing[k]:
            grid[yi[p[y_name]], xi[p[x_name]]] = col[k]
    fig = Figure(figsize=(9, 7), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(
        grid,
        origin="lower",
        aspect="auto",
        cmap="viridis" if spec.objective.direction == "max" else "viridis_r",
        extent=(xs[0] - 0.5, xs[-1] + 0.5, ys[0] - 0.5, ys[-1] + 0.5) if len(xs) > 1 and len(ys) > 1 else None,
    )
    fig.colorbar(image, ax=ax, label=spec.objective.metric)
    best = best_index(summary, spec.objective, spec.constraints)
    if best is not None and len(xs) > 1 and len(ys) > 1:
        ax.scatter([params[best][x_name]], [params[best][y_name]], marker="*", s=180, color="#d62728", label="best")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def render(
    *,
    optimization_id: str,
    status: str,
    spec_hash: str,
    spec_doc: Mapping[str, Any],
    outcome: dict[str, Any],
    rows: Sequence[WindowRows],
) -> dict[str, bytes]:
    """Every artifact's bytes: ``optimization.json``, ``results.csv`` (every window's rows) and, for a
    two-parameter optimisation without walk-forward, ``heatmap.png``."""
    spec = OptimizationSpec.model_validate(spec_doc)
    doc = {
        "optimization_id": optimization_id,
        "status": status,
        "spec_hash": spec_hash,
        "spec": dict(spec_doc),
        "outcome": outcome,
    }
    files = {"optimization.json": json.dumps(doc, indent=1, allow_nan=False).encode()}
    parts = [results_csv(spec, index, params, summary, w) for w, index, params, summary in rows]
    if not parts:
        parts = [results_csv(spec, np.array([], dtype=np.int64), [], np.empty((0, len(METRICS))))]
    files["results.csv"] = parts[0] + b"".join(p.split(b"\n", 1)[1] for p in parts[1:])  # one header
    if len(spec.parameters) == 2 and spec.walk_forward is None and rows and len(rows[0][2]):
        title = (
            f"optimization {optimization_id} · {spec.config.strategy.name} · {spec.objective.direction} "
            f"{spec.objective.metric} · {len(rows[0][2])} combos"
        )
        files["heatmap.png"] = heatmap_png(spec, rows[0][2], rows[0][3], title)
    return files
