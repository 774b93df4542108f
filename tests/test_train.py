"""Local training / evaluation: device choice, labels, seeding, FedProx, augmentation, and learning."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from client.train import BatchAugment, LabelError, check_labels, evaluate, member_seed, predict_proba, select_device, train
from common.config import load_config
from common.model import EnsembleNet, FusionResNet, build_model
from simulation.bench_train import clinical_stats, phantom_site


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def site():
    return phantom_site(24, seed=5, size=32)


def _cfg(**over):
    return load_config(cli={"batch-size": 8, "local-epochs": 1, "device": "cpu", **over})


def _small_model(seed=0, use_clinical=True, norm="batch"):
    torch.manual_seed(seed)
    return FusionResNet(norm=norm, widen_factor=0.25, use_clinical=use_clinical)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --- device -----------------------------------------------------------------------------------

def test_select_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device({"device": "auto"}) == torch.device("cpu")
    assert select_device({"device": "cpu"}) == torch.device("cpu")
    with pytest.raises(ValueError, match="'device' is 'cuda:1' but no CUDA device is available"):
        select_device({"device": "cuda:1"})
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N, found 'tpu'"):
        select_device({"device": "tpu"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device({"device": "auto"}) == torch.device("cuda")


# --- labels and inputs ------------------------------------------------------------------------

def test_unknown_labels_cannot_be_trained_or_evaluated(site):
    bad = site.subset(range(len(site)))
    bad.labels = bad.labels.copy()
    bad.labels[[2, 7]] = -1
    mean, std = clinical_stats(site)
    with pytest.raises(LabelError, match=rf"cannot train: 2 of 24 patients .*{bad.keys[2]} \(label -1\), {bad.keys[7]}"):
        train(_small_model(), bad, _cfg(), mean, std)
    with pytest.raises(LabelError, match="cannot evaluate"):
        evaluate(_small_model(), bad, mean, std, _cfg())
    # prediction needs no label
    assert predict_proba(_small_model(), bad, mean, std, _cfg()).shape == (24,)
    assert check_labels(site, "train").dtype == np.float32


def test_too_few_patients_is_a_clear_error(site):
    mean, std = clinical_stats(site)
    with pytest.raises(ValueError, match=r"cannot train on 1 patient\(s\)"):
        train(_small_model(), site.subset([0]), _cfg(), mean, std)


def test_mismatched_standardisation_is_a_clear_error(site):
    with pytest.raises(ValueError, match=r"clinical_mean / clinical_std: expected shape \(7,\)"):
        train(_small_model(), site, _cfg(), np.zeros(5), np.ones(5))


# --- training mechanics -------------------------------------------------------------------------

def test_train_is_seeded_reports_and_leaves_global_rng_alone(site):
    mean, std = clinical_stats(site)
    rng_before = torch.random.get_rng_state()
    runs = []
    for seed in (1, 1, 2):
        model = _small_model(seed=0)
        start = _flat(model).clone()
        out = train(model, site, _cfg(), mean, std, epochs=2, seed=seed)
        assert out["num_examples"] == 24 and out["epochs"] == 2 and np.isfinite(out["loss"]) and out["seconds"] > 0
        assert not torch.equal(start, _flat(model))
        runs.append(_flat(model))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert torch.equal(rng_before, torch.random.get_rng_state())


def test_single_class_site_still_trains(site):
    negatives = site.subset(np.flatnonzero(site.labels == 0))
    mean, std = clinical_stats(site)
    out = train(_small_model(), negatives, _cfg(), mean, std)
    assert out["num_examples"] == len(negatives)
    metrics, probs = evaluate(_small_model(), negatives, mean, std, _cfg())
    assert np.isnan(metrics["auc"]) and probs.shape == (len(negatives),)


def test_fedprox_keeps_weights_near_the_global_ones(site):
    mean, std = clinical_stats(site)
    drift = {}
    for mu in (0.0, 10.0):
        model = _small_model()
        anchor = _flat(model).clone()
        train(model, site, _cfg(**{"fedprox-mu": mu, "lr": 1e-2}), mean, std, epochs=2, seed=0)
        drift[mu] = float((_flat(model) - anchor).norm())
    assert drift[10.0] < 0.5 * drift[0.0]


def test_fedprox_global_params_as_state_dict_or_flower_list(site):
    mean, std = clinical_stats(site)
    ref = _small_model(seed=9)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    as_list = [v.numpy() for v in state.values()]
    cfg = _cfg(**{"fedprox-mu": 1.0})
    a, b = _small_model(), _small_model()
    train(a, site, cfg, mean, std, seed=0, global_params=state)
    train(b, site, cfg, mean, std, seed=0, global_params=as_list)
    assert torch.equal(_flat(a), _flat(b))
    c = _small_model()
    train(c, site, cfg, mean, std, seed=0)  # anchor = own starting weights, a different reference
    assert not torch.equal(_flat(a), _flat(c))
    with pytest.raises(ValueError, match=r"global_params: expected \d+ arrays"):
        train(_small_model(), site, cfg, mean, std, global_params=as_list[:-1])


def test_predictions_do_not_depend_on_batching():
    site = phantom_site(12, seed=6)  # 64 x 64: instance norm needs > 1 voxel in the last stage
    mean, std = clinical_stats(site)
    model = _small_model(norm="instance")
    full = predict_proba(model, site, mean, std, _cfg())
    part = predict_proba(model, site.subset([3, 0, 11]), mean, std, _cfg(**{"batch-size": 1}))
    np.testing.assert_allclose(part, full[[3, 0, 11]], rtol=1e-5, atol=1e-6)
    assert ((full > 0) & (full < 1)).all()


def test_evaluate_metrics_match_references(site):
    mean, std = clinical_stats(site)
    model = _small_model()
    metrics, probs = evaluate(model, site, mean, std, _cfg())
    assert metrics["num_examples"] == 24
    assert metrics["auc"] == pytest.approx(roc_auc_score(site.labels, probs), abs=1e-12)
    assert metrics["loss"] == pytest.approx(log_loss(site.labels, probs), rel=1e-6)


# --- augmentation -------------------------------------------------------------------------------

def test_augment_identity_and_flips_follow_the_image_axes():
    x = torch.randn(3, 2, 16, 16)
    gen = torch.Generator().manual_seed(0)
    still = BatchAugment(2, flip_prob=0.0, rotate_deg=0, scale=0, shift=0, intensity_scale=0, intensity_shift=0)
    torch.testing.assert_close(still(x, gen), x, atol=1e-5, rtol=0)
    flip = BatchAugment(2, flip_prob=1.0, rotate_deg=0, scale=0, shift=0, intensity_scale=0, intensity_shift=0)
    torch.testing.assert_close(flip(x, gen), torch.flip(x, dims=(2, 3)), atol=1e-5, rtol=0)
    x3 = torch.randn(2, 1, 5, 8, 8)
    flip3 = BatchAugment(3, flip_prob=1.0, rotate_deg=0, scale=0, shift=0, intensity_scale=0, intensity_shift=0)
    torch.testing.assert_close(flip3(x3, gen), torch.flip(x3, dims=(3, 4)), atol=1e-5, rtol=0)  # slices kept


def test_augment_is_per_sample_bounded_and_reproducible():
    x = torch.randn(1, 3, 32, 32).repeat(4, 1, 1, 1)
    aug = BatchAugment(2)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # each sample gets its own draw
    theta = aug.theta(1000, torch.Generator().manual_seed(1))
    det = torch.linalg.det(theta[:, :, :2]).abs().sqrt()  # isotropic in-plane scale
    assert det.min() >= 0.9 - 1e-6 and det.max() <= 1.1 + 1e-6
    assert theta[:, :, 2].abs().max() <= 0.05 + 1e-6


def test_3d_training_runs():
    data = phantom_site(8, seed=3, size=16, depth=4)
    mean, std = clinical_stats(data)
    model = FusionResNet(spatial_dims=3, norm="group", widen_factor=0.25)
    out = train(model, data, _cfg(**{"batch-size": 4}), mean, std)
    assert out["num_examples"] == 8 and np.isfinite(out["loss"])
    assert predict_proba(model, data, mean, std, _cfg()).shape == (8,)


# --- it learns ------------------------------------------------------------------------------------

def _chance_bound(y: np.ndarray) -> float:
    """One-sided 99.9 % upper bound of the AUC of a useless scorer (Hanley-McNeil null variance)."""
    n1, n0 = int(y.sum()), int(len(y) - y.sum())
    return 0.5 + 3.09 * np.sqrt((n0 + n1 + 1) / (12 * n0 * n1))


@pytest.mark.parametrize("use_clinical", [False, True], ids=["mri-dl", "combined-dl"])
def test_short_training_run_learns_held_out(use_clinical):
    train_site, test_site = phantom_site(96, seed=11), phantom_site(100, seed=12)
    mean, std = clinical_stats(train_site)
    cfg = load_config(cli={"device": "cpu", "seed": 0})  # project defaults: resnet10, instance norm, batch 16
    model = build_model(cfg, n_channels=3, spatial_dims=2, n_clinical=7, use_clinical=use_clinical)
    before, _ = evaluate(model, test_site, mean, std, cfg)
    train(model, train_site, cfg, mean, std, epochs=4)
    after, _ = evaluate(model, test_site, mean, std, cfg)
    bound = _chance_bound(test_site.labels)
    assert bound < 0.72
    assert after["auc"] > max(0.75, bound), (before, after)


# --- on the real pipeline: synthetic DICOM cohort -> prepare -> cache -> train ---------------------

@pytest.fixture(scope="module")
def tiny_caches(tmp_path_factory):
    from client.cache import load_cache
    from client.prepare import prepare_site
    from simulation.synth import generate_cohort

    root = tmp_path_factory.mktemp("tiny-cohort")
    generate_cohort(root / "sites", preset="tiny", seed=0, progress=False, workers=1)
    out = {}
    for site in ("center-primary", "center-external"):
        prepare_site(root / "sites" / site, root / "cache" / site, progress=False)
        out[site] = load_cache(root / "cache" / site)
    return out


def test_prepared_cache_trains_and_can_be_fitted(tiny_caches):
    """The model consumes what `prepare` writes, and can fit its training set (memorisation check;
    the tiny cohort is too small for a held-out claim, which the phantom test above makes)."""
    primary, external = tiny_caches["center-primary"], tiny_caches["center-external"]
    mean, std = clinical_stats(primary)
    cfg = load_config(cli={"device": "cpu", "seed": 0, "augment": False, "batch-size": 4, "lr": 3e-3})
    model = build_model(cfg, n_channels=primary.images.shape[1], spatial_dims=primary.images.ndim - 2,
                        n_clinical=primary.clinical.shape[1], use_clinical=False)
    first = train(model, primary, cfg, mean, std, epochs=1)
    last = train(model, primary, cfg, mean, std, epochs=12)
    fitted, _ = evaluate(model, primary, mean, std, cfg)
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert fitted["auc"] == 1.0
    metrics, probs = evaluate(model, external, mean, std, cfg)
    assert metrics["num_examples"] == len(external) and probs.shape == (len(external),)


# --- benchmark helpers -----------------------------------------------------------------------------

def test_fedavg_is_example_weighted():
    from simulation.bench_train import fedavg

    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([3.0, 1.0]), "n": torch.tensor(5)}
    out = fedavg([a, b], [1, 2])
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 2.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 4  # (2 + 10) / 3, rounded


def test_bench_train_command_prints_figures(capsys):
    from common.cli import main

    rc = main(["bench", "train", "--runs", "1", "--epochs", "1", "--patients", "8", "--batch-size", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    for line in ("bare PyTorch loop", "train() augment=on", "train() augment=off", "peak memory: max RSS"):
        assert line in out
    assert main(["bench", "train", "--runs", "0"]) == 2


def test_each_ensemble_member_trains_exactly_as_it_would_alone(site):
    """ensemble-size: member i is the network trained alone with its own seed (batch order,
    augmentation, dropout); member 0 with the fit's own seed, i.e. exactly the single model."""
    cfg = _cfg(augment=True)
    mean, std = clinical_stats(site)

    def net(seed):
        torch.manual_seed(seed)
        return FusionResNet(norm="group", widen_factor=0.25, use_clinical=True)

    ens = EnsembleNet([net(1), net(2)])
    out = train(ens, site, cfg, mean, std, epochs=1, seed=3)
    losses = []
    for i, (init, member) in enumerate(zip((1, 2), ens.members)):
        alone = net(init)
        losses.append(train(alone, site, cfg, mean, std, epochs=1, seed=member_seed(3, i))["loss"])
        assert torch.equal(_flat(member), _flat(alone))
    assert member_seed(3, 0) == 3 and member_seed(3, 1) != 3
    assert out["loss"] == pytest.approx(np.mean(losses)) and out["num_examples"] == len(site)
    # FedProx: each member is held near its own part of the global weights (sent as Flower's array list)
    anchor = EnsembleNet([net(1), net(2)])
    prox, free = EnsembleNet([net(1), net(2)]), EnsembleNet([net(1), net(2)])
    train(prox, site, _cfg(**{"fedprox-mu": 100.0}), mean, std, epochs=1, seed=3,
          global_params=[v.numpy() for v in anchor.state_dict().values()])
    train(free, site, cfg, mean, std, epochs=1, seed=3)
    moved = lambda m: float((_flat(m.members[1]) - _flat(anchor.members[1])).norm())  # noqa: E731
    assert 0 < moved(prox) < 0.5 * moved(free)


def test_default_augmentation_is_spatial_only_and_intensity_jitter_is_a_setting():
    """ADC is on a physical scale and the 4th channel is the 0/1 mask: by default nothing rescales them."""
    from client.train import make_augment

    x = torch.rand(4, 4, 16, 16)
    spatial = make_augment(2, load_config())
    assert spatial.intensity_scale == 0 and spatial.intensity_shift == 0
    out = spatial(x, torch.Generator().manual_seed(3))
    want = spatial.warp(x, spatial.theta(4, torch.Generator().manual_seed(3)))
    assert torch.equal(out, want)
    jitter = make_augment(2, load_config(cli={"augment-intensity": 0.1}))
    assert not torch.equal(jitter(x, torch.Generator().manual_seed(3)), want)
    assert make_augment(2, load_config(cli={"augment": False})) is None
