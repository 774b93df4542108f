"""`slmfed bench faults`: a study with faults injected against the same study without, one line of figures.

The `federated` scenario (DL model) on a small synthetic 3-hospital cohort, run in this process
(simulation/inprocess.py InProcessGrid: the real ClientApp, no Ray) twice per repetition: clean, then
with these faults (simulation/faults.py, never reachable from a message):
  - site-03 raises on every training message of round 2 (away: left out of that round);
  - site-02 raises once on a training message (transient: answered on the retry);
  - site-01 replies weights scaled by 1e6 in round 1 (rejected by the update checks);
  - site-02 raises once on an evaluation, site-01 once on a results summary (transient).
Figures: faults injected (firings, retries included), faults survived (firings after which the
study still completed), patients lost (the clean run's result rows' patients missing from the faulty
run's; must be 0), extra wall time (faulty - clean; includes the retry backoff, --backoff-s).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

FAULTS = (("site-03", "raise", "train", (2,), 0), ("site-02", "raise", "train", (), 1),
          ("site-01", "scale", "train", (1,), 0), ("site-02", "raise", "evaluate", (), 1),
          ("site-01", "raise", "query.summary", (), 1))


def configure(p) -> None:
    p.add_argument("--data", help="folder of 3 site folders site-01..03 (default: a generated small cohort)")
    p.add_argument("--runs", type=int, default=3, help="repetitions (median reported)")
    p.add_argument("--num-rounds", type=int, default=2)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--backoff-s", type=float, default=0.5, help="retry-backoff-s of the runs")


def _study(nodes: list[dict], cfg: dict, run_dir: Path, app) -> tuple[dict | None, float]:
    from server.checkpoint import Checkpoint, StudyInterrupted
    from server.protocol import Federation, Study
    from server.report import write_run_folder
    from simulation.inprocess import InProcessGrid

    t0 = time.perf_counter()
    fed = Federation(InProcessGrid(app, nodes), min_sites=len(nodes), timeout_s=60, retries=int(cfg["site-retries"]),
                     backoff_s=float(cfg["retry-backoff-s"]))
    try:
        state = Study(fed, cfg, Checkpoint(run_dir)).run()
    except StudyInterrupted as exc:
        print(f"  the study stopped: {exc}")
        return None, time.perf_counter() - t0
    res = write_run_folder(run_dir, state, cfg)
    return res, time.perf_counter() - t0


def _warm_up(nodes: list[dict], cfg: dict) -> None:
    """Load every site's data and run the model once, so neither timed run pays the imports / first load."""
    import torch

    from client.study import Site
    from common.model import build_model

    for n in nodes:
        site = Site.open({**cfg, **n})
        d = site.data
        net = build_model(cfg, d.images.shape[1], d.images.ndim - 2, d.clinical.shape[1], use_clinical=False)
        with torch.no_grad():
            net(torch.as_tensor(d.images[:2]), torch.as_tensor(d.clinical[:2], dtype=torch.float32))


def patients_lost(clean: dict, faulty: dict | None) -> int:
    have = {(r["site"], r["cohort"], r["model"]): r["n"] for r in (faulty or {}).get("rows", [])}
    return sum(max(0, r["n"] - have.get((r["site"], r["cohort"], r["model"]), 0)) for r in clean["rows"])


def run(args) -> int:
    from client.app import app as client_app
    from common.config import load_config
    from simulation.cli import prepare_all, site_folders
    from simulation.faults import Fault, FaultPlan, faulty_client_app

    work = Path(tempfile.mkdtemp(prefix="slmfed-bench-faults-"))
    data = Path(args.data) if args.data else work / "cohort"
    if not args.data:
        from simulation.synth import generate_cohort

        generate_cohort(data, preset="small", seed=2, sites=3, progress=False)
    nodes = [{**n, "min-cell-size": 3} for n in prepare_all(data, site_folders(data))]  # small sites: k = 3
    cfg = load_config(run_config={"scenario": "federated", "models": "dl", "num-rounds": args.num_rounds,
                                  "local-epochs": 1, "folds": args.folds, "site-retries": 2,
                                  "retry-backoff-s": args.backoff_s})
    _warm_up(nodes, cfg)
    injected, survived, lost, extra = [], [], [], []
    for i in range(args.runs):
        plan = FaultPlan(tuple(Fault(s, k, message_type=m, rounds=r, times=t) for s, k, m, r, t in FAULTS),
                         str(work / f"counts{i}"))
        runs = {}
        for name in (("clean", "faulty") if i % 2 == 0 else ("faulty", "clean")):  # alternate the order
            app = client_app if name == "clean" else faulty_client_app(plan, client_app)
            runs[name] = _study(nodes, {**cfg, "run-dir": str(work / f"{name}{i}")}, work / f"{name}{i}", app)
        (clean, t_clean), (faulty, t_faulty) = runs["clean"], runs["faulty"]
        fired = sum(plan.fired().values())
        injected.append(fired)
        survived.append(fired if faulty is not None else 0)
        lost.append(patients_lost(clean, faulty))
        extra.append(t_faulty - t_clean)
        print(f"run {i + 1}/{args.runs}: clean {t_clean:.1f} s, with faults {t_faulty:.1f} s, "
              f"{len((faulty or {}).get('faults', []))} fault records in the report")
    med = statistics.median
    print(f"faults injected {med(injected):g}, faults survived {med(survived):g}, patients lost {max(lost)}, "
          f"extra wall time {med(extra):+.1f} s (median of {args.runs}; federated scenario, 3 sites, "
          f"{args.folds} folds + leave-one-out, {args.num_rounds} rounds, retry backoff {args.backoff_s:g} s)")
    return 0 if max(lost) == 0 and med(survived) == med(injected) else 1
