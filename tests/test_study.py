"""The federated study protocol end to end on in-process sites (no Ray): fast and inspectable."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from client.app import app as client_app
from common.config import load_config
from server.checkpoint import Checkpoint, StudyInterrupted
from server.protocol import Federation, Study
from server.report import write_run_folder
from tests.fedtools import LocalGrid, make_cache

TINY = {"folds": 2, "num-rounds": 2, "local-epochs": 1, "batch-size": 8, "backbone": "resnet10",
        "clinical-embed-dim": 4, "augment": False, "seed": 3, "cf-l2": 0.1, "site-timeout-s": 5.0, "ensemble-size": 1}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    ids = {}
    ids["center-primary"] = make_cache(root / "primary", 36, seed=1, site_name="center-primary")
    ids["center-external"] = make_cache(root / "external", 14, seed=2, site_name="center-external")
    # tiny test cohorts: the sites' own policy lowers k to its floor (the default 10 needs bigger folds)
    nodes = [{"cache-dir": str(root / "primary"), "site-name": "center-primary", "min-cell-size": 3},
             {"cache-dir": str(root / "external"), "site-name": "center-external", "min-cell-size": 3}]
    return nodes, ids


def run(nodes, run_dir, **overrides):
    cfg = load_config(run_config={**TINY, "run-dir": str(run_dir), **overrides})
    grid = LocalGrid(client_app, nodes)
    study = Study(Federation(grid, min_sites=2, timeout_s=5), cfg, Checkpoint(run_dir))
    state = study.run()
    return grid, state, write_run_folder(run_dir, state, cfg), cfg


@pytest.fixture(scope="module")
def paper_run(caches, tmp_path_factory):
    nodes, ids = caches
    return run(nodes, tmp_path_factory.mktemp("run") / "paper")


def test_paper_scenario_reports_three_models_in_both_cohorts(paper_run):
    _, state, res, _ = paper_run
    cohorts = {(r["model"], r["cohort"]) for r in res["rows"]}
    for m in ("cf", "dl", "combined"):
        assert (m, "center-primary: 2-fold CV") in cohorts
        assert (m, "center-external: external validation") in cohorts
    primary = [r for r in res["rows"] if r["site"] == "center-primary"]
    assert all(r["n"] == 36 for r in primary)  # out-of-fold predictions cover every patient once
    cf = next(r for r in primary if r["model"] == "cf")
    assert cf["auc"] > 0.75  # the markers carry a strong signal in this fixture
    assert cf["auc_ci_low"] < cf["auc"] < cf["auc_ci_high"]
    assert {d["comparison"] for d in res["delong"]} == {"combined vs cf", "combined vs dl"}
    assert res["cf_model"]["final"][0]["term"] == "intercept"


def test_run_folder_files_and_report_numbers_equal_results(paper_run, tmp_path):
    _, _, res, cfg = paper_run
    run_dir = __import__("pathlib").Path(cfg["run-dir"])
    for name in ("results.json", "report.md", "learning-curves.png", "models/MODEL_CARD.md",
                 "models/final-dl.npz", "models/final-combined.npz"):
        assert (run_dir / name).is_file(), name
    assert len(list(run_dir.glob("roc-*.png"))) == 2 and len(list(run_dir.glob("dca-*.png"))) == 2
    on_disk = json.loads((run_dir / "results.json").read_text())
    report = (run_dir / "report.md").read_text()
    for r in on_disk["rows"]:
        label = {"cf": "CF model", "dl": "MRI DL model", "combined": "Combined DL model"}[r["model"]]
        line = next(l for l in report.splitlines() if l.startswith(f"| {label} | {r['cohort']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        auc, lo, hi = map(float, re.match(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", cells[3]).groups())
        assert (auc, lo, hi) == tuple(round(r[k], 3) for k in ("auc", "auc_ci_low", "auc_ci_high"))
        star = "*" if r["operating_point_interpolated"] else ""  # read off a cell that holds the threshold
        assert cells[5] == f"{r['sensitivity']:.3f}{star}" and cells[6] == f"{r['specificity']:.3f}{star}"
        # the calibration table: results.json's exact calibration statistics (n/a where a fit does not exist)
        calib = [l for l in report.splitlines() if l.startswith(f"| {label} | {r['cohort']} |")][1]
        fmt = lambda v, nd: "n/a" if v is None else f"{v:.{nd}f}"  # noqa: E731
        assert [c.strip() for c in calib.strip("|").split("|")][2:] == [
            fmt(r["calib_intercept"], 3), fmt(r["calib_slope"], 3), fmt(r["hl_stat"], 2), fmt(r["hl_p"], 4)]
    # the privacy section lists each site's compute caps as that site reported them in its policy
    for name, site in on_disk["sites"].items():
        pol = site["policy"]
        line = next(l for l in report.splitlines() if l.startswith(f"| {name} | {pol['allowed-backbones']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4:] == [str(pol["max-epoch-patients"]), f"{pol['max-reply-mb']:g}", str(pol["max-rounds"]),
                             str(pol["min-batch-size"] or pol["min-cell-size"]), str(pol["max-fits-per-study"]),
                             f"{pol['max-evaluations-per-study']} / {pol['max-evaluations']}"]


def test_no_reply_carries_patient_level_data(paper_run, caches):
    grid, _, _, _ = paper_run
    _, ids = caches
    n_sites = {36, 14}
    allowed_lists = {"sum", "sumsq", "grad", "hess", "cell-edges", "cell-neg", "cell-pos", "calib-mean-pred",
                     "image-shape", "channels", "clinical-features"}  # the last two: model-input settings (names)
    raw_ids = {i for v in ids.values() for i in v}
    for mtype, reply in grid.replies:
        for rname, record in reply.content.items():
            if rname == "arrays":
                assert mtype == "train"  # only training replies carry arrays: the model weights
                continue
            for key, value in record.items():
                assert not any(pid in str(value) for pid in list(raw_ids)[:5])
                if isinstance(value, list):
                    assert key.split(".")[-1] in allowed_lists, (mtype, key)
                    assert len(value) not in n_sites, (mtype, key, len(value))
    # and the ArrayRecords of training replies hold exactly the model's parameters
    from common.model import build_model
    cfg = load_config(run_config=TINY)
    expected = [{k: tuple(v.shape) for k, v in build_model(cfg, 3, 2, 7, use_clinical=c).state_dict().items()}
                for c in (False, True)]
    train_replies = [r for t, r in grid.replies if t == "train"]
    assert train_replies
    for r in train_replies:
        shapes = {k: tuple(a.shape) for k, a in r.content["arrays"].items()}
        assert shapes in expected


def test_resume_after_interruption_reproduces_the_uninterrupted_run(caches, paper_run, tmp_path):
    nodes, _ = caches
    _, _, full, _ = paper_run
    run_dir = tmp_path / "interrupted"
    with pytest.raises(StudyInterrupted):
        run(nodes, run_dir, **{"stop-after-rounds": 3})
    assert (run_dir / "checkpoint" / "state.json").is_file() and not (run_dir / "results.json").exists()
    _, _, resumed, _ = run(nodes, run_dir, resume=True)
    strip = lambda rows: [{k: v for k, v in r.items()} for r in rows]  # noqa: E731
    assert strip(resumed["rows"]) == strip(full["rows"])


@pytest.fixture(scope="module")
def two_training_sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedsites")
    make_cache(root / "a", 30, seed=11, site_name="hospital-a", prevalence=0.5)
    make_cache(root / "b", 20, seed=12, site_name="hospital-b", prevalence=0.3)
    return [{"cache-dir": str(root / "a"), "site-name": "hospital-a", "min-cell-size": 3},
            {"cache-dir": str(root / "b"), "site-name": "hospital-b", "min-cell-size": 3}]


def test_federated_logistic_regression_equals_the_pooled_fit(two_training_sites, tmp_path):
    from client.study import Site
    from common.clinical import standardise
    from common.logistic import LogisticCF

    _, state, _, cfg = run(two_training_sites, tmp_path / "cf", scenario="federated", models="cf")
    # pool the fold-0 training patients of both sites by hand and fit centrally
    parts = [Site.open({**cfg, **n}).partition(0, "train", cfg["folds"], cfg["seed"]) for n in two_training_sites]
    x = np.concatenate([p.clinical for p in parts]).astype(np.float64)
    y = np.concatenate([p.labels for p in parts])
    mean, std = x.mean(0), x.std(0, ddof=1)
    pooled = LogisticCF(l2=cfg["cf-l2"]).fit(standardise(x, mean, std), y)
    fed = state["cf"]["cv/0"]
    np.testing.assert_allclose(fed["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(fed["beta"], pooled.coef_, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fed["cov"]), pooled.cov_, rtol=1e-5, atol=1e-8)


def test_fedavg_of_two_sites_is_the_example_weighted_mean(two_training_sites, tmp_path):
    run_dir = tmp_path / "fedavg"
    cfg = load_config(run_config={**TINY, "run-dir": str(run_dir), "scenario": "federated", "models": "dl",
                                  "stop-after-rounds": 1, "swa-rounds": 0})  # the checkpoint: this round's FedAvg
    grid = LocalGrid(client_app, two_training_sites)
    with pytest.raises(StudyInterrupted):
        Study(Federation(grid, min_sites=2, timeout_s=5), cfg, Checkpoint(run_dir)).run()
    replies = [r.content for t, r in grid.replies if t == "train"]
    assert len(replies) == 2
    n = [int(r["metrics"]["num-examples"]) for r in replies]
    assert n == [15, 10]  # fold-0 training halves of 30 and 20 patients
    agg = Checkpoint(run_dir).load_arrays()
    for key in agg:
        if key.endswith("num_batches_tracked"):
            continue
        expected = sum(w * r["arrays"][key].numpy() for w, r in zip(n, replies)) / sum(n)
        np.testing.assert_allclose(agg[key].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_multisite_compares_federated_site_alone_and_centralized(two_training_sites, tmp_path):
    from server.protocol import CENTRAL_SITE
    from simulation.runner import pooled_cache

    root = tmp_path / "third"
    make_cache(root, 24, seed=13, site_name="hospital-c", prevalence=0.4)
    nodes = two_training_sites + [{"cache-dir": str(root), "site-name": "hospital-c", "min-cell-size": 3}]
    nodes.append({**pooled_cache(nodes, tmp_path / "pooled", CENTRAL_SITE), "min-cell-size": 3})
    _, _, res, _ = run(nodes, tmp_path / "multi", scenario="multisite", models="cf")
    cohorts = {r["cohort"]: r for r in res["rows"]}
    for h, n in (("hospital-a", 30), ("hospital-b", 20), ("hospital-c", 24)):
        assert cohorts[f"{h}: 2-fold CV"]["n"] == n                      # federated CV
        assert cohorts[f"{h}: site alone, 2-fold CV"]["n"] == n          # each site alone
        assert cohorts[f"{h}: leave-center-out"]["n"] == n               # trained on the others
    assert cohorts["all hospitals pooled centrally: 2-fold CV"]["n"] == 74
    assert res["pooled"][0]["n"] == 74  # federated CV pooled over the hospitals by histograms


def test_sites_can_withhold_score_histograms(caches, tmp_path):
    nodes, _ = caches
    nodes = [{**n, "share-histograms": False} for n in nodes]
    grid, _, res, _ = run(nodes, tmp_path / "nohist", models="cf")
    keys = {k for _, reply in grid.replies if reply.has_content() for k in reply.content["metrics"]}
    assert "cf.auc" in keys and not [k for k in keys if "cell" in k or "calib-mean" in k]
    assert res["rows"] and all(r["sensitivity"] is None for r in res["rows"])  # no cells, no operating point
    assert not list((tmp_path / "nohist").glob("roc-*.png")) and not list((tmp_path / "nohist").glob("dca-*.png"))


def test_folds_and_patient_order_do_not_depend_on_the_cache_salt(tmp_path):
    from client.study import Site

    sites = []
    for salt in ("one-salt", "another-salt"):
        make_cache(tmp_path / salt, 30, seed=5, site_name="x", salt=salt)
        sites.append(Site.open(load_config(node_config={"cache-dir": str(tmp_path / salt)})))
    a, b = sites
    assert a.data.keys != b.data.keys  # different salted keys ...
    np.testing.assert_array_equal(a.data.images, b.data.images)  # ... same patient order
    np.testing.assert_array_equal(a.fold_ids(3, 7), b.fold_ids(3, 7))


def test_a_cf_fit_that_does_not_exist_is_reported_and_the_study_goes_on(tmp_path):
    """A small site alone whose CEA separates SLM completely (and whose other features are constant):
    its site-alone CF fit has no maximum-likelihood estimate. The study reports it and goes on."""
    from client.cache import atomic_write_json, load_cache, write_patient
    from common.clinical import encode_row

    root = tmp_path / "separated"
    make_cache(root, 24, seed=13, site_name="hospital-c", prevalence=0.5)
    manifest = json.loads((root / "manifest.json").read_text())
    data = load_cache(root)
    for i, key in enumerate(data.keys):
        y = int(data.labels[i])
        sha = write_patient(root, key, data.images[i], encode_row("M", "low", 50.0 if y else 1.0, 10.0), y)
        manifest["patients"][key]["sha256"] = sha
    atomic_write_json(root / "manifest.json", manifest)
    nodes = [{"cache-dir": str(root), "site-name": "hospital-c", "min-cell-size": 3}]
    for name, n, seed in (("hospital-a", 80, 21), ("hospital-b", 60, 22)):
        make_cache(tmp_path / name, n, seed=seed, site_name=name, prevalence=0.4)
        nodes.append({"cache-dir": str(tmp_path / name), "site-name": name, "min-cell-size": 3})
    _, state, res, _ = run(nodes, tmp_path / "multi", scenario="multisite", models="cf", **{"cf-l2": 0.0})
    na = [e for e in state["sat_out"] if e["tag"] == "local-hospital-c" and e["step"] == "CF model"]
    assert na and all(e["reason"].startswith("not computable: ") for e in na)
    cohorts = {r["cohort"] for r in res["rows"]}
    assert "hospital-c: site alone, 2-fold CV" not in cohorts  # n/a, not a made-up number
    assert "hospital-c: 2-fold CV" in cohorts and "hospital-a: leave-center-out" in cohorts  # the rest stands


def test_the_combined_model_is_the_dl_logit_plus_the_cf_logit_for_every_patient(tmp_path):
    """combined-from dl+cf (the default): every stored Combined prediction, in every CV fold and at the
    external site, is sigmoid(logit DL + logit CF) of the same fit; the DL model pools inside the ROI and,
    with ensemble-size 2, is two networks whose mean logit that is (the Combined one member-wise too).
    With roi-stats, each network's ROI statistics are standardised by the pooled mean / SD of the
    training patients' statistics, computed by the coordinator from the site's sums."""
    from client.cache import load_cache
    from client.train import roi_statistics
    from common.model import build_model

    root = tmp_path / "sites"
    make_cache(root / "primary", 36, seed=1, site_name="center-primary", mask_channel=True)
    make_cache(root / "external", 14, seed=2, site_name="center-external", mask_channel=True)
    nodes = [{"cache-dir": str(root / "primary"), "site-name": "center-primary", "min-cell-size": 3,
              "study-dir": str(tmp_path / "primary-study")},
             {"cache-dir": str(root / "external"), "site-name": "center-external", "min-cell-size": 3,
              "study-dir": str(tmp_path / "external-study")}]
    grid, state, res, cfg = run(nodes, tmp_path / "run", **{"widen-factor": 0.25, "ensemble-size": 2, "roi-stats": True})
    assert cfg["combined-from"] == "dl+cf" and cfg["roi-pooling"] and cfg["roi-stats"]
    assert not any(m.content["config"]["model"] == "combined" for m in grid.sent if m.metadata.message_type == "train")
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    checked = 0
    for study in (tmp_path / "primary-study", tmp_path / "external-study"):
        for comb in sorted(study.glob("*/*/combined/*.npz")):
            parts = {m: np.load(comb.parent.parent / m / comb.name) for m in ("cf", "dl", "combined")}
            assert all(np.array_equal(parts[m]["keys"], parts["combined"]["keys"]) for m in ("cf", "dl"))
            np.testing.assert_allclose(logit(parts["combined"]["probs"]),
                                       logit(parts["dl"]["probs"]) + logit(parts["cf"]["probs"]),
                                       rtol=1e-3, atol=1e-4)  # probabilities come from a float32 sigmoid
            checked += 1
    assert checked == 3  # 2 CV folds' held-out patients + the external site
    weights = np.load(tmp_path / "run" / "models" / "final-dl.npz")
    plain = build_model({**cfg, "roi-pooling": False, "ensemble-size": 1}, 4, 2, 7, use_clinical=False).state_dict()
    roi_keys = ("roi_stats_mean", "roi_stats_std", "roi_stats_linear.weight", "roi_stats_linear.bias")
    assert {k.split(".")[1] for k in weights.files} == {"0", "1"} and len(weights.files) == 2 * (len(plain) + len(roi_keys))
    # + the ROI means of two stages + the 6 ROI statistics
    assert weights["members.1.head.0.weight"].shape[1] == plain["head.0.weight"].shape[1] + (32 + 64) + 6
    assert not np.array_equal(weights["members.0.head.0.weight"], weights["members.1.head.0.weight"])
    stats = roi_statistics(load_cache(root / "primary"))  # the final fit trains on all primary patients
    assert stats.shape == (36, 6)
    for i in (0, 1):
        np.testing.assert_allclose(weights[f"members.{i}.roi_stats_mean"], stats.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(weights[f"members.{i}.roi_stats_std"], stats.std(axis=0, ddof=1), rtol=1e-5)
    assert np.abs(weights["members.0.roi_stats_linear.weight"]).sum() > 0  # trained from its zero start


def test_a_combined_model_made_of_dl_and_cf_needs_both_in_the_study(caches, tmp_path):
    from server.protocol import StudyError

    with pytest.raises(StudyError, match="combined-from = dl\\+cf .* lacks dl"):
        run(caches[0], tmp_path / "run", models="cf,combined")


def test_weight_averaging_is_the_mean_of_the_last_rounds_and_survives_a_resume(caches, tmp_path, monkeypatch):
    """swa-rounds 2: each DL fit's model is the mean of its last 2 rounds' global weights (recorded here
    as the protocol aggregates them); a study interrupted between those rounds resumes to the same model."""
    import server.protocol as P
    from common.records import arrays_to_numpy

    seen = []
    real = P.aggregate
    monkeypatch.setattr(P, "aggregate", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    nodes = caches[0]
    over = {"num-rounds": 3, "swa-rounds": 2, "models": "dl"}
    run(nodes, tmp_path / "full", **over)
    last = [arrays_to_numpy(r) for r in seen[-2:]]  # the final fit's rounds 2 and 3
    model = np.load(tmp_path / "full" / "models" / "final-dl.npz")
    for k in model.files:
        np.testing.assert_allclose(model[k], ((last[0][k].astype(np.float64) + last[1][k]) / 2).astype(model[k].dtype),
                                   rtol=1e-6, atol=1e-7)
    assert not np.allclose(model["head.0.weight"], last[1]["head.0.weight"])  # not just the last round
    # interrupted after round 2 of the final fit (2 CV folds x 3 rounds before it), between the two
    # averaged rounds, then resumed: the running sum comes back from the checkpoint
    with pytest.raises(StudyInterrupted):
        run([{**n, "study-dir": str(tmp_path / f"s{i}")} for i, n in enumerate(nodes)], tmp_path / "cut",
            **over, **{"stop-after-rounds": 8})
    run([{**n, "study-dir": str(tmp_path / f"s{i}")} for i, n in enumerate(nodes)], tmp_path / "cut", **over, resume=True)
    again = np.load(tmp_path / "cut" / "models" / "final-dl.npz")
    for k in model.files:
        np.testing.assert_array_equal(again[k], model[k])


def test_the_roi_standardisation_after_aggregation_is_the_coordinators_not_a_sites():
    """A site that sends back other standardisation buffers (to skew every site's ROI statistics) does
    not change the global model's: after each aggregation they are the pooled values again."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord

    from common.model import build_model
    from server.protocol import Fit

    cfg = load_config(run_config={**TINY, "widen-factor": 0.25, "ensemble-size": 2, "roi-stats": True})
    net = build_model(cfg, 4, 2, 7, use_clinical=False, channels=["t2", "dwi", "adc", "mask"])
    pooled = (np.linspace(0.1, 0.6, 6), np.linspace(0.01, 0.06, 6))
    net.set_roi_standardisation(*pooled)
    tampered = {k: v.clone() for k, v in net.state_dict().items()}
    for k in tampered:
        if k.endswith("roi_stats_std"):
            tampered[k] *= 1000.0
    study = SimpleNamespace(roi_standardisation={"final/-1": pooled})
    out = Study._keep_roi_standardisation(study, ArrayRecord(tampered), Fit("final", -1, ["a"])).to_torch_state_dict()
    for k, v in out.items():
        expected = net.state_dict()[k] if "roi_stats_" in k and "linear" not in k else tampered[k]
        torch.testing.assert_close(v, expected)
    assert list(out) == list(tampered)  # same keys, same order (the arrays Flower ships)


def test_standardisation_sums_the_coordinator_cannot_pool_are_named_and_left_out():
    """A site whose sums are not finite or of the wrong length (a bug, or an attempt to skew every
    site's standardisation) is left out of the fit like an absent site, with the reason."""
    from flwr.app import MetricRecord, RecordDict

    from server.protocol import Replies, _malformed_sums

    def reply(**m):
        return RecordDict({"metrics": MetricRecord(m)})

    good = dict(sum=[0.0] * 7, sumsq=[1.0] * 7, **{"roi-sum": [0.5] * 6, "roi-sumsq": [0.3] * 6})
    replies = Replies({"ok": reply(**{"num-examples": 30, **good}),
                       "no-roi": reply(**{"num-examples": 30, "sum": [0.0] * 7, "sumsq": [1.0] * 7}),
                       "nan": reply(**{"num-examples": 30, **good, "roi-sum": [float("nan")] + [0.5] * 5}),
                       "short": reply(**{"num-examples": 30, **good, "roi-sumsq": [0.3] * 5}),
                       "clinical": reply(**{"num-examples": 30, **good, "sum": [0.0] * 8}),
                       "count": reply(**{"num-examples": 0, **good})})
    bad = _malformed_sums(replies, n_features=7, n_roi_stats=6)
    assert set(bad) == {"nan", "short", "clinical", "count"}
    assert "roi-sum" in bad["nan"] and "roi-sumsq" in bad["short"] and "expected 7" in bad["clinical"]


def test_the_terminal_table_marks_interpolated_operating_points_as_the_report_does():
    from server.report import format_table

    row = {"model": "dl", "cohort": "x: external validation", "site": "x", "auc": 0.9, "auc_ci_low": 0.8,
           "auc_ci_high": 1.0, "sensitivity": 0.67, "specificity": 0.33}
    exact = format_table({"rows": [{**row, "operating_point_interpolated": False}]})
    split = format_table({"rows": [{**row, "operating_point_interpolated": True}]})
    assert "0.670 " in exact and "*" not in exact
    assert "0.670*" in split and "0.330*" in split and "split in proportion to its width" in split


def test_a_smoke_run_is_labelled_as_one_in_report_md(paper_run):
    from server.report import render_report

    _, _, res, _ = paper_run
    assert res["config"]["smoke-run"] is False and "Smoke run" not in render_report(res)
    smoke = render_report({**res, "config": {**res["config"], "smoke-run": True}})
    assert "**Smoke run** (`slmfed simulate --quick`" in smoke and "they are not the study's result" in smoke
