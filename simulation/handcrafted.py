"""The handcrafted-feature ("radiomics") baseline: logistic regression on the ROI features that
`slmfed prepare` stores in each patient's cache record (client/radiomics.py), alone or with the
clinical factors ("radiomics + clinical"). It is the comparison a radiomics user would pick instead
of the MRI DL / Combined DL models.

Model, fixed once before any result was seen (never tuned, least of all on the external cohort):
    features   the FEATURE_NAMES vector; the three size features (volume, surface, largest area),
               strictly positive and right-skewed, enter as their natural log (LOG_FEATURES);
               with_clinical appends the cache's clinical vector (common.clinical.FEATURE_NAMES, the
               CF model's inputs)
    scaling    standardised on the training patients of each fit (mean / SD of the training fold)
    fit        sklearn LogisticRegression, L2 with C = 1.0 (sklearn's default; penalty |w|^2 / 2
               against a log-likelihood summed over ~140 training patients, on standardised
               features): a mild ridge that keeps the correlated size / shape features stable without
               selecting anything; chosen a priori, not tuned on any cohort; lbfgs solver
Validation as in the study: StratifiedKFold(folds, shuffle=True, random_state=fold_seed) over
load_cache's patient order (the split client/study.py fold_ids makes for the same seed), the AUC of the
pooled out-of-fold predictions per fold seed; external = fit on all primary patients, AUC on the
external cohort.

These functions run on one site's cache, locally. In a federated study the same model would be an
exact federated logistic regression on the sites' sufficient statistics, like the CF model
(common/logistic.py; with the standardisation from federated means / SDs); that is not built.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from client.cache import load_cache
from client.study import stratified_folds
from client.radiomics import FEATURE_NAMES, load_features

LOG_FEATURES = ("volume_ml", "surface_mm2", "max_area_mm2")
L2_C = 1.0


def design(cache_dir: str | Path, with_clinical: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X, y, column names) of a cache's included patients, in load_cache's patient order."""
    data = load_cache(cache_dir)
    X = load_features(cache_dir, data.keys)
    names = list(FEATURE_NAMES)
    for name in LOG_FEATURES:
        i = names.index(name)
        X[:, i] = np.log(X[:, i])  # > 0 for every stored vector (an ROI is never empty)
        names[i] = f"log_{name}"
    if with_clinical:
        X = np.hstack([X, data.clinical.astype(np.float64)])
        names += [str(f) for f in data.manifest.get("feature_names", [])]
    y = np.asarray(data.labels, dtype=int)
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{cache_dir}: the handcrafted baseline needs an slm label (0/1) for every patient")
    return X, y, names


def _model():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=L2_C, max_iter=1000))


def oof_predictions(X: np.ndarray, y: np.ndarray, fold_ids: np.ndarray) -> np.ndarray:
    """Out-of-fold predicted probabilities: each patient scored by the model fitted without its fold."""
    p = np.full(len(y), np.nan)
    for k in np.unique(fold_ids):
        test = fold_ids == k
        p[test] = _model().fit(X[~test], y[~test]).predict_proba(X[test])[:, 1]
    return p


def handcrafted_cv(cache_dir: str | Path, fold_seeds: Sequence[int], folds: int = 5,
                   with_clinical: bool = False) -> dict:
    """Repeated CV on one cache: dict(aucs=[pooled out-of-fold AUC per fold seed], mean, sd, fold_seeds,
    folds, n, features). sd is the sample SD over repeats (0.0 for a single seed)."""
    from sklearn.metrics import roc_auc_score

    if not fold_seeds:
        raise ValueError("fold_seeds: expected at least one seed")
    if folds < 2:
        raise ValueError(f"folds: expected at least 2, found {folds}")
    X, y, names = design(cache_dir, with_clinical)
    n_min = int(min((y == 0).sum(), (y == 1).sum()))
    if n_min < folds:
        raise ValueError(f"{cache_dir}: {folds}-fold stratified CV needs at least {folds} patients of each class, "
                         f"found {int((y == 1).sum())} with SLM and {int((y == 0).sum())} without")
    aucs = [float(roc_auc_score(y, oof_predictions(X, y, stratified_folds(y, folds, s)))) for s in fold_seeds]
    return {"aucs": aucs, "mean": float(np.mean(aucs)), "sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
            "fold_seeds": [int(s) for s in fold_seeds], "folds": int(folds), "n": int(len(y)), "features": names}


def handcrafted_external(primary_cache: str | Path, external_cache: str | Path, with_clinical: bool = False) -> float:
    """AUC on the external cohort of the model fitted on every primary patient."""
    from sklearn.metrics import roc_auc_score

    Xp, yp, names_p = design(primary_cache, with_clinical)
    Xe, ye, names_e = design(external_cache, with_clinical)
    if names_p != names_e:
        raise ValueError(f"{external_cache}: features {names_e} differ from the primary cohort's {names_p}")
    if len(set(ye.tolist())) < 2:
        raise ValueError(f"{external_cache}: an AUC needs patients of both classes")
    return float(roc_auc_score(ye, _model().fit(Xp, yp).predict_proba(Xe)[:, 1]))


def main(argv: Sequence[str] | None = None) -> int:
    """python -m simulation.handcrafted PRIMARY_CACHE [EXTERNAL_CACHE] --fold-seeds 42 7 123"""
    ap = argparse.ArgumentParser(prog="python -m simulation.handcrafted", description=main.__doc__)
    ap.add_argument("primary")
    ap.add_argument("external", nargs="?")
    ap.add_argument("--fold-seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args(argv)
    out = {}
    for with_clinical in (False, True):
        name = "radiomics+clinical" if with_clinical else "radiomics"
        row = handcrafted_cv(args.primary, args.fold_seeds, args.folds, with_clinical)
        row.pop("features")
        if args.external:
            row["external_auc"] = handcrafted_external(args.primary, args.external, with_clinical)
        out[name] = row
    print(json.dumps(out, indent=2))
    return 0 if all(math.isfinite(r["mean"]) for r in out.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
