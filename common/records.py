"""Conversions between model state / plain dicts and Flower records.

Only model parameters and aggregate numbers are ever put into records (see the privacy contract in
ARCHITECTURE.md); these helpers refuse anything else rather than silently dropping it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

# Error codes of a site's error reply (Flower's own codes are small integers):
SITE_REFUSED = 4001  # the site's privacy policy refuses the request; the reason names the rule
SITE_CANNOT = 4002   # the site cannot do it (e.g. too few patients for the folds, no labels)

if TYPE_CHECKING:  # torch is imported only by the messages that carry weights
    import torch


def state_to_record(model: "torch.nn.Module") -> ArrayRecord:
    """All parameters and buffers (BatchNorm statistics included) as one ArrayRecord."""
    return ArrayRecord(model.state_dict())


def record_to_state(record: ArrayRecord) -> "OrderedDict[str, torch.Tensor]":
    import torch  # noqa: F401  (Flower converts only once torch is imported)

    return record.to_torch_state_dict()


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def to_metric_record(values: Mapping[str, Any]) -> MetricRecord:
    """Numbers and lists of numbers only; a value of any other type is an error, not dropped."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, (bool, np.bool_)):
            out[k] = int(v)
        elif isinstance(v, (int, np.integer)):
            out[k] = int(v)
        elif isinstance(v, (float, np.floating)):
            out[k] = float(v)
        elif isinstance(v, (list, tuple, np.ndarray)):
            arr = np.asarray(v)
            if arr.dtype.kind in "iub":
                out[k] = [int(x) for x in arr.ravel()]
            elif arr.dtype.kind == "f":
                out[k] = [float(x) for x in arr.ravel()]
            else:
                raise TypeError(f"metric '{k}': expected numbers, found dtype {arr.dtype}")
        else:
            raise TypeError(f"metric '{k}': expected a number or a list of numbers, found {type(v).__name__}")
    return MetricRecord(out)


def score_cells(metrics: Mapping[str, Any], model: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(edges, neg, pos) of a model's k-safe score cells in a site's summary reply; None when withheld."""
    if f"{model}.cell-edges" not in metrics:
        return None
    return tuple(np.asarray(metrics[f"{model}.cell-{k}"], dtype=np.float64) for k in ("edges", "neg", "pos"))


def to_config_record(values: Mapping[str, Any]) -> ConfigRecord:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = list(v) if isinstance(v, tuple) else v
    return ConfigRecord(out)
