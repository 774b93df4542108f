"""The site's side of the study protocol, as plain functions (no Flower in here).

The ClientApp (client/app.py) translates each message into one call below. Every function returns only
what may leave the site (model weights, counts, aggregate statistics, score histograms); per-patient
predictions are written to the site-local study folder so out-of-fold results can be pooled across
messages (each message may run in a fresh process).

Partitions: `fold` is 0..folds-1 for cross-validation or -1 for the final fit on all patients;
`part` is "train" (the fold's training patients), "val" (its held-out patients) or "all".
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from client.cache import SiteData, atomic_write_bytes, load_cache
from common import metrics as M
from common.clinical import standardise
from common.logistic import add_intercept, suff_stats

MODELS = ("cf", "dl", "combined")


class StudyError(RuntimeError):
    """The site cannot do what the server asked (e.g. train without labels)."""


@dataclass
class Site:
    """A site's prepared data plus its study folder, as seen by one message."""

    cfg: dict
    data: SiteData
    study_dir: Path

    @classmethod
    def open(cls, cfg: Mapping[str, Any]) -> "Site":
        if not cfg.get("cache-dir"):
            raise StudyError("node config has no 'cache-dir': point the site at its prepared cache")
        cache_dir = Path(cfg["cache-dir"])
        study_dir = Path(cfg["study-dir"]) if cfg.get("study-dir") else cache_dir.parent / f"{cache_dir.name}-study"
        return cls(dict(cfg), _cached_site_data(cache_dir), study_dir)

    @property
    def name(self) -> str:
        return self.cfg.get("site-name") or self.data.manifest.get("site_name") or Path(self.cfg["cache-dir"]).name

    @property
    def has_labels(self) -> bool:
        return bool(np.all(self.data.labels >= 0))

    # ---- partitions -----------------------------------------------------------------------------
    def fold_ids(self, folds: int, seed: int) -> np.ndarray:
        """Stratified fold of each patient, reproducible from the seed the server sends."""
        y = self.data.labels
        if not self.has_labels:
            raise StudyError(f"site {self.name}: cross-validation needs an slm label for every patient")
        n_min = int(min(np.sum(y == 0), np.sum(y == 1)))
        if n_min < folds:
            raise StudyError(
                f"site {self.name}: {folds}-fold stratified CV needs at least {folds} patients per class, "
                f"found {int(np.sum(y == 1))} with SLM and {int(np.sum(y == 0))} without"
            )
        from sklearn.model_selection import StratifiedKFold  # lazy: each message may be a fresh process

        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        ids = np.empty(len(y), dtype=int)
        for k, (_, val) in enumerate(skf.split(np.zeros(len(y)), y)):
            ids[val] = k
        return ids

    def partition(self, fold: int, part: str, folds: int, seed: int) -> SiteData:
        if part == "all" or (fold < 0 and part == "train"):
            return self.data
        if fold < 0:
            raise StudyError(f"the final fit has no '{part}' partition")
        ids = self.fold_ids(folds, seed)
        if part == "train":
            return self.data.subset(np.flatnonzero(ids != fold))
        if part == "val":
            return self.data.subset(np.flatnonzero(ids == fold))
        raise StudyError(f"unknown partition {part!r}: expected train, val or all")

    # ---- prediction store (site-local) ----------------------------------------------------------
    def _pred_path(self, study_id: str, model: str, fold: int, part: str) -> Path:
        # study_id is "<study>/<plan tag>", e.g. "a1b2c3/cv" or "a1b2c3/final"
        return self.study_dir / study_id / model / f"fold{fold}-{part}.npz"

    def store_predictions(self, study_id: str, model: str, fold: int, part: str, keys, labels, probs) -> None:
        buf = io.BytesIO()
        np.savez(buf, keys=np.asarray(keys), labels=np.asarray(labels), probs=np.asarray(probs, dtype=np.float64))
        atomic_write_bytes(self._pred_path(study_id, model, fold, part), buf.getvalue())

    def load_predictions(self, study_id: str, model: str, fold: int, part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        path = self._pred_path(study_id, model, fold, part)
        if not path.is_file():
            raise StudyError(f"site {self.name}: no stored predictions for {model} fold {fold} ({part}) at {path}")
        with np.load(path, allow_pickle=False) as z:
            return z["keys"], z["labels"], z["probs"]

    def pooled_predictions(self, study_id: str, model: str, kind: str, folds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Out-of-fold predictions pooled over the CV folds ("oof"), or the final model's ("final")."""
        if kind == "final":
            return self.load_predictions(study_id, model, -1, "all")
        parts = [self.load_predictions(study_id, model, k, "val") for k in range(folds)]
        keys = np.concatenate([p[0] for p in parts])
        order = np.argsort(keys)
        return keys[order], np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order]


_LOADED: dict[str, tuple[tuple, SiteData]] = {}


def _cached_site_data(cache_dir: Path) -> SiteData:
    """load_cache, memoised per process while manifest.json is unchanged.

    In deployment every message is a fresh process (a fresh load); in simulation the Ray actor lives
    on, and re-reading and re-hashing the cache for every message was most of the per-round overhead.
    The cache is only ever replaced file by file through atomic renames, and `slmfed prepare` always
    rewrites manifest.json last, so an unchanged manifest (inode, size, mtime) means unchanged data.
    """
    manifest = Path(cache_dir) / "manifest.json"
    try:
        st = manifest.stat()
    except FileNotFoundError:
        return load_cache(cache_dir)  # raises the clear "not a prepared cache" error
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    key = str(Path(cache_dir).resolve())
    hit = _LOADED.get(key)
    if hit is None or hit[0] != stamp:
        _LOADED[key] = (stamp, load_cache(cache_dir))
    return _LOADED[key][1]


# ---- message handlers (plain functions) ------------------------------------------------------------
def site_info(site: Site) -> dict[str, Any]:
    m = site.data.manifest
    return {
        "num-examples": len(site.data),
        "num-positive": int(np.sum(site.data.labels == 1)) if site.has_labels else -1,
        "has-labels": int(site.has_labels),
        "spatial-dims": int(m.get("spatial_dims", 2)),
        "n-channels": int(site.data.images.shape[1]),
        "n-features": int(site.data.clinical.shape[1]),
        "image-shape": list(site.data.images.shape[1:]),
    }


def clinical_sums(site: Site, fold: int, folds: int, seed: int) -> dict[str, Any]:
    """Sums and sums of squares of the clinical features on the training partition (for standardisation)."""
    x = site.partition(fold, "train", folds, seed).clinical.astype(np.float64)
    return {"num-examples": len(x), "sum": x.sum(axis=0), "sumsq": (x**2).sum(axis=0)}


def logistic_stats(site: Site, fold: int, folds: int, seed: int, beta, mean, std) -> dict[str, Any]:
    """Gradient / Hessian / log-likelihood of the CF model at beta on the training partition."""
    d = site.partition(fold, "train", folds, seed)
    if np.any(d.labels < 0):
        raise StudyError(f"site {site.name}: cannot fit the CF model without slm labels")
    s = suff_stats(standardise(d.clinical, mean, std), d.labels, np.asarray(beta, dtype=np.float64))
    return {"num-examples": int(s["n"]), "grad": s["grad"], "hess": np.asarray(s["hess"]).ravel(), "loglik": float(s["loglik"])}


def _model(site: Site, model_name: str, state=None):
    from common.model import build_model

    n_ch, dims = site.data.images.shape[1], int(site.data.manifest.get("spatial_dims", 2))
    net = build_model(site.cfg, n_ch, dims, site.data.clinical.shape[1], use_clinical=(model_name == "combined"))
    if state is not None:
        net.load_state_dict(state)
    return net


def train_dl(site: Site, model_name: str, state, fold: int, folds: int, seed: int, rnd: int, mean, std) -> tuple[Any, dict]:
    """One federated round of local training; returns the new state_dict and aggregate metrics."""
    from client.train import train

    d = site.partition(fold, "train", folds, seed)
    net = _model(site, model_name, state)
    global_params = dict(state) if float(site.cfg["fedprox-mu"]) > 0 else None
    # a different, reproducible stream per (model, fold, round, site): resume gives identical results
    local_seed = int(np.random.SeedSequence([seed, MODELS.index(model_name), fold + 1, rnd, _site_hash(site.name)]).generate_state(1)[0] % (2**31))
    out = train(net, d, site.cfg, mean, std, seed=local_seed, global_params=global_params)
    return net.state_dict(), {"num-examples": int(out["num_examples"]), "train-loss": float(out["loss"]),
                              "train-seconds": float(out["seconds"])}


def _site_hash(name: str) -> int:
    import hashlib

    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def predict(site: Site, model_name: str, d: SiteData, payload: Mapping[str, Any], mean, std) -> np.ndarray:
    if model_name == "cf":
        x1 = add_intercept(standardise(d.clinical, mean, std)).astype(np.float64)
        return 1.0 / (1.0 + np.exp(-(x1 @ np.asarray(payload["beta"], dtype=np.float64))))
    from client.train import predict_proba

    return predict_proba(_model(site, model_name, payload["state"]), d, mean, std, site.cfg)


def evaluate_model(site: Site, model_name: str, payload, fold: int, part: str, folds: int, seed: int, mean, std,
                   study_id: str, store: bool, bins: int) -> dict[str, Any]:
    """Predict a partition; keep per-patient scores locally, return aggregates only."""
    d = site.partition(fold, part, folds, seed)
    probs = predict(site, model_name, d, payload, mean, std)
    if store:
        site.store_predictions(study_id, model_name, fold, part, d.keys, d.labels, probs)
    out: dict[str, Any] = {"num-examples": len(d)}
    if site.has_labels:
        out["loss"], out["auc"] = M.loss_and_auc(d.labels, probs)
        if site.cfg["share-histograms"]:
            neg, pos = M.score_histograms(d.labels, probs, bins=bins)
            out["hist-neg"], out["hist-pos"] = neg, pos
    return out


def summary(site: Site, study_id: str, models: list[str], kind: str, folds: int, thresholds: Mapping[str, float],
            bins: int) -> dict[str, Any]:
    """The site's result table rows: per model AUC (DeLong CI), metrics at the given thresholds, DCA,
    calibration bins, histograms, and DeLong tests of Combined vs the others. Aggregates only."""
    if not site.has_labels:
        raise StudyError(f"site {site.name}: a results summary needs slm labels")
    preds = {m: site.pooled_predictions(study_id, m, kind, folds) for m in models}
    keys_ref, y_ref, _ = next(iter(preds.values()))
    for m, (keys, _, _) in preds.items():
        if not np.array_equal(keys, keys_ref):
            raise StudyError(f"site {site.name}: stored {m} predictions cover other patients than the other models'")
    out: dict[str, Any] = {}
    ths = M.DEFAULT_THRESHOLDS
    for m, (_, y, p) in preds.items():
        s = M.summarize(y, p, threshold=thresholds.get(m))
        for k, v in s.items():
            out[f"{m}.{k}"] = v
        out[f"{m}.net-benefit"] = M.net_benefit(y, p, ths)
        mp, obs, cnt = M.calibration_bins(y, p, bins=10)
        out[f"{m}.calib-mean-pred"], out[f"{m}.calib-obs-rate"], out[f"{m}.calib-count"] = mp, obs, cnt
        if site.cfg["share-histograms"]:
            neg, pos = M.score_histograms(y, p, bins=bins)
            out[f"{m}.hist-neg"], out[f"{m}.hist-pos"] = neg, pos
    out["treat-all"] = M.net_benefit_treat_all(y_ref, ths)
    n_pos = int(np.sum(y_ref))
    if "combined" in preds:
        for other in ("cf", "dl"):
            if other in preds:
                # undefined (NaN) with fewer than 2 patients in a class, as the DeLong variance is
                z, pval = (M.delong_test(y_ref, preds["combined"][2], preds[other][2])
                           if min(n_pos, len(y_ref) - n_pos) >= 2 else (float("nan"), float("nan")))
                out[f"delong.combined-vs-{other}.z"], out[f"delong.combined-vs-{other}.p"] = float(z), float(pval)
    out["num-examples"] = int(len(y_ref))
    out["num-positive"] = int(np.sum(y_ref))
    return out
