"""`slmfed bench train`: local training throughput next to a bare PyTorch loop, and the norm-layer study.

Default mode: samples/s of `client.train.train` (median over --runs) against a bare loop
(a fresh AdamW with the same fused kernel per call, as each federated round starts one, then
forward, class-weighted BCE, backward, step; no augmentation, no clipping) on the same model,
batch size and pre-loaded tensors (plus, for context, the bare
loop with PyTorch's default AdamW kernel); the ratio (target >= 0.9); peak memory (process max RSS,
CUDA max allocated when on a GPU).

Measured on the shared 2-core development host (CPU, 1 torch thread, 128 patients, batch 16,
2 epochs per call, median of 7): bare loop 119 samples/s CPU time, train() augment=on 119 (ratio
1.00), augment=off 117 (0.98); the bare loop with PyTorch's default AdamW kernel 100 (0.84, which
is why train() uses the fused kernel). Wall-clock ratios on that loaded host: 0.98 / 0.94. Peak
RSS 755 MB. No GPU was available for a CUDA figure.

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
from client.train import _autocast, evaluate, make_optimizer, select_device, train
from common.clinical import encode_row, standardise
from common.config import load_config
from common.model import build_model


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
    mask_channel: bool = False,
) -> SiteData:
    """An in-memory site: 3-channel (T2, DWI, ADC) crops with a bright disc (the tumour) whose
    radius and ADC darkness grow with a latent aggressiveness that also drives slm and CEA.

    gain / offset / noise mimic a scanner; depth gives 3D crops (C x depth x size x size);
    mask_channel adds the disc's ROI mask as a 4th channel (2D only), as `slmfed prepare` does."""
    rng = np.random.default_rng(seed)
    slm = (rng.random(n) < prevalence).astype(np.int64)
    slm[: max(1, n // 10)] = 1  # both classes always present
    slm[-max(1, n // 10):] = 0
    latent = rng.normal(size=n) + 1.6 * slm
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    images = np.empty((n, 3, size, size), dtype=np.float32)
    clinical = np.empty((n, 7), dtype=np.float32)
    discs = np.empty((n, size, size), dtype=np.float32)  # the tumour's ROI mask
    for i in range(n):
        cy, cx = rng.uniform(-size / 10, size / 10, 2)
        radius = size * (0.12 + 0.03 * latent[i]).clip(0.05, 0.3)
        disc = 1 / (1 + np.exp((np.hypot(yy - cy, xx - cx) - radius) / 1.5))
        discs[i] = disc > 0.5
        adc_drop = 0.8 + 0.5 * latent[i]
        base = rng.normal(0, noise, (3, size, size))
        images[i, 0] = base[0] + 1.2 * disc
        images[i, 1] = base[1] + 1.5 * disc
        images[i, 2] = base[2] + 1.0 - adc_drop * disc
        cea = float(np.exp(1.2 + 0.6 * latent[i] + rng.normal(0, 0.8)))
        ca199 = float(np.exp(2.5 + 0.3 * latent[i] + rng.normal(0, 1.0)))
        clinical[i] = encode_row(rng.choice(["M", "F"]), rng.choice(["low", "mid", "high"]), cea, ca199)
    images = images * gain + offset
    if mask_channel:
        if depth is not None:
            raise ValueError("phantom_site: mask_channel is for 2D crops")
        images = np.concatenate([images, discs[:, None]], axis=1)
    if depth is not None:
        fade = np.exp(-(((np.arange(depth) - (depth - 1) / 2) / (depth / 4)) ** 2))[None, None, :, None, None]
        images = (images[:, :, None] * fade + rng.normal(0, noise * 0.3, (n, 3, depth, size, size))).astype(np.float32)
    return SiteData(
        keys=[f"s{seed}p{i:03d}" for i in range(n)],
        images=images.astype(np.float32),
        clinical=clinical,
        labels=slm,
        manifest={"channels": ["t2", "dwi", "adc", "mask"]} if mask_channel else {},
    )


def clinical_stats(*sites: SiteData) -> tuple[np.ndarray, np.ndarray]:
    """Pooled mean / SD of the encoded clinical vectors (what the study computes from training sites)."""
    x = np.concatenate([s.clinical for s in sites]).astype(np.float64)
    return x.mean(axis=0), x.std(axis=0)


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)


def concat_sites(*sites: SiteData) -> SiteData:
    """One SiteData holding the patients of several (pooled held-out sets)."""
    return SiteData(
        keys=[k for s in sites for k in s.keys],
        images=np.concatenate([s.images for s in sites]),
        clinical=np.concatenate([s.clinical for s in sites]),
        labels=np.concatenate([s.labels for s in sites]),
        manifest={},
    )


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """Example-weighted average of state_dicts (BatchNorm running statistics included)."""
    total = float(sum(weights))
    out = {}
    for key, ref in states[0].items():
        avg = sum(s[key].double() * (w / total) for s, w in zip(states, weights))
        out[key] = avg.round().to(ref.dtype) if not ref.is_floating_point() else avg.to(ref.dtype)
    return out


# --- throughput ----------------------------------------------------------------------------------

def _bare_epoch(model: nn.Module, images, clinical, labels, batch_size: int, opt, criterion, gen, autocast) -> None:
    model.train()
    for idx in torch.randperm(len(labels), generator=gen).to(images.device).split(batch_size):
        if len(idx) < 2:
            continue
        with autocast:
            logits = model(images[idx], clinical[idx])
        loss = criterion(logits.float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_throughput(args) -> int:
    # _autocast / make_optimizer: the bare loop uses train()'s AMP policy and optimizer kernel (like for like)
    cfg = load_config(cli={"batch-size": args.batch_size, "device": args.device, "local-epochs": 1})
    device = select_device(cfg)
    data = phantom_site(args.patients, seed=1)
    mean, std = clinical_stats(data)
    model = build_model(cfg, n_channels=3, spatial_dims=2, n_clinical=7, use_clinical=True).to(device)
    bare = build_model(cfg, n_channels=3, spatial_dims=2, n_clinical=7, use_clinical=True).to(device)
    images = torch.from_numpy(data.images).to(device)
    clinical = torch.from_numpy(standardise(data.clinical, mean, std)).to(device)
    labels = torch.from_numpy(data.labels.astype(np.float32)).to(device)
    pos_weight = torch.tensor(float((labels == 0).sum() / labels.sum()), device=device)
    criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    plain = build_model(cfg, n_channels=3, spatial_dims=2, n_clinical=7, use_clinical=True).to(device)
    autocast, _ = _autocast(device, cfg)
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def timed(fn) -> tuple[float, float]:
        """(wall samples/s, CPU-time samples/s): CPU time is robust to other processes on a shared host."""
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        n = args.patients * args.epochs
        return n / (time.perf_counter() - t), n / (time.process_time() - c)

    def bare_loop(m, make_opt):
        """One local round as a bare loop: a fresh optimizer (as every federated round starts), then epochs."""
        def round_() -> None:
            o = make_opt(m)
            for _ in range(args.epochs):
                _bare_epoch(m, images, clinical, labels, args.batch_size, o, criterion, gen, autocast)
        return round_

    variants = {
        "bare PyTorch loop": bare_loop(bare, lambda m: make_optimizer(m, cfg)),  # same kernel as train()
        "bare, default AdamW": bare_loop(
            plain, lambda m: torch.optim.AdamW(m.parameters(), lr=cfg["lr"], weight_decay=cfg["weight-decay"])
        ),
        "train() augment=on": lambda: train(model, data, cfg, mean, std, epochs=args.epochs),
        "train() augment=off": lambda: train(model, data, {**cfg, "augment": False}, mean, std, epochs=args.epochs),
    }
    for fn in variants.values():  # warm-up (allocator, kernels)
        fn()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):  # interleaved so load on a shared machine hits every variant alike
        for name, fn in variants.items():
            w, c = timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    med = {name: statistics.median(r) for name, r in wall.items()}
    med_cpu = {name: statistics.median(r) for name, r in cpu.items()}
    print(f"device {device}, model resnet10 2D {cfg['norm']} norm + clinical, batch {args.batch_size}, "
          f"{args.patients} patients of 3 x 64 x 64, {args.epochs} epoch(s) per call (one local round), "
          f"median of {args.runs} calls, torch threads {torch.get_num_threads()}")
    base, base_cpu = med["bare PyTorch loop"], med_cpu["bare PyTorch loop"]
    print(f"  {'':22s} {'wall samples/s':>15s} {'[min-max]':>15s} {'ratio':>6s}   {'CPU-time samples/s':>18s} {'ratio':>6s}")
    for name, value in med.items():
        spread = f"[{min(wall[name]):.1f}-{max(wall[name]):.1f}]"
        print(f"  {name:22s} {value:15.1f} {spread:>15s} {value / base:6.3f}   {med_cpu[name]:18.1f} "
              f"{med_cpu[name] / base_cpu:6.3f}")
    ok = med["train() augment=on"] >= 0.9 * base
    print(f"  target: train() augment=on >= 0.9 x bare loop (wall) -> {'met' if ok else 'NOT met'}")
    print(f"  peak memory: max RSS {_max_rss_mb():.0f} MB", end="")
    if device.type == "cuda":
        print(f", CUDA max allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB")
    else:
        print()
    return 0


# --- norm-layer study ------------------------------------------------------------------------------

def run_compare_norm(args) -> int:
    scanners = [dict(gain=1.0, offset=0.0, noise=0.6), dict(gain=1.8, offset=0.7, noise=0.9)]
    sizes = [args.patients, max(8, args.patients * 3 // 5)]
    results: dict[str, list[list[float]]] = {}
    print(f"2-site FedAvg, sites of {sizes} patients with different intensity scale / offset / noise, "
          f"{args.rounds} rounds x {args.local_epochs} local epoch(s), MRI-only model, held-out = both scanners")
    for norm in ("batch", "instance", "group"):
        results[norm] = []
        for rep in range(args.repeats):
            sites = [phantom_site(n, seed=100 * rep + i, **sc) for i, (n, sc) in enumerate(zip(sizes, scanners))]
            test = concat_sites(*[phantom_site(60, seed=100 * rep + 50 + i, **sc) for i, sc in enumerate(scanners)])
            mean, std = clinical_stats(*sites)
            cfg = load_config(cli={"norm": norm, "seed": rep, "device": args.device, "local-epochs": args.local_epochs})
            global_model = build_model(cfg, n_channels=3, spatial_dims=2, n_clinical=7, use_clinical=False)
            curve = []
            for rnd in range(args.rounds):
                states, weights = [], []
                for i, site in enumerate(sites):
                    local = build_model(cfg, n_channels=3, spatial_dims=2, n_clinical=7, use_clinical=False)
                    local.load_state_dict(global_model.state_dict())
                    out = train(local, site, cfg, mean, std, seed=1000 * rnd + i)
                    states.append({k: v.detach().cpu() for k, v in local.state_dict().items()})
                    weights.append(out["num_examples"])
                global_model.load_state_dict(fedavg(states, weights))
                metrics, _ = evaluate(global_model, test, mean, std, cfg)
                curve.append(metrics["auc"])
            results[norm].append(curve)
            print(f"  {norm:8s} repeat {rep}: AUC by round " + " ".join(f"{a:.3f}" for a in curve), flush=True)
    print("held-out AUC after the last round (median over repeats):")
    finals = {norm: statistics.median(c[-1] for c in curves) for norm, curves in results.items()}
    means = {norm: statistics.median(statistics.fmean(c) for c in curves) for norm, curves in results.items()}
    for norm in finals:
        print(f"  {norm:8s} final {finals[norm]:.3f}   mean over rounds {means[norm]:.3f}")
    print(f"best final AUC: {max(finals, key=finals.get)}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=5, help="timed epochs per variant (median reported)")
    parser.add_argument("--batch-size", type=int, default=16, help="mini-batch size")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed call (the default local-epochs)")
    parser.add_argument("--patients", type=int, default=128, help="patients per (first) site")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--compare-norm", action="store_true", help="2-site FedAvg with batch / instance / group norm")
    parser.add_argument("--rounds", type=int, default=6, help="--compare-norm: FedAvg rounds")
    parser.add_argument("--local-epochs", type=int, default=1, help="--compare-norm: local epochs per round")
    parser.add_argument("--repeats", type=int, default=2, help="--compare-norm: independent seeds")


def run(args) -> int:
    for name in ("runs", "epochs", "batch_size", "patients", "rounds", "local_epochs", "repeats"):
        if getattr(args, name) < 1:
            print(f"slmfed bench train: --{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_compare_norm(args) if args.compare_norm else run_throughput(args)
