"""`slmfed bench multisite`: how the multisite study's wall time grows with the number of sites, on this
machine and on a Ray cluster.

One synthetic multisite cohort with the largest site count is generated and prepared once; a study with
N sites uses its first N hospitals plus their pooled "central" site (the multisite scenario: federated
CV, leave-one-site-out, each site alone, centralized), so every N asks the same kind of work of more
sites. Each study runs through `simulation.runner.run_study` locally (a private Ray, one ClientApp at a
time using every core) and on a cluster: `--ray-address` (yours) or `--test-cluster` (a head and a
second node on loopback, 1 CPU each, started and stopped here). Wall time is the study's, from
submitting it to its results (cohort generation and preparation are not timed). On a 2-core machine
expect no speed-up from the cluster: both of its nodes share the same cores.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def configure(p) -> None:
    p.add_argument("--sites", default="4,8,16", help="comma list of site counts (default 4,8,16)")
    p.add_argument("--preset", default="small", choices=("tiny", "small", "paper"),
                   help="synthetic preset (default small; tiny sites are too small to release anything at k = 3)")
    p.add_argument("--models", default="cf", help="models of each study (default cf: the per-site message cost)")
    p.add_argument("--num-rounds", type=int, default=1)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--runs", type=int, default=1, help="repetitions per setting (median reported)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--ray-address", help="also run on this existing Ray cluster")
    where.add_argument("--test-cluster", action="store_true",
                       help="also run on a 2-node Ray cluster started on loopback for the benchmark")
    p.add_argument("--client-cpus", type=float, default=None, help="CPUs per virtual site on the cluster (default 1)")
    p.add_argument("--work", help="working folder (default: a new temporary folder)")


def _sites_for(nodes: list[dict], n: int, work: Path) -> list[dict]:
    from server.protocol import CENTRAL_SITE
    from simulation.runner import pooled_cache

    chosen = nodes[:n]
    return chosen + [{**pooled_cache(chosen, work / f"central-{n}", CENTRAL_SITE), "min-cell-size": 3}]


def _study_seconds(sites: list[dict], cfg: dict, run_dir: Path, **where) -> float:
    from simulation.runner import run_study

    t0 = time.perf_counter()
    run_study(sites, {**cfg, "run-dir": str(run_dir)}, **where)
    if not (run_dir / "results.json").is_file():
        raise RuntimeError(f"the study in {run_dir} wrote no results.json")
    return time.perf_counter() - t0


def run(args) -> int:
    import os

    from simulation.cli import prepare_all, site_folders
    from simulation.synth import generate_cohort

    counts = sorted({int(x) for x in args.sites.split(",") if x.strip()})
    work = Path(args.work or tempfile.mkdtemp(prefix="slmfed-bench-multisite-"))
    data = work / f"cohort-{args.preset}-{counts[-1]}sites"
    if not (data / "truth.json").is_file():
        print(f"generating a {counts[-1]}-site {args.preset} cohort in {data}")
        generate_cohort(data, preset=args.preset, seed=0, sites=counts[-1], progress=False, workers=os.cpu_count() or 1)
    # small sites cannot hold k = 10 of each class: every virtual site uses the policy's floor, k = 3
    nodes = [{**n, "min-cell-size": 3} for n in prepare_all(data, site_folders(data))]
    cfg = {"scenario": "multisite", "models": args.models, "num-rounds": args.num_rounds, "folds": args.folds,
           "local-epochs": 1}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")

    def timed(label: str, **where) -> dict[int, float]:
        out = {}
        for n in counts:
            secs = [_study_seconds(_sites_for(nodes, n, work), cfg, work / f"run-{label}-{n}-{i}", **where)
                    for i in range(args.runs)]
            out[n] = statistics.median(secs)
            print(f"  {label}: {n} sites (+ central) {out[n]:.1f} s")
        return out

    local = timed("local")
    cluster: dict[int, float] = {}
    if args.ray_address:
        cluster = timed("cluster", ray_address=args.ray_address, client_cpus=args.client_cpus)
    elif args.test_cluster:
        from simulation.raycluster import LoopbackRayCluster

        with LoopbackRayCluster(nodes=2, cpus_per_node=1, log_dir=work / "cluster-logs") as c:
            cluster = timed("cluster", ray_address=c.address, client_cpus=args.client_cpus)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\nmultisite scenario, models {args.models}, {args.folds} folds, {args.preset} preset, median of "
          f"{args.runs} run(s); wall time of the study")
    head = "| sites | local (s) |" + (" cluster (s) | cluster / local |" if cluster else "")
    print(head)
    print("|---|---|" + ("---|---|" if cluster else ""))
    for n in counts:
        line = f"| {n} | {local[n]:.1f} |"
        if cluster:
            line += f" {cluster[n]:.1f} | {cluster[n] / local[n]:.2f} |"
        print(line)
    return 0
