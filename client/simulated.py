"""How a node of Flower's simulation runtime finds its virtual site (simulation only).

Flower 1.42's simulation runtime gives every virtual SuperNode a node config of nothing but
`partition-id` and `num-partitions` (flwr/server/superlink/fleet/vce/vce_api.py,
`_register_node_info_stores`); neither `run_simulation` nor `flwr run`'s federation config
(num-supernodes, backend resources) can add to it. So in a simulation the researcher, who plays every
virtual site, describes the sites in the run config:
  - `sim-sites`: a JSON list of node configs (cache-dir, site-name, the site's policy keys), one per
    partition-id; what `slmfed simulate` sends;
  - `sim-data`: a folder of site folders; node N takes the N-th site folder (sorted by name) and
    prepares it into `<sim-data>/caches/<site>` on first use (`flwr run .`); empty: the embedded
    synthetic cohort, generated once under `$FLWR_HOME/slmfed-data/`, with `sim-min-cell-size` as the
    virtual sites' k and `sim-dp-epsilon` as their DP budget (and a max-partitions that fits the
    run's `cv-repeats`).

Why this cannot steer a real site: these run-config keys are read only when (1) the node config holds
nothing but Flower's partition keys and (2) this ClientApp runs inside a Ray actor, which is where
Flower's simulation runtime runs ClientApps. A deployed SuperNode runs its ClientApp in a
`flwr-clientapp` process, never in a Ray actor: a coordinator's run config naming another cache, site
name or policy changes nothing there (its own node config is used; without one it is refused).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

from client.study import StudyError, sized_for_repeats
from common.config import SCHEMA, SITE_ONLY_KEYS, ConfigError, coerce_value, load_config

SIM_NODE_KEYS = frozenset({"partition-id", "num-partitions"})  # what Flower gives a simulated node
_prepared: dict[str, dict[str, str]] = {}  # per actor process: caches already brought up to date


def in_flower_simulation() -> bool:
    """True inside a Ray actor (Flower's simulation runtime); never in a deployed `flwr-clientapp`.
    Ray is looked up, not imported: a process that never imported it is not an actor."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().get_actor_id() is not None


def is_simulated_node(node_config: Mapping[str, Any]) -> bool:
    """A node of Flower's simulation runtime: Flower's partition keys, nothing of its own, in Ray."""
    keys = set(node_config)
    return "partition-id" in keys and keys <= SIM_NODE_KEYS and in_flower_simulation()


def node_layer(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The node config this ClientApp uses: its own, or, for a simulated node only, its virtual site's."""
    node = dict(node_config or {})
    if not is_simulated_node(node):
        return node  # a site with its own node config (or none at all): the run config's site list is never read
    pid, n = _int(node, "partition-id"), _int(node, "num-partitions")
    sites_json = coerce_value("sim-sites", run_config.get("sim-sites", ""), "run_config")
    if sites_json:
        site = _from_list(sites_json, pid, n)
        names = [signer_name(s) for s in json.loads(sites_json)]
    else:
        data = coerce_value("sim-data", run_config.get("sim-data", ""), "run_config")
        scenario = coerce_value("scenario", run_config.get("scenario", "paper"), "run_config")
        k = coerce_value("sim-min-cell-size", run_config.get("sim-min-cell-size", 0), "run_config")
        site = prepared_site(Path(data), pid, n) if data else prepared_site(embedded_cohort(scenario, n), pid, n,
                                                                            generate=True)
        if k:
            site["min-cell-size"] = k
        eps = coerce_value("sim-dp-epsilon", run_config.get("sim-dp-epsilon", 0.0), "run_config")
        if eps:
            site["dp-epsilon"] = eps
        # repeated CV: these virtual sites' max-partitions fits the study (as `slmfed simulate` sizes its own)
        site = sized_for_repeats(site, coerce_value("folds", run_config.get("folds", SCHEMA["folds"].default), "run_config"),
                                 coerce_value("cv-repeats", run_config.get("cv-repeats", 1), "run_config"))
        folders = Path(data if data else embedded_cohort(scenario, n)).resolve()
        names = sorted(p.name for p in folders.iterdir() if (p / "clinical.csv").is_file()) if folders.is_dir() else []
    site = with_simulation_keys(site, names)
    try:
        load_config(node_config=site)  # the same checks as any site's node config (types, bounds, k >= 3)
    except ConfigError as exc:
        raise StudyError(f"simulated site {pid}: {exc}") from None
    check_readable(site["cache-dir"])
    return {**node, **site}


def _int(node: Mapping[str, Any], key: str) -> int:
    value = node[key] if key in node else -1
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StudyError(f"simulated node: node config {key} = {value!r}, expected a whole number >= 0")
    return value


def _from_list(sites_json: str, pid: int, n: int) -> dict[str, Any]:
    try:
        sites = json.loads(sites_json)
    except json.JSONDecodeError as exc:
        raise StudyError(f"run config sim-sites is not valid JSON: {exc}") from None
    if not isinstance(sites, list) or not all(isinstance(s, dict) for s in sites):
        raise StudyError("run config sim-sites: expected a JSON list of node configs (objects)")
    if len(sites) != n:
        raise StudyError(f"run config sim-sites lists {len(sites)} sites but the simulation has {n} nodes "
                         f"(set num-supernodes = {len(sites)})")
    site = dict(sites[pid])
    foreign = sorted(set(site) - set(SITE_ONLY_KEYS))
    if foreign or not site.get("cache-dir"):
        raise StudyError(f"run config sim-sites[{pid}]: expected cache-dir and optionally "
                         f"{', '.join(k for k in SITE_ONLY_KEYS if k != 'cache-dir')}; found {sorted(site)}")
    return site


def signer_name(site: Mapping[str, Any]) -> str:
    """The name a site signs its contributions under (client/app.py): its site-name, else its cache."""
    return str(site.get("site-name") or site.get("cache-dir", ""))


def with_simulation_keys(site: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A virtual site's signing key and peer roster (common/signing.py simulation keys: the
    simulation's sites trust each other, as the hospitals of a deployment trust their roster)."""
    if site.get("signing-key") or site.get("peer-roster"):
        return site
    names = sorted(set(names) | {signer_name(site)})
    return {**site, "signing-key": f"simulation:{signer_name(site)}", "peer-roster": "simulation:" + ",".join(names)}


def embedded_cohort(scenario: str, n: int) -> Path:
    """Where the embedded synthetic cohort for `n` simulated nodes lives (a folder the simulation owns)."""
    from flwr.supercore.utils import get_flwr_home

    name = "synthetic-paper" if scenario != "multisite" and n == 2 else f"synthetic-paper-{n}sites"
    return Path(get_flwr_home()) / "slmfed-data" / name


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepared_site(data: Path, pid: int, n: int, generate: bool = False) -> dict[str, str]:
    """Node `pid`'s site of the folder `data`, its cache brought up to date once per actor process
    (under a lock: several actors may start at once). The embedded cohort is generated on first use."""
    data = data.resolve()
    memo = f"{data}#{pid}/{n}"
    if memo in _prepared:
        return dict(_prepared[memo])
    with _locked(data.with_name(data.name + ".lock")):
        if generate and not (data / "truth.json").is_file():
            # the embedded synthetic cohort (truth.json is written last): simulation code, imported only
            # here, in Flower's simulation runtime
            from simulation.synth import generate_cohort

            generate_cohort(data, preset="paper", seed=0, sites=None if data.name == "synthetic-paper" else n,
                            progress=False)
        if not data.is_dir():
            raise StudyError(f"run config sim-data {data} is not a folder (on node {node_name()})")
        folders = sorted(p for p in data.iterdir() if (p / "clinical.csv").is_file())
        if len(folders) != n:
            raise StudyError(f"sim-data {data} holds {len(folders)} site folders but the simulation has {n} nodes: "
                             f"run it with `--federation-config num-supernodes={len(folders)}`")
        folder = folders[pid]
        cache = data / "caches" / folder.name
        from client.prepare import PrepareError, prepare_site

        try:
            prepare_site(folder, cache, progress=False)
        except PrepareError as exc:
            raise StudyError(f"preparing simulated site {folder}: {exc}") from None
    _prepared[memo] = {"cache-dir": str(cache), "site-name": folder.name}
    return dict(_prepared[memo])


def node_name() -> str:
    """This machine as a Ray cluster names it (its IP) and its host name, for error messages."""
    ray = sys.modules.get("ray")
    ip = ray.util.get_node_ip_address() if ray is not None and ray.is_initialized() else ""
    return f"{socket.gethostname()} ({ip})" if ip else socket.gethostname()


def check_readable(cache_dir: str) -> None:
    """Data locality: whichever Ray node runs this virtual site must see its cache at the same path."""
    manifest = Path(cache_dir) / "manifest.json"
    if not os.access(manifest, os.R_OK):
        raise StudyError(f"simulated site cache {cache_dir} is not readable on node {node_name()}: every Ray node that "
                         "runs ClientApps must see the site caches at the same path (a shared filesystem)")
