"""Clinical factor encoding shared by site preprocessing, the CF model and the Combined DL model.

The encoded vector (float32, in this order) is what the cache stores and what both models see:
    sex_male        1 for male, 0 for female
    tumor_site_mid  one-hot, reference level "low" (distance from the anal verge)
    tumor_site_high
    log_cea         ln(1 + CEA in ng/mL)
    log_ca199       ln(1 + CA19-9 in U/mL)
    cea_elevated    CEA > 5 ng/mL     (the usual clinical cut-off)
    ca199_elevated  CA19-9 > 37 U/mL  (the usual clinical cut-off)
The reference-level coding keeps the logistic regression identifiable next to its intercept.
Standardisation (means / SDs) is not baked in: the study computes it from the training sites.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

FEATURE_NAMES: tuple[str, ...] = (
    "sex_male",
    "tumor_site_mid",
    "tumor_site_high",
    "log_cea",
    "log_ca199",
    "cea_elevated",
    "ca199_elevated",
)
N_FEATURES = len(FEATURE_NAMES)
# Bump when the encoding above changes (names, order, cut-offs, transforms): a cache and a model
# made under different versions do not fit together (common/model_input.py, `slmfed predict`).
ENCODING_VERSION = "slmfed-clinical-1"
SEXES = ("M", "F")
TUMOR_SITES = ("low", "mid", "high")
CEA_CUTOFF_NG_ML = 5.0
CA199_CUTOFF_U_ML = 37.0


def encode_row(sex: str, tumor_site: str, cea: float, ca199: float) -> np.ndarray:
    """Encode one validated patient row (sex in SEXES, tumor_site in TUMOR_SITES, markers >= 0)."""
    if sex not in SEXES:
        raise ValueError(f"sex: expected one of {SEXES}, found {sex!r}")
    if tumor_site not in TUMOR_SITES:
        raise ValueError(f"tumor_site: expected one of {TUMOR_SITES}, found {tumor_site!r}")
    for name, v in (("cea", cea), ("ca199", ca199)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: expected a finite number >= 0, found {v!r}")
    return np.array(
        [
            1.0 if sex == "M" else 0.0,
            1.0 if tumor_site == "mid" else 0.0,
            1.0 if tumor_site == "high" else 0.0,
            math.log1p(cea),
            math.log1p(ca199),
            1.0 if cea > CEA_CUTOFF_NG_ML else 0.0,
            1.0 if ca199 > CA199_CUTOFF_U_ML else 0.0,
        ],
        dtype=np.float32,
    )


def encode_records(rows: list[Mapping]) -> np.ndarray:
    """Encode many rows with keys sex, tumor_site, cea, ca199 into an (N, N_FEATURES) array."""
    if not rows:
        return np.zeros((0, N_FEATURES), dtype=np.float32)
    return np.stack([encode_row(r["sex"], r["tumor_site"], float(r["cea"]), float(r["ca199"])) for r in rows])


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Apply the study's standardisation; features with zero spread are only centred."""
    std = np.where(np.asarray(std) > 1e-8, std, 1.0)
    return ((np.asarray(x, dtype=np.float64) - mean) / std).astype(np.float32)
