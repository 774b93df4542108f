"""The model file a site needs to use a trained model: models/<fit>.json beside models/<fit>-<model>.npz.

Written once the study is summarised (the development threshold is known only then), from what the
coordinator already holds, i.e. from what the sites released under their policies:
  - the CF coefficients and the fit's clinical standardisation (pooled feature sums, >= k per class);
  - the DL / Combined weights (file name + sha256);
  - per model the development Youden threshold and the development sensitivity / specificity at it,
    both from the pooled k-safe out-of-fold score cells (the same cells the report uses), and the
    sensitivity / specificity at that threshold on each external cohort's cells;
  - the training sites' common model-input description (common/model_input.py), sent as settings;
  - development ranges of the clinical inputs: the pooled mean +- Z_RANGE SD of each standardised
    feature (the standardisation itself; nothing per patient), and, for a 0/1 feature whose
    development mean is 0 or 1, the one value the model has seen.
`slmfed predict` (client/predict.py) reads only this file and the weights it names.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from common import metrics as M
from common.atomic import atomic_write_json
from common.clinical import FEATURE_NAMES
from common.config import SENT_MODEL_KEYS
from common.model_input import agree

log = logging.getLogger(__name__)
FORMAT = "slmfed-model-1"
Z_RANGE = 3.0  # a standardised clinical input beyond +- this many development SDs is "out of range"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_id(bundle: dict[str, Any]) -> str:
    """A short hash of everything that determines the predictions (weights, coefficients,
    standardisation, thresholds, preprocessing): two files with the same id predict the same."""
    core = {k: bundle.get(k) for k in ("models", "standardisation", "thresholds", "preprocessing", "settings")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def external_operating_points(res: dict, thresholds: dict[str, float]) -> dict[str, list[dict]]:
    """Per model and external cohort: sensitivity / specificity at the development threshold on that
    cohort's k-safe score cells (the external validation rows of the report), so a user sees how the
    threshold fared outside the development cohort, not only inside it."""
    out: dict[str, list[dict]] = {}
    for model, t in thresholds.items():
        for r in res["rows"]:
            c = res["curves"].get(r["cohort"], {}).get(model, {})
            if r["model"] != model or r["kind"] != "final" or "cell_edges" not in c:
                continue
            neg, pos = np.asarray(c["cell_neg"], float), np.asarray(c["cell_pos"], float)
            op = M.operating_point_from_cells(np.asarray(c["cell_edges"]), neg, pos, t)
            out.setdefault(model, []).append(
                {"cohort": r["cohort"], "sensitivity": float(op["sensitivity"]), "specificity": float(op["specificity"]),
                 "interpolated": bool(op["interpolated"]), "n": int(round(neg.sum() + pos.sum())),
                 "auc": [r["auc"], r["auc_ci_low"], r["auc_ci_high"]]})
    return out


def development_operating_points(res: dict, thresholds: dict[str, float]) -> dict[str, dict]:
    """Per model: sensitivity / specificity at the development threshold on the pooled out-of-fold
    cells of the cross-validation ("cv"; other out-of-fold fits when there is none), as the threshold
    itself was chosen (server.protocol.development_thresholds)."""
    out = {}
    for model, t in thresholds.items():
        for tags in (("cv",), None):
            rows = [r for r in res["rows"] if r["model"] == model and r["kind"] == "oof"
                    and (tags is None or r["tag"] in tags)]
            parts = []
            for r in rows:
                c = res["curves"].get(r["cohort"], {}).get(model, {})
                if "cell_edges" in c:
                    parts.append((np.asarray(c["cell_edges"]), np.asarray(c["cell_neg"], float), np.asarray(c["cell_pos"], float)))
            if parts:
                edges, neg, pos = M.pool_cells(parts)
                op = M.operating_point_from_cells(edges, neg, pos, t)
                out[model] = {"sensitivity": float(op["sensitivity"]), "specificity": float(op["specificity"]),
                              "interpolated": bool(op["interpolated"]), "n": int(round(neg.sum() + pos.sum())),
                              "n_pos": int(round(pos.sum())),
                              "cohorts": [r["cohort"] for r in rows],
                              "auc": {r["cohort"]: [r["auc"], r["auc_ci_low"], r["auc_ci_high"]] for r in rows}}
                break
    return out


def clinical_ranges(mean: list[float], std: list[float]) -> dict[str, dict]:
    out = {}
    for name, m, s in zip(FEATURE_NAMES, mean, std):
        entry: dict[str, Any] = {"mean": float(m), "sd": float(s), "low": float(m - Z_RANGE * s), "high": float(m + Z_RANGE * s)}
        if name in ("sex_male", "tumor_site_mid", "tumor_site_high", "cea_elevated", "ca199_elevated") and m in (0.0, 1.0):
            entry["only-value"] = float(m)  # every development patient had this value
        out[name] = entry
    return out


def build_bundle(tag: str, fit: dict, state: dict, res: dict, cfg: dict, run_dir: Path) -> dict | None:
    """The model file of fit `tag` (fold -1), or None when the fit produced no model."""
    std = state.get("standardisation", {}).get(tag) or state.get("cf", {}).get(f"{tag}/-1")
    if std is None:
        return None
    models: dict[str, Any] = {}
    cf = state.get("cf", {}).get(f"{tag}/-1")
    if cf is not None:
        models["cf"] = {"beta": [float(b) for b in cf["beta"]]}
    for m in ("dl", "combined"):
        path = run_dir / "models" / f"{tag}-{m}.npz"
        if path.is_file() and [tag, m] not in state.get("not_computed", []):
            models[m] = {"weights": path.name, "sha256": sha256_file(path)}
    if not models:
        return None
    train = list(fit.get("train", []))
    descriptions = {s: state["sites"].get(s, {}).get("model-input", {}) for s in train}
    preprocessing, conflicts = agree(descriptions) if descriptions else ({}, {})
    if conflicts:
        log.warning("fit %s: the training sites prepared their inputs differently (%s): predict will refuse this "
                    "model", tag, ", ".join(sorted(conflicts)))
    thresholds = {m: float(t) for m, t in (res.get("thresholds") or {}).items() if m in models}
    sites = state.get("sites", {})
    bundle = {
        "format": FORMAT,
        "fit": tag,
        "study_id": state["study_id"],
        "scenario": cfg["scenario"],
        "trained": res["created"],
        "versions": res.get("versions", {}),
        "cohorts": {"training": {s: {"patients": sites.get(s, {}).get("num-examples", -1),
                                     "with_slm": sites.get(s, {}).get("num-positive", -1)} for s in train},
                    "evaluated": sorted(set(fit.get("test", [])))},
        "settings": {**{k: cfg[k] for k in SENT_MODEL_KEYS}, "seed": cfg["seed"]},
        "standardisation": {"mean": [float(x) for x in std["mean"]], "std": [float(x) for x in std["std"]],
                            "features": list(FEATURE_NAMES)},
        "clinical_ranges": clinical_ranges(std["mean"], std["std"]),
        "clinical_range_z": Z_RANGE,
        "models": models,
        "thresholds": thresholds,
        "development": development_operating_points(res, thresholds),
        "external": external_operating_points(res, thresholds),
        "preprocessing": preprocessing,
        "preprocessing_conflicts": conflicts,
    }
    bundle["model_id"] = model_id(bundle)
    return bundle


def write_model_bundles(run_dir: str | Path, state: dict, res: dict, cfg: dict) -> list[Path]:
    """models/<fit>.json for every fit on all training patients (the paper scenario: "final")."""
    run_dir = Path(run_dir)
    written = []
    fits = state.get("fits", {})
    for i, planned in enumerate(state.get("plan", [])):
        if planned["fold"] >= 0:
            continue
        fit = fits.get(str(i), planned)  # after sit-outs
        bundle = build_bundle(planned["tag"], fit, state, res, cfg, run_dir)
        if bundle is not None:
            path = run_dir / "models" / f"{planned['tag']}.json"
            atomic_write_json(path, bundle)
            written.append(path)
    return written
