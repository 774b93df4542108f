"""`slmfed bench model`: model selection on the synthetic paper cohort, with repeated cross-validation.

Each candidate is a set of config keys (site preprocessing and study settings). For each one the
bench prepares the paper cohort's two sites with the candidate's preprocessing (once per distinct
preprocessing, under --work), then runs the real study (ClientApp + protocol on an in-process grid,
simulation/inprocess.py: the same messages and numbers as `slmfed simulate`) with `cv-repeats` R:
R fold assignments of the primary cohort, each a full 5-fold CV. It prints, per model, the primary
out-of-fold AUC of every repeat, their mean and SD, beside the handcrafted-feature baseline
(simulation/handcrafted.py) on the same folds, and the generator's oracle.

Selection is made on the primary cohort's CV only. The external cohort's AUCs are printed only with
--external, which is meant to be used once, for the chosen setting (the study runs the final fit
either way; the flag only decides what is shown and written).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common.config import load_config

SITES = ("center-primary", "center-external")
PREPARE_KEYS = ("input-mode", "fov-mm", "crop-size", "context-slices", "mask-channel")
# name -> (what it is, config keys). "v0" is the model before issue 17; each later line changes one thing.
_V0 = {"mask-channel": False, "widen-factor": 1.0, "augment-intensity": 0.1, "roi-pooling": False, "combined-from": "cf",
       "swa-rounds": 0, "ensemble-size": 1, "roi-stats": False}
_ROI = {**_V0, "mask-channel": True, "widen-factor": 0.25, "augment-intensity": 0.0, "roi-pooling": True}
_SUM = {**_ROI, "combined-from": "dl+cf"}
_SWA = {**_SUM, "swa-rounds": 4}
# name -> (what it is, config keys); each line changes one thing against an earlier one. "chosen" = the defaults.
CANDIDATES: dict[str, tuple[str, dict]] = {
    "v0": ("before issue 17: 3 channels, width 1, intensity jitter 0.1, Combined trained from CF", _V0),
    "mask": ("v0 + the ROI mask as a 4th input channel", {**_V0, "mask-channel": True}),
    "mask-w0.25": ("mask + width 0.25", {**_V0, "mask-channel": True, "widen-factor": 0.25}),
    "mask-w0.25-nojitter": ("mask-w0.25 without intensity jitter", {**_ROI, "roi-pooling": False}),
    "roi": ("mask-w0.25-nojitter + ROI pooling", _ROI),
    "sum": ("roi + Combined = DL logit + CF logit", _SUM),
    "swa": ("sum + each fit's model the mean of its last 4 rounds' weights", _SWA),
    "e3": ("swa + an ensemble of 3 networks per fit, each trained on its own seed", {**_SWA, "ensemble-size": 3}),
    "swa-e5": ("swa + an ensemble of 5", {**_SWA, "ensemble-size": 5}),
    "swa-stats": ("swa + the ROI's mean and SD of each channel, standardised, to the head and as a linear term",
                  {**_SWA, "roi-stats": True}),
    "chosen": ("e3 + the ROI statistics (the defaults)", {}),
    "sum-jitter": ("sum with intensity jitter 0.1", {**_SUM, "augment-intensity": 0.1}),
    "sum-2.5d": ("sum, 2.5d input (3 slices of each sequence and of the mask)", {**_SUM, "input-mode": "2.5d"}),
    "sum-fov64": ("sum, 64 mm field of view", {**_SUM, "fov-mm": 64.0}),
    "sum-batchnorm": ("sum with BatchNorm", {**_SUM, "norm": "batch"}),
    "sum-16rounds": ("sum, 16 rounds", {**_SUM, "num-rounds": 16}),
    "swa-2.5d": ("swa, 2.5d input", {**_SWA, "input-mode": "2.5d"}),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="DIR", default="data/synthetic-paper",
                        help="the paper cohort's site folders (center-primary, center-external, truth.json); "
                             "`slmfed simulate` generates it")
    parser.add_argument("--work", metavar="DIR", default="runs/bench-model",
                        help="where the candidates' caches are prepared (reused when the settings match)")
    parser.add_argument("--candidates", default="chosen",
                        help=f"comma list of {', '.join(CANDIDATES)}, or 'all'")
    parser.add_argument("--repeats", type=int, default=3, help="fold assignments (cv-repeats)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="study settings for every candidate (e.g. num-rounds=4)")
    parser.add_argument("--external", action="store_true",
                        help="also print the external cohort's AUCs (look once, for the final choice)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--min-cell-size", type=int, default=None, metavar="K",
                        help="the virtual sites' k (default: the policy default; small test cohorts need 3)")
    parser.add_argument("--out", metavar="JSON", help="also write the figures here")


def candidate_settings(names: str) -> dict[str, dict]:
    chosen = list(CANDIDATES) if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"bench model: unknown candidate(s) {unknown}; expected some of {', '.join(CANDIDATES)}")
    return {n: dict(CANDIDATES[n][1]) for n in chosen}  # "chosen*": the defaults + what they name


def prepared(data: Path, work: Path, settings: dict) -> Path:
    """The paper cohort prepared with the candidate's preprocessing keys (a folder per distinct set)."""
    from client.prepare import prepare_site

    pre = {k: settings[k] for k in PREPARE_KEYS if k in settings}
    name = "caches-" + ("-".join(f"{k}={pre[k]}" for k in sorted(pre)) or "default")
    caches = work / name
    for site in SITES:
        if not (data / site / "clinical.csv").is_file():
            raise SystemExit(f"bench model: no site folder {data / site}; run `slmfed simulate` once (it generates "
                             "data/synthetic-paper) or pass --data")
        prepare_site(data / site, caches / site, load_config(cli={**pre, "workers": 1}), progress=False)
    return caches


def study(caches: Path, settings: dict, args) -> dict:
    """results.json of the paper study on these caches with these settings and args.repeats repeats."""
    from client.app import app as client_app
    from server.checkpoint import Checkpoint
    from server.protocol import Federation, Study
    from server.report import build_results
    from simulation.inprocess import InProcessGrid

    run_keys = {k: v for k, v in settings.items() if k not in PREPARE_KEYS}
    extra = dict(kv.split("=", 1) for kv in args.set)
    with tempfile.TemporaryDirectory() as tmp:  # fresh site study folders (ledgers) for every candidate
        cfg = load_config(run_config={**run_keys, **extra, "cv-repeats": args.repeats, "device": args.device,
                                      "run-dir": f"{tmp}/run"})
        nodes = [{"cache-dir": str(caches / s), "site-name": s, "study-dir": f"{tmp}/{s}-study", "device": args.device,
                  **({} if args.min_cell_size is None else {"min-cell-size": args.min_cell_size})} for s in SITES]
        grid = InProcessGrid(client_app, nodes, study_config=cfg, keep_messages=False)
        state = Study(Federation(grid, min_sites=2, timeout_s=60), cfg, Checkpoint(Path(tmp) / "run")).run()
        return build_results(state, cfg)


def summary(res: dict) -> dict:
    """{model: {aucs, mean, sd, external}} for the primary cohort's repeated CV."""
    out = {}
    for model, by_site in (res.get("cv_repeats", {}).get("cv") or {}).items():
        entry = by_site.get("center-primary")
        if not entry:
            continue
        ext = [r["auc"] for r in res["rows"] if r["model"] == model and r["site"] == "center-external"]
        out[model] = {"aucs": entry["aucs"], "mean": entry["mean"], "sd": entry.get("sd"),
                      "external": ext[0] if ext else None}
    return out


def handcrafted(caches: Path, fold_seeds: list[int]) -> dict:
    from simulation.handcrafted import handcrafted_cv, handcrafted_external

    out = {}
    for label, clin in (("radiomics", False), ("radiomics+clinical", True)):
        cv = handcrafted_cv(caches / SITES[0], fold_seeds, with_clinical=clin)
        out[label] = {"aucs": cv["aucs"], "mean": cv["mean"], "sd": cv["sd"],
                      "external": handcrafted_external(caches / SITES[0], caches / SITES[1], with_clinical=clin)}
    return out


def _line(name: str, model: str, e: dict, external: bool) -> str:
    sd = f"{e['sd']:.3f}" if e.get("sd") is not None else "-"
    ext = f"   external {e['external']:.3f}" if external and e.get("external") is not None else ""
    return (f"  {name:22s} {model:19s} {e['mean']:.3f} (SD {sd})   per repeat "
            f"{', '.join(f'{a:.3f}' for a in e['aucs'])}{ext}")


def run(args) -> int:
    from server.protocol import fold_seed

    torch.set_num_threads(args.threads)
    data, work = Path(args.data), Path(args.work)
    settings = candidate_settings(args.candidates)
    seed = int(load_config(cli=dict(kv.split("=", 1) for kv in args.set if kv.startswith("seed=")))["seed"])
    seeds = [fold_seed(seed, r) for r in range(args.repeats)]
    figures: dict = {"fold_seeds": seeds, "candidates": {}}
    truth = data / "truth.json"
    if truth.is_file():  # the primary centre's population oracle (what the generator's true risk reaches)
        figures["oracle"] = json.loads(truth.read_text())["sites"][SITES[0]]["oracle_auc"]
    for name, cand in settings.items():
        t = time.perf_counter()
        caches = prepared(data, work, cand)
        res = study(caches, cand, args)
        entry = {"settings": cand, "models": summary(res), "seconds": time.perf_counter() - t}
        if "handcrafted" not in figures:
            figures["handcrafted"] = handcrafted(caches, seeds)
        figures["candidates"][name] = entry
        print(f"{name}: {CANDIDATES[name][0]}  ({entry['seconds']:.0f} s)", flush=True)
        for model, e in entry["models"].items():
            print(_line(name, model, e, args.external), flush=True)
    print(f"handcrafted baseline (simulation/handcrafted.py) on the same {args.repeats} fold assignments:")
    for label, e in figures.get("handcrafted", {}).items():
        print(_line("handcrafted", label, e, args.external))
    if figures.get("oracle"):
        print("oracle (the generator's true risk, primary population): "
              + ", ".join(f"{k} {v:.3f}" for k, v in figures["oracle"].items()))
    if args.out:
        if not args.external:  # selection output: leave the external cohort unseen
            for e in figures["candidates"].values():
                for m in e["models"].values():
                    m.pop("external", None)
            for m in figures.get("handcrafted", {}).values():
                m.pop("external", None)
        Path(args.out).write_text(json.dumps(figures, indent=1, default=float))
    return 0
