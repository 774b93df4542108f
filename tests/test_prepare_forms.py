"""Real hospital export forms (#11): the same synthetic cohort written as classic single-frame +
NIfTI masks, as Enhanced MR multi-frame + DICOM SEG, and as classic + RTSTRUCT gives the same cache;
Legacy Converted Enhanced MR (highdicom's conversion of the classic files) too; every bad form has
its own clear per-patient reason.

Measured tolerances (tiny preset, seed 0): enhanced + SEG is bit-identical to classic + NIfTI (the
raw pixel path reads the same stored values; the SEG is the same voxel mask). RTSTRUCT contours are
smooth polygons along the phantom's true margin, rasterised at voxel centres: whole-grid Dice
0.980-0.999 against the voxel mask; the model input then moves with the ROI's centroid (the crop is
centred on it), a sub-pixel shift: mean |difference| <= 0.012 per channel, 99th percentile <= 0.05
(channels normalised to [0, 1]).
The patient order (hence the CV folds) follows the patient_id, the same for every form and salt.
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from client.cache import CacheError, atomic_write_json, id_map_path, load_cache, patient_order
from client.dicom_scan import dicomdir_summary, read_headers
from client.masks import fill_polygons, match_roi_name, read_roi, MaskSource
from client.prepare import prepare_site
from client.study import Site
from common.config import load_config
from simulation.synth import generate_cohort

FORMS = {"classic-nifti": ("classic", "nifti"), "enhanced-seg": ("enhanced", "seg"),
         "classic-rtstruct": ("classic", "rtstruct")}
SITES = ("center-primary", "center-external")


def _cache(cache: Path) -> dict[str, dict]:
    ids = dict(csv.reader(open(id_map_path(cache), encoding="utf-8")))
    out = {}
    for p in (cache / "patients").glob("*.npz"):
        with np.load(p) as z:
            out[ids[p.stem]] = {k: z[k] for k in z.files}
    return out


def _qc(cache: Path) -> dict[str, dict]:
    ids = dict(csv.reader(open(id_map_path(cache), encoding="utf-8")))
    with open(cache / "qc.csv", newline="", encoding="utf-8") as fh:
        return {ids[r["patient_key"]]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    root = tmp_path_factory.mktemp("forms")
    cfg = load_config(cli={"workers": 1})
    out = {}
    for name, (export, masks) in FORMS.items():
        generate_cohort(root / name, preset="tiny", seed=0, progress=False, export=export, masks=masks)
        out[name] = {s: prepare_site(root / name / s, root / "cache" / name / s, cfg, progress=False) for s in SITES}
    return root, out


@pytest.mark.parametrize("site", SITES)
def test_enhanced_seg_cache_is_identical_to_classic_nifti(forms, site):
    root, reports = forms
    assert reports["enhanced-seg"][site].included == reports["classic-nifti"][site].included > 0
    assert reports["enhanced-seg"][site].mask_objects == reports["enhanced-seg"][site].included
    a, b = _cache(root / "cache" / "classic-nifti" / site), _cache(root / "cache" / "enhanced-seg" / site)
    assert sorted(a) == sorted(b)
    for pid in a:
        np.testing.assert_array_equal(a[pid]["image"], b[pid]["image"], err_msg=pid)
        np.testing.assert_array_equal(a[pid]["roi"], b[pid]["roi"], err_msg=pid)
        np.testing.assert_array_equal(a[pid]["clinical"], b[pid]["clinical"])
        assert a[pid]["label"] == b[pid]["label"]
    qc = _qc(root / "cache" / "enhanced-seg" / site)
    assert {r["input_forms"] for r in qc.values()} == {"t2=enhanced dwi=enhanced adc=enhanced mask=seg"}
    n = reports["enhanced-seg"][site].included
    assert reports["enhanced-seg"][site].input_forms == {"t2=enhanced dwi=enhanced adc=enhanced mask=seg": n}
    assert f"input forms: t2=enhanced dwi=enhanced adc=enhanced mask=seg x{n}" in reports["enhanced-seg"][site].summary()
    assert {r["input_forms"] for r in _qc(root / "cache" / "classic-nifti" / site).values()} == {
        "t2=classic dwi=classic adc=classic mask=nifti"}


@pytest.mark.parametrize("site", SITES)
def test_rtstruct_rasterises_to_the_voxel_mask(forms, site):
    root, reports = forms
    assert reports["classic-rtstruct"][site].included == reports["classic-nifti"][site].included
    masks = sorted((root / "classic-rtstruct" / site / "masks").glob("*.dcm"))
    assert masks and not any(p.name.startswith(("P1", "P2")) for p in masks)  # no patient ID in the names
    for p in masks:
        pid = read_headers(p)[0].patient_id
        ref = sitk.ReadImage(str(root / "classic-nifti" / site / "masks" / f"{pid}.nii.gz"))
        got, notes = read_roi(MaskSource("rtstruct", p), ref, ("GTV",))
        a, b = sitk.GetArrayViewFromImage(ref) > 0, sitk.GetArrayViewFromImage(got) > 0
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= 0.95, (pid, dice)
    a, b = _cache(root / "cache" / "classic-nifti" / site), _cache(root / "cache" / "classic-rtstruct" / site)
    for pid in a:
        diff = np.abs(a[pid]["image"] - b[pid]["image"])
        assert diff.mean(axis=(1, 2)).max() <= 0.02 and np.percentile(diff, 99) <= 0.06, pid
        assert a[pid]["label"] == b[pid]["label"]
    assert {r["input_forms"] for r in _qc(root / "cache" / "classic-rtstruct" / site).values()} == {
        "t2=classic dwi=classic adc=classic mask=rtstruct"}


def test_legacy_converted_enhanced_reads_like_classic(forms, tmp_path):
    """highdicom's Legacy Converted Enhanced MR of one patient's T2 and multi-b DWI (b-values then
    sit in the unassigned per-frame converted attributes) gives the classic patient's cache exactly."""
    import highdicom as hd

    root, _ = forms
    site = tmp_path / "site"
    shutil.copytree(root / "classic-nifti" / "center-external", site)
    pid = "P2-0001"
    for number in (2, 4):
        files = [p for p in sorted((site / "dicom").rglob("*")) if p.is_file()]
        dss = [(p, pydicom.dcmread(p)) for p in files]
        dss = [(p, d) for p, d in dss if d.PatientID == pid and int(d.SeriesNumber) == number]
        lc = hd.legacy.LegacyConvertedEnhancedMRImage(
            [d for _, d in dss], series_instance_uid=dss[0][1].SeriesInstanceUID, series_number=number,
            sop_instance_uid=hd.UID(), instance_number=1)
        for p, _ in dss:
            p.unlink()
        lc.save_as(dss[0][0].parent / f"LC{number}")
    cfg = load_config(cli={"workers": 1})
    prepare_site(site, tmp_path / "cache", cfg, progress=False)
    qc = _qc(tmp_path / "cache")
    assert qc[pid]["status"] == "included", qc[pid]["reason"]
    assert qc[pid]["input_forms"] == "t2=legacy-enhanced dwi=legacy-enhanced adc=classic mask=nifti"
    want = _cache(root / "cache" / "classic-nifti" / "center-external")[pid]
    np.testing.assert_array_equal(_cache(tmp_path / "cache")[pid]["image"], want["image"])


def _rewrite(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _find(site: Path, pid: str, modality: str) -> Path:
    for p in sorted(site.rglob("*")):
        if p.is_file() and p.suffix != ".gz" and p.name != "clinical.csv":
            ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
            if ds.get("PatientID") == pid and ds.get("Modality") == modality:
                return p
    raise AssertionError(f"no {modality} of {pid}")


@pytest.fixture(scope="module")
def bad(forms, tmp_path_factory):
    root, _ = forms
    tmp = tmp_path_factory.mktemp("bad-forms")
    rs = tmp / "rtstruct"
    shutil.copytree(root / "classic-rtstruct" / "center-primary", rs)
    _rewrite(_find(rs, "P1-0001", "RTSTRUCT"), lambda d: setattr(d.StructureSetROISequence[0], "ROIName", "Rectum wall"))

    def shift(d):  # every contour 300 mm to the patient's left: outside the T2 field of view
        for c in d.ROIContourSequence[0].ContourSequence:
            pts = [float(v) for v in c.ContourData]
            c.ContourData = [f"{v + 300 if i % 3 == 0 else v:.3f}" for i, v in enumerate(pts)]
    _rewrite(_find(rs, "P1-0002", "RTSTRUCT"), shift)
    own = _find(rs, "P1-0003", "RTSTRUCT")
    own.unlink()
    other = rs / "masks" / "RS-copy.dcm"  # P1-0004's contours, labelled as P1-0003's
    shutil.copy(_find(rs, "P1-0004", "RTSTRUCT"), other)
    _rewrite(other, lambda d: (setattr(d, "PatientID", "P1-0003"), setattr(d, "SOPInstanceUID", pydicom.uid.generate_uid())))

    en = tmp / "enhanced"
    shutil.copytree(root / "enhanced-seg" / "center-external", en)
    t2 = next(p for p in sorted((en / "dicom").rglob("*")) if p.is_file() and p.parent.name == "Se2"
              and pydicom.dcmread(p, stop_before_pixels=True).PatientID == "P2-0001")
    data = t2.read_bytes()
    t2.write_bytes(data[: len(data) - 3000])  # a cut-short multi-frame copy
    own = _find(en, "P2-0002", "SEG")
    own.unlink()
    other = own.parent / "SEG-copy"
    shutil.copy(_find(en, "P2-0003", "SEG"), other)  # P2-0003's SEG, relabelled as P2-0002's
    _rewrite(other, lambda d: (setattr(d, "PatientID", "P2-0002"), setattr(d, "SOPInstanceUID", pydicom.uid.generate_uid())))
    # a DICOMDIR made by pydicom over one patient's files: skipped and counted, nothing else changes
    from pydicom.fileset import FileSet

    fs = FileSet()
    for p in sorted((en / "dicom").rglob("*")):
        if p.is_file() and pydicom.dcmread(p, stop_before_pixels=True).PatientID == "P2-0004":
            fs.add(p)
    fs.write(tmp / "media")
    shutil.copy(tmp / "media" / "DICOMDIR", en / "dicom" / "DICOMDIR")
    cfg = load_config(cli={"workers": 1})
    reps = {k: prepare_site(tmp / k, tmp / f"cache-{k}", cfg, progress=False) for k in ("rtstruct", "enhanced")}
    return tmp, reps


@pytest.mark.parametrize("kind, pid, reason", [
    ("rtstruct", "P1-0001", "mask: RTSTRUCT has no ROI named like GTV, tumor, tumour, lesion (ROIs: 'Rectum wall')"),
    ("rtstruct", "P1-0002", "mask: RTSTRUCT ROI 'GTV' does not overlap the T2 volume (contours enclose no T2 voxel"),
    ("rtstruct", "P1-0003", "mask: 1 DICOM RTSTRUCT object(s) with this PatientID reference no series of this patient"),
    ("enhanced", "P2-0001", "T2WI: series 2 'Ax T2 FRFSE': 1 truncated multi-frame DICOM file(s)"),
    ("enhanced", "P2-0002", "mask: 1 DICOM SEG object(s) with this PatientID reference no series of this patient"),
])
def test_bad_export_forms_have_their_reason(bad, kind, pid, reason):
    tmp, _ = bad
    row = _qc(tmp / f"cache-{kind}")[pid]
    assert row["status"] == "excluded" and row["reason"].startswith(reason), row["reason"]


def test_good_patients_survive_bad_forms_and_dicomdir_is_skipped(bad):
    tmp, reps = bad
    assert reps["rtstruct"].included == 5 and reps["enhanced"].included == 2  # P1-0004..8; P2-0003, P2-0004
    assert any(r.startswith("DICOMDIR") for r in reps["enhanced"].skipped_files), reps["enhanced"].skipped_files
    # the copied DICOMDIR points at the media folder's file names: flagged as an incomplete copy
    (line,) = reps["enhanced"].dicomdir
    assert "1 patient(s), 1 study(ies), 4 series, 4 file(s) listed; 4 of them MISSING" in line
    assert line in reps["enhanced"].warnings
    assert dicomdir_summary(str(tmp / "media" / "DICOMDIR"), tmp) == (
        "DICOMDIR media/DICOMDIR: 1 patient(s), 1 study(ies), 4 series, 4 file(s) listed, all present; "
        "layout taken from the image headers", True)
    qc = _qc(tmp / "cache-enhanced")
    assert qc["P2-0004"]["status"] == "included" and qc["P2-0004"]["input_forms"].endswith("mask=seg")


def test_roi_names_come_from_the_site_config(bad, tmp_path):
    tmp, _ = bad
    cfg = load_config(cli={"workers": 1, "roi-names": "rectum wall"})
    prepare_site(tmp / "rtstruct", tmp_path / "cache", cfg, progress=False)
    qc = _qc(tmp_path / "cache")
    assert qc["P1-0001"]["status"] == "included" and "RTSTRUCT ROI 'Rectum wall'" in qc["P1-0001"]["notes"]
    assert qc["P1-0004"]["reason"].startswith("mask: RTSTRUCT has no ROI named like rectum wall (ROIs: 'GTV')")


def test_fill_polygons_even_odd_at_voxel_centres():
    square = np.array([[1.5, 1.5], [5.5, 1.5], [5.5, 5.5], [1.5, 5.5]])  # (column, row) indices
    hole = np.array([[2.5, 2.5], [4.5, 2.5], [4.5, 4.5], [2.5, 4.5]])
    m = fill_polygons([square], 8, 8)
    assert m.sum() == 16 and m[2:6, 2:6].all()
    m = fill_polygons([square, hole], 8, 8)
    assert m.sum() == 12 and not m[3:5, 3:5].any()
    assert not fill_polygons([square + 20], 8, 8).any()
    tri = np.array([[0.0, 0.0], [7.0, 0.0], [0.0, 7.0]])  # centres on the hypotenuse: half-open rule
    assert fill_polygons([tri], 8, 8).sum() == sum(range(1, 8))


def test_roi_name_matching_is_whole_word_and_ordered():
    assert match_roi_name(["PTV", "GTV_rectum"], ("GTV", "tumor")) == (1, "GTV_rectum")
    assert match_roi_name(["Tumour bed", "gtv 1"], ("GTV", "tumour")) == (1, "gtv 1")
    assert match_roi_name(["GTVx", "PTV", "CTV"], ("GTV",)) is None


def test_rerun_of_an_enhanced_seg_site_reads_nothing_again(forms):
    """The scan index keeps every frame's record and the SEG's references: nothing is re-read or rebuilt."""
    root, reports = forms
    site = "center-external"
    cfg = load_config(cli={"workers": 1})
    rep = prepare_site(root / "enhanced-seg" / site, root / "cache" / "enhanced-seg" / site, cfg, progress=False)
    first = reports["enhanced-seg"][site]
    assert (rep.parsed_files, rep.redone, rep.included) == (0, 0, first.included)
    assert (rep.mask_objects, rep.dicom_files) == (first.mask_objects, first.dicom_files)


def test_fractional_seg_is_cut_at_half(forms, tmp_path):
    """A FRACTIONAL SEG (occupancy 0.8 inside, written by highdicom on the enhanced T2) reads back as
    the binary SEG's mask; a segment named 'tumour' is found by the default roi-names."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from client.volumes import read_volume

    root, _ = forms
    site = root / "enhanced-seg" / "center-external"
    files = [p for p in sorted((site / "dicom").rglob("*")) if p.is_file()]
    heads = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in files}
    pid = "P2-0003"
    t2_path = next(p for p, d in heads.items() if d.PatientID == pid and d.Modality == "MR" and int(d.SeriesNumber) == 2)
    seg_path = next(p for p, d in heads.items() if d.PatientID == pid and d.Modality == "SEG")
    t2, _ = read_volume(read_headers(t2_path), "t2")
    binary, _ = read_roi(MaskSource("seg", seg_path), t2, ("GTV",))
    m = sitk.GetArrayFromImage(binary)
    src = pydicom.dcmread(t2_path)
    idx = [int(round(t2.TransformPhysicalPointToContinuousIndex(
        [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])[2])) for fg in src.PerFrameFunctionalGroupsSequence]
    frac = np.stack([m[k] for k in idx]).astype(np.float32) * 0.8
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="tumour", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    hd.seg.Segmentation([src], frac, "FRACTIONAL", [desc], hd.UID(), 91, hd.UID(), 1, "x", "x", "1", "0").save_as(
        tmp_path / "frac.dcm")
    got, notes = read_roi(MaskSource("seg", tmp_path / "frac.dcm"), t2, ("GTV", "tumor", "tumour", "lesion"))
    assert notes == ["mask: DICOM SEG segment 'tumour'"] and m.sum() > 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), m)


def _seg_source(forms):
    """P2-0003's enhanced T2 (dataset and volume), its SEG's mask on the T2 grid and, per T2 frame,
    that mask's slice: the material for SEGs written by highdicom in other forms."""
    from client.volumes import read_volume

    root, _ = forms
    site = root / "enhanced-seg" / "center-external"
    heads = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((site / "dicom").rglob("*")) if p.is_file()}
    t2_path = next(p for p, d in heads.items() if d.PatientID == "P2-0003" and d.Modality == "MR" and int(d.SeriesNumber) == 2)
    seg_path = next(p for p, d in heads.items() if d.PatientID == "P2-0003" and d.Modality == "SEG")
    t2, _ = read_volume(read_headers(t2_path), "t2")
    m = sitk.GetArrayFromImage(read_roi(MaskSource("seg", seg_path), t2, ("GTV",))[0])
    src = pydicom.dcmread(t2_path)
    idx = [int(round(t2.TransformPhysicalPointToContinuousIndex(
        [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])[2])) for fg in src.PerFrameFunctionalGroupsSequence]
    return src, t2, seg_path, m, np.stack([m[k] for k in idx])


def _write_seg(path: Path, src, frames: np.ndarray, kind: str, labels: list[str]) -> Path:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descs = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=label, segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for i, label in enumerate(labels)]
    hd.seg.Segmentation([src], frames, kind, descs, hd.UID(), 91, hd.UID(), 1, "x", "x", "1", "0").save_as(path)
    return path


def _both_readers(path: Path, t2, names=("GTV",)):
    """(image array, notes) or the VolumeError text, from the pydicom reader and from highdicom's."""
    from client.masks import _read_seg, _read_seg_highdicom
    from client.volumes import VolumeError

    out = []
    for read in (_read_seg, _read_seg_highdicom):
        try:
            img, notes = read(path, t2, names)
        except VolumeError as exc:
            out.append(str(exc))
            continue
        assert img.GetSize() == t2.GetSize() and img.GetOrigin() == t2.GetOrigin()
        assert img.GetPixelID() == sitk.sitkUInt8
        out.append((sitk.GetArrayFromImage(img), notes))
    return out


def test_seg_reader_agrees_with_highdicom(forms, tmp_path):
    """The pydicom SEG reader (client/masks.py _seg_frames) gives highdicom's mask and notes for every
    segmentation type: BINARY with two segments and the empty frames left out (the ROI segment second),
    FRACTIONAL (cut at half) and LABELMAP; the synthetic cohort's own SEGs are covered by the cache test."""
    from client.masks import _seg_frames

    src, t2, _, m, per_frame = _seg_source(forms)
    other = np.zeros_like(per_frame)
    other[:, :8, :8] = 1  # a 'Rectum wall' segment in the corner, on every frame
    cases = {
        "binary": _write_seg(tmp_path / "b.dcm", src, np.stack([other, per_frame], axis=-1), "BINARY", ["Rectum wall", "GTV"]),
        "fractional": _write_seg(tmp_path / "f.dcm", src, per_frame.astype(np.float32) * 0.8, "FRACTIONAL", ["GTV"]),
        "labelmap": _write_seg(tmp_path / "l.dcm", src, np.where(per_frame > 0, 2, other).astype(np.uint8), "LABELMAP",
                               ["Rectum wall", "GTV"]),
    }
    assert pydicom.dcmread(cases["binary"]).NumberOfFrames < 2 * len(per_frame)  # empty frames were left out
    for name, path in cases.items():
        ds = pydicom.dcmread(path)
        gtv = next(int(x.SegmentNumber) for x in ds.SegmentSequence if x.SegmentLabel == "GTV")
        assert _seg_frames(ds, gtv, "x")[0].any(), name  # taken by the pydicom reader, not handed to highdicom
        (fast, fast_notes), (slow, slow_notes) = _both_readers(path, t2)
        np.testing.assert_array_equal(fast, slow, err_msg=name)
        np.testing.assert_array_equal(fast, m, err_msg=name)
        assert fast_notes == slow_notes == ["mask: DICOM SEG segment 'GTV'"], name


def test_seg_reader_agrees_with_highdicom_off_the_t2(forms, tmp_path):
    """A SEG moved by whole voxels partly out of the T2 field of view: the same voxels kept and the same
    note; moved by half a voxel, or with another pixel spacing: refused by both readers."""
    src, t2, seg_path, m, _ = _seg_source(forms)
    ds = pydicom.dcmread(seg_path)
    row_dir = np.array([float(v) for v in ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient[:3]])
    col_spacing = float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1])
    cols = np.nonzero(m.any(axis=(0, 1)))[0]
    shift = t2.GetSize()[0] - int((cols.min() + cols.max()) // 2)  # the ROI's centre column onto the edge

    def moved(name: str, voxels: float, spacing_factor: float = 1.0) -> Path:
        d = pydicom.dcmread(seg_path)
        for fg in d.PerFrameFunctionalGroupsSequence:
            pos = fg.PlanePositionSequence[0]
            pos.ImagePositionPatient = [f"{v:.4f}" for v in np.array([float(x) for x in pos.ImagePositionPatient])
                                        + row_dir * col_spacing * voxels]
        pm = d.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        pm.PixelSpacing = [f"{float(v) * spacing_factor:g}" for v in pm.PixelSpacing]
        d.save_as(tmp_path / name)
        return tmp_path / name

    (fast, fast_notes), (slow, slow_notes) = _both_readers(moved("part", shift), t2)
    np.testing.assert_array_equal(fast, slow)
    assert 0 < fast.sum() < m.sum() and fast_notes == slow_notes and "lies outside the T2 volume and was dropped" in fast_notes[1]
    fast, slow = _both_readers(moved("gone", 3 * t2.GetSize()[0]), t2)
    assert fast == slow == "DICOM SEG segment 'GTV' lies entirely outside the T2 volume"
    fast, slow = _both_readers(moved("half", 0.5), t2)
    assert fast == slow == "DICOM SEG segment 'GTV' is not on the T2 voxel grid (its voxel centres fall between the T2's)"
    fast, slow = _both_readers(moved("coarse", 0, spacing_factor=2), t2)
    assert "does not match the T2 series' voxels" in fast and "differs from the T2 series'" in slow


def test_seg_reader_hands_unusual_objects_to_highdicom(forms, tmp_path):
    """A SEG whose frames carry no plane position of their own goes to highdicom, with its answer (here:
    refused, highdicom's reason); a damaged SEG is one patient's clear reason, never a crash."""
    from client.masks import _read_seg, _seg_frames
    from client.volumes import VolumeError

    src, t2, seg_path, _, per_frame = _seg_source(forms)
    d = pydicom.dcmread(seg_path)
    for fg in d.PerFrameFunctionalGroupsSequence:
        del fg.PlanePositionSequence
    d.save_as(tmp_path / "nopos.dcm")
    d = pydicom.dcmread(_write_seg(tmp_path / "frac.dcm", src, per_frame.astype(np.float32) * 0.8, "FRACTIONAL", ["GTV"]))
    del d.MaximumFractionalValue  # no scale for the fractions
    d.save_as(tmp_path / "noscale.dcm")
    for name in ("nopos.dcm", "noscale.dcm"):
        assert _seg_frames(pydicom.dcmread(tmp_path / name), 1, "x") is None, name
        fast, slow = _both_readers(tmp_path / name, t2)
        assert fast == slow and fast.startswith(("DICOM SEG could not be read (", "DICOM SEG segment 'GTV' cannot be placed")), fast
    data = seg_path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 200])
    with pytest.raises(VolumeError, match=r"^DICOM SEG could not be read \("):
        _read_seg(tmp_path / "cut.dcm", t2, ("GTV",))


def test_enhanced_frames_without_plane_position_are_named(forms, tmp_path):
    """Geometry comes only from the functional groups: without them the series is refused, by name."""
    from client.volumes import VolumeError, read_volume

    root, _ = forms
    t2_path = next(p for p in sorted((root / "enhanced-seg" / "center-external" / "dicom").rglob("*"))
                   if p.is_file() and p.parent.name == "Se2")
    ds = pydicom.dcmread(t2_path)
    for fg in ds.PerFrameFunctionalGroupsSequence:
        del fg.PlanePositionSequence
    ds.save_as(tmp_path / "t2")
    recs = read_headers(tmp_path / "t2")
    assert len(recs) == ds.NumberOfFrames and {r.frame for r in recs} == set(range(len(recs)))
    with pytest.raises(VolumeError, match="frames lack PlanePositionSequence / PlaneOrientationSequence"):
        read_volume(recs, "t2")


def test_frame_values_come_from_the_frame_else_the_shared_group(forms, tmp_path):
    """Each attribute from the frame's own functional group, else the shared one (an empty value counts
    as absent); b-values from the binary FD; per-direction frames dropped where the trace is there."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    root, _ = forms
    dwi_path = next(p for p in sorted((root / "enhanced-seg" / "center-external" / "dicom").rglob("*"))
                    if p.is_file() and p.parent.name == "Se4")
    ds = pydicom.dcmread(dwi_path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.PixelValueTransformationSequence[0].RescaleSlope = "3"
    shared.PixelValueTransformationSequence[0].RescaleIntercept = "7"
    per = ds.PerFrameFunctionalGroupsSequence
    assert [per[i].MRDiffusionSequence[0].DiffusionDirectionality for i in (0, 1, 4)] == ["NONE", "DIRECTIONAL", "ISOTROPIC"]
    own = Dataset()
    own.RescaleSlope, own.RescaleIntercept = "2", ""  # a slope of its own, the intercept empty: the shared one
    per[0].PixelValueTransformationSequence = Sequence([own])
    per[4].PixelMeasuresSequence = Sequence([Dataset()])
    per[4].PixelMeasuresSequence[0].PixelSpacing = ["0.5", "0.25"]
    ds.save_as(tmp_path / "dwi")
    recs = {r.frame: r for r in read_headers(tmp_path / "dwi")}
    kept = [i for i, fg in enumerate(per) if fg.MRDiffusionSequence[0].DiffusionDirectionality != "DIRECTIONAL"]
    assert sorted(recs) == kept and len(kept) < len(per)
    assert [recs[i].bvalue for i in kept] == [float(per[i].MRDiffusionSequence[0].DiffusionBValue) for i in kept]
    assert {recs[i].bvalue for i in kept} == {0.0, 1000.0}
    assert (recs[0].slope, recs[0].intercept) == (2.0, 7.0) and (recs[4].slope, recs[4].intercept) == (3.0, 7.0)
    shared_ps = tuple(float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    assert recs[4].pixel_spacing == (0.5, 0.25) and {recs[i].pixel_spacing for i in kept if i != 4} == {shared_ps}
    assert recs[4].ipp == tuple(float(v) for v in per[4].PlanePositionSequence[0].ImagePositionPatient)


def test_dicom_mask_choice_and_reasons():
    from client.dicom_scan import RTSTRUCT_STORAGE, SEG_STORAGE, FileRecord
    from client.masks import dicom_candidates

    def obj(cls, sop, *refs):
        return FileRecord(path=sop, size=1, mtime_ns=1, patient_id="P", study_uid="S", series_uid="X" + sop,
                          sop_uid=sop, sop_class=cls, ref_series=refs)

    rs, seg_a, seg_b = obj(RTSTRUCT_STORAGE, "1", "T2"), obj(SEG_STORAGE, "3", "T2"), obj(SEG_STORAGE, "2", "T2")
    hits, why = dicom_candidates([rs, seg_a, seg_b], "T2", {"T2", "DWI"})
    assert [h.sop_uid for h in hits] == ["2", "3", "1"] and why == ""
    hits, why = dicom_candidates([obj(SEG_STORAGE, "4", "DWI")], "T2", {"T2", "DWI"})
    assert hits == [] and "not the T2WI used" in why
    hits, why = dicom_candidates([obj(SEG_STORAGE, "5", "OTHER")], "T2", {"T2", "DWI"})
    assert hits == [] and why.startswith("1 DICOM SEG object(s) with this PatientID reference no series of this patient")
    assert dicom_candidates([], "T2", {"T2"}) == ([], "")


# ---- the site's patient order (client/cache.py patient_order): by patient_id, not by salt or form -----
def _ids(cache: Path) -> dict[str, str]:
    with open(id_map_path(cache), newline="", encoding="utf-8") as fh:
        return {r["patient_key"]: r["patient_id"] for r in csv.DictReader(fh)}


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text("utf-8"))


def test_patient_order_and_folds_follow_patient_id_not_salt_or_form(forms, tmp_path):
    """Every form of the cohort, and the classic + NIfTI one prepared again under a new salt, loads its
    patients in patient_id order and so gets the same CV folds. The content order used before would
    not: the RTSTRUCT crops differ slightly from the NIfTI ones (the #11 CF AUC 0.866 vs 0.840)."""
    root, _ = forms
    cfg = load_config(cli={"workers": 1})
    folds = {}
    for site in SITES:
        caches = {name: root / "cache" / name / site for name in FORMS}
        caches["classic-nifti-resalted"] = tmp_path / "resalted" / site
        prepare_site(root / "classic-nifti" / site, caches["classic-nifti-resalted"], cfg, progress=False)
        assert len({_manifest(c)["salt"] for c in caches.values()}) == len(caches)
        want = sorted(_ids(caches["classic-nifti"]).values())
        for name, cache in caches.items():
            ids, data = _ids(cache), load_cache(cache)
            assert [ids[k] for k in data.keys] == want, name
            assert {ids[k]: e["order"] for k, e in _manifest(cache)["patients"].items()} == {
                pid: i for i, pid in enumerate(want)}, name
            if site == "center-primary":  # the tiny external site has one SLM patient: no stratified folds
                folds[name] = Site({"cache-dir": str(cache)}, data, tmp_path / "study").fold_ids(2, seed=7).tolist()
    assert len(folds) == len(FORMS) + 1 and len({tuple(f) for f in folds.values()}) == 1, folds
    assert sorted(set(folds["classic-nifti"])) == [0, 1]
    a, b = (load_cache(root / "cache" / name / "center-primary") for name in ("classic-nifti", "classic-rtstruct"))
    legacy = [patient_order("-", list(range(len(d))), [None] * len(d), d.images, d.clinical, d.labels) for d in (a, b)]
    assert legacy[0] != legacy[1]  # the fixture exercises what the order field fixes


def test_patient_order_is_recomputed_on_an_incremental_prepare(forms, tmp_path):
    """A patient added to a prepared site shifts the others' rank: the reused entries get theirs anew."""
    root, _ = forms
    site, cache, aside = tmp_path / "site", tmp_path / "cache", tmp_path / "aside"
    shutil.copytree(root / "classic-nifti" / "center-primary", site)
    pid = "P1-0004"
    aside.mkdir()
    shutil.move(site / "dicom" / pid, aside / "dicom")
    shutil.move(site / "masks" / f"{pid}.nii.gz", aside / "mask.nii.gz")
    rows = (site / "clinical.csv").read_text("utf-8").splitlines(keepends=True)
    (site / "clinical.csv").write_text("".join(r for r in rows if not r.startswith(pid + ",")), "utf-8")
    cfg = load_config(cli={"workers": 1})
    first = prepare_site(site, cache, cfg, progress=False)
    assert first.included == len(rows) - 2  # header and the patient set aside
    shutil.move(aside / "dicom", site / "dicom" / pid)
    shutil.move(aside / "mask.nii.gz", site / "masks" / f"{pid}.nii.gz")
    (site / "clinical.csv").write_text("".join(rows), "utf-8")
    rep = prepare_site(site, cache, cfg, progress=False)
    assert (rep.reused, rep.redone, rep.included) == (first.included, 1, first.included + 1)
    ids = _ids(cache)
    want = sorted(ids.values())
    assert {ids[k]: e["order"] for k, e in _manifest(cache)["patients"].items()} == {p: i for i, p in enumerate(want)}
    assert [ids[k] for k in load_cache(cache).keys] == want


def test_cache_without_order_loads_in_its_former_content_order(forms, tmp_path):
    """A cache prepared before the order field keeps loading as it did (hash of each patient's content);
    a manifest where only some patients, or two patients with one rank, have an order is refused."""
    root, _ = forms
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache" / "classic-rtstruct" / "center-primary", cache)
    manifest = _manifest(cache)
    for e in manifest["patients"].values():
        e.pop("order")
    atomic_write_json(cache / "manifest.json", manifest)
    content = {}
    for p in (cache / "patients").glob("*.npz"):
        with np.load(p) as z:
            content[p.stem] = hashlib.sha256(z["image"].astype(np.float32).tobytes() + z["clinical"].astype(np.float32).tobytes()
                                             + bytes([int(z["label"]) & 0xFF])).hexdigest()
    assert load_cache(cache).keys == sorted(content, key=content.get)

    keys = sorted(manifest["patients"])
    manifest["patients"][keys[0]]["order"] = 0
    atomic_write_json(cache / "manifest.json", manifest)
    with pytest.raises(CacheError, match=f"patient {keys[1]} has order None"):
        load_cache(cache)
    for i, k in enumerate(keys):
        manifest["patients"][k]["order"] = min(i, 3)
    atomic_write_json(cache / "manifest.json", manifest)
    with pytest.raises(CacheError, match="more than one included patient has order 3"):
        load_cache(cache)
