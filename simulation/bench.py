"""`slmfed bench NAME`: benchmarks that print figures (never timed assertions in tests).

Each benchmark lives in its own module `simulation/bench_<name>.py` with
`configure(parser)` (adds its flags) and `run(args) -> int`.
"""
from __future__ import annotations

import importlib

BENCHMARKS = {
    "prepare": "prepare throughput vs a bare pydicom parse of the same files",
    "train": "local training samples/s vs a bare PyTorch loop, peak memory",
    "federated": "federated DL training wall time and bytes vs centralized training",
    "deploy": "deployment round time on loopback (TLS + auth) vs simulation",
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures (medians over runs)")
    bsub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, help_text in BENCHMARKS.items():
        bp = bsub.add_parser(name, help=help_text)
        try:
            mod = importlib.import_module(f"simulation.bench_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"simulation.bench_{name}":
                raise
            bp.set_defaults(func=lambda a, n=name: print(f"benchmark '{n}' is not available yet") or 1)
            continue
        mod.configure(bp)
        bp.set_defaults(func=mod.run)
