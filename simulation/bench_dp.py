"""`slmfed bench dp`: what DP-SGD at the site costs, in training speed and in AUC.

Two parts (each can be skipped):
  throughput  local training samples/s of the Combined model with DP-SGD (Opacus, client/dp.py) and
              without, on the same phantom site, interleaved runs, medians and their ratio;
  auc         the paper study (primary 5-fold CV, external validation) with every site's policy at
              dp-epsilon in --epsilons (0 = no DP), AUC of the three models. The study runs with the
              real ClientApp and protocol on an in-process grid (simulation/inprocess.py), so it also
              runs where Ray is not installed; `slmfed simulate --dp-epsilon E` runs the same study.
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


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=("all", "throughput", "auc"), default="all")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--runs", type=int, default=5, help="throughput: timed epochs per variant (median)")
    parser.add_argument("--patients", type=int, default=128, help="throughput: phantom patients")
    parser.add_argument("--epsilons", default="1,3,8,0", help="auc: comma list of dp-epsilon (0 = no DP)")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="auc: studies per epsilon > 0, each with fresh sites (a new DP secret: other noise and "
                             "Poisson batches); the table gives their mean and range")
    parser.add_argument("--caches", metavar="DIR", default="data/synthetic-paper/caches",
                        help="auc: folder holding the prepared center-primary and center-external caches")
    parser.add_argument("--study", metavar="TOML", help="auc: study settings (default: the project defaults)")
    parser.add_argument("--min-cell-size", type=int, default=None, metavar="K",
                        help="auc: the sites' k (default: the policy default, 10; small test cohorts need 3)")
    parser.add_argument("--out", metavar="JSON", help="also write the figures here")
    parser.add_argument("--report", metavar="MD", help="auc: also write the AUC-vs-epsilon table (markdown) here")


def throughput(args) -> dict:
    from client import dp as D
    from client.train import select_device, train
    from common.model import build_model
    from simulation.bench_train import clinical_stats, phantom_site

    cfg = load_config(cli={"device": args.device, "local-epochs": 1, "augment": True})
    device = select_device(cfg)
    data = phantom_site(args.patients, seed=1, mask_channel=True)  # the default model: ROI statistics
    mean, std = clinical_stats(data)
    batch = int(cfg["batch-size"])

    def plan(mode: str):
        return D.DPTraining(noise_multiplier=1.0, clip_norm=1.0, sample_rate=batch / len(data),
                            steps=D.steps_per_epoch(len(data), batch), seed=12345, mode=mode)

    # (name, DP plan, dp-train): the default DP mode first, then DP-SGD over every weight
    variants = [("no DP", None, "auto"), (f"DP wide {D.DEFAULT_MODE} (default)", plan(D.DEFAULT_MODE), "wide")] + [
        (f"DP all {mode}", plan(mode), "all") for mode in D.GRAD_SAMPLE_MODES]
    rates: dict[str, list[float]] = {name: [] for name, *_ in variants}
    for rep in range(args.runs + 1):  # the first round warms up (allocator, kernels) and is not counted
        for name, dp, what in variants:
            model = build_model(cfg, 4, 2, 7, use_clinical=True, channels=data.manifest["channels"])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            out = train(model, data, {**cfg, "dp-train": what}, mean, std, seed=rep, dp=dp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if rep:
                rates[name].append(out["num_examples"] / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"device {device}, torch threads {torch.get_num_threads()}, Combined model (ensemble of "
          f"{cfg['ensemble-size']}, ROI statistics), batch {batch}, "
          f"{len(data)} patients, {args.runs} runs (median):")
    for k, v in med.items():
        print(f"  {k:26s} {v:8.1f} samples/s  {v / med['no DP']:.2f}x   (runs: {', '.join(f'{x:.1f}' for x in rates[k])})")
    if device.type == "cuda":
        print("  (no DP trains with AMP on CUDA; DP-SGD in float32)")
    return {"device": str(device), "threads": torch.get_num_threads(), "samples_per_s": med,
            "ratio": {k: v / med["no DP"] for k, v in med.items()}}


def auc_sweep(args) -> dict:
    from client.app import app as client_app
    from server.checkpoint import Checkpoint
    from server.protocol import Federation, Study
    from server.report import build_results
    from simulation.inprocess import InProcessGrid

    caches = Path(args.caches)
    sites = ["center-primary", "center-external"]
    missing = [s for s in sites if not (caches / s / "manifest.json").is_file()]
    if missing:
        raise SystemExit(f"bench dp: no prepared cache for {', '.join(missing)} in {caches}; run `slmfed simulate` "
                         "once (it prepares data/synthetic-paper/caches) or pass --caches")
    from simulation.roi_reference import with_reference

    study_cfg = {"device": args.device}
    if args.study:
        import tomllib

        study_cfg.update(tomllib.loads(Path(args.study).read_text()))
    study_cfg = with_reference(study_cfg)  # the no-DP run too: every epsilon trains on the same standardisation
    out: dict = {}
    for eps in [float(e) for e in args.epsilons.split(",")]:
        label = f"epsilon {eps:g}" if eps else "no DP"
        runs = []
        for seed in range(args.seeds if eps else 1):  # without DP the study is deterministic
            with tempfile.TemporaryDirectory() as tmp:
                # each run has its own study folders (ledgers, DP secrets): fresh sites every time
                nodes = [{"cache-dir": str(caches / s), "site-name": s, "study-dir": f"{tmp}/{s}-study",
                          "dp-epsilon": eps, "device": args.device,
                          **({} if args.min_cell_size is None else {"min-cell-size": args.min_cell_size})} for s in sites]
                cfg = load_config(run_config={**study_cfg, "run-dir": f"{tmp}/run"})
                t = time.perf_counter()
                state = Study(Federation(InProcessGrid(client_app, nodes, keep_messages=False), min_sites=2, timeout_s=60),
                              cfg, Checkpoint(Path(tmp) / "run")).run()
                res = build_results(state, cfg)
                seconds = time.perf_counter() - t
            runs.append({"seconds": seconds, "dp": res["dp"],
                         "auc": {f"{r['model']} | {r['cohort']}": r["auc"] for r in res["rows"]}})
            spent = ", ".join(f"{s} {d['epsilon']:.2f}" for s, d in res["dp"].items()) or "-"
            print(f"{label} (study {seed + 1} of {args.seeds if eps else 1}): {seconds:.0f} s; epsilon spent: {spent}")
            for key, a in runs[-1]["auc"].items():
                print(f"   {key:58s} AUC {a:.3f}")
        keys = list(runs[0]["auc"])
        mean = {k: statistics.mean(r["auc"][k] for r in runs) for k in keys}
        out[label] = {"runs": runs, "auc": mean,
                      "auc_range": {k: [min(r["auc"][k] for r in runs), max(r["auc"][k] for r in runs)] for k in keys}}
        if len(runs) > 1:
            print(f"{label}: mean of {len(runs)} studies")
            for k in keys:
                lo, hi = out[label]["auc_range"][k]
                print(f"   {k:58s} AUC {mean[k]:.3f} ({lo:.3f}-{hi:.3f})")
    return out


MODEL_NAMES = {"cf": "CF model (exact: not covered by DP)", "dl": "MRI DL model", "combined": "Combined DL model"}


def auc_table(sweep: dict) -> str:
    """The AUC-vs-epsilon table: one row per model, primary CV / external per epsilon (the mean over
    the studies run at that epsilon, their range beside it), and the epsilon each site spent."""
    labels = list(sweep)
    keys = list(sweep[labels[0]]["auc"])
    cohorts = []
    for k in keys:
        c = k.split(" | ", 1)[1]
        if c not in cohorts:
            cohorts.append(c)
    head = "| model | " + " | ".join(f"{lab} ({len(sweep[lab]['runs'])} stud{'y' if len(sweep[lab]['runs']) == 1 else 'ies'})"
                                      for lab in labels) + " |"
    lines = [f"AUC, {' / '.join(cohorts)}; mean over the studies (range):", "", head, "|---" * (len(labels) + 1) + "|"]
    for model in ("cf", "dl", "combined"):
        cells = []
        for lab in labels:
            parts = []
            for c in cohorts:
                k = f"{model} | {c}"
                if k not in sweep[lab]["auc"]:
                    parts.append("-")
                    continue
                lo, hi = sweep[lab]["auc_range"][k]
                parts.append(f"{sweep[lab]['auc'][k]:.3f}" + (f" ({lo:.3f}-{hi:.3f})" if hi > lo else ""))
            cells.append(" / ".join(parts))
        lines.append(f"| {MODEL_NAMES[model]} | " + " | ".join(cells) + " |")
    spent = []
    for lab in labels:
        per_site: dict[str, list[float]] = {}
        for r in sweep[lab]["runs"]:
            for s, d in r["dp"].items():
                per_site.setdefault(s, []).append(d["epsilon"])
        spent.append(", ".join(f"{s} {max(v):.2f}" for s, v in per_site.items()) or "-")
    lines.append("| epsilon spent (per site, most of the studies) | " + " | ".join(spent) + " |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    torch.set_num_threads(args.threads)
    figures = {}
    if args.part in ("all", "throughput"):
        figures["throughput"] = throughput(args)
    if args.part in ("all", "auc"):
        figures["auc"] = auc_sweep(args)
        table = auc_table(figures["auc"])
        print("\n" + table)
        if args.report:
            Path(args.report).write_text(table)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1, default=float))
    return 0
