"""Attacks on a site, as a curious or malicious coordinator would make them, through the real ClientApp.

Each test plays one attack class of the disclosure-control issue and checks that it yields no group
of fewer than k patients (per class), or is refused with an error reply naming the rule and leaving
nothing behind. The property-based test at the end sends random hostile request sequences.
"""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.app import app as client_app
from client.cache import CACHE_FORMAT_VERSION, atomic_write_json, load_cache, patient_key, write_patient
from common.clinical import encode_row
from common.config import ConfigError, load_config
from common.records import SITE_CANNOT, SITE_REFUSED
from server.checkpoint import Checkpoint
from server.protocol import Federation, Study
from tests.fedtools import LocalGrid, ask_site, make_cache

SHAPE = (3, 8, 8)
STD = {"clinical-mean": [0.0] * 7, "clinical-std": [1.0] * 7}
STUDY = "0123456789ab"


def rule_of(reply) -> str | None:
    """The rule a refusal names (None when the request was answered)."""
    if not reply.has_error():
        return None
    assert reply.error.code == SITE_REFUSED, reply.error.reason
    assert not reply.has_content()  # a refusal carries no data
    return reply.error.reason.split("rule '")[1].split("'")[0]


def metrics(reply) -> dict:
    assert not reply.has_error(), reply.error.reason
    return dict(reply.content["metrics"])


@pytest.fixture
def small_site(tmp_path):
    """A 31-patient site (the paper's external centre's size) with the default policy, k = 10."""
    make_cache(tmp_path / "cache", 31, seed=5, site_name="small", shape=SHAPE)
    return {"cache-dir": str(tmp_path / "cache"), "site-name": "small"}


def cf_eval(fold=-1, part="all", beta=None, study=f"{STUDY}/final", store=True, **extra):
    return {"fold": fold, "folds": 5, "seed": 1, "study-id": study, "model": "cf", "part": part, "store": store,
            "round": 0, "num-rounds": 1, **STD, "beta": beta if beta is not None else [0.0] * 8, **extra}


def ledger(node) -> dict:
    path = Path(node["cache-dir"]).parent / (Path(node["cache-dir"]).name + "-study") / "disclosure-ledger.json"
    return json.loads(path.read_text()) if path.is_file() else {"partitions": [], "studies": [], "budget": {}}


# ---- 1. crafted requests ------------------------------------------------------------------------
def test_crafted_beta_with_a_million_bins_is_refused_and_reads_nothing(small_site, tmp_path):
    # each clinical field mapped to its own range of the logit, as in the attack
    beta = [0.0, 2.0**12, 2.0**11, 2.0**10, 2.0**6, 2.0**3, 2.0**2, 2.0]
    reply = ask_site(client_app, small_site, "evaluate", cf_eval(beta=beta, **{"histogram-bins": 2**20}))
    assert rule_of(reply) == "request" and "histogram-bins" in reply.error.reason
    # without the bins key, the coefficients themselves are refused
    reply = ask_site(client_app, small_site, "evaluate", cf_eval(beta=beta))
    assert rule_of(reply) == "logit-slope"
    study_dir = tmp_path / "cache-study"
    assert not list(study_dir.rglob("*.npz"))  # no prediction was made or stored
    assert ledger(small_site)["partitions"] == []  # the refused requests left no trace


def test_crafted_standardisation_cannot_steepen_the_logit(small_site):
    # a tiny SD turns a modest coefficient into a step function: refused the same way
    cfg = cf_eval(beta=[0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0])  # on log CEA, feature 3
    cfg["clinical-std"] = [1.0, 1.0, 1.0, 1e-3, 1.0, 1.0, 1.0]
    assert rule_of(ask_site(client_app, small_site, "evaluate", cfg)) == "logit-slope"


@pytest.mark.parametrize("change, rule", [
    ({"study-id": "../../x"}, "study-id"),
    ({"study-id": f"{STUDY}/loco-../../../etc"}, "study-id"),
    ({"model": "../cf"}, "request"),
    ({"part": "train/../../x"}, "request"),
    ({"fold": 7}, "request"),              # not below folds
    ({"seed": -1}, "request"),
    ({"store": 1}, "request"),            # not a bool
    ({"beta": [0.0] * 7}, "request"),      # wrong length
    ({"beta": [float("nan")] + [0.0] * 7}, "request"),
    ({"min-cell-size": 3}, "request"),     # the policy is the site's, never the message's
    ({"share-histograms": True}, "request"),
    ({"widen-factor": 64.0}, "request"),   # a model 64x wider than any study uses: out of bounds
    ({"roi-pooling": "yes"}, "request"),   # not a bool
    ({"ensemble-size": 64}, "request"),    # 64 networks per fit: out of bounds (the site's CPU time)
    ({"ensemble-size": 2.0}, "request"),   # not an int
    ({"augment-intensity": 5.0}, "request"),
])
def test_malformed_or_hostile_values_are_refused_naming_the_rule(small_site, tmp_path, monkeypatch, change, rule):
    from client import study

    def no_reading(*_):
        raise AssertionError("a refused request must not read patient data")

    monkeypatch.setattr(study, "_cached_site_data", no_reading)
    reply = ask_site(client_app, small_site, "evaluate", {**cf_eval(), **change})
    assert rule_of(reply) == rule, reply.error.reason
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(tmp_path / "cache")]
    assert not written  # nothing written anywhere: not even the study folder or the ledger


def test_path_from_the_server_never_leaves_the_study_folder(small_site, tmp_path):
    assert rule_of(ask_site(client_app, small_site, "evaluate", cf_eval(study="../../x"))) == "study-id"
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "x").exists()
    ok = ask_site(client_app, small_site, "evaluate", cf_eval())
    assert metrics(ok)["num-examples"] == 31
    stored = [p for p in tmp_path.rglob("*.npz") if "patients" not in p.parts]
    assert stored and all(p.is_relative_to(tmp_path / "cache-study") for p in stored)


def test_policy_cannot_come_from_the_run_config():
    with pytest.raises(ConfigError, match="'min-cell-size' from run_config: it belongs to the site"):
        load_config(run_config={"min-cell-size": 3})
    with pytest.raises(ConfigError, match="expected a value in \\[3"):
        load_config(node_config={"min-cell-size": 2})  # not even the site may go below 3


def test_unknown_message_types_and_records_are_refused(small_site):
    from flwr.app import ArrayRecord

    # an ArrayRecord on a statistics query: refused before anything is read
    reply = ask_site(client_app, small_site, "query.clinical_sums",
                     {"fold": -1, "folds": 5, "seed": 1, "study-id": f"{STUDY}/final"}, arrays=ArrayRecord())
    assert rule_of(reply) == "request"


# ---- 2. differencing inside one honest run -------------------------------------------------------
def _two_site_study(tmp_path, **cfg):
    make_cache(tmp_path / "primary", 60, seed=1, site_name="center-primary", shape=SHAPE, prevalence=0.45)
    make_cache(tmp_path / "small", 31, seed=5, site_name="center-external", shape=SHAPE)
    nodes = [{"cache-dir": str(tmp_path / "primary"), "site-name": "center-primary"},
             {"cache-dir": str(tmp_path / "small"), "site-name": "center-external"}]
    run_cfg = load_config(run_config={"folds": 2, "seed": 3, "models": "cf", "cf-l2": 0.1, "site-timeout-s": 5.0,
                                      "run-dir": str(tmp_path / "run"), **cfg})
    grid = LocalGrid(client_app, nodes)
    state = Study(Federation(grid, min_sites=2, timeout_s=5), run_cfg, Checkpoint(tmp_path / "run")).run()
    return grid, state, nodes


def _released_groups(grid) -> dict[int, dict[int, tuple[int, int]]]:
    """{node: {fold: (patients, SLM patients)}} of the training groups a site released sums about, as
    the coordinator sees them: logistic_stats at beta = 0 gives n and grad[0] = n_pos - n / 2."""
    seen: dict[int, dict[int, tuple[int, int]]] = {}
    for sent, (mtype, reply) in zip(grid.sent, grid.replies):
        cfg = sent.content["config"]
        if mtype != "query.logistic_stats" or reply.has_error() or any(cfg["beta"]):
            continue
        m = dict(reply.content["metrics"])
        n = int(m["num-examples"])
        seen.setdefault(sent.metadata.dst_node_id, {})[int(cfg["fold"])] = (n, int(round(m["grad"][0] + n / 2)))
    return seen


def test_fold_differencing_of_one_honest_run_yields_no_group_below_k(tmp_path):
    grid, state, nodes = _two_site_study(tmp_path, scenario="federated")
    k = 10
    # the attack: sums over all patients (final fit) minus sums over all but fold j (CV fit j)
    # = sums over fold j; grad[0] counts its SLM patients
    attacked = 0
    for node, groups in _released_groups(grid).items():
        if -1 not in groups:
            continue
        n_all, pos_all = groups[-1]
        for fold, (n, pos) in groups.items():
            if fold >= 0:
                attacked += 1
                dpos, dneg = pos_all - pos, (n_all - pos_all) - (n - pos)
                assert dpos >= k and dneg >= k, (node, fold, groups)
    assert attacked == 2  # the big site's two CV fits; the 31-patient site answered none
    for node in nodes:  # the site's own record: every pair of released groups, per class
        parts = ledger(node)["partitions"]
        for a, b in itertools.combinations(parts, 2):
            for cls in a:
                diff = len(set(a[cls]) ^ set(b[cls]))
                assert diff == 0 or diff >= k
        assert all(len(members) >= k for p in parts for members in p.values())
    # the 31-patient site sat out the CV fits (its folds are too small to difference safely) and the
    # study still finished, with its leave-centre-out fits and a report that says so
    sat = {(e["site"], e["tag"]) for e in state["sat_out"]}
    assert ("center-external", "cv") in sat
    assert any(s["site"] == "center-external" for s in state["summaries"])


# ---- 3. differencing across runs -------------------------------------------------------------------
def _enrol(cache_dir: Path, n_new: int, seed: int, label: int | None = None, shape=SHAPE,
           mask_channel: bool = False) -> None:
    """Add patients to a prepared cache the way a re-run of prepare would (manifest written last);
    mask_channel: the last of `shape`'s channels is an ROI mask (a square in the middle)."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    rng = np.random.default_rng(seed)
    for i in range(n_new):
        key = patient_key(f"new-{seed}-{i}", manifest["salt"])
        y = int(rng.random() < 0.5) if label is None else label
        image = rng.normal(0.3, 0.05, shape).astype(np.float32)
        if mask_channel:
            image[-1] = 0.0
            image[-1, shape[1] // 4:3 * shape[1] // 4, shape[2] // 4:3 * shape[2] // 4] = 1.0
        sha = write_patient(cache_dir, key, image, encode_row("F", "mid", 3.0 + 30 * y, 20.0), y)
        manifest["patients"][key] = {"status": "included", "reason": "", "sha256": sha, "label": y}
    manifest["counts"]["included"] = len(manifest["patients"])
    atomic_write_json(cache_dir / "manifest.json", manifest)


def test_roi_statistics_sums_cannot_be_differenced_down_to_one_patient(tmp_path):
    """The standardisation reply also carries sums of each patient's ROI mean / SD per channel (the
    model's roi-stats input). The attacker asks for the whole cohort, then for every training partition
    the request format allows (2..20 folds, every fold, two seeds), hoping that one differs from the
    whole by a single patient: whole - partition = that patient's ROI statistics. Every answered
    partition must leave out at least k patients, so no difference is about fewer than k. Then two
    runs: the same question before and after one patient enrols."""
    from client.train import roi_statistics

    n = 80
    make_cache(tmp_path / "site", n, seed=7, site_name="h", shape=(3, 16, 16), prevalence=0.45, mask_channel=True)
    node = {"cache-dir": str(tmp_path / "site"), "site-name": "h"}
    whole = metrics(ask_site(client_app, node, "query.clinical_sums",
                             {"fold": -1, "folds": 5, "seed": 1, "study-id": "aaaaaaaaaaaa/final"}))
    stats = roi_statistics(load_cache(tmp_path / "site"))
    np.testing.assert_allclose(whole["roi-sum"], stats.sum(axis=0), rtol=1e-9)  # what it says it is
    np.testing.assert_allclose(whole["roi-sumsq"], (stats**2).sum(axis=0), rtol=1e-9)
    answered, refused = [], set()
    for seed, folds in itertools.product((1, 2), range(2, 21)):
        for fold in range(folds):
            reply = ask_site(client_app, node, "query.clinical_sums",
                             {"fold": fold, "folds": folds, "seed": seed,
                              "study-id": f"{folds:012x}/{'cv' if seed == 1 else 'cv-r1'}"})
            if reply.has_error():
                refused.add(rule_of(reply))
            else:
                answered.append(metrics(reply))
    assert answered and refused, refused  # some partitions are fine, the small-fold ones are not
    assert refused <= {"min-cell-size", "no-differencing", "max-partitions", "max-studies", "query-budget"}, refused
    k = 10
    for m in answered:
        assert n - m["num-examples"] >= k, "a partition leaves out fewer than k patients"
        left_out = np.asarray(whole["roi-sum"]) - np.asarray(m["roi-sum"])
        assert left_out.shape == (6,) and np.all(left_out > 0)  # the partition's own sums, not the whole's
    # two runs: one patient enrols, a new study asks for the whole cohort again; the difference of the
    # two replies would be that patient's ROI statistics, so the second is refused
    _enrol(tmp_path / "site", 1, seed=11, label=1, shape=(4, 16, 16), mask_channel=True)
    assert roi_statistics(load_cache(tmp_path / "site")).shape == (n + 1, 6)  # the new patient has them too
    again = ask_site(client_app, node, "query.clinical_sums",
                     {"fold": -1, "folds": 5, "seed": 1, "study-id": "bbbbbbbbbbbb/final"})
    assert rule_of(again) == "cohort-withheld"


def test_two_studies_before_and_after_one_enrolment_cannot_be_differenced(tmp_path):
    make_cache(tmp_path / "site", 40, seed=7, site_name="h", shape=SHAPE, prevalence=0.45)
    node = {"cache-dir": str(tmp_path / "site"), "site-name": "h"}
    sums = {"fold": -1, "folds": 5, "seed": 1}
    before = metrics(ask_site(client_app, node, "query.clinical_sums", {**sums, "study-id": "aaaaaaaaaaaa/final"}))
    info_before = metrics(ask_site(client_app, node, "query.info", {}))
    _enrol(tmp_path / "site", 1, seed=1, label=1)
    assert len(load_cache(tmp_path / "site")) == 41
    # the same honest queries in a new study: everything about the grown cohort is refused ...
    after = ask_site(client_app, node, "query.clinical_sums", {**sums, "study-id": "bbbbbbbbbbbb/final"})
    assert rule_of(after) == "cohort-withheld"
    # ... fold partitions too (folds of the new cohort would sum back to it) ...
    fold = ask_site(client_app, node, "query.clinical_sums", {**sums, "fold": 0, "study-id": "bbbbbbbbbbbb/cv"})
    assert rule_of(fold) == "cohort-withheld"
    # ... and even the counts: the info reply withholds them instead of giving the new label away
    info_after = metrics(ask_site(client_app, node, "query.info", {}))
    assert info_before["num-positive"] >= 10 and info_after["num-positive"] == -1 and info_after["cohort-released"] == 0
    assert before["num-examples"] == 40
    # once k new patients of each class are enrolled, the cohort can be released again
    _enrol(tmp_path / "site", 10, seed=2, label=0)
    _enrol(tmp_path / "site", 9, seed=3, label=1)
    again = metrics(ask_site(client_app, node, "query.clinical_sums", {**sums, "study-id": "cccccccccccc/final"}))
    assert again["num-examples"] == 60


def test_a_study_whose_only_site_grew_by_one_patient_finishes_with_the_site_sitting_out(tmp_path):
    grid, state, nodes = _two_site_study(tmp_path, scenario="paper")
    _enrol(Path(nodes[1]["cache-dir"]), 1, seed=4)
    cfg = load_config(run_config={"folds": 2, "seed": 3, "models": "cf", "cf-l2": 0.1, "run-dir": str(tmp_path / "run2")})
    state2 = Study(Federation(LocalGrid(client_app, nodes), min_sites=2, timeout_s=5), cfg, Checkpoint(tmp_path / "run2")).run()
    assert {"tag": "whole study", "fold": -1, "site": "center-external", "step": "all"}.items() <= state2["sat_out"][0].items()
    assert not any(s["site"] == "center-external" for s in state2["summaries"])


# ---- 4. honest score summaries -----------------------------------------------------------------------
def test_calibration_histogram_and_net_benefit_never_reveal_a_cell_below_k(tmp_path):
    from common import metrics as M

    make_cache(tmp_path / "site", 80, seed=9, site_name="h", shape=SHAPE, prevalence=0.4)
    node = {"cache-dir": str(tmp_path / "site"), "site-name": "h"}
    beta = [0.0, 0.3, -0.2, 0.1, 2.0, 1.5, 0.4, 0.6]  # an honest-looking, confident CF model
    assert metrics(ask_site(client_app, node, "evaluate", cf_eval(beta=beta)))
    summary = metrics(ask_site(client_app, node, "query.summary",
                               {"study-id": f"{STUDY}/final", "models": "cf", "kind": "final", "folds": 5}))
    edges, neg, pos = (np.asarray(summary[f"cf.{k}"]) for k in ("cell-edges", "cell-neg", "cell-pos"))
    k = 10
    assert np.all((neg == 0) | (neg >= k)) and np.all((pos == 0) | (pos >= k))
    assert neg.sum() + pos.sum() == 80 and len(summary["cf.calib-mean-pred"]) == len(neg)
    # every server-side curve is a function of the cells: between two edges nothing moves by less than k
    t = M.DEFAULT_THRESHOLDS
    nb = M.net_benefit_from_cells(edges, neg, pos, t)
    tp = M.count_at_or_above(edges, pos, edges)
    assert np.all(np.isin(np.round(tp, 9), np.round(np.concatenate([[0], np.cumsum(pos[::-1])]), 9)))
    assert np.isfinite(nb).all()
    # the exact AUC is still there, and the cells' AUC is within the stated bound of it
    bound = np.sum(neg * pos) / (2 * neg.sum() * pos.sum())
    assert abs(M.auc_from_histograms(neg, pos) - summary["cf.auc"]) <= bound + 1e-12
    # a second summary of the same predictions with other settings is refused (query budget)
    other = ask_site(client_app, node, "query.summary",
                     {"study-id": f"{STUDY}/final", "models": "cf", "kind": "final", "folds": 3})
    assert rule_of(other) == "query-budget"


def test_query_budget_allows_an_identical_retry_but_not_a_second_look(small_site):
    first = metrics(ask_site(client_app, small_site, "evaluate", cf_eval(beta=[0.1] * 8)))
    retry = metrics(ask_site(client_app, small_site, "evaluate", cf_eval(beta=[0.1] * 8)))
    assert first == retry  # the same answer again: nothing new
    assert rule_of(ask_site(client_app, small_site, "evaluate", cf_eval(beta=[0.2] * 8))) == "query-budget"


def test_crafted_boundary_isolating_patients_is_refused_by_the_hessian_spread(tmp_path):
    make_cache(tmp_path / "site", 60, seed=3, site_name="h", shape=SHAPE, prevalence=0.5)
    node = {"cache-dir": str(tmp_path / "site"), "site-name": "h", "max-logit-slope": 1000.0}
    x = load_cache(tmp_path / "site").clinical[:, 3].astype(float)  # log CEA
    cut = float(np.sort(x)[30])  # a boundary through one patient's value
    beta = [-400.0 * cut, 0.0, 0.0, 0.0, 400.0, 0.0, 0.0, 0.0]  # a near-step function of CEA at that patient
    reply = ask_site(client_app, node, "query.logistic_stats",
                     {"fold": -1, "folds": 5, "seed": 1, "study-id": f"{STUDY}/final", **STD, "beta": beta})
    assert rule_of(reply) == "min-cell-size" and "Hessian" in reply.error.reason


# ---- 5. hostile request sequences (property-based) -----------------------------------------------
_cohort_counter = itertools.count()


def _request(draw):
    kind = draw(st.sampled_from(["info", "sums", "stats", "eval", "summary"]))
    folds = draw(st.integers(2, 6))
    fold = draw(st.integers(-1, folds - 1))
    study = draw(st.sampled_from(["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"]))
    tag = "final" if fold < 0 else "cv"
    seed = draw(st.integers(0, 3))
    beta = draw(st.lists(st.floats(-3, 3), min_size=8, max_size=8))
    if kind == "info":
        return "query.info", {}
    if kind == "sums":
        return "query.clinical_sums", {"fold": fold, "folds": folds, "seed": seed, "study-id": f"{study}/{tag}"}
    if kind == "stats":
        return "query.logistic_stats", {"fold": fold, "folds": folds, "seed": seed, "study-id": f"{study}/{tag}",
                                        **STD, "beta": beta}
    if kind == "eval":
        part = draw(st.sampled_from(["val", "all"])) if fold >= 0 else "all"
        return "evaluate", {"fold": fold, "folds": folds, "seed": seed, "study-id": f"{study}/{tag}", "model": "cf",
                            "part": part, "store": draw(st.booleans()), "round": draw(st.integers(0, 2)),
                            "num-rounds": 2, **STD, "beta": beta}
    return "query.summary", {"study-id": f"{study}/{tag}", "models": "cf", "kind": "final" if fold < 0 else "oof",
                             "folds": folds}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(n=st.integers(24, 70), prevalence=st.floats(0.2, 0.6), k=st.integers(3, 12), data=st.data())
def test_random_hostile_request_sequences_never_release_a_group_below_k(tmp_path_factory, n, prevalence, k, data):
    root = tmp_path_factory.mktemp(f"hostile{next(_cohort_counter)}")
    make_cache(root / "c", n, seed=n, site_name="h", shape=SHAPE, prevalence=prevalence)
    node = {"cache-dir": str(root / "c"), "site-name": "h", "min-cell-size": k}
    for _ in range(data.draw(st.integers(3, 12))):
        mtype, cfg = _request(data.draw)
        reply = ask_site(client_app, node, mtype, cfg)
        if reply.has_error():
            assert reply.error.code in (SITE_REFUSED, SITE_CANNOT), reply.error.reason
            assert not reply.has_content()  # a refused request carries no data
            continue
        m = dict(reply.content["metrics"])
        for key, value in m.items():
            if key.endswith(("cell-neg", "cell-pos")):
                v = np.asarray(value)
                assert np.all((v == 0) | (v >= k)), (key, value)
        if mtype != "query.info":
            assert m["num-examples"] >= 2 * k or m["num-examples"] == -1
    parts = ledger(node)["partitions"]
    for p in parts:
        assert all(len(members) >= k for members in p.values())
    for a, b in itertools.combinations(parts, 2):
        for cls in a:
            diff = len(set(a[cls]) ^ set(b.get(cls, [])))
            assert diff == 0 or diff >= k, (cls, diff)
    shutil.rmtree(root)


def test_a_degenerate_delong_test_is_n_a_with_its_reason_not_a_failed_site(tmp_path):
    """Combined = a constant score, CF = perfect: the paired DeLong test is undefined; the summary
    still answers, with the test as NaN and the reason in its notes."""
    from client import study
    from client.disclosure import validate_request
    from common.config import load_config

    make_cache(tmp_path / "site", 40, seed=2, site_name="h", shape=SHAPE, prevalence=0.5)
    node = {"cache-dir": str(tmp_path / "site"), "site-name": "h", "min-cell-size": 3}
    site = study.Site.open(load_config(node_config=node))
    y = site.data.labels
    sid = f"{STUDY}/final"
    site.store_predictions(sid, "cf", -1, "all", site.data.keys, y, np.where(y == 1, 0.9, 0.1))
    site.store_predictions(sid, "combined", -1, "all", site.data.keys, y, np.full(len(y), 0.3))
    req = validate_request("query.summary", {"study-id": sid, "models": "cf,combined", "kind": "final", "folds": 5}, 7)
    gate = site.gate()
    out, notes = gate.answer("query.summary", lambda: study.summary(site, gate, req))
    assert np.isnan(out["delong.combined-vs-cf.p"]) and "zero variance" in notes["delong.combined-vs-cf"]
    assert out["cf.auc"] == 1.0 and out["combined.auc"] == 0.5


def test_refusals_do_not_tell_the_new_patients_label(tmp_path):
    """Differencing the refusals themselves: two copies of a site, each enrols one patient, one with
    SLM and one without. Every reply the coordinator gets must be the same for both."""
    replies = []
    for label in (0, 1):
        root = tmp_path / f"label{label}"
        make_cache(root / "site", 40, seed=7, site_name="h", shape=SHAPE, prevalence=0.45)
        node = {"cache-dir": str(root / "site"), "site-name": "h"}
        sums = {"fold": -1, "folds": 5, "seed": 1}
        metrics(ask_site(client_app, node, "query.clinical_sums", {**sums, "study-id": "aaaaaaaaaaaa/final"}))
        _enrol(root / "site", 1, seed=1, label=label)
        got = [ask_site(client_app, node, "query.info", {})]
        got += [ask_site(client_app, node, "query.clinical_sums", {**sums, "fold": f, "study-id": f"bbbbbbbbbbbb/{t}"})
                for f, t in ((-1, "final"), (0, "cv"), (1, "cv"))]
        replies.append([(r.error.reason if r.has_error() else (dict(r.content["metrics"]), dict(r.content.get("notes", {}))))
                        for r in got])
    assert replies[0] == replies[1]
    assert all("patient(s)" not in str(r) for r in replies[0])


# ---- 6. the training path and the lifetime caps ----------------------------------------------------
def _train_request(study=f"{STUDY}/final", fold=-1, rnd=1):
    from common.config import SENT_MODEL_KEYS

    cfg = load_config(run_config={"augment": False, "local-epochs": 1, "batch-size": 10, "clinical-embed-dim": 4})
    return {"fold": fold, "folds": 5, "seed": 1, "study-id": study, "model": "dl", "round": rnd, "num-rounds": 2,
            **STD, **{k: cfg[k] for k in SENT_MODEL_KEYS}}


def _weights(scale: float = 1.0, bad_shape: bool = False):
    import torch
    from flwr.app import ArrayRecord

    from common.model import build_model

    torch.manual_seed(0)
    cfg = load_config(run_config={"clinical-embed-dim": 4})
    state = build_model(cfg, 3, 2, 7, use_clinical=False).state_dict()
    if bad_shape:
        key = next(k for k, v in state.items() if v.ndim > 1)
        state[key] = torch.zeros(tuple(s + 1 for s in state[key].shape))
    return ArrayRecord({k: (v * scale if v.is_floating_point() else v) for k, v in state.items()})


def test_training_replies_are_gated_like_every_statistic(tmp_path):
    """Weights trained on a group are a statistic of that group: a fold that differences against the
    released cohort is refused, weights of another shape or non-finite weights are refused before
    training, and a second training of the same round with other weights is refused."""
    make_cache(tmp_path / "site", 31, seed=5, site_name="small", shape=(3, 40, 40))
    node = {"cache-dir": str(tmp_path / "site"), "site-name": "small"}
    first = ask_site(client_app, node, "train", _train_request(), arrays=_weights())
    assert metrics(first)["num-examples"] == 31 and "arrays" in first.content
    # the same round again with other weights: a second look at the same group
    assert rule_of(ask_site(client_app, node, "train", _train_request(), arrays=_weights(scale=2.0))) == "query-budget"
    # all patients minus fold 0 (6 or so patients) is the released cohort minus a small group
    fold = ask_site(client_app, node, "train", _train_request(study=f"{STUDY}/cv", fold=0), arrays=_weights())
    assert rule_of(fold) == "no-differencing"
    bad = ask_site(client_app, node, "train", _train_request(rnd=2), arrays=_weights(bad_shape=True))
    assert rule_of(bad) == "model-weights"
    nan = ask_site(client_app, node, "train", _train_request(rnd=2), arrays=_weights(scale=float("nan")))
    assert rule_of(nan) == "model-weights"


def test_lifetime_caps_on_groups_and_studies(tmp_path):
    make_cache(tmp_path / "site", 120, seed=8, site_name="h", shape=SHAPE, prevalence=0.5)
    node = {"cache-dir": str(tmp_path / "site"), "site-name": "h", "min-cell-size": 5, "max-partitions": 3,
            "max-studies": 2}
    sums = lambda fold, study: {"fold": fold, "folds": 2, "seed": 1, "study-id": f"{study}/{'cv' if fold >= 0 else 'final'}"}  # noqa: E731
    assert metrics(ask_site(client_app, node, "query.clinical_sums", sums(-1, "aaaaaaaaaaaa")))  # group 1: all
    assert metrics(ask_site(client_app, node, "query.clinical_sums", sums(0, "aaaaaaaaaaaa")))   # group 2
    assert metrics(ask_site(client_app, node, "query.clinical_sums", sums(1, "aaaaaaaaaaaa")))   # group 3
    # a fourth group (other folds) exceeds max-partitions; a known group in a new study is still fine
    fourth = ask_site(client_app, node, "query.clinical_sums", {**sums(0, "aaaaaaaaaaaa"), "folds": 3})
    assert rule_of(fourth) == "max-partitions"
    assert metrics(ask_site(client_app, node, "query.clinical_sums", sums(-1, "bbbbbbbbbbbb")))
    # a third study exceeds max-studies, whatever it asks
    assert rule_of(ask_site(client_app, node, "query.clinical_sums", sums(-1, "cccccccccccc"))) == "max-studies"


def test_cf_statistics_are_answered_at_most_200_times_per_fit(small_site):
    from client.disclosure import LOGISTIC_QUERIES

    base = {"fold": -1, "folds": 5, "seed": 1, "study-id": f"{STUDY}/final", **STD}
    for i in range(LOGISTIC_QUERIES):
        beta = [0.0] * 7 + [i / 1000.0]
        metrics(ask_site(client_app, small_site, "query.logistic_stats", {**base, "beta": beta}))
    over = ask_site(client_app, small_site, "query.logistic_stats", {**base, "beta": [0.0] * 7 + [0.5]})
    assert rule_of(over) == "query-budget"
    # the same step again (a retried message) is still answered: nothing new leaves
    assert metrics(ask_site(client_app, small_site, "query.logistic_stats", {**base, "beta": [0.0] * 8}))


def test_prediction_paths_stay_in_the_study_folder_even_past_validation(tmp_path):
    from client import study

    make_cache(tmp_path / "site", 20, seed=1, site_name="h", shape=SHAPE)
    site = study.Site.open(load_config(node_config={"cache-dir": str(tmp_path / "site")}))
    for sid, model, part in (("../../x", "cf", "all"), (f"{STUDY}/final", "../cf", "all"), (f"{STUDY}/final", "cf", "../x")):
        with pytest.raises(study.StudyError, match="outside"):
            site.store_predictions(sid, model, -1, part, site.data.keys, site.data.labels, np.zeros(20))
    assert not list(tmp_path.parent.glob("x*")) and not (tmp_path / "x").exists()
