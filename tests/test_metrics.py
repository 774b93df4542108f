"""Metrics against references nobody here wrote: scikit-learn, MLstatkit (DeLong), dcurves (net
benefit on its bundled data), statsmodels (recalibration GLMs), plus hand-checked known answers."""
from __future__ import annotations

import json
import math
import os

import dcurves
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from MLstatkit import Bootstrapping, Delong_test
from scipy import stats
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score, roc_curve

from common import metrics as M
from common.logistic import LogisticFitError

Z975 = stats.norm.ppf(0.975)


def _tied_scores(n: int, seed: int, signal: float = 1.0, decimals: int = 1):
    """Labels and scores rounded to few decimals, so many scores tie within and across classes."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    p = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1.2, n))))
    return y, np.round(p, decimals)


def _dcurves_binary() -> pd.DataFrame:
    return pd.read_csv(os.path.join(dcurves.data, "df_binary.csv"))


# --------------------------------------------------------------------------- AUC / DeLong
@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn_with_ties(seed):
    y, p = _tied_scores(150, seed)
    assert M.auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_delong_variance_matches_mlstatkit_with_ties(seed):
    y, p = _tied_scores(120 + 20 * seed, seed, decimals=1 + seed % 2)
    # MLstatkit exposes var(AUC_B - AUC_A); a constant model A has zero structural components,
    # so var_diff is exactly var(AUC_B): an independent DeLong variance.
    *_, info = Delong_test(y, np.zeros_like(p), p)
    assert info["method"] == "delong"
    assert M.delong_auc_variance(y, p) == pytest.approx(info["var_diff"], rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_paired_delong_test_matches_mlstatkit(seed):
    y, p1 = _tied_scores(140, seed, signal=1.2)
    rng = np.random.default_rng(100 + seed)
    p2 = np.round(np.clip(p1 + rng.normal(0, 0.15, p1.size), 0, 1), 2)
    z_ref, p_ref, ci_a, ci_b, auc_a, auc_b, info = Delong_test(y, p2, p1)  # z = (AUC_p1 - AUC_p2) / SE
    z, pv = M.delong_test(y, p1, p2)
    assert z == pytest.approx(z_ref, rel=1e-8)
    assert pv == pytest.approx(p_ref, rel=1e-8)
    a, lo, hi = M.delong_ci(y, p1)
    assert (a, lo, hi) == pytest.approx((auc_b, *ci_b), abs=1e-10)


def test_delong_ci_known_answer_from_the_definition():
    """Positives (0.9, 0.6, 0.4), negatives (0.7, 0.4, 0.2), worked by hand:
    psi rows per positive: (1,1,1), (0,1,1), (0,1/2,1) -> AUC = 6.5/9 = 13/18;
    V10 = (1, 2/3, 1/2) -> s10 = 7/108; V01 = (1/3, 5/6, 1) -> s01 = 13/108;
    var = s10/3 + s01/3 = 5/81; the upper limit 13/18 + 1.96 * sqrt(5/81) > 1 is clipped to 1."""
    y = [1, 1, 1, 0, 0, 0]
    p = [0.9, 0.6, 0.4, 0.7, 0.4, 0.2]
    assert M.auc(y, p) == pytest.approx(13 / 18, abs=1e-15)
    assert M.delong_auc_variance(y, p) == pytest.approx(5 / 81, abs=1e-15)
    a, lo, hi = M.delong_ci(y, p)
    assert lo == pytest.approx(13 / 18 - Z975 * math.sqrt(5 / 81), abs=1e-12)
    assert hi == 1.0


def test_delong_test_of_a_model_with_itself_is_null_and_detects_a_real_difference():
    y, p = _tied_scores(200, 3, signal=1.5, decimals=3)
    assert M.delong_test(y, p, p) == (0.0, 1.0)
    noise = np.random.default_rng(0).random(p.size)
    z, pv = M.delong_test(y, p, noise)
    assert z > 0 and pv < 1e-6


def test_bootstrap_ci_agrees_with_mlstatkit_bootstrap_and_delong():
    y, p = _tied_scores(200, 11, signal=1.0, decimals=2)
    a, lo, hi = M.bootstrap_auc_ci(y, p, n_boot=2000, seed=0)
    assert a == pytest.approx(roc_auc_score(y, p))
    assert lo < a < hi
    _, ref_lo, ref_hi = Bootstrapping(y, p, metric_str="roc_auc", n_bootstraps=1000, random_state=0)
    # different resampling schemes and seeds: agreement within Monte-Carlo error (~0.01)
    assert lo == pytest.approx(ref_lo, abs=0.02) and hi == pytest.approx(ref_hi, abs=0.02)
    _, d_lo, d_hi = M.delong_ci(y, p)
    assert lo == pytest.approx(d_lo, abs=0.02) and hi == pytest.approx(d_hi, abs=0.02)
    assert M.bootstrap_auc_ci(y, p, n_boot=300, seed=5) == M.bootstrap_auc_ci(y, p, n_boot=300, seed=5)


def test_exact_roc_curve_equals_sklearn_and_integrates_to_the_auc():
    y, p = _tied_scores(130, 21, decimals=2)
    fpr, tpr, thr = M.roc_curve(y, p)
    ref_fpr, ref_tpr, ref_thr = roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-15)
    np.testing.assert_array_equal(thr[1:], ref_thr[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.auc(y, p), abs=1e-12)


# --------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize("seed", range(3))
def test_youden_threshold_reaches_sklearn_roc_maximum(seed):
    y, p = _tied_scores(160, seed, decimals=2)
    fpr, tpr, _ = roc_curve(y, p)
    t = M.youden_threshold(y, p)
    tm = M.threshold_metrics(y, p, t)
    assert tm["sensitivity"] + tm["specificity"] - 1 == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    assert not np.any(np.isclose(p, t))  # a midpoint, never a score itself


def test_threshold_metrics_match_sklearn_confusion_matrix():
    y, p = _tied_scores(100, 4, decimals=2)
    t = 0.43
    tn, fp, fn, tp = confusion_matrix(y, (p >= t).astype(int)).ravel()
    tm = M.threshold_metrics(y, p, t)
    assert (tm["tp"], tm["fp"], tm["tn"], tm["fn"]) == (tp, fp, tn, fn)
    assert tm["sensitivity"] == tp / (tp + fn) and tm["specificity"] == tn / (tn + fp)
    assert tm["ppv"] == tp / (tp + fp) and tm["npv"] == tn / (tn + fn)
    assert tm["accuracy"] == (tp + tn) / 100
    none_positive = M.threshold_metrics(y, p, 1.01)
    assert math.isnan(none_positive["ppv"]) and none_positive["specificity"] == 1.0


def test_development_threshold_is_applied_to_test_data_unchanged():
    y_dev, p_dev = _tied_scores(150, 1, decimals=3)
    y_test, p_test = _tied_scores(80, 2, decimals=3)
    t = M.youden_threshold(y_dev, p_dev)
    s = M.summarize(y_test, p_test, threshold=t)
    assert s["threshold"] == t
    assert s["sensitivity"] == M.threshold_metrics(y_test, p_test, t)["sensitivity"]


# --------------------------------------------------------------------------- calibration
def test_brier_matches_sklearn():
    y, p = _tied_scores(90, 5, decimals=3)
    assert M.brier(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-15)


def test_calibration_intercept_and_slope_match_statsmodels_glm():
    rng = np.random.default_rng(7)
    lp = rng.normal(-0.5, 1.5, 300)
    y = (rng.random(300) < 1 / (1 + np.exp(-(0.3 + 0.6 * lp)))).astype(int)
    p = 1 / (1 + np.exp(-lp))
    a, b = M.calibration_intercept_slope(y, p)
    fam = sm.families.Binomial()
    slope_ref = sm.GLM(y, sm.add_constant(lp), family=fam).fit(tol=1e-12).params[1]
    icpt_ref = sm.GLM(y, np.ones((300, 1)), family=fam, offset=lp).fit(tol=1e-12).params[0]
    assert b == pytest.approx(slope_ref, abs=1e-7)
    assert a == pytest.approx(icpt_ref, abs=1e-7)


def test_calibration_of_true_probabilities_is_ideal_and_overfit_ones_are_flagged():
    rng = np.random.default_rng(8)
    p = rng.beta(2, 3, 4000)
    y = (rng.random(p.size) < p).astype(int)
    a, b = M.calibration_intercept_slope(y, p)
    assert abs(a) < 0.1 and abs(b - 1) < 0.1
    assert M.hosmer_lemeshow(y, p)[1] > 0.01
    lp = np.log(p / (1 - p))
    extreme = 1 / (1 + np.exp(-2.5 * lp))  # over-confident: slope about 1 / 2.5
    a2, b2 = M.calibration_intercept_slope(y, extreme)
    assert b2 == pytest.approx(0.4, abs=0.05)
    assert M.hosmer_lemeshow(y, extreme)[1] < 1e-6


def test_hosmer_lemeshow_known_answer():
    """Three risk groups of 10 at p = 0.2, 0.5, 0.8 with 1, 5, 9 events (expected 2, 5, 8):
    chi2 = 1/2 + 1/8 + 0 + 0 + 1/8 + 1/2 = 1.25 on 3 - 2 = 1 df."""
    p = np.repeat([0.2, 0.5, 0.8], 10)
    y = np.concatenate([[1] * 1 + [0] * 9, [1] * 5 + [0] * 5, [1] * 9 + [0] * 1])
    stat, pv = M.hosmer_lemeshow(y, p, groups=3)
    assert stat == pytest.approx(1.25, abs=1e-12)
    assert pv == pytest.approx(stats.chi2.sf(1.25, 1), abs=1e-12)


def test_calibration_bins_are_poolable_aggregates():
    y, p = _tied_scores(200, 9, decimals=3)
    mean_pred, obs, counts = M.calibration_bins(y, p, bins=10)
    assert counts.sum() == 200
    full = counts > 0
    edges = np.arange(11) / 10
    assert np.all((mean_pred[full] >= edges[:-1][full]) & (mean_pred[full] <= edges[1:][full]))
    assert np.all(np.isnan(obs[~full]))
    # two sites' aggregates combine (count-weighted) into the pooled ones
    m1, o1, c1 = M.calibration_bins(y[:70], p[:70], bins=10)
    m2, o2, c2 = M.calibration_bins(y[70:], p[70:], bins=10)
    pooled_obs = (np.nan_to_num(o1) * c1 + np.nan_to_num(o2) * c2)[full] / counts[full]
    np.testing.assert_allclose(pooled_obs, obs[full], atol=1e-12)
    np.testing.assert_array_equal(c1 + c2, counts)


# --------------------------------------------------------------------------- decision curves
def test_net_benefit_equals_dcurves_on_its_bundled_data():
    df = _dcurves_binary()
    t = M.DEFAULT_THRESHOLDS
    ref = dcurves.dca(data=df, outcome="cancer", modelnames=["cancerpredmarker", "famhistory"], thresholds=t)
    y = df["cancer"].astype(int).to_numpy()
    for model in ("cancerpredmarker", "famhistory"):
        expected = ref.loc[ref["model"] == model, "net_benefit"].to_numpy(dtype=float)
        np.testing.assert_allclose(M.net_benefit(y, df[model].to_numpy(), t), expected, atol=1e-12)
    expected_all = ref.loc[ref["model"] == "all", "net_benefit"].to_numpy(dtype=float)
    np.testing.assert_allclose(M.net_benefit_treat_all(y, t), expected_all, atol=1e-12)


def test_net_benefit_equals_dcurves_when_scores_sit_exactly_on_thresholds():
    df = _dcurves_binary()
    df["rounded"] = np.round(df["cancerpredmarker"], 2)  # many scores equal a threshold: p >= t counts them
    t = M.DEFAULT_THRESHOLDS
    ref = dcurves.dca(data=df, outcome="cancer", modelnames=["rounded"], thresholds=t)
    expected = ref.loc[ref["model"] == "rounded", "net_benefit"].to_numpy(dtype=float)
    y = df["cancer"].astype(int).to_numpy()
    assert np.isin(df["rounded"], t).sum() > 100
    np.testing.assert_allclose(M.net_benefit(y, df["rounded"].to_numpy(), t), expected, atol=1e-12)
    neg, pos = M.score_histograms(y, df["rounded"].to_numpy())
    np.testing.assert_allclose(M.net_benefit_from_histograms(neg, pos, t), expected, atol=1e-12)


def test_net_benefit_from_histograms_is_exact_on_bin_edges_dcurves_data():
    df = _dcurves_binary()
    y, p = df["cancer"].astype(int).to_numpy(), df["cancerpredmarker"].to_numpy()
    neg, pos = M.score_histograms(y, p, bins=100)
    np.testing.assert_allclose(M.net_benefit_from_histograms(neg, pos), M.net_benefit(y, p), atol=1e-12)


def test_net_benefit_from_histograms_off_edges_is_within_the_straddling_bin():
    y, p = _tied_scores(300, 12, decimals=4)
    bins = 20
    neg, pos = M.score_histograms(y, p, bins=bins)
    t = M.DEFAULT_THRESHOLDS  # most are not on a 0.05 edge
    err = np.abs(M.net_benefit_from_histograms(neg, pos, t) - M.net_benefit(y, p, t))
    k = np.minimum((t * bins).astype(int), bins - 1)
    # bound: every patient of the straddling bin may be misclassified
    bound = (pos[k] + neg[k] * t / (1 - t)) / y.size
    assert np.all(err <= bound + 1e-12)
    assert err.max() > 0  # the bins really are coarse here: the bound is what is tested
    on_edge = np.isclose(t * bins, np.round(t * bins))
    assert np.all(err[on_edge] < 1e-12)


# --------------------------------------------------------------------------- histogram path
@pytest.mark.parametrize("bins", [10, 100])
def test_auc_from_histograms_within_shared_bin_bound(bins):
    rng = np.random.default_rng(bins)
    y = (rng.random(400) < 0.35).astype(int)
    p = 1 / (1 + np.exp(-(1.2 * (2 * y - 1) + rng.normal(0, 1.5, 400))))
    neg, pos = M.score_histograms(y, p, bins=bins)
    exact = M.auc(y, p)
    binned = M.auc_from_histograms(neg, pos)
    bound = float(np.sum(neg * pos)) / (2 * neg.sum() * pos.sum())  # pairs sharing a bin, each off by <= 1/2
    assert abs(binned - exact) <= bound
    if bins == 10:
        assert abs(binned - exact) > 1e-4  # coarse bins do change the value; the bound holds anyway
    fpr, tpr = M.roc_from_histograms(neg, pos)
    assert np.trapezoid(tpr, fpr) == pytest.approx(binned, abs=1e-12)


def test_histograms_from_sites_add_up_to_the_pooled_roc():
    y, p = _tied_scores(300, 13, decimals=3)
    cuts = [0, 90, 200, 300]
    parts = [M.score_histograms(y[a:b], p[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    neg = sum(h[0] for h in parts)
    pos = sum(h[1] for h in parts)
    ref_neg, ref_pos = M.score_histograms(y, p)
    np.testing.assert_array_equal(neg, ref_neg)
    np.testing.assert_array_equal(pos, ref_pos)
    fpr, tpr = M.roc_from_histograms(neg, pos)
    # every binned ROC point is an exact ROC point at the threshold "p >= bin edge"
    edges = np.arange(100, -1, -1) / 100
    for f, t_, e in zip(fpr[1:], tpr[1:], edges[1:]):
        assert t_ == pytest.approx(np.mean(p[y == 1] >= e)) and f == pytest.approx(np.mean(p[y == 0] >= e))
    # three-decimal scores on 100 bins: only pairs sharing a bin can differ from the exact AUC
    assert abs(M.auc_from_histograms(neg, pos) - M.auc(y, p)) <= np.sum(neg * pos) / (2 * neg.sum() * pos.sum())


def test_two_decimal_scores_on_100_bins_give_the_exact_auc():
    y, p = _tied_scores(250, 14, decimals=2)  # every bin holds one score value: ties are real ties
    neg, pos = M.score_histograms(y, p)
    assert M.auc_from_histograms(neg, pos) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


# --------------------------------------------------------------------------- summary and errors
def test_summarize_is_json_friendly_and_consistent():
    y, p = _tied_scores(120, 15, decimals=3)
    s = M.summarize(y, p)
    assert list(s) == list(M.SUMMARY_KEYS)
    assert all(type(v) in (int, float) for v in s.values())
    json.dumps(s)
    assert s["n"] == 120 and s["n_pos"] == int(np.sum(y))
    assert (s["auc"], s["auc_ci_low"], s["auc_ci_high"]) == pytest.approx(M.delong_ci(y, p))
    assert s["threshold"] == M.youden_threshold(y, p)
    assert (s["calib_intercept"], s["calib_slope"]) == pytest.approx(M.calibration_intercept_slope(y, p))
    assert (s["hl_stat"], s["hl_p"]) == pytest.approx(M.hosmer_lemeshow(y, p))
    assert s["brier"] == pytest.approx(brier_score_loss(y, p))


def test_summarize_perfect_separation_leaves_only_the_slope_undefined():
    s = M.summarize([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    assert s["auc"] == 1.0 and s["sensitivity"] == 1.0 and s["specificity"] == 1.0
    assert math.isnan(s["calib_slope"])
    assert s["calib_intercept"] == pytest.approx(M.calibration_intercept([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]))
    assert math.isfinite(s["calib_intercept"])
    with pytest.raises(LogisticFitError):
        M.calibration_slope([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.7, 0.8])


def test_summarize_single_class_site_gives_nan_only_where_undefined():
    s = M.summarize([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], threshold=0.25)
    assert all(math.isnan(s[k]) for k in ("auc", "auc_ci_low", "auc_ci_high", "calib_intercept", "calib_slope"))
    assert math.isnan(s["sensitivity"])  # no positives: undefined
    assert s["specificity"] == 0.5 and s["accuracy"] == 0.5 and s["n_pos"] == 0
    assert s["brier"] == pytest.approx(np.mean(np.square([0.1, 0.2, 0.3, 0.4])))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: M.auc([0, 1, 2], [0.1, 0.2, 0.3]), "expected 0/1"),
        (lambda: M.auc([0, 1], [0.1, 0.2, 0.3]), "same length"),
        (lambda: M.auc([1, 1, 1], [0.1, 0.2, 0.3]), "both outcomes"),
        (lambda: M.auc([0, 1], [0.1, np.nan]), "finite"),
        (lambda: M.brier([0, 1], [0.1, 1.2]), r"probabilities in \[0, 1\]"),
        (lambda: M.net_benefit([0, 1], [0.1, 0.2], [0.0, 0.5]), "strictly between 0 and 1"),
        (lambda: M.auc_from_histograms([1, 2], [0, 0]), "both classes"),
        (lambda: M.roc_from_histograms([1, 2], [1]), "equal length"),
        (lambda: M.delong_auc_variance([0, 1, 1], [0.1, 0.2, 0.3]), "at least 2 positives and 2 negatives"),
    ],
)
def test_bad_input_names_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- k-safe score cells (the disclosure-controlled histogram path) ---------------------------------
def test_k_safe_cells_hold_zero_or_at_least_k_of_each_class_and_keep_the_auc_close():
    rng = np.random.default_rng(4)
    y = (rng.random(176) < 0.4).astype(int)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    for k in (3, 5, 10, 20):
        edges, neg, pos, cell = M.k_safe_cells(y, p, k, bins=100)
        assert np.all((neg == 0) | (neg >= k)) and np.all((pos == 0) | (pos >= k))
        assert neg.sum() == (y == 0).sum() and pos.sum() == (y == 1).sum()
        np.testing.assert_array_equal(np.bincount(cell[y == 1], minlength=len(pos)), pos)  # cells of the patients
        bound = np.sum(neg * pos) / (2 * neg.sum() * pos.sum())
        assert abs(M.auc_from_histograms(neg, pos) - M.auc(y, p)) <= bound + 1e-12
        assert edges[0] == 0 and edges[-1] == 1 and np.all(np.diff(edges) > 0)


def test_k_safe_cuts_refuse_a_class_smaller_than_k():
    with pytest.raises(M.DegenerateStatistic, match="fewer than k = 10"):
        M.k_safe_cuts([5, 5, 5], [3, 3, 3], 10)
    assert M.k_safe_cuts([5, 5, 0], [0, 0, 0], 10).tolist() == [0, 2, 3]  # an empty class is fine


def test_k_safe_merge_minimises_the_tie_mass():
    # negatives low, positives high, a mixed bin in the middle: pure cells where possible
    neg = np.array([10, 0, 3, 0, 0])
    pos = np.array([0, 0, 3, 0, 10])
    cuts = M.k_safe_cuts(neg, pos, 3)
    n = np.add.reduceat(neg, cuts[:-1])
    q = np.add.reduceat(pos, cuts[:-1])
    assert int(np.sum(n * q)) == 9  # only the mixed bin ties (3 x 3); nothing else merged into it


def test_operating_points_and_net_benefit_from_cells_are_exact_on_edges():
    rng = np.random.default_rng(5)
    y = (rng.random(120) < 0.4).astype(int)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    edges, neg, pos, _ = M.k_safe_cells(y, p, 5)
    for t in edges[1:-1]:
        op = M.operating_point_from_cells(edges, neg, pos, t)
        ex = M.threshold_metrics(y, p, t)
        assert not op["interpolated"]
        assert op["sensitivity"] == pytest.approx(ex["sensitivity"]) and op["specificity"] == pytest.approx(ex["specificity"])
        assert M.net_benefit_from_cells(edges, neg, pos, [t])[0] == pytest.approx(M.net_benefit(y, p, [t])[0])
    inside = (edges[1] + edges[2]) / 2
    assert M.operating_point_from_cells(edges, neg, pos, inside)["interpolated"] == bool(neg[1] + pos[1])


def test_pooled_cells_of_two_sites_keep_the_counts():
    rng = np.random.default_rng(6)
    parts = []
    for n in (80, 50):
        y = (rng.random(n) < 0.5).astype(int)
        p = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1)
        parts.append(M.k_safe_cells(y, p, 5)[:3])
    edges, neg, pos = M.pool_cells(parts)
    assert neg.sum() == pytest.approx(sum(p[1].sum() for p in parts))
    assert pos.sum() == pytest.approx(sum(p[2].sum() for p in parts))
    assert set(np.round(parts[0][0], 9)) <= set(np.round(edges, 9))


def test_youden_tie_break_is_the_highest_threshold_on_scores_and_on_cells():
    # two cuts with the same Youden index: both rules pick the higher one
    y = np.array([0, 0, 1, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.35, 0.45, 0.65, 0.85])
    t_exact = M.youden_threshold(y, p)
    edges = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    neg, pos = M.score_histograms(y, p, bins=10)
    t_cells = M.youden_from_cells(edges, neg, pos)
    assert t_exact == pytest.approx(0.55) and t_cells == pytest.approx(0.6)  # the same cut, above 0.45 and below 0.65
    assert M.threshold_metrics(y, p, t_exact) == M.threshold_metrics(y, p, t_cells)


def test_degenerate_statistics_are_reported_not_fatal():
    y = np.array([0, 0, 1, 1, 0, 1])
    # identical rankings with a shifted score: zero-variance difference, equal AUCs -> z 0, p 1
    assert M.delong_test(y, [0.1, 0.2, 0.7, 0.8, 0.3, 0.9], [0.2, 0.3, 0.8, 0.9, 0.4, 1.0]) == (0.0, 1.0)
    # a constant score against a perfect one: AUC 0.5 vs 1, yet zero variance of the difference
    with pytest.raises(M.DegenerateStatistic, match="zero variance"):
        M.delong_test([0, 0, 1, 1], [0.1] * 4, [0.1, 0.1, 0.3, 0.3])
    # hard 0/1 scores equal to the outcomes are clipped to offsets of +-L = +-18.4 logits, so the
    # intercept-only fit has a finite maximum: 1 - s(a + L) - 2 s(a - L) = 0 gives e^(-2a) = 2 up to
    # terms of order e^-L, i.e. a = -ln(2) / 2 (statsmodels' GLM with the same offsets agrees)
    y3, hard = np.array([0, 0, 1]), np.array([0.0, 0.0, 1.0])
    half_ln2 = -math.log(2) / 2
    assert M.calibration_intercept(y3, hard) == pytest.approx(half_ln2, abs=1e-6)
    lp3 = M._logit(hard)
    ref = sm.GLM(y3, np.ones((3, 1)), family=sm.families.Binomial(), offset=lp3).fit(tol=1e-12).params[0]
    assert ref == pytest.approx(half_ln2, abs=1e-6)
    # what has no finite fit is the slope: these scores separate the classes perfectly, so the
    # log-likelihood keeps increasing with b (checked here) and the solver must report it
    ll = [float(np.sum(y3 * (b * lp3) - np.logaddexp(0, b * lp3))) for b in (1.0, 2.0, 4.0)]
    assert ll[0] < ll[1] < ll[2] < 0
    with pytest.raises(LogisticFitError):
        M.calibration_slope(y3, hard)
    # reversed (perfectly wrong) hard scores separate too: the slope runs to -infinity
    with pytest.raises(LogisticFitError):
        M.calibration_slope(y3, 1.0 - hard)
    s = M.summarize(y3, hard)
    assert np.isnan(s["calib_slope"]) and s["auc"] == 1.0
    assert s["calib_intercept"] == pytest.approx(half_ln2, abs=1e-6)


def test_k_safe_cells_keep_the_best_k_safe_youden_cut_so_the_threshold_is_exact():
    rng = np.random.default_rng(8)
    y = (rng.random(176) < 0.4).astype(int)
    p = np.clip(rng.normal(0.35 + 0.25 * y, 0.15), 0, 1)
    neg, pos = M.score_histograms(y, p, bins=100)
    j = M.youden_edge(neg, pos, 10)
    edges, cn, cp, _ = M.k_safe_cells(y, p, 10)
    assert j / 100 in set(np.round(edges, 12))
    t = M.youden_from_cells(edges, cn, cp)
    # the same threshold as on the full 100-bin grid (when that cut is k-safe), sens / spec exact
    sens_full = pos[j:].sum() / pos.sum()
    assert t == pytest.approx(j / 100)
    assert M.operating_point_from_cells(edges, cn, cp, t)["sensitivity"] == pytest.approx(sens_full)
