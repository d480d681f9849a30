"""The report's figures: plain arrays in, a PNG and a JSON sidecar of exactly the plotted data out.

Every function here takes numpy arrays (no run directory, no models), draws with matplotlib's
object-oriented API on an Agg canvas (no pyplot, no display, no global backend switch, so a
notebook's own backend is left alone), and writes

* ``<name>.png`` — the figure, ``FIGSIZE × DPI`` pixels exactly (no tight bounding box);
* ``<name>.json`` — its sidecar: the figure's size in pixels and, per panel, its title, axis labels
  and every series drawn (``name``, ``kind``: ``line`` / ``scatter`` / ``reference``, and the ``x`` /
  ``y`` values, plus per-series numbers such as the MAE, AUROC or bin counts).  A test (or a user
  re-plotting in another tool) can check that the picture carries the data it claims.

Non-finite values are written to the sidecar as ``null`` (strict JSON).  Series names are the
model names the caller gives; ``colors`` maps a name to a matplotlib colour so one model keeps one
colour across figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .core import metrics

__all__ = ["DPI", "default_colors", "learning_curves", "entropy_scatter", "reliability_diagram", "ood_roc", "sidecar_path"]

#: dots per inch of every PNG; a figure of ``(w, h)`` inches is ``round(w·DPI) × round(h·DPI)`` pixels
DPI = 100
#: the name the report gives the teacher ensemble (drawn in black)
ENSEMBLE = "teacher ensemble"

Series = dict[str, Any]
XY = tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]


def sidecar_path(png: str | Path) -> Path:
    """``<name>.json`` next to ``<name>.png``."""
    return Path(png).with_suffix(".json")


def default_colors(names: Sequence[str]) -> dict[str, str]:
    """One colour per model: black for the teacher ensemble, tab10 / tab20 in order for the rest."""
    palette = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "olive", "cyan")]
    colors: dict[str, str] = {}
    others = [n for n in names if n != ENSEMBLE]
    for i, name in enumerate(others):
        colors[name] = palette[i] if i < len(palette) else f"C{i % 10}"
    if ENSEMBLE in names:
        colors[ENSEMBLE] = "black"
    return colors


# ---------------------------------------------------------------------------------------------
# figures


def learning_curves(
    panels: Mapping[str, Mapping[str, XY]],
    path: str | Path,
    *,
    xlabel: str = "posterior sample",
    colors: Mapping[str, str] | None = None,
) -> Path:
    """One panel per metric (title = the mapping's key), one line per model: ``y`` against ``x``.

    ``panels = {"KL to ensemble": {"student a": (samples, values), ...}, ...}``; empty panels are
    dropped.  Raises ``ValueError`` when nothing is left to draw or a series' x and y differ in length.
    """
    panels = {title: series for title, series in panels.items() if series}
    if not panels:
        raise ValueError("no learning-curve data to plot")
    colors = dict(colors or default_colors(sorted({n for s in panels.values() for n in s})))
    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    fig, size = _figure(5.5 * ncols, 4.0 * nrows)
    record = []
    for i, (title, series) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        drawn = []
        for name, (x, y) in series.items():
            x, y = _vector(x, f"{title}/{name} x"), _vector(y, f"{title}/{name} y")
            _same_length(x, y, f"{title}/{name}")
            ax.plot(x, y, marker="o", markersize=2.5, linewidth=1.2, label=name, color=colors.get(name))
            drawn.append(_series(name, "line", x, y))
        ax.set(title=title, xlabel=xlabel, ylabel=title)
        if _spans_decades(drawn):  # a loss falling over orders of magnitude reads better on a log axis
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        record.append(_panel(title, xlabel, title, drawn, yscale=ax.get_yscale()))
    return _save(fig, size, path, "learning_curves", record)


def entropy_scatter(
    ensemble_entropy: Sequence[float] | np.ndarray,
    student_entropy: Mapping[str, Sequence[float] | np.ndarray],
    path: str | Path,
    *,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Each student's predicted expected entropy (y) against the ensemble's E_θ H[p(y|x,θ)] (x),
    one point per test input, with the line y = x; the legend gives each student's MAE."""
    x = _vector(ensemble_entropy, "ensemble expected entropy")
    if not student_entropy:
        raise ValueError("no student with an expected-entropy head to plot")
    colors = dict(colors or default_colors(list(student_entropy)))
    fig, size = _figure(6.0, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    drawn = []
    lo, hi = float(x.min()), float(x.max())
    for name, y in student_entropy.items():
        y = _vector(y, f"{name} expected entropy")
        _same_length(x, y, name)
        mae = metrics.mae(y, x)
        ax.scatter(x, y, s=6, alpha=0.5, linewidths=0, color=colors.get(name), label=f"{name} (MAE {mae:.4f})")
        drawn.append(_series(name, "scatter", x, y, mae=mae))
        lo, hi = min(lo, float(y.min())), max(hi, float(y.max()))
    line = np.array([lo, hi])
    ax.plot(line, line, color="grey", linestyle="--", linewidth=1, label="y = x")
    drawn.append(_series("y = x", "reference", line, line))
    xlabel, ylabel = "ensemble expected entropy (nats)", "student expected entropy (nats)"
    ax.set(title="Expected entropy on the test set", xlabel=xlabel, ylabel=ylabel)
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    return _save(fig, size, path, "entropy_scatter", [_panel(ax.get_title(), xlabel, ylabel, drawn)])


def reliability_diagram(
    labels: Sequence[int] | np.ndarray,
    probs: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    n_bins: int = 15,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Reliability diagram (:func:`gped.core.metrics.reliability`) of each model's predictive.

    Top panel: accuracy against mean confidence per non-empty equal-width bin, with the diagonal of
    perfect calibration and each model's ECE in the legend.  Bottom panel: how many test inputs fall
    in each bin (the bin counts of a series sum to the number of test inputs).
    """
    if not probs:
        raise ValueError("no model with a predictive to plot")
    colors = dict(colors or default_colors(list(probs)))
    fig, size = _figure(6.0, 7.0)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
    top, bottom = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    diag = np.array([0.0, 1.0])
    top.plot(diag, diag, color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    acc_series, count_series = [_series("perfect calibration", "reference", diag, diag)], []
    for name, p in probs.items():
        r = metrics.reliability(p, labels, n_bins)
        full = r.count > 0
        ece = metrics.ece(p, labels, n_bins)
        conf, acc, count = r.confidence[full], r.accuracy[full], r.count[full]
        extra = {"count": count.tolist(), "bin_lower": r.edges[:-1][full].tolist(), "bin_upper": r.edges[1:][full].tolist()}
        top.plot(conf, acc, marker="o", markersize=4, linewidth=1.2, color=colors.get(name), label=f"{name} (ECE {ece:.4f})")
        bottom.plot(conf, count, marker="o", markersize=3, linewidth=1, color=colors.get(name), label=name)
        acc_series.append(_series(name, "line", conf, acc, ece=ece, **extra))
        count_series.append(_series(name, "line", conf, count.astype(np.float64), **extra))
    top.set(title="Reliability on the test set", xlabel="confidence (max probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02))
    top.grid(True, alpha=0.3)
    top.legend(fontsize="small", loc="lower right")  # over-confidence (below the diagonal, right) is rare
    bottom.set(xlabel="confidence (max probability)", ylabel="test inputs", xlim=(0, 1), yscale="log")
    bottom.grid(True, alpha=0.3)
    panels = [
        _panel(top.get_title(), top.get_xlabel(), top.get_ylabel(), acc_series),
        _panel("test inputs per confidence bin", bottom.get_xlabel(), bottom.get_ylabel(), count_series, yscale="log"),
    ]
    return _save(fig, size, path, "reliability", panels, n_bins=int(n_bins))


def ood_roc(
    scores: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    path: str | Path,
    *,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """ROC curves of OOD detection (OOD is the positive class, higher score = more likely OOD).

    ``scores = {"total uncertainty": {model: (scores on in-distribution test inputs, scores on OOD
    inputs)}, "knowledge uncertainty": {...}}``; one panel per score, one curve per model
    (:func:`gped.core.metrics.roc_curve_points`), its AUROC in the legend.
    """
    scores = {title: models for title, models in scores.items() if models}
    if not scores:
        raise ValueError("no OOD scores to plot")
    colors = dict(colors or default_colors(sorted({n for m in scores.values() for n in m})))
    fig, size = _figure(5.5 * len(scores), 5.0)
    panels = []
    for i, (title, models) in enumerate(scores.items()):
        ax = fig.add_subplot(1, len(scores), i + 1)
        chance = np.array([0.0, 1.0])
        ax.plot(chance, chance, color="grey", linestyle="--", linewidth=1, label="chance")
        drawn = [_series("chance", "reference", chance, chance)]
        for name, (s_in, s_out) in models.items():
            fpr, tpr, _ = metrics.roc_curve_points(s_in, s_out)
            area = metrics.auroc(s_in, s_out)
            ax.plot(fpr, tpr, linewidth=1.4, color=colors.get(name), label=f"{name} (AUROC {area:.3f})")
            drawn.append(_series(name, "line", fpr, tpr, auroc=area, n_in=int(np.size(s_in)), n_out=int(np.size(s_out))))
        xlabel, ylabel = "false positive rate (in-distribution)", "true positive rate (OOD)"
        ax.set(title=f"OOD detection by {title}", xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
        panels.append(_panel(title, xlabel, ylabel, drawn))
    return _save(fig, size, path, "ood_roc", panels)


# ---------------------------------------------------------------------------------------------
# helpers


def _figure(width_in: float, height_in: float) -> tuple[Figure, list[int]]:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [int(round(width_in * DPI)), int(round(height_in * DPI))]


def _vector(values: Any, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array, got shape {a.shape}")
    return a


def _same_length(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{what}: x and y differ in length ({x.size} vs {y.size})")


def _spans_decades(series: list[Series]) -> bool:
    """True when every finite y is positive and they span more than a factor of 30."""
    values = np.array([v for s in series for v in s["y"] if v is not None], dtype=np.float64)
    return values.size > 1 and values.min() > 0 and values.max() / values.min() > 30


def _json_values(a: Any) -> list:
    """Float64 values as a JSON list, non-finite as null."""
    return [float(v) if math.isfinite(v) else None for v in np.asarray(a, dtype=np.float64).reshape(-1).tolist()]


def _series(name: str, kind: str, x: Any, y: Any, **extra: Any) -> Series:
    out: Series = {"name": name, "kind": kind, "x": _json_values(x), "y": _json_values(y)}
    for key, value in extra.items():
        out[key] = _json_values([value])[0] if isinstance(value, float) else value
    return out


def _panel(title: str, xlabel: str, ylabel: str, series: list[Series], yscale: str = "linear") -> dict:
    return {"title": title, "xlabel": xlabel, "ylabel": ylabel, "yscale": yscale, "series": series}


def _save(fig: Figure, size: list[int], path: str | Path, figure: str, panels: list[dict], **extra: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    sidecar = {"figure": figure, "png": path.name, "size_px": size, **extra, "panels": panels}
    sidecar_path(path).write_text(json.dumps(sidecar, indent=1, allow_nan=False) + "\n")
    return path
