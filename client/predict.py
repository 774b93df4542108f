"""`slmfed predict`: use the consortium's final models on a site's own, possibly unlabelled, patients.

Everything runs at the site and stays there: nothing here talks to the network. Steps:
  1. load the model file (models/<fit>.json from the study's run folder) and check the weights it
     names against their sha256;
  2. refuse when this site's preprocessing settings differ from the model's (common/model_input.py:
     sequences / channels, crop size and field of view, input mode, clinical encoding version ...);
  3. prepare the patients exactly as `slmfed prepare` does (client/prepare.py), into a private cache
     under OUT (the slm column is optional);
  4. the CF, MRI DL and Combined models' probabilities through the same code the study's evaluation
     uses (client.study.predict), the Combined model's risk group at the development threshold;
  5. out-of-range clinical inputs (beyond the development mean +- 3 SD, or a value no development
     patient had, or above the plausibility bounds of client/clinical_table.py) are warned about and
     marked in the report;
  6. a Grad-CAM attention map per DL model (monai.visualize.GradCAM), a self-contained HTML report per
     patient (client/predict_report.py) and worklist.csv.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client import cache as cache_mod
from common.clinical import FEATURE_NAMES
from common.config import SENT_MODEL_KEYS
from common.model_input import KEYS, ModelInputError, describe, mismatches, validate

MODEL_FORMAT = "slmfed-model-1"
MODEL_LABEL = {"cf": "CF model", "dl": "MRI DL model", "combined": "Combined DL model"}
DILATE_MM = 5.0  # the ROI grown by this margin is what "attention on the tumour" counts
PREPARED = "prepared"  # OUT/prepared: the private cache of the patients predicted


class PredictError(RuntimeError):
    """predict cannot run (the model file, the model/preprocessing match, the input folder)."""


# ---- the model file ------------------------------------------------------------------------------
@dataclass
class ModelBundle:
    path: Path
    meta: dict
    states: dict[str, dict] = field(default_factory=dict)  # dl / combined: state_dict (torch tensors)

    @property
    def models(self) -> list[str]:
        return [m for m in ("cf", "dl", "combined") if m in self.meta["models"]]

    @property
    def model_id(self) -> str:
        return str(self.meta["model_id"])

    def identity(self) -> str:
        c = self.meta["cohorts"]
        train = ", ".join(f"{s} ({v['patients'] if v['patients'] >= 0 else 'n withheld'} patients)"
                          for s, v in c["training"].items())
        return (f"model {self.model_id} (fit '{self.meta['fit']}' of study {self.meta['study_id']}, "
                f"{self.meta['scenario']} scenario), trained {self.meta['trained']} on {train}; "
                f"externally validated at: {', '.join(c['evaluated']) or 'none'}")


def resolve_model_path(path: str | Path) -> Path:
    """models/<fit>.json, or models/<fit>, or a run folder / its models folder (fit 'final')."""
    p = Path(path)
    for cand in (p, p.with_suffix(".json") if p.suffix != ".json" else p, p / "final.json", p / "models" / "final.json"):
        if cand.is_file():
            return cand
    raise PredictError(f"--model {path}: no model file there (expected RUN_DIR/models/<fit>.json, e.g. "
                       "runs/paper-.../models/final.json, written by `slmfed simulate` / the study)")


def load_bundle(path: str | Path) -> ModelBundle:
    """Read and check a model file: format, description, weights present and matching their hash."""
    import torch

    path = resolve_model_path(path)
    try:
        meta = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PredictError(f"{path} is not a readable model file: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise PredictError(f"{path}: not an slmfed model file (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                           f"expected {MODEL_FORMAT!r})")
    for key in ("models", "standardisation", "thresholds", "preprocessing", "settings", "cohorts", "model_id"):
        if key not in meta:
            raise PredictError(f"{path}: the model file lacks {key!r}")
    if meta.get("preprocessing_conflicts"):
        raise PredictError(f"{path}: the training sites prepared their inputs differently "
                           f"({', '.join(sorted(meta['preprocessing_conflicts']))}); this model has no single "
                           "preprocessing to match")
    try:
        meta["preprocessing"] = validate(meta["preprocessing"], str(path))
    except ModelInputError as exc:
        raise PredictError(str(exc)) from None
    std = meta["standardisation"]
    if list(std.get("features", [])) != list(FEATURE_NAMES) or len(std["mean"]) != len(FEATURE_NAMES):
        raise PredictError(f"{path}: the model's clinical features {std.get('features')} are not this version's "
                           f"{list(FEATURE_NAMES)}")
    _check_numbers(path, meta)
    bundle = ModelBundle(path, meta)
    for m in ("dl", "combined"):
        if m not in meta["models"]:
            continue
        w = meta["models"][m]
        name = str(w.get("weights", ""))
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise PredictError(f"{path}: {m} weights file name {name!r} is not a plain file name")
        wpath = path.parent / name
        if not wpath.is_file():
            raise PredictError(f"{path}: the {m} weights {wpath} are missing (copy the whole models/ folder)")
        if _sha256_file(wpath) != w.get("sha256"):
            raise PredictError(f"{wpath} does not match the sha256 in {path.name} (modified or a different run)")
        with np.load(wpath, allow_pickle=False) as z:
            bundle.states[m] = {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    if "cf" in meta["models"] and len(meta["models"]["cf"].get("beta", [])) != len(FEATURE_NAMES) + 1:
        raise PredictError(f"{path}: the CF model has {len(meta['models']['cf'].get('beta', []))} coefficients, "
                           f"expected {len(FEATURE_NAMES) + 1}")
    return bundle


def _check_numbers(path: Path, meta: dict) -> None:
    """The model file's settings and numbers, checked like any value received from elsewhere."""
    from common.config import ConfigError, coerce_value

    try:
        for key in SENT_MODEL_KEYS:
            if key in meta["settings"]:
                meta["settings"][key] = coerce_value(key, meta["settings"][key], f"model file {path}")
    except ConfigError as exc:
        raise PredictError(str(exc)) from None
    numbers = {"standardisation mean": meta["standardisation"]["mean"], "standardisation std": meta["standardisation"]["std"],
               "CF coefficients": meta["models"].get("cf", {}).get("beta", [])}
    for what, values in numbers.items():
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise PredictError(f"{path}: the {what} are not all finite numbers")
    for m, t in meta["thresholds"].items():
        if m not in ("cf", "dl", "combined") or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
            raise PredictError(f"{path}: threshold of {m!r} is {t!r}, expected a number in [0, 1]")


def _sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- the site's preprocessing vs the model's -----------------------------------------------------
def site_description(cfg: dict) -> dict[str, Any]:
    """The model-input description `slmfed prepare` would write with these settings."""
    from client.prepare import PIPELINE_VERSION, preprocessing_params
    from client.transforms import channel_names, image_shape
    from common.clinical import ENCODING_VERSION

    mode = cfg["input-mode"]
    return describe({"preprocessing": preprocessing_params(cfg), "input_mode": mode,
                     "pipeline_version": PIPELINE_VERSION,
                     "channels": channel_names(mode, cfg["context-slices"], cfg["mask-channel"]),
                     "image_shape": image_shape(mode, cfg["crop-size"], cfg["crop-depth"], cfg["context-slices"],
                                                cfg["mask-channel"]),
                     "feature_names": list(FEATURE_NAMES), "clinical_encoding": ENCODING_VERSION})


def check_match(bundle: ModelBundle, here: dict[str, Any], where: str) -> None:
    problems = mismatches(bundle.meta["preprocessing"], here)
    if problems:
        raise PredictError(f"the model {bundle.model_id} and {where} do not match, refusing to predict:\n  - "
                           + "\n  - ".join(problems)
                           + "\nprepare with the model's settings (site.toml / --config), or use a model trained on "
                             "inputs prepared like this site's")


# ---- the input folder ----------------------------------------------------------------------------
def site_view(input_dir: Path, patients: list[str] | None, work: Path) -> Path:
    """A site folder holding the requested patients: INPUT itself (a site folder, all patients), or
    a view in `work` (links, plus a clinical.csv of the requested rows) for --patient or a patient
    folder (clinical.csv, a mask file `mask.nii.gz` / `.nii` / `.nrrd` / `.mha`, DICOM anywhere)."""
    from client.clinical_table import ClinicalTableError, read_clinical_table
    from client.volumes import MASK_SUFFIXES

    if not input_dir.is_dir():
        raise PredictError(f"{input_dir} does not exist or is not a folder")
    clinical = input_dir / "clinical.csv"
    if not clinical.is_file():
        raise PredictError(f"{input_dir} has no clinical.csv (columns patient_id, sex, tumor_site, cea, ca199; "
                           "slm is optional)")
    is_site = (input_dir / "dicom").is_dir()
    if is_site and not patients:
        return input_dir
    text = clinical.read_text("utf-8-sig")
    lines = text.splitlines()
    try:
        table = read_clinical_table(clinical)
    except ClinicalTableError as exc:
        raise PredictError(str(exc)) from None
    if patients:
        unknown = [p for p in patients if p not in table.rows]
        if unknown:
            raise PredictError(f"--patient {', '.join(unknown)}: not in {clinical}")
    elif len(table.rows) != 1:
        raise PredictError(f"{input_dir} is neither a site folder (dicom/, masks/, clinical.csv) nor a patient "
                           f"folder (clinical.csv with one row, found {len(table.rows)})")
    keep = set(patients or table.rows)
    view = work / "site"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    rows = [lines[0]] + [lines[table.rows[p].line - 1] for p in sorted(keep)]
    (view / "clinical.csv").write_text("\n".join(rows) + "\n", "utf-8")
    if is_site:
        (view / "dicom").symlink_to((input_dir / "dicom").resolve(), target_is_directory=True)
        if (input_dir / "masks").is_dir():
            (view / "masks").symlink_to((input_dir / "masks").resolve(), target_is_directory=True)
        if (input_dir / "site.toml").is_file():
            (view / "site.toml").symlink_to((input_dir / "site.toml").resolve())
    else:
        pid = next(iter(keep))
        (view / "dicom").symlink_to(input_dir.resolve(), target_is_directory=True)
        masks = [input_dir / f"mask{s}" for s in MASK_SUFFIXES if (input_dir / f"mask{s}").is_file()]
        if masks:
            (view / "masks").mkdir()
            suffix = next(s for s in MASK_SUFFIXES if masks[0].name.endswith(s))
            (view / "masks" / f"{pid}{suffix}").symlink_to(masks[0].resolve())
    return view


# ---- clinical inputs vs the development range ----------------------------------------------------
def range_warnings(bundle: ModelBundle, row) -> list[str]:
    """Why this patient's clinical inputs lie outside what the model was developed on."""
    from client.clinical_table import PLAUSIBLE_MAX

    ranges, z = bundle.meta.get("clinical_ranges", {}), float(bundle.meta.get("clinical_range_z", 3.0))
    x = dict(zip(FEATURE_NAMES, row.encode().astype(float)))
    out = []
    for name, raw, unit in (("log_cea", row.cea, "ng/mL"), ("log_ca199", row.ca199, "U/mL")):
        r = ranges.get(name)
        if r and not r["low"] <= x[name] <= r["high"]:
            lo, hi = max(math.expm1(r["low"]), 0.0), math.expm1(r["high"])
            label = "CEA" if name == "log_cea" else "CA19-9"
            out.append(f"{label} {raw:g} {unit} is outside the development range {lo:.3g}-{hi:.3g} {unit} "
                       f"(mean +- {z:g} SD of the development cohort, on the log scale)")
    labels = {"sex_male": ("sex", {1.0: "M", 0.0: "F"}), "tumor_site_mid": ("tumor_site", {1.0: "mid"}),
              "tumor_site_high": ("tumor_site", {1.0: "high"})}
    for name, (column, names) in labels.items():
        r = ranges.get(name, {})
        if "only-value" in r and x[name] != r["only-value"]:
            value = names.get(x[name]) or ("not " + names.get(1.0, "?"))
            out.append(f"{column} {value}: no development patient had this value")
    low_mean = 1.0 - ranges.get("tumor_site_mid", {}).get("mean", 0.0) - ranges.get("tumor_site_high", {}).get("mean", 0.0)
    if row.tumor_site == "low" and "tumor_site_mid" in ranges and low_mean <= 1e-12:
        out.append("tumor_site low: no development patient had this value")
    for name in ("cea", "ca199"):
        v = getattr(row, name)
        if v > PLAUSIBLE_MAX[name]:
            out.append(f"{name} {v:g} is above the plausibility bound {PLAUSIBLE_MAX[name]:g}: check the value and unit")
    return out


# ---- predicting ----------------------------------------------------------------------------------
@dataclass
class PatientResult:
    patient_id: str
    status: str                      # "predicted" or "not predicted"
    reason: str = ""
    probs: dict[str, float] = field(default_factory=dict)
    risk_group: str = ""
    warnings: list[str] = field(default_factory=list)
    attention_in_roi: dict[str, float] = field(default_factory=dict)
    report: str = ""
    member_probs: dict[str, list[float]] = field(default_factory=dict)  # P(SLM) per ensemble member
    allow_out_of_range: bool = False


def model_config(bundle: ModelBundle, cfg: dict) -> dict:
    """The site's own settings (device) with the model's (backbone, norm, batch size ...), as the
    ClientApp combines them for the study's evaluation."""
    # bundles written before ensembles / ROI statistics existed hold one network without them
    out = dict(cfg, **{"ensemble-size": 1, "roi-stats": False})
    out.update({k: bundle.meta["settings"][k] for k in SENT_MODEL_KEYS if k in bundle.meta["settings"]})
    if "seed" in bundle.meta["settings"]:
        out["seed"] = bundle.meta["settings"]["seed"]
    return out


def predict_probabilities(bundle: ModelBundle, data: cache_mod.SiteData, cfg: dict) -> dict[str, np.ndarray]:
    """{model: P(SLM) per patient in data.keys order}, through the study's own prediction code."""
    from client import study
    from client.disclosure import Refused

    site = study.Site(model_config(bundle, cfg), data, Path(tempfile.gettempdir()))
    mean = np.asarray(bundle.meta["standardisation"]["mean"], dtype=np.float64)
    std = np.asarray(bundle.meta["standardisation"]["std"], dtype=np.float64)
    out = {}
    for m in bundle.models:
        payload = {"beta": np.asarray(bundle.meta["models"]["cf"]["beta"], float)} if m == "cf" else {"state": bundle.states[m]}
        try:
            out[m] = study.predict(site, m, data, payload, mean, std)
        except Refused as exc:  # the weights do not fit the model the settings describe
            raise PredictError(f"{bundle.path}: {exc.detail}") from None
    return out


NOT_ASSIGNED = "not assigned: inputs outside the development range"


def risk_group(p: float, threshold: float | None, out_of_range: bool = False, allow_out_of_range: bool = False) -> str:
    """The risk group at the development threshold. A patient whose inputs lie outside what the model
    was developed on gets none unless the user asks for it (`--allow-out-of-range`): a CEA entered in
    the wrong unit would otherwise come out as a confident 'high risk'."""
    if threshold is None:
        return "no development threshold"
    if out_of_range and not allow_out_of_range:
        return NOT_ASSIGNED
    return "high risk" if p >= threshold else "low risk"


def member_probabilities(bundle: ModelBundle, data: cache_mod.SiteData, cfg: dict) -> dict[str, np.ndarray]:
    """{dl/combined: N x members P(SLM) of each network of the model's ensemble}: how much the study's
    independently trained networks disagree on a patient (the report's interval). Empty for a model of
    one network."""
    from torch import nn

    from client import study
    from client.train import predict_proba
    from common.model import EnsembleNet

    site = study.Site(model_config(bundle, cfg), data, Path(tempfile.gettempdir()))
    mean = np.asarray(bundle.meta["standardisation"]["mean"], dtype=np.float64)
    std = np.asarray(bundle.meta["standardisation"]["std"], dtype=np.float64)

    class Member(nn.Module):
        def __init__(self, net, i):
            super().__init__()
            self.net, self.i = net, i

        def forward(self, image, clinical=None):
            return self.net.members[self.i](image, clinical)

    out = {}
    for m in ("dl", "combined"):
        if m not in bundle.states:
            continue
        net = study._model(site, m, bundle.states[m])
        if isinstance(net, EnsembleNet):
            out[m] = np.stack([predict_proba(Member(net, i), data, mean, std, site.cfg)
                               for i in range(len(net.members))], axis=1)
    return out


def read_id_map(cache_dir: Path) -> dict[str, str]:
    with open(cache_mod.id_map_path(cache_dir), newline="", encoding="utf-8") as fh:
        return {r["patient_key"]: r["patient_id"] for r in csv.DictReader(fh)}


def run_predict(model: "str | Path | ModelBundle", input_dir: str | Path, out_dir: str | Path, patients: list[str] | None = None,
                cfg: dict | None = None, attention: bool = True, progress: bool = False,
                allow_out_of_range: bool = False) -> list[PatientResult]:
    """The whole `slmfed predict`; returns one result per patient (predicted or not, with the reason)."""
    from client.clinical_table import read_clinical_table
    from client.prepare import PrepareError, prepare_site
    from common.config import load_config

    input_dir, out_dir = Path(input_dir), Path(out_dir)
    bundle = model if isinstance(model, ModelBundle) else load_bundle(model)
    if cfg is None:
        toml = input_dir / "site.toml"
        cfg = load_config(toml_path=toml if toml.is_file() else None)
    check_match(bundle, site_description(cfg), "this site's preprocessing settings")  # before any image is read
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f"{PREPARED}-input"
    site = site_view(input_dir, patients, work)
    cache_dir = out_dir / PREPARED
    try:
        report = prepare_site(site, cache_dir, cfg, progress=progress)
    except PrepareError as exc:
        raise PredictError(str(exc)) from None
    manifest = cache_mod.read_manifest(cache_dir)
    check_match(bundle, describe(manifest), f"the prepared inputs in {cache_dir}")
    ids = read_id_map(cache_dir)
    table = read_clinical_table(site / "clinical.csv", cfg["cea-unit"], cfg["ca199-unit"])
    results: dict[str, PatientResult] = {}
    wanted = set(patients) if patients else None  # --patient: the others' DICOM is scanned, not reported
    for key, entry in manifest["patients"].items():
        pid = ids.get(key, key)
        if entry["status"] != "included" and (wanted is None or pid in wanted):
            results[pid] = PatientResult(pid, "not predicted", reason=entry.get("reason", ""))
    if report.included:
        data = cache_mod.load_cache(cache_dir)
        probs = predict_probabilities(bundle, data, cfg)
        members = member_probabilities(bundle, data, cfg)
        t = bundle.meta["thresholds"].get("combined")
        rois = _rois(cache_dir, data.keys)
        cams = attention_maps(bundle, data, cfg) if attention else {}
        from client.predict_report import write_patient_report

        for i, key in enumerate(data.keys):
            pid = ids.get(key, key)
            row = table.rows[pid]
            res = PatientResult(pid, "predicted", probs={m: float(p[i]) for m, p in probs.items()},
                                warnings=range_warnings(bundle, row), allow_out_of_range=allow_out_of_range,
                                member_probs={m: [float(v) for v in p[i]] for m, p in members.items()})
            if "combined" in probs:
                res.risk_group = risk_group(res.probs["combined"], t, bool(res.warnings), allow_out_of_range)
            for m, maps in cams.items():
                if rois[i] is not None:
                    res.attention_in_roi[m] = attention_mass_in_roi(maps[i], rois[i], _pixel_mm(bundle))
            res.report = str(write_patient_report(out_dir, bundle, res, row, manifest["patients"][key],
                                                  data.images[i], rois[i], {m: c[i] for m, c in cams.items()},
                                                  manifest["channels"]))
            results[pid] = res
    if patients:
        missing = [p for p in patients if p not in results]
        for p in missing:
            results[p] = PatientResult(p, "not predicted", reason="no DICOM images or row found for this patient")
    ordered = [results[p] for p in sorted(results)]
    write_worklist(out_dir / "worklist.csv", bundle, ordered)
    return ordered


def _rois(cache_dir: Path, keys: list[str]) -> list[np.ndarray | None]:
    out = []
    for key in keys:
        with np.load(cache_dir / cache_mod.PATIENTS_DIR / f"{key}.npz", allow_pickle=False) as z:
            out.append(np.array(z["roi"]) if "roi" in z.files else None)
    return out


def _pixel_mm(bundle: ModelBundle) -> float:
    pre = bundle.meta["preprocessing"]
    return float(pre["fov-mm"]) / float(pre["crop-size"]) if "fov-mm" in pre and "crop-size" in pre else 1.0


# ---- attention -------------------------------------------------------------------------------------
def gradcam_layer(net) -> str:
    """The layer Grad-CAM reads: the backbone's second-to-last residual stage ("backbone.layer3" in
    MONAI's ResNet), found by name so that changes inside the blocks do not matter. The last stage
    is 2 x 2 for the default 64-pixel crop, too coarse to say where: on the synthetic paper cohort's
    external centre (`slmfed bench attention`) its maps held no more of their mass near the ROI than a
    uniform map would (median 0.37-0.39 vs 0.37), the stage before it (4 x 4) 0.54-0.56."""
    names = [n for n, _ in net.named_modules()]
    stages = sorted((n for n in names if n.startswith("backbone.layer") and n[len("backbone.layer"):].isdigit()),
                    key=lambda n: int(n[len("backbone.layer"):]))
    if not stages:
        raise PredictError("the model's backbone has no residual stages named backbone.layerN: no attention map")
    return "net." + stages[-2 if len(stages) > 1 else -1]


def gradcam_layers(net) -> list[str]:
    """gradcam_layer of each network in `net`: one per ensemble member (common/model.py EnsembleNet)."""
    from common.model import EnsembleNet

    if isinstance(net, EnsembleNet):
        return [f"net.members.{i}." + gradcam_layer(member)[len("net."):] for i, member in enumerate(net.members)]
    return [gradcam_layer(net)]


def attention_maps(bundle: ModelBundle, data: cache_mod.SiteData, cfg: dict) -> dict[str, np.ndarray]:
    """{dl/combined: Grad-CAM per patient for the class the model predicts (SLM when its logit is
    >= 0, else no SLM), upsampled to the crop (N x spatial), non-negative, not normalised}, with
    MONAI's GradCAM on `gradcam_layer`. An all-zero map: no region raised that class's score there."""
    import torch
    from monai.visualize import GradCAM
    from torch import nn

    from client import study
    from client.train import select_device
    from common.clinical import standardise

    mcfg = model_config(bundle, cfg)
    site = study.Site(mcfg, data, Path(tempfile.gettempdir()))
    device = select_device(mcfg)
    mean = np.asarray(bundle.meta["standardisation"]["mean"], dtype=np.float64)
    std = np.asarray(bundle.meta["standardisation"]["std"], dtype=np.float64)
    clinical = torch.from_numpy(standardise(data.clinical, mean, std)).to(device)
    out = {}
    for m in ("dl", "combined"):
        if m not in bundle.states:
            continue
        net = study._model(site, m, bundle.states[m]).to(device).eval()

        class Wrapped(nn.Module):
            """GradCAM scores a class of an N x classes output: (no SLM, SLM) = (-logit, logit)."""

            def __init__(self, inner):
                super().__init__()
                self.net = inner

            def forward(self, x, z):
                logit = self.net(x, z).unsqueeze(1)
                return torch.cat([-logit, logit], dim=1)

        # an ensemble's map is the sum of its members' maps for the ensemble's score (the mean logit):
        # each member's Grad-CAM weighted by its share of that score
        cams = [GradCAM(Wrapped(net), target_layers=layer, postprocessing=lambda x: x) for layer in gradcam_layers(net)]
        maps = []
        for i in range(len(data)):
            x = torch.from_numpy(np.ascontiguousarray(data.images[i:i + 1])).to(device)
            total = 0.0
            for cam in cams:
                with torch.enable_grad():
                    a = cam(x, z=clinical[i:i + 1])  # the predicted class
                total = total + np.nan_to_num(a.detach().float().cpu().numpy()[0, 0]).clip(min=0)
            maps.append(total)
        out[m] = np.stack(maps)
    return out


def attention_mass_in_roi(cam: np.ndarray, roi: np.ndarray, pixel_mm: float, margin_mm: float = DILATE_MM) -> float:
    """Fraction of the attention map's mass inside the ROI grown by `margin_mm` (NaN for a zero map)."""
    from scipy.ndimage import binary_dilation

    roi = np.asarray(roi).reshape(cam.shape) > 0
    it = max(int(round(margin_mm / pixel_mm)), 0)
    grown = binary_dilation(roi, iterations=it) if it else roi
    total = float(cam.sum())
    return float(cam[grown].sum() / total) if total > 0 else float("nan")


# ---- the worklist ----------------------------------------------------------------------------------
def write_worklist(path: Path, bundle: ModelBundle, results: list[PatientResult]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    t = bundle.meta["thresholds"]
    w.writerow(["patient_id", "status", "reason", "p_cf", "p_dl", "p_combined", "combined_threshold", "risk_group",
                "attention_in_roi_dl", "attention_in_roi_combined", "warnings", "report", "model_id"])
    fmt = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))  # noqa: E731
    for r in results:
        w.writerow([r.patient_id, r.status, r.reason, fmt(r.probs.get("cf")), fmt(r.probs.get("dl")),
                    fmt(r.probs.get("combined")), fmt(t.get("combined")), r.risk_group,
                    fmt(r.attention_in_roi.get("dl")), fmt(r.attention_in_roi.get("combined")),
                    " | ".join(r.warnings), os.path.relpath(r.report, path.parent) if r.report else "", bundle.model_id])
    cache_mod.atomic_write_text(path, buf.getvalue())
