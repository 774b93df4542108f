"""Checks on the sites' training replies before aggregation, and the aggregation rules.

Why: one broken or malicious site must not ruin the global model. Each training reply of a round is
checked against the global model the site was sent; a rejected reply is left out of that round (the
protocol logs and reports it with its reason) and only accepted replies are aggregated.

A reply is rejected when
  structure  its arrays' keys, shapes or dtypes differ from the global model's;
  finite     a floating-point value is NaN or infinite;
  count      num-examples is not the number of training patients the site declared for this fit
             (its `query.clinical_sums` reply), or, without that, not in 1..its enrolment count;
  norm       the update norm ||w_site - w_global|| (all floating-point arrays) is above
             `max-update-ratio` x the median update norm of the round's other sites that passed the
             checks above (when one of them moved at all), or above `max-update-ratio` x ||w_global||
             (always: no honest round moves a model further than a multiple of itself).
The norm rule only bounds from above: an attacker with a huge update cannot get an honest site
rejected, it only makes the honest sites' reference larger. Weights scaled by 1e6 fail both bounds.

Aggregation (`aggregation`, common/derive.py, where the sites recompute it): fedavg, the example-weighted mean (Flower's
`aggregate_arrayrecords`, as Flower's FedAvg strategy); fedmedian and trimmed-mean, Flower's own
`aggregate_median` / `aggregate_trimmed_avg` (flwr.server.strategy.aggregate; unweighted,
per coordinate). Trimmed mean cuts int(trim-fraction x n) sites at each end: with 3 sites it needs
trim-fraction >= 1/3 to cut anything.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from flwr.app import ArrayRecord, RecordDict

# the aggregation rules live with the rest of the model derivations, which sites recompute
from common.derive import AGGREGATIONS, aggregate  # noqa: F401  (re-exported)


def _floats(arrays: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k, v in arrays.items() if v.dtype.kind == "f"]


def _norm(arrays: Mapping[str, np.ndarray], keys: list[str], minus: Mapping[str, np.ndarray] | None = None) -> float:
    total = 0.0
    for k in keys:
        a = arrays[k].astype(np.float64)
        d = a - minus[k].astype(np.float64) if minus is not None else a
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def structural_problem(global_np: Mapping[str, np.ndarray], content: RecordDict) -> str | None:
    """Why this reply's weights cannot be the global model's shape of weights, or None."""
    if len(content.array_records) != 1 or "arrays" not in content:
        return "the reply holds no single 'arrays' record"
    try:
        sent = {k: v.numpy() for k, v in content["arrays"].items()}
    except Exception as exc:  # noqa: BLE001 - any undecodable array is a rejection, with its reason
        return f"undecodable arrays ({type(exc).__name__})"
    if set(sent) != set(global_np):
        odd = sorted(set(sent) ^ set(global_np))
        return f"keys differ from the global model's (first: {odd[0]!r})"
    for k, g in global_np.items():
        if sent[k].shape != g.shape:
            return f"array {k!r} has shape {sent[k].shape}, the global model's is {g.shape}"
        if sent[k].dtype != g.dtype:
            return f"array {k!r} has dtype {sent[k].dtype}, the global model's is {g.dtype}"
    bad = next((k for k in _floats(sent) if not np.isfinite(sent[k]).all()), None)
    if bad is not None:
        return f"array {bad!r} holds NaN or infinite values"
    return None


def count_problem(content: RecordDict, expected: int | None, enrolled: int | None) -> str | None:
    """Why num-examples does not fit what the site declared, or None."""
    metrics = content.metric_records.get("metrics")
    n = metrics.get("num-examples") if metrics is not None else None
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n) or n < 1:
        return f"num-examples {n!r} is not a positive integer"
    n = int(n)
    if expected is not None and n != expected:
        return f"num-examples {n} differs from the {expected} training patients the site declared for this fit"
    if expected is None and enrolled is not None and enrolled >= 0 and n > enrolled:
        return f"num-examples {n} exceeds the site's enrolment count {enrolled}"
    return None


def check_updates(global_arrays: ArrayRecord, replies: Mapping[str, RecordDict], max_ratio: float,
                  expected_counts: Mapping[str, int] | None = None,
                  enrolled: Mapping[str, int] | None = None) -> tuple[list[str], dict[str, str]]:
    """(accepted sites in reply order, {rejected site: reason}) for one round's training replies."""
    expected_counts, enrolled = expected_counts or {}, enrolled or {}
    global_np = {k: v.numpy() for k, v in global_arrays.items()}
    keys = _floats(global_np)
    rejected: dict[str, str] = {}
    norms: dict[str, float] = {}
    for site, content in replies.items():
        reason = structural_problem(global_np, content) or count_problem(
            content, expected_counts.get(site), enrolled.get(site))
        if reason:
            rejected[site] = reason
            continue
        sent = {k: v.numpy() for k, v in content["arrays"].items()}
        norms[site] = _norm(sent, keys, global_np)
    scale = _norm(global_np, keys)
    for site, n in norms.items():
        others = [v for s, v in norms.items() if s != site]
        ref = float(np.median(others)) if others else 0.0
        if ref > 0 and n > max_ratio * ref:
            rejected[site] = (f"update norm {n:.3g} is {n / ref:.3g} x the median of the other sites' "
                              f"this round ({ref:.3g}; limit {max_ratio:g} x)")
        elif n > max_ratio * scale:
            rejected[site] = f"update norm {n:.3g} exceeds {max_ratio:g} x the global model's norm ({scale:.3g})"
    return [s for s in replies if s not in rejected], rejected
