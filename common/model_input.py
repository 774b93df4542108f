"""What a model expects as input: the preprocessing description that travels with a trained model.

A site's cache (manifest.json, written by `slmfed prepare`) says how its model inputs were made. The
site sends this description (settings only, nothing about a patient) in its `query.info` reply; the
coordinator keeps the training sites' common description in the model file (models/<fit>.json), and
`slmfed predict` compares it with the preprocessing it is about to run. Any difference is a refusal
naming the setting: a model applied to inputs made differently gives numbers that mean nothing.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from common.clinical import ENCODING_VERSION, FEATURE_NAMES

# key -> what it is (the report prints these); every key must match between model and site
KEYS: dict[str, str] = {
    "pipeline": "preprocessing pipeline version",
    "input-mode": "model input (2d: largest-ROI slice, 2.5d, 3d)",
    "channels": "input channels (MRI sequences, in order)",
    "image-shape": "model input shape (channels x [depth x] height x width)",
    "fov-mm": "physical field of view of the ROI crop (mm)",
    "crop-size": "in-plane matrix of the crop (pixels)",
    "crop-depth": "slices of the 3D crop",
    "context-slices": "2.5d: neighbouring slices on each side",
    "orientation": "orientation the crop is taken in",
    "t2-dwi-normalisation": "T2WI / DWI intensity normalisation",
    "adc-normalisation": "ADC normalisation",
    "clinical-encoding": "clinical factor encoding version",
    "clinical-features": "clinical features, in order",
}
# a model must state at least these (older descriptions may lack the finer preprocessing keys)
REQUIRED = ("channels", "image-shape", "clinical-encoding", "clinical-features")
_PARAM_KEYS = {"pipeline_version": "pipeline", "input-mode": "input-mode", "fov-mm": "fov-mm", "crop-size": "crop-size",
               "crop-depth": "crop-depth", "context-slices": "context-slices", "orientation": "orientation",
               "t2-dwi-normalisation": "t2-dwi-normalisation", "adc-normalisation": "adc-normalisation"}
_MAX_TEXT = 200
_MAX_LIST = 64


class ModelInputError(ValueError):
    """A description is malformed (e.g. a hostile or corrupted reply / model file)."""


def describe(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The model-input description of a prepared cache's manifest (keys of KEYS that it states)."""
    out: dict[str, Any] = {}
    params = manifest.get("preprocessing") or {}
    for src, key in _PARAM_KEYS.items():
        if src in params:
            out[key] = params[src]
    if "input_mode" in manifest:
        out["input-mode"] = manifest["input_mode"]
    if "channels" in manifest:
        out["channels"] = [str(c) for c in manifest["channels"]]
    if "image_shape" in manifest:
        out["image-shape"] = [int(x) for x in manifest["image_shape"]]
    features = [str(f) for f in manifest.get("feature_names", [])]
    if features:
        out["clinical-features"] = features
    # caches written before the manifest named its encoding used the only one there was
    out["clinical-encoding"] = str(manifest.get("clinical_encoding")
                                   or (ENCODING_VERSION if features == list(FEATURE_NAMES) else "unknown"))
    if out.get("input-mode") != "3d":
        out.pop("crop-depth", None)  # unused outside 3d: sites may differ in it harmlessly
    if out.get("input-mode") != "2.5d":
        out.pop("context-slices", None)
    return out


def validate(record: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A description received from elsewhere (a site's reply, a model file), checked: known keys
    only, short texts, numbers, lists of short texts / integers. Raises ModelInputError."""
    out: dict[str, Any] = {}
    for key, value in dict(record).items():
        if key not in KEYS:
            raise ModelInputError(f"{source}: unknown model-input key {key!r}")
        if isinstance(value, bool):
            raise ModelInputError(f"{source}: {key}: expected text, a number or a list, found {value!r}")
        if isinstance(value, str):
            if len(value) > _MAX_TEXT:
                raise ModelInputError(f"{source}: {key}: text longer than {_MAX_TEXT} characters")
        elif isinstance(value, (int, float)):
            if not math.isfinite(float(value)):
                raise ModelInputError(f"{source}: {key}: expected a finite number, found {value!r}")
        elif isinstance(value, (list, tuple)):
            if len(value) > _MAX_LIST or not all(
                    (isinstance(v, str) and len(v) <= _MAX_TEXT) or (isinstance(v, int) and not isinstance(v, bool))
                    for v in value):
                raise ModelInputError(f"{source}: {key}: expected a short list of texts or integers")
            value = list(value)
        else:
            raise ModelInputError(f"{source}: {key}: expected text, a number or a list, found {type(value).__name__}")
        out[key] = value
    return out


def agree(descriptions: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the description every site shares, {key: {site: value}} where they differ). A key some
    sites do not state is kept only if all that state it agree, and listed as a conflict otherwise."""
    common: dict[str, Any] = {}
    conflicts: dict[str, dict[str, Any]] = {}
    keys = sorted({k for d in descriptions.values() for k in d})
    for key in keys:
        values = {site: d.get(key) for site, d in descriptions.items()}
        stated = [v for v in values.values() if v is not None]
        if all(v == stated[0] for v in stated) and len(stated) == len(values):
            common[key] = stated[0]
        else:
            conflicts[key] = values
    return common, conflicts


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def mismatches(model: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """One sentence per setting in which this site's preprocessing differs from the model's."""
    out = [f"the model's description lacks {key} ({KEYS[key]})" for key in REQUIRED if key not in model]
    for key, want in model.items():
        if key not in KEYS:
            continue
        have = here.get(key)
        if have is None:
            out.append(f"{key} ({KEYS[key]}): the model expects {want!r}, this site's preprocessing does not state it")
        elif not _same(want, have):
            out.append(f"{key} ({KEYS[key]}): the model expects {want!r}, this site's preprocessing gives {have!r}")
    return out
