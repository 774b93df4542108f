"""Paper figures (PNG, 150 dpi): ROC curves, decision curves, calibration and learning curves.

Uses matplotlib's Agg backend through the object API (no pyplot state), so figures render on
headless servers and inside Flower processes without a display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 150
_SIZE = (5.5, 5.0)


def _new_axes(figsize=_SIZE):
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _curve(name: str, key: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"curve '{name}': expected a non-empty '{key}' array, found none")
    return arr


# One colour per model in the ROC, decision-curve and calibration figures, keyed by the
# model's label as the report writes it; any other series takes the next colour of the default cycle.
MODEL_COLOURS = {"CF model": "tab:blue", "MRI DL model": "tab:orange", "Combined DL model": "tab:green"}


def colour_of(label: str) -> str | None:
    return next((c for name, c in MODEL_COLOURS.items() if str(label).startswith(name)), None)


def roc_label(label: str, auc: float, lo: float | None = None, hi: float | None = None) -> str:
    """Legend text like "Combined: AUC 0.89 (0.83-0.94)"."""
    text = f"{label}: AUC {auc:.2f}"
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        text += f" ({lo:.2f}-{hi:.2f})"
    return text


def _notes(ax, notes: Sequence[str]) -> None:
    """Legend lines without a curve (a model whose curve is not drawn, and why)."""
    for note in notes:
        ax.plot([], [], " ", label=note)


def plot_roc(curves: Mapping[str, Mapping], path, title: str = "ROC curves", notes: Sequence[str] = ()) -> Path:
    """ROC curves, one per model: curves = {label: dict(fpr, tpr, auc, lo, hi[, cells])}; chance diagonal.

    With `cells` (a curve through k-safe score cells, not through every patient) each cell boundary is
    marked and the legend says how many cells the curve has; the AUC in the legend is the exact one.
    `notes`: legend lines for models drawn without a curve."""
    if not curves and not notes:
        raise ValueError("plot_roc: expected at least one curve, found none")
    fig, ax = _new_axes()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="Chance")
    for label, c in curves.items():
        missing = {"fpr", "tpr", "auc"} - set(c)
        if missing:
            raise ValueError(f"plot_roc: curve '{label}' is missing {sorted(missing)}")
        fpr, tpr = _curve(label, "fpr", c["fpr"]), _curve(label, "tpr", c["tpr"])
        if fpr.shape != tpr.shape:
            raise ValueError(f"plot_roc: curve '{label}': fpr has {fpr.size} points, tpr {tpr.size}")
        text = roc_label(label, float(c["auc"]), c.get("lo"), c.get("hi"))
        if c.get("cells"):
            text += f"; exact AUC, curve through {int(c['cells'])} score cells"
        ax.plot(fpr, tpr, linewidth=2, color=colour_of(label), label=text,
                marker="o" if c.get("cells") else None, markersize=3.5)
    _notes(ax, notes)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - Specificity (false positive rate)",
           ylabel="Sensitivity (true positive rate)", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def dca_ylim(curves: Sequence[np.ndarray]) -> tuple[float, float]:
    """Y-limits for decision curves: from a little below 0 to a little above the best net benefit,
    so a steeply negative treat-all curve (about -50 at t = 0.99) does not squash the models."""
    top = max([0.0] + [float(np.nanmax(c)) for c in curves if np.isfinite(c).any()])
    span = max(top, 0.05)
    return -max(0.05, 0.15 * span), 1.1 * span


def plot_dca(
    thresholds: Sequence[float],
    net_benefits: Mapping[str, Sequence[float]],
    treat_all: Sequence[float],
    path,
    title: str = "Decision curves",
    notes: Sequence[str] = (),
) -> Path:
    """Net benefit against threshold probability, with treat-all and treat-none (0) references.

    The y-axis runs from a little below 0 to a little above the best net benefit, so a steeply
    negative treat-all curve does not squash the models.
    """
    t = _curve("thresholds", "thresholds", thresholds)
    all_nb = _curve("treat all", "treat_all", treat_all)
    if all_nb.shape != t.shape:
        raise ValueError(f"plot_dca: treat_all has {all_nb.size} values for {t.size} thresholds")
    curves = {}
    for label, nb in net_benefits.items():
        curves[label] = _curve(label, "net benefit", nb)
        if curves[label].shape != t.shape:
            raise ValueError(f"plot_dca: '{label}' has {curves[label].size} values for {t.size} thresholds")
    fig, ax = _new_axes((6.0, 4.5))
    for label, nb in curves.items():
        ax.plot(t, nb, linewidth=2, color=colour_of(label), label=label)
    ax.plot(t, all_nb, color="grey", linewidth=1.2, label="Treat all")
    ax.plot(t, np.zeros_like(t), color="black", linestyle="--", linewidth=1.2, label="Treat none")
    _notes(ax, notes)
    ax.set(xlim=(float(t.min()), float(t.max())), ylim=dca_ylim(list(curves.values()) + [all_nb]),
           xlabel="Threshold probability", ylabel="Net benefit", title=title)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_calibration(curves: Mapping[str, tuple], path, title: str = "Calibration") -> Path:
    """Observed event rate against mean predicted probability per group; ideal diagonal.

    curves = {label: (mean_pred, obs_rate[, n])}: with the group sizes n each point gets its Wilson
    95% interval (common/metrics.py wilson_ci) as an error bar."""
    if not curves:
        raise ValueError("plot_calibration: expected at least one curve, found none")
    fig, ax = _new_axes()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="Ideal")
    for label, pair in curves.items():
        if len(pair) < 2:
            raise ValueError(f"plot_calibration: curve '{label}': expected (mean_pred, obs_rate)")
        x, y = _curve(label, "mean_pred", pair[0]), _curve(label, "obs_rate", pair[1])
        if x.shape != y.shape:
            raise ValueError(f"plot_calibration: curve '{label}': {x.size} predictions, {y.size} rates")
        ok = np.isfinite(x) & np.isfinite(y)  # empty bins are NaN by design: not drawn
        if len(pair) > 2:
            from common.metrics import wilson_ci

            n = _curve(label, "n", pair[2])
            if n.shape != x.shape:
                raise ValueError(f"plot_calibration: curve '{label}': {x.size} predictions, {n.size} group sizes")
            lo, hi = wilson_ci(np.round(y * n), n)
            ax.errorbar(x[ok], y[ok], yerr=np.clip(np.vstack([y[ok] - lo[ok], hi[ok] - y[ok]]), 0, None), marker="o", linewidth=1.5,
                        capsize=3, color=colour_of(label), label=f"{label} (95% CI per group)")
        else:
            ax.plot(x[ok], y[ok], marker="o", linewidth=1.5, color=colour_of(label), label=label)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="Predicted probability", ylabel="Observed proportion", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_learning_curves(
    history: Mapping[str, Sequence[tuple]], path, title: str = "Learning curves", ylabel: str = "value"
) -> Path:
    """One line per series: history = {label: [(round, value), ...]}."""
    if not history:
        raise ValueError("plot_learning_curves: expected at least one series, found none")
    fig, ax = _new_axes((6.0, 4.0))
    for label, points in history.items():
        arr = np.asarray(points, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
            raise ValueError(f"plot_learning_curves: series '{label}': expected [(round, value), ...], found shape {arr.shape}")
        ax.plot(arr[:, 0], arr[:, 1], marker="o", markersize=3, linewidth=1.5, label=label)
    ax.set(xlabel="Round", ylabel=ylabel, title=title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)
