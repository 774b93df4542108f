"""The clinical-feature (CF) model: logistic regression fitted by Newton-Raphson on sufficient statistics.

Why sufficient statistics: the log-likelihood of logistic regression is a sum over patients, so its
gradient and Hessian are sums too. A site can send (grad, hess, loglik, n) for the current
coefficients, the server adds them up across sites and takes one Newton step. The result is the
exact pooled maximum-likelihood fit, never a patient row leaving a site.

Conventions: `X` never contains the intercept column (it is added here), `beta[0]` is the
intercept, `hess` is the Hessian of the log-likelihood (negative semi-definite), and the covariance
of the estimate is the inverse of the observed information, `inv(-hess)` at the optimum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

Stats = dict
StatsFn = Callable[[np.ndarray], Mapping]

_Z95 = float(stats.norm.ppf(0.975))
# Above this condition number of the information matrix the fit is not identifiable
# (collinear features, or separation driving every fitted probability to 0 / 1).
_MAX_COND = 1e12


class LogisticFitError(ValueError):
    """The maximum-likelihood fit does not exist or cannot be trusted (separation, collinearity)."""


def _check_xy(X, y=None) -> tuple[np.ndarray, np.ndarray | None]:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X: expected a 2-D array (patients x features), found shape {X.shape}")
    if not np.isfinite(X).all():
        bad = np.argwhere(~np.isfinite(X))[0]
        raise ValueError(f"X: expected finite values, found {X[tuple(bad)]} at row {bad[0]}, column {bad[1]}")
    if y is None:
        return X, None
    y = np.asarray(y, dtype=np.float64).ravel()
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"y: expected {X.shape[0]} labels (one per row of X), found {y.shape[0]}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"y: expected labels 0/1, found {sorted(set(np.unique(y)) - {0.0, 1.0})[:5]}")
    return X, y


def add_intercept(X) -> np.ndarray:
    """Prepend a column of ones so that `beta[0]` is the intercept."""
    X, _ = _check_xy(X)
    return np.hstack([np.ones((X.shape[0], 1)), X])


def suff_stats(X, y, beta, offset=None) -> Stats:
    """Gradient, Hessian and value of the log-likelihood at `beta` for one site's rows.

    Returns dict(grad=(p,), hess=(p, p), loglik=float, n=int) with p = n_features + 1. The values
    of several sites evaluated at the same `beta` add up to the pooled ones (see `sum_stats`).
    `offset` (optional, per row) is added to the linear predictor, as in a GLM offset.
    """
    X, y = _check_xy(X, y)
    X1 = np.hstack([np.ones((X.shape[0], 1)), X])
    beta = np.asarray(beta, dtype=np.float64).ravel()
    if beta.shape[0] != X1.shape[1]:
        raise ValueError(
            f"beta: expected {X1.shape[1]} values (intercept + {X.shape[1]} features), found {beta.shape[0]}"
        )
    eta = X1 @ beta
    if offset is not None:
        eta = eta + np.asarray(offset, dtype=np.float64).ravel()
    p = np.exp(-np.logaddexp(0.0, -eta))  # sigmoid without overflow
    w = p * (1.0 - p)
    return {
        "grad": X1.T @ (y - p),
        "hess": -(X1.T * w) @ X1,
        "loglik": float(np.sum(y * eta - np.logaddexp(0.0, eta))),
        "n": int(X1.shape[0]),
    }


def sum_stats(parts: Sequence[Mapping]) -> Stats:
    """Add the sufficient statistics of several sites (all evaluated at the same coefficients)."""
    if not parts:
        raise ValueError("sum_stats: expected at least one site's statistics, found none")
    return {
        "grad": np.sum([np.asarray(s["grad"], dtype=np.float64) for s in parts], axis=0),
        "hess": np.sum([np.asarray(s["hess"], dtype=np.float64) for s in parts], axis=0),
        "loglik": float(sum(float(s["loglik"]) for s in parts)),
        "n": int(sum(int(s["n"]) for s in parts)),
    }


@dataclass
class NewtonResult:
    beta: np.ndarray
    cov: np.ndarray
    loglik: float
    n_iter: int
    converged: bool
    n: int = 0


def _penalised(s: Mapping, beta: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray, float]:
    g = np.asarray(s["grad"], dtype=np.float64).copy()
    H = np.asarray(s["hess"], dtype=np.float64).copy()
    ll = float(s["loglik"])
    if l2 > 0:  # ridge on the slopes only; the intercept stays free
        mask = np.ones_like(beta)
        mask[0] = 0.0
        g -= l2 * mask * beta
        H -= l2 * np.diag(mask)
        ll -= 0.5 * l2 * float(np.sum(mask * beta**2))
    return g, H, ll


def _solve_information(H: np.ndarray, n_iter: int) -> np.ndarray:
    info = -H
    cond = np.linalg.cond(info)
    if not np.isfinite(cond) or cond > _MAX_COND:
        raise LogisticFitError(
            f"logistic regression: the information matrix is singular (condition number {cond:.3g} "
            f"after {n_iter} Newton steps). Expected linearly independent features and both outcomes "
            "within each covariate pattern; found collinear features or (quasi-)complete separation. "
            "Drop the offending feature or refit with a small ridge penalty (l2 > 0)."
        )
    return np.linalg.inv(info)


def newton_step(s: Mapping, beta, l2: float = 0.0) -> np.ndarray:
    """The full Newton step at `beta` from the pooled statistics `s` there: newton_fit's candidates are
    beta + t x this step, t = 1, 1/2, 1/4 ... (client/verify.py recomputes them from signed statistics)."""
    beta = np.asarray(beta, dtype=np.float64)
    g, H, _ = _penalised(s, beta, l2)
    return _solve_information(H, 0) @ g


def newton_fit(
    stats_fn: StatsFn, n_params: int, max_iter: int = 50, tol: float = 1e-10, l2: float = 0.0
) -> NewtonResult:
    """Maximise the (pooled) log-likelihood with Newton-Raphson.

    `stats_fn(beta)` returns the sufficient statistics at `beta`, summed over all sites. Steps are
    halved when the log-likelihood would decrease. Converged when the largest step is below
    `tol * max(1, max|beta|)`. `l2 > 0` adds a ridge penalty `l2/2 * ||beta[1:]||^2` (a documented
    escape hatch for separation; 0 gives the plain maximum-likelihood fit a clinical table needs).
    Raises LogisticFitError when the fit does not exist or does not converge.
    """
    if n_params < 1:
        raise ValueError(f"n_params: expected >= 1, found {n_params}")
    if l2 < 0:
        raise ValueError(f"l2: expected >= 0, found {l2}")
    beta = np.zeros(n_params)
    s = stats_fn(beta)
    g, H, ll = _penalised(s, beta, l2)
    if np.asarray(g).shape != (n_params,) or np.asarray(H).shape != (n_params, n_params):
        raise ValueError(
            f"stats_fn: expected grad of shape ({n_params},) and hess ({n_params}, {n_params}), "
            f"found {np.asarray(g).shape} and {np.asarray(H).shape}"
        )
    for it in range(1, max_iter + 1):
        cov = _solve_information(H, it - 1)
        step = cov @ g
        t = 1.0
        while True:
            cand = beta + t * step
            s_new = stats_fn(cand)
            g_new, H_new, ll_new = _penalised(s_new, cand, l2)
            if ll_new >= ll - 1e-12 * (1.0 + abs(ll)) or t < 1e-8:
                break
            t *= 0.5
        beta, g, H, ll, s = cand, g_new, H_new, ll_new, s_new
        if np.max(np.abs(t * step)) <= tol * max(1.0, float(np.max(np.abs(beta)))):
            cov = _solve_information(H, it)
            return NewtonResult(beta, cov, float(s["loglik"]), it, True, int(s["n"]))
    raise LogisticFitError(
        f"logistic regression did not converge in {max_iter} Newton steps (last step "
        f"{np.max(np.abs(step)):.3g}, largest |coefficient| {np.max(np.abs(beta)):.3g}); this usually means "
        "the outcome is (quasi-)perfectly separated by the features. Refit with a small ridge penalty (l2 > 0)."
    )


class LogisticCF:
    """The CF model: multivariate logistic regression on the encoded clinical vector.

    Estimator-like: `fit(X, y)` pooled, `fit_from_stats(stats_fn, n_features)` federated. After
    fitting, `coef_` holds [intercept, slopes...] and `cov_` their covariance.
    """

    def __init__(self, l2: float = 0.0, max_iter: int = 50, tol: float = 1e-10):
        self.l2 = float(l2)
        self.max_iter = int(max_iter)
        self.tol = float(tol)

    def fit(self, X, y) -> "LogisticCF":
        X, y = _check_xy(X, y)
        if X.shape[0] == 0:
            raise ValueError("X: expected at least one patient, found none")
        return self.fit_from_stats(lambda b: suff_stats(X, y, b), X.shape[1])

    def fit_from_stats(self, stats_fn: StatsFn, n_features: int) -> "LogisticCF":
        res = newton_fit(stats_fn, n_features + 1, max_iter=self.max_iter, tol=self.tol, l2=self.l2)
        self.coef_ = res.beta
        self.cov_ = res.cov
        self.loglik_ = res.loglik
        self.n_iter_ = res.n_iter
        self.n_ = res.n
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError("LogisticCF: call fit() or fit_from_stats() (or from_dict()) before using the model")

    @property
    def n_features_in_(self) -> int:
        self._check_fitted()
        return int(self.coef_.shape[0] - 1)

    def decision_function(self, X) -> np.ndarray:
        self._check_fitted()
        X, _ = _check_xy(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X: expected {self.n_features_in_} features, found {X.shape[1]}")
        return self.coef_[0] + X @ self.coef_[1:]

    def predict_proba(self, X) -> np.ndarray:
        """P(y = 1) per row, 1-D (unlike scikit-learn's two-column array)."""
        eta = self.decision_function(X)
        return np.exp(-np.logaddexp(0.0, -eta))

    def coef_table(self, feature_names: Sequence[str] | None = None) -> pd.DataFrame:
        """The table a clinical paper prints: coef, SE, Wald z and p, odds ratio with Wald 95% CI."""
        self._check_fitted()
        names = list(feature_names) if feature_names is not None else [f"x{i}" for i in range(self.n_features_in_)]
        if len(names) != self.n_features_in_:
            raise ValueError(f"feature_names: expected {self.n_features_in_} names, found {len(names)}")
        se = np.sqrt(np.diag(self.cov_))
        z = self.coef_ / se
        return pd.DataFrame(
            {
                "term": ["intercept", *names],
                "coef": self.coef_,
                "se": se,
                "z": z,
                "p_value": 2.0 * stats.norm.sf(np.abs(z)),
                "odds_ratio": np.exp(self.coef_),
                "or_ci_low": np.exp(self.coef_ - _Z95 * se),
                "or_ci_high": np.exp(self.coef_ + _Z95 * se),
            }
        )

    def to_dict(self) -> dict:
        """JSON-friendly state (lists of floats), for results.json."""
        self._check_fitted()
        return {
            "coef": [float(v) for v in self.coef_],
            "cov": [[float(v) for v in row] for row in self.cov_],
            "loglik": float(self.loglik_),
            "n_iter": int(self.n_iter_),
            "n": int(self.n_),
            "l2": self.l2,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "LogisticCF":
        missing = {"coef", "cov"} - set(d)
        if missing:
            raise ValueError(f"LogisticCF.from_dict: expected keys coef and cov, missing {sorted(missing)}")
        m = cls(l2=float(d.get("l2", 0.0)))
        m.coef_ = np.asarray(d["coef"], dtype=np.float64)
        m.cov_ = np.asarray(d["cov"], dtype=np.float64)
        k = m.coef_.shape[0]
        if m.coef_.ndim != 1 or m.cov_.shape != (k, k):
            raise ValueError(
                f"LogisticCF.from_dict: expected coef of length k and cov of shape (k, k), "
                f"found {m.coef_.shape} and {m.cov_.shape}"
            )
        m.loglik_ = float(d.get("loglik", float("nan")))
        m.n_iter_ = int(d.get("n_iter", 0))
        m.n_ = int(d.get("n", 0))
        return m
