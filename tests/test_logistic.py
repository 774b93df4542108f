"""The CF logistic model against statsmodels and scikit-learn (references nobody here wrote)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import statsmodels.api as sm
from sklearn.linear_model import LogisticRegression

from common.clinical import FEATURE_NAMES, encode_records, standardise
from common.logistic import LogisticCF, LogisticFitError, add_intercept, newton_fit, suff_stats, sum_stats


def _cohort(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoded clinical vectors (the real encoding) with an outcome driven by CEA, CA19-9 and site."""
    rng = np.random.default_rng(seed)
    rows = [
        {
            "sex": rng.choice(["M", "F"]),
            "tumor_site": rng.choice(["low", "mid", "high"]),
            "cea": float(rng.lognormal(1.3, 1.0)),
            "ca199": float(rng.lognormal(2.8, 1.0)),
        }
        for _ in range(n)
    ]
    X = encode_records(rows).astype(np.float64)
    X = standardise(X, X.mean(0), X.std(0)).astype(np.float64)
    eta = -0.5 + 0.9 * X[:, 3] + 0.6 * X[:, 4] - 0.4 * X[:, 2] + 0.2 * X[:, 0]
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    return X, y


def test_matches_statsmodels_logit_coefficients_and_standard_errors():
    X, y = _cohort(176, seed=1)
    ref = sm.Logit(y, sm.add_constant(X)).fit(method="newton", tol=1e-14, maxiter=100, disp=0)
    m = LogisticCF().fit(X, y)
    np.testing.assert_allclose(m.coef_, ref.params, rtol=0, atol=1e-8)
    np.testing.assert_allclose(np.sqrt(np.diag(m.cov_)), ref.bse, rtol=1e-8)
    assert m.loglik_ == pytest.approx(ref.llf, abs=1e-9)
    np.testing.assert_allclose(m.predict_proba(X), ref.predict(sm.add_constant(X)), atol=1e-10)


def test_coef_table_is_the_clinical_table_statsmodels_prints():
    X, y = _cohort(176, seed=2)
    ref = sm.Logit(y, sm.add_constant(X)).fit(method="newton", tol=1e-14, disp=0)
    table = LogisticCF().fit(X, y).coef_table(FEATURE_NAMES)
    assert list(table.columns) == ["term", "coef", "se", "z", "p_value", "odds_ratio", "or_ci_low", "or_ci_high"]
    assert list(table["term"]) == ["intercept", *FEATURE_NAMES]
    np.testing.assert_allclose(table["z"], ref.tvalues, rtol=1e-7)
    np.testing.assert_allclose(table["p_value"], ref.pvalues, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(table["odds_ratio"], np.exp(ref.params), rtol=1e-8)
    ci = np.exp(ref.conf_int(alpha=0.05))
    np.testing.assert_allclose(table["or_ci_low"], ci[:, 0], rtol=1e-7)
    np.testing.assert_allclose(table["or_ci_high"], ci[:, 1], rtol=1e-7)


def test_newton_on_stats_summed_over_three_sites_equals_pooled_fit():
    X, y = _cohort(240, seed=3)
    cuts = [0, 60, 150, 240]  # three unequal "sites"
    sites = [(X[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]

    def federated_stats(beta):
        return sum_stats([suff_stats(Xs, ys, beta) for Xs, ys in sites])

    fed = LogisticCF().fit_from_stats(federated_stats, X.shape[1])
    sk = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12, max_iter=200).fit(X, y)
    np.testing.assert_allclose(fed.coef_[0], sk.intercept_[0], atol=1e-6)
    np.testing.assert_allclose(fed.coef_[1:], sk.coef_[0], atol=1e-6)
    ref = sm.Logit(y, sm.add_constant(X)).fit(method="newton", tol=1e-14, disp=0)
    np.testing.assert_allclose(fed.coef_, ref.params, atol=1e-6)
    np.testing.assert_allclose(np.sqrt(np.diag(fed.cov_)), ref.bse, rtol=1e-6)
    assert fed.n_ == 240


def test_suff_stats_add_up_across_sites_and_match_numeric_derivatives():
    X, y = _cohort(90, seed=4)
    beta = np.random.default_rng(0).normal(0, 0.5, X.shape[1] + 1)
    pooled = suff_stats(X, y, beta)
    parts = sum_stats([suff_stats(X[:30], y[:30], beta), suff_stats(X[30:], y[30:], beta)])
    for key in ("grad", "hess", "loglik"):
        np.testing.assert_allclose(parts[key], pooled[key], rtol=1e-12, atol=1e-10)
    assert parts["n"] == pooled["n"] == 90
    h = 1e-6  # central differences of the log-likelihood check the analytic gradient
    num = [
        (suff_stats(X, y, beta + h * e)["loglik"] - suff_stats(X, y, beta - h * e)["loglik"]) / (2 * h)
        for e in np.eye(beta.size)
    ]
    np.testing.assert_allclose(pooled["grad"], num, rtol=1e-5, atol=1e-5)
    assert np.all(np.linalg.eigvalsh(pooled["hess"]) < 0)


def test_add_intercept_puts_ones_first():
    X1 = add_intercept([[2.0, 3.0], [4.0, 5.0]])
    np.testing.assert_array_equal(X1, [[1, 2, 3], [1, 4, 5]])


def test_perfect_separation_is_a_clear_error_and_ridge_is_the_escape_hatch():
    X = np.array([[-2.0], [-1.0], [-0.5], [0.5], [1.0], [2.0]])
    y = np.array([0, 0, 0, 1, 1, 1])
    with pytest.raises(LogisticFitError, match="separat"):
        LogisticCF().fit(X, y)
    m = LogisticCF(l2=1.0).fit(X, y)
    assert np.isfinite(m.coef_).all() and m.coef_[1] > 0


def test_quasi_complete_separation_by_a_binary_factor_is_a_clear_error():
    """A small site where no patient with a high tumour has SLM: the MLE slope is -infinity."""
    rng = np.random.default_rng(0)
    X = np.c_[rng.integers(0, 2, 40), rng.normal(size=40)]
    y = (rng.random(40) < 0.5).astype(float)
    y[X[:, 0] == 1] = 0
    with pytest.raises(LogisticFitError, match="separation"):
        LogisticCF().fit(X, y)
    m = LogisticCF(l2=0.1).fit(X, y)
    assert np.isfinite(m.coef_).all() and m.coef_[1] < -1


def test_collinear_features_are_a_clear_error():
    X, y = _cohort(80, seed=5)
    Xc = np.hstack([X, X[:, :1] * 2.0])
    with pytest.raises(LogisticFitError, match="singular"):
        LogisticCF().fit(Xc, y)


def test_ridge_matches_a_direct_penalised_optimum():
    X, y = _cohort(120, seed=6)
    l2 = 3.0
    m = LogisticCF(l2=l2).fit(X, y)
    s = suff_stats(X, y, m.coef_)
    penal_grad = s["grad"] - l2 * np.r_[0.0, m.coef_[1:]]
    np.testing.assert_allclose(penal_grad, 0.0, atol=1e-8)


def test_round_trip_through_json():
    X, y = _cohort(100, seed=7)
    m = LogisticCF().fit(X, y)
    back = LogisticCF.from_dict(json.loads(json.dumps(m.to_dict())))
    np.testing.assert_array_equal(back.coef_, m.coef_)
    np.testing.assert_array_equal(back.cov_, m.cov_)
    np.testing.assert_array_equal(back.predict_proba(X), m.predict_proba(X))
    assert back.coef_table(FEATURE_NAMES).equals(m.coef_table(FEATURE_NAMES))


@pytest.mark.parametrize(
    "X, y, match",
    [
        (np.ones((3, 2)), [0, 1, 2], "expected labels 0/1"),
        (np.ones((3, 2)), [0, 1], "expected 3 labels"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), [0, 1], "row 0, column 1"),
        (np.ones(3), [0, 1, 0], "2-D"),
    ],
)
def test_bad_input_names_the_problem(X, y, match):
    with pytest.raises(ValueError, match=match):
        LogisticCF().fit(X, y)


def test_unfitted_and_mismatched_use_is_an_error():
    with pytest.raises(RuntimeError, match="fit"):
        LogisticCF().predict_proba(np.ones((2, 7)))
    X, y = _cohort(60, seed=8)
    m = LogisticCF().fit(X, y)
    with pytest.raises(ValueError, match="expected 7 features, found 3"):
        m.predict_proba(np.ones((2, 3)))
    with pytest.raises(ValueError, match="expected 7 names"):
        m.coef_table(["a"])
    with pytest.raises(ValueError, match="grad of shape"):
        newton_fit(lambda b: suff_stats(X, y, np.zeros(8)), 3)
