"""The latent risk model behind the synthetic cohort, and its exact oracles.

One latent aggressiveness z ~ N(0, 1) per patient drives both the outcome and the tumour's look:

    logit P(slm = 1 | z, sex, site) = alpha_centre + beta_z * z + beta_male * male + beta_site[tumor_site]
    log CEA   ~ N(mu_cea   + delta_cea   * slm, sd_marker)      (log-normal, higher with SLM)
    log CA199 ~ N(mu_ca199 + delta_ca199 * slm, sd_marker)
    f_k = z + sd_image * e_k,  k in (volume, irregularity, adc, heterogeneity)

The four image features f_k are rendered monotonically into the pixels (tumour volume, margin
irregularity, lower ADC, texture heterogeneity; see `phantom.py`), so "what the image shows" is
exactly f. Because z given f is Gaussian and the markers depend on z only through slm, every
oracle P(slm | information) is a 1-D Gauss-Hermite integral times a marker likelihood ratio, with
no approximation beyond quadrature. Oracle AUC = AUC of that oracle risk on a large latent-only
draw from the centre's population (Monte-Carlo, fixed internal seed, so it is a property of the
model and not of one cohort draw).

The shared coefficients were calibrated once with `calibrate()` (see its docstring) so that the
oracle AUCs sit near clinical 0.82, image 0.85, combined 0.92; each centre's intercept is solved
exactly for its prevalence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Mapping

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from sklearn.metrics import roc_auc_score

IMAGE_FEATURES: tuple[str, ...] = ("volume", "irregularity", "adc", "heterogeneity")
SEX_LEVELS: tuple[str, ...] = ("M", "F")
SITE_LEVELS: tuple[str, ...] = ("low", "mid", "high")
INFO_SETS: tuple[str, ...] = ("clinical", "image", "combined")
TARGET_AUC: dict[str, float] = {"clinical": 0.82, "image": 0.85, "combined": 0.92}

_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(48)  # probabilists' Hermite: weight exp(-x^2/2)
_GH_W = _GH_W / _GH_W.sum()
_ORACLE_MC_SEED = 20250611
_ORACLE_MC_N = 200_000


@dataclass(frozen=True)
class RiskModel:
    """Coefficients shared by every centre (biology); `Population` adds the centre's case mix."""

    beta_z: float = 2.55
    beta_male: float = 0.25
    beta_site: tuple[float, float, float] = (0.0, 0.3, 0.6)  # low, mid, high: portal drainage of high tumours
    mu_cea: float = math.log(2.6)
    mu_ca199: float = math.log(11.0)
    delta_cea: float = 0.94
    delta_ca199: float = 0.77
    sd_marker: float = 0.95
    sd_image: float = 1.0


@dataclass(frozen=True)
class Population:
    """One centre's patient population: case mix and target SLM prevalence."""

    prevalence: float
    p_male: float = 0.62
    p_site: tuple[float, float, float] = (0.40, 0.35, 0.25)
    risk: RiskModel = field(default_factory=RiskModel)

    def __post_init__(self) -> None:
        if not 0.02 < self.prevalence < 0.98:
            raise ValueError(f"prevalence: expected a value in (0.02, 0.98), found {self.prevalence}")
        if abs(sum(self.p_site) - 1.0) > 1e-9 or min(self.p_site) < 0:
            raise ValueError(f"p_site: expected three probabilities summing to 1, found {self.p_site}")

    @property
    def alpha(self) -> float:
        """Intercept that makes the population prevalence exactly `prevalence`."""
        return _solve_alpha(self)


def _offsets(pop: Population, male: np.ndarray, site_idx: np.ndarray) -> np.ndarray:
    r = pop.risk
    return r.beta_male * male + np.asarray(r.beta_site)[site_idx]


def _mean_sigmoid(loc: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """E[sigmoid(loc + scale * x)], x ~ N(0, 1), by Gauss-Hermite quadrature."""
    loc = np.asarray(loc, dtype=np.float64)[..., None]
    scale = np.asarray(scale, dtype=np.float64)[..., None]
    return expit(loc + scale * _GH_X) @ _GH_W


def _strata(pop: Population) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (male, site) combinations with their probabilities."""
    male = np.repeat([1.0, 0.0], 3)
    site = np.tile([0, 1, 2], 2)
    prob = np.repeat([pop.p_male, 1 - pop.p_male], 3) * np.tile(pop.p_site, 2)
    return male, site, prob


def _solve_alpha(pop: Population) -> float:
    male, site, prob = _strata(pop)
    off = _offsets(pop, male, site)

    def gap(a: float) -> float:
        return float(prob @ _mean_sigmoid(a + off, pop.risk.beta_z)) - pop.prevalence

    return float(brentq(gap, -20.0, 20.0, xtol=1e-12))


@dataclass
class LatentDraw:
    """Latent-only patients (no images): everything the oracles and the renderer need."""

    z: np.ndarray
    male: np.ndarray  # 1.0 / 0.0
    site_idx: np.ndarray  # 0 low, 1 mid, 2 high
    slm: np.ndarray  # int 0/1
    risk: np.ndarray  # P(slm | z, sex, site): the data-generating probability
    cea: np.ndarray  # ng/mL
    ca199: np.ndarray  # U/mL
    features: np.ndarray  # (n, 4) latent image features f, IMAGE_FEATURES order

    def __len__(self) -> int:
        return len(self.z)

    def row(self, i: int) -> dict:
        return {
            "sex": SEX_LEVELS[0] if self.male[i] else SEX_LEVELS[1],
            "tumor_site": SITE_LEVELS[int(self.site_idx[i])],
            "cea": float(self.cea[i]),
            "ca199": float(self.ca199[i]),
            "slm": int(self.slm[i]),
        }


def draw(pop: Population, n: int, rng: np.random.Generator, marker_decimals: int | None = 1) -> LatentDraw:
    """Draw n patients from the population. Markers are rounded as a lab report would print them."""
    if n < 0:
        raise ValueError(f"n: expected a count >= 0, found {n}")
    r = pop.risk
    z = rng.standard_normal(n)
    male = (rng.random(n) < pop.p_male).astype(np.float64)
    site_idx = rng.choice(3, size=n, p=np.asarray(pop.p_site))
    risk = expit(pop.alpha + r.beta_z * z + _offsets(pop, male, site_idx))
    slm = (rng.random(n) < risk).astype(np.int64)
    cea = np.exp(r.mu_cea + r.delta_cea * slm + r.sd_marker * rng.standard_normal(n))
    ca199 = np.exp(r.mu_ca199 + r.delta_ca199 * slm + r.sd_marker * rng.standard_normal(n))
    if marker_decimals is not None:
        # never print 0.0: a lab reports its detection limit, and log(0) has no likelihood
        floor = 10.0 ** -marker_decimals
        cea = np.maximum(np.round(cea, marker_decimals), floor)
        ca199 = np.maximum(np.round(ca199, marker_decimals), floor)
    features = z[:, None] + r.sd_image * rng.standard_normal((n, len(IMAGE_FEATURES)))
    return LatentDraw(z, male, site_idx, slm, risk, cea, ca199, features)


def _marker_log_lr(pop: Population, cea: np.ndarray, ca199: np.ndarray) -> np.ndarray:
    """log p(markers | slm=1) - log p(markers | slm=0) for the log-normal marker model."""
    r = pop.risk
    out = np.zeros(len(cea))
    for x, mu, d in ((cea, r.mu_cea, r.delta_cea), (ca199, r.mu_ca199, r.delta_ca199)):
        lx = np.log(x)
        out += ((lx - mu) ** 2 - (lx - mu - d) ** 2) / (2 * r.sd_marker**2)
    return out


def _z_posterior(pop: Population, features: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean and SD of z given the image features (Gaussian prior, Gaussian feature noise)."""
    k = features.shape[1]
    prec = 1.0 + k / pop.risk.sd_image**2
    mean = features.sum(axis=1) / pop.risk.sd_image**2 / prec
    return mean, math.sqrt(1.0 / prec)


def oracle_risks(pop: Population, d: LatentDraw) -> dict[str, np.ndarray]:
    """P(slm = 1 | information) for clinical-only, image-only and combined information."""
    r = pop.risk
    a = pop.alpha
    off = _offsets(pop, d.male, d.site_idx)
    log_lr = _marker_log_lr(pop, d.cea, d.ca199)
    # clinical: sex, site, markers; z unknown (prior N(0,1))
    q0 = _mean_sigmoid(a + off, r.beta_z)
    clinical = expit(np.log(q0) - np.log1p(-q0) + log_lr)
    # image: z | f; sex/site unknown and independent of z -> mix over strata
    zm, zs = _z_posterior(pop, d.features)
    male, site, prob = _strata(pop)
    image = np.zeros(len(d))
    for m, s, p in zip(male, site, prob):
        image += p * _mean_sigmoid(a + _offsets(pop, np.array([m]), np.array([s])) + r.beta_z * zm, r.beta_z * zs)
    # combined: z | f with the patient's own sex/site, then the markers' likelihood ratio
    qc = _mean_sigmoid(a + off + r.beta_z * zm, r.beta_z * zs)
    qc = np.clip(qc, 1e-15, 1 - 1e-15)
    combined = expit(np.log(qc) - np.log1p(-qc) + log_lr)
    return {"clinical": clinical, "image": image, "combined": combined}


def oracle_aucs(pop: Population, d: LatentDraw) -> dict[str, float]:
    """AUC of each oracle risk against the drawn outcomes (nan when one class is missing)."""
    if d.slm.min(initial=0) == d.slm.max(initial=0):
        return {k: float("nan") for k in INFO_SETS}
    risks = oracle_risks(pop, d)
    return {k: float(roc_auc_score(d.slm, risks[k])) for k in INFO_SETS}


def population_summary(pop: Population, n: int = _ORACLE_MC_N, seed: int = _ORACLE_MC_SEED) -> dict:
    """Population prevalence (exact) and oracle AUCs (Monte-Carlo on n latent-only patients)."""
    prevalence, alpha, aucs = _population_summary(pop, n, seed)
    return {"prevalence": prevalence, "oracle_auc": dict(aucs), "mc_n": n, "alpha": alpha}


@lru_cache(maxsize=64)
def _population_summary(pop: Population, n: int, seed: int) -> tuple[float, float, tuple]:
    d = draw(pop, n, np.random.default_rng(seed))
    return pop.prevalence, pop.alpha, tuple(oracle_aucs(pop, d).items())


def calibrate(
    prevalence: float = 0.40, n: int = 100_000, seed: int = 7, targets: Mapping[str, float] = TARGET_AUC
) -> RiskModel:
    """Re-fit beta_z, sd_image and the marker shifts to the target oracle AUCs (offline tool).

    Common random numbers (fixed seed) make the objective smooth; Nelder-Mead on the squared AUC
    gaps converges in a minute. The defaults of `RiskModel` are this function's output, rounded.
    """
    from scipy.optimize import minimize

    def model_of(x: np.ndarray) -> RiskModel:
        bz, sdi, dc = x
        return replace(RiskModel(), beta_z=bz, sd_image=sdi, delta_cea=dc, delta_ca199=dc * 0.82)

    def loss(x: np.ndarray) -> float:
        if min(x) <= 0.05:
            return 1e3
        pop = Population(prevalence, risk=model_of(x))
        aucs = oracle_aucs(pop, draw(pop, n, np.random.default_rng(seed)))
        return sum((aucs[k] - targets[k]) ** 2 for k in INFO_SETS)

    r0 = RiskModel()
    res = minimize(loss, np.array([r0.beta_z, r0.sd_image, r0.delta_cea]), method="Nelder-Mead",
                   options={"xatol": 1e-3, "fatol": 1e-7, "maxiter": 200})
    return model_of(res.x)
