"""Model verification (client/verify.py), tested as a malicious coordinator would attack it.

The site here is a real prepared cache of 28 patients (k = 10) whose node config enforces model
verification with its own key and a peer roster of two sites. The test plays the coordinator: it
asks for signed contributions, builds the honest derivations with common/derive.py and then sends
crafted weights, coefficients and evidence. Each attack is refused as `unverified-model` before the
site opens its cache; each has an honest counterpart that is answered (so the check can fail).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

import client.study
from client.app import app as client_app
from common import derive
from common.config import SENT_MODEL_KEYS, load_config
from common.signing import canonical, new_key, simulation_key
from server.protocol import with_evidence
from tests.fedtools import ask_site, make_cache
from tests.test_disclosure import metrics, rule_of

STUDY = "feedfacecafe"
SHAPE = (3, 40, 40)
ROSTER = "simulation:site-a,site-b"


def node(cache, name="site-a", **extra):
    return {"cache-dir": str(cache), "site-name": name, "model-verification": "enforce",
            "signing-key": f"simulation:{name}", "peer-roster": ROSTER, **extra}


@pytest.fixture
def sites(tmp_path):
    root = tmp_path
    labels = [0, 1] * 14
    make_cache(root / "a", 28, seed=11, site_name="site-a", shape=SHAPE, labels=labels, mask_channel=True)
    make_cache(root / "b", 28, seed=12, site_name="site-b", shape=SHAPE, labels=labels, mask_channel=True)
    return {"site-a": node(root / "a"), "site-b": node(root / "b", "site-b")}


def model_keys(**settings):
    cfg = load_config(run_config={"augment": False, "local-epochs": 1, "batch-size": 10, "clinical-embed-dim": 4,
                                  "ensemble-size": 1, "widen-factor": 0.125, **settings})
    return {k: cfg[k] for k in SENT_MODEL_KEYS}


SHAPE_INFO = {"n-channels": 4, "spatial-dims": 2, "n-features": 7, "channels": ["t2", "dwi", "adc", "mask"]}


def base(study=f"{STUDY}/final", fold=-1):
    return {"fold": fold, "folds": 5, "seed": 1, "study-id": study}


def signed(reply) -> dict:
    rec = reply.content["signed"]
    return {"statement": str(rec["statement"]), "signature": rec["signature"]}


class Coordinator:
    """The honest derivations a coordinator can make from the sites' signed replies."""

    def __init__(self, sites, study=f"{STUDY}/final", names=("site-a",)):
        self.sites, self.study, self.names = sites, study, list(names)
        replies = [ask_site(client_app, sites[n], "query.clinical_sums", base(study)) for n in self.names]
        self.sums = [signed(r) for r in replies]
        mean, std, self.roi = derive.pool_sums([metrics(r) for r in replies])
        self.std = {"clinical-mean": mean.tolist(), "clinical-std": std.tolist()}

    def init(self, model="dl", **settings):
        keys = model_keys(**settings)
        return derive.initial_state(keys, 7, model, SHAPE_INFO, None, self.roi), {
            "kind": "init", "seed": 7, "model": model, "beta": None}

    def train(self, site, arrays, recipe, rnd=1, model="dl", **settings):
        req = {**base(self.study), **self.std, **model_keys(**settings), "model": model, "round": rnd, "num-rounds": 3}
        return ask_site(client_app, self.sites[site], "train", req, arrays=arrays,
                        records=with_evidence({"std": self.sums, "model": recipe}))

    def evaluate(self, site, arrays, recipe, model="dl", **settings):
        req = {**base(self.study), **self.std, **model_keys(**settings), "model": model, "round": 0, "num-rounds": 3,
               "part": "all", "store": True}
        return ask_site(client_app, self.sites[site], "evaluate", req, arrays=arrays,
                        records=with_evidence({"std": self.sums, "model": recipe}))

    def stats(self, site, beta, proof):
        return ask_site(client_app, self.sites[site], "query.logistic_stats",
                        {**base(self.study), **self.std, "beta": list(map(float, beta))},
                        records=with_evidence({"std": self.sums, "beta": proof}))

    def cf_evaluate(self, site, beta, proof):
        req = {**base(self.study), **self.std, "model": "cf", "round": 0, "num-rounds": 1, "part": "all", "store": True,
               "beta": list(map(float, beta))}
        return ask_site(client_app, self.sites[site], "evaluate", req, records=with_evidence({"std": self.sums,
                                                                                               "beta": proof}))


@pytest.fixture
def opened(monkeypatch):
    """The site caches opened (a refusal must come before any patient is read)."""
    calls = []
    real = client.study._cached_site_data
    monkeypatch.setattr(client.study, "_cached_site_data", lambda path: calls.append(path) or real(path))
    return calls


def refused_unread(reply, opened) -> bool:
    return rule_of(reply) == "unverified-model" and not opened


def _crafted(arrays: ArrayRecord, target: str) -> ArrayRecord:
    """An interval probe: the head's first hidden unit made a steep ReLU step of one input (a clinical
    value's embedding, or an ROI statistic), the output reading only that unit."""
    state = arrays.to_torch_state_dict()
    keys = [k for k in state if target in k and k.endswith("weight")]
    assert keys, f"no {target} weights in {sorted(state)[:5]}"
    for k in keys:
        w = torch.zeros_like(state[k])
        w.view(-1)[0] = 50.0
        state[k] = w
    return ArrayRecord(state)


@pytest.mark.parametrize("ensemble", [1, 3])
@pytest.mark.parametrize("model,target", [("combined", "clinical"), ("dl", "roi_stats_linear")])
def test_crafted_evaluate_weights_are_refused_before_any_patient_is_read(sites, opened, ensemble, model, target):
    coord = Coordinator(sites)
    opened.clear()
    honest, recipe = coord.init(model, **{"ensemble-size": ensemble})
    probe = _crafted(honest, target)
    # with the honest recipe (it derives the honest weights), and with no evidence at all
    reply = coord.evaluate("site-a", probe, recipe, model, **{"ensemble-size": ensemble})
    assert refused_unread(reply, opened)
    # the refusal names both hashes (what was sent, what the site derives), nothing about patients
    assert derive.record_hash(probe)[:12] in reply.error.reason and derive.record_hash(honest)[:12] in reply.error.reason
    req = {**base(), **coord.std, **model_keys(**{"ensemble-size": ensemble}), "model": model, "round": 0,
           "num-rounds": 3, "part": "all", "store": True}
    assert refused_unread(ask_site(client_app, sites["site-a"], "evaluate", req, arrays=probe), opened)
    # the honest weights with their derivation are answered
    assert metrics(coord.evaluate("site-a", honest, recipe, model, **{"ensemble-size": ensemble}))


def test_trap_weights_in_a_train_request_are_refused(sites, opened):
    coord = Coordinator(sites)
    opened.clear()
    honest, recipe = coord.init()
    trap = _crafted(honest, "head")
    assert refused_unread(coord.train("site-a", trap, recipe), opened)
    # an honest start is trained and its update comes back signed, bound to the model it started from
    reply = coord.train("site-a", honest, recipe)
    st = json.loads(signed(reply)["statement"])
    assert st["kind"] == "update" and st["start"] == derive.record_hash(honest) and st["round"] == 1
    assert st["payload"] == derive.record_hash(reply.content["arrays"])


def test_crafted_cf_coefficients_are_refused_at_logistic_stats_and_evaluate(sites, opened):
    coord = Coordinator(sites)
    zero = np.zeros(8)
    first = coord.stats("site-a", zero, {"zero": True})
    assert metrics(first)
    # the attack: slope 19.9 on the binary features only (sex, tumor site), within max-logit-slope
    crafted = np.array([0.0, 19.9, 19.9, 0, 0, 0, 0, 0])
    opened.clear()
    assert refused_unread(coord.stats("site-a", crafted, {"zero": True}), opened)
    fake = {"ref": zero.tolist(), "t": 1.0, "l2": 0.0, "stats": [signed(first)]}
    assert refused_unread(coord.stats("site-a", crafted, fake), opened)
    assert refused_unread(coord.cf_evaluate("site-a", crafted, fake), opened)
    # ... and a step that is not a halving of the Newton step
    pooled = derive.pool_stats([metrics(first)], 8)
    newton = derive.newton_candidate(zero, pooled, 0.0, 1.0)
    assert refused_unread(coord.stats("site-a", zero + 0.3 * (newton - zero), {**fake, "t": 0.3}), opened)
    # the Newton iterate itself, from the signed statistics, is answered
    assert metrics(coord.stats("site-a", newton, fake))
    assert metrics(coord.cf_evaluate("site-a", newton, fake))


def test_a_standardisation_that_is_not_the_signed_sums_is_refused(sites, opened):
    coord = Coordinator(sites)
    honest, recipe = coord.init()
    coord.std = {**coord.std, "clinical-std": [1e-3] * 7}  # a tiny SD turns any slope into a step function
    opened.clear()
    assert refused_unread(coord.evaluate("site-a", honest, recipe), opened)


def _update(coord, site, arrays, recipe, rnd=1):
    reply = coord.train(site, arrays, recipe, rnd=rnd)
    return {**signed(reply), "arrays": reply.content["arrays"]}, reply


def test_contributions_outside_the_roster_replays_and_reweighted_aggregates_are_refused(sites, opened):
    coord = Coordinator(sites, names=("site-a", "site-b"))
    honest, recipe = coord.init()
    a, _ = _update(coord, "site-a", honest, recipe)
    b, _ = _update(coord, "site-b", honest, recipe)

    def rounds(*groups):
        return {"kind": "rounds", "rounds": [list(g) for g in groups], "rule": "fedavg", "trim": 0.0, "swa": 0}

    contents = [derive.contribution(e["arrays"], json.loads(e["statement"])["num-examples"]) for e in (a, b)]
    fedavg = derive.aggregate(contents[0]["arrays"], contents, "fedavg", 0.0)
    fedavg = derive.keep_roi_standardisation(fedavg, coord.roi)
    assert metrics(coord.evaluate("site-a", fedavg, rounds([a, b])))  # the honest aggregate

    opened.clear()
    # an aggregate that leaves out b's update, or weights a's ten times, while relaying both
    only_a = derive.keep_roi_standardisation(derive.aggregate(contents[0]["arrays"], contents[:1], "fedavg", 0.0), coord.roi)
    assert refused_unread(coord.evaluate("site-a", only_a, rounds([a, b])), opened)
    heavy = [derive.contribution(a["arrays"], 280), contents[1]]
    reweighted = derive.keep_roi_standardisation(derive.aggregate(heavy[0]["arrays"], heavy, "fedavg", 0.0), coord.roi)
    assert refused_unread(coord.evaluate("site-a", reweighted, rounds([a, b])), opened)
    # a statement claiming 280 patients, re-signed by a key that is not site-a's
    forged = {**json.loads(a["statement"]), "num-examples": 280}
    text = canonical(forged)
    for key in (new_key(), simulation_key("site-z")):
        fake = {"statement": text.decode(), "signature": key.sign(text), "arrays": a["arrays"]}
        assert refused_unread(coord.evaluate("site-a", reweighted, rounds([fake, b])), opened)
    # a site outside the roster (its own key, its own name)
    outsider = {**json.loads(a["statement"]), "site": "site-z"}
    text = canonical(outsider)
    fake = {"statement": text.decode(), "signature": simulation_key("site-z").sign(text), "arrays": a["arrays"]}
    assert refused_unread(coord.evaluate("site-a", a["arrays"], rounds([fake])), opened)
    # weights swapped under a valid statement
    swapped = {**a, "arrays": b["arrays"]}
    assert refused_unread(coord.evaluate("site-a", b["arrays"], rounds([swapped])), opened)


def test_replayed_contributions_from_another_study_fit_or_round_are_refused(sites, opened):
    coord = Coordinator(sites)
    honest, recipe = coord.init()
    a, _ = _update(coord, "site-a", honest, recipe)
    one = {"kind": "rounds", "rounds": [[a]], "rule": "fedavg", "trim": 0.0, "swa": 0}
    model = derive.keep_roi_standardisation(derive.aggregate(a["arrays"], [derive.contribution(a["arrays"], 28)],
                                                             "fedavg", 0.0), coord.roi)
    assert metrics(coord.train("site-a", model, one, rnd=2))  # round 2 from round 1's signed update
    opened.clear()
    assert refused_unread(coord.train("site-a", model, one, rnd=3), opened)  # round 3 from round 1's
    for study in (f"{STUDY}/loco-x", f"{'b' * 12}/final"):  # another fit of the study, another study
        other = Coordinator(sites, study=study)
        opened.clear()
        assert refused_unread(other.train("site-a", model, one, rnd=2), opened)


def test_a_site_without_keys_or_roster_refuses_contributions_and_models(sites, opened):
    cfg = {k: v for k, v in sites["site-a"].items() if k not in ("signing-key", "peer-roster")}
    reply = ask_site(client_app, cfg, "query.clinical_sums", base())
    assert rule_of(reply) == "unverified-model" and "peer-roster" in reply.error.reason
    # a site that does not verify signs nothing (its replies attest nothing to its peers)
    off = ask_site(client_app, {**sites["site-a"], "model-verification": "off"}, "query.clinical_sums", base())
    assert metrics(off) and "signed" not in off.content


def test_an_honest_study_gives_the_same_rows_with_and_without_verification(tmp_path):
    """The same paper study on sites that verify every model (keys from the in-process grid) and on
    sites that do not: verification changes what a site accepts, never what an honest study computes."""
    from server.checkpoint import Checkpoint
    from server.protocol import Federation, Study
    from server.report import write_run_folder
    from tests.fedtools import LocalGrid
    from tests.test_study import TINY

    make_cache(tmp_path / "p", 36, seed=1, site_name="center-primary")
    make_cache(tmp_path / "e", 14, seed=2, site_name="center-external")
    rows = {}
    for mode in ("enforce", "off"):
        nodes = [{"cache-dir": str(tmp_path / n), "site-name": name, "min-cell-size": 3, "model-verification": mode,
                  "study-dir": str(tmp_path / f"{n}-{mode}")} for n, name in (("p", "center-primary"), ("e", "center-external"))]
        run_dir = tmp_path / f"run-{mode}"
        cfg = load_config(run_config={**TINY, "run-dir": str(run_dir)})
        fed = Federation(LocalGrid(client_app, nodes), min_sites=2, timeout_s=5)
        state = Study(fed, cfg, Checkpoint(run_dir)).run()
        assert not state["sat_out"], state["sat_out"]
        rows[mode] = write_run_folder(run_dir, state, cfg)["rows"]
        if mode == "enforce":
            assert fed.evidence_bytes["train"] > 0 and fed.evidence_bytes["evaluate"] > 0
    assert rows["enforce"] == rows["off"]
    assert {r["model"] for r in rows["enforce"]} == {"cf", "dl", "combined"}


def test_a_signed_statement_carries_only_what_its_reply_releases_plus_bindings(sites):
    """The signature adds no patient value to a reply: a statement holds the reply's own released
    numbers, the request's study / fold / seed, and hashes of what the coordinator sent or received."""
    coord = Coordinator(sites)
    sums = ask_site(client_app, sites["site-a"], "query.clinical_sums", base())
    stats = coord.stats("site-a", np.zeros(8), {"zero": True})
    bindings = {"site", "kind", "study-id", "fold", "seed"}
    for reply, extra in ((sums, set()), (stats, {"beta", "std"})):
        st = json.loads(signed(reply)["statement"])
        released = dict(reply.content["metrics"])
        assert set(st) == bindings | extra | set(released)
        assert all(st[k] == (list(v) if isinstance(v, list) else v) for k, v in released.items())
        assert (st["site"], st["study-id"], st["fold"], st["seed"]) == ("site-a", f"{STUDY}/final", -1, 1)
    st = json.loads(signed(stats)["statement"])
    assert st["beta"] == derive.values_hash(np.zeros(8))
    assert st["std"] == derive.values_hash(coord.std["clinical-mean"], coord.std["clinical-std"])
