"""The site's caps on what a coordinator may ask it to compute (client/limits.py): the issue's
resource-exhaustion request and its variants are refused, naming the rule, before the site's cache
is opened; the counts of fits and evaluations are charged per study and over the site's lifetime."""
from __future__ import annotations

import pytest

import client.study
from client.app import app as client_app
from common.config import SENT_MODEL_KEYS, load_config
from tests.fedtools import ask_site, make_cache
from tests.test_disclosure import STD, STUDY, metrics, rule_of

SHAPE = (3, 40, 40)


def _train(study=f"{STUDY}/final", fold=-1, rnd=1, **settings):
    cfg = load_config(run_config={"augment": False, "local-epochs": 1, "batch-size": 10, "clinical-embed-dim": 4,
                                  "ensemble-size": 1, "widen-factor": 0.125, **settings})
    return {"fold": fold, "folds": 5, "seed": 1, "study-id": study, "model": "dl", "round": rnd, "num-rounds": 2,
            **STD, **{k: cfg[k] for k in SENT_MODEL_KEYS}}


def _weights(**settings):
    import torch
    from flwr.app import ArrayRecord

    from common.model import build_model

    torch.manual_seed(0)
    cfg = load_config(run_config={"clinical-embed-dim": 4, "ensemble-size": 1, "widen-factor": 0.125, **settings})
    return ArrayRecord(build_model(cfg, SHAPE[0], 2, 7, use_clinical=False).state_dict())


@pytest.fixture
def site(tmp_path):
    make_cache(tmp_path / "site", 40, seed=5, site_name="h", shape=SHAPE, prevalence=0.5)
    return {"cache-dir": str(tmp_path / "site"), "site-name": "h"}


@pytest.mark.parametrize("change,policy,rule", [
    ({"backbone": "resnet34"}, {}, "model-caps"),
    ({"widen-factor": 2.0}, {}, "model-caps"),
    ({"ensemble-size": 8}, {}, "model-caps"),
    ({"local-epochs": 100, "ensemble-size": 2}, {}, "compute-budget"),  # 100 x 2 x 50 (40 patients, rounded up)
    ({"local-epochs": 40, "ensemble-size": 3}, {}, "compute-budget"),
    ({"num-rounds": 1000}, {}, "rounds-per-fit"),
    ({"batch-size": 4}, {}, "batch-size-floor"),           # under k = 10: an update from 4 patients
    ({"batch-size": 12}, {"min-batch-size": 16}, "batch-size-floor"),
    ({}, {"max-reply-mb": 0.05}, "reply-size"),           # the model is ~0.2 MB
])
def test_a_train_request_over_a_cap_is_refused_before_the_cache_is_read(site, monkeypatch, change, policy, rule):
    opened = []
    monkeypatch.setattr(client.study, "_cached_site_data", lambda path: opened.append(path))
    req = _train(**{k: v for k, v in change.items() if k != "num-rounds"})
    req.update({k: v for k, v in change.items() if k == "num-rounds"})
    reply = ask_site(client_app, {**site, **policy}, "train", req, arrays=_weights())
    assert rule_of(reply) == rule, reply.error.reason
    assert opened == []  # the site's cache was never opened: no patient data read


def test_the_caps_apply_to_evaluation_too_and_honest_requests_pass(site, monkeypatch):
    ev = {**_train(backbone="resnet34"), "part": "all", "store": False}
    assert rule_of(ask_site(client_app, site, "evaluate", ev, arrays=_weights(backbone="resnet34"))) == "model-caps"
    # the paper's settings (resnet10, width 0.25, 3 networks, 2 epochs, batch 16, 8 rounds) pass the defaults
    paper = load_config()
    req = {**_train(), **{k: paper[k] for k in SENT_MODEL_KEYS}, "augment": False, "num-rounds": paper["num-rounds"]}
    opened = []
    monkeypatch.setattr(client.study, "_cached_site_data", lambda path: opened.append(path) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # past every cap, the site goes on to open its cache
        ask_site(client_app, site, "train", req, arrays=_weights())
    assert opened


def test_fits_per_study_and_evaluations_are_counted(site):
    node = {**site, "max-fits-per-study": 1, "max-evaluations-per-study": 2, "max-evaluations": 3}
    assert metrics(ask_site(client_app, node, "train", _train(), arrays=_weights()))
    assert metrics(ask_site(client_app, node, "train", _train(rnd=2), arrays=_weights()))  # the same fit
    second = ask_site(client_app, node, "train", _train(study=f"{STUDY}/loco-x"), arrays=_weights())
    assert rule_of(second) == "fits-per-study"

    def ev(study, rnd):
        return {**_train(study=study, rnd=rnd), "part": "all", "store": False}

    assert metrics(ask_site(client_app, node, "evaluate", ev(f"{STUDY}/final", 1), arrays=_weights()))
    assert metrics(ask_site(client_app, node, "evaluate", ev(f"{STUDY}/final", 1), arrays=_weights()))  # a retry
    assert metrics(ask_site(client_app, node, "evaluate", ev(f"{STUDY}/final", 2), arrays=_weights()))
    assert rule_of(ask_site(client_app, node, "evaluate", ev(f"{STUDY}/loco-x", 1), arrays=_weights())) == "evaluations"
    # another study: its own count, but the site's lifetime count (3) is reached after one more
    assert metrics(ask_site(client_app, node, "evaluate", ev("bbbbbbbbbbbb/final", 1), arrays=_weights()))
    lifetime = ask_site(client_app, node, "evaluate", ev("bbbbbbbbbbbb/final", 2), arrays=_weights())
    assert rule_of(lifetime) == "evaluations" and "lifetime" in lifetime.error.reason


@pytest.mark.parametrize("backbone", ["resnet10", "resnet18", "resnet34"])
@pytest.mark.parametrize("dims,widen,ensemble", [(2, 0.125, 1), (2, 1.0, 3), (3, 0.5, 2)])
def test_the_torch_free_size_bound_never_exceeds_the_exact_size(backbone, dims, widen, ensemble):
    from client.limits import backbone_bytes_lower_bound, model_bytes

    manifest = {"image_shape": [4, 40, 40] if dims == 2 else [4, 16, 40, 40], "spatial_dims": dims,
                "channels": ["t2", "dwi", "adc", "mask"]}
    cfg = {**_train(backbone=backbone, **{"widen-factor": widen, "ensemble-size": ensemble})}
    exact = model_bytes(cfg, manifest, 7, use_clinical=True)
    bound = backbone_bytes_lower_bound(cfg, manifest)
    assert 0.5 * exact < bound <= exact  # a lower bound, and most of the weights


def test_the_issues_oversized_model_is_refused_without_importing_torch(tmp_path):
    """resnet34 x width 2 x 8 networks: refused on the torch-free bound, so a cold ClientApp process
    answers it without loading torch (the refusal's cost stays in milliseconds)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from client.limits import check_request\nfrom client.disclosure import Refused\n"
            "from client.policy import SitePolicy\n"
            "req = dict(backbone='resnet34', **{'widen-factor': 2.0, 'ensemble-size': 2, 'local-epochs': 1, "
            "'batch-size': 16, 'num-rounds': 8, 'model': 'dl'})\n"
            "pol = SitePolicy(allowed_backbones='resnet34', max_widen_factor=4.0, max_ensemble_size=8)\n"
            "man = {'image_shape': [4, 64, 64], 'spatial_dims': 2, 'counts': {'included': 28}}\n"
            "try:\n    check_request('train', req, pol, man, 7)\nexcept Refused as exc:\n    print(exc.rule)\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1])).stdout.split()
    assert out == ["reply-size", "False"]
