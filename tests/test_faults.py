"""Fault tolerance (issue 15): each test injects a fault and checks the outcome.

Studies run on in-process sites (tests/fedtools LocalGrid) with the real ClientApp wrapped by
simulation/faults.py; the loopback deployment cases are in tests/test_faults_deploy.py.
"""
from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from client.app import app as client_app
from common.config import ConfigError, load_config
from server.checkpoint import Checkpoint, CheckpointError, StudyStopped
from server.protocol import Federation, Study, study_plan
from server.report import write_run_folder
from server.robust import aggregate, check_updates
from simulation.faults import Fault, FaultPlan, faulty_client_app
from tests.fedtools import LocalGrid, make_cache

TINY = {"scenario": "federated", "models": "dl", "folds": 2, "num-rounds": 2, "local-epochs": 1, "batch-size": 8,
        "clinical-embed-dim": 4, "augment": False, "seed": 5, "site-timeout-s": 5.0, "site-retries": 1,
        "retry-backoff-s": 0.0, "ensemble-size": 1}
SITES = ("site-a", "site-b", "site-c")


# ---- Federation: retries with backoff ------------------------------------------------------------
class FlakyGrid:
    """Node 1 answers; node 2 is silent on the first attempt; node 3 always errors."""

    def __init__(self):
        self.calls = 0

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None):
        self.calls += 1
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node == 2 and self.calls == 1:
                continue
            if node == 3:
                rep = Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom"), reply_to=m)
            else:
                rep = Message(content=RecordDict({"metrics": MetricRecord({"x": node})}), reply_to=m)
            rep.metadata.__dict__["_src_node_id"] = node
            out.append(rep)
        return out


def test_failed_and_missing_replies_are_retried_with_backoff_then_reported(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    waits = []
    monkeypatch.setattr("server.protocol.time.sleep", waits.append)
    fed = Federation(FlakyGrid(), min_sites=3, timeout_s=1, retries=3, backoff_s=2.0)
    fed.site_of, fed.node_of = {1: "a", 2: "b", 3: "c"}, {"a": 1, "b": 2, "c": 3}
    out = fed.ask(["a", "b", "c"], "query.info", {})
    assert set(out) == {"a", "b"}  # b came back on the first retry
    assert list(out.failed) == ["c"] and "code 2" in out.failed["c"] and "asked 4 time(s)" in out.failed["c"]
    assert waits == [2.0, 4.0, 8.0]  # bounded exponential backoff
    assert fed.retried == 2 + 1 + 1


class PushPullGrid:
    """A transport grid (push, then pull) whose sites answer at the `ready`-th pull (None: never), on a
    fake clock; its own send_and_receive is Flower's HttpGrid's (3 s between pulls) and must not be used."""

    def __init__(self, ready: dict[int, int | None]):
        self.ready, self.pulls, self.now, self.sleeps = ready, 0, 0.0, []
        self.pushed: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.ready)

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{len(self.pushed) + i}"
            ids.append(m.metadata.message_id)
        self.pushed.update({m.metadata.message_id: m for m in messages})
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        out = []
        for mid in list(ids):
            m = self.pushed[mid]
            at = self.ready[m.metadata.dst_node_id]
            if at is not None and self.pulls >= at:
                rep = Message(content=RecordDict({"metrics": MetricRecord({"x": m.metadata.dst_node_id})}), reply_to=m)
                rep.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
                out.append(rep)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("HttpGrid's send_and_receive sleeps 3 s between pulls")

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


def test_replies_are_pulled_every_tenth_of_a_second_until_all_are_in_or_the_timeout():
    """A deployment's ServerApp gets Flower's HttpGrid, which sleeps 3 s between pulls: server/grid.py
    pulls every 0.1 s (as the simulation runtime does) and stops at the timeout with what came in."""
    from flwr.supercore.task_identity import TaskIdentity

    from server.grid import send_and_receive

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = PushPullGrid({1: 2, 2: 4})
    msgs = [Message(content=RecordDict(), dst_node_id=n, message_type="query.info") for n in (1, 2)]
    got = send_and_receive(grid, msgs, 5.0, clock=lambda: grid.now, sleep=grid.sleep)
    assert sorted(r.metadata.src_node_id for r in got) == [1, 2]
    assert grid.pulls == 4 and grid.sleeps == [0.1, 0.1, 0.1]  # no sleep once all are in
    # node 2 never answers: the last pull is at the deadline, node 1's reply is kept
    grid = PushPullGrid({1: 1, 2: None})
    msgs = [Message(content=RecordDict(), dst_node_id=n, message_type="query.info") for n in (1, 2)]
    got = send_and_receive(grid, msgs, 0.25, clock=lambda: grid.now, sleep=grid.sleep)
    assert [r.metadata.src_node_id for r in got] == [1]
    assert grid.sleeps == pytest.approx([0.1, 0.1, 0.05]) and grid.now == pytest.approx(0.25) and grid.pulls == 4
    # the study's requests go through it: a Federation on a transport grid never calls its send_and_receive
    fed = Federation(PushPullGrid({1: 1, 2: 2}), min_sites=2, timeout_s=5, retries=0)
    fed.site_of, fed.node_of = {1: "a", 2: "b"}, {"a": 1, "b": 2}
    out = fed.ask(["a", "b"], "query.info", {})
    assert set(out) == {"a", "b"} and not out.failed


def test_retry_settings_are_bounded():
    with pytest.raises(ConfigError, match="site-retries"):
        load_config(run_config={"site-retries": 11})
    with pytest.raises(ConfigError, match="min-train-sites"):
        load_config(run_config={"min-train-sites": 0})
    with pytest.raises(ConfigError, match="aggregation"):
        load_config(run_config={"aggregation": "krum"})


# ---- update checks and aggregation ----------------------------------------------------------------
def _reply(arrays: dict, n: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})


def test_update_checks_name_each_problem_and_keep_honest_sites():
    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(4, 3)).astype(np.float32), "steps": np.array(3, dtype=np.int64)}
    honest = {s: {"w": g["w"] + rng.normal(0, 0.01, (4, 3)).astype(np.float32), "steps": g["steps"]} for s in "ab"}
    bad = {
        "nan": {"w": np.where(np.eye(4, 3) > 0, np.nan, g["w"]).astype(np.float32), "steps": g["steps"]},
        "shape": {"w": np.zeros((3, 4), np.float32), "steps": g["steps"]},
        "dtype": {"w": g["w"].astype(np.float64), "steps": g["steps"]},
        "keys": {"w": g["w"], "extra": g["steps"]},
        "scale": {"w": g["w"] * 1e6, "steps": g["steps"]},
    }
    replies = {s: _reply(a, 10) for s, a in {**honest, **bad}.items()}
    replies["count"] = _reply(honest["a"], 11)
    accepted, rejected = check_updates(ArrayRecord({k: Array(v) for k, v in g.items()}), replies, 10.0,
                                       {s: 10 for s in replies})
    assert accepted == ["a", "b"]
    assert "NaN" in rejected["nan"] and "shape" in rejected["shape"] and "dtype" in rejected["dtype"]
    assert "keys" in rejected["keys"] and "update norm" in rejected["scale"] and "num-examples 11" in rejected["count"]
    # alone in its round, a scaled update still fails the bound relative to the global model
    _, alone = check_updates(ArrayRecord({k: Array(v) for k, v in g.items()}), {"scale": replies["scale"]}, 10.0)
    assert "global model's norm" in alone["scale"]


def test_aggregation_options_use_flowers_functions_and_fedavg_is_flowers_fedavg():
    rng = np.random.default_rng(1)
    g = ArrayRecord({"w": Array(np.zeros((5,), np.float32)), "b": Array(np.zeros((2, 2), np.float32))})
    contents = [_reply({"w": rng.normal(size=5).astype(np.float32), "b": rng.normal(size=(2, 2)).astype(np.float32)}, n)
                for n in (3, 7, 11, 13)]
    fedavg = aggregate(g, contents, "fedavg", 0.2)
    ref = aggregate_arrayrecords(contents, "num-examples")
    assert all(np.array_equal(fedavg[k].numpy(), ref[k].numpy()) for k in ("w", "b"))  # bit-identical
    lists = [([c["arrays"][k].numpy() for k in ("w", "b")], 1) for c in contents]
    med = aggregate(g, contents, "fedmedian", 0.2)
    trim = aggregate(g, contents, "trimmed-mean", 0.25)
    for i, k in enumerate(("w", "b")):
        assert np.allclose(med[k].numpy(), aggregate_median(lists)[i])
        assert np.allclose(trim[k].numpy(), aggregate_trimmed_avg(lists, 0.25)[i])
        assert med[k].numpy().dtype == np.float32
    stack = np.stack([c["arrays"]["w"].numpy() for c in contents])
    assert np.allclose(trim["w"].numpy(), np.sort(stack, axis=0)[1:3].mean(0))  # one site cut at each end


# ---- checkpoints ---------------------------------------------------------------------------------
def test_corrupted_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    ck = Checkpoint(tmp_path)
    w1 = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    w2 = ArrayRecord({"w": Array(np.full(3, 2.0, np.float32))})
    ck.save({"position": {"fit": 0, "model": 0, "round": 1}}, w1)
    ck.save({"position": {"fit": 0, "model": 0, "round": 2}}, w2)
    assert Checkpoint(tmp_path).load_state()["position"]["round"] == 2
    # a torn weights file: the previous checkpoint (round 1) is used
    newest = json.loads((ck.dir / "state.json").read_text())["weights_file"]
    (ck.dir / newest).write_bytes((ck.dir / newest).read_bytes()[:-20])
    again = Checkpoint(tmp_path)
    assert again.load_state()["position"]["round"] == 1
    assert np.array_equal(again.load_arrays()["w"].numpy(), np.ones(3, np.float32))
    # an edited state: detected as well; with both broken, a clear error
    doc = json.loads((ck.dir / "state.prev.json").read_text())
    doc["state"]["position"]["round"] = 7
    (ck.dir / "state.prev.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="does not match"):
        Checkpoint(tmp_path).load_state()


# ---- studies with injected faults -------------------------------------------------------------------
@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-sites")
    out = []
    for i, name in enumerate(SITES):
        make_cache(root / name, 24, seed=10 + i, site_name=name)
        out.append({"cache-dir": str(root / name), "site-name": name, "min-cell-size": 3})
    return out


def _cv_only(*args, **kwargs):
    """The federated scenario's cross-validation fits only (its leave-center-out fits would add
    nothing to what these tests check and triple their time)."""
    return [f for f in study_plan(*args, **kwargs) if f.tag == "cv"]


def _study(nodes, run_dir, plan=None, **overrides):
    cfg = load_config(run_config={**TINY, "run-dir": str(run_dir), **overrides})
    app = faulty_client_app(plan) if plan else client_app
    study = Study(Federation(LocalGrid(app, nodes), min_sites=3, timeout_s=5, retries=int(cfg["site-retries"]),
                             backoff_s=0.0), cfg, Checkpoint(run_dir))
    with mock.patch("server.protocol.study_plan", _cv_only):
        state = study.run()
    return state, write_run_folder(run_dir, state, cfg)


def _rows(res):
    return [{k: r[k] for k in ("model", "cohort", "n", "auc")} for r in res["rows"]]


@pytest.fixture(scope="module")
def clean(nodes, tmp_path_factory):
    return _study(nodes, tmp_path_factory.mktemp("clean") / "run")


def test_a_site_raising_in_round_2_is_left_out_and_the_study_completes(nodes, clean, tmp_path):
    plan = FaultPlan((Fault("site-c", "raise", rounds=(2,), tag="cv"),), str(tmp_path / "counts"))
    state, res = _study(nodes, tmp_path / "run", plan)
    away = [f for f in state["faults"] if f["kind"] == "away"]
    assert {(f["site"], f["tag"], f["fold"], f["round"]) for f in away} == {("site-c", "cv", 0, 2), ("site-c", "cv", 1, 2)}
    assert all("code 2" in f["reason"] and "asked 2 time(s)" in f["reason"] for f in away)
    assert plan.fired()[0] == 4  # two folds x (first try + one retry)
    rounds = {(h["fold"], h["round"]): h["sites"] for h in state["history"] if h["part"] == "train" and h["tag"] == "cv"}
    assert rounds[(0, 2)] == ["site-a", "site-b"] and rounds[(0, 1)] == list(SITES)
    assert {(r["model"], r["cohort"]) for r in _rows(res)} == {(r["model"], r["cohort"]) for r in _rows(clean[1])}
    assert sum(r["n"] for r in res["rows"]) == sum(r["n"] for r in clean[1]["rows"])  # no patient lost
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| cv | 0 | dl | 2 | site-c | training | left out of this round |" in report


def test_min_train_sites_stops_cleanly_and_resume_finishes_once_the_site_is_back(nodes, clean, tmp_path):
    plan = FaultPlan((Fault("site-c", "raise", rounds=(2,)),), str(tmp_path / "counts"))
    with pytest.raises(StudyStopped, match=r"min-train-sites = 3.*slmfed simulate --resume"):
        _study(nodes, tmp_path / "run", plan, **{"min-train-sites": 3})
    assert not (tmp_path / "run" / "results.json").exists()
    saved = Checkpoint(tmp_path / "run").load_state()
    assert saved["position"] == {"fit": 0, "model": 0, "round": 1}
    assert any(f["kind"] == "stopped" and f["site"] == "site-c" for f in saved["faults"])
    state, res = _study(nodes, tmp_path / "run", None, **{"min-train-sites": 3, "resume": True})
    # every site verified the resumed model (its weight averaging kept the rounds before the stop)
    assert not [s for s in state["sat_out"] if "unverified-model" in s["reason"]], state["sat_out"]
    assert _rows(res) == _rows(clean[1])  # the site answered again: the same results as without the fault
    assert "study stopped here" in (tmp_path / "run" / "report.md").read_text()


def test_poisoned_updates_are_rejected_and_the_model_stays_as_good_as_honest_only(nodes, tmp_path):
    rounds = {"num-rounds": 3, "min-train-sites": 2, "tag": "cv"}
    tag = rounds.pop("tag")
    poison = FaultPlan(tuple(Fault("site-c", k, rounds=(r,), tag=tag) for r, k in ((1, "nan"), (2, "shape"), (3, "scale"))),
                       str(tmp_path / "p"))
    honest_only = FaultPlan((Fault("site-c", "raise", tag=tag),), str(tmp_path / "h"))
    p_state, p_res = _study(nodes, tmp_path / "poisoned", poison, models="dl", **rounds)
    h_state, h_res = _study(nodes, tmp_path / "honest", honest_only, models="dl", **rounds)
    rejected = [f for f in p_state["faults"] if f["kind"] == "rejected"]
    assert {(f["round"], f["site"]) for f in rejected} == {(r, "site-c") for r in (1, 2, 3)}
    reasons = {f["round"]: f["reason"] for f in rejected if f["fold"] == 0}
    assert "NaN" in reasons[1] and "shape" in reasons[2] and "update norm" in reasons[3]
    report = (tmp_path / "poisoned" / "report.md").read_text()
    assert report.count("update rejected") == 6 and "site-c" in report
    for h in p_state["history"]:
        if h["part"] == "train" and h["tag"] == "cv":
            assert "site-c" not in h["sites"] and np.isfinite(h["train-loss"])
    for f in (tmp_path / "poisoned" / "models").glob("*.npz"):
        with np.load(f) as z:
            assert all(np.isfinite(z[k]).all() for k in z.files)
    p_cv = {r["site"]: r["auc"] for r in p_res["rows"] if r["cohort"].endswith("2-fold CV")}
    h_cv = {r["site"]: r["auc"] for r in h_res["rows"] if r["cohort"].endswith("2-fold CV")}
    assert p_cv.keys() == h_cv.keys() == set(SITES)
    assert all(abs(p_cv[s] - h_cv[s]) <= 0.02 for s in SITES), (p_cv, h_cv)


def test_a_site_away_for_the_cf_statistics_leaves_that_fit_or_stops_the_study(nodes, tmp_path):
    plan = FaultPlan((Fault("site-b", "raise", message_type="query.logistic_stats", tag="cv"),), str(tmp_path / "c"))
    state, res = _study(nodes, tmp_path / "run", plan, models="cf", **{"cf-l2": 0.1})
    left = {(f["site"], f["fold"], f["kind"], f["step"]) for f in state["faults"]}
    assert left == {("site-b", 0, "left", "CF model fit"), ("site-b", 1, "left", "CF model fit")}
    assert all(state["fits"][k]["train"] == ["site-a", "site-c"] for k in ("0", "1"))
    assert {r["site"] for r in res["rows"]} == set(SITES)  # site-b is still evaluated
    # the same fault with min-train-sites = 3: the study stops before any DL round, and resume finishes it
    plan = FaultPlan(plan.faults, str(tmp_path / "c2"))
    with pytest.raises(StudyStopped, match="CF model fit"):
        _study(nodes, tmp_path / "stopped", plan, models="cf", **{"cf-l2": 0.1, "min-train-sites": 3})
    assert Checkpoint(tmp_path / "stopped").load_state()["position"] == {"fit": 0, "model": 0, "round": 0}
    _, resumed = _study(nodes, tmp_path / "stopped", None, models="cf", **{"cf-l2": 0.1, "min-train-sites": 3,
                                                                          "resume": True})
    assert {r["site"] for r in resumed["rows"]} == set(SITES)
