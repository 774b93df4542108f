"""prepare on files that real scanners wrote (tests/real_scanner.py says which, and what is changed),
plus the vendor forms and directional DWI that only the project's imitations cover.

Real files: Siemens Prisma mosaic DWI (b = 5 x 2, b = 1500, heudiconv's sdist), Siemens TrioTim mosaic
DTI (b = 0 / 1000, blanked pixels) and an un-unpackable TrioTim mosaic (nibabel's wheel).
Imitations (simulation/synth/dicom.py): classic directional DWI with the Siemens CSA / GE / Philips
private b-value and direction forms, a TRACEW series beside per-direction images, the synthetic cohort's
mosaic export.
"""
from __future__ import annotations

import csv
import struct

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from client import prepare as prepare_mod
from client.dicom_scan import FileRecord, read_headers, read_mosaic_tiles
from client.prepare import prepare_site
from client.series import SeriesRules, group_series, select_sequences
from client.volumes import (VolumeError, check_stack, crop_to_roi, load_mask, read_diffusion, read_volume,
                            split_diffusion)
from common.config import load_config
from tests import real_scanner as rs


def _nib(path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import dicomwrappers
    return dicomwrappers.wrapper_from_data(pydicom.dcmread(path))


def _check_against_nibabel(path, b_expected):
    recs = read_headers(path)
    w = _nib(path)
    rows, cols, n = w.image_shape
    assert len(recs) == n == w.n_mosaic and {(r.rows, r.cols) for r in recs} == {(rows, cols)}
    assert [r.tile for r in recs] == list(range(n))
    aff = np.asarray(w.affine)
    for k in (0, 1, n // 2, n - 1):  # each slice where nibabel's affine puts voxel (0, 0, k)
        np.testing.assert_allclose(recs[k].ipp, aff[:3, 3] + k * aff[:3, 2], atol=1e-4)
    ordered, step, _ = check_stack(recs, "dwi")
    assert step == pytest.approx(w.voxel_sizes[2], abs=1e-4)
    assert recs[0].bvalue == pytest.approx(b_expected)
    return recs, w


def test_real_prisma_mosaic_unpacks_like_nibabel(tmp_path):
    b5, _, b1500 = rs.heudiconv_files(tmp_path, rs.HEUDICONV_DWI)
    recs, w = _check_against_nibabel(b1500, 1500)
    assert len(recs) == 81 and (recs[0].rows, recs[0].cols) == (152, 150)
    assert recs[0].directionality == "DIRECTIONAL" and recs[0].direction
    # pixels: each tile is its block of the 1368 x 1350 image, row by row (independent of nibabel)
    raw = pydicom.dcmread(b1500).pixel_array.astype(np.float32)
    img, _ = read_volume(recs, "dwi")
    arr = sitk.GetArrayFromImage(img)
    assert arr.shape == (81, 152, 150)
    order = np.argsort([np.dot(np.cross(r.iop[:3], r.iop[3:]), r.ipp) for r in recs], kind="stable")
    for z, k in [(0, int(order[0])), (40, int(order[40])), (80, int(order[80]))]:
        r, c = divmod(k, 9)
        np.testing.assert_array_equal(arr[z], raw[r * 152:(r + 1) * 152, c * 150:(c + 1) * 150])
    # the pydicom path (compressed / big-endian files) unpacks the same tiles as the raw path
    slow = [FileRecord.from_json(r.to_json()) for r in recs]
    for r in slow:
        r.pixel_offset = -1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(slow, "dwi")[0]), arr)
    # b-value from the CSA header alone: (0019,100C) and SequenceName removed
    bare = rs.relabel(b1500, tmp_path / "bare.dcm", "X", "1.2.3", drop=(0x0019100C, 0x00180024))
    assert read_headers(bare)[0].bvalue == pytest.approx(1500)
    # the SequenceName fallback "ep_b1500#2" alone: CSA and (0019,100C) removed
    name_only = rs.relabel(b1500, tmp_path / "name.dcm", "X", "1.2.3", drop=(0x0019100C, 0x00291010, 0x00291020))
    rec = read_headers(name_only)  # the tile count then comes from (0019,100A)
    assert len(rec) == 81 and rec[0].bvalue == 1500 and rec[0].direction == "#2"
    # a tiled image never passes as one slice: without ImageType MOSAIC (CSA count + matrix multiple) ...
    no_tag = rs.relabel(b1500, tmp_path / "notag.dcm", "X", "1.2.3",
                        changes={"ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND"]})
    assert len(read_headers(no_tag)) == 81
    # ... and with ImageType MOSAIC but no CSA tile count it is refused with that reason
    no_csa = rs.relabel(b1500, tmp_path / "nocsa.dcm", "X", "1.2.3", drop=(0x00291010, 0x0019100A))
    refused = read_headers(no_csa)
    assert len(refused) == 1 and "NumberOfImagesInMosaic" in refused[0].refused
    with pytest.raises(VolumeError, match="could not be unpacked"):
        read_volume(refused, "dwi")
    # two b = 5 averages of one direction: the b0 is their mean
    b5b = rs.heudiconv_files(tmp_path, rs.HEUDICONV_DWI[1:2])[0]
    rec5 = [r for p in (b5, b5b) for r in read_headers(p)]
    groups, _ = split_diffusion(rec5)
    assert len(groups) == 1 and len(groups[0]) == 2
    img5, notes = read_diffusion(rec5, "b5", 5.0)
    want = (read_mosaic_tiles(read_headers(b5)[0]).astype(np.float64) + read_mosaic_tiles(read_headers(b5b)[0])) / 2
    got = sitk.GetArrayFromImage(img5)
    np.testing.assert_allclose(got, want[np.argsort([np.dot(np.cross(r.iop[:3], r.iop[3:]), r.ipp)
                                                      for r in read_headers(b5)], kind="stable")], rtol=1e-6)
    assert any("2 repeated" in n for n in notes)


def test_real_triotim_mosaic_unpacks_like_nibabel_and_refuses_what_it_cannot(tmp_path):
    recs, w = _check_against_nibabel(rs.nibabel_file("siemens_dwi_1000.dcm.gz", tmp_path), 1000)
    assert len(recs) == 48 and recs[0].direction == "+1.00,+0.01,-0.01"
    _check_against_nibabel(rs.nibabel_file("siemens_dwi_0.dcm.gz", tmp_path), 0)
    bad = read_headers(rs.nibabel_file("0.dcm", tmp_path))  # 256 x 256 pixels cannot hold 48 tiles of 128 x 128
    assert len(bad) == 1 and "could not be unpacked" in bad[0].refused and "7 x 7" in bad[0].refused
    with pytest.raises(VolumeError, match="could not be unpacked"):
        read_volume(bad, "dwi")


def _site_rows(cache):
    ids = {r["patient_key"]: r["patient_id"] for r in csv.DictReader(open(str(cache) + "-id-map.csv"))}
    return {ids[r["patient_key"]]: r for r in csv.DictReader(open(cache / "qc.csv"))}


def test_real_file_site(tmp_path, monkeypatch):
    """A site of real mosaic DWI: the overlapping patient is included with the tile-correct DWI; the
    others are excluded with their true cause; no traceback."""
    b5a, b5b, b1500 = rs.heudiconv_files(tmp_path, rs.HEUDICONV_DWI)
    site = tmp_path / "site"
    # RS01: Prisma b5 x2 + b1500 (one series), T2 on the DWI's slice grid (pixels: the b = 5 tiles)
    tiles = rs.mosaic_patient(site, "RS01", [b5a, b5b, b1500])
    # RS02: the same DWI, the T2 300 mm to the patient's left: no overlap in scanner coordinates
    rs.mosaic_patient(site, "RS02", [b5a, b5b, b1500], shift_mm=(300.0, 0.0, 0.0))
    # RS03: TrioTim b0 / b1000 mosaics whose pixels were blanked
    tt = [rs.nibabel_file(n, tmp_path) for n in ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz")]
    ramp = np.broadcast_to(np.arange(1, 49, dtype=np.float32)[:, None, None], (48, 128, 128)) * 10
    rs.mosaic_patient(site, "RS03", tt, t2_pixels=ramp)
    rs.write_clinical(site, ["RS01", "RS02", "RS03"])
    captured = {}
    real_transform = prepare_mod.build_input_transform

    def spy(*a, **k):
        inner = real_transform(*a, **k)

        def run(data):
            captured["data"] = {kk: (np.array(v) if isinstance(v, np.ndarray) else v) for kk, v in data.items()}
            return inner(data)
        return run

    monkeypatch.setattr(prepare_mod, "build_input_transform", spy)
    cache = tmp_path / "cache"
    rep = prepare_site(site, cache, load_config(cli={"workers": 1}), progress=False)
    rows = _site_rows(cache)
    assert rows["RS01"]["status"] == "included", rows["RS01"]["reason"]
    assert rows["RS01"]["input_forms"].startswith("t2=classic dwi=mosaic adc=mosaic")
    assert rows["RS01"]["adc"] == "computed from b=5 and b=1500"
    assert "one gradient direction only" in rows["RS01"]["notes"] and "2 repeated" in rows["RS01"]["notes"]
    assert rows["RS02"]["status"] == "excluded"
    assert "no overlap in scanner coordinates" in rows["RS02"]["reason"]
    assert rows["RS02"]["reason"].count(" to ") == 6  # both extents, x / y / z each
    assert rows["RS03"]["status"] == "excluded" and "every pixel is zero" in rows["RS03"]["reason"]
    assert "internal error" not in str(rows) and rep.included == 1
    # the DWI channel of RS01 is the b = 1500 volume, tile by tile: the T2 grid is the tiles' grid, so
    # resampling nibabel's own volume (its affine) onto the cropped T2 gives the same voxels
    data = captured["data"]
    w = _nib(b1500)
    vol = np.asarray(w.get_data(), np.float32)  # (rows, cols, slices)
    aff = np.asarray(w.affine)
    ref = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(vol, (2, 0, 1))))
    cols = [aff[:3, 1], aff[:3, 0], aff[:3, 2]]  # sitk x = column index = nibabel axis 1
    ref.SetSpacing([float(np.linalg.norm(c)) for c in cols])
    ref.SetOrigin([float(v) for v in aff[:3, 3]])
    ref.SetDirection(np.column_stack([c / np.linalg.norm(c) for c in cols]).ravel().tolist())
    assert data["dwi"].shape == data["t2"].shape and data["dwi"].shape[1:] != (1368, 1350)
    # the T2 crop prepare made, made again: the T2 as read, the mask on it, the same crop and orientation
    cfg = load_config(cli={"workers": 1})
    t2_full, _ = read_volume([r for p in sorted((site / "dicom" / "RS01" / "t2").iterdir()) for r in read_headers(p)], "t2")
    mask = load_mask(site / "masks" / "RS01.nii.gz", t2_full)
    mode = cfg["input-mode"]
    margin = cfg["crop-depth"] // 2 + 1 if mode == "3d" else cfg["context-slices"] if mode == "2.5d" else 0
    crop = sitk.DICOMOrient(crop_to_roi(t2_full, mask, cfg["fov-mm"], margin)[0], "LPS")
    assert np.array_equal(sitk.GetArrayFromImage(crop), data["t2"])
    expected = sitk.GetArrayFromImage(sitk.Resample(ref, crop, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    np.testing.assert_allclose(data["dwi"], expected, rtol=1e-4, atol=1e-2)
    assert np.corrcoef(data["dwi"].ravel(), expected.ravel())[0, 1] > 0.9999
    assert len(tiles) == 81

