"""Run the study on one machine with Flower's simulation runtime (Ray backend).

The same ServerApp / ClientApp as in deployment. Flower's Python simulation API gives the apps an
empty run_config and only partition-id in node_config, so the study config and each virtual site's
node config travel in environment variables (see common.config.app_config), inherited by the Ray
workers. Nothing downloads anything, and Ray is shut down before returning.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from common.config import ENV_RUN_CONFIG, ENV_SIM_SITES

log = logging.getLogger(__name__)


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def backend_config(ray_address: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """One ClientApp at a time using every core (the paper scenario trains at one site at a time);
    a small object store so the whole run stays well under 4 GiB."""
    cpus = num_cpus or os.cpu_count() or 1
    init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if ray_address:
        init["address"] = ray_address
    else:
        init.update({"num_cpus": cpus, "object_store_memory": 256 * 1024**2})
    return {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}, "init_args": init}


def run_study(sites: list[dict[str, str]], run_config: dict[str, Any], ray_address: str | None = None) -> Path:
    """Run one study over `sites` (each: cache-dir, site-name[, study-dir]); returns the run folder."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import app as server_app

    run_dir = Path(run_config["run-dir"]).resolve()
    run_config = {**run_config, "run-dir": str(run_dir), "min-sites": len(sites)}
    env = {
        ENV_RUN_CONFIG: json.dumps(run_config),
        ENV_SIM_SITES: json.dumps(sites),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_DEDUP_LOGS": "0",
    }
    started = _boot_ticks_now() if Path("/proc/uptime").is_file() else 0
    with _env(env), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=len(sites),
                backend_config=backend_config(ray_address),
            )
        finally:
            _shutdown_ray(marker=env[ENV_RUN_CONFIG], since_ticks=started)
    return run_dir


_RAY_MARKS = (b"ray::", b"raylet", b"gcs_server", b"/ray/")


def _boot_ticks_now() -> int:
    """Now, in clock ticks since boot (the unit of /proc/PID/stat's start time)."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def _our_ray_processes(marker: bytes, since_ticks: int) -> list[int]:
    """Processes of this run's Ray: those whose environment holds our run config (workers inherit
    it), and Ray's own processes (raylet, GCS, dashboard/log monitor, workers) started since the run
    began. Looked up in /proc; a process gone or unreadable meanwhile is skipped."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
                continue
            cmd = (proc / "cmdline").read_bytes()
            started = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[19])
        except (OSError, IndexError, ValueError):
            continue
        if started >= since_ticks and any(m in cmd for m in _RAY_MARKS):
            pids.append(int(proc.name))
    return pids


def _shutdown_ray(marker: str, since_ticks: int, grace_s: float = 30.0) -> None:
    """Shut Ray down and wait until every process of this run's Ray has exited (killing stragglers)."""
    import signal
    import time

    try:
        import ray
    except ImportError:  # pragma: no cover - ray comes with flwr[simulation]
        return
    if ray.is_initialized():
        ray.shutdown()
    if not Path("/proc").is_dir():  # pragma: no cover - not Linux: rely on ray.shutdown
        return
    needle = f"{ENV_RUN_CONFIG}={marker}".encode()
    deadline = time.monotonic() + grace_s
    while (left := _our_ray_processes(needle, since_ticks)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        log.warning("Ray process %d still running %.0f s after shutdown: stopping it", pid, grace_s)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pooled_cache(nodes: list[dict[str, str]], out_dir: str | Path, name: str) -> dict[str, str]:
    """Merge the hospitals' caches into one (simulation only): the "centralized" comparison of the
    multisite scenario, as if every hospital had sent its data to one place."""
    from client.cache import MANIFEST, atomic_write_json, load_cache, read_manifest, write_patient

    out_dir = Path(out_dir)
    manifests = [read_manifest(n["cache-dir"]) for n in nodes]
    stamp = [m.get("patients") for m in manifests]
    existing = out_dir / MANIFEST
    if existing.is_file() and json.loads(existing.read_text()).get("merged_from") == stamp:
        return {"cache-dir": str(out_dir.resolve()), "site-name": name}
    patients = {}
    for node in nodes:
        data = load_cache(node["cache-dir"])
        for i, key in enumerate(data.keys):
            sha = write_patient(out_dir, key, data.images[i], data.clinical[i], int(data.labels[i]))
            patients[key] = {"status": "included", "reason": "", "sha256": sha, "label": int(data.labels[i])}
    first = {k: v for k, v in manifests[0].items() if k not in ("patients", "counts", "salt", "site_name")}
    atomic_write_json(existing, {**first, "site_name": name, "patients": patients, "merged_from": stamp,
                                 "counts": {"included": len(patients), "excluded": 0}})
    return {"cache-dir": str(out_dir.resolve()), "site-name": name}
