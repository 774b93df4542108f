"""The run folder: results.json, report.md (the paper's table), figures and a model card.

Everything here is computed from the protocol state, i.e. from aggregates the sites sent. report.md
is rendered from the very rows written to results.json, so the two cannot disagree.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from common import metrics as M
from common import plots
from common.atomic import atomic_write_json, atomic_write_text
from common.clinical import FEATURE_NAMES
from common.logistic import LogisticCF

MODEL_LABEL = {"cf": "CF model", "dl": "MRI DL model", "combined": "Combined DL model"}
# The paper's abstract (doi 10.1186/s12880-025-01692-3); printed beside, never compared as if the same data.
PAPER_AUC = {"cf": ("0.816 (0.750-0.881)", "0.824 (0.664-0.984)"),
             "dl": ("0.788 (0.720-0.857)", "0.662 (0.461-0.863)"),
             "combined": ("0.887 (0.834-0.940)", "0.876 (0.728-1.000)")}
SUMMARY_FIELDS = ("n", "n_pos", "auc", "auc_ci_low", "auc_ci_high", "threshold", "sensitivity", "specificity",
                  "ppv", "npv", "accuracy", "brier", "calib_intercept", "calib_slope", "hl_stat", "hl_p")


def cohort_label(tag: str, kind: str, site: str, folds: int) -> str:
    if tag == "cv":
        return f"{site}: {folds}-fold CV"
    if tag == "final":
        return f"{site}: external validation"
    if tag.startswith("loco-"):
        return f"{site}: leave-center-out"
    if tag == "central":
        return f"all hospitals pooled centrally: {folds}-fold CV"
    if tag.startswith("local-"):
        return f"{site}: site alone, {folds}-fold CV"
    return f"{site}: {tag} ({kind})"


def _f(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def build_results(state: dict, cfg: dict, truth: dict | None = None) -> dict:
    models = [m for m in ("cf", "dl", "combined") if any(f"{m}.auc" in s["metrics"] for s in state["summaries"])]
    folds = int(cfg["folds"])
    rows, delong, curves = [], [], {}
    for s in state["summaries"]:
        m = s["metrics"]
        cohort = cohort_label(s["tag"], s["kind"], s["site"], folds)
        for model in models:
            row = {"model": model, "cohort": cohort, "site": s["site"], "tag": s["tag"], "kind": s["kind"]}
            row.update({k: _f(m[f"{model}.{k}"]) for k in SUMMARY_FIELDS})
            row["n"], row["n_pos"] = int(m[f"{model}.n"]), int(m[f"{model}.n_pos"])
            rows.append(row)
            curve = curves.setdefault(cohort, {})[model] = {
                "net_benefit": list(m[f"{model}.net-benefit"]),
                "calib_mean_pred": list(m[f"{model}.calib-mean-pred"]),
                "calib_obs_rate": list(m[f"{model}.calib-obs-rate"]),
            }
            if f"{model}.hist-neg" in m:  # the site shares score histograms (share-histograms)
                neg, pos = np.asarray(m[f"{model}.hist-neg"]), np.asarray(m[f"{model}.hist-pos"])
                curve["hist_neg"], curve["hist_pos"] = neg.astype(int).tolist(), pos.astype(int).tolist()
                if neg.sum() and pos.sum():
                    fpr, tpr = M.roc_from_histograms(neg, pos)
                    curve["fpr"], curve["tpr"] = fpr.tolist(), tpr.tolist()
        curves[cohort]["treat_all"] = list(m["treat-all"])
        for other in ("cf", "dl"):
            if f"delong.combined-vs-{other}.p" in m:
                delong.append({"cohort": cohort, "comparison": f"combined vs {other}",
                               "z": _f(m[f"delong.combined-vs-{other}.z"]), "p_value": _f(m[f"delong.combined-vs-{other}.p"])})
    pooled = []
    cv_cohorts = [c for c in curves if any(r["cohort"] == c and r["tag"] == "cv" for r in rows)]
    if len(cv_cohorts) > 1 and all("hist_neg" in curves[c][m] for c in cv_cohorts for m in models):
        for model in models:  # several training sites: pool their out-of-fold histograms
            neg = sum(np.asarray(curves[c][model]["hist_neg"]) for c in cv_cohorts)
            pos = sum(np.asarray(curves[c][model]["hist_pos"]) for c in cv_cohorts)
            pooled.append({"model": model, "cohort": "all training sites: pooled CV (histograms)",
                           "auc_from_histograms": M.auc_from_histograms(neg, pos), "n": int(neg.sum() + pos.sum())})
    cf_tables = {}
    for key, cf in state.get("cf", {}).items():
        if key.endswith("/-1"):
            est = LogisticCF.from_dict({"coef": cf["beta"], "cov": cf["cov"]})
            cf_tables[key.split("/")[0]] = est.coef_table(FEATURE_NAMES).to_dict(orient="records")
    return {
        "study_id": state["study_id"],
        "scenario": cfg["scenario"],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in cfg.items() if not isinstance(v, dict)},
        "versions": _versions(),
        "sites": {name: {**s, "role": _role(name, state.get("plan", []))} for name, s in state["sites"].items()},
        "thresholds": state.get("thresholds", {}),
        "rows": rows,
        "delong": delong,
        "pooled": pooled,
        "cf_model": cf_tables,
        "oracle": _oracle(truth),
        "learning_curves": _learning_curves(state["history"]),
        "communication": state.get("bytes", {}),
        "timing": state.get("timing", {}),
        "curves": curves,
        "thresholds_grid": M.DEFAULT_THRESHOLDS.tolist(),
    }


def _role(site: str, plan: list[dict]) -> str:
    if any(site in f["train"] for f in plan):
        return "trains"
    return "evaluates only" if any(site in f["test"] for f in plan) else "not used"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("slmfed", "flwr", "torch", "monai", "numpy", "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _oracle(truth: dict | None) -> dict:
    if not truth:
        return {}
    return {name: dict(c.get("oracle_auc", {})) for name, c in truth.get("sites", {}).items()}


def _learning_curves(history: list[dict]) -> dict:
    """Mean over folds/sites of the per-round validation AUC and training loss, per model and fit tag."""
    out: dict[str, dict[str, list]] = {}
    for h in history:
        if h.get("fold", -1) < 0:
            continue
        key = f"{h['model']} ({h['tag']})"
        rnd = int(h["round"])
        if h["part"] == "train":
            out.setdefault(key, {}).setdefault("train-loss", {}).setdefault(rnd, []).append(h["train-loss"])
        elif "auc" in h and not math.isnan(float(h["auc"])):
            out.setdefault(key, {}).setdefault("val-auc", {}).setdefault(rnd, []).append(float(h["auc"]))
    return {k: {metric: [[r, float(np.mean(v))] for r, v in sorted(d.items())] for metric, d in series.items()}
            for k, series in out.items()}


# ---- rendering --------------------------------------------------------------------------------
def _fmt(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def auc_cell(r: dict) -> str:
    return f"{_fmt(r['auc'])} ({_fmt(r['auc_ci_low'])}-{_fmt(r['auc_ci_high'])})"


def render_report(res: dict) -> str:
    lines = [f"# SLM prediction study `{res['study_id']}` ({res['scenario']} scenario)", "",
             f"Created {res['created']} with slmfed {res['versions'].get('slmfed')}, flwr {res['versions'].get('flwr')}, "
             f"torch {res['versions'].get('torch')}.", "", "## Sites", "", "| site | patients | with SLM | role |",
             "|---|---|---|---|"]
    for name, s in sorted(res["sites"].items()):
        lines.append(f"| {name} | {s['num-examples']} | {s['num-positive']} | {s['role']} |")
    source = ("the Youden threshold of the development out-of-fold scores (pooled histograms), applied to every cohort"
              if res["thresholds"] else "each cohort's own Youden threshold (the sites withheld score histograms; "
              "optimistic for external cohorts)")
    lines += ["", "## Results", "", f"AUC with DeLong 95% CI; sensitivity / specificity at {source}.", "",
              "| model | cohort | n | AUC (95% CI) | threshold | sensitivity | specificity | Brier |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {MODEL_LABEL[r['model']]} | {r['cohort']} | {r['n']} | {auc_cell(r)} | {_fmt(r['threshold'], 2)} | "
                     f"{_fmt(r['sensitivity'])} | {_fmt(r['specificity'])} | {_fmt(r['brier'])} |")
    if res["delong"]:
        lines += ["", "## Paired DeLong tests", "", "| cohort | comparison | z | p |", "|---|---|---|---|"]
        for d in res["delong"]:
            lines.append(f"| {d['cohort']} | {d['comparison']} | {_fmt(d['z'], 2)} | {_fmt(d['p_value'], 4)} |")
    if res["pooled"]:
        lines += ["", "## Pooled across training sites (from shared score histograms)", "",
                  "| model | n | AUC (histogram) |", "|---|---|---|"]
        for p in res["pooled"]:
            lines.append(f"| {MODEL_LABEL[p['model']]} | {p['n']} | {_fmt(p['auc_from_histograms'])} |")
    if res["scenario"] == "paper":
        lines += ["", "## For reference: Sun et al., BMC Med Imaging 2025 (real patients, reported AUC with 95% CI)", "",
                  "| model | primary cohort (5-fold CV) | external validation |", "|---|---|---|"]
        for model, (primary, external) in PAPER_AUC.items():
            lines.append(f"| {MODEL_LABEL[model]} | {primary} | {external} |")
    if res["oracle"]:
        lines += ["", "## Achieved vs oracle (synthetic cohort ground truth)", "",
                  "The oracle AUC is that of the true risk given the same information; the gap is what the model "
                  "leaves on the table.", "", "| cohort | model | achieved AUC | oracle AUC | gap |", "|---|---|---|---|---|"]
        key = {"cf": "clinical", "dl": "image", "combined": "combined"}
        for r in res["rows"]:
            oracle = res["oracle"].get(r["site"], {}).get(key[r["model"]])
            if oracle is not None and r["auc"] is not None:
                lines.append(f"| {r['cohort']} | {MODEL_LABEL[r['model']]} | {_fmt(r['auc'])} | {_fmt(oracle)} | "
                             f"{_fmt(oracle - r['auc'])} |")
    for tag, table in res["cf_model"].items():
        lines += ["", f"## CF model (multivariate logistic regression, fit `{tag}`, standardised features)", "",
                  "| term | coef | SE | p | OR (95% CI) |", "|---|---|---|---|---|"]
        for t in table:
            lines.append(f"| {t['term']} | {t['coef']:.3f} | {t['se']:.3f} | {t['p_value']:.4f} | "
                         f"{t['odds_ratio']:.2f} ({t['or_ci_low']:.2f}-{t['or_ci_high']:.2f}) |")
    comm = res.get("communication") or {}
    lines += ["", "## Figures", "", "ROC: `roc-*.png`; decision curves: `dca-*.png`; calibration: `calibration-*.png`; "
              "learning curves: `learning-curves.png`.", "", "## What left the sites", "",
              "Model weights, example counts, summed clinical statistics, logistic-regression gradients/Hessians, "
              f"aggregate metrics and {len(res['thresholds_grid'])}-threshold decision curves, and per-class score "
              "histograms. No image, no patient identifier, no per-patient score."]
    if comm:
        lines.append(f"Bytes per client per round (weights): {comm.get('per-client-per-round')} "
                     f"(fp32 weights: {comm.get('weights')}).")
    return "\n".join(lines) + "\n"


def write_run_folder(run_dir: str | Path, state: dict, cfg: dict) -> dict:
    run_dir = Path(run_dir)
    truth = None
    if cfg.get("truth-file") and Path(cfg["truth-file"]).is_file():
        truth = json.loads(Path(cfg["truth-file"]).read_text("utf-8"))
    res = build_results(state, cfg, truth)
    atomic_write_json(run_dir / "results.json", res)
    atomic_write_text(run_dir / "report.md", render_report(res))
    _figures(run_dir, res)
    atomic_write_text(run_dir / "models" / "MODEL_CARD.md", model_card(res))
    return res


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _figures(run_dir: Path, res: dict) -> None:
    rows = {(r["cohort"], r["model"]): r for r in res["rows"]}
    t = np.asarray(res["thresholds_grid"])
    for cohort, cc in res["curves"].items():
        models = [m for m in cc if m != "treat_all"]
        roc = {MODEL_LABEL[m]: {"fpr": cc[m]["fpr"], "tpr": cc[m]["tpr"], "auc": rows[(cohort, m)]["auc"] or float("nan"),
                                "lo": rows[(cohort, m)]["auc_ci_low"], "hi": rows[(cohort, m)]["auc_ci_high"]}
               for m in models if "fpr" in cc[m]}
        slug = _slug(cohort)
        if roc:  # ROC points come from the shared histograms
            plots.plot_roc(roc, run_dir / f"roc-{slug}.png", title=f"ROC: {cohort}")
        plots.plot_dca(t, {MODEL_LABEL[m]: cc[m]["net_benefit"] for m in models}, cc["treat_all"],
                       run_dir / f"dca-{slug}.png", title=f"Decision curves: {cohort}")
        plots.plot_calibration({MODEL_LABEL[m]: (cc[m]["calib_mean_pred"], cc[m]["calib_obs_rate"]) for m in models},
                               run_dir / f"calibration-{slug}.png", title=f"Calibration: {cohort}")
    series = {f"{k} val AUC": v["val-auc"] for k, v in res["learning_curves"].items() if v.get("val-auc")}
    if series:
        plots.plot_learning_curves(series, run_dir / "learning-curves.png", title="Validation AUC per round (mean over folds)",
                                   ylabel="AUC")


def model_card(res: dict) -> str:
    cfg = res["config"]
    sites = ", ".join(f"{k} ({v['num-examples']} patients, {v['num-positive']} SLM)" for k, v in sorted(res["sites"].items()))
    return "\n".join([
        "# Model card: SLM-Fed models", "",
        f"- Study: `{res['study_id']}`, scenario `{res['scenario']}`, created {res['created']}.",
        "- Task: predict synchronous liver metastases (SLM) in rectal cancer from pre-treatment T2WI / DWI / ADC "
        "of the primary tumour plus sex, tumor_site, CEA, CA19-9 (after Sun et al., BMC Med Imaging 2025).",
        f"- Data: {sites}.",
        f"- Models: CF logistic regression; {cfg['backbone']} ({cfg['norm']} norm) MRI DL model; Combined model with a "
        f"{cfg['clinical-embed-dim']}-d clinical embedding. FedAvg, {cfg['num-rounds']} rounds x {cfg['local-epochs']} "
        f"local epochs, lr {cfg['lr']}, batch {cfg['batch-size']}, FedProx mu {cfg['fedprox-mu']}, seed {cfg['seed']}.",
        "- Weights: `models/<fit>-<model>.npz` (state_dict arrays, load with `common.model.build_model`).",
        f"- Versions: {json.dumps(res['versions'])}.",
        "- Intended use: research only; not a medical device. Performance on the synthetic cohort says nothing about "
        "real patients; validate locally before any clinical use.",
        "- Results: see report.md / results.json in this run folder.", ""])
