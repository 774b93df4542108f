"""Discrimination, calibration and clinical-utility metrics for a binary risk score (numpy/scipy only).

Conventions used everywhere in this module:
- `y` holds 0/1 labels (1 = SLM), `p` the predicted probability of SLM (any real score works for the
  ranking metrics; calibration and decision curves need probabilities in [0, 1]).
- A patient is "test positive" at threshold t when p >= t (the rule of `dcurves` and pROC).
- AUC ties between a positive and a negative count 1/2 (Mann-Whitney).

The histogram functions are the privacy-preserving path: a site shares per-class counts of its
scores on equal-width bins of [0, 1] instead of per-patient scores; counts from several sites add up,
and pooled ROC / AUC / net benefit are computed from the sums.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

from common.logistic import LogisticFitError, newton_fit, suff_stats

class DegenerateStatistic(ValueError):
    """A statistic is undefined on these data (reported as n/a with this reason, never fatal)."""


DEFAULT_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
_PROB_EPS = 1e-8  # probabilities are clipped to [eps, 1 - eps] before taking logits


# --------------------------------------------------------------------------- input checks
def _check(y, p, *, need_both: bool = True, probs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and scores: expected the same length, found {y.shape[0]} labels and {p.shape[0]} scores")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"labels: expected 0/1, found {sorted(set(np.unique(y)) - {0.0, 1.0})[:5]}")
    if not np.isfinite(p).all():
        raise ValueError(f"scores: expected finite values, found {int((~np.isfinite(p)).sum())} NaN/inf")
    if probs and ((p < 0).any() or (p > 1).any()):
        raise ValueError(f"scores: expected probabilities in [0, 1], found range [{p.min():.4g}, {p.max():.4g}]")
    if need_both:
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == y.size:
            raise ValueError(
                f"labels: expected both outcomes (0 and 1), found {y.size} patients with only "
                f"{'1' if n_pos else '0'}; AUC-type metrics are undefined"
            )
    return y.astype(np.int8), p


# --------------------------------------------------------------------------- AUC and DeLong
def loss_and_auc(y, p) -> tuple[float, float]:
    """Mean (unweighted) binary cross-entropy of probabilities, and the AUC (NaN with one class)."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    loss = float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)))
    return loss, (auc(y, p) if 0 < y.sum() < y.size else float("nan"))


def auc(y, p) -> float:
    """Area under the ROC curve (Mann-Whitney, ties 1/2) from midranks."""
    y, p = _check(y, p)
    m = int(y.sum())
    n = y.size - m
    ranks = stats.rankdata(p)
    return float((ranks[y == 1].sum() - m * (m + 1) / 2.0) / (m * n))


def _structural_components(y: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components V10 (per positive) and V01 (per negative).

    Fast midrank algorithm (Sun & Xu 2014): with Tz the midranks over all scores and Tx / Ty the
    midranks within positives / negatives, V10_i = (Tz_i - Tx_i) / n and V01_j = 1 - (Tz_j - Ty_j) / m.
    """
    pos, neg = p[y == 1], p[y == 0]
    m, n = pos.size, neg.size
    tz = stats.rankdata(np.concatenate([pos, neg]))
    tx = stats.rankdata(pos)
    ty = stats.rankdata(neg)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    a = float(v10.mean())
    return a, v10, v01


def delong_auc_variance(y, p) -> float:
    """DeLong's variance of the empirical AUC: var(V10) / m + var(V01) / n (sample variances)."""
    y, p = _check(y, p)
    _, v10, v01 = _structural_components(y, p)
    if v10.size < 2 or v01.size < 2:
        raise ValueError(
            f"DeLong variance: expected at least 2 positives and 2 negatives, found {v10.size} and {v01.size}"
        )
    return float(np.var(v10, ddof=1) / v10.size + np.var(v01, ddof=1) / v01.size)


def delong_ci(y, p, alpha: float = 0.05) -> tuple[float, float, float]:
    """(auc, lo, hi): Wald interval on the AUC scale with DeLong's SE, clipped to [0, 1] like pROC."""
    a = auc(y, p)
    se = math.sqrt(delong_auc_variance(y, p))
    z = float(stats.norm.ppf(1.0 - alpha / 2.0))
    return a, max(0.0, a - z * se), min(1.0, a + z * se)


def delong_test(y, p1, p2) -> tuple[float, float]:
    """Paired DeLong test of AUC(p1) = AUC(p2) on the same patients: (z, two-sided p).

    z = (AUC1 - AUC2) / SE(diff). When the difference has zero variance (identical rankings)
    z is 0 and p is 1 if the AUCs are equal; otherwise the test is undefined and raises
    DegenerateStatistic (callers report it as n/a with that reason).
    """
    y, p1 = _check(y, p1)
    _, p2 = _check(y, p2)
    a1, v10a, v01a = _structural_components(y, p1)
    a2, v10b, v01b = _structural_components(y, p2)
    m, n = v10a.size, v01a.size
    if m < 2 or n < 2:
        raise ValueError(f"DeLong test: expected at least 2 positives and 2 negatives, found {m} and {n}")
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    cov = s10 / m + s01 / n
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    diff = a1 - a2
    if var <= 1e-15:
        if abs(diff) < 1e-12:
            return 0.0, 1.0
        raise DegenerateStatistic("DeLong test: the AUC difference has zero variance but the AUCs differ "
                                  "(undefined; a bootstrap test is needed)")
    z = diff / math.sqrt(var)
    return float(z), float(2.0 * stats.norm.sf(abs(z)))


def bootstrap_auc_ci(y, p, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(auc, lo, hi) by the percentile bootstrap (stratified: positives and negatives resampled
    separately, so every resample keeps the observed class counts, as pROC's default does)."""
    y, p = _check(y, p)
    if n_boot < 1:
        raise ValueError(f"n_boot: expected >= 1, found {n_boot}")
    rng = np.random.default_rng(seed)
    pos, neg = p[y == 1], p[y == 0]
    m, n = pos.size, neg.size
    bp = pos[rng.integers(0, m, size=(n_boot, m))]
    bn = neg[rng.integers(0, n, size=(n_boot, n))]
    ranks = stats.rankdata(np.hstack([bp, bn]), axis=1)
    aucs = (ranks[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    lo, hi = np.quantile(aucs, [alpha / 2.0, 1.0 - alpha / 2.0])
    return auc(y, p), float(lo), float(hi)


def roc_curve(y, p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC: (fpr, tpr, thresholds) for "positive when p >= threshold", one point per distinct
    score from the highest down, preceded by (0, 0) at threshold +inf."""
    y, p = _check(y, p)
    u = np.unique(p)[::-1]
    pos = np.sort(p[y == 1])
    neg = np.sort(p[y == 0])
    tpr = (pos.size - np.searchsorted(pos, u, side="left")) / pos.size
    fpr = (neg.size - np.searchsorted(neg, u, side="left")) / neg.size
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, u]


# --------------------------------------------------------------------------- threshold metrics
def youden_threshold(y, p) -> float:
    """Threshold maximising sensitivity + specificity - 1 on these (development) data.

    Candidates are midpoints between consecutive distinct scores (as pROC), so the cut applies
    cleanly to new patients; ties in the Youden index go to the highest threshold (fewer positives).
    With a single distinct score there is no cut: that score is returned (everyone test positive).
    """
    y, p = _check(y, p)
    u = np.unique(p)
    if u.size == 1:
        return float(u[0])
    cands = (u[:-1] + u[1:]) / 2.0
    m = int(y.sum())
    n = y.size - m
    pos = np.sort(p[y == 1])
    neg = np.sort(p[y == 0])
    tp = m - np.searchsorted(pos, cands, side="left")
    fp = n - np.searchsorted(neg, cands, side="left")
    j = tp / m - fp / n
    best = np.flatnonzero(j >= j.max() - 1e-12)
    return float(cands[best[-1]])


def threshold_metrics(y, p, threshold: float) -> dict:
    """Confusion counts and rates at `threshold` (positive when p >= threshold).

    A rate whose denominator is zero (e.g. PPV with no test positives) is NaN: undefined, not 0.
    """
    y, p = _check(y, p, need_both=False)
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))

    def rate(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {
        "sensitivity": rate(tp, tp + fn),
        "specificity": rate(tn, tn + fp),
        "ppv": rate(tp, tp + fp),
        "npv": rate(tn, tn + fn),
        "accuracy": rate(tp + tn, y.size),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


# --------------------------------------------------------------------------- calibration
def brier(y, p) -> float:
    """Mean squared difference between predicted probability and outcome."""
    y, p = _check(y, p, need_both=False, probs=True)
    return float(np.mean((p - y) ** 2))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _PROB_EPS, 1.0 - _PROB_EPS)
    return np.log(p) - np.log1p(-p)


def calibration_slope(y, p) -> float:
    """b in logit P(y=1) = a + b * logit(p): ideal 1; < 1 means predictions too extreme (overfit).

    Raises LogisticFitError when no finite fit exists (the scores separate the classes perfectly).
    """
    y, p = _check(y, p, probs=True)
    lp = _logit(p)
    return float(newton_fit(lambda b: suff_stats(lp[:, None], y, b), 2).beta[1])


def calibration_intercept(y, p) -> float:
    """a in logit P(y=1) = a + offset(logit(p)): calibration-in-the-large, ideal 0
    (> 0: risks underestimated on average).

    With both classes present this fit always has a finite maximum: the log-likelihood is strictly
    concave in a and tends to -inf as a -> +-inf. That holds for hard 0/1 scores too, which are
    clipped to offsets of +-18.4 logits (for y = p = [0, 0, 1], a = -ln(2) / 2). Raises
    DegenerateStatistic only if the Newton solver fails numerically anyway. Contrast
    calibration_slope, which has no finite fit when the scores separate the classes perfectly."""
    y, p = _check(y, p, probs=True)
    lp = _logit(p)
    empty = np.zeros((y.size, 0))
    try:
        return float(newton_fit(lambda b: suff_stats(empty, y, b, offset=lp), 1).beta[0])
    except LogisticFitError as exc:  # numerical failure only: the maximum exists (see above)
        raise DegenerateStatistic(f"calibration intercept: no finite fit ({exc})") from None


def calibration_intercept_slope(y, p) -> tuple[float, float]:
    """(intercept, slope) of logistic recalibration (Van Calster et al. 2016, "weak calibration");
    see calibration_intercept and calibration_slope."""
    return calibration_intercept(y, p), calibration_slope(y, p)


def _risk_groups(p: np.ndarray, groups: int) -> np.ndarray:
    """Group index per patient: cut at the quantiles of p (duplicate cut points merged), as
    ResourceSelection::hoslem.test does in R."""
    edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, groups + 1)))
    if edges.size < 2:
        return np.zeros(p.size, dtype=int)
    # right-closed intervals with the lowest included: (e0, e1], (e1, e2], ... and e0 in group 0
    return np.clip(np.searchsorted(edges, p, side="left") - 1, 0, edges.size - 2)


def hosmer_lemeshow(y, p, groups: int = 10) -> tuple[float, float]:
    """Hosmer-Lemeshow goodness-of-fit: (chi-square statistic, p-value with groups - 2 df).

    Groups are risk quantiles; with heavy ties fewer groups may result (df follows the number of
    non-empty groups). Groups whose expected count of events or non-events is 0 contribute only
    through the other class. NaN when fewer than 3 groups remain (no degrees of freedom).
    """
    y, p = _check(y, p, need_both=False, probs=True)
    if groups < 3:
        raise ValueError(f"groups: expected >= 3, found {groups}")
    g = _risk_groups(p, groups)
    stat = 0.0
    used = 0
    for k in np.unique(g):
        sel = g == k
        obs1 = float(y[sel].sum())
        exp1 = float(p[sel].sum())
        obs0 = float(sel.sum()) - obs1
        exp0 = float(sel.sum()) - exp1
        if exp1 > 0:
            stat += (obs1 - exp1) ** 2 / exp1
        if exp0 > 0:
            stat += (obs0 - exp0) ** 2 / exp0
        used += 1
    df = used - 2
    if df < 1:
        return float(stat), float("nan")
    return float(stat), float(stats.chi2.sf(stat, df))


def wilson_ci(events, n, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion events / n (elementwise; NaN where n = 0): unlike the
    normal approximation it stays inside [0, 1] and is usable for the small groups of a calibration plot."""
    events, n = np.asarray(events, dtype=np.float64), np.asarray(n, dtype=np.float64)
    z = stats.norm.ppf(1 - alpha / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = events / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
    return np.where(n > 0, lo, np.nan), np.where(n > 0, hi, np.nan)


def calibration_bins(y, p, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of [0, 1]: (mean predicted, observed event rate, count).

    Aggregates a site can share (the pooled value of a bin is the count-weighted mean of the
    sites'). Empty bins have NaN means and count 0.
    """
    y, p = _check(y, p, need_both=False, probs=True)
    idx = _bin_index(p, bins)
    counts = np.bincount(idx, minlength=bins).astype(np.int64)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.where(counts > 0, sum_p / counts, np.nan)
        obs_rate = np.where(counts > 0, sum_y / counts, np.nan)
    return mean_pred, obs_rate, counts


# --------------------------------------------------------------------------- decision curves
def _check_thresholds(thresholds) -> np.ndarray:
    t = np.asarray(DEFAULT_THRESHOLDS if thresholds is None else thresholds, dtype=np.float64).ravel()
    if t.size == 0 or (t <= 0).any() or (t >= 1).any():
        raise ValueError("thresholds: expected values strictly between 0 and 1")
    return t


def net_benefit(y, p, thresholds=None) -> np.ndarray:
    """Net benefit of treating patients with p >= t: TP/N - FP/N * t / (1 - t), per threshold."""
    y, p = _check(y, p, need_both=False, probs=True)
    t = _check_thresholds(thresholds)
    pos = np.sort(p[y == 1])
    neg = np.sort(p[y == 0])
    tp = pos.size - np.searchsorted(pos, t, side="left")
    fp = neg.size - np.searchsorted(neg, t, side="left")
    return tp / y.size - fp / y.size * t / (1.0 - t)


def net_benefit_treat_all(y, thresholds=None) -> np.ndarray:
    """Net benefit of treating everyone: prevalence - (1 - prevalence) * t / (1 - t)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    if y.size == 0 or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels: expected a non-empty array of 0/1")
    t = _check_thresholds(thresholds)
    prev = float(y.mean())
    return prev - (1.0 - prev) * t / (1.0 - t)


# --------------------------------------------------------------------------- histogram path
def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    """Bin k holds [k/bins, (k+1)/bins); p = 1 goes in the last bin. Edges are k/bins exactly
    (correctly rounded), so thresholds like np.round(0.29, 2) fall exactly on an edge."""
    if bins < 1:
        raise ValueError(f"bins: expected >= 1, found {bins}")
    edges = np.arange(bins + 1) / bins
    return np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)


def score_histograms(y, p, bins: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(neg_counts, pos_counts): per-class counts of p on `bins` equal-width bins of [0, 1]."""
    y, p = _check(y, p, need_both=False, probs=True)
    idx = _bin_index(p, bins)
    neg = np.bincount(idx[y == 0], minlength=bins).astype(np.int64)
    pos = np.bincount(idx[y == 1], minlength=bins).astype(np.int64)
    return neg, pos


def _check_hist(neg, pos, need_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    neg = np.asarray(neg, dtype=np.float64).ravel()
    pos = np.asarray(pos, dtype=np.float64).ravel()
    if neg.shape != pos.shape or neg.size == 0:
        raise ValueError(f"histograms: expected two count arrays of equal length, found {neg.size} and {pos.size}")
    if (neg < 0).any() or (pos < 0).any() or not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("histograms: expected finite counts >= 0")
    if need_both and (neg.sum() == 0 or pos.sum() == 0):
        raise ValueError(
            f"histograms: expected both classes, found {int(neg.sum())} negatives and {int(pos.sum())} positives"
        )
    return neg, pos


def roc_from_histograms(neg, pos) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at the bin edges, from the top bin down; starts at (0, 0), ends at (1, 1)."""
    neg, pos = _check_hist(neg, pos)
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1]) / neg.sum()])
    tpr = np.concatenate([[0.0], np.cumsum(pos[::-1]) / pos.sum()])
    return fpr, tpr


def auc_from_histograms(neg, pos) -> float:
    """AUC with pairs in the same bin counted 1/2 (the trapezoid area under the binned ROC).

    Differs from the exact AUC by at most sum_k neg_k * pos_k / (2 * N_neg * N_pos).
    """
    neg, pos = _check_hist(neg, pos)
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in lower bins
    return float(np.sum(pos * (below + 0.5 * neg)) / (neg.sum() * pos.sum()))


def net_benefit_from_histograms(neg, pos, thresholds=None) -> np.ndarray:
    """Net benefit from binned scores. Exact when every threshold lies on a bin edge (the default
    thresholds with 100 bins, or any multiple of 100); otherwise the bin straddling a threshold is
    split assuming uniform scores within it, and the error is bounded by that bin's counts."""
    neg, pos = _check_hist(neg, pos, need_both=False)
    t = _check_thresholds(thresholds)
    bins = neg.size
    total = neg.sum() + pos.sum()
    if total == 0:
        raise ValueError("histograms: expected at least one patient, found empty histograms")

    def above(counts: np.ndarray) -> np.ndarray:
        tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[k] = counts in bins >= k
        pos_t = t * bins
        k = np.floor(pos_t + 1e-9).astype(int)
        k = np.clip(k, 0, bins)
        frac = np.clip(pos_t - k, 0.0, 1.0)
        frac[np.isclose(pos_t, np.round(pos_t), atol=1e-9, rtol=0)] = 0.0
        inside = np.where(k < bins, counts[np.minimum(k, bins - 1)], 0.0)
        return tail[k] - frac * inside

    tp = above(pos)
    fp = above(neg)
    return tp / total - fp / total * t / (1.0 - t)


# --------------------------------------------------------------------------- k-safe score cells
# The disclosure-controlled histogram path. A site bins its scores on `bins` equal-width bins of
# [0, 1], then merges adjacent bins into cells until every cell holds either no patient or at least
# k patients of each class (`k_safe_cuts`). Cells have uneven edges (multiples of 1/bins); counts
# of several sites are pooled on the union of their edges (`pool_cells`), splitting a cell evenly
# over its width. Everything the server derives (ROC, Youden threshold, operating points, decision
# curves) is a function of the released cells only.
def k_safe_cuts(neg, pos, k: int, keep: int | None = None) -> np.ndarray:
    """Cut indices 0 = c_0 < ... < c_m = bins of a merge of adjacent bins in which every cell holds
    0 or >= k patients of each class, chosen to minimise sum_c neg_c * pos_c (the within-cell tie
    mass, i.e. the bound on the AUC error of the binned ROC); among equal merges the one with most
    cells. `keep`: a bin edge that must stay a cut (ignored when no k-safe merge keeps it).
    Raises DegenerateStatistic when a class has between 1 and k - 1 patients in all."""
    neg = np.asarray(neg, dtype=np.int64).ravel()
    pos = np.asarray(pos, dtype=np.int64).ravel()
    if neg.shape != pos.shape or neg.size == 0:
        raise ValueError(f"histograms: expected two count arrays of equal length, found {neg.size} and {pos.size}")
    if k < 1:
        raise ValueError(f"k: expected >= 1, found {k}")
    for name, total in (("without SLM", int(neg.sum())), ("with SLM", int(pos.sum()))):
        if 0 < total < k:
            raise DegenerateStatistic(f"{total} patient(s) {name}: fewer than k = {k}, no cell can hold them")
    b = neg.size
    cn = np.concatenate([[0], np.cumsum(neg)])
    cp = np.concatenate([[0], np.cumsum(pos)])
    inf = (float("inf"), 0)
    best: list[tuple[float, int]] = [(0.0, 0)] + [inf] * b
    back = [0] * (b + 1)
    if keep is not None and not 0 < keep < b:
        keep = None
    for j in range(1, b + 1):
        for i in range(j):
            if best[i] == inf or (keep is not None and i < keep < j):
                continue
            n, m = cn[j] - cn[i], cp[j] - cp[i]
            if 0 < n < k or 0 < m < k:
                continue
            cand = (best[i][0] + float(n * m), best[i][1] - 1)  # less tie mass, then more cells
            if cand < best[j]:
                best[j], back[j] = cand, i
    if best[b] == inf:  # the edge to keep splits a class into parts below k: merge without it
        return k_safe_cuts(neg, pos, k)
    cuts = [b]
    while cuts[-1] > 0:
        cuts.append(back[cuts[-1]])
    return np.asarray(cuts[::-1], dtype=np.int64)


def youden_edge(neg, pos, k: int) -> int | None:
    """The bin edge with the highest Youden index (ties: the highest edge) among those that split
    each class into parts of 0 or >= k patients; None when there is none or a class is empty."""
    neg = np.asarray(neg, dtype=np.int64).ravel()
    pos = np.asarray(pos, dtype=np.int64).ravel()
    if neg.sum() == 0 or pos.sum() == 0:
        return None
    below_n = np.concatenate([[0], np.cumsum(neg)])
    below_p = np.concatenate([[0], np.cumsum(pos)])
    ok = np.ones(neg.size + 1, dtype=bool)
    for below, total in ((below_n, neg.sum()), (below_p, pos.sum())):
        above = total - below
        ok &= ((below == 0) | (below >= k)) & ((above == 0) | (above >= k))
    sens = (pos.sum() - below_p) / pos.sum()  # "positive when p >= edge"
    spec = below_n / neg.sum()
    j = np.where(ok, sens + spec - 1.0, -np.inf)
    if not np.isfinite(j).any():
        return None
    return int(np.flatnonzero(j >= j.max() - 1e-12)[-1])


def k_safe_cells(y, p, k: int, bins: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(edges, neg_counts, pos_counts, cell_of_each_patient) of the k-safe merge of `bins` bins that
    keeps the best k-safe Youden cut (`youden_edge`) as an edge."""
    y, p = _check(y, p, need_both=False, probs=True)
    neg, pos = score_histograms(y, p, bins=bins)
    # keep the site's own best k-safe Youden cut as an edge: the development threshold is then read
    # off the cells exactly, at the resolution of the grid
    cuts = k_safe_cuts(neg, pos, k, keep=youden_edge(neg, pos, k))
    cn = np.concatenate([[0], np.cumsum(neg)])[cuts]
    cp = np.concatenate([[0], np.cumsum(pos)])[cuts]
    cell = np.searchsorted(cuts, _bin_index(p, bins), side="right") - 1
    return cuts / bins, np.diff(cn), np.diff(cp), cell


def _check_cells(edges, *counts) -> tuple[np.ndarray, ...]:
    e = np.asarray(edges, dtype=np.float64).ravel()
    out = [np.asarray(c, dtype=np.float64).ravel() for c in counts]
    if e.size < 2 or np.any(np.diff(e) <= 0) or e[0] != 0.0 or e[-1] != 1.0:
        raise ValueError(f"cell edges: expected an increasing list from 0 to 1, found {e.tolist()[:6]}")
    for c in out:
        if c.size != e.size - 1 or (c < 0).any() or not np.isfinite(c).all():
            raise ValueError(f"cell counts: expected {e.size - 1} finite counts >= 0, found {c.size}")
    return (e, *out)


def count_at_or_above(edges, counts, thresholds) -> np.ndarray:
    """Patients with score >= t, from cell counts: exact when t is a cell edge, else the cell that
    contains t is split in proportion to its width (uniform scores within a cell)."""
    e, c = _check_cells(edges, counts)
    t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    tail = np.concatenate([np.cumsum(c[::-1])[::-1], [0.0]])  # tail[j] = patients in cells >= j
    j = np.clip(np.searchsorted(e, t, side="right") - 1, 0, c.size - 1)
    on_edge = np.isclose(t, e[j], rtol=0, atol=1e-9)
    frac = np.where(on_edge, 1.0, np.clip((e[j + 1] - t) / (e[j + 1] - e[j]), 0.0, 1.0))
    out = tail[j + 1] + frac * c[j]
    return np.where(t <= 0, tail[0], out)


def cell_is_split(edges, neg, pos, threshold: float) -> bool:
    """True when `threshold` falls strictly inside a cell holding patients (interpolated counts)."""
    e, n, p = _check_cells(edges, neg, pos)
    j = int(np.clip(np.searchsorted(e, threshold, side="right") - 1, 0, n.size - 1))
    return not np.isclose(threshold, e[j], rtol=0, atol=1e-9) and (n[j] + p[j]) > 0 and 0 < threshold < 1


def operating_point_from_cells(edges, neg, pos, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV, accuracy of "positive when p >= threshold" from cells."""
    e, n, p = _check_cells(edges, neg, pos)
    tp, fp = float(count_at_or_above(e, p, threshold)[0]), float(count_at_or_above(e, n, threshold)[0])
    fn, tn = p.sum() - tp, n.sum() - fp

    def rate(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    return {"sensitivity": rate(tp, tp + fn), "specificity": rate(tn, tn + fp), "ppv": rate(tp, tp + fp),
            "npv": rate(tn, tn + fn), "accuracy": rate(tp + tn, n.sum() + p.sum()),
            "interpolated": cell_is_split(e, n, p, threshold)}


def net_benefit_from_cells(edges, neg, pos, thresholds=None) -> np.ndarray:
    """Net benefit per threshold from cells: exact at every cell edge (0 at t -> 1, the prevalence at
    t = 0), joined by straight lines in between. (Splitting a wide cell's counts evenly instead makes
    the FP term, weighted by t / (1 - t), swing wildly near t = 1: a curve the data never showed.)"""
    e, n, p = _check_cells(edges, neg, pos)
    t = _check_thresholds(thresholds)
    total = n.sum() + p.sum()
    if total == 0:
        raise ValueError("cells: expected at least one patient, found none")
    inner = e[1:-1]
    nb_inner = (count_at_or_above(e, p, inner) - count_at_or_above(e, n, inner) * inner / (1.0 - inner)) / total
    return np.interp(t, np.concatenate([[0.0], inner, [1.0]]), np.concatenate([[p.sum() / total], nb_inner, [0.0]]))


def pool_cells(parts: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool (edges, neg, pos) of several sites on the union of their edges; a site's cell that a
    foreign edge cuts is split in proportion to width (exact when all sites share the edges)."""
    if not parts:
        raise ValueError("cells: expected at least one site's cells, found none")
    checked = [_check_cells(*part) for part in parts]
    edges = np.unique(np.round(np.concatenate([c[0] for c in checked]), 12))
    neg = np.zeros(edges.size - 1)
    pos = np.zeros(edges.size - 1)
    for e, n, p in checked:
        neg += -np.diff(count_at_or_above(e, n, edges))
        pos += -np.diff(count_at_or_above(e, p, edges))
    return edges, neg, pos


def youden_from_cells(edges, neg, pos) -> float:
    """Cell edge maximising sensitivity + specificity - 1 ("positive when p >= edge"); ties go to
    the highest edge, as in `youden_threshold`."""
    e, n, p = _check_cells(edges, neg, pos)
    if n.sum() == 0 or p.sum() == 0:
        raise ValueError(f"cells: expected both classes, found {n.sum():g} negatives and {p.sum():g} positives")
    sens = np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]]) / p.sum()
    spec = np.concatenate([[0.0], np.cumsum(n)]) / n.sum()
    j = sens + spec - 1.0
    best = np.flatnonzero(j >= j.max() - 1e-12)
    return float(e[best[-1]])


# --------------------------------------------------------------------------- summary
SUMMARY_KEYS = (
    "n", "n_pos", "auc", "auc_ci_low", "auc_ci_high", "threshold", "sensitivity", "specificity",
    "ppv", "npv", "accuracy", "brier", "calib_intercept", "calib_slope", "hl_stat", "hl_p",
)


def summarize(y, p, threshold: float | None = None) -> dict:
    """The metrics one evaluation reports, as plain int/float (a Flower MetricRecord can carry it).

    `threshold=None` picks the Youden-optimal cut on these data (development use); pass the
    development threshold when these are test data. NaN appears only where a value is undefined:
    AUC, its CI, the Youden threshold and calibration when only one class is present (or fewer than
    2 per class for the CI), a rate with a zero denominator, HL p with fewer than 3 risk groups, and
    the calibration slope when the scores separate the classes perfectly (its MLE is infinite). The
    calibration intercept is finite whenever both classes are present (NaN only if the solver fails).
    """
    y, p = _check(y, p, need_both=False, probs=True)
    nan = float("nan")
    n_pos = int(y.sum())
    both = 0 < n_pos < y.size
    out: dict = {"n": int(y.size), "n_pos": n_pos}
    if both:
        out["auc"] = auc(y, p)
        if min(n_pos, y.size - n_pos) >= 2:
            _, lo, hi = delong_ci(y, p)
        else:
            lo = hi = nan
        out["auc_ci_low"], out["auc_ci_high"] = lo, hi
    else:
        out["auc"] = out["auc_ci_low"] = out["auc_ci_high"] = nan
    if threshold is None:
        threshold = youden_threshold(y, p) if both else nan
    out["threshold"] = float(threshold)
    tm = threshold_metrics(y, p, threshold) if math.isfinite(threshold) else {}
    for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
        out[k] = float(tm.get(k, nan))
    out["brier"] = brier(y, p)
    if both:
        try:
            out["calib_intercept"] = calibration_intercept(y, p)
        except DegenerateStatistic:
            out["calib_intercept"] = nan
        try:
            out["calib_slope"] = calibration_slope(y, p)
        except LogisticFitError:  # documented: perfectly separating scores have no finite slope
            out["calib_slope"] = nan
    else:
        out["calib_intercept"] = out["calib_slope"] = nan
    out["hl_stat"], out["hl_p"] = hosmer_lemeshow(y, p)
    return {k: (int(out[k]) if k in ("n", "n_pos") else float(out[k])) for k in SUMMARY_KEYS}
