"""How every model state of a study is derived: the one implementation the coordinator uses to make
them and a site uses to check them (client/verify.py).

Why one implementation: a site computes only on model states it can derive itself from the study's
settings and the signed contributions of the sites in its own roster. The coordinator's protocol
(server/protocol.py) makes its models with exactly these functions, in exactly this order of
operations, so an honest coordinator's model and the site's recomputation are the same bytes
(`state_hash`); anything else is refused.

A derivation ("recipe") travels with a request as JSON; it names the signed statements it uses by
their index in the request's evidence record (see `Evidence`):
  standardisation  "std": [sums statements]  -> the clinical mean / SD (and the ROI statistics')
  CF coefficients  {"zero": true}  or  {"ref": beta, "t": 2^-j, "l2": l2, "stats": [stats statements at ref]}
                   (a Newton candidate from a point the signing sites answered at; common/logistic.py)
  DL model         {"kind": "init", "seed", "model", "beta": CF proof or null}
                   {"kind": "rounds", "rounds": [[update statements of round r] ...], "rule", "trim", "swa": n}
                     (each round's aggregate by the study's rule; swa n > 0: the mean of the n aggregates)
                   {"kind": "combine", "seed", "dl": DL recipe, "beta": CF proof}
"""
from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.records import arrays_to_numpy, numpy_to_record

AGGREGATIONS = ("fedavg", "fedmedian", "trimmed-mean")
EVIDENCE = "evidence"         # the request's ConfigRecord: recipe, statements, signatures
CONTRIB = "contrib-"          # the request's ArrayRecords: the updates the recipe aggregates
MAX_HALVINGS = 40             # newton_fit halves a step until t < 1e-8 (27 halvings)


# ---- hashes ---------------------------------------------------------------------------------------
def state_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of a model state: every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(json.dumps([k, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def record_hash(record: ArrayRecord) -> str:
    return state_hash(arrays_to_numpy(record))


def values_hash(*vectors: Any) -> str:
    """SHA-256 of float64 vectors (CF coefficients; a standardisation's mean and SD)."""
    h = hashlib.sha256()
    for v in vectors:
        a = np.ascontiguousarray(np.asarray(v, dtype=np.float64).ravel())
        h.update(str(a.size).encode() + b":")
        h.update(a.tobytes())
    return h.hexdigest()


# ---- standardisation ------------------------------------------------------------------------------
def pooled(n: int, s: np.ndarray, ss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample SD from a count, sums and sums of squares; a constant feature is only centred
    (SD 1, as common.clinical.standardise does)."""
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0) * n / max(n - 1, 1))
    return mean, np.where(std > 1e-8, std, 1.0)


def pool_sums(sums: Sequence[Mapping[str, Any]]):
    """(clinical mean, SD, ROI (mean, SD) or None) from the training sites' sums, added in list order."""
    n = sum(int(m["num-examples"]) for m in sums)
    s = sum(np.asarray(m["sum"]) for m in sums)
    ss = sum(np.asarray(m["sumsq"]) for m in sums)
    roi = None
    if all("roi-sum" in m for m in sums):
        roi = pooled(n, sum(np.asarray(m["roi-sum"]) for m in sums), sum(np.asarray(m["roi-sumsq"]) for m in sums))
    mean, std = pooled(n, s, ss)
    return mean, std, roi


def roi_reference(text: str, k: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The study's ROI-statistics standardisation from reference data (study key roi-stats-reference:
    the means, then the SDs), or None when the study pools it from the training sites' sums. A
    reference is fixed before the study sees any site's data, so nothing in it comes from the sites:
    what DP-SGD trains on it stays covered by the sites' epsilon (client/dp.py)."""
    text = str(text or "").strip()
    if not text:
        return None
    try:
        values = np.array([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError:
        raise ValueError(f"roi-stats-reference: expected comma-separated numbers, found {text[:60]!r}") from None
    if values.size % 2 or (k is not None and values.size != 2 * k):
        want = "an even count" if k is None else f"{2 * k} ({k} means, then {k} SDs)"
        raise ValueError(f"roi-stats-reference: expected {want} of numbers, found {values.size}")
    mean, std = values[: values.size // 2], values[values.size // 2:]
    if not (np.isfinite(values).all() and (std > 0).all()):
        raise ValueError("roi-stats-reference: expected finite means and positive SDs")
    return mean, std


# ---- CF model -------------------------------------------------------------------------------------
def pool_stats(stats: Sequence[Mapping[str, Any]], p: int) -> dict:
    """The pooled CF statistics newton_fit steps on, added in list order."""
    return {"grad": sum(np.asarray(m["grad"]) for m in stats),
            "hess": sum(np.asarray(m["hess"]).reshape(p, p) for m in stats),
            "loglik": sum(float(m["loglik"]) for m in stats), "n": sum(int(m["num-examples"]) for m in stats)}


def newton_candidate(ref, pooled_stats: Mapping, l2: float, t: float) -> np.ndarray:
    from common.logistic import newton_step

    ref = np.asarray(ref, dtype=np.float64)
    return ref + t * newton_step(pooled_stats, ref, l2)


# ---- DL model -------------------------------------------------------------------------------------
def initial_state(model_cfg: Mapping[str, Any], seed: int, model: str, shape: Mapping[str, Any], cf_beta=None,
                  roi=None) -> ArrayRecord:
    """A fit's initial weights from the study settings (build_model seeds itself from `seed`); the
    Combined model starts from the CF model when given one; with roi-stats, the pooled ROI
    standardisation is set. `shape`: n-channels, spatial-dims, n-features, channels."""
    from common.model import build_model

    net = build_model({**model_cfg, "seed": int(seed)}, int(shape["n-channels"]), int(shape["spatial-dims"]),
                      int(shape["n-features"]), use_clinical=(model == "combined"), channels=shape.get("channels"))
    if model == "combined" and cf_beta is not None:
        net.start_from_logistic(cf_beta)
    if net.config["roi_stats"]:
        if roi is None:
            raise ValueError("the model has ROI statistics (roi-stats) but the training sites sent no sums of them")
        net.set_roi_standardisation(*roi)
    return ArrayRecord(net.state_dict())


def aggregate(global_arrays: ArrayRecord, contents: list[RecordDict], method: str, trim_fraction: float) -> ArrayRecord:
    """Combine accepted training replies into the next global model: fedavg, the example-weighted mean
    (Flower's `aggregate_arrayrecords`, as Flower's FedAvg strategy); fedmedian and trimmed-mean,
    Flower's own `aggregate_median` / `aggregate_trimmed_avg` (unweighted, per coordinate)."""
    if method == "fedavg":
        out = aggregate_arrayrecords(contents, "num-examples")
        ints = {k: v.numpy().dtype for k, v in contents[0]["arrays"].items() if v.numpy().dtype.kind in "iub"}
        if not ints:  # the default models hold floats only: exactly Flower's result
            return out
        # integer buffers (BatchNorm's batch counter) stay integers, or the next round's replies would
        # differ in dtype from the global model
        return ArrayRecord({k: Array(np.ascontiguousarray(np.rint(v.numpy()).astype(ints[k])) if k in ints else v.numpy())
                            for k, v in out.items()})
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}: expected one of {', '.join(AGGREGATIONS)}")
    keys = list(global_arrays.keys())
    results = [([c["arrays"][k].numpy() for k in keys], int(c["metrics"]["num-examples"])) for c in contents]
    layers = aggregate_median(results) if method == "fedmedian" else aggregate_trimmed_avg(results, trim_fraction)
    out = {}
    for k, layer in zip(keys, layers, strict=True):
        dtype = global_arrays[k].numpy().dtype
        layer = np.asarray(layer)
        out[k] = Array(np.ascontiguousarray(np.rint(layer).astype(dtype) if dtype.kind in "iub" else layer.astype(dtype)))
    return ArrayRecord(out)


def keep_roi_standardisation(arrays: ArrayRecord, roi) -> ArrayRecord:
    """The ROI statistics' standardisation is the pooled one from the sums, not the sites' copies: an
    aggregate is put back to it, whatever a site sent."""
    import torch

    keys = [k for k in arrays if k.rsplit(".", 1)[-1] in ("roi_stats_mean", "roi_stats_std")]
    if roi is None or not keys:
        return arrays
    state = arrays.to_torch_state_dict()
    for k in keys:
        value = roi[0] if k.endswith("roi_stats_mean") else roi[1]
        state[k] = torch.as_tensor(value, dtype=state[k].dtype)
    return ArrayRecord(state)


def swa_add(sums: dict[str, np.ndarray], arrays: ArrayRecord) -> dict[str, np.ndarray]:
    now = arrays_to_numpy(arrays)
    return {k: sums.get(k, 0.0) + v.astype(np.float64) for k, v in now.items()}


def swa_mean(last: ArrayRecord, sums: Mapping[str, np.ndarray], n: int) -> ArrayRecord:
    """Stochastic weight averaging: the mean of the global weights of the last n rounds."""
    ref = arrays_to_numpy(last)
    return numpy_to_record({k: (sums[k] / n).astype(ref[k].dtype) for k in ref})


def combine(model_cfg: Mapping[str, Any], seed: int, shape: Mapping[str, Any], dl_arrays: ArrayRecord, beta) -> ArrayRecord:
    """combined-from = dl+cf: the Combined model made of a trained DL model and a CF model
    (common/model.py FusionResNet.start_from_parts), with no further training."""
    from common.model import build_model

    def net(use_clinical: bool):
        return build_model({**model_cfg, "seed": int(seed)}, int(shape["n-channels"]), int(shape["spatial-dims"]),
                           int(shape["n-features"]), use_clinical=use_clinical, channels=shape.get("channels"))
    dl = net(False)
    dl.load_state_dict(dl_arrays.to_torch_state_dict())
    combined = net(True)
    combined.start_from_parts(dl, beta)
    return ArrayRecord(combined.state_dict())


def contribution(arrays: ArrayRecord, num_examples: int) -> RecordDict:
    """A training update as `aggregate` takes it (the reply's weights and its num-examples)."""
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": int(num_examples)})})


# ---- evidence: the signed statements a request carries --------------------------------------------
class Evidence:
    """Builds a request's evidence: signed statements (text, signature), each added once, and the
    updates' weights; `ref(entry)` gives the index a recipe uses."""

    def __init__(self):
        self.statements: list[str] = []
        self.signatures: list[bytes] = []
        self.arrays: dict[int, ArrayRecord] = {}

    def ref(self, entry: Mapping[str, Any]) -> int:
        text = entry["statement"]
        if text in self.statements:
            return self.statements.index(text)
        self.statements.append(text)
        self.signatures.append(signature_bytes(entry["signature"]))
        if entry.get("arrays") is not None:
            self.arrays[len(self.statements) - 1] = entry["arrays"]
        return len(self.statements) - 1

    def records(self, recipe: Mapping[str, Any]) -> dict[str, Any]:
        """The request's records: EVIDENCE (ConfigRecord) and CONTRIB<i> (ArrayRecords)."""
        record: dict[str, Any] = {"recipe": json.dumps(recipe, sort_keys=True)}
        if self.statements:  # a record cannot hold an empty list
            record.update({"statements": list(self.statements), "signatures": list(self.signatures)})
        out: dict[str, Any] = {EVIDENCE: ConfigRecord(record)}
        out.update({f"{CONTRIB}{i}": a for i, a in self.arrays.items()})
        return out

    def nbytes(self) -> int:
        return sum(a.count_bytes() for a in self.arrays.values()) + sum(map(len, self.statements)) + 64 * len(self.signatures)


def signature_bytes(sig: bytes | str) -> bytes:
    """Signatures travel as bytes in records and as base64 text in the study's JSON state."""
    return sig if isinstance(sig, bytes) else base64.b64decode(sig)


def signature_text(sig: bytes | str) -> str:
    return sig if isinstance(sig, str) else base64.b64encode(sig).decode()
