"""The run folder: results.json, report.md (the paper's table), figures and a model card.

Everything here is computed from the protocol state, i.e. from aggregates the sites sent: exact AUCs
and calibration statistics, and k-safe score cells from which the operating points (sensitivity /
specificity at the development threshold), decision curves, calibration groups and ROC curves are
derived. report.md is rendered from the very rows written to results.json, so the two cannot disagree.
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
from common.records import score_cells
from server.model_bundle import write_model_bundles
from server.report_html import write_report_html

MODEL_LABEL = {"cf": "CF model", "dl": "MRI DL model", "combined": "Combined DL model"}
# The paper's abstract (doi 10.1186/s12880-025-01692-3); printed beside, never compared as if the same data.
PAPER_AUC = {"cf": ("0.816 (0.750-0.881)", "0.824 (0.664-0.984)"),
             "dl": ("0.788 (0.720-0.857)", "0.662 (0.461-0.863)"),
             "combined": ("0.887 (0.834-0.940)", "0.876 (0.728-1.000)")}
EXACT_FIELDS = ("n", "n_pos", "auc", "auc_ci_low", "auc_ci_high", "brier", "calib_intercept", "calib_slope", "hl_stat",
                "hl_p")
OPERATING_FIELDS = ("sensitivity", "specificity", "ppv", "npv", "accuracy")


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
    thresholds = state.get("thresholds", {})
    t_grid = M.DEFAULT_THRESHOLDS
    rows, delong, curves = [], [], {}
    # repeats r > 0 of a repeated CV go to "cv_repeats" only: rows, curves and figures are repeat 0's
    for s in [s for s in state["summaries"] if not s.get("repeat")]:
        m = s["metrics"]
        cohort = cohort_label(s["tag"], s["kind"], s["site"], folds)
        for model in models:
            if f"{model}.auc" not in m:  # not computable for this fit (e.g. a separated CF fit): see sat_out
                continue
            row = {"model": model, "cohort": cohort, "site": s["site"], "tag": s["tag"], "kind": s["kind"]}
            row.update({k: _f(m[f"{model}.{k}"]) for k in EXACT_FIELDS})
            row["n"], row["n_pos"] = int(m[f"{model}.n"]), int(m[f"{model}.n_pos"])
            row["threshold"] = thresholds.get(model)
            row.update({k: None for k in OPERATING_FIELDS})
            row["cells"], row["operating_point_interpolated"], row["binned_auc_error_bound"] = None, None, None
            cells = score_cells(m, model)
            curve = curves.setdefault(cohort, {})[model] = {}
            if cells is not None:
                edges, neg, pos = cells
                row["cells"] = int(np.count_nonzero(neg + pos))
                if neg.sum() and pos.sum():
                    row["binned_auc_error_bound"] = float(np.sum(neg * pos) / (2 * neg.sum() * pos.sum()))
                    fpr, tpr = M.roc_from_histograms(neg, pos)
                    curve["fpr"], curve["tpr"] = fpr.tolist(), tpr.tolist()
                if row["threshold"] is not None:
                    op = M.operating_point_from_cells(edges, neg, pos, row["threshold"])
                    row.update({k: _f(op[k]) for k in OPERATING_FIELDS})
                    row["operating_point_interpolated"] = bool(op["interpolated"])
                with np.errstate(invalid="ignore", divide="ignore"):
                    obs = np.where(neg + pos > 0, pos / np.maximum(neg + pos, 1), np.nan)
                curve.update({"cell_edges": edges.tolist(), "cell_neg": neg.astype(int).tolist(),
                              "cell_pos": pos.astype(int).tolist(),
                              "net_benefit": M.net_benefit_from_cells(edges, neg, pos, t_grid).tolist(),
                              "calib_mean_pred": list(m[f"{model}.calib-mean-pred"]), "calib_obs_rate": obs.tolist()})
            rows.append(row)
        n, n_pos = int(m["num-examples"]), int(m["num-positive"])
        curves[cohort]["treat_all"] = M.net_benefit_treat_all(np.repeat([1, 0], [n_pos, n - n_pos]), t_grid).tolist()
        for other in ("cf", "dl"):
            if f"delong.combined-vs-{other}.p" in m:
                key = f"delong.combined-vs-{other}"
                delong.append({"cohort": cohort, "comparison": f"combined vs {other}", "z": _f(m[f"{key}.z"]),
                               "p_value": _f(m[f"{key}.p"]), "note": s.get("notes", {}).get(key, "")})
    pooled = []
    cv = [s for s in state["summaries"] if s["tag"] == "cv"]
    if len(cv) > 1:
        for model in models:  # several training sites: pool their out-of-fold cells
            parts = [c for s in cv if (c := score_cells(s["metrics"], model)) is not None]
            if len(parts) == len(cv):
                _, neg, pos = M.pool_cells(parts)
                pooled.append({"model": model, "cohort": "all training sites: pooled CV (k-safe cells)",
                               "auc_from_cells": M.auc_from_histograms(neg, pos), "n": int(round(neg.sum() + pos.sum())),
                               "auc_error_bound": float(np.sum(neg * pos) / (2 * neg.sum() * pos.sum()))})
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
        "thresholds": thresholds,
        "rows": rows,
        "delong": delong,
        "pooled": pooled,
        "cf_model": cf_tables,
        "oracle": _oracle(truth),
        "learning_curves": _learning_curves(state["history"], {f["tag"] for f in state.get("plan", []) if f.get("repeat")}),
        "cv_repeats": repeated_cv(state, cfg, models),
        "cv_repeats_pooled": repeated_cv_pooled(state, cfg, models),
        "communication": state.get("bytes", {}),
        "timing": state.get("timing", {}),
        "curves": curves,
        "thresholds_grid": t_grid.tolist(),
        "sat_out": state.get("sat_out", []),
        "faults": state.get("faults", []),
        "released": state.get("released", {}),
        "would_refuse": state.get("would_refuse", []),
        "dp": dp_spent(state),
    }


def _mean_sd(aucs: list[float | None]) -> tuple[float | None, float | None]:
    done = [a for a in aucs if a is not None]
    mean = float(np.mean(done)) if done else None
    return mean, (float(np.std(done, ddof=1)) if len(done) > 1 else None)


def _cv_families(state: dict) -> dict[str, list[str]]:
    """{CV family tag: the sites planned to evaluate its held-out folds} (repeat 0 fits of the plan)."""
    out: dict[str, list[str]] = {}
    for f in state.get("plan", []):
        if f["fold"] >= 0 and not f.get("repeat"):
            out.setdefault(f["tag"], [])
            out[f["tag"]] += [s for s in f["val"] if s not in out[f["tag"]]]
    return out


def _why_missing(state: dict, tag: str, site: str, model: str) -> str:
    """Why (tag, site) has no AUC for `model`: the first refusal, n/a or fault the study recorded."""
    for e in state.get("sat_out", []) + state.get("faults", []):
        if e["tag"] == tag and e["site"] in (site, "(every training site)") and e.get("model", model) in (model, ""):
            return f"{e['step']}: {e['reason']}"
    return "no results summary"


def repeated_cv(state: dict, cfg: dict, models: list[str]) -> dict:
    """Repeated cross-validation: {family: {model: {site: per-repeat AUCs, their mean and SD}}}.

    Families are the plan's CV fits ("cv", and in multisite "local-<site>" and "central"); repeat r
    used fold seed fold_seeds[r]. A repeat a site did not compute (e.g. refused under its
    max-partitions) is None in `aucs`, with the reason in `not_computed`; mean and SD (n - 1) are over
    the computed repeats."""
    from server.protocol import fold_seed, repeat_tag

    repeats = int(cfg.get("cv-repeats", 1))
    seeds = [fold_seed(int(cfg["seed"]), r) for r in range(repeats)]
    found = {(s["tag"], s["site"]): s["metrics"] for s in state["summaries"]}
    out: dict = {}
    for family, sites in _cv_families(state).items():
        for model in models:
            for site in sites:
                aucs, missing = [], {}
                for r in range(repeats):
                    tag = repeat_tag(family, r)
                    m = found.get((tag, site), {})
                    auc = _f(m[f"{model}.auc"]) if f"{model}.auc" in m else None
                    aucs.append(auc)
                    if auc is None:
                        missing[str(r)] = _why_missing(state, tag, site, model)
                mean, sd = _mean_sd(aucs)
                out.setdefault(family, {}).setdefault(model, {})[site] = {
                    "cohort": cohort_label(family, "oof", site, int(cfg["folds"])), "fold_seeds": seeds, "aucs": aucs,
                    "mean": mean, "sd": sd, "computed": sum(a is not None for a in aucs), "not_computed": missing}
    return out


def repeated_cv_pooled(state: dict, cfg: dict, models: list[str]) -> dict:
    """Several training sites ("cv" at more than one site): per repeat the AUC of their pooled k-safe
    out-of-fold score cells, as `pooled` reports for repeat 0; None where a site's cells are missing."""
    from server.protocol import repeat_tag

    sites = _cv_families(state).get("cv", [])
    if len(sites) < 2:
        return {}
    found = {(s["tag"], s["site"]): s["metrics"] for s in state["summaries"]}
    out = {}
    for model in models:
        aucs = []
        for r in range(int(cfg.get("cv-repeats", 1))):
            parts = [score_cells(found.get((repeat_tag("cv", r), site), {}), model) for site in sites]
            if any(p is None for p in parts):
                aucs.append(None)
                continue
            _, neg, pos = M.pool_cells(parts)
            aucs.append(float(M.auc_from_histograms(neg, pos)) if neg.sum() and pos.sum() else None)
        mean, sd = _mean_sd(aucs)
        out[model] = {"cohort": "all training sites: pooled CV (k-safe cells)", "aucs": aucs, "mean": mean, "sd": sd}
    return out


def dp_spent(state: dict) -> dict:
    """Per training site: the epsilon its DP-SGD spent in this study (overall and per model, as the site
    reported it) with the accountant and the mechanism's parameters; empty without DP."""
    return {site: {"accountant": "Opacus RDP", "epsilon": d["epsilon"], "delta": d["delta"],
                   "epsilon_per_model": d["epsilon-per-model"], "noise_multiplier": d["noise-multiplier"],
                   "clip_norm": d["clip-norm"], "sample_rate_last": d["sample-rate"], "steps": d["steps"],
                   # over every study the site answered (None: a site that does not report it)
                   "lifetime_epsilon": d.get("lifetime-epsilon"), "lifetime_budget": d.get("lifetime-budget")}
            for site, d in sorted(state.get("dp", {}).items())}


def _role(site: str, plan: list[dict]) -> str:
    if not any(site in f["train"] + f["val"] + f["test"] for f in plan):
        return "not used"
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
    try:  # the DL rows' last digits depend on the CPU kernels torch picks (README, "Results")
        import torch

        out["torch-cpu-capability"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return out


def _oracle(truth: dict | None) -> dict:
    if not truth:
        return {}
    return {name: dict(c.get("oracle_auc", {})) for name, c in truth.get("sites", {}).items()}


def _learning_curves(history: list[dict], skip: set[str] = frozenset()) -> dict:
    """Mean over folds/sites of the per-round validation AUC and training loss, per model and fit tag
    (not for the tags in `skip`: the repeats r > 0 of a repeated CV)."""
    out: dict[str, dict[str, list]] = {}
    for h in history:
        if h.get("fold", -1) < 0 or h["tag"] in skip:
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
             f"torch {res['versions'].get('torch')}.", ""]
    if res["config"].get("smoke-run"):
        lines += ["**Smoke run** (`slmfed simulate --quick`: small cohort, few folds and rounds): these numbers check that "
                  "the pipeline runs end to end; they are not the study's result.", ""]
    lines += ["## Sites", "", "| site | patients | with SLM | role |", "|---|---|---|---|"]
    for name, s in sorted(res["sites"].items()):
        count = lambda v: "withheld" if v < 0 else str(v)  # noqa: E731
        lines.append(f"| {name} | {count(s['num-examples'])} | {count(s['num-positive'])} | {s['role']} |")
    source = ("the Youden threshold of the development out-of-fold scores (pooled k-safe score cells of the training "
              "sites), applied to every cohort" if res["thresholds"] else
              "no threshold: no k-safe score cells of the development cohort were released (a site's policy withholds "
              "them, share-histograms = false, or its folds are too small for cells of k patients of each class), so no "
              "operating point is reported")
    lines += ["", "## Results", "", f"AUC with DeLong 95% CI, exact (computed at each site on its exact scores); "
              f"sensitivity / specificity at {source}. They are read off the cohort's k-safe score cells: exact when "
              "the threshold is a cell edge, else (marked *) the cell that holds the threshold is split in proportion "
              "to its width.", "",
              "| model | cohort | n | AUC (95% CI) | threshold | sensitivity | specificity | Brier |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        star = "*" if r.get("operating_point_interpolated") else ""
        lines.append(f"| {MODEL_LABEL[r['model']]} | {r['cohort']} | {r['n']} | {auc_cell(r)} | {_fmt(r['threshold'], 2)} | "
                     f"{_fmt(r['sensitivity'])}{star} | {_fmt(r['specificity'])}{star} | {_fmt(r['brier'])} |")
    lines += ["", "## Calibration", "", "Exact, at each site on its own scores: the calibration intercept (0 when the "
              "mean risk is right) and slope (1 when the spread of the risks is right; below 1 the model is too sure) "
              "of a logistic recalibration, and the Hosmer-Lemeshow test over risk groups (a small p: the predicted "
              "risks do not match the observed rates).", "",
              "| model | cohort | calibration intercept | calibration slope | Hosmer-Lemeshow chi2 | p |",
              "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {MODEL_LABEL[r['model']]} | {r['cohort']} | {_fmt(r.get('calib_intercept'))} | "
                     f"{_fmt(r.get('calib_slope'))} | {_fmt(r.get('hl_stat'), 2)} | {_fmt(r.get('hl_p'), 4)} |")
    if res["delong"]:
        lines += ["", "## Paired DeLong tests", "", "| cohort | comparison | z | p |", "|---|---|---|---|"]
        for d in res["delong"]:
            p = _fmt(d["p_value"], 4) if d["p_value"] is not None else f"n/a ({d['note'] or 'undefined'})"
            lines.append(f"| {d['cohort']} | {d['comparison']} | {_fmt(d['z'], 2)} | {p} |")
    if res["pooled"]:
        lines += ["", "## Pooled across training sites (from k-safe score cells)", "",
                  "| model | n | AUC (cells) | bound on the error vs exact pooled AUC |", "|---|---|---|---|"]
        for p in res["pooled"]:
            lines.append(f"| {MODEL_LABEL[p['model']]} | {p['n']} | {_fmt(p['auc_from_cells'])} | {_fmt(p['auc_error_bound'])} |")
    lines += repeated_cv_section(res)
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
    lines += ["", "## Figures", "", "ROC: `roc-*.png` (the curve through the k-safe cells, labelled with the exact AUC; "
              "none for a model whose scores at a site fit in one cell); "
              "decision curves: `dca-*.png` (exact at the cells' edges, straight lines between); calibration: `calibration-*.png` (one point per cell); "
              "learning curves: `learning-curves.png`."]
    if comm:
        lines += ["", f"Bytes per client per round (weights): {comm.get('per-client-per-round')} "
                      f"(fp32 weights: {comm.get('weights')})."]
        if comm.get("evidence-per-train-request"):
            lines += ["", f"Model verification: each train request also relays {comm['evidence-per-train-request']} bytes "
                          "of signed contributions (the previous round's updates of the fit's training sites, their "
                          "standardisation sums), from which every site recomputes the model it is sent; so the "
                          "training sites of a fit see each other's updates (deploy/README.md, Residual risks)."]
    lines += privacy_section(res)
    lines += faults_section(res)
    return "\n".join(lines) + "\n"


def repeated_cv_section(res: dict) -> list[str]:
    """The "Repeated cross-validation" table (only with cv-repeats > 1): per-repeat AUCs, mean, SD."""
    reps = res.get("cv_repeats") or {}
    first = next((e for fam in reps.values() for mod in fam.values() for e in mod.values()), None)
    if first is None or len(first["fold_seeds"]) < 2:
        return []
    seeds = ", ".join(f"r{r} = {s}" for r, s in enumerate(first["fold_seeds"]))
    lines = ["", "## Repeated cross-validation", "",
             f"{len(first['fold_seeds'])} fold assignments, each a full cross-validation (fold seeds {seeds}; r0 is "
             "the study seed's, the one of the rows above). Exact out-of-fold AUC per repeat; mean and SD (n - 1) "
             "over the computed repeats. n/a: not computed at that site (see the notes).", "",
             "| model | cohort | AUC per repeat | mean | SD | repeats |", "|---|---|---|---|---|---|"]
    notes: dict[tuple[str, str, str], list[str]] = {}  # (cohort, repeat, why) -> models
    for family in reps.values():
        for model, sites in family.items():
            for site, e in sites.items():
                per = ", ".join(_fmt(a) for a in e["aucs"])
                lines.append(f"| {MODEL_LABEL[model]} | {e['cohort']} | {per} | {_fmt(e['mean'])} | {_fmt(e['sd'])} | "
                             f"{e['computed']} of {len(e['aucs'])} |")
                for r, why in e["not_computed"].items():
                    notes.setdefault((e["cohort"], r, why), []).append(MODEL_LABEL[model])
    for model, e in (res.get("cv_repeats_pooled") or {}).items():
        per = ", ".join(_fmt(a) for a in e["aucs"])
        lines.append(f"| {MODEL_LABEL[model]} | {e['cohort']} | {per} | {_fmt(e['mean'])} | {_fmt(e['sd'])} | "
                     f"{sum(a is not None for a in e['aucs'])} of {len(e['aucs'])} |")
    lines += [""] if notes else []
    lines += [f"- {cohort}, repeat r{r}: not computed for {', '.join(models)} ({why})".replace("|", "/")
              for (cohort, r, why), models in notes.items()]
    return lines


def privacy_section(res: dict) -> list[str]:
    """What left each site and under which rule; who sat out what."""
    lines = ["", "## What left each site, and under which rule", "",
             "Each site answered under its own privacy policy (its node config; the coordinator can read it, never "
             "set it). Every statistic covers at least k patients of each class; a patient group is answered only "
             "if no linear combination of it and every group the site released before (in any study, before or "
             "after an enrolment) can concern 1 to k-1 patients of a class (the released-group audit: every "
             "'atom' of patients that are in exactly the same released groups holds at least k patients of each "
             "class; so a second fold assignment, such as a repeat of repeated CV, is refused); score summaries are cells of a grid of at most `histogram-bins` bins, merged "
             "until every non-empty cell holds at least k patients of each class. Nothing per patient left a site: "
             "no image, identifier, clinical row or score.", "",
             "| site | k (min-cell-size) | grid | score cells shared | replies (message type x count) |",
             "|---|---|---|---|---|"]
    for name, s in sorted(res["sites"].items()):
        pol = s.get("policy", {})
        sent = ", ".join(f"{t} x {n}" for t, n in sorted(res.get("released", {}).get(name, {}).items())) or "none"
        shared = "yes" if pol.get("share-histograms", 1) else "no"
        lines.append(f"| {name} | {pol.get('min-cell-size', 'n/a')} | {pol.get('histogram-bins', 'n/a')} | {shared} | {sent} |")
    lines += ["", "What each site agreed to compute for the coordinator (its own caps, `client/limits.py`; a request "
              "over one is refused before the site opens its data):", "",
              "| site | backbones | max width | max ensemble | max epochs x ensemble x patients | max reply (MB) | "
              "max rounds | batch floor | fits per study | evaluations per study / lifetime |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in sorted(res["sites"].items()):
        pol = s.get("policy", {})
        if "max-rounds" not in pol:  # a site that does not report its caps
            lines.append(f"| {name} | not reported | | | | | | | | |")
            continue
        floor = pol.get("min-batch-size") or pol.get("min-cell-size")
        lines.append(f"| {name} | {pol['allowed-backbones']} | {pol['max-widen-factor']:g} | {pol['max-ensemble-size']} | "
                     f"{pol['max-epoch-patients']} | {pol['max-reply-mb']:g} | {pol['max-rounds']} | {floor} | "
                     f"{pol['max-fits-per-study']} | {pol['max-evaluations-per-study']} / {pol['max-evaluations']} |")
    lines += ["", "What each reply carries: `query.info` shapes, the policy and (when the whole cohort may be released) "
              "its patient and SLM counts; `query.clinical_sums` sums and sums of squares of the 7 clinical features "
              "and, when the images carry the ROI mask, of the 6 ROI statistics (each patient's ROI mean and SD of "
              "T2WI, DWI and ADC: the model's roi-stats input) over a fit's training patients; `query.logistic_stats` the CF model's gradient, Hessian and "
              "log-likelihood at coefficients the site checked (slopes bounded, the Hessian's weight spread over >= k "
              "patients); `train` model weights after local training and the mean training loss; `evaluate` the "
              "loss and AUC of one planned evaluation; `query.summary` exact AUC with DeLong CI, Brier score, "
              "calibration intercept / slope, Hosmer-Lemeshow, paired DeLong tests and the k-safe score cells "
              "(edges, per-class counts, mean prediction per cell)."]
    verifying = [n for n, s in sorted(res["sites"].items()) if s.get("policy", {}).get("model-verification") == "enforce"]
    others = [n for n in sorted(res["sites"]) if n not in verifying]
    lines += ["", "Model verification (`client/verify.py`): "
              + (f"{', '.join(verifying)} computed only on models they derived themselves from the study settings and "
                 "contributions signed by the sites in their own peer roster (the standardisation from the signed sums, "
                 "CF coefficients as Newton steps from signed statistics, DL / Combined weights rebuilt from the study "
                 "seed or recomputed from the signed updates of their round by the study's rule); any other model is "
                 "refused as `unverified-model`. The contributions travel signed: the clinical sums, CF statistics and "
                 "training updates of a site are relayed to the other sites of its fit, which need them to recompute "
                 "the aggregate." if verifying else "no site verified the models it computed on.")
              + (f" {', '.join(others)}: model-verification off (computes on any model; `deploy check` refuses this "
                 "in a deployment)." if others else "")]
    bounds = [r for r in res["rows"] if r.get("binned_auc_error_bound") is not None]
    if bounds:
        worst = max(bounds, key=lambda r: r["binned_auc_error_bound"])
        lines += ["", f"Resolution: {min(r['cells'] for r in bounds)}-{max(r['cells'] for r in bounds)} non-empty cells "
                  "per cohort and model. A ROC curve drawn through the cells differs from the exact one by at most "
                  "sum_c neg_c * pos_c / (2 N_neg N_pos) in AUC; the largest such bound here is "
                  f"{worst['binned_auc_error_bound']:.3f} ({MODEL_LABEL[worst['model']]}, {worst['cohort']}). The AUCs "
                  "in the tables are exact."]
    lines += dp_section(res)
    lines += would_refuse_section(res)
    if res.get("sat_out"):
        lines += ["", "## Sat out (refused by a site's policy, or not possible at that site)", "",
                  "| fit | fold | site | step | reason |", "|---|---|---|---|---|"]
        for e in res["sat_out"]:
            lines.append(f"| {e['tag']} | {e['fold'] if e['fold'] >= 0 else '-'} | {e['site']} | {e['step']} | "
                         f"{e['reason'].replace('|', '/')} |")
    return lines


def dp_section(res: dict) -> list[str]:
    """The DP table: what each site's epsilon is, and precisely what it covers."""
    dp = res.get("dp", {})
    trains = sorted({s for s, v in res["sites"].items() if v.get("role", "").startswith("train")}) or sorted(dp)
    lines = ["", "### Differential privacy", ""]
    if not dp:
        return lines + ["No site trained under DP (`dp-epsilon` = 0 in every training site's policy): the weights "
                        "a site sent are exact functions of its patients; their protection is the k-patient group "
                        "rules above, not a formal privacy guarantee."]
    lines += ["| site | epsilon spent (study) | per model | lifetime spent / budget (left) | delta | noise multiplier "
              "| clip norm | sampling rate | steps |",
              "|---|---|---|---|---|---|---|---|---|"]
    for site in trains:
        d = dp.get(site)
        if d is None:
            lines.append(f"| {site} | no DP (infinite) | - | - | - | - | - | - | - |")
            continue
        per = ", ".join(f"{MODEL_LABEL.get(m, m)} {e:.2f}" for m, e in d["epsilon_per_model"].items())
        life, budget = d.get("lifetime_epsilon"), d.get("lifetime_budget")
        lifetime = (f"{life:.2f} / {budget:g} ({max(budget - life, 0.0):.2f} left)" if life is not None and budget
                    else "not reported")
        lines.append(f"| {site} | {d['epsilon']:.2f} | {per} | {lifetime} | {d['delta']:.0e} | "
                     f"{d['noise_multiplier']:.3f} | {d['clip_norm']:g} | {d['sample_rate_last']:.3f} | {d['steps']} |")
    lines += ["", "Accountant: Opacus RDP, composed over every DP-SGD step of the study at that site (all fits, folds, "
              "models and rounds; each training patient counted in every step's sampling). The epsilon covers the DL "
              "and Combined weights the site sent (and anything computed from them; a Combined model made of the DL "
              "model and the CF coefficients (combined-from dl+cf) is covered only in its DL part). It does NOT cover the CF "
              "model (exact sufficient statistics and coefficients: epsilon infinite), the evaluation replies "
              "(AUC, loss, score cells, calibration: exact, k-safe only) or the enrolment counts. The lifetime "
              "figure adds up every study's epsilon at that site (basic composition, a conservative bound); a site "
              "refuses a study whose budget would take it past its `dp-lifetime-epsilon`, and any request past "
              "either budget."]
    cfg = res.get("config", {})
    what = str(cfg.get("dp-train", "auto"))
    reference = bool(str(cfg.get("roi-stats-reference") or ""))
    # the client's rule (client/train.py dp_trains_wide): auto = wide when the model has the ROI statistics' term
    from common.model import has_roi_stats

    channels = next((v.get("model-input", {}).get("channels") for v in res["sites"].values()), None)
    wide = what == "wide" or (what == "auto" and has_roi_stats(cfg, channels))
    if wide and reference:
        lines += ["", f"What DP-SGD trained (dp-train = {what}): only the linear terms on the ROI statistics (and on the "
                  "clinical vector, in a trained Combined model), at learning rate "
                  f"{cfg.get('dp-lr', 0.05):g}; the ResNet and the image head stayed at their seeded initial weights "
                  "(the head's output at 0). The ROI statistics are standardised from the study's reference "
                  "(`roi-stats-reference`), fixed before the study: nothing the DL model uses was fitted on the sites' "
                  "patients outside the epsilon, and the sites released no ROI sums. (A Combined model trained from the "
                  "CF start, combined-from cf, standardises the clinical vector with the CF model's exact sums, "
                  "which are outside the epsilon like the CF model.)"]
    else:
        lines += ["", f"What DP-SGD trained (dp-train = {what}): every weight of the ResNet, the head and the linear terms."]
    lines += ["", "AUC against epsilon for this study's settings: `slmfed bench dp --part auc --epsilons 1,3,8,0 --seeds 3 "
              "--report table.md` (the paper cohort's table is in README.md)."]
    return lines


def would_refuse_section(res: dict) -> list[str]:
    """Requests a simulation's virtual site answered although a real site would refuse them (span-audit
    = report: the researcher owns those sites, e.g. for repeated CV)."""
    entries = res.get("would_refuse", [])
    if not entries:
        return []
    fits: dict[str, set[str]] = {}
    for e in entries:
        fits.setdefault(e["site"], set()).add(e["fit"] + (f" fold {e['fold']}" if e["fold"] >= 0 else ""))
    lines = ["", "### What a real site would have refused", "",
             "These virtual sites ran with `span-audit = report` (a simulation's own sites): they answered requests "
             "that a site enforcing the released-group audit refuses, because together with what it released before "
             "some combination would concern fewer than k patients of a class. A real site would sit these out:", ""]
    return lines + [f"- {site}: {', '.join(sorted(f))}" for site, f in sorted(fits.items())]


FAULT_KIND = {"away": "left out of this round", "left": "left this fit's training", "rejected": "update rejected",
              "missing": "missing (not answered)", "stopped": "study stopped here (resumed later)"}


def faults_section(res: dict) -> list[str]:
    """Faults the study survived or stopped on: sites away, rejected updates, missing evaluations."""
    if not res.get("faults"):
        return []
    lines = ["", "## Faults (sites away, rejected updates, missing answers)", "",
             "Each failed or missing reply was asked again (site-retries, with backoff) before it counted. A round "
             "went on without the sites below while at least min-train-sites updates were accepted; a rejected "
             "update was left out of its round (rules: server/robust.py).", "",
             "| fit | fold | model | round | site | step | what happened | reason |", "|---|---|---|---|---|---|---|---|"]
    for e in res["faults"]:
        lines.append(f"| {e['tag']} | {e['fold'] if e['fold'] >= 0 else '-'} | {e['model'] or '-'} | {e['round'] or '-'} | "
                     f"{e['site']} | {e['step']} | {FAULT_KIND.get(e['kind'], e['kind'])} | {e['reason'].replace('|', '/')} |")
    return lines


def write_run_folder(run_dir: str | Path, state: dict, cfg: dict) -> dict:
    run_dir = Path(run_dir)
    truth = None
    if cfg.get("truth-file") and Path(cfg["truth-file"]).is_file():
        truth = json.loads(Path(cfg["truth-file"]).read_text("utf-8"))
    res = build_results(state, cfg, truth)
    atomic_write_json(run_dir / "results.json", res)
    atomic_write_text(run_dir / "report.md", render_report(res))
    _figures(run_dir, res)
    write_report_html(run_dir, res)  # report.html: report.md + figures inline, one self-contained page
    atomic_write_text(run_dir / "models" / "MODEL_CARD.md", model_card(res))
    write_model_bundles(run_dir, state, res, cfg)  # models/<fit>.json: what `slmfed predict` loads
    return res


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _figures(run_dir: Path, res: dict) -> None:
    rows = {(r["cohort"], r["model"]): r for r in res["rows"]}
    t = np.asarray(res["thresholds_grid"])
    for cohort, cc in res["curves"].items():
        models = [m for m in cc if m != "treat_all"]
        # Curves come from the shared k-safe score cells. A model with one cell has no curve to draw
        # (all its patients share one score): its legend line says so and gives the exact AUC.
        curved = [m for m in models if "fpr" in cc[m] and (rows[(cohort, m)]["cells"] or 0) >= 2]
        notes = [f"{MODEL_LABEL[m]}: AUC {rows[(cohort, m)]['auc']:.2f} (exact); no curve: one score cell"
                 for m in models if "cell_edges" in cc[m] and m not in curved and rows[(cohort, m)]["auc"] is not None]
        roc = {MODEL_LABEL[m]: {"fpr": cc[m]["fpr"], "tpr": cc[m]["tpr"], "auc": rows[(cohort, m)]["auc"] or float("nan"),
                                "lo": rows[(cohort, m)]["auc_ci_low"], "hi": rows[(cohort, m)]["auc_ci_high"],
                                "cells": rows[(cohort, m)]["cells"]} for m in curved}
        slug = _slug(cohort)
        if roc:
            plots.plot_roc(roc, run_dir / f"roc-{slug}.png", title=f"ROC: {cohort}", notes=notes)
            plots.plot_dca(t, {MODEL_LABEL[m]: cc[m]["net_benefit"] for m in curved}, cc["treat_all"],
                           run_dir / f"dca-{slug}.png", title=f"Decision curves: {cohort}", notes=notes)
        if any("cell_edges" in cc[m] for m in models):  # else the site withheld score cells
            plots.plot_calibration({MODEL_LABEL[m]: (cc[m]["calib_mean_pred"], cc[m]["calib_obs_rate"],
                                                     np.add(cc[m]["cell_neg"], cc[m]["cell_pos"])) for m in models
                                    if "cell_edges" in cc[m]},
                                   run_dir / f"calibration-{slug}.png", title=f"Calibration: {cohort}")
    def readable(key: str) -> str:  # "dl (cv)" -> "MRI DL model, cross-validation"
        model, _, tag = key.partition(" (")
        tag = tag.rstrip(")")
        return f"{MODEL_LABEL.get(model, model)}, {'cross-validation' if tag == 'cv' else tag}"
    series = {readable(k): v["val-auc"] for k, v in res["learning_curves"].items() if v.get("val-auc")}
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
        f"- Models: CF logistic regression; {cfg['backbone']} ({cfg['norm']} norm, width x{cfg['widen-factor']:g}"
        f"{', ROI pooling' if cfg['roi-pooling'] else ''}{', ROI statistics' if cfg.get('roi-stats') else ''}"
        f"{', ensemble of ' + str(cfg['ensemble-size']) if int(cfg.get('ensemble-size', 1)) > 1 else ''}) MRI DL model; Combined model "
        + ("= the MRI DL model's logit + the CF model's (the same network with a clinical term, not trained further). "
           if cfg["combined-from"] == "dl+cf" else f"with a {cfg['clinical-embed-dim']}-d clinical embedding, trained "
           "from the CF model. ")
        + f"FedAvg, {cfg['num-rounds']} rounds x {cfg['local-epochs']} "
        f"local epochs, lr {cfg['lr']}, batch {cfg['batch-size']}, FedProx mu {cfg['fedprox-mu']}, seed {cfg['seed']}.",
        "- Weights: `models/<fit>-<model>.npz` (state_dict arrays, load with `common.model.build_model`); "
        "`models/<fit>.json` holds what a site needs to use them (`slmfed predict --model models/<fit>.json`): CF "
        "coefficients, standardisation, development threshold and sensitivity / specificity, preprocessing.",
        f"- Versions: {json.dumps(res['versions'])}.",
        "- Intended use: research only; not a medical device. Performance on the synthetic cohort says nothing about "
        "real patients; validate locally before any clinical use.",
        "- Results: see report.md / results.json in this run folder.", ""])


def format_table(res: dict) -> str:
    """The results table as `slmfed simulate` and the ServerApp's log (`flwr run --stream`) print it."""
    key = {"cf": "clinical", "dl": "image", "combined": "combined"}
    lines = [f"{'model':<18} {'cohort':<36} {'AUC (95% CI)':<22} {'sens':>6} {'spec':>6} {'oracle':>7}"]
    for r in res["rows"]:
        oracle = res.get("oracle", {}).get(r["site"], {}).get(key[r["model"]])
        fmt = lambda x: "  n/a" if x is None else f"{x:.3f}"  # noqa: E731
        star = "*" if r.get("operating_point_interpolated") else ""
        lines.append(f"{MODEL_LABEL[r['model']]:<18} {r['cohort']:<36} {auc_cell(r):<22} {fmt(r['sensitivity']) + star:>6} "
                     f"{fmt(r['specificity']) + star:>6} {fmt(oracle):>7}")
    if any(r.get("operating_point_interpolated") for r in res["rows"]):
        lines.append("* read off the k-safe score cell that holds the threshold, split in proportion to its width "
                     "(report.md, Results)")
    reps = [(model, e) for fam in res.get("cv_repeats", {}).values() for model, sites in fam.items() for e in sites.values()]
    if reps and len(reps[0][1]["aucs"]) > 1:  # cv-repeats > 1: mean (SD) over the fold assignments
        lines += ["", f"repeated cross-validation ({len(reps[0][1]['aucs'])} fold assignments): mean AUC (SD)"]
        for model, e in reps:
            sd = "n/a" if e["sd"] is None else f"{e['sd']:.3f}"
            mean = "n/a" if e["mean"] is None else f"{e['mean']:.3f}"
            lines.append(f"{MODEL_LABEL[model]:<18} {e['cohort']:<36} {mean} ({sd}), {e['computed']} of {len(e['aucs'])}")
    return "\n".join(lines)
