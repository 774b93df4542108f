"""The site's privacy policy and its disclosure ledger.

Why here and not in the study config: a hospital joins only if it alone decides what leaves it. The
policy is read from the site's own node config (deployment: the site bundle's `[privacy]` table,
passed to `flower-supernode --node-config`); `common.config.load_config` refuses these keys from the
coordinator's run config, and no message can change them. The coordinator sees the policy (the
`query.info` reply reports it) but cannot set it.

The ledger remembers, across studies and enrolments, every patient group the site has released
statistics about (`groups`: what the span audit of client/span_audit.py works on; `partitions`: what
max-partitions counts), the studies it answered, the queries it spent and the DP budget each study
used, so that no later request can be combined with earlier ones down to fewer than k patients. It lives at the site (default STUDY_DIR/disclosure-ledger.json), is
written atomically under a file lock, and holds salted patient keys only.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from common.atomic import atomic_write_json
from common.config import SCHEMA, SITE_POLICY_KEYS

LEDGER_VERSION = 1


@dataclass(frozen=True)
class SitePolicy:
    """What this site releases; each field is the node-config key of the same name (kebab-case)."""

    min_cell_size: int = SCHEMA["min-cell-size"].default
    histogram_bins: int = SCHEMA["histogram-bins"].default
    share_histograms: bool = SCHEMA["share-histograms"].default
    max_logit_slope: float = SCHEMA["max-logit-slope"].default
    max_partitions: int = SCHEMA["max-partitions"].default
    max_studies: int = SCHEMA["max-studies"].default
    dp_epsilon: float = SCHEMA["dp-epsilon"].default     # 0: no DP (client/dp.py)
    dp_delta: float = SCHEMA["dp-delta"].default
    dp_clip_norm: float = SCHEMA["dp-clip-norm"].default
    dp_lifetime_epsilon: float = SCHEMA["dp-lifetime-epsilon"].default
    allowed_backbones: str = SCHEMA["allowed-backbones"].default
    max_widen_factor: float = SCHEMA["max-widen-factor"].default
    max_ensemble_size: int = SCHEMA["max-ensemble-size"].default
    max_epoch_patients: int = SCHEMA["max-epoch-patients"].default
    max_reply_mb: float = SCHEMA["max-reply-mb"].default
    max_rounds: int = SCHEMA["max-rounds"].default
    min_batch_size: int = SCHEMA["min-batch-size"].default
    max_fits_per_study: int = SCHEMA["max-fits-per-study"].default
    max_evaluations_per_study: int = SCHEMA["max-evaluations-per-study"].default
    max_evaluations: int = SCHEMA["max-evaluations"].default
    span_audit: str = SCHEMA["span-audit"].default
    model_verification: str = SCHEMA["model-verification"].default

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "SitePolicy":
        """From a config merged by common.config.load_config, which has already type- and bound-checked
        these keys and refused them from the run config."""
        return cls(**{k.replace("-", "_"): cfg[k] for k in SITE_POLICY_KEYS if k != "privacy-ledger"})

    def as_record(self) -> dict[str, Any]:
        """The policy as the site reports it to the coordinator (read-only information)."""
        return {k.replace("_", "-"): (int(v) if isinstance(v, bool) else v) for k, v in asdict(self).items()}


class Ledger:
    """Site-local JSON record of released partitions, answered studies and spent query budget.

    Use `with ledger.transaction() as state:`; the file is locked for the whole transaction and the
    new state is written atomically when the block ends without an exception, so a refused or failed
    request leaves the ledger as it was.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"version": LEDGER_VERSION, "groups": [], "partitions": [], "studies": [], "budget": {}}
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            # never fall back to an empty ledger: that would forget what was released
            raise RuntimeError(f"disclosure ledger {self.path} cannot be read ({exc}); the site refuses to answer "
                               "until it is restored from backup") from None
        if data.get("version") != LEDGER_VERSION:
            raise RuntimeError(f"disclosure ledger {self.path}: version {data.get('version')!r}, expected {LEDGER_VERSION}")
        return data

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self._read()
                before = json.dumps(state, sort_keys=True)
                yield state
                if json.dumps(state, sort_keys=True) != before:
                    atomic_write_json(self.path, state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
