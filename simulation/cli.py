"""`slmfed simulate`: the whole study on one machine, on the embedded synthetic cohort by default.

With no arguments: generate the paper cohort once (data/synthetic-paper, reused afterwards), prepare
both centers (incremental: a re-run only redoes what changed), run the `paper` scenario through
Flower's simulation runtime, print the results table and where the report is.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from common.cli import CommandError
from common.config import SCHEMA, ConfigError, load_config

SIM_FLAGS = ("num-rounds", "local-epochs", "folds", "cv-repeats", "seed", "backbone", "norm", "models", "fedprox-mu", "cf-l2")
PRESET_ROUNDS = {"quick": {"num-rounds": 3, "local-epochs": 1, "folds": 3, "cf-l2": 0.1}}
# The smoke-run cohorts (12-28 patients a site) cannot hold k = 10 patients of each class in a fold:
# --quick lowers every virtual site's min-cell-size to this (never below 3, the policy's floor); the
# report shows the k each site used.
QUICK_MIN_CELL_SIZE = 3


def register(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="run the federated study on one machine (synthetic cohort by default)",
        description=__doc__,
    )
    p.add_argument("--scenario", choices=SCHEMA["scenario"].choices, default=None,
                   help="paper: primary trains (5-fold CV), external only evaluates; federated: both train "
                        "(CV + leave-center-out); multisite: N synthetic hospitals, federated vs each site alone")
    p.add_argument("--data", metavar="DIR", help="folder of site folders (default: generated synthetic cohort)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default: runs/<scenario>-<time>)")
    p.add_argument("--quick", action="store_true", help="small cohort, 3 folds, 3 rounds: a smoke run in about a minute")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted study from its last checkpoint")
    p.add_argument("--config", metavar="TOML", help="study settings file (keys as in pyproject [tool.flwr.app.config])")
    p.add_argument("--sites", type=int, default=4, help="multisite: number of synthetic hospitals (default 4)")
    p.add_argument("--ray-address", help="run the virtual sites on an existing Ray cluster instead of a local one "
                                         "(e.g. 127.0.0.1:6379; every node must read the site caches at the same path)")
    p.add_argument("--client-cpus", type=float, default=None, metavar="N",
                   help="CPUs each virtual site's Ray actor reserves (Flower client_resources; default: every "
                        "local core, or 1 on a cluster)")
    p.add_argument("--client-gpus", type=float, default=None, metavar="N",
                   help="GPUs each virtual site's actor reserves (1: one virtual hospital per GPU, trained with AMP; "
                        "default 0)")
    p.add_argument("--min-cell-size", type=int, default=None, metavar="K",
                   help="every virtual site's privacy policy k (default 10; --quick: 3; never below 3)")
    p.add_argument("--dp-epsilon", type=float, default=None, metavar="E",
                   help="every virtual site's DP-SGD budget per study (site policy dp-epsilon; default 0 = no DP)")
    for key in SIM_FLAGS:
        p.add_argument(f"--{key}", dest=key.replace("-", "_"), default=None, help=SCHEMA[key].help)
    p.set_defaults(func=run)


def default_data_dir(scenario: str, quick: bool, sites: int) -> tuple[Path, str, int | None]:
    preset = "small" if quick else "paper"
    if scenario == "multisite":
        return Path("data") / f"synthetic-{preset}-{sites}sites", preset, sites
    return Path("data") / f"synthetic-{preset}", preset, None


def site_folders(data_dir: Path) -> list[Path]:
    sites = sorted(p for p in data_dir.iterdir() if (p / "clinical.csv").is_file())
    if not sites:
        raise CommandError(f"{data_dir} holds no site folder (a folder with clinical.csv, dicom/ and masks/)")
    return sites


def prepare_all(data_dir: Path, sites: list[Path]) -> list[dict]:
    from client.prepare import PrepareError, prepare_site

    nodes = []
    for site in sites:
        cache = data_dir / "caches" / site.name
        try:
            report = prepare_site(site, cache, progress=True)
        except PrepareError as exc:
            raise CommandError(f"preparing {site}: {exc}") from None
        print(f"  {site.name}: {report.included} of {report.patients} patients included "
              f"({report.reused} reused from the cache)")
        nodes.append({"cache-dir": str(cache.resolve()), "site-name": site.name})
    return nodes


def run(args) -> int:
    from simulation.runner import run_study

    cli = {k: v for k in SIM_FLAGS if (v := getattr(args, k.replace("-", "_"))) is not None}
    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "simulation.json"
        if not saved.is_file():
            raise CommandError(f"{run_dir} is not a simulation run folder ({saved.name} is missing)")
        meta = json.loads(saved.read_text())
        run_config, nodes = {**meta["run_config"], "resume": True}, meta["sites"]
        quick = bool(meta.get("quick"))
    else:
        quick = bool(args.quick)
        if args.out and ((Path(args.out) / "simulation.json").is_file() or (Path(args.out) / "checkpoint").is_dir()):
            raise CommandError(f"{args.out} already holds a study: continue it with `slmfed simulate --resume {args.out}`, "
                               "or give a new --out (nothing was overwritten)")
        try:
            base = load_config(toml_path=args.config, cli={**(PRESET_ROUNDS["quick"] if args.quick else {}), **cli,
                                                           "scenario": args.scenario})
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        scenario = base["scenario"]
        if args.data:
            data_dir = Path(args.data)
            if not data_dir.is_dir():
                raise CommandError(f"--data {data_dir} does not exist")
        else:
            data_dir, preset, n_sites = default_data_dir(scenario, args.quick, args.sites)
            if not (data_dir / "truth.json").is_file():
                from simulation.synth import generate_cohort

                print(f"generating the synthetic cohort ({preset} preset) in {data_dir} (once; reused afterwards)")
                generate_cohort(data_dir, preset=preset, seed=0, sites=n_sites)
        print(f"preparing site caches in {data_dir / 'caches'}")
        k = args.min_cell_size if args.min_cell_size is not None else (QUICK_MIN_CELL_SIZE if args.quick else None)
        policy = {} if k is None else {"min-cell-size": k}
        if args.dp_epsilon is not None:
            policy["dp-epsilon"] = args.dp_epsilon
        try:
            load_config(node_config=policy)  # the site's own bounds (k >= 3, 0 <= dp-epsilon <= 100)
        except ConfigError as exc:
            raise CommandError(str(exc).replace("node_config", "--min-cell-size / --dp-epsilon")) from None
        nodes = [{**n, **policy} for n in prepare_all(data_dir, site_folders(data_dir))]
        if scenario == "multisite":
            from server.protocol import CENTRAL_SITE
            from simulation.runner import pooled_cache

            nodes.append({**pooled_cache(nodes, data_dir / "caches" / CENTRAL_SITE, CENTRAL_SITE), **policy})
        from simulation.runner import size_for_repeats

        # repeated CV: the virtual sites sized for the study (size_for_repeats logs what it changes per site)
        nodes = size_for_repeats(nodes, base)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        # a smoke run is named as one, so nobody quotes its AUCs as the study's
        run_dir = Path(args.out or f"runs/{'quick-' if args.quick else ''}{scenario}-{stamp}")
        truth = data_dir / "truth.json"
        run_config = {k: v for k, v in base.items() if k in _study_keys()}
        run_config["smoke-run"] = bool(args.quick)  # report.md says so
        if float(policy.get("dp-epsilon", 0.0)) > 0:  # sites under DP standardise from reference data only
            from simulation.roi_reference import with_reference

            run_config = with_reference(run_config)
        run_config.update({"run-dir": str(run_dir.resolve()), "truth-file": str(truth.resolve()) if truth.is_file() else ""})
        if scenario == "paper" and not any(n["site-name"] in base["eval-sites"].split(",") for n in nodes):
            raise CommandError(f"paper scenario: no evaluate-only site named {base['eval-sites']!r} in {data_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        from common.atomic import atomic_write_json

        atomic_write_json(run_dir / "simulation.json", {"run_config": run_config, "sites": nodes, "quick": bool(args.quick)})
    print(f"running the {run_config['scenario']} study with {len(nodes)} virtual sites -> {run_dir}")
    t0 = time.perf_counter()
    with stop_cleanly_on_interrupt(run_dir):
        run_study(nodes, run_config, ray_address=args.ray_address, client_cpus=args.client_cpus,
                  client_gpus=args.client_gpus)
    results = run_dir / "results.json"
    if not results.is_file():
        raise CommandError(f"the study stopped before writing {results}; resume with `slmfed simulate --resume {run_dir}`")
    res = json.loads(results.read_text())
    from server.report import format_table

    print(format_table(res))
    if not res["rows"]:
        raise CommandError(f"the study finished without a single result row: every site sat out or refused (why: "
                           f"{run_dir / 'report.md'}, section 'Sat out'); nothing here is a result")
    if quick:
        print(f"\nquick smoke run (small cohort, {run_config['folds']} folds, {run_config['num-rounds']} rounds): "
              "these AUCs check that the pipeline runs end to end; they are not the study's result. "
              "`slmfed simulate` without --quick runs the paper protocol.")
    print(f"\nfinished in {time.perf_counter() - t0:.0f} s; report: {run_dir / 'report.md'}")
    return 0


@contextmanager
def stop_cleanly_on_interrupt(run_dir: Path):
    """The first Ctrl-C (or SIGTERM) ends the study within seconds, resumable: it waits for a checkpoint
    being written, stops the local Ray, says where the checkpoint is and how to resume, and exits 130.
    Why not let KeyboardInterrupt unwind: Flower runs the ServerApp in a non-daemon thread, which would
    keep the process running the study until a second Ctrl-C killed it mid-step."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def stop(signum, _frame):
        from server.checkpoint import WRITING
        from simulation.runner import stop_local_ray_after_exit

        print(f"\n{signal.Signals(signum).name}: stopping the study...", file=sys.stderr, flush=True)
        WRITING.acquire(timeout=60)  # a checkpoint being written is finished first (never left half-paired)
        ckpt = run_dir / "checkpoint"
        if ckpt.is_dir():
            print(f"stopped. The study's last checkpoint is in {ckpt}; continue it with:\n"
                  f"  slmfed simulate --resume {run_dir}", file=sys.stderr, flush=True)
        else:
            print(f"stopped before the first checkpoint: nothing to resume in {run_dir}", file=sys.stderr, flush=True)
        stop_local_ray_after_exit()
        os._exit(130)  # the ServerApp thread cannot be joined mid-step; every file it writes is atomic

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _study_keys() -> set[str]:
    from common.config import flower_run_config_defaults

    return set(flower_run_config_defaults())
