"""Differentially private training at the site: DP-SGD with Opacus, and the site's epsilon budget.

Why at the site: model weights trained on a few hundred patients can leak them (membership
inference, gradient inversion). With `dp-epsilon` > 0 in the site's own policy (node config, never
the run config), every DL / Combined training round the site runs is DP-SGD:
  - Poisson sampling: each step takes every training patient independently with probability
    q = batch-size / n_train (the sampling the accountant assumes; a step may be empty);
  - per-sample gradients clipped to L2 norm `dp-clip-norm`, summed, plus Gaussian noise of standard
    deviation noise_multiplier x clip norm, divided by the expected batch size; the wrapped optimizer
    is the usual AdamW. Two Opacus ways to get there (GRAD_SAMPLE_MODES; `slmfed bench dp` measures
    both): "hooks" materialises every per-sample gradient (GradSampleModule + DPOptimizer); "ghost"
    (Opacus's fast gradient clipping) needs only per-sample gradient NORMS, then a second backward
    pass of the clipped loss gives the clipped sum. Opacus 1.6 has ghost norms for Linear layers only;
    `conv_norm_sample` adds them for convolutions, choosing per layer the cheaper of the Gram-matrix
    identity ||sum_q b_q a_q^T||^2 = sum_{q,r} (a_q.a_r)(b_q.b_r) (deep layers: few positions, many
    weights) and the materialised per-sample gradient (shallow layers) - "mixed ghost clipping"
    (Bu et al., 2022, arXiv:2205.10683);
  - an unweighted BCE loss (a class weight computed from the site's labels would let one patient
    change every other patient's gradient, outside the clipping argument), no FedProx term, float32.

What DP-SGD trains (study key dp-train; default auto = wide when the model has the ROI statistics):
  - wide: only the linear terms on the ROI statistics (6 numbers per patient) and, in a trained
    Combined model, on the clinical vector - 7 to 15 weights per network, at dp-lr (0.05). The
    ResNet and the head keep their seeded initial weights (common/model.py make_wide sets the head's
    output to 0, so the frozen random features add nothing to the logit). Why: at epsilon 3 over
    ~140 patients the noise drowned ~300 k ResNet weights (MRI DL 0.53 primary CV), while the linear
    term keeps most of the ROI statistics' signal (simulation/README.md "Differential privacy").
    The ROI statistics are standardised with the study's reference (roi-stats-reference, fixed from
    data outside the study): a standardisation pooled from the sites' sums would be fitted on their
    patients outside the budget, so a site under DP refuses it (rule dp-standardisation, client/study.py).
  - all: every weight, as before.

What the budget is and how it is spent (see `Budget`):
  - (dp-epsilon, dp-delta) per study, for everything this site's patients contribute to trained DL
    and Combined weights in that study: all fits, folds, models and rounds, composed with Opacus's
    RDP accountant as if every training patient took part in every training request (a patient
    outside a fold's training part costs nothing there, so this over-counts, never under-counts).
  - The noise multiplier is fixed at the study's first training request, from the plan the request
    declares (`dp-fits` DL trainings x rounds x local epochs) and the site's smallest CV training
    part; every request is charged before it trains, and one that would pass the budget is refused
    (rule `dp-budget`, nothing trained). A coordinator that under-declares the plan gets refusals,
    not more epsilon; an identical retry is answered with the identical result and costs nothing.
  - The noise and the sampling draw from a generator seeded with HMAC(site secret, request): the
    coordinator knows the study seed, never the secret, so it cannot replay the noise.

What the epsilon does NOT cover (stated in the report and deploy/README.md):
  - the CF model: its sufficient statistics and coefficients are exact (epsilon infinite for CF); a
    Combined model made of the DL and CF models (combined-from dl+cf) is covered in its DL part only,
    and one trained from the CF start (combined-from cf) uses the clinical standardisation of the CF
    model's exact sums. A DP option for the CF model (noisy sufficient statistics per Newton step) is
    not built yet;
  - evaluation replies (AUC, loss, k-safe score cells, calibration) and enrolment counts: exact,
    protected by the k-anonymity rules of client/disclosure.py only;
  - other studies: each study has its own budget; over a site's lifetime epsilons add up to at
    most max-studies x dp-epsilon (basic composition);
  - floating-point attacks on the Gaussian sampler: Opacus's secure_mode needs torchcsprng, which
    is not installed; noise comes from torch's generator with a secret seed.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

GRAD_SAMPLE_MODES = ("ghost", "hooks")
DEFAULT_MODE = "ghost"  # measured faster on 2 CPU cores and on a GPU (simulation/README.md, "Differential privacy")
ACCOUNTANT = "rdp"  # Opacus's Renyi-DP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019)
EPSILON_TOLERANCE = 0.01  # calibration: the noise keeps the planned epsilon within this below the target


class DPError(ValueError):
    """DP training cannot run as configured (a model layer Opacus cannot handle, FedProx, ...)."""


@dataclass(frozen=True)
class DPTraining:
    """One training request under DP-SGD: what train() needs and what the reply reports."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps: int          # optimizer steps of this request (local epochs x steps per epoch)
    seed: int           # secret: HMAC of the site secret and the request
    mode: str = DEFAULT_MODE  # how per-sample norms are computed (GRAD_SAMPLE_MODES); same mechanism


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Poisson steps per local epoch: one expected pass over the training patients."""
    return max(1, math.ceil(n_train / batch_size))


def epsilon(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Opacus's RDP accountant over (noise multiplier, sample rate, steps) entries."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta)) if acc.history else 0.0


def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose RDP epsilon after `steps` steps at `sample_rate` is
    within EPSILON_TOLERANCE below target_epsilon (Opacus's own search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=ACCOUNTANT, epsilon_tolerance=EPSILON_TOLERANCE))


def site_secret(path: Path) -> bytes:
    """The site's 32-byte DP secret, created once (mode 0600) beside the ledger; never sent."""
    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # first writer wins; a concurrent one keeps the existing secret
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    data = path.read_bytes()
    if len(data) != 32:
        raise RuntimeError(f"DP secret {path} is damaged ({len(data)} bytes, expected 32); restore it from backup "
                           "or remove it together with the disclosure ledger")
    return data


def secret_seed(secret: bytes, request_digest: str) -> int:
    return int.from_bytes(hmac.new(secret, request_digest.encode(), hashlib.sha256).digest()[:8], "big") >> 1


def check_model(model: nn.Module) -> None:
    """Opacus's validator: every layer must have per-sample gradients (no BatchNorm, no in-place ops)."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        reasons = sorted({str(p).split(". ")[0] for p in problems})  # Opacus repeats one long text per layer
        raise DPError(f"DP-SGD cannot train this model ({len(problems)} layer(s)): " + "; ".join(reasons[:3])
                      + " (use config key norm = 'instance' or 'group')")


def conv_norm_sample(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample gradient norms of a Conv2d / Conv3d layer without keeping per-sample gradients.

    With a = the unfolded input (n x p x q: p = in-channels x kernel, q = output positions) and
    b = the output gradient (n x o x q), patient i's weight gradient is G_i = b_i a_i^T (o x p).
    ||G_i||^2 = sum_{q,r} (a_i^T a_i)_{qr} (b_i^T b_i)_{qr} costs q^2 (o + p); forming G_i costs o p q:
    the cheaper one is used per layer (tests/test_dp.py checks both against Opacus's per-sample
    gradients)."""
    from opacus.grad_sample.conv import compute_conv_grad_sample
    from opacus.utils.tensor_utils import unfold2d, unfold3d

    if layer.groups != 1 or isinstance(layer.padding, str):
        grads = compute_conv_grad_sample(layer, activations, backprops)
        return {p: g.flatten(1).norm(dim=1) for p, g in grads.items()}
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    unfold = unfold2d if isinstance(layer, nn.Conv2d) else unfold3d
    a = unfold(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride, dilation=layer.dilation)
    b = backprops.reshape(n, -1, a.shape[-1])
    o, p, q = b.shape[1], a.shape[1], a.shape[2]
    out = {}
    if layer.weight.requires_grad:
        if q * (o + p) < o * p:
            sq = (torch.einsum("npq,npr->nqr", a, a) * torch.einsum("noq,nor->nqr", b, b)).sum(dim=(1, 2))
        else:
            sq = torch.einsum("noq,npq->nop", b, a).pow(2).sum(dim=(1, 2))
        out[layer.weight] = sq.clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = b.sum(dim=2).norm(dim=1)
    return out


def _register_conv_norms() -> None:
    from opacus.grad_sample.utils import register_norm_sampler

    register_norm_sampler([nn.Conv2d, nn.Conv3d])(conv_norm_sample)


class _Private:
    """The model wrapped for DP-SGD: `step(x, z, y)` runs one clipped, noised step on a batch,
    `noise_step()` the same for an empty Poisson batch; `close()` removes Opacus's hooks."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPTraining, expected_batch_size: int,
                 generator: torch.Generator):
        check_model(model)
        from common.model import EnsembleNet

        # an ensemble's member logits come from the model itself (the wrapper shares its parameters and hooks)
        self.ensemble = model if isinstance(model, EnsembleNet) else None
        if dp.mode not in GRAD_SAMPLE_MODES:
            raise DPError(f"grad-sample mode: expected one of {', '.join(GRAD_SAMPLE_MODES)}, found {dp.mode!r}")
        self.mode = dp.mode
        self.params = [p for p in model.parameters() if p.requires_grad]
        # only small Linear layers trainable (dp-train = wide, common/model.py make_wide)
        self.wide = all(isinstance(m, nn.Linear) for m in model.modules()
                        if any(p.requires_grad for p in m.parameters(recurse=False)))
        kwargs = dict(noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                      expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator)
        if dp.mode == "hooks":
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
            self.optimizer = DPOptimizer(optimizer, **kwargs)
        else:
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping

            _register_conv_norms()
            self.module = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                               max_grad_norm=dp.clip_norm, use_ghost_clipping=True)
            self.optimizer = DPOptimizerFastGradientClipping(optimizer, **kwargs)

    def step(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> float:
        """One DP-SGD step on a non-empty batch; returns the batch's mean (unclipped) loss."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.mode == "hooks":
            loss = self._per_patient_loss(x, z, y).mean()
            loss.backward()
            self.optimizer.step()
            return float(loss.detach())
        # Opacus's two-pass fast gradient clipping (DPTensorFastGradientClipping.backward), with one
        # change: the first pass, which only feeds the norm hooks, asks autograd for the gradient of
        # the INPUTS, so no weight gradient is computed there (about a quarter of the step's work).
        # With dp-train = wide (only linear terms trainable) the weights' own gradients cost nothing and
        # asking for the inputs' would backpropagate through the frozen ResNet: ask for the weights'.
        for p in self.params:
            p._norm_sample = None
        if self.wide:
            per_patient = self._per_patient_loss(x, z, y)
            torch.autograd.grad(per_patient.mean(), self.params, retain_graph=True)
        else:
            x, z = x.detach().requires_grad_(), z.detach().requires_grad_()
            per_patient = self._per_patient_loss(x, z, y)
            torch.autograd.grad(per_patient.mean(), [x, z], retain_graph=True, allow_unused=True)
        missing = sum(getattr(p, "_norm_sample", None) is None for p in self.params)
        if missing:  # a parameter off every path to the inputs would escape clipping: never train then
            raise DPError(f"DP-SGD: {missing} parameter(s) got no per-sample norm; refusing to train unclipped")
        coeff = self.module.get_clipping_coef()
        self.module.disable_hooks()
        try:
            (coeff.to(per_patient.device) * per_patient).sum().backward()  # the clipped sum, into p.grad
        finally:
            self.module.enable_hooks()
        self.optimizer.step()
        return float(per_patient.detach().mean())

    def _per_patient_loss(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Unweighted BCE per patient; an ensemble's members each on their own logit, summed, so the
        patient's gradient over all members is clipped as one (the accounting stays that of one model)."""
        logits = self.ensemble.member_logits(x, z) if self.ensemble is not None else self.module(x, z).unsqueeze(1)
        bce = nn.functional.binary_cross_entropy_with_logits(logits.float(), y[:, None].expand_as(logits), reduction="none")
        return bce.sum(dim=1)

    def noise_step(self) -> None:
        """An empty Poisson batch still releases noise (the accountant counts the step): a zero clipped
        sum through the same noise / scale path."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            if self.mode == "hooks":
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            else:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()

    def close(self) -> None:
        self.module._close()


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPTraining, expected_batch_size: int,
                 generator: torch.Generator) -> _Private:
    """`model` and `optimizer` wrapped for DP-SGD (the wrapper shares `model`'s parameters, so its
    steps train `model`). Call `.close()` afterwards."""
    return _Private(model, optimizer, dp, expected_batch_size, generator)


def poisson_batch(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of one Poisson-sampled batch (possibly empty)."""
    return torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten()


def report(dp: DPTraining, spent_study: float, spent_model: float, delta: float) -> dict[str, Any]:
    """The reply's DP figures (no patient data: q reveals n_train, which num-examples already says)."""
    return {"dp-epsilon": spent_study, "dp-epsilon-model": spent_model, "dp-delta": delta,
            "dp-noise-multiplier": dp.noise_multiplier, "dp-clip-norm": dp.clip_norm,
            "dp-sample-rate": dp.sample_rate, "dp-steps": dp.steps}
