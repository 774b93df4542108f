"""FusionResNet / build_model: shapes, norm choices, fusion behaviour, seeding, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.config import load_config
from common.model import EnsembleNet, FusionResNet, build_model, norm_spec, roi_input_stats, roi_mask


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("norm,layer", [("batch", nn.BatchNorm2d), ("instance", nn.InstanceNorm2d), ("group", nn.GroupNorm)])
def test_2d_forward_shape_and_norm_layer(norm, layer):
    m = FusionResNet(n_channels=3, n_clinical=7, spatial_dims=2, norm=norm).eval()
    out = m(torch.randn(3, 3, 64, 64), torch.randn(3, 7))
    assert out.shape == (3,) and torch.isfinite(out).all()
    norms = [mod for mod in m.backbone.modules() if isinstance(mod, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm))]
    assert norms and all(type(mod) is layer for mod in norms)
    assert all(mod.weight is not None for mod in norms)  # affine everywhere, so FedAvg averages real parameters
    if norm == "group":
        assert {mod.num_groups for mod in norms} == {32}


def test_3d_forward_and_channel_count():
    m = FusionResNet(n_channels=2, spatial_dims=3, norm="group", widen_factor=0.25).eval()
    assert m(torch.randn(2, 2, 8, 32, 32), torch.randn(2, 7)).shape == (2,)
    assert m.backbone.conv1.in_channels == 2 and isinstance(m.backbone.conv1, nn.Conv3d)


def test_backbone_depths_differ():
    sizes = [_n_params(FusionResNet(backbone=b)) for b in ("resnet10", "resnet18", "resnet34")]
    assert sizes[0] < sizes[1] < sizes[2]


def test_group_norm_groups_divide_narrow_widths():
    assert norm_spec("group", 16) == ("group", {"num_groups": 16})
    m = FusionResNet(norm="group", widen_factor=0.25)
    assert m(torch.randn(2, 3, 32, 32), torch.randn(2, 7)).shape == (2,)


def test_mri_only_model_ignores_clinical_and_combined_uses_it():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    dl = FusionResNet(use_clinical=False).eval()
    assert dl.clinical_embed is None
    with torch.no_grad():
        a, b, c = dl(x, torch.randn(4, 7)), dl(x, torch.randn(4, 7)), dl(x)
    assert torch.equal(a, b) and torch.equal(a, c)
    combined = FusionResNet(use_clinical=True).eval()
    with torch.no_grad():
        assert not torch.allclose(combined(x, torch.randn(4, 7)), combined(x, torch.randn(4, 7)))


def test_gradients_reach_backbone_and_clinical_embedding():
    m = FusionResNet(norm="batch")
    m(torch.randn(4, 3, 64, 64), torch.randn(4, 7)).sum().backward()
    assert m.backbone.conv1.weight.grad.abs().sum() > 0
    assert m.clinical_embed[0].weight.grad.abs().sum() > 0


def test_no_pretrained_weights_are_fetched(monkeypatch):
    import monai.networks.nets.resnet as monai_resnet

    def forbidden(*a, **k):
        raise AssertionError("tried to download pretrained weights")

    monkeypatch.setattr(monai_resnet, "get_pretrained_resnet_medicalnet", forbidden)
    for backbone in ("resnet10", "resnet18", "resnet34"):
        FusionResNet(spatial_dims=3, n_channels=1, backbone=backbone, widen_factor=0.25)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(backbone="resnet50"), "backbone: expected one of resnet10, resnet18, resnet34, found 'resnet50'"),
        (dict(norm="layer"), "norm: expected one of batch, instance, group, found 'layer'"),
        (dict(spatial_dims=1), "spatial_dims: expected 2 or 3, found 1"),
        (dict(n_channels=0), "n_channels"),
        (dict(clinical_embed_dim=0), "clinical_embed_dim"),
    ],
)
def test_bad_construction_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusionResNet(**kwargs)


def test_bad_inputs_are_clear_errors():
    m = FusionResNet(n_channels=3).eval()
    with pytest.raises(ValueError, match=r"image: expected N x 3 x H x W, found shape \(2, 2, 64, 64\)"):
        m(torch.randn(2, 2, 64, 64), torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"instance norm needs more than one voxel .* found spatial shape \(32, 32\)"):
        m(torch.randn(2, 3, 32, 32), torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"clinical: expected shape \(2, 7\), found None"):
        m(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"clinical: expected shape \(2, 7\), found \(2, 5\)"):
        m(torch.randn(2, 3, 64, 64), torch.randn(2, 5))


def test_build_model_reads_config_and_is_seeded():
    cfg = load_config(cli={"backbone": "resnet18", "norm": "group", "clinical-embed-dim": 8, "seed": 3, "ensemble-size": 1})
    before = torch.random.get_rng_state()
    m1 = build_model(cfg, n_channels=3, spatial_dims=2, n_clinical=7, use_clinical=True)
    assert torch.equal(before, torch.random.get_rng_state())  # global RNG untouched
    m2 = build_model(cfg, n_channels=3, spatial_dims=2, n_clinical=7, use_clinical=True)
    m3 = build_model({**cfg, "seed": 4}, n_channels=3, spatial_dims=2, n_clinical=7, use_clinical=True)
    assert m1.config["backbone"] == "resnet18" and m1.clinical_embed[0].out_features == 8
    assert any(isinstance(mod, nn.GroupNorm) for mod in m1.modules())
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    dl = build_model(cfg, n_channels=3, spatial_dims=2, n_clinical=7, use_clinical=False)
    assert dl.clinical_embed is None


def test_combined_model_warm_started_from_cf_predicts_exactly_the_cf_model():
    from common.logistic import LogisticCF

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 7)).astype(np.float32)
    y = (x[:, 3] + rng.normal(size=40) > 0).astype(int)
    cf = LogisticCF(l2=0.1).fit(x, y)
    cfg = load_config(cli={"seed": 1})
    net = build_model(cfg, n_channels=3, spatial_dims=2, n_clinical=7, use_clinical=True).eval()
    net.start_from_logistic(cf.coef_)
    images = torch.randn(40, 3, 64, 64)
    with torch.no_grad():
        p = torch.sigmoid(net(images, torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(p, cf.predict_proba(x), atol=1e-5)
    with pytest.raises(ValueError, match="expected 8 coefficients, found 3"):
        net.start_from_logistic([0.0, 1.0, 2.0])


@pytest.mark.parametrize("backbone", ["resnet10", "resnet18", "resnet34"])
def test_out_of_place_blocks_equal_monai_resnet_bit_for_bit(backbone):
    """The out-of-place blocks (needed by Opacus) change nothing: same initial weights as MONAI's own
    factory for the same seed, and the same outputs and gradients as MONAI's in-place block."""
    from monai.networks.nets import resnet10, resnet18, resnet34
    from monai.networks.nets.resnet import ResNetBlock

    from common.model import OutOfPlaceResNetBlock

    factory = {"resnet10": resnet10, "resnet18": resnet18, "resnet34": resnet34}[backbone]
    # same seed, same construction order -> the same initial weights as MONAI's factory
    torch.manual_seed(3)
    ref = factory(pretrained=False, spatial_dims=2, n_input_channels=3, feed_forward=False, conv1_t_size=7, conv1_t_stride=2)
    torch.manual_seed(3)
    ours = FusionResNet(backbone=backbone, norm="batch").backbone  # "batch": MONAI's own norm, nothing swapped
    assert list(ref.state_dict()) == list(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ours.state_dict().values()))

    # the same weights run through MONAI's in-place block: outputs and gradients bit-identical
    ours_instance = FusionResNet(backbone=backbone, norm="instance", use_clinical=False)
    inplace = FusionResNet(backbone=backbone, norm="instance", use_clinical=False)
    inplace.load_state_dict(ours_instance.state_dict())
    blocks = [m for m in inplace.modules() if isinstance(m, OutOfPlaceResNetBlock)]
    assert blocks
    for m in blocks:
        m.__class__ = ResNetBlock
        m.act = nn.ReLU(inplace=True)
    inplace.backbone.act = nn.ReLU(inplace=True)
    x = torch.randn(4, 3, 64, 64)
    outs, grads = [], []
    for net in (ours_instance, inplace):
        net.train()
        torch.manual_seed(0)  # dropout
        out = net(x)
        out.sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in net.parameters()])
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# ---- ROI pooling (issue 17) --------------------------------------------------------------------------
def test_roi_channels_are_found_by_name():
    from common.model import roi_channels

    assert roi_channels(["t2", "dwi", "adc", "mask"]) == [3]
    assert roi_channels(["t2-1", "t2", "t2+1", "adc-1", "adc", "adc+1", "mask-1", "mask", "mask+1"]) == [6, 7, 8]
    assert roi_channels(["t2", "dwi", "adc"]) == [] and roi_channels(None) == []
    assert roi_channels(["t2", "masked-t2"]) == []  # a name that only starts with "mask" is not the mask


def _stage_maps(net, image):
    maps = {}
    hooks = [getattr(net.backbone, n).register_forward_hook(lambda m, i, o, n=n: maps.__setitem__(n, o))
             for n in ("layer2", "layer3")]
    try:
        pooled = net._roi_features(image, roi_mask(image, net.roi_channels))
    finally:
        for h in hooks:
            h.remove()
    return pooled, maps


def test_roi_pooling_is_monai_forward_plus_the_stage_means_inside_the_roi():
    torch.manual_seed(0)
    net = FusionResNet(n_channels=4, widen_factor=0.25, roi_channels=(3,)).eval()
    image = torch.rand(2, 4, 64, 64)
    image[:, 3] = 0
    image[:, 3, :32, :32] = 1  # the ROI: the top-left quadrant, 4 x 4 cells of layer2's 8 x 8 grid, 2 x 2 of layer3's
    with torch.no_grad():
        pooled, maps = _stage_maps(net, image)
        assert torch.equal(pooled[:, :128], net.backbone(image))  # the global average: MONAI's own forward
        l2, l3 = maps["layer2"], maps["layer3"]
        want = torch.cat([l2[:, :, :4, :4].mean((2, 3)), l3[:, :, :2, :2].mean((2, 3))], 1)
        # the pooled weights sum to the ROI area plus ROI_POOL_EPS: exact up to that
        torch.testing.assert_close(pooled[:, 128:], want, rtol=1e-3, atol=1e-4)
        assert not torch.allclose(pooled[:, 128:160], l2.mean((2, 3)), atol=1e-3)  # not the global mean
        image[:, 3] = 1  # an ROI over everything pools like the global average of each stage
        pooled, maps = _stage_maps(net, image)
        torch.testing.assert_close(pooled[:, 128:160], maps["layer2"].mean((2, 3)), rtol=1e-3, atol=1e-4)


def test_build_model_pools_inside_the_roi_when_the_input_has_the_mask_and_the_config_says_so():
    cfg = load_config(cli={"widen-factor": 0.25, "ensemble-size": 1})
    with_mask = ["t2", "dwi", "adc", "mask"]
    assert build_model(cfg, 4, 2, 7, False, channels=with_mask).roi_channels == (3,)
    assert build_model({**cfg, "roi-pooling": False}, 4, 2, 7, False, channels=with_mask).roi_channels == ()
    assert build_model(cfg, 3, 2, 7, False, channels=["t2", "dwi", "adc"]).roi_channels == ()
    n_stats = _n_params(build_model(cfg, 4, 2, 7, True, channels=with_mask))
    n_roi = _n_params(build_model({**cfg, "roi-stats": False}, 4, 2, 7, True, channels=with_mask))
    n_plain = _n_params(build_model({**cfg, "roi-pooling": False}, 4, 2, 7, True, channels=with_mask))
    assert n_roi - n_plain == (32 + 64) * 64  # the head's first layer reads the 32 + 64 ROI means too
    assert n_stats - n_roi == 6 * 64 + 6 + 1  # ... and the 6 ROI statistics, which also get a linear term
    net3d = build_model({**cfg, "norm": "group"}, 4, 3, 7, True, channels=with_mask).eval()
    x = torch.rand(2, 4, 8, 32, 32)
    x[:, 3] = (x[:, 3] > 0.5).float()
    assert net3d(x, torch.randn(2, 7)).shape == (2,)
    with pytest.raises(ValueError, match="roi_channels"):
        FusionResNet(n_channels=3, roi_channels=(3,))


@pytest.mark.parametrize("members,roi_stats", [(1, False), (2, False), (2, True)])
def test_combined_made_of_dl_and_cf_gives_the_sum_of_their_logits(members, roi_stats):
    """One network, or an ensemble built member by member, with or without the ROI statistics' terms
    (trained weights and standardisation): the Combined logit is DL's + CF's."""
    cfg = load_config(cli={"widen-factor": 0.25, "ensemble-size": members, "roi-stats": roi_stats})
    ch = ["t2", "dwi", "adc", "mask"]
    dl = build_model({**cfg, "seed": 5}, 4, 2, 7, use_clinical=False, channels=ch).eval()
    if roi_stats:  # as after training: the linear term is no longer 0, the standardisation not the default
        for m in dl.members:
            torch.nn.init.normal_(m.roi_stats_linear.weight)
        dl.set_roi_standardisation(torch.rand(6), torch.rand(6) + 0.1)
    combined = build_model(cfg, 4, 2, 7, use_clinical=True, channels=ch).eval()
    beta = torch.randn(8)
    combined.start_from_parts(dl, beta)
    x, z = torch.rand(3, 4, 64, 64), torch.randn(3, 7)
    x[:, 3] = (x[:, 3] > 0.5).float()
    with torch.no_grad():
        torch.testing.assert_close(combined(x, z), dl(x) + beta[0] + z @ beta[1:], rtol=1e-5, atol=1e-5)
    other = build_model({**cfg, "widen-factor": 0.5}, 4, 2, 7, use_clinical=False, channels=ch)
    with pytest.raises(ValueError, match="image part"):
        combined.start_from_parts(other, beta)
    with pytest.raises(ValueError, match="coefficients"):
        combined.start_from_parts(dl, beta[:5])
    if members > 1:
        single = build_model({**cfg, "ensemble-size": 1}, 4, 2, 7, use_clinical=False, channels=ch)
        with pytest.raises(ValueError, match=f"ensemble of {members} members, found 1"):
            combined.start_from_parts(single, beta)


def test_an_ensemble_predicts_its_members_mean_logit_and_member_0_is_the_single_model():
    cfg = load_config(cli={"widen-factor": 0.25, "ensemble-size": 3, "seed": 7})
    ch = ["t2", "dwi", "adc", "mask"]
    ens = build_model(cfg, 4, 2, 7, use_clinical=False, channels=ch).eval()
    single = build_model({**cfg, "ensemble-size": 1}, 4, 2, 7, use_clinical=False, channels=ch).eval()
    assert isinstance(ens, EnsembleNet) and isinstance(single, FusionResNet) and len(ens.members) == 3
    first = ens.members[0].state_dict()
    assert all(torch.equal(first[k], v) for k, v in single.state_dict().items())  # the same seed, the same net
    other = ens.members[1].state_dict()
    assert not all(torch.equal(other[k], v) for k, v in first.items())  # members differ in their initial weights
    x = torch.rand(3, 4, 64, 64)
    x[:, 3] = (x[:, 3] > 0.5).float()
    with torch.no_grad():
        each = torch.stack([m(x) for m in ens.members], dim=1)
        torch.testing.assert_close(ens.member_logits(x), each)
        torch.testing.assert_close(ens(x), each.mean(dim=1))
        torch.testing.assert_close(ens.members[0](x), single(x))
    assert all(m.roi_channels == (3,) for m in ens.members)
    with pytest.raises(ValueError, match="ensemble-size"):
        build_model({**cfg, "ensemble-size": 0}, 4, 2, 7, use_clinical=False, channels=ch)
    with pytest.raises(ValueError, match="same network"):
        EnsembleNet([FusionResNet(n_channels=4), FusionResNet(n_channels=3)])


def test_every_bench_model_candidate_is_a_valid_study_and_prepare_config():
    """`slmfed bench model` candidates are plain config keys: a renamed or mistyped key fails here, not
    20 minutes into the benchmark."""
    from simulation.bench_model import CANDIDATES, candidate_settings

    settings = candidate_settings("all")
    assert set(settings) == set(CANDIDATES) and settings["chosen"] == {}
    for name, keys in settings.items():
        cfg = load_config(cli=keys)
        assert all(cfg[k] == v for k, v in keys.items()), name
    assert settings["v0"]["mask-channel"] is False and load_config()["mask-channel"] is True
    assert load_config(cli=settings["sum"])["swa-rounds"] == 0 and load_config()["swa-rounds"] == 4
    assert load_config(cli=settings["swa"])["ensemble-size"] == 1 and load_config()["ensemble-size"] == 3
    with pytest.raises(SystemExit, match="unknown candidate"):
        candidate_settings("chosen,bogus")


def test_roi_input_stats_are_each_channels_mean_and_sd_inside_the_mask():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(2, 3, 12, 12)).astype(np.float32)
    mask = np.zeros((2, 1, 12, 12), np.float32)
    mask[0, 0, 2:7, 3:9] = 1
    mask[1, 0, 5:11, 1:4] = 1
    x = torch.from_numpy(np.concatenate([image, mask], axis=1))  # the mask as the 4th channel, as prepared
    got = roi_input_stats(x, (3,), roi_mask(x, (3,))).numpy()
    for n in range(2):
        inside = image[n][:, mask[n, 0] > 0]  # channels x ROI pixels
        np.testing.assert_allclose(got[n], np.concatenate([inside.mean(1), inside.std(1)]), rtol=1e-3, atol=1e-5)


def test_roi_stats_model_sees_the_absolute_level_inside_the_roi_and_keeps_its_standardisation():
    """The ROI statistics carry the absolute level the instance-normalised ResNet discards: raising the
    ADC inside the ROI by one standardisation SD moves the logit by the linear term's weight on it."""
    cfg = load_config(cli={"widen-factor": 0.25, "ensemble-size": 1, "roi-stats": True, "seed": 2})
    ch = ["t2", "dwi", "adc", "mask"]
    net = build_model(cfg, 4, 2, 7, use_clinical=False, channels=ch).eval()
    assert net.config["roi_stats"] and net.roi_stats_linear is not None
    torch.testing.assert_close(net.roi_stats_linear.weight, torch.zeros(1, 6))  # starts as the model without it
    net.set_roi_standardisation([0.3, 0.8, 0.3, 0.1, 0.15, 0.05], [0.1, 0.05, 0.04, 0.03, 0.02, 0.01])
    state = net.state_dict()
    assert {"roi_stats_mean", "roi_stats_std"} <= set(state)  # travels with the weights (FedAvg, bundle)
    again = build_model(cfg, 4, 2, 7, use_clinical=False, channels=ch)
    again.load_state_dict(state)
    torch.testing.assert_close(again.roi_stats_std, net.roi_stats_std)
    with torch.no_grad():
        net.roi_stats_linear.weight.zero_()
        net.roi_stats_linear.weight[0, 2] = 1.0  # the ROI's mean ADC, in standardised units
    x = torch.rand(2, 4, 64, 64) * 0.5
    x[:, 3] = 0
    x[:, 3, 20:40, 24:44] = 1
    brighter = x.clone()
    brighter[:, 2] += 0.04 * x[:, 3]  # + one SD of the ROI's mean ADC, inside the ROI only
    with torch.no_grad():
        net.roi_stats_linear.weight[0, 2] = 0.0
        blind = net(brighter) - net(x)
        net.roi_stats_linear.weight[0, 2] = 1.0
        seen = net(brighter) - net(x)
    torch.testing.assert_close(seen - blind, torch.full((2,), 1.0), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="expected 6 means"):
        net.set_roi_standardisation([0.0] * 5, [1.0] * 5)
    with pytest.raises(ValueError, match="positive"):
        net.set_roi_standardisation([0.0] * 6, [1.0] * 5 + [0.0])
    no_mask = build_model(cfg, 3, 2, 7, use_clinical=False, channels=ch[:3])
    assert not no_mask.config["roi_stats"]  # like roi-pooling: only with the mask channel
    with pytest.raises(ValueError, match="no ROI statistics"):
        no_mask.set_roi_standardisation([0.0] * 6, [1.0] * 6)
