"""Differentially private training at the site: DP-SGD with Opacus, and the site's epsilon budget.

Why at the site: model weights trained on a few hundred patients can leak them (membership
inference, gradient inversion). With `dp-epsilon` > 0 in the site's own policy (node config, never
the run config), every DL / Combined training round the site runs is DP-SGD:
  - Poisson sampling: each step takes every training patient independently with probability
    q = batch-size / n_train (the sampling the accountant assumes; a step may be empty);
  - per-sample gradients (Opacus GradSampleModule, hooks mode) clipped to L2 norm `dp-clip-norm`,
    summed, plus Gaussian noise of standard deviation noise_multiplier x clip norm, divided by the
    expected batch size (Opacus DPOptimizer); the wrapped optimizer is the usual AdamW;
  - an unweighted BCE loss (a class weight computed from the site's labels would let one patient
    change every other patient's gradient, outside the clipping argument), no FedProx term, float32.

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
  - the CF model: its sufficient statistics and coefficients are exact (epsilon infinite for CF);
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


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPTraining, expected_batch_size: int,
                 generator: torch.Generator):
    """(GradSampleModule, DPOptimizer) around `model` and `optimizer`; the module shares `model`'s
    parameters, so training it trains `model`. Call `release(gsm)` afterwards."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    check_model(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dpo = DPOptimizer(optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                      expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator)
    return gsm, dpo


def release(gsm) -> None:
    """Remove Opacus's hooks so the plain model is left as it was (weights trained)."""
    gsm._close()


def poisson_batch(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of one Poisson-sampled batch (possibly empty)."""
    return torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten()


def empty_step(dpo, params: list[torch.Tensor]) -> None:
    """An empty Poisson batch still releases noise (the accountant counts the step): zero per-sample
    gradients through the same clip / noise / scale path."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    dpo.step()


def report(dp: DPTraining, spent_study: float, spent_model: float, delta: float) -> dict[str, Any]:
    """The reply's DP figures (no patient data: q reveals n_train, which num-examples already says)."""
    return {"dp-epsilon": spent_study, "dp-epsilon-model": spent_model, "dp-delta": delta,
            "dp-noise-multiplier": dp.noise_multiplier, "dp-clip-norm": dp.clip_norm,
            "dp-sample-rate": dp.sample_rate, "dp-steps": dp.steps}
