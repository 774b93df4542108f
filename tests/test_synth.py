"""The synthetic cohort generator (`slmfed synth`), checked on the tiny preset.

Tolerances for the latent model (no images, large draws): population oracle AUCs within 0.02 of
the targets (clinical 0.82, image 0.85, combined 0.92); sample prevalence within 0.01 of 40 % / 35 %.
"""
from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from simulation.synth import TARGET_AUC, generate_cohort
from simulation.synth.cohort import draw_site
from simulation.synth.model import Population, draw, oracle_aucs, oracle_risks, population_summary
from simulation.synth.phantom import Patient, TumourLook, acquire
from simulation.synth.scanners import PRESETS, site_specs

SITES = ("center-primary", "center-external")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "cohort"
    summary = generate_cohort(out, preset="tiny", seed=0, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def headers(tiny):
    """Every DICOM file of the tiny cohort, read once: (site, path, dataset)."""
    out, _ = tiny
    rows = []
    for site in SITES:
        for path in sorted(p for p in (out / site / "dicom").rglob("*") if p.is_file()):
            rows.append((site, path, pydicom.dcmread(path)))
    return rows


def _clinical(site_dir: Path) -> list[dict]:
    with open(site_dir / "clinical.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _series(headers, site):
    groups = defaultdict(list)
    for s, _, ds in headers:
        if s == site:
            groups[(ds.PatientID, ds.SeriesDescription)].append(ds)
    return groups


def test_layout_and_summary(tiny):
    out, summary = tiny
    assert sorted(p.name for p in out.iterdir()) == sorted([*SITES, "truth.json"])
    truth = json.loads((out / "truth.json").read_text())
    assert truth["sites"] == json.loads(json.dumps(summary["sites"]))
    assert [truth["sites"][s]["n"] for s in SITES] == list(PRESETS["tiny"]["sizes"])
    for site in SITES:
        assert (out / site / "masks").is_dir() and (out / site / "dicom").is_dir()
        assert Path(truth["sites"][site]["path"]) == out.resolve() / site


def test_clinical_csv_matches_dicom_patients(tiny, headers):
    out, summary = tiny
    all_ids = []
    for site in SITES:
        rows = _clinical(out / site)
        assert list(rows[0]) == ["patient_id", "sex", "tumor_site", "cea", "ca199", "slm"]
        ids = {r["patient_id"] for r in rows}
        all_ids += [r["patient_id"] for r in rows]
        assert {ds.PatientID for s, _, ds in headers if s == site} == ids
        sex = {r["patient_id"]: r["sex"] for r in rows}
        for s, path, ds in headers:
            if s == site:
                assert ds.PatientSex == sex[ds.PatientID], path
        for r in rows:
            assert r["sex"] in ("M", "F") and r["tumor_site"] in ("low", "mid", "high")
            assert float(r["cea"]) > 0 and float(r["ca199"]) > 0 and r["slm"] in ("0", "1")
            assert (out / site / "masks" / f"{r['patient_id']}.nii.gz").is_file()
            assert summary["patients"][r["patient_id"]]["slm"] == int(r["slm"])
        assert sum(int(r["slm"]) for r in rows) == summary["sites"][site]["n_slm"]
    assert len(all_ids) == len(set(all_ids)), "patient IDs must be unique across sites"


def test_every_file_is_valid_mr_dicom_for_pydicom_and_simpleitk(headers):
    for _, path, ds in headers:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, path
        assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR", path
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        img = sitk.ReadImage(str(path))
        assert img.GetSize()[:2] == (ds.Columns, ds.Rows), path
        stored = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(sitk.GetArrayFromImage(img)[0], stored, rtol=1e-6, err_msg=str(path))
    uids = [ds.SOPInstanceUID for *_, ds in headers]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("site", SITES)
def test_each_series_is_a_consistent_volume(headers, site, tiny):
    scanner = tiny[1]["sites"][site]["scanner"]
    groups = _series(headers, site)
    patients = {pid for pid, _ in groups}
    descs = scanner["series_descriptions"]
    for pid in patients:
        assert {d for p, d in groups if p == pid} == set(descs.values())
        for kind, desc in descs.items():
            dss = groups[(pid, desc)]
            assert len({ds.SeriesInstanceUID for ds in dss}) == 1
            grid = scanner["t2_grid" if kind == "t2" else "dwi_grid"]
            by_b = defaultdict(list)
            for ds in dss:
                by_b[float(ds.get("DiffusionBValue", -1))].append(ds)
            if kind == "dwi":
                assert sorted(by_b) == scanner["b_values"], f"{pid} DWI b-values"
            for stack in by_b.values():
                stack.sort(key=lambda d: float(d.ImagePositionPatient[2]))
                z = np.array([float(d.ImagePositionPatient[2]) for d in stack])
                assert len(z) == grid["matrix"][2]
                np.testing.assert_allclose(np.diff(z), float(stack[0].SpacingBetweenSlices), atol=1e-3)
                np.testing.assert_allclose(float(stack[0].SpacingBetweenSlices), grid["spacing_mm"])
                for d in stack:
                    assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
                    assert [float(v) for v in d.ImagePositionPatient[:2]] == [
                        float(v) for v in stack[0].ImagePositionPatient[:2]]
                    assert (d.Columns, d.Rows) == tuple(grid["matrix"][:2])
                    assert float(d.PixelSpacing[0]) == pytest.approx(grid["pixel_mm"])
        t2 = groups[(pid, descs["t2"])][0]
        dwi = groups[(pid, descs["dwi"])][0]
        assert float(dwi.PixelSpacing[0]) > float(t2.PixelSpacing[0]), "DWI must be on a coarser grid than T2"
        assert dwi.FrameOfReferenceUID == t2.FrameOfReferenceUID


def _t2_volume(out: Path, site: str, pid: str, desc: str) -> sitk.Image:
    """The T2 series read the way a DICOM tool would: GDCM's geometric sort."""
    for folder in sorted({p.parent for p in (out / site / "dicom").rglob("*") if p.is_file()}):
        for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            if ds.PatientID == pid and ds.SeriesDescription == desc:
                return sitk.ReadImage(files)
    raise AssertionError(f"no T2 series for {pid}")


@pytest.mark.parametrize("site", SITES)
def test_mask_lies_on_the_t2_grid_and_covers_the_tumour(tiny, site):
    out, summary = tiny
    desc = summary["sites"][site]["scanner"]["series_descriptions"]["t2"]
    for row in _clinical(out / site):
        pid = row["patient_id"]
        t2 = _t2_volume(out, site, pid, desc)
        mask = sitk.ReadImage(str(out / site / "masks" / f"{pid}.nii.gz"))
        assert mask.GetSize() == t2.GetSize()
        np.testing.assert_allclose(mask.GetOrigin(), t2.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(mask.GetSpacing(), t2.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(mask.GetDirection(), t2.GetDirection(), atol=1e-6)
        m = sitk.GetArrayFromImage(mask)
        assert set(np.unique(m)) == {0, 1}
        truth = summary["patients"][pid]["tumor"]
        centre = mask.TransformPhysicalPointToIndex(truth["centre_mm"])
        zz, yy, xx = np.nonzero(m)
        assert xx.min() <= centre[0] <= xx.max() and yy.min() <= centre[1] <= yy.max()
        assert zz.min() <= centre[2] <= zz.max()
        assert truth["mask_volume_ml"] == pytest.approx(truth["volume_ml"], rel=0.45)
        # the ROI is tumour tissue: darker than the surrounding fat on T2
        img = sitk.GetArrayFromImage(t2).astype(float)
        assert np.median(img[m == 1]) < 0.8 * np.median(img[m == 0])


def test_dwi_and_adc_show_the_tumour(tiny, headers):
    """Inside the ROI (sampled on the coarse DWI grid): ADC near the truth, brighter high-b signal."""
    out, summary = tiny
    for site in SITES:
        sc = summary["sites"][site]["scanner"]
        groups = _series(headers, site)
        for row in _clinical(out / site):
            pid = row["patient_id"]
            look = summary["patients"][pid]["tumor"]
            adc = groups[(pid, sc["series_descriptions"]["adc"])]
            assert "ADC" in adc[0].ImageType
            ijk = _world_to_index(adc, look["centre_mm"])
            vol = _stack(adc)
            measured = np.median(vol[tuple(slice(max(0, i - 1), i + 2) for i in ijk)])
            assert measured == pytest.approx(look["adc_mean"], rel=0.35), pid
            dwi = [d for d in groups[(pid, sc["series_descriptions"]["dwi"])]
                   if float(d.DiffusionBValue) == max(sc["b_values"])]
            high_b = _stack(dwi)
            assert high_b[ijk] > 2 * np.median(high_b), pid


def _stack(dss):
    dss = sorted(dss, key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])


def _world_to_index(dss, point):
    z0 = min(float(d.ImagePositionPatient[2]) for d in dss)
    d = dss[0]
    x0, y0 = (float(v) for v in d.ImagePositionPatient[:2])
    ps = float(d.PixelSpacing[0])
    return (round((point[2] - z0) / float(d.SpacingBetweenSlices)), round((point[1] - y0) / ps),
            round((point[0] - x0) / ps))


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "truth.json"}


def test_cli_prints_summary_and_same_seed_gives_identical_output(tiny, tmp_path, capsys):
    from common.cli import main

    out, summary = tiny
    again = tmp_path / "again"
    # two worker processes write exactly what the in-process fixture wrote
    assert main(["synth", "--out", str(again), "--preset", "tiny", "--seed", "0", "--no-progress", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert str(again.resolve()) in text
    for site in SITES:
        line = next(l for l in text.splitlines() if l.startswith(site))
        s = summary["sites"][site]
        assert f" {s['n']} " in line and f"{s['prevalence']:.1%}" in line
        assert all(f"{s['oracle_auc'][k]:.3f}" in line for k in ("clinical", "image", "combined"))
    assert _tree_digest(again) == _tree_digest(out)
    t1, t2 = (json.loads((p / "truth.json").read_text()) for p in (out, again))
    assert t1["patients"] == t2["patients"]
    # re-running over a previous cohort replaces it; a folder with other content is refused
    assert main(["synth", "--out", str(again), "--preset", "tiny", "--seed", "3", "--no-progress"]) == 0
    assert _tree_digest(again) != _tree_digest(out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    assert main(["synth", "--out", str(tmp_path / "other"), "--preset", "tiny"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_population_oracles_and_prevalence_hit_the_targets():
    for spec in site_specs("paper"):
        pop = population_summary(spec.population)
        for k, target in TARGET_AUC.items():
            assert abs(pop["oracle_auc"][k] - target) <= 0.02, (spec.name, k, pop["oracle_auc"])
        d = draw_site(spec, seed=0, site_index=0)
        assert len(d) == spec.n
        assert abs(d.slm.mean() - spec.population.prevalence) <= 0.01


def test_oracle_risks_are_calibrated_and_not_beaten_by_a_fitted_model():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    pop = Population(0.40)
    d = draw(pop, 60_000, np.random.default_rng(1))
    assert abs(d.slm.mean() - 0.40) < 0.01
    risks = oracle_risks(pop, d)
    aucs = oracle_aucs(pop, d)
    assert aucs["combined"] > max(aucs["clinical"], aucs["image"]) + 0.03
    for k, r in risks.items():  # a Bayes posterior is calibrated: mean risk in each decile = event rate
        edges = np.quantile(r, np.linspace(0, 1, 11))
        bins = np.clip(np.searchsorted(edges, r, side="right") - 1, 0, 9)
        for b in range(10):
            sel = bins == b
            assert abs(r[sel].mean() - d.slm[sel].mean()) < 0.03, (k, b)
    x = np.column_stack([d.male, d.site_idx == 1, d.site_idx == 2, np.log(d.cea), np.log(d.ca199), d.features])
    half = len(d) // 2
    fit = LogisticRegression(max_iter=1000).fit(x[:half], d.slm[:half])
    learned = roc_auc_score(d.slm[half:], fit.predict_proba(x[half:])[:, 1])
    oracle = roc_auc_score(d.slm[half:], risks["combined"][half:])
    assert learned <= oracle + 0.003


def test_tumour_look_scales_with_aggressiveness():
    """Same nuisance anatomy, low vs high latent features: bigger ROI, lower ADC at high risk."""
    spec = site_specs("tiny")[0]
    looks = [TumourLook.from_features(np.full(4, f), 1.0) for f in (-1.5, 1.5)]
    assert looks[1].volume_ml > 1.5 * looks[0].volume_ml
    assert looks[1].irregularity > looks[0].irregularity and looks[1].heterogeneity > looks[0].heterogeneity
    exams = [acquire(Patient(look, np.random.default_rng(5)), spec.scanner, np.random.default_rng(6)) for look in looks]
    assert exams[1].mask.sum() > 1.5 * exams[0].mask.sum()
    assert looks[1].adc < looks[0].adc - 200


def test_multisite_split(tmp_path):
    summary = generate_cohort(tmp_path / "ms", preset="tiny", seed=2, sites=3, progress=False)
    assert sorted(summary["sites"]) == ["site-01", "site-02", "site-03"]
    assert sorted(p.name for p in (tmp_path / "ms").iterdir()) == ["site-01", "site-02", "site-03", "truth.json"]
    sizes = [s["n"] for s in summary["sites"].values()]
    assert len(set(sizes)) > 1 and sum(sizes) >= sum(PRESETS["tiny"]["sizes"])
    assert len({s["scanner"]["key"] for s in summary["sites"].values()}) == 3
    assert len({s["population"]["prevalence"] for s in summary["sites"].values()}) == 3
    ids = [r["patient_id"] for s in summary["sites"] for r in _clinical(tmp_path / "ms" / s)]
    assert len(ids) == len(set(ids)) == sum(sizes)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"preset": "huge"}, "preset: expected one of paper, small, tiny"),
     ({"sites": 0}, "sites: expected an integer from 1 to 99"),
     ({"seed": -1}, "seed: expected an integer >= 0"),
     ({"workers": 0}, "workers: expected an integer >= 1")],
)
def test_bad_arguments_are_refused_with_a_clear_message(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_cohort(tmp_path / "x", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == [], "nothing, not even a partial folder, is left behind"


def test_a_failure_mid_cohort_leaves_nothing_half_written(tmp_path, monkeypatch):
    import simulation.synth.cohort as cohort

    real, calls = cohort._write_patient, []

    def flaky(task):
        calls.append(task.pid)
        if len(calls) == 3:
            raise OSError(f"disk full while writing {task.pid}")
        return real(task)

    monkeypatch.setattr(cohort, "_write_patient", flaky)
    with pytest.raises(OSError, match="disk full while writing P1-0003"):
        generate_cohort(tmp_path / "cohort", preset="tiny", progress=False)
    assert list(tmp_path.iterdir()) == []
