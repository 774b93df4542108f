"""`slmfed prepare`: turn a site folder (DICOM + masks + clinical.csv) into the checked site cache.

Steps: scan headers (only new or changed files on a re-run) -> group series per patient -> match
T2WI / DWI / ADC -> read and check the volumes -> mask on the T2 grid -> DWI and ADC resampled onto
it -> MONAI crop/normalise chain -> one cache file per patient + manifest.json + qc.csv.
A patient whose inputs (files, mask, clinical row, parameters) are unchanged since the last run
keeps its cache file, provided that file still matches its recorded hash.

Privacy: inside the cache patients exist only as salted keys. Everything that holds raw IDs or
paths (the id map, the scan index, the list of skipped files) lives beside the cache, in
`<cache>-id-map.csv` and `<cache>-local/`, for the site's own use.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client import cache as cache_mod
from client import radiomics
from client.clinical_table import ClinicalRow, ClinicalTableError, read_clinical_table
from client.dicom_scan import _FIELDS as _RECORD_FIELDS
from client.dicom_scan import FileRecord, dicomdir_summary, input_form, is_mask_object, list_files, scan_files
from client.series import RulesError, Selection, SelectionError, Series, SeriesRules, group_series, select_sequences
from client.transforms import build_input_transform, channel_names, image_shape
from common.clinical import ENCODING_VERSION, FEATURE_NAMES
from common.config import load_config

log = logging.getLogger(__name__)

PIPELINE_VERSION = "slmfed-prepare-1"
PREVIEWS = 4
MAX_LISTED = 50  # excluded patients listed by id in the summary
SCAN_CHUNK_MIN = 32  # files per scan task, at least


class PrepareError(RuntimeError):
    """The site folder as a whole cannot be prepared (one clear sentence for the user)."""


class Excluded(Exception):
    """One patient cannot be used; str() is the QC reason ("stage: detail")."""

    def __init__(self, stage: str, detail: str):
        super().__init__(f"{stage}: {detail}")
        self.stage = stage


@dataclass
class PrepareReport:
    """What a run did, for the summary and for callers (tests, benchmarks, the simulation runner)."""

    site_dir: str
    cache_dir: str
    patients: int = 0
    included: int = 0
    excluded: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    sequences: dict[str, dict[str, int]] = field(default_factory=dict)
    spacing: dict[str, list[float]] = field(default_factory=dict)
    dicom_files: int = 0
    mask_objects: int = 0  # DICOM SEG / RTSTRUCT objects found
    dicomdir: list[str] = field(default_factory=list)  # what each DICOMDIR lists vs what was found
    input_forms: dict[str, int] = field(default_factory=dict)  # "t2=enhanced ... mask=seg" -> included patients
    skipped_files: dict[str, int] = field(default_factory=dict)
    parsed_files: int = 0
    redone: int = 0
    reused: int = 0
    warnings: list[str] = field(default_factory=list)
    previews: list[str] = field(default_factory=list)
    # Site-only: (patient_id, reason) of each excluded patient and hints about ids or mask files that
    # match nothing. Printed on the site's own console by summary(); never written into the cache.
    excluded_ids: list[tuple[str, str]] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    id_map: str = ""
    elapsed_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (scan, plan, build, write)

    def summary(self) -> str:
        lines = [f"prepared {self.site_dir} -> {self.cache_dir}"]
        lines.append(f"  patients found: {self.patients}; included: {self.included}; excluded: {self.excluded}")
        for reason, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"    excluded ({reason}): {n}")
        if self.excluded_ids:
            lines.append("  excluded patients (by your patient_id; shown on this console only):")
            for pid, reason in self.excluded_ids[:MAX_LISTED]:
                lines.append(f"    {pid}: {reason}")
            if len(self.excluded_ids) > MAX_LISTED:
                lines.append(f"    ... and {len(self.excluded_ids) - MAX_LISTED} more (all in the id map + qc.csv)")
        for h in self.hints:
            lines.append(f"  hint: {h}")
        skipped = sum(self.skipped_files.values())
        lines.append(f"  DICOM images: {self.dicom_files}; DICOM SEG/RTSTRUCT objects: {self.mask_objects}; files skipped: {skipped}"
                     + (" (" + ", ".join(f"{r}: {n}" for r, n in self.skipped_files.items()) + ")" if skipped else ""))
        for d in self.dicomdir:
            lines.append(f"  {d}")
        if self.input_forms:
            lines.append("  input forms: " + "; ".join(f"{k} x{n}" for k, n in sorted(self.input_forms.items(), key=lambda kv: -kv[1])))
        for seq, names in self.sequences.items():
            lines.append(f"  {seq}: " + "; ".join(f"{name} x{n}" for name, n in sorted(names.items(), key=lambda kv: -kv[1])))
        for what, (lo, hi) in self.spacing.items():
            lines.append(f"  {what}: {lo:.2f} - {hi:.2f} mm")
        lines.append(f"  rebuilt: {self.redone}; unchanged: {self.reused}; header reads: {self.parsed_files}; "
                     f"elapsed: {self.elapsed_s:.1f} s")
        for w in self.warnings[:10]:
            lines.append(f"  warning: {w}")
        if self.previews:
            lines.append(f"  previews: {', '.join(self.previews)}")
        lines.append(f"  per-patient QC: {Path(self.cache_dir) / cache_mod.QC_CSV} (patients by salted key)")
        if self.id_map:
            lines.append(f"  id map (salted key -> your patient_id): {self.id_map}; it stays beside the cache, "
                         "never inside it: the cache holds keys only, so it can be inspected without ids")
        return "\n".join(lines)


def _id_hints(dicom_ids: set[str], table_ids: set[str], masks_dir: Path) -> list[str]:
    """Ids that differ only in leading zeros, and mask files named after no patient: the usual
    reasons a patient that is there is reported as missing."""
    from client.volumes import MASK_SUFFIXES

    hints = []
    only_dicom, only_table = dicom_ids - table_ids, table_ids - dicom_ids
    by_stripped: dict[str, list[str]] = {}
    for pid in only_table:
        by_stripped.setdefault(pid.lstrip("0"), []).append(pid)
    for pid in sorted(only_dicom):
        for other in sorted(by_stripped.get(pid.lstrip("0"), [])):
            hints.append(f"DICOM PatientID {pid!r} and clinical.csv patient_id {other!r} differ only in leading "
                         "zeros: write the id exactly as the DICOM PatientID (keep the column as text in the "
                         "spreadsheet) so they match")
    if masks_dir.is_dir():
        stray = []
        for p in sorted(masks_dir.iterdir()):
            suffix = next((x for x in MASK_SUFFIXES if p.name.endswith(x)), None)
            if suffix and p.is_file() and p.name[: -len(suffix)] not in dicom_ids | table_ids:
                stray.append(p.name)
        if stray:
            hints.append(f"mask file(s) in {masks_dir} named after no patient (expected <patient_id>.nii.gz etc.): "
                         + ", ".join(stray[:MAX_LISTED]) + (f" ... and {len(stray) - MAX_LISTED} more" if len(stray) > MAX_LISTED else ""))
    return hints


def local_dir(cache_dir: str | Path) -> Path:
    """Site-private folder beside the cache (scan index, skipped files): holds raw paths and IDs."""
    cache_dir = Path(cache_dir).resolve()
    return cache_dir.parent / f"{cache_dir.name}-local"


def preprocessing_params(cfg: dict) -> dict:
    return {
        "pipeline_version": PIPELINE_VERSION,
        "input-mode": cfg["input-mode"],
        "fov-mm": cfg["fov-mm"],
        "crop-size": cfg["crop-size"],
        "crop-depth": cfg["crop-depth"],
        "context-slices": cfg["context-slices"],
        "mask-channel": bool(cfg["mask-channel"]),
        "cea-unit": cfg["cea-unit"],
        "ca199-unit": cfg["ca199-unit"],
        "series-rules": cfg["series-rules"],
        "roi-names": cfg.get("roi-names", ""),
        "rigid-refine": bool(cfg.get("rigid-refine", False)),
        "orientation": "LPS (sitk.DICOMOrient of the T2WI)",
        "t2-dwi-normalisation": "1st-99th percentile of the crop -> [0, 1]",
        "adc-normalisation": "ADC [mm^2/s] / 3e-3, clipped to [0, 1.5]",
        "registration": "scanner coordinates (linear resampling onto the T2 grid)"
        + ("; rigid refinement (Mattes MI, Euler 3D, ROI neighbourhood)" if cfg.get("rigid-refine") else ""),
        "radiomics": radiomics.VERSION,  # in the source hash: a new feature version rebuilds every patient
    }


# ----------------------------------------------------------------------------------------------
# one patient (runs in a worker process)
# ----------------------------------------------------------------------------------------------

def build_patient_image(series: list[Series], mask_path: Path | None, rules: SeriesRules, cfg: dict,
                        dicom_masks: list[FileRecord] | None = None) -> tuple[np.ndarray, dict]:
    """The model input of one patient and what it was built from; raises Excluded with the reason.
    The ROI comes from a DICOM SEG / RTSTRUCT that references the chosen T2 series (matched by UID;
    SEG first), else from the mask file masks/<patient_id>.*."""
    import SimpleITK as sitk

    from client import masks as masks_mod
    from client import volumes as vol

    dicom_masks = list(dicom_masks or [])
    referenced = {u for m in dicom_masks for u in m.ref_series}

    def mask_match(s: Series) -> bool:
        if referenced:
            return s.series_uid in referenced
        f = s.first
        ps = f.pixel_spacing or (1.0, 1.0)
        return vol.mask_header_matches(mask_path, (f.cols, f.rows, s.n_positions()), (ps[1], ps[0]))

    try:
        sel: Selection = select_sequences(series, rules, mask_match if (mask_path or referenced) else None)
    except SelectionError as exc:
        raise Excluded("sequences", str(exc)) from None
    hits, why_not = masks_mod.dicom_candidates(dicom_masks, sel.t2.series_uid, {s.series_uid for s in series})
    if hits:
        src = masks_mod.MaskSource(input_form(hits[0]), Path(hits[0].path))
        if len(hits) > 1:
            src.notes.append(f"mask: {len(hits)} DICOM mask objects reference the T2, used a "
                             f"{src.form.upper()} (SEG before RTSTRUCT, then by SOP instance UID)")
        if mask_path is not None:
            src.notes.append(f"mask: DICOM {src.form.upper()} used; the mask file beside it was ignored")
    elif mask_path is not None:
        src = masks_mod.MaskSource("nifti", mask_path)
        if why_not:
            src.notes.append(f"mask: mask file used; {why_not}")
    elif why_not:
        raise Excluded("mask", why_not)
    else:
        raise Excluded("mask", "missing (expected masks/<patient_id>.nii.gz, .nii, .nrrd or .mha, or a DICOM SEG / "
                               "RTSTRUCT referencing the T2WI series)")
    notes = list(sel.notes) + src.notes
    try:
        t2, n = vol.read_volume(sel.t2.files, sel.t2.label)
        notes += n
    except vol.VolumeError as exc:
        raise Excluded("T2WI", str(exc)) from None
    try:
        mask, n = masks_mod.read_roi(src, t2, masks_mod.roi_names(cfg))
        notes += n
    except vol.VolumeError as exc:
        raise Excluded("mask", str(exc)) from None
    mode = cfg["input-mode"]
    margin = cfg["crop-depth"] // 2 + 1 if mode == "3d" else cfg["context-slices"] if mode == "2.5d" else 0
    t2, mask = vol.crop_to_roi(t2, mask, cfg["fov-mm"], margin)
    t2 = sitk.DICOMOrient(t2, "LPS")
    mask = sitk.DICOMOrient(mask, "LPS")
    roi = sitk.GetArrayFromImage(mask)
    dwi_label = f"{sel.dwi.label} b={sel.dwi_b:g}"
    try:
        dwi_native, n = vol.read_diffusion(sel.dwi_files, dwi_label, sel.dwi_b)
        notes += n
    except vol.VolumeError as exc:
        raise Excluded("DWI", str(exc)) from None
    tx = None
    if cfg.get("rigid-refine", False):  # off: scanner coordinates only
        tx, note = vol.rigid_refine(t2, dwi_native, mask)
        notes.append(note)
    dwi = sitk.GetArrayFromImage(vol.resample_like(dwi_native, t2, transform=tx))
    problem = vol.coverage_problem(dwi_native, dwi, t2, roi, dwi_label)
    if problem:
        raise Excluded("DWI", problem)
    try:
        if sel.adc is not None:
            adc_native, n = vol.read_volume(sel.adc_files, sel.adc.label)
            notes += n
            adc_raw = sitk.GetArrayFromImage(vol.resample_like(adc_native, t2, transform=tx))
            adc, scale = vol.adc_to_mm2_s(adc_raw, roi, rules.adc_scale)
            adc_source = f"scanner {sel.adc.description} (x{scale:g} -> mm^2/s)"
        else:
            low, n = vol.read_diffusion(sel.low_files, f"{sel.dwi.label} b={sel.low_b:g}", sel.low_b)
            notes += n
            if low.GetSize() != dwi_native.GetSize():
                raise vol.VolumeError(f"b={sel.low_b:g} and b={sel.dwi_b:g} images are not on the same slices")
            adc_map = vol.compute_adc(low, dwi_native, sel.low_b, sel.dwi_b)
            adc = sitk.GetArrayFromImage(vol.resample_like(adc_map, t2, transform=tx))
            adc_source = f"computed from b={sel.low_b:g} and b={sel.dwi_b:g}"
    except vol.VolumeError as exc:
        raise Excluded("ADC", str(exc)) from None
    sp = t2.GetSpacing()
    data = {"t2": sitk.GetArrayFromImage(t2), "dwi": dwi, "adc": adc, "mask": roi, "spacing": sp}
    try:  # the handcrafted baseline's features; a failure leaves the patient in, without them, and says so
        features = radiomics.compute_features(data["t2"], dwi, adc, roi, sp)
    except radiomics.RadiomicsError as exc:
        features = None
        notes.append(f"radiomics: {exc}")
    except Exception as exc:  # a bug in the baseline's features must not cost the model a patient: say it
        features = None
        log.error("radiomics: unexpected %s: %s", type(exc).__name__, exc)
        notes.append(f"radiomics: internal error: {type(exc).__name__}")
    out = build_input_transform(cfg["input-mode"], cfg["fov-mm"], cfg["crop-size"], cfg["crop-depth"],
                                cfg["context-slices"], cfg["mask-channel"])(data)
    image = np.asarray(out["image"], dtype=np.float32)
    if not np.isfinite(image).all():
        raise Excluded("image", "the model input contains non-finite values")
    dsp = dwi_native.GetSpacing()
    info = {
        "sequences": {"t2": sel.t2.description, "dwi": f"{sel.dwi.description} b={sel.dwi_b:g}", "adc": adc_source},
        "input_forms": {"t2": input_form(sel.t2.first), "dwi": input_form(sel.dwi_files[0]),
                        "adc": input_form((sel.adc_files or sel.low_files or sel.dwi_files)[0]), "mask": src.form},
        "t2_spacing": [round(float(x), 4) for x in sp],
        "dwi_spacing": [round(float(x), 4) for x in dsp],
        "roi_area_mm2": round(out["roi_area_mm2"], 1),
        "notes": notes,
        "roi_crop": (np.asarray(out["mask"]) > 0).astype(np.uint8),  # kept in the patient file, not the manifest
        "radiomics": features,  # likewise
    }
    return image, info


def _process(job: dict) -> dict:
    """Worker entry point: build, write and describe one patient; never raises for patient problems."""
    key, row = job["key"], job["row"]
    base = {"source_hash": job["source_hash"], "label": row.slm if row else -1, "warnings": row.warnings if row else []}
    try:
        image, info = build_patient_image(job["series"], job["mask"], SeriesRules(job["cfg"]["series-rules"]), job["cfg"],
                                          job.get("dicom_masks"))
    except Excluded as exc:
        return {**base, "status": "excluded", "reason": str(exc)}
    except Exception as exc:  # a bug or an unforeseen input: exclude this patient, keep the others, say what
        import traceback

        # the traceback may hold paths (and so IDs): it goes to the site-local errors.log only
        log.error("patient %s: unexpected %s; traceback in %s", key, type(exc).__name__, local_dir(job["cache_dir"]))
        return {**base, "status": "excluded", "_traceback": traceback.format_exc(),
                "reason": f"internal error: {type(exc).__name__} (traceback in the site-local errors.log)"}
    roi = info.pop("roi_crop", None)
    features = info.pop("radiomics", None)
    sha = cache_mod.write_patient(job["cache_dir"], key, image, row.encode(), row.slm, roi=roi, radiomics=features)
    return {**base, "status": "included", "reason": "", "sha256": sha, **info}


def _serial(jobs: list[dict]):
    """In-process jobs, one SimpleITK thread each (as in _worker_init), the caller's setting restored."""
    import SimpleITK as sitk

    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        for job in jobs:
            yield _process(job)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _worker_init() -> None:
    """One thread per worker: the images are small, and thread start-up would cost more than it saves."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # torch is optional for prepare itself
        pass


# ----------------------------------------------------------------------------------------------
# the site
# ----------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _scan(dicom_dir: Path, local: Path, pool, masks_dir: Path | None = None) -> tuple[list[FileRecord], list[tuple[str, str]], int]:
    """Header records of every image file (and DICOM SEG / RTSTRUCT under dicom/ or masks/), re-reading
    only files new or changed since the index."""
    index_path = local / "scan-index.json"
    old = _read_json(index_path) or {}
    if old.get("version") != PIPELINE_VERSION or old.get("fields") != list(_RECORD_FIELDS):
        old = {}
    old_files = old.get("files", {})
    records: list[FileRecord] = []
    skipped: list[tuple[str, str]] = []
    todo: list[str] = []
    new_index: dict[str, Any] = {}
    from client.volumes import MASK_SUFFIXES

    listing = list_files(dicom_dir)
    if masks_dir is not None and masks_dir.is_dir():  # DICOM mask objects may sit beside the mask files
        listing += [f for f in list_files(masks_dir) if not f[0].lower().endswith(MASK_SUFFIXES)]
    for path, size, mtime in listing:
        prev = old_files.get(path)
        if prev and prev["size"] == size and prev["mtime_ns"] == mtime:
            new_index[path] = prev
            if prev.get("records"):
                records.extend(FileRecord.from_json(r) for r in prev["records"])
            else:
                skipped.append((path, prev["skip"]))
        else:
            todo.append(path)
    n_chunks = max(1, min(-(-len(todo) // SCAN_CHUNK_MIN), 4 * (pool._max_workers if pool else 1)))
    chunks = [todo[i::n_chunks] for i in range(n_chunks)]  # strided: balanced work per chunk
    results = pool.map(scan_files, chunks) if (pool and len(chunks) > 1) else map(scan_files, chunks)
    for chunk in results:
        for path, rec, reason in chunk:
            try:
                st = os.stat(path)
            except OSError:  # vanished since it was listed: not part of this run
                continue
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            if rec is not None:  # one record per image: several for a multi-frame file
                entry["records"] = [r.to_json() for r in rec]
                records.extend(rec)
            else:
                entry["skip"] = reason
                skipped.append((path, reason))
            new_index[path] = entry
    if todo or set(old_files) != set(new_index):
        index = {"version": PIPELINE_VERSION, "fields": list(_RECORD_FIELDS), "files": new_index}
        cache_mod.atomic_write_bytes(index_path, json.dumps(index, separators=(",", ":")).encode("utf-8"))
    return records, skipped, len(todo)


def _source_hash(salt: str, params: dict, series: list[Series], mask: Path | None, row: ClinicalRow | None,
                 dicom_masks: list[FileRecord] = ()) -> str:
    h = hashlib.sha256(f"{salt}|{json.dumps(params, sort_keys=True, default=str)}".encode())
    for m in dicom_masks:
        h.update(f"dicom-mask|{m.path}|{m.size}|{m.mtime_ns}\n".encode())
    for s in series:
        for f in s.files:
            h.update(f"{f.path}|{f.size}|{f.mtime_ns}\n".encode())
    if mask is not None:
        st = mask.stat()
        h.update(f"mask|{mask}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(f"row|{row.fingerprint() if row else None}".encode())
    return h.hexdigest()


def _still_valid(cache_dir: Path, key: str, entry: dict | None, source_hash: str) -> bool:
    if not entry or entry.get("source_hash") != source_hash:
        return False
    if entry.get("status") != "included":
        return entry.get("status") == "excluded"
    try:
        data = (cache_dir / cache_mod.PATIENTS_DIR / f"{key}.npz").read_bytes()
    except OSError:
        return False
    return cache_mod.sha256_bytes(data) == entry.get("sha256")


def _write_qc(cache_dir: Path, patients: dict[str, dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["patient_key", "status", "reason", "label", "t2", "dwi", "adc", "t2_spacing_mm", "roi_area_mm2", "notes",
                "input_forms"])
    for key, e in sorted(patients.items()):
        seq = e.get("sequences", {})
        w.writerow([key, e["status"], e.get("reason", ""), e.get("label", -1), seq.get("t2", ""), seq.get("dwi", ""),
                    seq.get("adc", ""), "x".join(f"{v:g}" for v in e.get("t2_spacing", [])),
                    e.get("roi_area_mm2", ""), " | ".join(e.get("notes", []) + e.get("warnings", [])),
                    " ".join(f"{k}={v}" for k, v in e.get("input_forms", {}).items())])
    cache_mod.atomic_write_text(cache_dir / cache_mod.QC_CSV, buf.getvalue())


def _write_previews(cache_dir: Path, keys: list[str], channels: list[str], force: set[str]) -> list[str]:
    """A PNG per patient with each channel's crop side by side, in the manifest's channel order
    (3d: the centre slice), 3x enlarged, with a tick mark at the ROI centre, for a radiologist to eyeball."""
    import SimpleITK as sitk

    out_dir = cache_dir / "previews"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys:
        p = out_dir / f"{key}.png"
        written.append(str(p))
        if key not in force and p.is_file():
            continue
        with np.load(cache_dir / cache_mod.PATIENTS_DIR / f"{key}.npz") as npz:
            img = npz["image"]
        if img.ndim == 4:
            img = img[:, img.shape[1] // 2]
        tiles = []
        for ch, name in zip(img, channels):
            t = np.clip(ch / (1.5 if name.startswith("adc") else 1.0), 0, 1)
            t = np.kron(t, np.ones((3, 3)))
            c = t.shape[0] // 2
            t[c, :6] = t[c, -6:] = t[:6, c] = t[-6:, c] = 1.0  # ROI centre ticks on the borders
            tiles += [t, np.zeros((t.shape[0], 4))]
        tile = (np.hstack(tiles[:-1]) * 255).astype(np.uint8)
        tmp = out_dir / f".{key}.tmp.png"
        sitk.WriteImage(sitk.GetImageFromArray(tile), str(tmp))
        os.replace(tmp, p)
    for p in out_dir.glob("*.png"):  # previews of patients no longer shown or no longer included
        if str(p) not in written:
            p.unlink()
    return written


def prepare_site(site_dir: str | Path, cache_dir: str | Path, cfg: dict | None = None, progress: bool = True) -> PrepareReport:
    """Prepare (or bring up to date) the cache of one site, holding the cache's lock (client/cache_lock.py):
    a second concurrent run on the same cache raises PrepareError saying who holds it."""
    from client.cache_lock import CacheLocked, cache_lock

    cache_dir, first = Path(cache_dir), not Path(cache_dir).exists()
    local_first = not local_dir(cache_dir).exists()
    try:
        with cache_lock(cache_dir):
            return _prepare_site(site_dir, cache_dir, cfg, progress)
    except CacheLocked as exc:
        raise PrepareError(str(exc)) from None
    except BaseException:
        # A first run that stops before writing a manifest leaves no empty cache behind.
        if first and not (cache_dir / cache_mod.MANIFEST).exists():
            shutil.rmtree(cache_dir, ignore_errors=True)
            if local_first:
                shutil.rmtree(local_dir(cache_dir), ignore_errors=True)
        raise


def _prepare_site(site_dir: str | Path, cache_dir: str | Path, cfg: dict | None = None, progress: bool = True) -> PrepareReport:
    """Prepare (or bring up to date) the cache of one site; raises PrepareError when nothing can be done."""
    t0 = time.perf_counter()
    site_dir, cache_dir = Path(site_dir), Path(cache_dir)
    if cfg is None:
        toml = site_dir / "site.toml"
        cfg = load_config(toml_path=toml if toml.is_file() else None)
    if not site_dir.is_dir():
        raise PrepareError(f"site folder {site_dir} does not exist")
    dicom_dir = site_dir / "dicom"
    if not dicom_dir.is_dir():
        raise PrepareError(f"{site_dir} has no dicom/ folder: is this a site folder (dicom/, masks/, clinical.csv)?")
    try:
        table = read_clinical_table(site_dir / "clinical.csv", cfg["cea-unit"], cfg["ca199-unit"])
    except ClinicalTableError as exc:
        raise PrepareError(str(exc)) from None
    try:
        SeriesRules(cfg["series-rules"])
    except RulesError as exc:
        raise PrepareError(str(exc)) from None
    params = preprocessing_params(cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    local = local_dir(cache_dir)
    local.mkdir(parents=True, exist_ok=True)
    old = _read_json(cache_dir / cache_mod.MANIFEST) or {}
    if old.get("format_version") != cache_mod.CACHE_FORMAT_VERSION:
        old = {}
    salt = old.get("salt") or secrets.token_hex(16)
    old_patients = old.get("patients", {})
    report = PrepareReport(str(site_dir), str(cache_dir))

    workers = max(1, int(cfg.get("workers", 1)))
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) if workers > 1 else None
    try:
        t_scan = time.perf_counter()
        records, skipped, report.parsed_files = _scan(dicom_dir, local, pool, site_dir / "masks")
        report.timings["scan"] = time.perf_counter() - t_scan
        no_pid = [r for r in records if not r.patient_id]
        skipped += [(r.path, "DICOM image without PatientID") for r in no_pid]
        records = [r for r in records if r.patient_id]
        dicom_masks: dict[str, list[FileRecord]] = {}
        for r in records:
            if is_mask_object(r):
                dicom_masks.setdefault(r.patient_id, []).append(r)
        records = [r for r in records if not is_mask_object(r)]
        report.mask_objects = sum(len(v) for v in dicom_masks.values())
        report.dicom_files = len(records)
        report.skipped_files = dict(Counter(reason for _, reason in skipped))
        for path, reason in skipped:
            if reason.startswith("DICOMDIR"):
                line, complete = dicomdir_summary(path, dicom_dir)
                report.dicomdir.append(line)
                if not complete:
                    report.warnings.append(line)
        by_patient = group_series(records)
        ids = sorted(set(by_patient) | set(table.rows))
        report.patients = len(ids)
        masks_dir = site_dir / "masks"
        from client.volumes import find_mask

        entries: dict[str, dict] = {}
        jobs: list[dict] = []
        id_rows = []
        for pid in ids:
            key = cache_mod.patient_key(pid, salt)
            id_rows.append((key, pid))
            series, row = by_patient.get(pid, []), table.rows.get(pid)
            mask = find_mask(masks_dir, pid) if masks_dir.is_dir() else None
            dmasks = dicom_masks.get(pid, [])
            sh = _source_hash(salt, params, series, mask, row, dmasks)
            if _still_valid(cache_dir, key, old_patients.get(key), sh):
                entries[key] = old_patients[key]
                report.reused += 1
                continue
            base = {"source_hash": sh, "label": row.slm if row and not row.error else -1, "status": "excluded"}
            if row is None:
                entries[key] = {**base, "reason": "clinical: no row in clinical.csv for this DICOM patient"}
            elif row.error:
                entries[key] = {**base, "reason": f"clinical: {row.error}"}
            elif not series:
                entries[key] = {**base, "reason": f"DICOM: no DICOM images found for this patient_id (clinical.csv line {row.line})"}
            else:
                jobs.append({"key": key, "row": row, "series": series, "mask": mask, "dicom_masks": dmasks, "source_hash": sh,
                             "cfg": cfg, "cache_dir": str(cache_dir)})
        report.redone = len(ids) - report.reused
        from tqdm import tqdm

        t_build = time.perf_counter()
        report.timings["plan"] = t_build - t_scan - report.timings["scan"]

        bar = tqdm(total=len(jobs), desc="prepare", unit="patient", disable=not progress or not jobs, leave=False)
        results = pool.map(_process, jobs) if pool else _serial(jobs)
        errors = []
        for job, res in zip(jobs, results):
            if "_traceback" in res:
                errors.append(f"patient {job['key']}:\n{res.pop('_traceback')}")
            entries[job["key"]] = res
            bar.update(1)
        bar.close()
        report.timings["build"] = time.perf_counter() - t_build
    finally:
        if pool:
            pool.shutdown()

    # Each patient's place in the site's patient order (client/cache.py load_cache): the rank of its
    # patient_id among all the site's patient_ids, sorted as strings. It depends on neither the images
    # nor the salt, so the same cohort prepared again, or exported in another form, gets the same folds.
    # Recomputed for every patient, reused entries included, since a new or removed patient shifts it.
    for rank, (key, _pid) in enumerate(id_rows):  # id_rows follows `ids`: sorted patient_ids
        entries[key] = {**entries[key], "order": rank}

    # stale patient files (patients gone or now excluded) are removed so the cache holds no leftovers
    pdir = cache_dir / cache_mod.PATIENTS_DIR
    if pdir.is_dir():
        for p in pdir.glob("*.npz"):
            if entries.get(p.stem, {}).get("status") != "included":
                p.unlink()
    included = sorted(k for k, e in entries.items() if e["status"] == "included")
    report.included, report.excluded = len(included), len(entries) - len(included)
    report.reasons = dict(Counter(e["reason"].split(":")[0] for e in entries.values() if e["status"] != "included"))
    seqs: dict[str, Counter] = {"T2WI": Counter(), "DWI": Counter(), "ADC": Counter()}
    spacing: dict[str, list[float]] = {}
    for k in included:
        e = entries[k]
        s = e.get("sequences", {})
        seqs["T2WI"][s.get("t2", "?")] += 1
        seqs["DWI"][s.get("dwi", "?")] += 1
        seqs["ADC"]["computed" if s.get("adc", "").startswith("computed") else "scanner"] += 1
        form = " ".join(f"{k}={v}" for k, v in e.get("input_forms", {}).items())
        report.input_forms[form] = report.input_forms.get(form, 0) + 1
        for name, vals in (("T2 in-plane spacing", e["t2_spacing"][:2]), ("T2 slice spacing", e["t2_spacing"][2:]),
                           ("DWI in-plane spacing", e["dwi_spacing"][:2]), ("DWI slice spacing", e["dwi_spacing"][2:])):
            lo, hi = spacing.get(name, [np.inf, -np.inf])
            spacing[name] = [min(lo, *vals), max(hi, *vals)]
        report.warnings += [f"{k}: {w}" for w in e.get("warnings", [])]
    report.sequences = {k: dict(v) for k, v in seqs.items() if v}
    report.spacing = spacing
    mode, ctxs = cfg["input-mode"], cfg["context-slices"]
    manifest = {
        "format_version": cache_mod.CACHE_FORMAT_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        "preprocessing": params,
        "input_mode": mode,
        "spatial_dims": 3 if mode == "3d" else 2,
        "channels": channel_names(mode, ctxs, cfg["mask-channel"]),
        "image_shape": image_shape(mode, cfg["crop-size"], cfg["crop-depth"], ctxs, cfg["mask-channel"]),
        "feature_names": list(FEATURE_NAMES),
        "clinical_encoding": ENCODING_VERSION,
        "radiomics_features": list(radiomics.FEATURE_NAMES),
        "radiomics_version": radiomics.VERSION,
        "has_label": table.has_label,
        "salt": salt,
        "counts": {"patients": report.patients, "included": report.included, "excluded": report.excluded,
                   "dicom_files": report.dicom_files, "skipped_files": sum(report.skipped_files.values()),
                   "excluded_by_reason": report.reasons},
        "patients": entries,
    }
    # patient files are in place before the manifest that vouches for them
    cache_mod.atomic_write_json(cache_dir / cache_mod.MANIFEST, manifest)
    _write_qc(cache_dir, entries)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["patient_key", "patient_id"])
    w.writerows(id_rows)
    cache_mod.atomic_write_text(cache_mod.id_map_path(cache_dir), buf.getvalue())
    sk = io.StringIO()
    w = csv.writer(sk, lineterminator="\n")
    w.writerow(["path", "reason"])
    w.writerows(skipped)
    cache_mod.atomic_write_text(local / "skipped-files.csv", sk.getvalue())
    if errors:
        cache_mod.atomic_write_text(local / "errors.log", "\n".join(errors))
    pid_of = dict(id_rows)
    report.excluded_ids = [(pid_of[k], entries[k]["reason"]) for k in sorted(entries, key=lambda k: pid_of[k])
                           if entries[k]["status"] != "included"]
    report.hints = _id_hints(set(by_patient), set(table.rows), masks_dir)
    report.id_map = str(cache_mod.id_map_path(cache_dir))
    redone = {j["key"] for j in jobs}
    if included:
        report.previews = _write_previews(cache_dir, included[:PREVIEWS], manifest["channels"], redone)
    report.elapsed_s = time.perf_counter() - t0
    report.timings["write"] = report.elapsed_s - sum(report.timings.values())
    return report
