"""The paper figures render to valid PNGs of a readable size from tiny inputs."""
from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from common import metrics as M
from common import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_px: int = 500):
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert min(h, w) >= min_px, f"{path.name}: {w}x{h} px is too small for a paper figure"
    assert img[..., :3].std() > 0.01, f"{path.name} is blank"  # something was drawn
    return img


def _tiny():
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 1])
    return y, {
        "CF": np.clip(0.3 + 0.3 * y + rng.normal(0, 0.15, y.size), 0, 1),
        "DL": np.clip(0.4 + 0.1 * y + rng.normal(0, 0.2, y.size), 0, 1),
        "Combined": np.clip(0.2 + 0.5 * y + rng.normal(0, 0.1, y.size), 0, 1),
    }


def test_roc_plot_from_metrics(tmp_path):
    y, models = _tiny()
    curves = {}
    for name, p in models.items():
        fpr, tpr = M.roc_from_histograms(*M.score_histograms(y, p))
        a, lo, hi = M.delong_ci(y, p)
        curves[name] = dict(fpr=fpr, tpr=tpr, auc=a, lo=lo, hi=hi)
    out = plots.plot_roc(curves, tmp_path / "figs" / "roc.png", "ROC, primary cohort")
    assert out == tmp_path / "figs" / "roc.png"
    _check_png(out)


def test_roc_legend_text():
    assert plots.roc_label("Combined", 0.887, 0.834, 0.940) == "Combined: AUC 0.89 (0.83-0.94)"
    assert plots.roc_label("DL", 0.5, float("nan"), float("nan")) == "DL: AUC 0.50"


def test_dca_plot_clips_very_negative_treat_all(tmp_path):
    y, models = _tiny()
    t = M.DEFAULT_THRESHOLDS
    nbs = {name: M.net_benefit(y, p, t) for name, p in models.items()}
    treat_all = M.net_benefit_treat_all(y, t)
    assert treat_all.min() < -10  # at t = 0.99 treat-all is about -50: the y-axis must not follow it
    _check_png(plots.plot_dca(t, nbs, treat_all, tmp_path / "dca.png", "Decision curves"))
    lo, hi = plots.dca_ylim([*nbs.values(), treat_all])
    best = max(float(nb.max()) for nb in [*nbs.values(), treat_all])
    assert -0.1 <= lo < 0 and best < hi < 1.2 * best + 0.06


def test_calibration_and_learning_curves(tmp_path):
    y, models = _tiny()
    curves = {name: M.calibration_bins(y, p, bins=5)[:2] for name, p in models.items()}
    _check_png(plots.plot_calibration(curves, tmp_path / "cal.png", "Calibration"))
    hist = {"site A": [(1, 0.6), (2, 0.7), (3, 0.75)], "site B": [(1, 0.55), (2, 0.6), (3, 0.7)]}
    _check_png(plots.plot_learning_curves(hist, tmp_path / "lc.png", "Validation AUC", "AUC"), min_px=400)


def test_bad_plot_input_names_the_curve(tmp_path):
    with pytest.raises(ValueError, match="curve 'CF' is missing"):
        plots.plot_roc({"CF": {"fpr": [0, 1], "tpr": [0, 1]}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="'DL' has 2 values for 3 thresholds"):
        plots.plot_dca([0.1, 0.2, 0.3], {"DL": [0.1, 0.2]}, [0.1, 0.1, 0.1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="series 'A'"):
        plots.plot_learning_curves({"A": [1, 2, 3]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_model_keeps_its_colour_across_figures_whatever_the_order_or_the_other_models(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: drawn.append((k.get("label", ""), k.get("color"))) or real(self, *a, **k))
    roc = {"fpr": [0, 0.5, 1], "tpr": [0, 0.8, 1], "auc": 0.7}
    plots.plot_roc({"MRI DL model": roc, "Combined DL model": roc}, tmp_path / "a.png")
    plots.plot_roc({"CF model": roc, "Combined DL model": roc}, tmp_path / "b.png")
    t = [0.1, 0.2, 0.3]
    plots.plot_dca(t, {"Combined DL model": [0.1, 0.05, 0.0], "CF model": [0.1, 0.0, -0.1]}, [0.1, 0.0, -0.2], tmp_path / "c.png")
    plots.plot_calibration({"MRI DL model": ([0.2, 0.8], [0.1, 0.9])}, tmp_path / "d.png")
    colours: dict[str, set] = {}
    for label, colour in drawn:
        for model in plots.MODEL_COLOURS:
            if label.startswith(model):
                colours.setdefault(model, set()).add(colour)
    assert colours == {m: {c} for m, c in plots.MODEL_COLOURS.items()}
    assert len(set(plots.MODEL_COLOURS.values())) == 3


def test_report_figures_draw_no_curve_from_one_cell_and_give_calibration_groups_their_wilson_interval(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from server.report import _figures

    drawn, bars = [], []
    real_plot, real_bar = Axes.plot, Axes.errorbar
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: drawn.append((k.get("label", ""), a)) or real_plot(self, *a, **k))
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, **k: bars.append((k["label"], x, y, k["yerr"]))
                        or real_bar(self, x, y, **k))
    t = M.DEFAULT_THRESHOLDS
    neg, pos = np.array([8, 4, 2]), np.array([1, 3, 6])  # three cells
    edges = np.array([0.0, 0.3, 0.6, 1.0])
    fpr, tpr = M.roc_from_histograms(neg, pos)
    cell = lambda e, n, p: {"cell_edges": list(e), "cell_neg": list(n), "cell_pos": list(p),  # noqa: E731
                            "net_benefit": M.net_benefit_from_cells(np.asarray(e), np.asarray(n), np.asarray(p), t).tolist(),
                            "calib_mean_pred": [0.5] * len(n), "calib_obs_rate": list(np.divide(p, np.add(n, p)))}
    res = {"thresholds_grid": list(t), "learning_curves": {},
           "rows": [{"cohort": "ext", "model": "cf", "cells": 1, "auc": 0.79, "auc_ci_low": 0.6, "auc_ci_high": 0.9},
                    {"cohort": "ext", "model": "dl", "cells": 3, "auc": 0.90, "auc_ci_low": 0.8, "auc_ci_high": 0.97}],
           "curves": {"ext": {"cf": cell([0.0, 1.0], [14], [10]),
                              "dl": {**cell(edges, neg, pos), "fpr": fpr.tolist(), "tpr": tpr.tolist()},
                              "treat_all": M.net_benefit_treat_all(np.repeat([1, 0], [10, 14]), t).tolist()}}}
    _figures(tmp_path, res)
    assert {p.name for p in tmp_path.glob("*.png")} == {"roc-ext.png", "dca-ext.png", "calibration-ext.png"}
    with_data = {label for label, a in drawn if a and len(a[0])}
    assert not any(label.startswith("CF model") for label in with_data)  # no ROC or decision curve from one cell
    notes = [label for label, a in drawn if label.startswith("CF model")]
    assert notes == ["CF model: AUC 0.79 (exact); no curve: one score cell"] * 2  # ROC and DCA legends
    assert any(label.startswith("MRI DL model: AUC 0.90 (0.80-0.97); exact AUC, curve through 3 score cells")
               for label in with_data)
    cal = {label: (x, y, yerr) for label, x, y, yerr in bars}
    _, y, yerr = cal["MRI DL model (95% CI per group)"]
    lo, hi = M.wilson_ci(pos, neg + pos)
    np.testing.assert_allclose(y - yerr[0], lo)
    np.testing.assert_allclose(y + yerr[1], hi)
    assert "CF model (95% CI per group)" in cal  # one group is still one honest calibration point


def test_wilson_interval():
    lo, hi = M.wilson_ci([5, 0, 3], [10, 4, 0])
    np.testing.assert_allclose([lo[0], hi[0]], [0.2366, 0.7634], atol=1e-4)  # the textbook 5 / 10
    assert lo[1] == 0.0 and 0.45 < hi[1] < 0.5 and np.isnan(lo[2]) and np.isnan(hi[2])
