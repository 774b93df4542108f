"""Local training and evaluation of the fusion model on a site's cache (plain functions, no Flower).

The ClientApp calls these each round; tests and benchmarks call them directly.

- The whole site (a few hundred crops) is moved to the training device once and batches are index
  slices of it, so the data path costs nothing next to the forward/backward pass.
- Augmentation (config key `augment`) runs batched on the same device: per-sample random flips,
  small rotations (+-10 deg), scales (+-10 %) and shifts through MONAI's batched spatial
  transformer (`monai.networks.layers.AffineTransform`). Per-sample MONAI array transforms in a
  Python loop would cost more than the model itself on a GPU. No intensity jitter by default: the
  ADC channel is on a physical scale (its level is the signal: tumour ADC spans about 0.29-0.38 of
  the scaled range, a +-0.1 offset would drown it) and the mask channel is 0/1. `slmfed bench model`
  (MRI DL, primary 5-fold CV, mean of 3 fold assignments): with ROI pooling, jitter of 0.1 on every
  channel gave 0.777 against 0.788 without; without ROI pooling 0.782 against 0.773 (within the
  fold-assignment noise either way). Config augment-intensity turns it back on.
- Class-weighted BCE: pos_weight = negatives / positives of the local labels (1 when a site
  holds only one class, which can happen in federated splits).
- AdamW (lr, weight-decay; fused kernel, see make_optimizer), gradient clipping at GRAD_CLIP_NORM, seeded shuffling, augmentation
  and dropout (seed argument, else config `seed`) without touching the global RNG.
- CUDA with torch.autocast when present (config `amp`; bfloat16 where supported, else float16 with
  a GradScaler); CPU otherwise. channels_last / torch.compile are not enabled: not measured to help
  here (no GPU in the development environment; on CPU both slow this small model down).
- DP-SGD (argument `dp`, a client.dp.DPTraining the site's Gate planned): Poisson-sampled batches,
  per-sample clipping and Gaussian noise through Opacus (client/dp.py says why each choice).
  Without `dp` nothing here changes: the non-DP path is the same code as before DP existed.
- FedProx (config `fedprox-mu` > 0): adds mu/2 * ||w - w_global||^2 over the trainable parameters,
  w_global = `global_params` (the weights received this round; default: the weights at the start
  of the call, which are the received ones when the caller loaded them first).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.networks.layers import AffineTransform
from torch import nn

from client.cache import SiteData
from common.clinical import standardise
from common.metrics import loss_and_auc
from common.model import EnsembleNet

GRAD_CLIP_NORM = 1.0


class LabelError(ValueError):
    """The site's labels cannot be used for training or evaluation."""


def select_device(cfg: Mapping[str, Any]) -> torch.device:
    """Config key `device`: auto (CUDA when present), cpu, cuda, cuda:N."""
    want = str(cfg.get("device", "auto")).strip().lower()
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cpu":
        return torch.device("cpu")
    if want == "cuda" or want.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"config key 'device' is {want!r} but no CUDA device is available (use 'auto' or 'cpu')")
        dev = torch.device(want)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"config key 'device' is {want!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return dev
    raise ValueError(f"config key 'device': expected auto, cpu, cuda or cuda:N, found {want!r}")


class BatchAugment:
    """Per-sample random flips / rotation / scale / shift (+ optional intensity jitter) on a whole batch."""

    def __init__(
        self,
        spatial_dims: int,
        flip_prob: float = 0.5,
        rotate_deg: float = 10.0,
        scale: float = 0.1,
        shift: float = 0.05,
        intensity_scale: float = 0.0,
        intensity_shift: float = 0.0,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, found {spatial_dims!r}")
        self.spatial_dims = spatial_dims
        self.flip_prob, self.rotate, self.scale, self.shift = flip_prob, math.radians(rotate_deg), scale, shift
        self.intensity_scale, self.intensity_shift = intensity_scale, intensity_shift
        # theta acts on normalised [-1, 1] coordinates (PyTorch x, y[, z] order): rotation about the centre.
        self.warp = AffineTransform(normalized=True, reverse_indexing=False, padding_mode="border", align_corners=False)

    def theta(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """N x d x (d+1) affine: in-plane rotation, isotropic in-plane scale, in-plane flips, shift."""
        u = lambda *s: torch.rand(*s, generator=gen) * 2 - 1  # noqa: E731  uniform(-1, 1)
        angle = u(n) * self.rotate
        s = 1 + u(n) * self.scale
        flips = torch.where(torch.rand(n, 2, generator=gen) < self.flip_prob, -1.0, 1.0)
        d = self.spatial_dims
        theta = torch.zeros(n, d, d + 1)
        cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
        theta[:, 0, 0], theta[:, 0, 1] = cos * flips[:, 0], -sin * flips[:, 1]
        theta[:, 1, 0], theta[:, 1, 1] = sin * flips[:, 0], cos * flips[:, 1]
        if d == 3:
            theta[:, 2, 2] = 1.0  # slice axis: no rotation, scale or flip
        theta[:, :2, d] = u(n, 2) * self.shift
        return theta

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, c = images.shape[:2]
        out = self.warp(images, self.theta(n, gen).to(images.device, images.dtype))
        if not (self.intensity_scale or self.intensity_shift):
            return out
        extra = (1,) * self.spatial_dims
        gain = (1 + (torch.rand(n, c, generator=gen) * 2 - 1) * self.intensity_scale).view(n, c, *extra)
        offset = ((torch.rand(n, c, generator=gen) * 2 - 1) * self.intensity_shift).view(n, c, *extra)
        return out * gain.to(out) + offset.to(out)


def make_augment(spatial_dims: int, cfg: Mapping[str, Any]) -> BatchAugment | None:
    """Config keys augment (on / off) and augment-intensity (gain / offset jitter, 0 = none)."""
    if not cfg.get("augment", True):
        return None
    jitter = float(cfg.get("augment-intensity", 0.0))
    return BatchAugment(spatial_dims, intensity_scale=jitter, intensity_shift=jitter)


def member_seed(seed: int, member: int) -> int:
    """The training seed (batch order, augmentation, dropout) of ensemble member `member`; member 0
    keeps the fit's own seed, so it trains exactly as the single network would."""
    if member == 0:
        return seed
    return int(np.random.SeedSequence([seed, member]).generate_state(1)[0] % 2**31)


def _member_anchor(anchor: Mapping[str, torch.Tensor] | None, member: int) -> dict[str, torch.Tensor] | None:
    """Member `member`'s part of the ensemble's FedProx anchor (keys "members.<i>.<name>" -> "<name>")."""
    if anchor is None:
        return None
    prefix = f"members.{member}."
    return {k[len(prefix):]: v for k, v in anchor.items() if k.startswith(prefix)}


def check_labels(data: SiteData, purpose: str) -> np.ndarray:
    """Labels as a 0/1 array, or a clear error when any patient has no (or an invalid) outcome."""
    labels = np.asarray(data.labels)
    bad = np.flatnonzero(~np.isin(labels, (0, 1)))
    if bad.size:
        shown = ", ".join(f"{data.keys[i]} (label {labels[i]})" for i in bad[:5])
        more = f" and {bad.size - 5} more" if bad.size > 5 else ""
        raise LabelError(
            f"cannot {purpose}: {bad.size} of {len(labels)} patients have no known slm outcome "
            f"(expected label 0 or 1; -1 means unknown): {shown}{more}"
        )
    return labels.astype(np.float32)


def _tensors(data: SiteData, clinical_mean, clinical_std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data) == 0:
        raise ValueError("the site data holds no patient")
    mean, std = np.asarray(clinical_mean, dtype=np.float64), np.asarray(clinical_std, dtype=np.float64)
    n_feat = data.clinical.shape[1]
    if mean.shape != (n_feat,) or std.shape != (n_feat,):
        raise ValueError(
            f"clinical_mean / clinical_std: expected shape ({n_feat},) to match the cache's clinical vector, "
            f"found {mean.shape} and {std.shape}"
        )
    images = torch.from_numpy(np.ascontiguousarray(data.images, dtype=np.float32)).to(device)
    clinical = torch.from_numpy(standardise(data.clinical, mean, std)).to(device)
    return images, clinical


def roi_statistics(data: SiteData, chunk: int = 64) -> np.ndarray | None:
    """Per patient (float64, N x 2C): the ROI mean and SD of each image channel, exactly as the model
    computes them (common.model.roi_input_stats), for the pooled standardisation of the model's
    roi-stats input; None when the cache's images carry no ROI mask channel."""
    from common.model import roi_channels, roi_input_stats, roi_mask

    rois = roi_channels(data.manifest.get("channels"))
    if not rois or len(data) == 0:
        return None
    out = []
    with torch.no_grad():
        for i in range(0, len(data), chunk):
            x = torch.from_numpy(np.ascontiguousarray(data.images[i:i + chunk], dtype=np.float32))
            out.append(roi_input_stats(x, rois, roi_mask(x, rois)).double().numpy())
    return np.concatenate(out)


def _batches(n: int, batch_size: int, gen: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches (shuffled when gen is given); a trailing batch of one joins the previous one
    so BatchNorm never sees a single sample."""
    if batch_size < 1:
        raise ValueError(f"config key 'batch-size': expected >= 1, found {batch_size}")
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    chunks = list(torch.split(order, batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def _autocast(device: torch.device, cfg: Mapping[str, Any]):
    if device.type == "cuda" and cfg.get("amp", True):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    return torch.autocast(device.type, enabled=False), None


def _reference_params(model: nn.Module, global_params, device: torch.device) -> dict[str, torch.Tensor]:
    """The FedProx anchor: parameter name -> tensor, from a state_dict-like mapping or a list of
    arrays in `model.state_dict()` order (how Flower ships weights)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if global_params is None:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(global_params, Mapping):
        source = dict(global_params)
    else:
        keys = list(model.state_dict())
        arrays = list(global_params)
        if len(arrays) != len(keys):
            raise ValueError(f"global_params: expected {len(keys)} arrays (the model's state_dict), found {len(arrays)}")
        source = dict(zip(keys, arrays))
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        if n not in source:
            raise ValueError(f"global_params: parameter {n!r} is missing")
        t = torch.as_tensor(np.asarray(source[n]) if not torch.is_tensor(source[n]) else source[n])
        if tuple(t.shape) != tuple(params[n].shape):
            raise ValueError(f"global_params[{n!r}]: expected shape {tuple(params[n].shape)}, found {tuple(t.shape)}")
        out[n] = t.to(device=device, dtype=torch.float32)
    return out


def make_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (about 4x faster steps than the default on CPU, measured for
    resnet10; also available on CUDA) when every parameter is float32, else the default kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight-decay"]), fused=fused)


def train(
    model: nn.Module,
    data: SiteData,
    cfg: Mapping[str, Any],
    clinical_mean,
    clinical_std,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    global_params: Mapping[str, Any] | Sequence[Any] | None = None,
    dp=None,
) -> dict[str, Any]:
    """Train `model` in place on the site's labelled patients (DP-SGD when `dp` is given).

    Returns dict(loss = mean class-weighted BCE of the last epoch, num_examples, epochs, seconds).
    """
    labels_np = check_labels(data, "train")
    if len(labels_np) < 2:
        raise ValueError(f"cannot train on {len(labels_np)} patient(s): local training needs at least 2")
    epochs = int(cfg["local-epochs"] if epochs is None else epochs)
    if epochs < 1:
        raise ValueError(f"epochs: expected >= 1, found {epochs}")
    seed = int(cfg["seed"] if seed is None else seed)
    mu = float(cfg.get("fedprox-mu", 0.0))
    if mu < 0:
        raise ValueError(f"config key 'fedprox-mu': expected >= 0, found {mu}")
    device = select_device(cfg)
    start = time.perf_counter()
    if dp is not None:
        return _train_dp(model, data, labels_np, cfg, clinical_mean, clinical_std, epochs, seed, mu, device, dp, start)
    if isinstance(model, EnsembleNet):
        # each member on its own batch order, augmentation and dropout: the diversity an ensemble
        # needs (members that shared the batches and differed only in their initial weights gained
        # nothing, simulation/README.md "The MRI model")
        # the FedProx anchor checked and converted once for the whole ensemble (count, names, shapes)
        anchor = _reference_params(model, global_params, device) if mu > 0 and global_params is not None else None
        runs = [train(m, data, cfg, clinical_mean, clinical_std, epochs=epochs, seed=member_seed(seed, i),
                      global_params=_member_anchor(anchor, i)) for i, m in enumerate(model.members)]
        return dict(loss=float(np.mean([r["loss"] for r in runs])), num_examples=len(labels_np), epochs=epochs,
                    seconds=time.perf_counter() - start)

    model.to(device).train()
    images, clinical = _tensors(data, clinical_mean, clinical_std, device)
    labels = torch.from_numpy(labels_np).to(device)
    n_pos = float(labels_np.sum())
    n_neg = float(len(labels_np) - n_pos)
    pos_weight = torch.tensor(n_neg / n_pos if n_pos > 0 and n_neg > 0 else 1.0, device=device)
    criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = make_optimizer(model, cfg)
    anchor = _reference_params(model, global_params, device) if mu > 0 else None
    params = dict(model.named_parameters())
    augment = make_augment(images.dim() - 2, cfg)
    autocast, amp_dtype = _autocast(device, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
    gen = torch.Generator().manual_seed(seed)

    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)  # dropout
        for _ in range(epochs):
            total, seen = 0.0, 0
            for idx in _batches(len(labels), int(cfg["batch-size"]), gen):
                idx = idx.to(device)
                x, z, y = images[idx], clinical[idx], labels[idx]
                if augment is not None:
                    x = augment(x, gen)
                with autocast:
                    logits = model(x, z)
                loss = criterion(logits.float(), y)
                objective = loss
                if anchor is not None:
                    prox = sum(((params[n].float() - a) ** 2).sum() for n, a in anchor.items())
                    objective = loss + 0.5 * mu * prox
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(objective).backward()
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    objective.backward()
                    nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
                    optimizer.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            last_loss = total / seen
    if not math.isfinite(last_loss):
        raise FloatingPointError(f"training diverged: loss is {last_loss} (lower config key 'lr')")
    return dict(loss=last_loss, num_examples=len(labels), epochs=epochs, seconds=time.perf_counter() - start)


def dp_trains_wide(model: nn.Module, cfg: Mapping[str, Any]) -> bool:
    """Study key dp-train: wide, all, or auto (wide when the model has the ROI statistics' term)."""
    from common.model import has_wide_terms

    mode = str(cfg.get("dp-train", "auto"))
    return mode == "wide" or (mode == "auto" and has_wide_terms(model))


def _train_dp(model, data, labels_np, cfg, clinical_mean, clinical_std, epochs, seed, mu, device, dp, start):
    """DP-SGD (client/dp.py): Poisson batches of expected size batch-size, per-sample clipping and
    noise by Opacus, unweighted BCE, float32. Augmentation and dropout keep the study seed; the
    sampling and the noise use the secret one."""
    from client import dp as dpmod

    if mu > 0:
        raise dpmod.DPError("FedProx (config key 'fedprox-mu' > 0) is not available with DP-SGD: its proximal "
                            "gradient would bypass the per-sample clipping; set fedprox-mu = 0")
    batch = int(cfg["batch-size"])
    n = len(labels_np)
    per_epoch = dpmod.steps_per_epoch(n, batch)
    if dp.steps != epochs * per_epoch or not math.isclose(dp.sample_rate, batch / n):
        raise dpmod.DPError(f"DP plan does not match this training: planned {dp.steps} steps at rate {dp.sample_rate:.4g}, "
                            f"found {epochs} epochs x {per_epoch} steps at rate {batch / n:.4g}")
    wide = dp_trains_wide(model, cfg)
    if wide:
        from common.model import make_wide

        make_wide(model)  # only the linear terms are trained; the rest keeps the weights it came with
    model.to(device).train()
    images, clinical = _tensors(data, clinical_mean, clinical_std, device)
    labels = torch.from_numpy(labels_np).to(device)
    secret = torch.Generator(device=device).manual_seed(dp.seed)       # noise (on the parameters' device)
    sampler = torch.Generator().manual_seed(dp.seed ^ 0x5EED)          # Poisson sampling
    optimizer = make_optimizer(model, {**cfg, "lr": cfg["dp-lr"]} if wide else cfg)
    private = dpmod.make_private(model, optimizer, dp, batch, secret)
    augment = make_augment(images.dim() - 2, cfg)
    gen = torch.Generator().manual_seed(seed)
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), warnings.catch_warnings():
            # Opacus's hooks on the first layer, whose input needs no gradient: expected, harmless
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            torch.manual_seed(seed)  # dropout
            for _ in range(epochs):
                total, seen = 0.0, 0
                for _ in range(per_epoch):
                    idx = dpmod.poisson_batch(n, dp.sample_rate, sampler)
                    if len(idx) == 0:
                        private.noise_step()
                        continue
                    idx = idx.to(device)
                    x, z, y = images[idx], clinical[idx], labels[idx]
                    if augment is not None:
                        x = augment(x, gen)
                    total += private.step(x, z, y) * len(idx)
                    seen += len(idx)
                last_loss = total / seen if seen else float("nan")
    finally:
        private.close()
    if seen and not math.isfinite(last_loss):
        raise FloatingPointError(f"training diverged: loss is {last_loss} (lower config key 'lr')")
    return dict(loss=last_loss, num_examples=n, epochs=epochs, seconds=time.perf_counter() - start)


@torch.no_grad()
def predict_proba(model: nn.Module, data: SiteData, clinical_mean, clinical_std, cfg: Mapping[str, Any]) -> np.ndarray:
    """P(slm = 1) per patient, in `data.keys` order (eval mode, no augmentation, batched)."""
    device = select_device(cfg)
    model.to(device).eval()
    images, clinical = _tensors(data, clinical_mean, clinical_std, device)
    autocast, _ = _autocast(device, cfg)
    out = []
    for idx in _batches(len(data), max(int(cfg["batch-size"]), 2) * 4, None):
        idx = idx.to(device)
        with autocast:
            logits = model(images[idx], clinical[idx])
        out.append(torch.sigmoid(logits.float()).cpu())
    return torch.cat(out).numpy().astype(np.float64)


def evaluate(
    model: nn.Module, data: SiteData, clinical_mean, clinical_std, cfg: Mapping[str, Any]
) -> tuple[dict[str, Any], np.ndarray]:
    """(dict(loss = mean unweighted BCE, auc = ROC AUC or NaN with one class, num_examples), probabilities)."""
    labels = check_labels(data, "evaluate")
    probs = predict_proba(model, data, clinical_mean, clinical_std, cfg)
    loss, auc = loss_and_auc(labels, probs)
    return dict(loss=loss, auc=auc, num_examples=len(labels)), probs
