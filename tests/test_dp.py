"""DP-SGD at the site (client/dp.py): clipping before noise, the noise scale, the accountant, the
site's budget, the secret noise, and the non-DP path left as it was."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from client import dp as D
from client.app import app as client_app
from common.config import SENT_MODEL_KEYS, load_config
from common.model import EnsembleNet, FusionResNet
from common.records import SITE_CANNOT, record_to_state
from tests.fedtools import ask_site, make_cache

SHAPE = (3, 40, 40)
STD = {"clinical-mean": [0.0] * 7, "clinical-std": [1.0] * 7}
STUDY = "0123456789ab"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tiny_net(roi: bool = False, members: int = 1):
    """roi: a 4th (mask) channel, ROI pooling and the ROI statistics' terms, the default model since issue
    17; members > 1: an EnsembleNet of that many such networks."""
    torch.manual_seed(0)
    nets = [FusionResNet(n_channels=4 if roi else 3, n_clinical=7, widen_factor=0.125, clinical_embed_dim=4, dropout=0.0,
                         roi_channels=(3,) if roi else (), roi_stats=roi) for _ in range(members)]
    for n in nets:
        if roi:  # as in a study: standardised, and a trained (non-zero) linear term
            n.set_roi_standardisation(torch.full((6,), 0.5), torch.full((6,), 0.3))
            nn.init.normal_(n.roi_stats_linear.weight)
    return nets[0] if members == 1 else EnsembleNet(nets)


# ---- the mechanism --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", D.GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("roi, members, wide", [(False, 1, False), (True, 1, False), (True, 2, False), (True, 1, True),
                                                (True, 2, True)])
def test_per_sample_gradients_are_clipped_to_the_bound_before_noise(mode, roi, members, wide):
    """A patient's gradient over ALL trainable parameters (every ensemble member's together) is clipped
    as one; with dp-train = wide (common/model.py make_wide) over the linear terms, the rest frozen."""
    from common.model import make_wide

    net = _tiny_net(roi, members).train()  # dropout 0 and instance norm: per-sample passes equal the batched one
    frozen = {}
    if wide:
        make_wide(net)
        frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    x, z = torch.randn(6, 4 if roi else 3, 40, 40), torch.randn(6, 7)
    if roi:
        x[:, 3] = (x[:, 3] > 0.5).float()
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    clip = 1e-3
    # reference: each patient's own gradient, clipped to `clip`, summed
    params = [p for p in net.parameters() if p.requires_grad]
    # per member: 6 ROI statistics + intercept, 7 clinical factors + intercept (the Combined model)
    assert not wide or sum(p.numel() for p in params) == members * 15
    expected = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(6):
        net.zero_grad()
        logits = net.member_logits(x[i:i + 1], z[i:i + 1]) if members > 1 else net(x[i:i + 1], z[i:i + 1])[:, None]
        # each member on its own loss: the patient's loss is the sum over members
        nn.functional.binary_cross_entropy_with_logits(logits, y[i:i + 1, None].expand_as(logits), reduction="sum").backward()
        g = [p.grad.clone() for p in params]
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        norms.append(float(norm))
        for e, t in zip(expected, g):
            e += t * min(1.0, clip / (float(norm) + 1e-6))
    assert min(norms) > 10 * clip  # every patient is clipped: the test can tell clipped from unclipped
    net.zero_grad()
    plan = D.DPTraining(noise_multiplier=0.0, clip_norm=clip, sample_rate=1.0, steps=1, seed=1, mode=mode)
    private = D.make_private(net, torch.optim.SGD(params, lr=0.0), plan, 6, torch.Generator())
    private.step(x, z, y)  # clip, (zero) noise, divide by the expected batch size; lr 0 keeps the weights
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad * 6, e, rtol=1e-3, atol=1e-8)
    total = torch.sqrt(sum(((p.grad * 6) ** 2).sum() for p in params))
    assert float(total) <= 6 * clip * (1 + 1e-3)
    for n, p in net.named_parameters():  # the frozen weights get no gradient, so no noise either
        if n in frozen:
            assert p.grad is None and torch.equal(p.detach(), frozen[n])
    private.close()


@pytest.mark.parametrize("shape, conv", [
    ((4, 8, 20, 20), nn.Conv2d(8, 16, 3, padding=1, bias=True)),            # many positions: per-sample gradients
    ((4, 32, 2, 2), nn.Conv2d(32, 64, 3, padding=1, bias=False)),           # few positions: the Gram identity
    ((4, 16, 4, 4), nn.Conv2d(16, 32, 1, stride=2, bias=False)),            # 1x1 strided (ResNet downsample)
    ((3, 4, 4, 6, 6), nn.Conv3d(4, 8, 3, padding=1, bias=True)),
])
def test_conv_ghost_norms_equal_opacus_per_sample_gradient_norms(shape, conv):
    from opacus.grad_sample.conv import compute_conv_grad_sample

    x = torch.randn(*shape)
    out = conv(x)
    back = torch.randn_like(out)
    ours = D.conv_norm_sample(conv, [x], back)
    ref = compute_conv_grad_sample(conv, [x], back)
    assert set(ours) == set(ref)
    for p in ref:
        torch.testing.assert_close(ours[p], ref[p].flatten(1).norm(dim=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", D.GRAD_SAMPLE_MODES)
def test_noise_standard_deviation_is_the_multiplier_times_the_clip_norm(mode):
    net = _tiny_net()
    sigma, clip, batch = 2.0, 0.5, 8
    plan = D.DPTraining(noise_multiplier=sigma, clip_norm=clip, sample_rate=0.5, steps=1, seed=1, mode=mode)
    private = D.make_private(net, torch.optim.SGD(net.parameters(), lr=0.0), plan, batch, torch.Generator().manual_seed(3))
    private.noise_step()  # no patient: the released gradient is pure noise
    noise = torch.cat([(p.grad * batch).flatten() for p in net.parameters()])
    assert noise.numel() > 50_000
    assert abs(float(noise.std()) - sigma * clip) < 0.01 * sigma * clip
    assert abs(float(noise.mean())) < 0.01
    private.close()


def test_calibrated_noise_meets_the_target_and_more_steps_need_more_noise():
    s1 = D.calibrate(3.0, 1e-5, 0.1, 100)
    s2 = D.calibrate(3.0, 1e-5, 0.1, 400)
    assert s2 > s1 > 0
    eps = D.epsilon([(s1, 0.1, 100)], 1e-5)
    assert 3.0 - D.EPSILON_TOLERANCE <= eps <= 3.0


# ---- the site: budget, accountant, secret noise ---------------------------------------------------
def _request(study=f"{STUDY}/final", fold=-1, rnd=1, dp_fits=1, ensemble=1, **extra):
    cfg = load_config(run_config={"augment": False, "local-epochs": 1, "batch-size": 8, "clinical-embed-dim": 4,
                                  "ensemble-size": ensemble})
    req = {"fold": fold, "folds": 3, "seed": 1, "study-id": study, "model": "dl", "round": rnd, "num-rounds": 2,
           **STD, **{k: cfg[k] for k in SENT_MODEL_KEYS}, **extra}
    if dp_fits is not None:
        req["dp-fits"] = dp_fits
    return req


def _weights(norm: str = "instance", ensemble: int = 1):
    from flwr.app import ArrayRecord

    from common.model import build_model

    torch.manual_seed(0)
    cfg = load_config(run_config={"clinical-embed-dim": 4, "norm": norm, "ensemble-size": ensemble})
    return ArrayRecord(build_model(cfg, 3, 2, 7, use_clinical=False).state_dict())


def _site(tmp_path, name="dp", n=40, seed=5, **policy):
    make_cache(tmp_path / name, n, seed=seed, site_name=name, shape=SHAPE)
    return {"cache-dir": str(tmp_path / name), "site-name": name, "min-cell-size": 3, **policy}


def _ledger(node) -> dict:
    return json.loads((Path(node["cache-dir"]).parent / f"{Path(node['cache-dir']).name}-study" / "disclosure-ledger.json").read_text())


def _ok(reply) -> dict:
    assert not reply.has_error(), reply.error.reason
    return dict(reply.content["metrics"])


def test_reported_epsilon_is_opacus_accountant_for_the_same_mechanism(tmp_path):
    """With the default ensemble of 3 networks: the members share the Poisson batches, so the steps
    and the epsilon are those of one model."""
    from opacus.accountants import RDPAccountant

    node = _site(tmp_path, **{"dp-epsilon": 4.0, "dp-delta": 1e-5, "dp-clip-norm": 0.8})
    m = _ok(ask_site(client_app, node, "train", _request(ensemble=3), arrays=_weights(ensemble=3)))
    assert m["dp-sample-rate"] == pytest.approx(8 / 40) and m["dp-steps"] == math.ceil(40 / 8)
    assert m["dp-clip-norm"] == 0.8 and m["dp-delta"] == 1e-5
    acc = RDPAccountant()
    for _ in range(int(m["dp-steps"])):
        acc.step(noise_multiplier=m["dp-noise-multiplier"], sample_rate=m["dp-sample-rate"])
    assert m["dp-epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    # the noise was calibrated for the declared plan (1 fit x 2 rounds x 1 epoch) on the smallest CV part
    book = _ledger(node)["dp"][STUDY]
    planned = D.epsilon([(book["noise-multiplier"], book["planned"]["sample-rate"], book["planned"]["steps"])], 1e-5)
    assert 4.0 - D.EPSILON_TOLERANCE <= planned <= 4.0
    m2 = _ok(ask_site(client_app, node, "train", _request(rnd=2, ensemble=3), arrays=_weights(ensemble=3)))
    for _ in range(int(m2["dp-steps"])):
        acc.step(noise_multiplier=m2["dp-noise-multiplier"], sample_rate=m2["dp-sample-rate"])
    assert m2["dp-epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9) and m2["dp-epsilon"] <= 4.0


def test_a_request_past_the_budget_is_refused_and_trains_nothing(tmp_path, monkeypatch):
    import client.train

    node = _site(tmp_path, **{"dp-epsilon": 2.0})
    # the coordinator declared one DL fit (2 rounds); the noise is calibrated for exactly that
    cv = dict(study=f"{STUDY}/cv", fold=0)
    answered = [_ok(ask_site(client_app, node, "train", _request(rnd=rnd, **cv), arrays=_weights())) for rnd in (1, 2)]
    assert answered[1]["dp-epsilon"] <= 2.0
    before = _ledger(node)
    calls = []
    real = client.train.train
    monkeypatch.setattr(client.train, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
    # a second fit in the same study would pass the budget
    reply = ask_site(client_app, node, "train", _request(study=f"{STUDY}/cv", fold=1), arrays=_weights())
    assert reply.has_error() and "rule 'dp-budget'" in reply.error.reason and not reply.has_content()
    assert calls == [] and _ledger(node) == before  # nothing trained, nothing charged
    # an identical retry of an answered round is answered again, identically, and costs nothing
    again = _ok(ask_site(client_app, node, "train", _request(rnd=2, **cv), arrays=_weights()))
    assert {k: v for k, v in again.items() if k != "train-seconds"} == {k: v for k, v in answered[1].items() if k != "train-seconds"}
    assert calls == [1] and _ledger(node) == before


def test_a_lifetime_budget_refuses_the_study_that_would_pass_it_before_training(tmp_path, monkeypatch):
    """Default lifetime budget (10) with dp-epsilon 3: three studies each spend their 3 on the same
    patients; the fourth study's first training request (which would take the total past 10) is refused
    before anything trains, a retry is refused the same way and costs nothing, and the replies say what
    the lifetime holds."""
    import client.train

    node = _site(tmp_path, **{"dp-epsilon": 3.0})
    last = {}
    for study in ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"):
        for rnd in (1, 2):
            # fold 0's training part is the smallest, the one the noise is calibrated on: the plan's 3 spent
            last = _ok(ask_site(client_app, node, "train", _request(study=f"{study}/cv", fold=0, rnd=rnd),
                                arrays=_weights()))
        assert 3.0 - D.EPSILON_TOLERANCE <= last["dp-epsilon"] <= 3.0
    books = _ledger(node)["dp"]
    spent = sum(D.epsilon([(h["noise-multiplier"], h["sample-rate"], h["steps"]) for h in b["history"]], b["delta"])
                for b in books.values())
    assert last["dp-lifetime-epsilon"] == pytest.approx(spent, rel=1e-9) and 9.0 - 3 * D.EPSILON_TOLERANCE <= spent <= 9.0
    assert last["dp-lifetime-budget"] == 10.0
    before = _ledger(node)
    calls = []
    monkeypatch.setattr(client.train, "train", lambda *a, **k: calls.append(1))
    for _ in range(2):  # the request, then its retry
        reply = ask_site(client_app, node, "train", _request(study="dddddddddddd/final"), arrays=_weights())
        assert reply.has_error() and "rule 'dp-budget'" in reply.error.reason and "lifetime" in reply.error.reason
        assert not reply.has_content()
    assert calls == [] and _ledger(node) == before  # nothing trained, nothing charged
    # the site's privacy officer raises the lifetime budget: the same request is answered
    monkeypatch.undo()
    assert _ok(ask_site(client_app, {**node, "dp-lifetime-epsilon": 12.5}, "train", _request(study="dddddddddddd/final"),
                        arrays=_weights()))["dp-lifetime-budget"] == 12.5


def test_noise_comes_from_the_site_secret_not_from_the_request(tmp_path):
    """Two sites with the same patients and the same request: different noise (each site's own secret),
    and an identical retry at one site gives the identical weights (nothing new to average out)."""
    a = _site(tmp_path, "a", **{"dp-epsilon": 8.0})
    b = _site(tmp_path, "b", **{"dp-epsilon": 8.0})
    wa = record_to_state(ask_site(client_app, a, "train", _request(), arrays=_weights()).content["arrays"])
    wb = record_to_state(ask_site(client_app, b, "train", _request(), arrays=_weights()).content["arrays"])
    wa2 = record_to_state(ask_site(client_app, a, "train", _request(), arrays=_weights()).content["arrays"])
    assert any(not torch.equal(wa[k], wb[k]) for k in wa if wa[k].is_floating_point())
    assert all(torch.equal(wa[k], wa2[k]) for k in wa)
    secret = Path(a["cache-dir"]).parent / "a-study" / "dp-secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 32


def test_poisson_sampling_at_the_rate_the_accountant_uses(tmp_path, monkeypatch):
    rates = []
    real = D.poisson_batch
    monkeypatch.setattr(D, "poisson_batch", lambda n, q, g: rates.append((n, q)) or real(n, q, g))
    node = _site(tmp_path, **{"dp-epsilon": 8.0})
    m = _ok(ask_site(client_app, node, "train", _request(), arrays=_weights()))
    assert len(rates) == m["dp-steps"] and set(rates) == {(40, m["dp-sample-rate"])}


def test_dp_needs_a_model_opacus_can_train_and_says_why(tmp_path):
    node = _site(tmp_path, **{"dp-epsilon": 8.0})
    reply = ask_site(client_app, node, "train", _request(norm="batch"), arrays=_weights("batch"))
    assert reply.has_error() and reply.error.code == SITE_CANNOT and "BatchNorm" in reply.error.reason
    path = Path(node["cache-dir"]).parent / "dp-study" / "disclosure-ledger.json"
    assert not path.exists() or "dp" not in json.loads(path.read_text())  # nothing charged


def test_dp_off_leaves_training_exactly_as_without_the_dp_code(tmp_path):
    """dp-epsilon = 0 (the default) trains through the plain path: the same weights as calling
    client.train.train directly, bit for bit, and no DP figures in the reply."""
    from client.cache import load_cache
    from client.train import train
    from common.model import build_model

    node = _site(tmp_path, **{"dp-epsilon": 0.0})
    req = _request()
    reply = ask_site(client_app, node, "train", req, arrays=_weights())
    got = record_to_state(reply.content["arrays"])
    assert not any(k.startswith("dp-") for k in reply.content["metrics"])
    # the same computation by hand: the seed the site derives, the same settings
    import numpy as np_

    from client.study import _site_hash
    from common.config import MODELS

    cfg = load_config(node_config={k: v for k, v in node.items()}, run_config={k: req[k] for k in SENT_MODEL_KEYS})
    torch.manual_seed(0)
    net = build_model(cfg, 3, 2, 7, use_clinical=False)
    net.load_state_dict(record_to_state(_weights()))
    seed = int(np_.random.SeedSequence([1, MODELS.index("dl"), 0, 1, _site_hash("dp")]).generate_state(1)[0] % (2**31))
    train(net, load_cache(Path(node["cache-dir"])), cfg, STD["clinical-mean"], STD["clinical-std"], seed=seed)
    assert all(torch.equal(v, got[k]) for k, v in net.state_dict().items())


# ---- the study: the plan the server declares, what the report says ---------------------------------
def test_a_study_under_dp_reports_the_epsilon_each_site_spent(tmp_path):
    from server.checkpoint import Checkpoint
    from server.protocol import Federation, Study
    from server.report import write_run_folder
    from tests.fedtools import LocalGrid

    primary = _site(tmp_path, "center-primary", n=40, seed=1, **{"dp-epsilon": 5.0})
    external = _site(tmp_path, "center-external", n=14, seed=2)
    cfg = load_config(run_config={"folds": 2, "num-rounds": 1, "local-epochs": 1, "batch-size": 8, "clinical-embed-dim": 4,
                                  "augment": False, "seed": 3, "cf-l2": 0.1, "site-timeout-s": 5.0,
                                  "models": "cf,dl", "run-dir": str(tmp_path / "run"), "ensemble-size": 1})
    state = Study(Federation(LocalGrid(client_app, [primary, external]), min_sites=2, timeout_s=5), cfg,
                  Checkpoint(tmp_path / "run")).run()
    res = write_run_folder(tmp_path / "run", state, cfg)
    book = _ledger(primary)["dp"][state["study_id"]]
    assert book["planned"]["dp-fits"] == 3  # 2 CV folds + the final fit, one DL model
    assert len(book["history"]) == 3 and not (Path(external["cache-dir"]).parent / "center-external-study" / "dp-secret").exists()
    spent = res["dp"]["center-primary"]
    assert spent["epsilon"] == pytest.approx(D.epsilon([(h["noise-multiplier"], h["sample-rate"], h["steps"])
                                                        for h in book["history"]], 1e-5), rel=1e-9)
    assert 0 < spent["epsilon"] <= 5.0 and spent["epsilon_per_model"]["dl"] == pytest.approx(spent["epsilon"])
    assert set(res["dp"]) == {"center-primary"}  # the evaluate-only site trained nothing
    report = (tmp_path / "run" / "report.md").read_text()
    assert "### Differential privacy" in report and "| center-primary | " + f"{spent['epsilon']:.2f}" in report
    # the lifetime: this study is the site's first, so its lifetime spend is this study's
    assert spent["lifetime_epsilon"] == pytest.approx(spent["epsilon"]) and spent["lifetime_budget"] == 10.0
    assert f"| {spent['lifetime_epsilon']:.2f} / 10 ({10 - spent['lifetime_epsilon']:.2f} left) |" in report
    assert "does NOT cover the CF model" in report
    # no mask channel, so no ROI statistics' term: dp-train auto trained the whole network
    assert "(dp-train = auto): every weight" in report and "only the linear terms" not in report


def test_a_budget_the_site_lowers_mid_study_applies_at_once(tmp_path):
    node = _site(tmp_path, **{"dp-epsilon": 4.0})
    _ok(ask_site(client_app, node, "train", _request(rnd=1), arrays=_weights()))
    lowered = {**node, "dp-epsilon": 0.01}  # the privacy officer edits the policy between two rounds
    reply = ask_site(client_app, lowered, "train", _request(rnd=2), arrays=_weights())
    assert reply.has_error() and "rule 'dp-budget'" in reply.error.reason


def test_a_parameter_that_gets_no_per_sample_norm_stops_training():
    """Ghost clipping clips by the norms its hooks saw: a trainable parameter whose hook never fired
    would enter the update unclipped, so the step refuses instead."""
    net = _tiny_net().train()
    net.unused = nn.Linear(2, 2)  # trainable, on no path from the inputs to the loss
    plan = D.DPTraining(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.5, steps=1, seed=1, mode="ghost")
    private = D.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), plan, 4, torch.Generator())
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(D.DPError, match="got no per-sample norm"):
        private.step(torch.randn(4, 3, 40, 40), torch.randn(4, 7), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # nothing was trained
    private.close()


def test_a_delta_not_below_one_in_ten_patients_is_refused_before_training(tmp_path):
    node = _site(tmp_path, n=100, **{"dp-epsilon": 3.0, "dp-delta": 1e-3})  # 1e-3 >= 1 / (10 x 100)
    reply = ask_site(client_app, node, "train", _request(), arrays=_weights())
    assert reply.has_error() and "rule 'dp-delta'" in reply.error.reason and not reply.has_content()
    assert "100" not in reply.error.reason  # the refusal names the rule, not the site's patient count


# ---- dp-train = wide: the linear terms on a reference standardisation -------------------------------
REFERENCE = ",".join(["0.5"] * 6 + ["0.2"] * 6)  # 6 ROI means, then 6 SDs: fixed before the study


def _roi_site(tmp_path, name="dp-roi", **policy):
    make_cache(tmp_path / name, 40, seed=5, site_name=name, shape=SHAPE, mask_channel=True)
    return {"cache-dir": str(tmp_path / name), "site-name": name, "min-cell-size": 3, **policy}


def _roi_weights(reference: str | None = REFERENCE):
    from flwr.app import ArrayRecord

    from common.derive import roi_reference
    from common.model import build_model

    cfg = load_config(run_config={"clinical-embed-dim": 4, "ensemble-size": 1})
    net = build_model(cfg, 4, 2, 7, use_clinical=False, channels=["t2", "dwi", "adc", "mask"])
    net.set_roi_standardisation(*(roi_reference(reference) if reference else ([0.4] * 6, [0.1] * 6)))
    return ArrayRecord(net.state_dict())


def test_wide_training_changes_only_the_linear_terms_and_is_charged_like_any_dp_step(tmp_path):
    """dp-train auto on a model with ROI statistics: the reply differs from the sent weights only in the
    ROI statistics' linear term (and the image head's output, set to 0); the epsilon is the accountant's."""
    from opacus.accountants import RDPAccountant

    node = _roi_site(tmp_path, **{"dp-epsilon": 4.0})
    sent = record_to_state(_roi_weights())
    reply = ask_site(client_app, node, "train", _request(**{"roi-stats-reference": REFERENCE}), arrays=_roi_weights())
    m = _ok(reply)
    got = record_to_state(reply.content["arrays"])
    changed = sorted(k for k in sent if not torch.equal(sent[k], got[k]))
    assert changed == ["head.3.bias", "head.3.weight", "roi_stats_linear.bias", "roi_stats_linear.weight"]
    assert not got["head.3.weight"].any() and not got["head.3.bias"].any()
    assert got["roi_stats_linear.weight"].abs().sum() > 0  # trained (noise alone would do it too)
    acc = RDPAccountant()
    for _ in range(int(m["dp-steps"])):
        acc.step(noise_multiplier=m["dp-noise-multiplier"], sample_rate=m["dp-sample-rate"])
    assert m["dp-epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9) and m["dp-epsilon"] <= 4.0
    # dp-train = all trains the ResNet too, on the same budget rules
    node2 = _roi_site(tmp_path, "dp-roi-all", **{"dp-epsilon": 4.0})
    reply = ask_site(client_app, node2, "train", _request(**{"roi-stats-reference": REFERENCE, "dp-train": "all"}),
                     arrays=_roi_weights())
    _ok(reply)
    got = record_to_state(reply.content["arrays"])
    assert not torch.equal(sent["backbone.conv1.weight"], got["backbone.conv1.weight"])


def test_a_dp_site_refuses_roi_statistics_standardised_from_the_sites_patients(tmp_path):
    """The pooled standardisation is fitted on the sites' data outside the budget: refused before any
    training or charge, with the rule named; the same site without DP trains on it."""
    node = _roi_site(tmp_path, **{"dp-epsilon": 4.0})
    reply = ask_site(client_app, node, "train", _request(), arrays=_roi_weights(None))
    assert reply.has_error() and "rule 'dp-standardisation'" in reply.error.reason and not reply.has_content()
    path = Path(node["cache-dir"]).parent / "dp-roi-study" / "disclosure-ledger.json"
    assert not path.exists() or "dp" not in json.loads(path.read_text())  # nothing charged
    # a coordinator naming the reference but sending weights standardised otherwise
    reply = ask_site(client_app, node, "train", _request(**{"roi-stats-reference": REFERENCE}), arrays=_roi_weights(None))
    assert reply.has_error() and "rule 'dp-standardisation'" in reply.error.reason and not reply.has_content()
    assert not path.exists() or "dp" not in json.loads(path.read_text())
    plain = _roi_site(tmp_path, "plain", **{"dp-epsilon": 0.0})
    _ok(ask_site(client_app, plain, "train", _request(), arrays=_roi_weights(None)))


def test_a_malformed_reference_is_refused_as_a_request_error(tmp_path):
    node = _roi_site(tmp_path, **{"dp-epsilon": 4.0})
    for bad in ["0.5,0.5", "a,b", ",".join(["0.5"] * 6 + ["0"] * 6), "1," * 600 + "1"]:
        reply = ask_site(client_app, node, "train", _request(**{"roi-stats-reference": bad}), arrays=_roi_weights())
        assert reply.has_error() and "rule 'request'" in reply.error.reason, bad
        assert "roi-stats-reference" in reply.error.reason, bad


def test_a_study_with_a_reference_releases_no_roi_sums_and_trains_on_the_reference(tmp_path):
    """The coordinator asks for no ROI sums when the study names a reference; what left the sites holds
    none, and every DL model the study made (verified by the sites from the signed evidence) carries
    the reference as its ROI standardisation; the DP site's replies name its epsilon."""
    from server.checkpoint import Checkpoint
    from server.protocol import Federation, Study
    from server.report import build_results
    from tests.fedtools import LocalGrid

    primary = _roi_site(tmp_path, "center-primary", **{"dp-epsilon": 5.0})
    external = _roi_site(tmp_path, "center-external")
    cfg = load_config(run_config={"folds": 2, "num-rounds": 1, "local-epochs": 1, "batch-size": 8, "clinical-embed-dim": 4,
                                  "augment": False, "seed": 3, "site-timeout-s": 5.0, "models": "dl",
                                  "run-dir": str(tmp_path / "run"), "ensemble-size": 1, "roi-stats-reference": REFERENCE})
    grid = LocalGrid(client_app, [primary, external])
    state = Study(Federation(grid, min_sites=2, timeout_s=5), cfg, Checkpoint(tmp_path / "run")).run()
    res = build_results(state, cfg)
    assert {r["model"] for r in res["rows"]} == {"dl"}
    sums = [dict(r.content["metrics"]) for t, r in grid.replies if t == "query.clinical_sums" and r.has_content()]
    assert sums and not any(k.startswith("roi-") for m in sums for k in m)
    trained = [record_to_state(r.content["arrays"]) for t, r in grid.replies if t == "train" and r.has_content()]
    assert trained and all(torch.equal(s["roi_stats_mean"], torch.full((6,), 0.5)) for s in trained)
    assert all(torch.equal(s["roi_stats_std"], torch.full((6,), 0.2)) for s in trained)
    assert 0 < res["dp"]["center-primary"]["epsilon"] <= 5.0
    from server.report import dp_section

    said = "\n".join(dp_section(res))
    assert "only the linear terms on the ROI statistics" in said and "every weight" not in said
