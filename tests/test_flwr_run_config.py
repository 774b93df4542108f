"""Config through Flower's channels (run config / node config), and why a run config's simulation site
list can never steer a real site (client/simulated.py). Attacker's view: the coordinator writes the run
config; the site writes its node config."""
from __future__ import annotations

import itertools
import json

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import simulated
from client.app import app as client_app
from common.config import ConfigError, load_config
from common.records import SITE_CANNOT
from fedtools import make_cache

_IDS = itertools.count()


def ask_info(node_config: dict, run_config: dict) -> Message:
    """query.info to the ClientApp, with a run config the coordinator chose."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=1000, message_type="query.info")
    msg.metadata.__dict__["_message_id"] = f"cfg{next(_IDS)}"
    ctx = Context(run_id=1, node_id=1000, node_config=dict(node_config), state=RecordDict(), run_config=dict(run_config))
    return client_app(msg, ctx)


@pytest.fixture
def caches(tmp_path):
    make_cache(tmp_path / "own", 40, seed=1, site_name="own")
    make_cache(tmp_path / "other", 40, seed=2, site_name="other")
    return tmp_path


def hostile_run_config(root) -> dict:
    """A run config that names another cache, another site name, a weaker policy and another data folder."""
    evil = [{"cache-dir": str(root / "other"), "site-name": "evil", "min-cell-size": 3, "max-studies": 10_000,
             "privacy-ledger": str(root / "nowhere.json")}]
    return {"sim-sites": json.dumps(evil), "sim-data": str(root), "sim-min-cell-size": 3}


@pytest.mark.parametrize("in_ray", [False, True])
def test_a_run_config_site_list_changes_nothing_at_a_site_with_its_own_node_config(caches, monkeypatch, in_ray):
    # even if the ClientApp ran inside a Ray actor: a node config of its own wins outright
    monkeypatch.setattr(simulated, "in_flower_simulation", lambda: in_ray)
    node = {"cache-dir": str(caches / "own"), "site-name": "own"}  # default policy, k = 10
    reply = ask_info(node, hostile_run_config(caches))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["site"]["site-name"] == "own"
    policy = dict(reply.content["policy"])
    assert policy["min-cell-size"] == 10 and policy["max-studies"] == 50
    assert not (caches / "nowhere.json").exists()
    assert (caches / "own-study" / "disclosure-ledger.json").is_file()  # its own ledger, beside its own cache


def test_partition_keys_alone_outside_the_simulation_runtime_do_not_take_the_site_list(caches):
    # a real SuperNode started like Flower's examples (--node-config "partition-id=0 num-partitions=1"),
    # not in a Ray actor: the coordinator's site list is not read, the node has no site and says so
    reply = ask_info({"partition-id": 0, "num-partitions": 1}, hostile_run_config(caches))
    assert reply.has_error() and reply.error.code == SITE_CANNOT
    assert "node config has no 'cache-dir'" in reply.error.reason
    assert not (caches / "other-study").exists()  # the other cache was never opened for an answer


def test_site_keys_in_the_run_config_itself_are_refused():
    for key, value in (("cache-dir", "/srv/other"), ("site-name", "x"), ("study-dir", "/tmp"), ("min-cell-size", 3)):
        with pytest.raises(ConfigError, match=f"'{key}' from run_config: it belongs to the site"):
            load_config(run_config={key: value})


def test_a_simulated_node_takes_its_site_by_partition_id(caches, monkeypatch):
    monkeypatch.setattr(simulated, "in_flower_simulation", lambda: True)
    sites = [{"cache-dir": str(caches / "own"), "site-name": "a", "min-cell-size": 4},
             {"cache-dir": str(caches / "other"), "site-name": "b"}]
    run = {"sim-sites": json.dumps(sites)}
    reply = ask_info({"partition-id": 1, "num-partitions": 2}, run)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["site"]["site-name"] == "b" and reply.content["policy"]["min-cell-size"] == 10
    reply = ask_info({"partition-id": 0, "num-partitions": 2}, run)
    assert reply.content["site"]["site-name"] == "a" and reply.content["policy"]["min-cell-size"] == 4


@pytest.mark.parametrize("sites, node, message", [
    ([{"cache-dir": "X", "min-cell-size": 2}], {"num-partitions": 1}, "expected a value in \\[3, 10000\\]"),
    ([{"cache-dir": "X", "num-rounds": 1}], {"num-partitions": 1}, "expected cache-dir and optionally"),
    ([{"site-name": "a"}], {"num-partitions": 1}, "expected cache-dir and optionally"),
    ([{"cache-dir": "X"}], {"num-partitions": 2}, "lists 1 sites but the simulation has 2 nodes"),
    ([{"cache-dir": "/no/such/cache"}], {"num-partitions": 1}, "/no/such/cache is not readable on node"),
    ("not json", {"num-partitions": 1}, "sim-sites is not valid JSON"),
])
def test_a_bad_simulation_site_list_is_a_clear_error(caches, monkeypatch, sites, node, message):
    monkeypatch.setattr(simulated, "in_flower_simulation", lambda: True)
    entries = sites if isinstance(sites, str) else json.dumps(
        [{k: (str(caches / "own") if v == "X" else v) for k, v in s.items()} for s in sites])
    reply = ask_info({"partition-id": 0, **node}, {"sim-sites": entries})
    assert reply.has_error() and reply.error.code == SITE_CANNOT
    assert pytest.importorskip("re").search(message, reply.error.reason), reply.error.reason


def test_outside_ray_this_process_is_not_a_simulation_actor():
    assert simulated.in_flower_simulation() is False


def test_client_resources_map_to_flower_backend_config():
    from simulation.runner import backend_config

    assert backend_config(None, 2, 1)["client_resources"] == {"num_cpus": 2, "num_gpus": 1.0}
    assert backend_config("127.0.0.1:1")["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    with pytest.raises(ConfigError, match="client resources"):
        backend_config(None, 0)


def test_the_runner_refuses_site_keys_in_the_study_settings(tmp_path):
    from simulation.runner import run_study

    with pytest.raises(ConfigError, match="min-cell-size are not study settings"):
        run_study([{"cache-dir": str(tmp_path)}], {"run-dir": str(tmp_path), "min-cell-size": 3})


def test_a_fresh_simulated_node_generates_and_prepares_the_embedded_cohort_once(tmp_path, monkeypatch):
    """`flwr run .` on a fresh checkout: no sim-data, so node N generates (once, under a lock, in a folder
    the simulation owns: $FLWR_HOME/slmfed-data) and prepares the N-th site of the embedded cohort. The
    tiny preset stands in for the paper one here, to keep the test short."""
    import simulation.synth as synth

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(simulated, "in_flower_simulation", lambda: True)
    made = []
    real = synth.generate_cohort
    monkeypatch.setattr(synth, "generate_cohort", lambda out, preset, seed, sites, progress: made.append(
        (preset, sites)) or real(out, preset="tiny", seed=seed, sites=sites, progress=progress))
    run = {"scenario": "paper", "sim-min-cell-size": 3}
    primary = simulated.node_layer(run, {"partition-id": 1, "num-partitions": 2})
    external = simulated.node_layer(run, {"partition-id": 0, "num-partitions": 2})
    root = tmp_path / "home" / "slmfed-data" / "synthetic-paper"
    assert made == [("paper", None)]  # generated once, the two-centre paper cohort
    assert primary == {"partition-id": 1, "num-partitions": 2, "cache-dir": str(root / "caches" / "center-primary"),
                       "site-name": "center-primary", "min-cell-size": 3,
                       # the virtual sites' keys: each signs as itself and trusts the cohort's sites
                       "signing-key": "simulation:center-primary",
                       "peer-roster": "simulation:center-external,center-primary"}
    assert external["site-name"] == "center-external" and external["min-cell-size"] == 3
    assert (root / "caches" / "center-external" / "manifest.json").is_file()
    with pytest.raises(Exception, match="holds 2 site folders but the simulation has 3 nodes"):
        simulated.node_layer({"sim-data": str(root)}, {"partition-id": 0, "num-partitions": 3})
