"""Vendor diffusion forms only the project's imitations cover (simulation/synth/dicom.py; no public
package ships such real files): classic directional DWI with the b-value and direction in the Siemens
CSA / GE / Philips private tags, enhanced per-direction frames without a trace, a TRACEW series beside
per-direction images, low-b series, the b-value fallbacks, and the synthetic cohort's mosaic export."""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from client.dicom_scan import FileRecord, read_headers
from client.prepare import prepare_site
from client.series import Series, SeriesRules, group_series, select_sequences
from client.volumes import read_diffusion
from common.config import load_config
from simulation.synth.dicom import ExamWriter, PatientInfo
from simulation.synth.phantom import Exam, Placement
from simulation.synth.scanners import GE_15T, PHILIPS_3T, SIEMENS_3T, Grid

SCANNERS = {"siemens": SIEMENS_3T, "ge": GE_15T, "philips": PHILIPS_3T}


def _exam(scanner, rng) -> tuple:
    """A tiny exam (6 x 5 x 4 DWI, 8 x 8 x 4 T2) with random positive pixels."""
    t2g, dwig = Grid(8, 8, 4, 1.0, 3.0, 3.0), Grid(6, 5, 4, 2.0, 3.0, 3.0)
    sc = replace(scanner, t2=t2g, dwi=dwig, file_style="series-noext")
    dwi = {b: rng.uniform(50, 3000, (4, 5, 6)) * (1.0 if b == 0 else 0.4) for b in sc.b_values}
    exam = Exam(t2=rng.uniform(10, 3000, (4, 8, 8)), t2_place=Placement((-4.0, -4.0, 0.0)),
                mask=np.zeros((4, 8, 8), np.uint8), dwi=dwi, adc=rng.uniform(100, 2500, (4, 5, 6)),
                dwi_place=Placement((-5.0, -4.0, 0.0)))
    return sc, exam


def _write(tmp: Path, vendor: str, export: str, seed: int = 1) -> tuple[ExamWriter, object, Exam]:
    rng = np.random.default_rng(seed)
    sc, exam = _exam(SCANNERS[vendor], rng)
    w = ExamWriter(tmp / export / vendor / "dicom", sc, PatientInfo(f"V-{vendor}", "M", 60, "20200101", "Test"), seed, rng,
                   export=export)
    w.write(exam)
    return w, sc, exam


def _records(paths) -> list[FileRecord]:
    return [r for p in paths for r in read_headers(p)]


def _normal_pos(r: FileRecord) -> float:
    return float(np.dot(np.cross(r.iop[:3], r.iop[3:]), r.ipp))


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips"])
def test_classic_directional_dwi_gives_the_geometric_mean_trace(tmp_path, vendor):
    w, sc, exam = _write(tmp_path, vendor, "directional")
    recs = _records(w.series_files["dwi"])
    b_top = sc.b_values[-1]
    assert all(r.bvalue in sc.b_values for r in recs), {r.bvalue for r in recs}  # from the private tags only
    top = [r for r in recs if r.bvalue == b_top]
    assert len({r.direction for r in top}) == 3 and all(r.directionality == "DIRECTIONAL" for r in top)
    img, notes = read_diffusion(top, "dwi", b_top)
    got = sitk.GetArrayFromImage(img).astype(np.float64)
    per_dir = {}
    for r in top:  # the same trace from the pixels as pydicom reads them, sorted by position
        per_dir.setdefault(r.direction, []).append((_normal_pos(r), pydicom.dcmread(r.path).pixel_array.astype(np.float64)))
    vols = np.stack([np.stack([a for _, a in sorted(v, key=lambda t: t[0])]) for v in per_dir.values()])
    want = np.prod(vols, axis=0) ** (1 / 3)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.allclose(got, vols.mean(axis=0), rtol=1e-4)  # a plain mean would fail
    assert any("geometric mean of 3" in n for n in notes)


def test_ge_and_philips_private_forms_as_scanners_write_them(tmp_path):
    """GE (0043,1039) IS "1000000800\\8\\0\\0" in a block reserved at (0043,0011); Philips (2001,1003) FL
    read as raw bytes (implicit VR, no dictionary for the private tag); a foreign creator is not read."""
    w, _, _ = _write(tmp_path, "ge", "directional")
    src = [p for p in w.series_files["dwi"] if read_headers(p)[0].bvalue == 1000][0]
    ds = pydicom.dcmread(src)
    value = ds[0x00431039].value
    del ds[0x00431039], ds[0x00430010]
    ds.add_new(0x00430010, "LO", "SOME_OTHER_CREATOR")
    ds.add_new(0x00431039, "IS", [1_000_000_222, 8, 0, 0])  # in the other creator's block: not a b-value
    ds.add_new(0x00430011, "LO", "GEMS_PARM_01")
    ds.add_new(0x00431139, "IS", value)
    ds.save_as(tmp_path / "ge.dcm")
    assert read_headers(tmp_path / "ge.dcm")[0].bvalue == 1000
    w, _, _ = _write(tmp_path, "philips", "directional")
    src = [p for p in w.series_files["dwi"] if read_headers(p)[0].bvalue == 1000][0]
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(tmp_path / "philips.dcm", implicit_vr=True, little_endian=True)
    raw = pydicom.dcmread(tmp_path / "philips.dcm", stop_before_pixels=True)
    rec = read_headers(tmp_path / "philips.dcm")[0]
    assert rec.bvalue == 1000 and rec.directionality == "DIRECTIONAL" and rec.direction, raw.get(0x20011003)


def test_enhanced_directional_frames_without_a_trace_give_the_trace(tmp_path):
    w, sc, exam = _write(tmp_path, "siemens", "enhanced")
    path = w.series_files["dwi"][0]
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    keep = [i for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence)
            if not (fg.MRDiffusionSequence[0].DiffusionBValue > 0
                    and fg.MRDiffusionSequence[0].DiffusionDirectionality == "ISOTROPIC")]
    ds.PerFrameFunctionalGroupsSequence = Sequence([ds.PerFrameFunctionalGroupsSequence[i] for i in keep])
    ds.NumberOfFrames = len(keep)
    ds.PixelData = np.ascontiguousarray(frames[keep]).tobytes()
    ds.save_as(path)
    top = [r for r in read_headers(path) if r.bvalue == 800]
    assert len(top) == 12 and len({r.direction for r in top}) == 3  # 4 positions x 3 directions, no trace
    img, notes = read_diffusion(top, "dwi", 800)
    stored = np.rint(exam.dwi[800.0])  # the writer stores the rounded volume, each direction scaled and rounded
    want = np.prod(np.stack([np.clip(np.rint(stored * f), 0, 65535) for f in (0.85, 1.0, 1.15)]), 0) ** (1 / 3)
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), want, rtol=1e-6)


def _rec(desc, b=None, itype=("ORIGINAL", "PRIMARY"), direction="", directionality="", series=4, z=0.0, uid="s"):
    return FileRecord(path=f"/x/{uid}/{z}/{direction}", size=1, mtime_ns=0, patient_id="P", study_uid="st",
                      series_uid=uid, sop_uid=f"{uid}.{z}.{direction}", modality="MR", description=desc,
                      image_type=tuple(itype), series_number=series, ipp=(0.0, 0.0, z), iop=(1, 0, 0, 0, 1, 0),
                      pixel_spacing=(1.0, 1.0), rows=4, cols=4, bvalue=b, directionality=directionality,
                      direction=direction)


def test_scanner_trace_series_is_preferred_and_low_b_is_not_dwi_before_t2():
    t2 = [_rec("t2_tse_tra", series=2, z=z, uid="t2") for z in (0.0, 3.0)]
    dirs = [_rec("ep2d_diff", 800, ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"), d, "DIRECTIONAL", 4, z, "dir")
            for z in (0.0, 3.0) for d in ("+1.00,+0.00,+0.00", "+0.00,+1.00,+0.00", "+0.00,+0.00,+1.00")]
    b0 = [_rec("ep2d_diff", 0, ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"), "", "NONE", 4, z, "dir") for z in (0.0, 3.0)]
    trace = [_rec("ep2d_diff_TRACEW", 800, ("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "ND"), "", "ISOTROPIC", 5, z,
                  "tr") for z in (0.0, 3.0)]
    series = group_series(t2 + dirs + b0 + trace)["P"]
    sel = select_sequences(series, SeriesRules())
    assert sel.dwi.series_uid == "tr" and any("trace" in n for n in sel.notes), sel.notes
    without = group_series(t2 + dirs + b0)["P"]
    sel = select_sequences(without, SeriesRules())
    assert sel.dwi.series_uid == "dir" and len(sel.dwi_files) == 6
    rules = SeriesRules()
    low = Series("P", "st", "lb", [_rec("t2_tse_tra_b5", 5, series=7, uid="lb")])
    assert rules.classify(low) == "t2"  # b = 5 alone does not make a T2-named series a DWI
    assert rules.classify(Series("P", "st", "x", [_rec("something", 5, uid="x")])) == "dwi"
    assert rules.classify(Series("P", "st", "y", [_rec("t2_tse_tra", 800, uid="y")])) == "dwi"
    assert rules.classify(Series("P", "st", "z", [_rec("dMRI_mb3_AP", None, ("ORIGINAL", "PRIMARY", "DIFFUSION"),
                                                       uid="z")])) == "dwi"


def test_sequence_name_forms(tmp_path):
    w, _, _ = _write(tmp_path, "siemens", "directional")
    src = w.series_files["dwi"][-1]
    for name, want in (("ep_b1500#2", (1500.0, "DIRECTIONAL", "#2")), ("*ep_b800t", (800.0, "ISOTROPIC", "")),
                       ("*re_b1000t", (1000.0, "ISOTROPIC", "")), ("ep_b0", (0.0, "NONE", ""))):
        ds = pydicom.dcmread(src)
        for tag in (0x0019100C, 0x0019100E, 0x00291010):
            del ds[tag]
        ds.SequenceName = name
        ds.save_as(tmp_path / "s.dcm")
        r = read_headers(tmp_path / "s.dcm")[0]
        assert (r.bvalue, r.directionality, r.direction) == want, name


def test_synthetic_mosaic_export_prepares_like_classic(tmp_path):
    """The vendor writer's Siemens mosaic DWI / ADC + CSA: the same volumes, geometry and cache as the
    classic export of the same exam."""
    from tests.real_scanner import write_ball_mask, write_clinical

    out = {}
    for export in ("classic", "mosaic"):
        w, sc, exam = _write(tmp_path, "siemens", export)
        recs = {k: _records(v) for k, v in w.series_files.items()}
        out[export] = recs
        site = tmp_path / export / "siemens"
        write_ball_mask(w.series_files["t2"], site / "masks" / "V-siemens.nii.gz", radius_mm=2.5)
        write_clinical(site, ["V-siemens"])
        cache = tmp_path / f"cache-{export}"
        rep = prepare_site(site, cache, load_config(cli={"workers": 1}), progress=False)
        qc = list(csv.DictReader(open(cache / "qc.csv")))
        assert rep.included == 1, qc[0]["reason"]
        assert qc[0]["input_forms"] == ("t2=classic dwi=mosaic adc=mosaic mask=nifti" if export == "mosaic"
                                        else "t2=classic dwi=classic adc=classic mask=nifti")
        out[export + "-image"] = np.load(next((cache / "patients").glob("*.npz")))["image"]
    assert len(out["mosaic"]["dwi"]) == len(out["classic"]["dwi"]) == 8  # 4 slices x b = 0, 800
    for b in (0.0, 800.0):
        c, _ = read_diffusion([r for r in out["classic"]["dwi"] if r.bvalue == b], "c", b)
        m, _ = read_diffusion([r for r in out["mosaic"]["dwi"] if r.bvalue == b], "m", b)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(m), sitk.GetArrayFromImage(c))
        for get in ("GetOrigin", "GetSpacing", "GetDirection"):
            np.testing.assert_allclose(getattr(m, get)(), getattr(c, get)(), atol=1e-4)
    np.testing.assert_allclose(out["mosaic-image"], out["classic-image"], atol=1e-5)
