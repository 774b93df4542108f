"""`slmfed roi-reference CACHE [CACHE ...]`: the ROI statistics' standardisation from reference data.

Why: under DP-SGD a site trains the model's linear term on the ROI statistics (common/model.py
make_wide), and that term needs standardised inputs (the ROI means vary by a few percent of their
range between patients). Pooling the mean / SD from the study's own sites would fit them on the
sites' patients outside the DP budget, so a site under DP trains only with a standardisation fixed
before the study: this command computes it from caches of reference data that are not the study's
(a public dataset, or an earlier cohort released for it), prepared with `slmfed prepare` and the
study's preprocessing settings. Its output is the study key `roi-stats-reference`. Labels are not
read. A reference that is off by one between-patient SD in the means, or a factor 2 in the SDs,
cost about 0.02 AUC in a simulation (simulation/README.md "Differential privacy").
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from common.cli import CommandError

MIN_PATIENTS = 20  # fewer give SDs that are noise


def reference(caches: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray, int]:
    """(means, SDs, patients) of the ROI statistics over the caches' patients pooled."""
    from client.cache import load_cache
    from client.train import roi_statistics

    rows, channels = [], None
    for c in caches:
        data = load_cache(c)
        if channels is not None and list(data.manifest.get("channels") or []) != channels:
            raise ValueError(f"{c}: channels {data.manifest.get('channels')} differ from the first cache's {channels}")
        channels = list(data.manifest.get("channels") or [])
        r = roi_statistics(data)
        if r is None:
            raise ValueError(f"{c}: the cache's images carry no ROI mask channel (prepare with mask-channel = true)")
        rows.append(r)
    stats = np.concatenate(rows)
    if len(stats) < MIN_PATIENTS:
        raise ValueError(f"reference: {len(stats)} patient(s) in {', '.join(map(str, caches))}; expected at least {MIN_PATIENTS}")
    return stats.mean(axis=0), stats.std(axis=0, ddof=1), len(stats)


def as_setting(mean: np.ndarray, std: np.ndarray) -> str:
    """The study key's value: the means, then the SDs (6 significant digits)."""
    return ",".join(f"{v:.6g}" for v in (*mean, *std))


def register(sub) -> None:
    p = sub.add_parser("roi-reference", help="the ROI statistics' standardisation from reference caches "
                                             "(study key roi-stats-reference; needed by sites under DP)",
                       description=__doc__)
    p.add_argument("caches", nargs="+", metavar="CACHE", help="prepared caches of reference data (not the study's sites)")
    p.set_defaults(func=run)


def run(args) -> int:
    from client.cache import CacheError

    try:
        mean, std, n = reference(args.caches)
    except (ValueError, CacheError, OSError) as exc:
        raise CommandError(str(exc)) from None
    print(f"# ROI statistics of {n} reference patients ({', '.join(args.caches)}): means, then SDs")
    print(f'roi-stats-reference = "{as_setting(mean, std)}"')
    return 0
