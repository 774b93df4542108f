"""`slmfed bench deploy`: the same tiny study on a loopback deployment (TLS + SuperNode auth, behind the
nginx front door, sites running only their approved app through `slmfed site launcher`) and in
simulation, with the fixed overheads measured separately.

Where the deployment's extra time goes: starting the SuperLink and SuperNodes (once), SuperNodes
polling the SuperLink for messages (up to a poll interval per message), and a ClientApp process per
message. "before": the launcher starts a fresh Python per message (`--no-warm`, as Flower's own
flower-superexec does: Python + torch + MONAI imports every time); "after": it forks each ClientApp
from a warm interpreter that imported them once (the default). Simulation keeps one process per
virtual site warm, so it pays the import once.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def configure(parser) -> None:
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (median reported)")
    parser.add_argument("--rounds", type=int, default=2, help="federated rounds of the DL model")
    parser.add_argument("--patients", type=int, default=24, help="patients at the training site")


# the benchmark's small caches cannot hold k = 10 patients of each class per fold: both paths lower
# every site's k to the policy's floor (the same in simulation and deployment, so timings compare)
BENCH_POLICY = {"min-cell-size": 3}


def _caches(work: Path, n: int) -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from fedtools import make_cache  # prepared-cache double in the `slmfed prepare` format

    caches = {"center-primary": work / "primary", "center-external": work / "external"}
    make_cache(caches["center-primary"], n, 1, "center-primary")
    make_cache(caches["center-external"], max(8, n // 2), 2, "center-external")
    return caches


def _import_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import client.app"], check=True, cwd=REPO)
    return time.perf_counter() - t0


def _simulation(caches: dict[str, Path], cfg: dict, run_dir: Path) -> float:
    code = (
        "import json,sys; from simulation.runner import run_study; "
        "run_study(json.loads(sys.argv[1]), json.loads(sys.argv[2]))"
    )
    import json

    sites = [{"cache-dir": str(c), "site-name": s, **BENCH_POLICY} for s, c in caches.items()]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, json.dumps(sites), json.dumps({**cfg, "run-dir": str(run_dir)})],
                   check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - t0


def _approved_app(work: Path) -> tuple[Path, str]:
    """The app as the sites approve it: its FAB built once, unpacked (a `flwr run` of it has the same hash)."""
    import hashlib
    import io
    import shutil
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    app = work / "approved-app"
    zipfile.ZipFile(io.BytesIO(fab)).extractall(app)
    shutil.rmtree(app / ".info")
    return app, hashlib.sha256(fab).hexdigest()


def _deployment(work: Path, caches: dict[str, Path], cfg: dict, run_dir: Path, app: Path, digest: str,
                warm: bool) -> dict[str, float]:
    from deploy.loopback import LoopbackFederation

    t: dict[str, float] = {}
    with LoopbackFederation(work, list(caches), privacy=BENCH_POLICY, warm=warm) as fed:
        t0 = time.perf_counter()
        fed.start_superlink()
        t["superlink start"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fed.register_sites()
        t["register sites"] = time.perf_counter() - t0
        for s in caches:
            fed.approve(s, digest)
        t0 = time.perf_counter()
        for s, c in caches.items():
            fed.join(s, c)
        fed.wait_connected(len(caches))
        t["supernodes connected"] = time.perf_counter() - t0
        res, t["study"] = fed.run_study(app, {**cfg, "run-dir": str(run_dir)})
        if res.returncode != 0 or not (run_dir / "results.json").is_file():
            raise RuntimeError(f"deployment study failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return t


def run(args) -> int:
    cfg = {"scenario": "paper", "models": "dl", "folds": 2, "num-rounds": args.rounds, "local-epochs": 1}
    sim, before, after = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        work = Path(tmp)
        caches = _caches(work, args.patients)
        app, digest = _approved_app(work)
        imp = statistics.median(_import_seconds() for _ in range(3))
        for i in range(args.repeats):
            sim.append(_simulation(caches, cfg, work / f"sim-run-{i}"))
            before.append(_deployment(work / f"cold-{i}", caches, cfg, work / f"cold-run-{i}", app, digest, warm=False))
            after.append(_deployment(work / f"warm-{i}", caches, cfg, work / f"warm-run-{i}", app, digest, warm=True))
    sim_s = statistics.median(sim)
    fits = cfg["folds"] + 1
    rounds = fits * args.rounds
    print(f"tiny paper study, model dl, {fits} fits x {args.rounds} rounds, {args.patients} training patients; "
          f"median of {args.repeats}")
    print(f"  simulation (Ray, warm workers):                   {sim_s:8.1f} s   ({sim_s / rounds:.1f} s per round incl. eval)")
    for label, runs in (("deployment, before (fresh Python per message):", before),
                        ("deployment, after (warm launcher, forked):     ", after)):
        study = statistics.median(d["study"] for d in runs)
        print(f"  {label}   {study:8.1f} s   ({study / rounds:.1f} s per round incl. eval)")
    med = {k: statistics.median(d[k] for d in before + after) for k in before[0]}
    print("  deployment fixed costs (once per deployment, not in the study time):")
    for k in ("superlink start", "register sites", "supernodes connected"):
        print(f"    {k:<24} {med[k]:6.1f} s")
    print(f"  per message before: `import client.app` alone takes {imp:.1f} s in a fresh Python; after: the launcher's")
    print("  forkserver imported torch / MONAI / Flower once. Both wait for the SuperNode's poll of the SuperLink.")
    return 0
