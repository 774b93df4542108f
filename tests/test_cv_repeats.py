"""Repeated cross-validation (`cv-repeats`, issue 17): R fold assignments, each a full CV.

Repeat 0 is exactly the study without repeats (same fold seed, tags, fits, results); each further
repeat has its own fold seed and tag, so the sites see new patient groups and their policy decides
(max-partitions, no-differencing); a site that refuses leaves that repeat not computed and the study
finishes. On in-process sites (tests/fedtools.LocalGrid), tiny cohorts, one round.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from client.app import app as client_app
from client.study import Site, cv_partitions
from common.config import ConfigError, load_config
from common.records import SITE_REFUSED
from server.checkpoint import Checkpoint, StudyInterrupted
from server.protocol import Federation, Study, fold_seed, repeat_tag, study_plan
from server.report import write_run_folder
from tests.fedtools import LocalGrid, ask_site, make_cache

TINY = {"folds": 2, "num-rounds": 1, "local-epochs": 1, "batch-size": 8, "backbone": "resnet10",
        "clinical-embed-dim": 4, "augment": False, "seed": 3, "cf-l2": 0.1, "site-timeout-s": 5.0, "models": "cf,dl",
        "ensemble-size": 1}
PRIMARY = "center-primary"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cvrep")
    make_cache(root / "primary", 36, seed=1, site_name=PRIMARY)
    make_cache(root / "external", 14, seed=2, site_name="center-external")
    # tiny cohorts: the sites' own policy lowers k to its floor; these play a simulation's virtual sites, whose
    # released-group audit reports instead of refusing a second fold assignment (a real site refuses it:
    # test_a_site_enforcing_the_released_group_audit_refuses_the_repeat_and_the_study_finishes)
    return [{"cache-dir": str(root / "primary"), "site-name": PRIMARY, "min-cell-size": 3, "span-audit": "report"},
            {"cache-dir": str(root / "external"), "site-name": "center-external", "min-cell-size": 3,
             "span-audit": "report"}]


def run(nodes, run_dir, **overrides):
    cfg = load_config(run_config={**TINY, "run-dir": str(run_dir), **overrides})
    grid = LocalGrid(client_app, nodes)
    state = Study(Federation(grid, min_sites=2, timeout_s=5), cfg, Checkpoint(run_dir)).run()
    return grid, state, write_run_folder(run_dir, state, cfg)


@pytest.fixture(scope="module")
def plain(nodes, tmp_path_factory):
    """The study as before: no cv-repeats key at all."""
    return run(nodes, tmp_path_factory.mktemp("plain") / "run")


@pytest.fixture(scope="module")
def two(nodes, tmp_path_factory):
    return run(nodes, tmp_path_factory.mktemp("two") / "run", **{"cv-repeats": 2})


def _sent(grid, mtype: str) -> list[dict]:
    return [dict(m.content["config"]) for m in grid.sent if m.metadata.message_type == mtype]


# ---- the plan ---------------------------------------------------------------------------------------
SITES = {"a": {"has-labels": True}, "b": {"has-labels": True}, "pooled-centralized": {"has-labels": True}}


@pytest.mark.parametrize("scenario,sites,evals", [("paper", {PRIMARY: {"has-labels": True},
                                                             "center-external": {"has-labels": True}},
                                                   ["center-external"]),
                                                  ("federated", SITES, []), ("multisite", SITES, [])])
def test_one_repeat_is_todays_plan_and_more_repeats_only_append_cv_fits(scenario, sites, evals):
    today = study_plan(scenario, sites, 3, evals)
    assert study_plan(scenario, sites, 3, evals, 1) == today
    three = study_plan(scenario, sites, 3, evals, 3)
    assert three[: len(today)] == today  # repeat 0 and the final fits keep their indices (seeded weights)
    families = [f for f in today if f.fold >= 0]
    extra = three[len(today):]
    assert len(extra) == 2 * len(families) and {f.repeat for f in extra} == {1, 2}
    for r in (1, 2):
        got = [f for f in extra if f.repeat == r]
        assert [(f.fold, f.train, f.val, f.test) for f in got] == [(f.fold, f.train, f.val, f.test) for f in families]
        assert [f.tag for f in got] == [repeat_tag(f.tag, r) for f in families]
    if scenario == "multisite":  # every CV family repeats: federated, each site alone, centralized
        assert {f.tag for f in extra} >= {"cv-r2", "local-a-r1", "local-b-r2", "central-r1"}
    assert fold_seed(3, 0) == 3 and len({fold_seed(3, r) for r in range(20)}) == 20
    assert all(0 <= fold_seed(3, r) < 2**31 for r in range(20))


def test_the_dp_plan_counts_every_repeats_trainings():
    """A DP site calibrates its noise for the trainings the server declares: repeats must be in it."""
    study = Study.__new__(Study)
    study.models = ["cf", "dl", "combined"]
    study.cfg = {"combined-from": "cf"}  # the Combined model trained too
    sites = {PRIMARY: {"has-labels": True}, "center-external": {"has-labels": True}}
    study.plan = study_plan("paper", sites, 2, ["center-external"], 1)
    assert study._dp_fits() == (2 + 1) * 2  # 2 CV folds + the final fit, two DL models
    study.plan = study_plan("paper", sites, 2, ["center-external"], 3)
    assert study._dp_fits() == (2 * 3 + 1) * 2
    study.cfg = {"combined-from": "dl+cf"}  # the default: the Combined model is made of the DL one, untrained
    assert study._dp_fits() == 2 * 3 + 1


def test_cv_repeats_is_bounded():
    assert load_config()["cv-repeats"] == 1
    for bad in (0, 21, "two", 1.5):
        with pytest.raises(ConfigError, match="cv-repeats"):
            load_config(run_config={"cv-repeats": bad})


# ---- the study --------------------------------------------------------------------------------------
def test_one_repeat_gives_todays_results_and_repeats_leave_repeat_0_untouched(nodes, plain, two, tmp_path):
    grid0, state0, res0 = plain
    _, _, res1 = run(nodes, tmp_path / "one", **{"cv-repeats": 1})
    assert res1["rows"] == res0["rows"] and res1["thresholds"] == res0["thresholds"]
    _, _, res2 = two
    # the headline rows, the threshold and the learning curves are repeat 0's: the same numbers
    assert res2["rows"] == res0["rows"] and res2["thresholds"] == res0["thresholds"]
    assert res2["learning_curves"] == res0["learning_curves"]
    assert {s["seed"] for s in _sent(grid0, "query.clinical_sums")} == {TINY["seed"]}


def test_two_repeats_use_two_fold_assignments_and_report_both_aucs(nodes, two):
    grid, state, res = two
    seeds = {s["study-id"].split("/")[1]: s["seed"] for s in _sent(grid, "evaluate") if s["fold"] >= 0}
    assert seeds == {"cv": 3, "cv-r1": fold_seed(3, 1)}
    site = Site.open(load_config(node_config=nodes[0]))
    a, b = site.fold_ids(2, seeds["cv"]), site.fold_ids(2, seeds["cv-r1"])
    assert not np.array_equal(a, b) and not np.array_equal(a, 1 - b)  # another split, not the folds renamed
    # the site stored each repeat's out-of-fold predictions apart, and they hold these folds' patients
    study_dir = Path(nodes[0]["cache-dir"]).parent / "primary-study" / state["study_id"]
    for tag, ids in (("cv", a), ("cv-r1", b)):
        with np.load(study_dir / tag / "dl" / "fold0-val.npz") as z:
            assert sorted(z["keys"]) == sorted(np.asarray(site.data.keys)[ids == 0])
    for model in ("cf", "dl"):
        e = res["cv_repeats"]["cv"][model][PRIMARY]
        assert e["fold_seeds"] == [3, fold_seed(3, 1)] and e["computed"] == 2 and not e["not_computed"]
        assert e["aucs"][0] == next(r["auc"] for r in res["rows"] if r["model"] == model and r["tag"] == "cv")
        summary = next(s for s in state["summaries"] if s["tag"] == "cv-r1" and s["site"] == PRIMARY)
        assert e["aucs"][1] == summary["metrics"][f"{model}.auc"] and e["aucs"][1] != e["aucs"][0]
        assert e["mean"] == pytest.approx(np.mean(e["aucs"])) and e["sd"] == pytest.approx(np.std(e["aucs"], ddof=1))
    assert "center-external" not in res["cv_repeats"]["cv"]["dl"]  # it only evaluates the final models
    assert {r["tag"] for r in res["rows"]} == {"cv", "final"}  # repeat 1 is not a headline row
    run_dir = Path(res["config"]["run-dir"])
    assert json.loads((run_dir / "results.json").read_text())["cv_repeats"] == res["cv_repeats"]
    report = (run_dir / "report.md").read_text()
    e = res["cv_repeats"]["cv"]["dl"][PRIMARY]
    line = (f"| MRI DL model | {PRIMARY}: 2-fold CV | {e['aucs'][0]:.3f}, {e['aucs'][1]:.3f} | {e['mean']:.3f} | "
            f"{e['sd']:.3f} | 2 of 2 |")
    assert "## Repeated cross-validation" in report and line in report
    assert "Repeated cross-validation</h2>" in (run_dir / "report.html").read_text()
    # the virtual sites answered repeat 1; the report says that a real site would have refused it
    assert {(w["site"], w["fit"]) for w in state["would_refuse"]} == {(PRIMARY, "cv-r1")}
    assert f"- {PRIMARY}: cv-r1 fold 0" in report.split("### What a real site would have refused")[1]
    assert len(list(run_dir.glob("roc-*.png"))) == 2  # figures: repeat 0's cohorts only
    from server.report import format_table  # what `slmfed simulate` prints

    assert f"MRI DL model       {PRIMARY}: 2-fold CV            {e['mean']:.3f} ({e['sd']:.3f}), 2 of 2" in format_table(res)


def test_without_repeats_the_report_has_no_repeats_table(plain):
    _, _, res = plain
    assert "Repeated cross-validation" not in (Path(res["config"]["run-dir"]) / "report.md").read_text()
    from server.report import format_table

    assert "repeated cross-validation" not in format_table(res)
    cf = next(r for r in res["rows"] if r["model"] == "cf" and r["tag"] == "cv")
    assert res["cv_repeats"]["cv"]["cf"][PRIMARY]["aucs"] == [cf["auc"]]


def test_multisite_repeats_every_cv_family_and_pools_each_repeat(tmp_path):
    """Federated CV, each site alone and the centralized comparison all repeat (CF model: fast)."""
    from server.protocol import CENTRAL_SITE
    from simulation.runner import pooled_cache

    hosp = []
    for name, n, seed, prev in (("hospital-a", 30, 11, 0.5), ("hospital-b", 20, 12, 0.4), ("hospital-c", 24, 13, 0.4)):
        make_cache(tmp_path / name, n, seed=seed, site_name=name, prevalence=prev)
        hosp.append({"cache-dir": str(tmp_path / name), "site-name": name, "min-cell-size": 3, "span-audit": "report"})
    sites = hosp + [{**pooled_cache(hosp, tmp_path / "pooled", CENTRAL_SITE), "min-cell-size": 3, "span-audit": "report"}]
    _, state, res = run(sites, tmp_path / "run", scenario="multisite", models="cf", **{"cv-repeats": 2})
    assert not state["sat_out"]
    names = [h["site-name"] for h in hosp]
    assert set(res["cv_repeats"]) == {"cv", "central", *(f"local-{h}" for h in names)}
    for family, entries in res["cv_repeats"].items():
        for site, e in entries["cf"].items():
            assert e["computed"] == 2 and all(0 < a <= 1 for a in e["aucs"]), (family, site)
    assert set(res["cv_repeats"]["cv"]["cf"]) == set(names) and set(res["cv_repeats"]["central"]["cf"]) == {CENTRAL_SITE}
    assert res["cv_repeats"]["local-hospital-a"]["cf"]["hospital-a"]["cohort"] == "hospital-a: site alone, 2-fold CV"
    pooled = res["cv_repeats_pooled"]["cf"]
    assert pooled["aucs"][0] == pytest.approx(res["pooled"][0]["auc_from_cells"]) and pooled["aucs"][1] is not None
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| CF model | all hospitals pooled centrally: 2-fold CV | " in report.split("## Repeated cross-validation")[1]


def _eval(**change):
    return {"fold": 0, "folds": 2, "seed": fold_seed(3, 1), "study-id": "0123456789ab/cv-r1", "model": "cf",
            "part": "val", "store": True, "round": 0, "num-rounds": 1, "clinical-mean": [0.0] * 7,
            "clinical-std": [1.0] * 7, "beta": [0.0] * 8, **change}


@pytest.mark.parametrize("change,rule", [
    ({"study-id": "0123456789ab/cv-r1/../../../tmp/x"}, "study-id"),   # a path in the repeat
    ({"study-id": "0123456789ab/cv-r1\n"}, "study-id"),                 # a trailing newline after a valid tag
    ({"study-id": "0123456789ab/cv-r20"}, "study-id"),                  # beyond cv-repeats' bound (20)
    ({"study-id": "0123456789ab/cv-r0"}, "study-id"),                   # repeat 0 is "cv" itself
    ({"study-id": "0123456789ab/cv-r01"}, "study-id"),
    ({"study-id": "0123456789ab/final-r1"}, "study-id"),                # only CV families repeat
    ({"seed": "457190280"}, "request"),                                 # a fold seed of the wrong type
    ({"seed": 1.0}, "request"),
    ({"seed": True}, "request"),
    ({"seed": -1}, "request"),                                          # out of bounds
    ({"seed": 2**31}, "request"),
    ({"repeat": 1}, "request"),                                         # no such key: the repeat is in the tag
])
def test_a_crafted_repeat_or_fold_seed_is_refused_and_nothing_is_stored(tmp_path, change, rule):
    make_cache(tmp_path / "cache", 36, seed=1, site_name="s")
    node = {"cache-dir": str(tmp_path / "cache"), "site-name": "s", "min-cell-size": 3,
            "study-dir": str(tmp_path / "study")}
    reply = ask_site(client_app, node, "evaluate", _eval(**change))
    assert reply.has_error() and reply.error.code == SITE_REFUSED and not reply.has_content()
    assert f"rule '{rule}'" in reply.error.reason
    assert not (tmp_path / "study").exists()  # no prediction stored, no ledger entry: nothing was computed
    # the honest request of the same repeat is answered and stored under that repeat's own folder
    ok = ask_site(client_app, node, "evaluate", _eval())
    assert not ok.has_error(), ok.error.reason
    assert (tmp_path / "study" / "0123456789ab" / "cv-r1" / "cf" / "fold0-val.npz").is_file()


def test_a_site_whose_policy_allows_no_second_repeat_refuses_it_and_the_study_finishes(nodes, tmp_path):
    # 2-fold CV at this site: its cohort and the two halves of repeat 0 are 3 groups, all its policy allows
    small = [{**nodes[0], "max-partitions": 3, "study-dir": str(tmp_path / "primary-study")}, nodes[1]]
    grid, state, res = run(small, tmp_path / "run", models="cf", **{"cv-repeats": 2})
    e = res["cv_repeats"]["cv"]["cf"][PRIMARY]
    assert e["aucs"][0] is not None and e["aucs"][1] is None and e["computed"] == 1
    assert e["mean"] == e["aucs"][0] and e["sd"] is None
    assert "rule 'max-partitions'" in e["not_computed"]["1"]
    refused = [x for x in state["sat_out"] if x["tag"] == "cv-r1" and x["site"] == PRIMARY]
    assert [x["fold"] for x in refused] == [0] and "rule 'max-partitions'" in refused[0]["reason"]
    # fold 0 of the repeat cannot be computed, so its other folds are not asked for (no more groups)
    asked = [c["fold"] for c in _sent(grid, "query.clinical_sums") if c["study-id"].endswith("/cv-r1")]
    assert asked == [0]
    assert any(x["tag"] == "cv-r1" and x["fold"] == 1 and x["reason"].startswith("skipped") for x in state["sat_out"])
    # the study went on: the final model and the external validation are there
    assert {(r["tag"], r["site"]) for r in res["rows"]} == {("cv", PRIMARY), ("final", "center-external")}
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"| CF model | {PRIMARY}: 2-fold CV | {e['aucs'][0]:.3f}, n/a | {e['mean']:.3f} | n/a | 1 of 2 |" in report
    assert (f"- {PRIMARY}: 2-fold CV, repeat r1: not computed for CF model (training: refused by the site's privacy "
            "policy, rule 'max-partitions'") in report
    ledger = json.loads((tmp_path / "primary-study" / "disclosure-ledger.json").read_text())
    assert len(ledger["partitions"]) == 3  # nothing beyond its policy was released


def test_a_site_enforcing_the_released_group_audit_refuses_the_repeat_and_the_study_finishes(nodes, tmp_path):
    """A real site's default: a second fold assignment cuts its folds into atoms of a few patients (any of
    which a combination of the two repeats' replies could isolate), so repeat 1 is refused at its first
    group, the study goes on, and the report says why."""
    real = [{k: v for k, v in n.items() if k != "span-audit"} | {"study-dir": str(tmp_path / f"study{i}")}
            for i, n in enumerate(nodes)]
    grid, state, res = run(real, tmp_path / "run", models="cf", **{"cv-repeats": 2})
    e = res["cv_repeats"]["cv"]["cf"][PRIMARY]
    assert e["aucs"][0] is not None and e["aucs"][1] is None and "rule 'no-differencing'" in e["not_computed"]["1"]
    asked = [c["fold"] for c in _sent(grid, "query.clinical_sums") if c["study-id"].endswith("/cv-r1")]
    assert asked == [0]  # nothing more of the repeat was asked
    assert not state["would_refuse"]
    ledger = json.loads((tmp_path / "study0" / "disclosure-ledger.json").read_text())
    from client.span_audit import atom_sizes

    for cls in ("with SLM", "without SLM"):  # what the site released: atoms of >= k patients only
        assert min(atom_sizes([set(g[cls]) for g in ledger["groups"]]).values()) >= 3


def test_resume_in_the_middle_of_repeat_2_gives_the_uninterrupted_results(nodes, two, tmp_path):
    _, _, full = two
    run_dir = tmp_path / "interrupted"
    # fits: cv fold 0, cv fold 1, final, cv-r1 fold 0 (one DL round each): stop inside repeat 2's first fit
    with pytest.raises(StudyInterrupted):
        run(nodes, run_dir, **{"cv-repeats": 2, "stop-after-rounds": 4})
    saved = Checkpoint(run_dir).load_state()
    assert saved["position"]["fit"] == 3 and saved["plan"][3]["tag"] == "cv-r1" and saved["plan"][3]["repeat"] == 1
    assert not (run_dir / "results.json").exists()
    _, _, resumed = run(nodes, run_dir, **{"cv-repeats": 2, "resume": True})
    assert resumed["rows"] == full["rows"] and resumed["cv_repeats"] == full["cv_repeats"]
    assert all(not math.isnan(a) for a in resumed["cv_repeats"]["cv"]["dl"][PRIMARY]["aucs"])


# ---- our own virtual sites: sized for the repeats ------------------------------------------------------
def test_simulation_sizes_its_own_virtual_sites_for_the_repeats_and_says_so(nodes, caplog):
    from simulation.inprocess import InProcessGrid
    from simulation.runner import size_for_repeats

    assert cv_partitions(5, 2) == 21 <= 24 < cv_partitions(5, 3)  # the default policy: about 2 repeats of 5 folds
    assert size_for_repeats(nodes, {"cv-repeats": 1, "folds": 5}) == nodes
    assert size_for_repeats(nodes, {"cv-repeats": 2, "folds": 5}) == nodes  # fits the default
    with caplog.at_level(logging.WARNING, logger="simulation.runner"):
        sized = size_for_repeats(nodes, {"cv-repeats": 3, "folds": 5})
    assert [s["max-partitions"] for s in sized] == [31, 31] and "max-partitions raised from 24 to 31" in caplog.text
    bigger = [{**nodes[0], "max-partitions": 100}]
    assert size_for_repeats(bigger, {"cv-repeats": 3, "folds": 5}) == bigger  # never lowered
    grid = InProcessGrid(client_app, nodes, study_config={"cv-repeats": 4, "folds": 3})
    assert [c["max-partitions"] for c in grid.nodes.values()] == [25, 25]
    assert all("max-partitions" not in c for c in InProcessGrid(client_app, nodes).nodes.values())  # a test's own site


def test_a_flwr_run_virtual_site_fits_the_runs_repeats(nodes, monkeypatch):
    from client import simulated

    monkeypatch.setattr(simulated, "in_flower_simulation", lambda: True)
    monkeypatch.setattr(simulated, "prepared_site", lambda data, pid, n, generate=False: {
        "cache-dir": nodes[0]["cache-dir"], "site-name": PRIMARY})
    node = {"partition-id": 0, "num-partitions": 2}
    plain = simulated.node_layer({"sim-data": "/data", "cv-repeats": 2}, node)
    assert "max-partitions" not in plain  # 2 repeats of 5 folds fit the default policy
    assert plain["span-audit"] == "report"  # a second fold assignment: reported, not refused, at a virtual site
    assert "span-audit" not in simulated.node_layer({"sim-data": "/data", "cv-repeats": 1}, node)
    three = simulated.node_layer({"sim-data": "/data", "cv-repeats": 3}, node)
    assert three["max-partitions"] == 31


def test_simulate_has_the_cv_repeats_flag():
    import argparse

    from simulation.cli import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    args = sub.choices["simulate"].parse_args(["--cv-repeats", "3"])
    assert args.cv_repeats == "3" and load_config(cli={"cv-repeats": args.cv_repeats})["cv-repeats"] == 3


def test_a_coordinator_cannot_pick_fold_seeds_whose_held_out_groups_difference_to_one_patient(tmp_path):
    """The fold seed is the coordinator's choice, so a curious one could search seeds for two held-out
    groups that differ by a single patient swap and read that patient off the two evaluations. The site's
    gate refuses the second group (rule no-differencing) and stores nothing for it."""
    from client.cache import load_cache
    from client.study import stratified_folds
    from tests.test_disclosure import STD, STUDY, rule_of

    make_cache(tmp_path / "cache", 20, seed=11, site_name="small", shape=(3, 40, 40))
    node = {"cache-dir": str(tmp_path / "cache"), "site-name": "small", "min-cell-size": 3}
    y = load_cache(tmp_path / "cache").labels  # the site's own patient order, as fold_ids uses it
    assert min(np.bincount(y)) >= 6  # each held-out half holds >= 3 patients of each class
    first = set(np.flatnonzero(stratified_folds(y, 2, 1) == 0))
    crafted = None
    for seed in range(2, 20000):  # what a coordinator can do offline: it knows nothing but the class counts
        group = set(np.flatnonzero(stratified_folds(y, 2, seed) == 0))
        if len(first ^ group) == 2:  # one patient swapped for another of the same class
            crafted = seed
            break
    assert crafted is not None

    def evaluate(tag, seed):
        return ask_site(client_app, node, "evaluate", {
            "fold": 0, "folds": 2, "seed": seed, "study-id": f"{STUDY}/{tag}", "model": "cf", "part": "val",
            "store": True, "round": 0, "num-rounds": 1, **STD, "beta": [0.0] * 8})

    assert rule_of(evaluate("cv", 1)) is None  # the first held-out group is released
    assert rule_of(evaluate("cv-r1", crafted)) == "no-differencing"
    study = tmp_path / "cache-study" / STUDY
    assert (study / "cv").is_dir() and not (study / "cv-r1").exists()
