"""`slmfed bench federated`: what federation costs over plain centralized training.

One run does both, on the same prepared caches and the same fits (the `federated` scenario's CV folds
and leave-center-out fits, DL model only):
  - federated: the study through Flower's simulation runtime; the figure is the wall time of the DL
    training rounds as the server sees them (send weights, local training at each site, replies,
    FedAvg), summed over all fits;
  - centralized: for each fit, the training sites' patients pooled in one process and trained for
    the same total epochs (rounds x local epochs) with the same `client.train.train`.
Also: bytes per client per round (the weights in a training reply) against the fp32 weight size, and
what model verification (client/verify.py) adds: the evidence bytes a train request relays (the
previous round's signed updates), and the seconds a site spends verifying one round's model (the
ClientApp's own Verifier on the last round the run checkpointed: signatures, hashes, the recomputed
aggregate) against the wall time of a round.
Targets: time ratio <= 1.3, bytes ratio <= 1.02, verification < 10 % of a round. Medians over --runs.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def configure(p) -> None:
    p.add_argument("--data", help="folder of site folders (default: a generated small synthetic cohort)")
    p.add_argument("--runs", type=int, default=3, help="repetitions (median reported)")
    p.add_argument("--num-rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--folds", type=int, default=3)


def _fp32_weight_bytes(cfg: dict, n_channels: int, spatial_dims: int, n_features: int) -> int:
    from common.model import build_model

    net = build_model(cfg, n_channels, spatial_dims, n_features, use_clinical=False)
    return int(sum(t.numel() for t in net.state_dict().values()) * 4)


def centralized_seconds(nodes: list[dict], cfg: dict) -> float:
    """Train each fit of the federated plan on the pooled training patients; total wall seconds."""
    import torch

    from client.cache import SiteData
    from client.study import Site
    from client.train import train
    from common.model import build_model

    from server.protocol import study_plan

    sites = {n["site-name"]: Site.open({**cfg, **n}) for n in nodes}
    plan = study_plan("federated", {s: {"has-labels": site.has_labels} for s, site in sites.items()}, cfg["folds"], [])
    total = 0.0
    for fit in plan:
        parts = [sites[s].partition(fit.fold, "train", cfg["folds"], cfg["seed"]) for s in fit.train]
        pooled = SiteData(sum((p.keys for p in parts), []), np.concatenate([p.images for p in parts]),
                          np.concatenate([p.clinical for p in parts]), np.concatenate([p.labels for p in parts]), {})
        x = pooled.clinical.astype(np.float64)
        mean, std = x.mean(0), x.std(0, ddof=1)
        torch.manual_seed(cfg["seed"])
        net = build_model(cfg, pooled.images.shape[1], 2 if pooled.images.ndim == 4 else 3, x.shape[1], use_clinical=False)
        t0 = time.perf_counter()
        train(net, pooled, cfg, mean, std, epochs=cfg["num-rounds"] * cfg["local-epochs"], seed=cfg["seed"])
        total += time.perf_counter() - t0
    return total


def verify_seconds(run_dir: Path, cfg: dict, shape: dict, repeats: int = 5) -> float:
    """Median seconds the site's Verifier takes to derive one round's model from its relayed updates."""
    from flwr.app import RecordDict

    from client.verify import Verifier
    from common import derive
    from common.config import SENT_MODEL_KEYS
    from common.signing import Roster
    from server.checkpoint import Checkpoint
    from server.protocol import with_evidence

    group = Checkpoint(run_dir).load_evidence()[-1]
    first = json.loads(group[0]["statement"])
    roster = Roster.load("simulation:" + ",".join(json.loads(e["statement"])["site"] for e in group))
    recipe = {"kind": "rounds", "rounds": [group], "rule": str(cfg["aggregation"]), "trim": float(cfg["trim-fraction"]),
              "swa": 0}
    content = RecordDict(with_evidence({"model": recipe}))
    req = {"study-id": first["study-id"], "fold": first["fold"], "seed": first["seed"],
           **{k: cfg[k] for k in SENT_MODEL_KEYS}}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        v = Verifier("train", req, content, roster, shape)
        derived, _ = v.model(v.recipe["model"], first["model"], None)
        derive.record_hash(derived)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> int:
    from common.config import flower_run_config_defaults, load_config
    from simulation.cli import prepare_all, site_folders
    from simulation.runner import run_study

    work = Path(tempfile.mkdtemp(prefix="slmfed-bench-fed-"))
    data = Path(args.data) if args.data else work / "cohort"
    if not args.data:
        from simulation.synth import generate_cohort

        generate_cohort(data, preset="small", seed=0, progress=False)
    # the small cohort's folds cannot hold k = 10 patients of each class: lower every site's k to the
    # policy's floor, or the sites would (rightly) refuse most of what the benchmark times
    nodes = [{**n, "min-cell-size": 3} for n in prepare_all(data, site_folders(data))]
    cfg = load_config(run_config={"scenario": "federated", "models": "dl", "num-rounds": args.num_rounds,
                                  "local-epochs": args.local_epochs, "folds": args.folds})
    fed_s, cen_s, sent, local_s, evidence, verify_s, round_s = [], [], [], [], [], [], []
    for i in range(args.runs):
        run_dir = work / f"run{i}"
        run_study(nodes, {**{k: cfg[k] for k in flower_run_config_defaults()}, "run-dir": str(run_dir)})
        res = json.loads((run_dir / "results.json").read_text())
        fed_s.append(res["timing"]["train-rounds-s"])
        local_s.append(res["timing"]["local-training-s"])
        sent.append(res["communication"]["per-client-per-round"])
        evidence.append(res["communication"].get("evidence-per-train-request", 0))
        round_s.append(res["timing"]["train-rounds-s"] / max(res["timing"]["train-rounds"], 1))
        cen_s.append(centralized_seconds(nodes, cfg))
        print(f"run {i + 1}/{args.runs}: federated DL training {fed_s[-1]:.1f} s, centralized {cen_s[-1]:.1f} s")
    from client.cache import load_cache

    d = load_cache(nodes[0]["cache-dir"])
    shape = {"n-channels": d.images.shape[1], "spatial-dims": int(d.manifest.get("spatial_dims", 2)),
             "n-features": d.clinical.shape[1], "channels": d.manifest.get("channels")}
    verify_s = [verify_seconds(work / f"run{i}", cfg, shape) for i in range(args.runs)]
    weights = _fp32_weight_bytes(cfg, d.images.shape[1], int(d.manifest.get("spatial_dims", 2)), d.clinical.shape[1])
    f, c = statistics.median(fed_s), statistics.median(cen_s)
    b = statistics.median(sent)
    print(f"\nfederated scenario, DL model, {len(nodes)} sites, {args.folds} folds + leave-center-out, "
          f"{args.num_rounds} rounds x {args.local_epochs} local epochs, median of {args.runs} runs")
    print(f"  federated training rounds: {f:8.1f} s")
    print(f"    of which local training at the sites: {statistics.median(local_s):8.1f} s "
          "(the rest: weights to and from the sites, Flower messaging, FedAvg)")
    print(f"  centralized, same epochs:  {c:8.1f} s")
    print(f"  ratio federated/centralized: {f / c:.2f}  (target <= 1.30)")
    print(f"  bytes per client per round: {b:,}  fp32 weights: {weights:,}  ratio {b / weights:.4f}  (target <= 1.02)")
    ev, vs, rs = statistics.median(evidence), statistics.median(verify_s), statistics.median(round_s)
    print(f"  model verification: evidence per train request {ev:,.0f} bytes ({ev / weights:.2f} x the weights: the "
          "previous round's signed updates)")
    print(f"    verify one round's model at a site: {vs:.3f} s, {100 * vs / rs:.1f} % of a round ({rs:.1f} s)  "
          "(target < 10 %)")
    return 0
