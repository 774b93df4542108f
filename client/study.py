"""The site's side of the study protocol, as plain functions (no Flower in here).

The ClientApp (client/app.py) translates each message into one call below. Every function returns only
what may leave the site (model weights, counts, aggregate statistics, score histograms); per-patient
predictions are written to the site-local study folder so out-of-fold results can be pooled across
messages (each message may run in a fresh process).

Partitions: `fold` is 0..folds-1 for cross-validation or -1 for the final fit on all patients;
`part` is "train" (the fold's training patients), "val" (its held-out patients) or "all".

Every handler gets the request already validated (client/disclosure.py `validate_request`) and a
`Gate`: before computing anything on a patient group it calls `gate.release` (min-cell-size,
no-differencing), spends the query budget, and releases score summaries only as k-safe cells.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from client.cache import SiteData, atomic_write_bytes, load_cache
from client.disclosure import LOGISTIC_QUERIES, Gate, Refused, digest
from client.policy import Ledger, SitePolicy
from common import metrics as M
from common.clinical import standardise
from common.config import MODELS, SCHEMA
from common.logistic import add_intercept, suff_stats

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
    def policy(self) -> SitePolicy:
        return SitePolicy.from_config(self.cfg)

    def gate(self) -> Gate:
        ledger = Path(self.cfg["privacy-ledger"]) if self.cfg.get("privacy-ledger") else self.study_dir / "disclosure-ledger.json"
        return Gate(self.policy, Ledger(ledger), list(self.data.keys), self.data.labels)

    @property
    def n_features(self) -> int:
        return int(self.data.clinical.shape[1])

    @property
    def has_labels(self) -> bool:
        return bool(np.all(self.data.labels >= 0))

    # ---- partitions -----------------------------------------------------------------------------
    def fold_ids(self, folds: int, seed: int) -> np.ndarray:
        """Stratified fold of each patient, reproducible from the seed the server sends (a repeat of a
        repeated CV sends its own seed: another assignment, i.e. new patient groups for the gate)."""
        y = self.data.labels
        if not self.has_labels:
            raise StudyError(f"site {self.name}: cross-validation needs an slm label for every patient")
        n_min = int(min(np.sum(y == 0), np.sum(y == 1)))
        if n_min < folds:
            raise Refused("min-cell-size", f"{folds}-fold stratified CV needs at least {folds} patients of each class",
                          f"found {int(np.sum(y == 1))} with SLM and {int(np.sum(y == 0))} without")
        return stratified_folds(y, folds, seed)

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
        # study_id is "<study>/<plan tag>" and matched disclosure.STUDY_ID before it gets here; the
        # resolved path is checked to stay inside the study folder all the same
        path = (self.study_dir / study_id / model / f"fold{int(fold)}-{part}.npz").resolve()
        if model not in MODELS or part not in ("train", "val", "all") or not path.is_relative_to(self.study_dir.resolve()):
            raise StudyError(f"site {self.name}: refusing a prediction path outside its study folder")
        return path

    def store_predictions(self, study_id: str, model: str, fold: int, part: str, keys, labels, probs) -> None:
        buf = io.BytesIO()
        np.savez(buf, keys=np.asarray(keys), labels=np.asarray(labels), probs=np.asarray(probs, dtype=np.float64))
        atomic_write_bytes(self._pred_path(study_id, model, fold, part), buf.getvalue())

    def load_predictions(self, study_id: str, model: str, fold: int, part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        path = self._pred_path(study_id, model, fold, part)
        if not path.is_file():
            # the path stays at the site: a reply never carries where the site keeps its files
            raise StudyError(f"site {self.name}: no stored predictions for {model} fold {fold} ({part}) in this study")
        with np.load(path, allow_pickle=False) as z:
            return z["keys"], z["labels"], z["probs"]

    def pooled_predictions(self, study_id: str, model: str, kind: str, folds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Out-of-fold predictions pooled over the CV folds ("oof"), or the final model's ("final")."""
        if kind == "final":
            return self.load_predictions(study_id, model, -1, "all")
        parts = [self.load_predictions(study_id, model, k, "val") for k in range(folds)]
        keys = np.concatenate([p[0] for p in parts])
        # the cache's own patient order (by patient_id, client/cache.py), not the salted keys: summaries
        # then sum in the same order whatever the salt, so two caches of one cohort give identical rows
        position = {k: i for i, k in enumerate(self.data.keys)}
        order = np.argsort([position.get(str(k), len(position)) for k in keys], kind="stable")
        return keys[order], np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order]


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold of each patient (in the site's patient order): the stratified, seeded split every CV of a
    study uses, at the site and in the handcrafted baseline (simulation/handcrafted.py)."""
    from sklearn.model_selection import StratifiedKFold  # lazy: each message may be a fresh process

    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=int(seed))
    ids = np.empty(len(y), dtype=int)
    for k, (_, val) in enumerate(skf.split(np.zeros(len(y)), y)):
        ids[val] = k
    return ids


def cv_partitions(folds: int, repeats: int) -> int:
    """Distinct patient groups one study asks of a cross-validation site: its whole cohort, plus a
    training and a held-out group per fold of each repeat (every CV family of a repeat, and the final
    fit on all patients, reuse these). What a site's max-partitions must allow for one such study."""
    return 1 + 2 * int(folds) * int(repeats)


def sized_for_repeats(site: dict, folds: int, repeats: int) -> dict:
    """A virtual site's node config for one study of `repeats` CV repeats: its max-partitions raised to
    fit (cv_partitions) only where it falls short, and the released-group audit reporting instead of
    refusing (a second fold assignment is what a real site refuses; the researcher owns every virtual
    site, and the report lists what a real one would have refused). Only for repeats > 1; a copy
    either way. For the simulation's own sites only: a real site's policy is its own node config."""
    if repeats <= 1:
        return dict(site)
    need = cv_partitions(folds, repeats)
    have = int(site.get("max-partitions", SCHEMA["max-partitions"].default))
    return {**site, "span-audit": "report", **({"max-partitions": need} if have < need else {})}


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
# Each takes the validated request `req` (keys as in the message) and the request's Gate.
def site_info(site: Site, gate: Gate) -> tuple[dict[str, Any], dict[str, str]]:
    """Shapes always; the cohort's counts only when the policy lets the whole cohort be released."""
    m = site.data.manifest
    out: dict[str, Any] = {
        "has-labels": int(site.has_labels),
        "spatial-dims": int(m.get("spatial_dims", 2)),
        "n-channels": int(site.data.images.shape[1]),
        "n-features": site.n_features,
        "image-shape": list(site.data.images.shape[1:]),
    }
    notes: dict[str, str] = {}
    try:
        gate.release(site.data.keys, site.data.labels, "the whole cohort")
        out["num-examples"] = len(site.data)
        out["num-positive"] = int(np.sum(site.data.labels == 1)) if site.has_labels else -1
        out["cohort-released"] = 1
    except Refused as exc:
        out["num-examples"] = out["num-positive"] = -1
        out["cohort-released"] = 0
        notes["cohort"] = str(exc)
    return out, notes


def _partition(site: Site, gate: Gate, req: Mapping[str, Any], part: str) -> SiteData:
    """The requested patient group, released by the gate (or Refused)."""
    gate.study(req["study-id"])
    gate.cohort()  # before the folds are made: whether they can be made depends on withheld counts
    fold = req["fold"]
    d = site.partition(fold, part, req["folds"], req["seed"])
    what = {"all": "all patients", "train": f"training patients of fold {fold}" if fold >= 0 else "all patients",
            "val": f"held-out patients of fold {fold}"}[part]
    gate.release(d.keys, d.labels, what)
    return d


def clinical_sums(site: Site, gate: Gate, req: Mapping[str, Any]) -> dict[str, Any]:
    """Sums and sums of squares of the clinical features on the training partition (for standardisation),
    and of the model's ROI statistics (client/train.py roi_statistics) when the images carry the ROI mask:
    the same patient group, released by the same gate."""
    from client.train import roi_statistics

    d = _partition(site, gate, req, "train")
    x = d.clinical.astype(np.float64)
    out = {"num-examples": len(x), "sum": x.sum(axis=0), "sumsq": (x**2).sum(axis=0)}
    r = roi_statistics(d) if req.get("roi-sums", True) else None
    if r is not None:
        out.update({"roi-sum": r.sum(axis=0), "roi-sumsq": (r**2).sum(axis=0)})
    return out


def _site_sd(site: Site) -> np.ndarray:
    return site.data.clinical.astype(np.float64).std(axis=0)


def logistic_stats(site: Site, gate: Gate, req: Mapping[str, Any]) -> dict[str, Any]:
    """Gradient / Hessian / log-likelihood of the CF model at beta on the training partition."""
    d = _partition(site, gate, req, "train")
    if np.any(d.labels < 0):
        raise StudyError(f"site {site.name}: cannot fit the CF model without slm labels")
    beta, mean, std = req["beta"], req["clinical-mean"], req["clinical-std"]
    gate.logit_slopes(beta, std, _site_sd(site))
    gate.spend(f"{req['study-id']}|cf-stats|fold{req['fold']}", digest(beta, mean, std), limit=LOGISTIC_QUERIES)
    x = standardise(d.clinical, mean, std)
    p = 1.0 / (1.0 + np.exp(-(add_intercept(x).astype(np.float64) @ beta)))
    # near a step function the Hessian's weight sits on the few patients at the boundary (the slope
    # bound keeps crafted coefficients away from that; this refuses what is left)
    gate.weighted(p * (1.0 - p), "CF Hessian")
    s = suff_stats(x, d.labels, beta)
    return {"num-examples": int(s["n"]), "grad": s["grad"], "hess": np.asarray(s["hess"]).ravel(), "loglik": float(s["loglik"])}


def _model(site: Site, model_name: str, state=None):
    from common.model import build_model

    n_ch, dims = site.data.images.shape[1], int(site.data.manifest.get("spatial_dims", 2))
    net = build_model(site.cfg, n_ch, dims, site.n_features, use_clinical=(model_name == "combined"),
                      channels=site.data.manifest.get("channels"))
    if state is not None:
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        sent = {k: tuple(v.shape) for k, v in state.items()}
        if sent != expected:
            odd = sorted(set(sent) ^ set(expected)) or [k for k in sent if sent[k] != expected[k]]
            raise Refused("model-weights", f"the {model_name} weights do not match the model the settings describe "
                                           f"(first mismatch: {odd[0]!r})")
        if not all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point()):
            raise Refused("model-weights", f"the {model_name} weights hold NaN or infinite values")
        net.load_state_dict(state)
    return net


def _weights_digest(state) -> str:
    return digest(*[k for k in state], *[v.detach().cpu().numpy() for v in state.values()])


def train_dl(site: Site, gate: Gate, req: Mapping[str, Any], state) -> tuple[Any, dict]:
    """One federated round of local training; returns the new state_dict and aggregate metrics."""
    from client.dp import DPError
    from client.train import train

    model_name, fold, rnd = req["model"], req["fold"], req["round"]
    d = _partition(site, gate, req, "train")
    net = _model(site, model_name, state)
    if gate.policy.dp_epsilon > 0 and net.config["roi_stats"]:
        _check_reference_standardisation(net, req)
    settings = {k: req[k] for k in req if k not in ("clinical-mean", "clinical-std")}
    request = digest(settings, req["clinical-mean"], req["clinical-std"], _weights_digest(state))
    gate.spend(f"{req['study-id']}|train|{model_name}|fold{fold}|round{rnd}", request)
    gate.count("fits", req["study-id"], f"{req['study-id']}|{model_name}|fold{fold}")
    dp = gate.dp_training(req["study-id"], model_name, request, n_train=len(d),
                          n_min=lambda: _smallest_training_part(site, req, len(d)),
                          batch=req["batch-size"], epochs=req["local-epochs"], rounds=req["num-rounds"],
                          dp_fits=req.get("dp-fits"))
    global_params = dict(state) if float(site.cfg["fedprox-mu"]) > 0 else None
    # a different, reproducible stream per (model, fold, round, site): resume gives identical results
    local_seed = int(np.random.SeedSequence([req["seed"], MODELS.index(model_name), fold + 1, rnd, _site_hash(site.name)]).generate_state(1)[0] % (2**31))
    try:
        out = train(net, d, site.cfg, req["clinical-mean"], req["clinical-std"], seed=local_seed,
                    global_params=global_params, dp=None if dp is None else dp[0])
    except DPError as exc:  # raised before any step: the ledger transaction is not committed
        raise StudyError(f"site {site.name}: {exc}") from None
    return net.state_dict(), {"num-examples": int(out["num_examples"]), "train-loss": float(out["loss"]),
                              "train-seconds": float(out["seconds"]), **({} if dp is None else dp[1])}


def _check_reference_standardisation(net, req: Mapping[str, Any]) -> None:
    """Under DP: the ROI statistics' standardisation in the weights must be the study's reference, as
    sent; one pooled from the sites' sums is fitted on their patients outside the DP budget."""
    import torch

    from common.derive import roi_reference

    text = str(req.get("roi-stats-reference") or "")
    if not text:
        raise Refused("dp-standardisation", "under this site's DP policy the ROI statistics must be standardised "
                                            "from the study's reference (roi-stats-reference), not from the sites' sums")
    nets = getattr(net, "members", [net])
    try:
        mean, std = roi_reference(text, nets[0].roi_stats_mean.numel())
    except ValueError as exc:
        raise Refused("request", str(exc)) from None
    for n in nets:
        if not (torch.equal(n.roi_stats_mean, torch.as_tensor(mean, dtype=n.roi_stats_mean.dtype))
                and torch.equal(n.roi_stats_std, torch.as_tensor(std, dtype=n.roi_stats_std.dtype))):
            raise Refused("dp-standardisation", "the weights' ROI statistics standardisation is not the study's "
                                                "reference (roi-stats-reference)")


def _smallest_training_part(site: Site, req: Mapping[str, Any], n_train: int) -> int:
    """Patients in the smallest CV training part of this study's folds: the DP calibration's
    sampling rate (every fit trains on at least this many; more patients cost less epsilon). A site
    too small for the study's CV trains only on all its patients, `n_train`."""
    try:
        return min(len(site.partition(f, "train", req["folds"], req["seed"])) for f in range(req["folds"]))
    except (Refused, StudyError):
        return n_train


def _site_hash(name: str) -> int:
    import hashlib

    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def predict(site: Site, model_name: str, d: SiteData, payload: Mapping[str, Any], mean, std) -> np.ndarray:
    if model_name == "cf":
        x1 = add_intercept(standardise(d.clinical, mean, std)).astype(np.float64)
        return 1.0 / (1.0 + np.exp(-(x1 @ np.asarray(payload["beta"], dtype=np.float64))))
    from client.train import predict_proba

    return predict_proba(_model(site, model_name, payload["state"]), d, mean, std, site.cfg)


def evaluate_model(site: Site, gate: Gate, req: Mapping[str, Any], payload: Mapping[str, Any]) -> dict[str, Any]:
    """Predict a partition; keep per-patient scores locally, return the loss and AUC only.

    Stored evaluations (the plan's one per fit, model and partition) feed the summary; unstored
    ones are the per-round learning curve, one per round."""
    model_name, part, fold = req["model"], req["part"], req["fold"]
    d = _partition(site, gate, req, part)
    mean, std = req["clinical-mean"], req["clinical-std"]
    if model_name == "cf":
        gate.logit_slopes(req["beta"], std, _site_sd(site))
        content = digest(req["beta"], mean, std)
    else:
        content = digest({k: req[k] for k in req if k not in ("clinical-mean", "clinical-std")}, mean, std,
                         _weights_digest(payload["state"]))
    when = "stored" if req["store"] else f"round{req['round']}"
    key = f"{req['study-id']}|evaluate|{model_name}|fold{fold}|{part}|{when}"
    gate.spend(key, content)
    gate.count("evaluations", req["study-id"], key)
    probs = predict(site, model_name, d, payload, mean, std)
    if req["store"]:
        site.store_predictions(req["study-id"], model_name, fold, part, d.keys, d.labels, probs)
    out: dict[str, Any] = {"num-examples": len(d)}
    if site.has_labels:
        out["loss"], out["auc"] = M.loss_and_auc(d.labels, probs)
    return out


def summary(site: Site, gate: Gate, req: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The site's result rows from its stored predictions: per model the exact AUC with DeLong CI,
    Brier score and calibration statistics, k-safe score cells (edges, per-class counts, mean
    prediction per cell) when the policy shares them, and DeLong tests of Combined vs the others.
    Threshold metrics and decision curves are derived by the server from the cells."""
    if not site.has_labels:
        raise StudyError(f"site {site.name}: a results summary needs slm labels")
    study_id, models, kind, folds = req["study-id"], req["models"], req["kind"], req["folds"]
    gate.study(study_id)
    gate.spend(f"{study_id}|summary|{kind}", digest(req))
    preds = {m: site.pooled_predictions(study_id, m, kind, folds) for m in models}
    keys_ref, y_ref, _ = next(iter(preds.values()))
    for m, (keys, _, _) in preds.items():
        if not np.array_equal(keys, keys_ref):
            raise StudyError(f"site {site.name}: stored {m} predictions cover other patients than the other models'")
    gate.release(list(keys_ref), y_ref, "the patients of this summary")
    out: dict[str, Any] = {"num-examples": int(len(y_ref)), "num-positive": int(np.sum(y_ref))}
    notes: dict[str, str] = {}
    for m, (_, y, p) in preds.items():
        s = M.summarize(y, p)
        for k in ("n", "n_pos", "auc", "auc_ci_low", "auc_ci_high", "brier", "calib_intercept", "calib_slope",
                  "hl_stat", "hl_p"):
            out[f"{m}.{k}"] = s[k]
        if not np.isfinite(s["calib_intercept"]):
            notes[f"{m}.calib_intercept"] = "undefined: no finite fit (e.g. hard 0/1 scores)"
        if gate.policy.share_histograms:
            edges, neg, pos, cell = gate.cells(y, p)
            out[f"{m}.cell-edges"], out[f"{m}.cell-neg"], out[f"{m}.cell-pos"] = edges, neg, pos
            sums = np.bincount(cell, weights=p, minlength=len(neg))
            with np.errstate(invalid="ignore", divide="ignore"):
                out[f"{m}.calib-mean-pred"] = np.where(neg + pos > 0, sums / np.maximum(neg + pos, 1), np.nan)
    if "combined" in preds:
        for other in ("cf", "dl"):
            if other in preds:
                key = f"delong.combined-vs-{other}"
                try:
                    z, pval = M.delong_test(y_ref, preds["combined"][2], preds[other][2])
                except (M.DegenerateStatistic, ValueError) as exc:
                    z = pval = float("nan")
                    notes[key] = str(exc)
                out[f"{key}.z"], out[f"{key}.p"] = float(z), float(pval)
    return out, notes
