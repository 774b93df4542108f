"""Generate a whole synthetic cohort: site folders (clinical.csv, dicom/, masks/) + truth.json.

The cohort is built in a sibling temporary folder and renamed into place at the end, so a reader
never sees a half-written cohort. Every random choice comes from generators seeded by
(seed, site, patient), so the output is byte-identical for a seed and independent of run order.
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from .dicom import EXPORTS, ExamWriter, PatientInfo, uid
from .masks import MASK_FORMS, write_rtstruct, write_seg
from .model import TARGET_AUC, LatentDraw, draw, oracle_aucs, oracle_risks, population_summary
from .phantom import Exam, Patient, TumourLook, acquire
from .scanners import SiteSpec, site_specs

GENERATOR = "slmfed-synth"
GENERATOR_VERSION = "1.0"
TRUTH_JSON = "truth.json"
CLINICAL_COLUMNS = ("patient_id", "sex", "tumor_site", "cea", "ca199", "slm")


def draw_site(spec: SiteSpec, seed: int, site_index: int) -> LatentDraw:
    """The site's patients: the population's conditional draws with exactly round(n * prevalence) SLM.

    Taking a fixed number of cases and controls from the population keeps every conditional
    distribution (and so the oracles) unchanged while the sample prevalence hits the target.
    """
    n_pos = int(round(spec.n * spec.population.prevalence))
    rng = np.random.default_rng([seed, site_index, 0])
    pool = draw(spec.population, 0, rng)
    while (pool.slm == 1).sum() < n_pos or (pool.slm == 0).sum() < spec.n - n_pos:
        more = draw(spec.population, 4 * spec.n + 50, rng)
        pool = LatentDraw(*(np.concatenate([getattr(pool, f), getattr(more, f)]) for f in pool.__dataclass_fields__))
    pos = np.flatnonzero(pool.slm == 1)[:n_pos]
    neg = np.flatnonzero(pool.slm == 0)[: spec.n - n_pos]
    keep = np.sort(np.concatenate([pos, neg]))
    return LatentDraw(*(getattr(pool, f)[keep] for f in pool.__dataclass_fields__))


def _clinical_csv(ids: list[str], d: LatentDraw) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CLINICAL_COLUMNS)
    for pid, i in zip(ids, range(len(d))):
        r = d.row(i)
        w.writerow([pid, r["sex"], r["tumor_site"], f"{r['cea']:.1f}", f"{r['ca199']:.1f}", r["slm"]])
    return buf.getvalue()


def write_mask(exam: Exam, grid_spacing: tuple[float, float, float], path: Path) -> None:
    """The ROI on the T2 grid, with the T2 series' own origin/spacing/direction (ascending z)."""
    img = sitk.GetImageFromArray(exam.mask)
    img.SetOrigin(exam.t2_place.origin)
    img.SetSpacing(grid_spacing)
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path), useCompression=True)


def _check_out_dir(out: Path) -> None:
    """Refuse to overwrite anything that is not a previous synthetic cohort."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    truth = out / TRUTH_JSON
    try:
        previous = json.loads(truth.read_text())
        ours = previous.get("generator") == GENERATOR and entries <= {TRUTH_JSON, *previous["sites"]}
    except (OSError, ValueError, KeyError, AttributeError):
        ours = False
    if not ours:
        raise FileExistsError(
            f"{out} is not empty and does not hold only a previous synthetic cohort ({TRUTH_JSON} + its site folders); "
            "choose a new folder"
        )


def generate_cohort(out_dir, preset: str = "paper", seed: int = 0, sites: int | None = None,
                    progress: bool = True, *, workers: int = 1, export: str = "classic", masks: str = "nifti") -> dict:
    """Write the synthetic cohort to `out_dir` and return the summary that truth.json holds.

    preset: "paper" (176 + 31 patients), "small" (28 + 12) or "tiny" (8 + 4), sites: None for the
    two centres, or N for N non-identically distributed hospitals site-01..site-NN. workers:
    processes that render patients; the output does not depend on it. Workers are spawned, so a
    script that passes workers > 1 needs the usual `if __name__ == "__main__":` guard.
    export: "classic" (one file per slice) or "enhanced" (one Enhanced MR file per series); masks:
    "nifti" (masks/<patient_id>.nii.gz), "seg" (a DICOM SEG in the exam's folder) or "rtstruct"
    (masks/RS_<hash>.dcm). Images, labels and truth are the same for every export and mask form.
    """
    if export not in EXPORTS:
        raise ValueError(f"export: expected one of {', '.join(EXPORTS)}, found {export!r}")
    if masks not in MASK_FORMS:
        raise ValueError(f"masks: expected one of {', '.join(MASK_FORMS)}, found {masks!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers: expected an integer >= 1, found {workers!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, found {seed!r}")
    out = Path(out_dir).resolve()
    specs = site_specs(preset, sites, seed)
    _check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        truth = _generate(tmp, out, specs, preset, seed, progress, workers, export, masks)
        (tmp / TRUTH_JSON).write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return truth


def _generate(tmp: Path, out: Path, specs: list[SiteSpec], preset: str, seed: int, progress: bool,
              workers: int, export: str = "classic", masks: str = "nifti") -> dict:
    draws = [draw_site(spec, seed, k) for k, spec in enumerate(specs)]
    truth: dict = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "preset": preset,
        "seed": int(seed),
        "export": export,
        "masks": masks,
        "out_dir": str(out),
        "n_sites": len(specs),
        "targets": {"oracle_auc": dict(TARGET_AUC)},
        "risk_model": asdict(specs[0].population.risk),
        "sites": {},
        "patients": {},
    }
    tasks = []
    for k, (spec, d) in enumerate(zip(specs, draws)):
        site_dir = tmp / spec.name
        (site_dir / "dicom").mkdir(parents=True)
        (site_dir / "masks").mkdir()
        ids = [f"{spec.id_prefix}-{i + 1:04d}" for i in range(spec.n)]
        risks = oracle_risks(spec.population, d)
        (site_dir / "clinical.csv").write_text(_clinical_csv(ids, d))
        for i, pid in enumerate(ids):
            tasks.append(_PatientTask(site_dir, spec, pid, seed, k, i, d.features[i], d.row(i), float(d.risk[i]),
                                      float(d.z[i]), {name: float(r[i]) for name, r in risks.items()}, export, masks))
    n_workers = min(workers, len(tasks)) or 1
    with tqdm(total=len(tasks), desc=f"synth {preset}", unit="patient", disable=not progress, leave=False) as bar:
        if n_workers == 1:
            for t in tasks:
                truth["patients"][t.pid] = _write_patient(t)
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
            with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
                for t, row in zip(tasks, pool.map(_write_patient, tasks, chunksize=4)):
                    truth["patients"][t.pid] = row
                    bar.update(1)
    for spec, d in zip(specs, draws):
        pop = population_summary(spec.population)
        truth["sites"][spec.name] = {
            "path": str(out / spec.name),
            "id_prefix": spec.id_prefix,
            "n": spec.n,
            "n_slm": int(d.slm.sum()),
            "prevalence": float(d.slm.mean()) if spec.n else float("nan"),
            "oracle_auc": pop["oracle_auc"],
            "sample_oracle_auc": oracle_aucs(spec.population, d),
            "population": {
                "prevalence": spec.population.prevalence,
                "p_male": spec.population.p_male,
                "p_site": dict(zip(("low", "mid", "high"), spec.population.p_site)),
                "alpha": pop["alpha"],
                "oracle_mc_n": pop["mc_n"],
            },
            "scanner": spec.scanner.describe(),
        }
    return truth


@dataclass(frozen=True)
class _PatientTask:
    """Everything one worker needs to render and write one patient (picklable)."""

    site_dir: Path
    spec: SiteSpec
    pid: str
    seed: int
    site_index: int
    index: int
    features: np.ndarray
    row: dict
    risk: float
    z: float
    oracle_risk: dict
    export: str = "classic"
    masks: str = "nifti"


def _write_patient(t: _PatientTask) -> dict:
    spec, pid, row = t.spec, t.pid, t.row
    rng = np.random.default_rng([t.seed, t.site_index, t.index + 1, 1])
    site_dir, seed, d_features = t.site_dir, t.seed, t.features
    look = TumourLook.from_features(d_features, spec.population.risk.sd_image)
    patient = Patient(look, rng)
    exam = acquire(patient, spec.scanner, rng)
    year, day = 2016 + int(rng.integers(0, 6)), int(rng.integers(0, 365))
    date = np.datetime64(f"{year}-01-01") + np.timedelta64(day, "D")
    info = PatientInfo(pid, row["sex"], int(np.clip(rng.normal(62, 10), 30, 88)), str(date).replace("-", ""),
                       spec.name.replace("-", " ").title())
    writer = ExamWriter(site_dir / "dicom", spec.scanner, info, seed, rng, export=t.export)
    writer.write(exam)
    g = spec.scanner.t2
    t2_files = writer.series_files["t2"]
    tag = uid(seed, pid, t.masks)[-12:]  # file names carry no patient ID: readers match by UIDs
    if t.masks == "nifti":
        write_mask(exam, (g.pixel_mm, g.pixel_mm, g.spacing_mm), site_dir / "masks" / f"{pid}.nii.gz")
    elif t.masks == "seg":
        write_seg(t2_files, exam.mask, exam.t2_place.origin[2], g.spacing_mm, writer.exam_dir / "Se90" / f"SEG{tag}",
                  info, seed)
    else:
        reach = float(np.max(patient.axes)) * (1 + 3 * look.irregularity) + 3.0
        write_rtstruct(t2_files, exam.mask, exam.t2_place.origin, g.pixel_mm, g.spacing_mm,
                       lambda x, y, z: patient._tumour(x, y, z)[0], reach, site_dir / "masks" / f"RS{tag}.dcm",
                       info, seed)
    voxel_ml = g.pixel_mm**2 * g.spacing_mm / 1000
    return {
        "site": spec.name,
        "slm": row["slm"],
        "risk": t.risk,
        "oracle_risk": t.oracle_risk,
        "z": t.z,
        "tumor": {**look.as_dict(), "mask_volume_ml": float(exam.mask.sum() * voxel_ml),
                  "centre_mm": [round(float(c), 3) for c in patient.tumour_centre()]},
    }
