"""The ResNet fusion model behind the paper's "MRI DL" and "Combined DL" models.

A MONAI ResNet (resnet10/18/34 depths, basic blocks without in-place operations, 2D or 3D, one input channel per MRI sequence, no pretrained
weights: nothing is ever downloaded) turns the tumour crop into a pooled feature vector. The
Combined model concatenates a small embedding of the standardised clinical vector
(common.clinical.FEATURE_NAMES) to it; a two-layer head gives one logit, to which the Combined
model adds a linear term of the clinical vector ("wide and deep" fusion: without it the clinical
signal was diluted among 512 image features and the Combined model did no better than CF on the
synthetic paper cohort, 0.779 vs 0.781 out-of-fold AUC). `use_clinical=False`
is the image-only "MRI DL" model: same backbone and head, the clinical input is ignored.

When the input carries the tumour ROI mask as channels (`slmfed prepare` with mask-channel, the
default; build_model finds them by name), the pooled vector also holds the mean of the second and
third residual stages' feature maps inside the ROI ("ROI pooling"): the global average alone mixes
the tumour with the rectal wall and fat around it, and the tumour's own ADC, texture and margin are
what carries the signal. With roi-stats (the default), the model also gets the ROI mean and SD of
each input image channel (T2WI, DWI, ADC), standardised with the pooled mean / SD over the fit's
training patients (the coordinator computes them from the sites' sums, as for the clinical vector,
and puts them in the weights as buffers); they go to the head and, as a linear term, straight to the
logit. Why: the ResNet is instance-normalised, which removes each image's absolute intensity level,
and the network trained on ~140 patients learned the tumour's size and little else (its out-of-fold
logit correlated 0.94 with the log ROI volume), while the ROI's mean ADC, in physical units, carries
signal that the size does not (measured: simulation/README.md "The MRI model"). Width: MONAI's widen_factor (config widen-factor, default 0.25: stages
16-128 wide): on the synthetic paper cohort narrower was not worse and is several times cheaper
to train. What each of these choices gained is measured with `slmfed bench model` (simulation/README.md, "The MRI
model").

Design choices (the paper's abstract does not give them):
- Stem: MONAI's default 7x7 stride-2 convolution + max-pool. For the default 64x64 crop the
  last stage works on 2x2 maps, which keeps a CPU-only site at ~120 samples/s (resnet10, one
  thread); `small_input_stem=True` switches to a 3x3 stride-1 stem (4x4 last stage) that keeps
  finer texture at ~2.7x the compute. On the phantom (96 training / 100 held-out patients, 4
  epochs, MRI-only, 3 seeds) it did not help: held-out AUC median 0.826 vs 0.832 for the default.
- Normalisation is selectable because BatchNorm running statistics averaged by FedAvg across
  small sites with different scanners are a known failure mode. "instance" uses affine
  InstanceNorm (MONAI's plain "instance" has no affine parameters and breaks MONAI's ResNet
  initialisation); "group" uses gcd(32, narrowest stage width) groups, i.e. 32 groups
  (Wu & He 2018) for the standard widths.
  MONAI 1.6.1's ResNet applies its `norm` argument to the stem only (`_make_layer` is called
  without it, so every residual block gets BatchNorm); `_swap_norms` replaces those layers so the
  chosen normalisation really is used throughout.
  Measured with `slmfed bench train --compare-norm --threads 1` (2-site FedAvg, sites of 96 and 57
  phantom patients whose scanners differ in intensity gain / offset / noise, 6 rounds x 1 local
  epoch, MRI-only resnet10, held-out 120 patients from both scanners, 2 seeds; median final AUC):
      instance 0.824 (mean over rounds 0.787)   group 0.814 (0.800)   batch 0.726 (0.717)
  BatchNorm was the worst and unstable from round to round (0.645-0.807); instance and group are
  within noise of each other. Default: "instance" (the config default). Instance norm needs more
  than one voxel in the last stage, i.e. crops larger than the total stride (32 px by default);
  forward() says so clearly.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import get_norm_layer
from monai.networks.nets.resnet import ResNet, ResNetBlock, get_inplanes
from torch import nn

from common.config import BACKBONE_DEPTHS

# basic-block depths of MONAI's resnet10 / resnet18 / resnet34 factories
BACKBONES = {name: list(depths) for name, depths in BACKBONE_DEPTHS.items()}
NORMS = ("batch", "instance", "group")
GROUP_NORM_GROUPS = 32
ROI_POOL_EPS = 1e-3  # in mask-area units of the pooled grid: an empty ROI gives 0 features, not NaN
ROI_STATS_VAR_EPS = 1e-6  # keeps the SD's gradient finite for a flat ROI


def norm_spec(norm: str, min_channels: int) -> tuple[str, dict[str, Any]]:
    """MONAI norm argument for `norm`, valid for every stage width (all multiples of min_channels)."""
    if norm == "batch":
        return ("batch", {})
    if norm == "instance":
        return ("instance", {"affine": True})
    if norm == "group":
        return ("group", {"num_groups": math.gcd(GROUP_NORM_GROUPS, min_channels)})
    raise ValueError(f"norm: expected one of {', '.join(NORMS)}, found {norm!r}")


class OutOfPlaceResNetBlock(ResNetBlock):
    """MONAI's basic block without in-place operations.

    MONAI adds the residual in place (`out += residual`) after an in-place ReLU; every Opacus
    grad-sample mode (DP-SGD, client/dp.py) rejects that ("Output 0 of BackwardHookFunction is a view
    and is being modified inplace"). The same additions and ReLUs out of place give bit-identical
    outputs, gradients and initial weights (tests/test_model.py checks this against MONAI's block)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.act = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(out + residual)


def _swap_norms(module: nn.Module, norm: tuple[str, dict[str, Any]], spatial_dims: int) -> None:
    """Replace every BatchNorm left by MONAI's ResNet with the chosen norm layer (same width)."""
    if norm[0] == "batch":
        return
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=child.num_features))
        else:
            _swap_norms(child, norm, spatial_dims)


class FusionResNet(nn.Module):
    """MONAI ResNet image features (+ clinical embedding) -> one logit per patient."""

    def __init__(
        self,
        n_channels: int = 3,
        n_clinical: int = 7,
        spatial_dims: int = 2,
        backbone: str = "resnet10",
        norm: str = "instance",
        use_clinical: bool = True,
        clinical_embed_dim: int = 16,
        *,
        widen_factor: float = 1.0,
        small_input_stem: bool = False,
        head_hidden: int = 64,
        dropout: float = 0.2,
        roi_channels: Sequence[int] = (),
        roi_stats: bool = False,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone: expected one of {', '.join(BACKBONES)}, found {backbone!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, found {spatial_dims!r}")
        if n_channels < 1:
            raise ValueError(f"n_channels: expected >= 1 (one per MRI sequence), found {n_channels!r}")
        roi_channels = tuple(int(c) for c in roi_channels)
        if any(not 0 <= c < n_channels for c in roi_channels):
            raise ValueError(f"roi_channels: expected indices in [0, {n_channels}), found {roi_channels}")
        if use_clinical and (n_clinical < 1 or clinical_embed_dim < 1):
            raise ValueError(
                f"use_clinical=True needs n_clinical >= 1 and clinical_embed_dim >= 1, "
                f"found {n_clinical} and {clinical_embed_dim}"
            )
        min_width = int(64 * widen_factor)  # MONAI's first stage width is 64 * widen_factor
        if min_width < 1:
            raise ValueError(f"widen_factor: expected a value giving >= 1 channel, found {widen_factor!r}")
        stem = (
            dict(conv1_t_size=3, conv1_t_stride=1, no_max_pool=False)
            if small_input_stem
            else dict(conv1_t_size=7, conv1_t_stride=2, no_max_pool=False)
        )
        self.config = dict(
            n_channels=n_channels, n_clinical=n_clinical, spatial_dims=spatial_dims, backbone=backbone,
            norm=norm, use_clinical=use_clinical, clinical_embed_dim=clinical_embed_dim,
            widen_factor=widen_factor, small_input_stem=small_input_stem, roi_channels=list(roi_channels),
            roi_stats=bool(roi_stats),
        )
        if roi_stats and not roi_channels:
            raise ValueError("roi_stats: needs the ROI mask channels (roi_channels)")
        self.roi_channels = roi_channels
        self.spatial_dims = spatial_dims
        self.total_stride = 16 if small_input_stem else 32  # stem (+ max-pool) and three stride-2 stages
        self.n_channels = n_channels
        self.n_clinical = n_clinical
        self.use_clinical = use_clinical
        norm_arg = norm_spec(norm, min_width)
        self.backbone = ResNet(
            OutOfPlaceResNetBlock,
            BACKBONES[backbone],
            get_inplanes(),
            spatial_dims=spatial_dims,
            n_input_channels=n_channels,
            feed_forward=False,
            widen_factor=widen_factor,
            norm=norm_arg,
            act=("relu", {"inplace": False}),
            **stem,
        )
        _swap_norms(self.backbone, norm_arg, spatial_dims)
        n_image = int(512 * widen_factor)  # basic blocks: last stage width = 512 * widen_factor
        if roi_channels:  # + the ROI means of the 2nd and 3rd stages (128 and 256 * widen_factor wide)
            n_image += int(128 * widen_factor) + int(256 * widen_factor)
        self.roi_stats_linear = None
        if roi_stats:  # + the standardised ROI mean and SD of each image channel, to the head and linearly
            k = 2 * (n_channels - len(roi_channels))
            n_image += k
            self.register_buffer("roi_stats_mean", torch.zeros(k))
            self.register_buffer("roi_stats_std", torch.ones(k))
            self.roi_stats_linear = nn.Linear(k, 1)
            nn.init.zeros_(self.roi_stats_linear.weight)
            nn.init.zeros_(self.roi_stats_linear.bias)
        if use_clinical:
            self.clinical_embed = nn.Sequential(nn.Linear(n_clinical, clinical_embed_dim), nn.ReLU())
            # "wide and deep": a linear clinical term added to the logit, so the Combined model can
            # represent the CF logistic model exactly and the image branch only has to add to it
            self.clinical_linear = nn.Linear(n_clinical, 1)
            nn.init.zeros_(self.clinical_linear.weight)  # grows from 0 unless warm-started from CF
            nn.init.zeros_(self.clinical_linear.bias)
            n_fused = n_image + clinical_embed_dim
        else:
            self.clinical_embed = None
            self.clinical_linear = None
            n_fused = n_image
        self.head = nn.Sequential(
            nn.Linear(n_fused, head_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(head_hidden, 1)
        )

    @torch.no_grad()
    def set_roi_standardisation(self, mean, std) -> None:
        """The pooled mean / SD of the training patients' ROI statistics (roi_input_stats), as the
        coordinator computes them from the sites' sums like the clinical vector's; kept as buffers, so
        they travel with the weights into FedAvg, checkpoints and the model bundle."""
        if self.roi_stats_linear is None:
            raise ValueError("set_roi_standardisation: this model has no ROI statistics (roi_stats=False)")
        mean = torch.as_tensor(mean, dtype=self.roi_stats_mean.dtype).flatten()
        std = torch.as_tensor(std, dtype=self.roi_stats_std.dtype).flatten()
        k = self.roi_stats_mean.numel()
        if mean.numel() != k or std.numel() != k:
            raise ValueError(f"set_roi_standardisation: expected {k} means and SDs, found {mean.numel()} and {std.numel()}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("set_roi_standardisation: expected finite means and positive finite SDs")
        self.roi_stats_mean.copy_(mean)
        self.roi_stats_std.copy_(std)

    @torch.no_grad()
    def start_from_logistic(self, beta) -> None:
        """Warm start of the Combined model from a fitted CF model (beta = [intercept, slopes] on the
        same standardised clinical vector): the clinical linear term takes the CF coefficients and the
        image head's output layer starts at zero, so training begins at exactly the CF model's
        predictions and the image branch learns what it adds on top of them."""
        if self.clinical_linear is None:
            raise ValueError("start_from_logistic: the MRI-only model (use_clinical=False) has no clinical term")
        beta = torch.as_tensor(beta, dtype=self.clinical_linear.weight.dtype).flatten()
        if beta.numel() != self.n_clinical + 1:
            raise ValueError(f"start_from_logistic: expected {self.n_clinical + 1} coefficients, found {beta.numel()}")
        self.clinical_linear.bias.copy_(beta[:1])
        self.clinical_linear.weight.copy_(beta[1:].unsqueeze(0))
        self.head[-1].weight.zero_()
        self.head[-1].bias.zero_()

    @torch.no_grad()
    def start_from_parts(self, dl: "FusionResNet", beta) -> None:
        """The Combined model as the sum of a trained MRI DL model's logit and a fitted CF model's
        (config combined-from = "dl+cf"): backbone and head from `dl`, the clinical embedding's inputs
        to the head at zero, the clinical linear term = the CF coefficients. The DL model is trained
        with class-balanced BCE, so its logit estimates the image's log likelihood ratio, and adding it
        to the CF model's log-odds is the Bayes combination of the two (exact if they were independent
        given the outcome). Measured with `slmfed bench model` (synthetic paper cohort, primary CV,
        3 fold assignments): 0.853 for this sum against 0.837 for the Combined model trained from the
        CF start (candidates "sum" and "roi"); in an exploratory run outside the repository, 4 more
        rounds of training from the sum lowered it, so it is not trained further."""
        if self.clinical_linear is None or dl.clinical_linear is not None:
            raise ValueError("start_from_parts: expected a Combined model built from an MRI-only (use_clinical=False) model")
        image_part = lambda c: {k: v for k, v in c.items() if k not in ("use_clinical", "n_clinical", "clinical_embed_dim")}  # noqa: E731
        if image_part(dl.config) != image_part(self.config):
            raise ValueError(f"start_from_parts: the DL model's image part {image_part(dl.config)} differs from "
                             f"this model's {image_part(self.config)}")
        beta = torch.as_tensor(beta, dtype=self.clinical_linear.weight.dtype).flatten()
        if beta.numel() != self.n_clinical + 1:
            raise ValueError(f"start_from_parts: expected {self.n_clinical + 1} coefficients, found {beta.numel()}")
        self.backbone.load_state_dict(dl.backbone.state_dict())
        n_image = dl.head[0].in_features
        self.head[0].weight.zero_()
        self.head[0].weight[:, :n_image] = dl.head[0].weight
        self.head[0].bias.copy_(dl.head[0].bias)
        self.head[-1].load_state_dict(dl.head[-1].state_dict())
        if self.roi_stats_linear is not None:
            self.roi_stats_linear.load_state_dict(dl.roi_stats_linear.state_dict())
            self.set_roi_standardisation(dl.roi_stats_mean, dl.roi_stats_std)
        self.clinical_linear.bias.copy_(beta[:1])
        self.clinical_linear.weight.copy_(beta[1:].unsqueeze(0))

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        """image N x C x (D x) H x W, clinical N x F (standardised) -> logits (N,)."""
        if image.dim() != self.spatial_dims + 2 or image.shape[1] != self.n_channels:
            raise ValueError(
                f"image: expected N x {self.n_channels} x {'D x ' if self.spatial_dims == 3 else ''}H x W, "
                f"found shape {tuple(image.shape)}"
            )
        if self.config["norm"] == "instance" and math.prod(-(-n // self.total_stride) for n in image.shape[2:]) < 2:
            raise ValueError(
                f"image: instance norm needs more than one voxel in the last ResNet stage (total stride "
                f"{self.total_stride}), found spatial shape {tuple(image.shape[2:])}; use larger crops or norm group/batch"
            )
        mask = roi_mask(image, self.roi_channels) if self.roi_channels else None
        features = self._roi_features(image, mask) if self.roi_channels else self.backbone(image)
        wide = []  # linear terms added to the head's logit
        if self.roi_stats_linear is not None:
            stats = (roi_input_stats(image, self.roi_channels, mask) - self.roi_stats_mean) / self.roi_stats_std
            features = torch.cat([features, stats], dim=1)
            wide.append(self.roi_stats_linear(stats))
        if self.clinical_embed is not None:
            if clinical is None or clinical.dim() != 2 or clinical.shape != (image.shape[0], self.n_clinical):
                found = None if clinical is None else tuple(clinical.shape)
                raise ValueError(f"clinical: expected shape ({image.shape[0]}, {self.n_clinical}), found {found}")
            clinical = clinical.to(features.dtype)
            features = torch.cat([features, self.clinical_embed(clinical)], dim=1)
            wide.append(self.clinical_linear(clinical))
        return sum(wide, self.head(features)).squeeze(1)


    def _roi_features(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MONAI ResNet's forward, plus the mean of the layer2 and layer3 feature maps inside the ROI
        (the mask channels' mean, area-averaged onto each map's grid) beside the global average."""
        b = self.backbone
        x = b.act(b.bn1(b.conv1(image)))
        if not b.no_max_pool:
            x = b.maxpool(x)
        pool = F.adaptive_avg_pool3d if self.spatial_dims == 3 else F.adaptive_avg_pool2d
        dims = tuple(range(2, image.dim()))
        pooled = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(b, name)(x)
            if name in ("layer2", "layer3"):
                w = pool(mask, x.shape[2:])
                pooled.append((x * w).sum(dims) / (w.sum(dims) + ROI_POOL_EPS))
        return torch.cat([b.avgpool(x).flatten(1), *pooled], dim=1)


class EnsembleNet(nn.Module):
    """`ensemble-size` FusionResNets with different initial weights, each trained as if alone (its own
    batch order, augmentation and dropout: client/train.py); the prediction is their mean logit.

    Why: with ~140 training patients a single network's predictions depend on its seed; averaging 3
    independently trained members took the MRI DL model's primary CV AUC from 0.799 to 0.809 and the
    Combined model's from 0.855 to 0.863 (`slmfed bench model`, simulation/README.md "The MRI model"; members that
    shared the batches and differed only in their initial weights gained nothing). One module, one state_dict: FedAvg, the
    server's weight averaging (swa-rounds, per member since the keys are per member), checkpoints and
    the model bundle need nothing new. Member 0 has exactly the weights, and gets exactly the
    training, of the single model. Under DP-SGD the members share the Poisson batches and a patient's
    gradient over all members is clipped as one (client/dp.py), so the privacy accounting is that of
    one model."""

    def __init__(self, members: Sequence[FusionResNet]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"EnsembleNet: expected >= 2 members, found {len(members)}")
        if any(m.config != members[0].config for m in members):
            raise ValueError("EnsembleNet: every member must be the same network")
        self.members = nn.ModuleList(members)
        self.config = {**members[0].config, "ensemble_size": len(members)}

    def member_logits(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        """N x ensemble-size logits, one column per member."""
        return torch.stack([m(image, clinical) for m in self.members], dim=1)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        return self.member_logits(image, clinical).mean(dim=1)

    def set_roi_standardisation(self, mean, std) -> None:
        for m in self.members:
            m.set_roi_standardisation(mean, std)

    def start_from_logistic(self, beta) -> None:
        for m in self.members:
            m.start_from_logistic(beta)

    def start_from_parts(self, dl: "EnsembleNet", beta) -> None:
        """Member i = DL member i + the CF linear term, so the mean logit is the DL ensemble's + CF's."""
        if not isinstance(dl, EnsembleNet) or len(dl.members) != len(self.members):
            found = len(dl.members) if isinstance(dl, EnsembleNet) else 1
            raise ValueError(f"start_from_parts: expected a DL ensemble of {len(self.members)} members, found {found}")
        for m, d in zip(self.members, dl.members):
            m.start_from_parts(d, beta)


WIDE_LAYERS = ("roi_stats_linear", "clinical_linear")  # the linear terms DP-SGD trains with dp-train = wide


def has_wide_terms(model: nn.Module) -> bool:
    """Whether dp-train = wide has something to train: the ROI statistics' linear term (the MRI DL
    model's only input that does not go through the ResNet)."""
    nets = model.members if isinstance(model, EnsembleNet) else [model]
    return all(n.roi_stats_linear is not None for n in nets)


@torch.no_grad()
def make_wide(model: nn.Module) -> list[str]:
    """dp-train = wide: the model's logit becomes its linear terms alone (ROI statistics; + the clinical
    vector in the Combined model) - the image head's output layer set to 0 and, with every other weight,
    frozen at the value it came with (the seeded initial weights: nothing fitted on data). Why: DP-SGD
    at epsilon 3 over ~140 patients cannot train 300 k ResNet weights (simulation/README.md
    "Differential privacy"), while the 7 to 15 linear weights keep most of the ROI statistics' signal.
    Returns the names of the parameters left trainable."""
    nets = model.members if isinstance(model, EnsembleNet) else [model]
    for n in nets:
        if n.roi_stats_linear is None:
            raise ValueError("dp-train = wide needs the ROI statistics (roi-stats with the mask channel); "
                             "use dp-train = all")
        n.head[-1].weight.zero_()
        n.head[-1].bias.zero_()
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(f".{layer}." in f".{name}" for layer in WIDE_LAYERS))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def roi_mask(image: torch.Tensor, roi_channels: Sequence[int]) -> torch.Tensor:
    """N x 1 x spatial: the mean of the input's ROI mask channels (the ROI the model pools inside)."""
    return image[:, list(roi_channels)].mean(dim=1, keepdim=True)


def roi_input_stats(image: torch.Tensor, roi_channels: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
    """N x 2C: the mean, then the SD, inside `mask` (roi_mask) of each of the C input channels that are
    not ROI mask channels. The network's own features are instance-normalised per image, which
    removes the absolute intensity level; these keep it (ADC in physical units)."""
    image = image[:, [c for c in range(image.shape[1]) if c not in roi_channels]]
    dims = tuple(range(2, image.dim()))
    n = mask.sum(dims) + ROI_POOL_EPS
    mean = (image * mask).sum(dims) / n
    centred = image - mean.reshape(*mean.shape, *([1] * len(dims)))
    var = (centred**2 * mask).sum(dims) / n
    return torch.cat([mean, torch.sqrt(var + ROI_STATS_VAR_EPS)], dim=1)


def roi_channels(channels: Sequence[str] | None) -> list[int]:
    """Indices of the ROI mask channels among a cache's channel names ("mask", "mask-1" ...)."""
    return [i for i, c in enumerate(channels or ()) if str(c).split("+")[0].split("-")[0] == "mask"]


def model_roi_channels(cfg: Mapping[str, Any], channels: Sequence[str] | None) -> list[int]:
    """The mask channels the model pools inside: none unless roi-pooling is on."""
    return roi_channels(channels) if cfg.get("roi-pooling", True) else []


def has_roi_stats(cfg: Mapping[str, Any], channels: Sequence[str] | None) -> bool:
    """Whether the study's model gets the ROI statistics' term: roi-stats on and, like roi-pooling, a
    mask channel among the inputs (what dp-train = auto trains under DP)."""
    return bool(cfg.get("roi-stats", False)) and bool(model_roi_channels(cfg, channels))


def build_model(
    cfg: Mapping[str, Any], n_channels: int, spatial_dims: int, n_clinical: int, use_clinical: bool,
    channels: Sequence[str] | None = None,
) -> FusionResNet | EnsembleNet:
    """The study's model from config keys backbone, norm, widen-factor, roi-pooling, clinical-embed-dim
    and ensemble-size (seeded by `seed`; members are drawn one after the other from that seed)."""
    size = int(cfg.get("ensemble-size", 1))
    if size < 1:
        raise ValueError(f"config key 'ensemble-size': expected >= 1, found {size}")

    rois = model_roi_channels(cfg, channels)

    def one() -> FusionResNet:
        return FusionResNet(
            n_channels=n_channels,
            n_clinical=n_clinical,
            spatial_dims=spatial_dims,
            backbone=cfg["backbone"],
            norm=cfg["norm"],
            use_clinical=use_clinical,
            clinical_embed_dim=int(cfg["clinical-embed-dim"]),
            widen_factor=float(cfg.get("widen-factor", 1.0)),
            roi_channels=rois,
            roi_stats=has_roi_stats(cfg, channels),
        )

    with torch.random.fork_rng(devices=[]):  # same weights for the same seed, global RNG untouched
        torch.manual_seed(int(cfg.get("seed", 42)))
        return one() if size == 1 else EnsembleNet([one() for _ in range(size)])
