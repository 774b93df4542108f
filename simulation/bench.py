"""`slmfed bench NAME`: benchmarks that print figures (never timed assertions in tests).

Each benchmark lives in its own module `simulation/bench_<name>.py` with
`configure(parser)` (adds its flags) and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "prepare": "prepare throughput vs a bare pydicom parse of the same files",
    "train": "local training samples/s vs a bare PyTorch loop, peak memory",
    "federated": "federated DL training wall time and bytes vs centralized training",
    "deploy": "deployment round time on loopback (TLS + auth) vs simulation",
    "multisite": "multisite study wall time for 4, 8, 16 sites: this machine vs a Ray cluster",
    "attention": "slmfed predict on a site: Grad-CAM mass inside the dilated ROI, equality with the study's evaluation",
    "dp": "DP-SGD at the site: training samples/s with vs without DP, AUC of the paper study at several epsilons",
    "model": "model selection: candidate settings on the paper cohort, repeated CV, beside the handcrafted baseline",
    "faults": "a study with injected faults (site away, transient errors, a poisoned update) vs the same study clean",
    "fetch": "slmfed fetch from a loopback Orthanc (DICOMweb, DIMSE C-GET, C-MOVE): objects/s vs copying the files",
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures (medians over runs)",
                       description="\n".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    p.add_argument("benchmark", choices=list(BENCHMARKS), help="which benchmark")
    p.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own flags (see slmfed bench NAME --help)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Import the benchmark only now (they pull in torch / MONAI), then parse its own flags."""
    mod = importlib.import_module(f"simulation.bench_{args.benchmark}")
    parser = argparse.ArgumentParser(prog=f"slmfed bench {args.benchmark}", description=mod.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.configure(parser)
    return int(mod.run(parser.parse_args(args.options)) or 0)
