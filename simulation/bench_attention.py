"""Where the DL models look: Grad-CAM attention mass inside the dilated tumour ROI (`slmfed predict`).

Runs `slmfed predict` with a study's final models on a site folder of the synthetic cohort and
prints, per DL model, the share of each patient's Grad-CAM mass that lies within DILATE_MM of the
ROI (median and quartiles over patients), beside what a uniform map would give (the dilated ROI's
share of the crop), and whether the probabilities equal the study's own stored evaluation of that
site (when the site's study folder still holds it).

A run folder from before models/<fit>.json existed is completed first from its checkpoint, its
results.json and the caches its simulation.json names (their manifests give the preprocessing).
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np


def configure(p) -> None:
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run folder of `slmfed simulate`")
    p.add_argument("--site", required=True, metavar="SITE_DIR", help="site folder to predict (e.g. data/synthetic-paper/center-external)")
    p.add_argument("--out", default=None, metavar="DIR", help="predict output (default: RUN_DIR/predict-<site>)")
    p.add_argument("--fit", default="final", help="which fit's models (default final)")


def backfill_bundle(run_dir: Path, fit: str) -> Path:
    """models/<fit>.json for a run folder written before the file existed."""
    from client.cache import read_manifest
    from common.model_input import describe
    from server.model_bundle import write_model_bundles

    path = run_dir / "models" / f"{fit}.json"
    if path.is_file():
        return path
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    res = json.loads((run_dir / "results.json").read_text())
    sim = json.loads((run_dir / "simulation.json").read_text())
    for node in sim["sites"]:
        state["sites"].setdefault(node["site-name"], {})["model-input"] = describe(read_manifest(node["cache-dir"]))
    cfg = {**res["config"], **sim["run_config"]}
    write_model_bundles(run_dir, state, res, cfg)
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no fit {fit!r} with models to describe")
    print(f"wrote {path} (backfilled from the checkpoint, results.json and the caches' manifests)")
    return path


def stored_evaluation(site_dir: Path, study_id: str, fit: str, pred_dir: Path) -> dict[str, float] | None:
    """Max |predict - study evaluation| per model, from the site's own study folder (None if gone)."""
    cache = site_dir.parent / "caches" / site_dir.name
    folder = cache.parent / f"{cache.name}-study" / study_id / fit
    if not folder.is_dir():
        return None
    with open(cache.parent / f"{cache.name}-id-map.csv", newline="") as fh:
        ids = {r["patient_key"]: r["patient_id"] for r in csv.DictReader(fh)}
    with open(pred_dir / "worklist.csv", newline="") as fh:
        wl = {r["patient_id"]: r for r in csv.DictReader(fh)}
    out = {}
    for model in ("cf", "dl", "combined"):
        f = folder / model / "fold-1-all.npz"
        if f.is_file():
            with np.load(f) as z:
                mine = np.array([float(wl[ids[str(k)]][f"p_{model}"]) for k in z["keys"]])
                out[model] = float(np.abs(mine - z["probs"]).max())
    return out


def run(args) -> int:
    from scipy.ndimage import binary_dilation

    from client import cache as cache_mod
    from client.predict import DILATE_MM, load_bundle, run_predict

    run_dir, site = Path(args.run), Path(args.site)
    bundle = load_bundle(backfill_bundle(run_dir, args.fit))
    out = Path(args.out or run_dir / f"predict-{site.name}")
    t0 = time.perf_counter()
    results = run_predict(bundle.path, site, out)
    elapsed = time.perf_counter() - t0
    done = [r for r in results if r.status == "predicted"]
    print(f"{bundle.identity()}\npredicted {len(done)} of {len(results)} patients of {site} in {elapsed:.1f} s")
    pre = bundle.meta["preprocessing"]
    px = float(pre["fov-mm"]) / float(pre["crop-size"])
    data = cache_mod.load_cache(out / "prepared")
    share = []
    for key in data.keys:
        with np.load(out / "prepared" / cache_mod.PATIENTS_DIR / f"{key}.npz") as z:
            roi = z["roi"][0] > 0 if z["roi"].ndim == 3 else z["roi"] > 0
        share.append(binary_dilation(roi, iterations=int(round(DILATE_MM / px))).mean())
    print(f"uniform attention would put {np.median(share):.2f} (median; quartiles {np.quantile(share, 0.25):.2f}-"
          f"{np.quantile(share, 0.75):.2f}) of its mass within {DILATE_MM:g} mm of the ROI")
    for m in ("dl", "combined"):
        v = np.array([r.attention_in_roi[m] for r in done if m in r.attention_in_roi])
        v = v[np.isfinite(v)]
        if v.size:
            print(f"{m:>8}: Grad-CAM mass within {DILATE_MM:g} mm of the ROI: median {np.median(v):.2f} "
                  f"(quartiles {np.quantile(v, 0.25):.2f}-{np.quantile(v, 0.75):.2f}; > 0.5 in {np.mean(v > 0.5):.0%} "
                  f"of {v.size} patients)")
    diff = stored_evaluation(site, bundle.meta["study_id"], args.fit, out)
    if diff is None:
        print("the site's study folder no longer holds this study's evaluation: no comparison")
    else:
        print("max |predict - the study's stored evaluation|: " + ", ".join(f"{m} {d:.3g}" for m, d in diff.items()))
    return 0
