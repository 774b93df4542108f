"""Run the study with Flower's simulation runtime (Ray backend), locally or on an existing Ray cluster.

The same ServerApp / ClientApp as in deployment, configured only through Flower's own channels: the
study's run config, with the virtual sites listed in its `sim-sites` key (client/simulated.py says why
that cannot steer a real SuperNode), reaches the ServerApp in its Context and every ClientApp in the
Context that Flower ships to the Ray actor with each message. Nothing travels in environment
variables, so a cluster whose raylets this process did not start runs it the same (`--ray-address`).

Data locality: any actor may run any virtual site (Flower assigns messages to free actors), so every
Ray node with CPUs must read every site cache at the same path; `check_data_locality` asks each node
before the study starts and names the node and the path that it cannot read.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from common.config import SCHEMA, SITE_ONLY_KEYS, ConfigError, coerce_value, flower_run_config_defaults

log = logging.getLogger(__name__)


def backend_config(ray_address: str | None = None, client_cpus: float | None = None,
                   client_gpus: float | None = None) -> dict[str, Any]:
    """Flower's client_resources: what one virtual site's actor reserves. Locally one ClientApp at a
    time using every core (the paper scenario trains at one site at a time); on a cluster one CPU per
    site unless told, so sites run side by side; `client_gpus` 1 puts one virtual hospital on each GPU
    (the ClientApp then trains on CUDA with AMP)."""
    cpus = client_cpus if client_cpus is not None else (1 if ray_address else (os.cpu_count() or 1))
    if cpus <= 0 or (client_gpus or 0) < 0:
        raise ConfigError(f"client resources: expected cpus > 0 and gpus >= 0, found {cpus}, {client_gpus}")
    return {"client_resources": {"num_cpus": cpus, "num_gpus": float(client_gpus or 0.0)},
            "init_args": {"logging_level": "WARNING", "log_to_driver": False}}


def size_for_repeats(sites: list[dict[str, Any]], study_config: dict[str, Any]) -> list[dict[str, Any]]:
    """The virtual sites, each with a max-partitions that fits one study of `study_config`'s repeated
    cross-validation (client/study.py cv_partitions) and the released-group audit reporting instead
    of refusing (client/study.py sized_for_repeats); unchanged with cv-repeats 1.

    Why: the default policy (24 partitions) holds about two repeats of 5-fold CV. These virtual sites
    are the simulation's own, so it may size their policy; a real site's policy stays its own node
    config (nothing in the run config can set it). Logged; results.json lists each site's policy."""
    from client.study import sized_for_repeats

    repeats = coerce_value("cv-repeats", study_config.get("cv-repeats", 1), "the study config")
    folds = coerce_value("folds", study_config.get("folds", SCHEMA["folds"].default), "the study config")
    out = []
    for site in sites:
        sized = sized_for_repeats(site, folds, repeats)
        name = site.get("site-name") or site.get("cache-dir")
        if sized.get("max-partitions") != site.get("max-partitions"):
            log.warning("virtual site %s: max-partitions raised from %d to %d for %d repeats of %d-fold CV "
                        "(a simulation's own site; a real site's policy is its own)", name,
                        int(site.get("max-partitions", SCHEMA["max-partitions"].default)), sized["max-partitions"],
                        repeats, folds)
        if sized.get("span-audit") != site.get("span-audit"):
            log.warning("virtual site %s: the released-group audit reports instead of refusing for %d repeats of "
                        "%d-fold CV (a real site refuses a second fold assignment; the report lists what it would "
                        "have refused)", name, repeats, folds)
        out.append(sized)
    return out


def run_study(sites: list[dict[str, Any]], run_config: dict[str, Any], ray_address: str | None = None,
              client_cpus: float | None = None, client_gpus: float | None = None) -> Path:
    """Run one study over `sites` (each a virtual site's node config: cache-dir, site-name, policy keys);
    returns the run folder."""
    study_keys = set(flower_run_config_defaults())
    foreign = sorted(set(run_config) - study_keys)
    if foreign:
        raise ConfigError(f"run config: {', '.join(foreign)} are not study settings (a site's keys belong in its "
                          "entry of the site list)")
    nodes = []
    for site in size_for_repeats(sites, run_config):
        if set(site) - set(SITE_ONLY_KEYS) or not site.get("cache-dir"):
            raise ConfigError(f"virtual site {site}: expected cache-dir and site keys ({', '.join(SITE_ONLY_KEYS)})")
        nodes.append({**site, "cache-dir": str(Path(site["cache-dir"]).resolve())})
    run_dir = Path(run_config["run-dir"]).resolve()
    run_config = {**run_config, "run-dir": str(run_dir), "min-sites": len(nodes), "sim-sites": json.dumps(nodes)}
    backend = backend_config(ray_address, client_cpus, client_gpus)
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from client.app import app as client_app
    from server.app import app as server_app
    from server.checkpoint import StudyInterrupted

    with ray_session(ray_address, backend["client_resources"]["num_cpus"]), tempfile.TemporaryDirectory(
            prefix="slmfed-app-") as app_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        check_data_locality(nodes)
        write_app_config(Path(app_dir), run_config)
        try:
            _run_simulation(
                num_supernodes=len(nodes),
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=server_app,
                backend_config=backend,
                # the ClientApps' run config: Flower reads it from this app folder's pyproject.toml
                app_dir=app_dir,
                is_app=True,
                server_app_context=Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                           run_config=dict(run_config)),
            )
        except StudyInterrupted as exc:  # checkpointed: the caller sees no results.json and says how to resume
            log.warning("study interrupted: %s", exc)
    return run_dir


def write_app_config(app_dir: Path, run_config: dict[str, Any]) -> None:
    """A Flower app folder whose [tool.flwr.app.config] is this study's run config: how Flower's
    simulation runtime builds each virtual node's Context (flwr 1.42: register_context with app_dir)."""
    import tomli_w

    (app_dir / "pyproject.toml").write_text(tomli_w.dumps({
        "project": {"name": "slmfed-simulation", "version": "0.0.0"},
        "tool": {"flwr": {"app": {"publisher": "slmfed",
                                  "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
                                  "config": run_config}}},
    }))


def _worker_env() -> dict[str, str]:
    """What the Ray workers need from this process: where the code is (the cluster's workers start in the
    raylet's environment, not ours) and no runtime dependency installation."""
    paths = [p for p in sys.path if p]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(paths), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


@contextmanager
def ray_session(ray_address: str | None, num_cpus: float) -> Iterator[None]:
    """Connect to the cluster at `ray_address` (left running: not ours), or start a private local Ray in
    its own temp folder and stop exactly its processes afterwards."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process: run one study at a time")
    runtime_env = {"env_vars": _worker_env()}
    if ray_address:
        ray.init(address=ray_address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.WARNING)
        try:
            yield
        finally:
            ray.shutdown()  # disconnects; the cluster ends this job's workers itself
        return
    temp_dir = tempfile.mkdtemp(prefix="slmray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    _ACTIVE_RAY.append(temp_dir)
    try:
        ray.init(num_cpus=max(1, int(num_cpus)), object_store_memory=256 * 1024**2, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING, _temp_dir=temp_dir, runtime_env=runtime_env)
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop_local_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        _ACTIVE_RAY.remove(temp_dir)


_ACTIVE_RAY: list[str] = []  # temp folders of the local Rays this process started and has not stopped


def stop_local_ray_after_exit() -> None:
    """Have the local Ray this process started stopped once this process has exited (a Ctrl-C handler
    calls this, then exits): simulation/ray_reaper.py, detached, with exactly its PIDs. A cluster given
    by address is not ours and is left alone (its workers end with this driver)."""
    for temp_dir in list(_ACTIVE_RAY):
        pids = ray_processes(temp_dir)
        subprocess.Popen([sys.executable, "-m", "simulation.ray_reaper", str(os.getpid()), temp_dir, *map(str, pids)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, env={**os.environ, **_worker_env()})


def _proc_table() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process we can read (Linux /proc)."""
    table = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            table[int(proc.name)] = (ppid, (proc / "cmdline").read_bytes())
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return table


def ray_processes(temp_dir: str) -> list[int]:
    """The processes of the Ray started with `temp_dir`: those naming it on their command line (GCS,
    raylet, monitors) and all their descendants (the workers); nobody else's Ray."""
    table = _proc_table()
    ours = {pid for pid, (_, cmd) in table.items() if temp_dir.encode() in cmd and pid != os.getpid()}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in ours} - ours
        ours |= more
        grew = bool(more)
    return sorted(ours)


def _stop_local_ray(temp_dir: str, grace_s: float = 30.0) -> None:
    """Wait until every process of our local Ray has exited after ray.shutdown; kill stragglers."""
    if not Path("/proc").is_dir():  # pragma: no cover - not Linux: rely on ray.shutdown
        return
    deadline = time.monotonic() + grace_s
    while (left := ray_processes(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        log.warning("Ray process %d still running %.0f s after shutdown: stopping it", pid, grace_s)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def check_data_locality(sites: list[dict[str, Any]]) -> None:
    """Ask every alive Ray node that can run a ClientApp whether it reads every site's cache manifest at
    its path; raise naming each node and path it cannot. Locally this is one node (this machine)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths = sorted({str(Path(s["cache-dir"]) / "manifest.json") for s in sites})

    @ray.remote(num_cpus=0)
    def unreadable(paths: list[str]) -> tuple[str, list[str]]:
        import socket

        return socket.gethostname(), [p for p in paths if not os.access(p, os.R_OK)]

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    asks = {n["NodeManagerAddress"]: unreadable.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(paths) for n in nodes}
    problems = []
    for address, ref in asks.items():
        host, missing = ray.get(ref, timeout=300)
        problems += [f"node {host} ({address}) cannot read {Path(p).parent}" for p in missing]
    if problems:
        raise RuntimeError("site caches must be readable at the same path on every Ray node that runs ClientApps "
                           "(put them on a shared filesystem): " + "; ".join(problems))


def pooled_cache(nodes: list[dict[str, str]], out_dir: str | Path, name: str) -> dict[str, str]:
    """Merge the hospitals' caches into one (simulation only): the "centralized" comparison of the
    multisite scenario, as if every hospital had sent its data to one place. Patient files are copied
    one at a time (hash-checked, never decoded), so the driver never holds a site's data."""
    from client.cache import MANIFEST, PATIENTS_DIR, CacheError, atomic_write_json, read_manifest, sha256_bytes
    from common.atomic import atomic_write_bytes

    out_dir = Path(out_dir)
    manifests = [read_manifest(n["cache-dir"]) for n in nodes]
    stamp = [m.get("patients") for m in manifests]
    existing = out_dir / MANIFEST
    if existing.is_file() and json.loads(existing.read_text()).get("merged_from") == stamp:
        return {"cache-dir": str(out_dir.resolve()), "site-name": name}
    patients = {}
    for node, manifest in zip(nodes, manifests):
        for key, entry in sorted(manifest.get("patients", {}).items()):
            if entry.get("status") != "included":
                continue
            src = Path(node["cache-dir"]) / PATIENTS_DIR / f"{key}.npz"
            data = src.read_bytes()
            if sha256_bytes(data) != entry.get("sha256"):
                raise CacheError(f"{src} does not match its manifest hash; re-run `slmfed prepare`")
            atomic_write_bytes(out_dir / PATIENTS_DIR / f"{key}.npz", data)
            patients[key] = {"status": "included", "reason": "", "sha256": entry["sha256"], "label": entry.get("label")}
    first = {k: v for k, v in manifests[0].items() if k not in ("patients", "counts", "salt", "site_name")}
    atomic_write_json(existing, {**first, "site_name": name, "patients": patients, "merged_from": stamp,
                                 "counts": {"included": len(patients), "excluded": 0}})
    return {"cache-dir": str(out_dir.resolve()), "site-name": name}
