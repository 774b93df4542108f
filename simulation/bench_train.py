"""`slmfed bench train`: local training throughput next to a bare PyTorch loop, and the norm-layer study.

Default mode: samples/s of `client.train.train` (median over --runs) against a bare loop
(forward, class-weighted BCE, backward, AdamW step; no augmentation, no clipping) on the same
model, batch size and pre-loaded tensors; the ratio (target >= 0.9); peak memory (process max RSS,
CUDA max allocated when on a GPU).

--compare-norm: a tiny two-site FedAvg (plain loop, example-weighted state_dict average) with
batch / instance / group norm on an in-memory phantom whose sites differ like two scanners
(intensity scale and offset, noise), printing the held-out AUC of each norm per round.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

from client.cache import SiteData
from client.train import evaluate, select_device, train
from common.clinical import encode_row
from common.config import load_config
from common.model import FusionResNet


def phantom_site(
    n: int,
    seed: int,
    *,
    size: int = 64,
    prevalence: float = 0.4,
    gain: float = 1.0,
    offset: float = 0.0,
    noise: float = 0.6,
    depth: int | None = None,
) -> SiteData:
    """An in-memory site: 3-channel (T2, DWI, ADC) crops with a bright disc (the tumour) whose
    radius and ADC darkness grow with a latent aggressiveness that also drives slm and CEA.

    gain / offset / noise mimic a scanner; depth gives 3D crops (C x depth x size x size)."""
    rng = np.random.default_rng(seed)
    slm = (rng.random(n) < prevalence).astype(np.int64)
    slm[: max(1, n // 10)] = 1  # both classes always present
    slm[-max(1, n // 10):] = 0
    latent = rng.normal(size=n) + 1.6 * slm
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    images = np.empty((n, 3, size, size), dtype=np.float32)
    clinical = np.empty((n, 7), dtype=np.float32)
    for i in range(n):
        cy, cx = rng.uniform(-size / 10, size / 10, 2)
        radius = size * (0.12 + 0.03 * latent[i]).clip(0.05, 0.3)
        disc = 1 / (1 + np.exp((np.hypot(yy - cy, xx - cx) - radius) / 1.5))
        adc_drop = 0.8 + 0.5 * latent[i]
        base = rng.normal(0, noise, (3, size, size))
        images[i, 0] = base[0] + 1.2 * disc
        images[i, 1] = base[1] + 1.5 * disc
        images[i, 2] = base[2] + 1.0 - adc_drop * disc
        cea = float(np.exp(1.2 + 0.6 * latent[i] + rng.normal(0, 0.8)))
        ca199 = float(np.exp(2.5 + 0.3 * latent[i] + rng.normal(0, 1.0)))
        clinical[i] = encode_row(rng.choice(["M", "F"]), rng.choice(["low", "mid", "high"]), cea, ca199)
    images = images * gain + offset
    if depth is not None:
        fade = np.exp(-(((np.arange(depth) - (depth - 1) / 2) / (depth / 4)) ** 2))[None, None, :, None, None]
        images = (images[:, :, None] * fade + rng.normal(0, noise * 0.3, (n, 3, depth, size, size))).astype(np.float32)
    return SiteData(
        keys=[f"s{seed}p{i:03d}" for i in range(n)],
        images=images.astype(np.float32),
        clinical=clinical,
        labels=slm,
        manifest={},
    )


def clinical_stats(*sites: SiteData) -> tuple[np.ndarray, np.ndarray]:
    """Pooled mean / SD of the encoded clinical vectors (what the study computes from training sites)."""
    x = np.concatenate([s.clinical for s in sites]).astype(np.float64)
    return x.mean(axis=0), x.std(axis=0)


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)
