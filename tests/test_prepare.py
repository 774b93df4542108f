"""`slmfed prepare` end to end on tiny synthetic sites: geometry, cache contract, re-runs, modes."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from test_prepare_fixtures import Grid, PatientSpec, make_site

from client.cache import CACHE_FORMAT_VERSION, id_map_path, load_cache
from client.prepare import local_dir, prepare_site
from common.clinical import FEATURE_NAMES, encode_row
from common.cli import main as slmfed
from common.config import load_config

FOV, SIZE = 48.0, 64
PX = FOV / SIZE  # mm per crop pixel
C = (SIZE - 1) / 2  # the crop centre, in pixels


def blob_centre(ch: np.ndarray, near: tuple[float, float], radius: int = 5, dark: bool = False) -> np.ndarray:
    """Intensity-weighted (row, col) centre of the blob within `radius` px of `near`."""
    r0, c0 = int(round(near[0])), int(round(near[1]))
    win = ch[r0 - radius: r0 + radius + 1, c0 - radius: c0 + radius + 1].astype(float)
    w = (np.median(win) - win) if dark else (win - np.median(win))
    w = np.clip(w, 0, None)
    assert w.sum() > 0, "no blob found near the expected place"
    rr, cc = np.mgrid[r0 - radius: r0 + radius + 1, c0 - radius: c0 + radius + 1]
    return np.array([(rr * w).sum() / w.sum(), (cc * w).sum() / w.sum()])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site") / "site"
    specs = [
        # lesion off-centre, a marker 10 mm to the patient's left (+x) and 6 mm anterior (-y) of it
        PatientSpec("A001", lesion=(4.0, -3.0, 0.0), markers=((14.0, -9.0, 0.0),)),
        # ADC computed from b=0/800 and b-values in Siemens private tags, another lesion position
        PatientSpec("A002", lesion=(-8.0, 5.0, 3.0), adc="computed", b_tag="siemens",
                    markers=((-8.0 - 12.0, 5.0 + 8.0, 3.0),)),
        # GE naming with GE private b-value tag and three b-values
        PatientSpec("A003", t2_desc="Ax T2 FRFSE", dwi_desc="DWI b1000", adc_desc="dADC", b_tag="ge",
                    bvalues=(0.0, 500.0, 1000.0), lesion=(0.0, 0.0, -3.0)),
        # Philips naming and private tag, DWI grid tilted by a different slice spacing and origin
        PatientSpec("A004", t2_desc="T2W_TSE_tra", dwi_desc="DWI_b0_1000_SENSE", adc_desc="dADC_DWI", b_tag="philips",
                    bvalues=(0.0, 1000.0), dwi=Grid((30, 30, 9), (2.0, 2.0, 3.5), (-31.0, -29.0, -16.0))),
    ]
    make_site(root, specs)
    cache = root.parent / "cache"
    report = prepare_site(root, cache, progress=False)
    return root, cache, report, specs


def by_id(cache):
    data = load_cache(cache)
    ids = dict(csv.reader(open(id_map_path(cache), encoding="utf-8")))
    return data, {ids[k]: i for i, k in enumerate(data.keys)}


def test_every_patient_included_with_the_right_sequences(site):
    _, cache, report, specs = site
    assert (report.patients, report.included, report.excluded) == (4, 4, 0)
    m = json.loads((cache / "manifest.json").read_text())
    seq = {e["sequences"]["t2"]: e["sequences"] for e in m["patients"].values()}
    assert seq["t2_tse_tra"]["dwi"] == "ep2d_diff_b0_800 b=800"
    assert seq["Ax T2 FRFSE"]["dwi"] == "DWI b1000 b=1000" and seq["Ax T2 FRFSE"]["adc"].startswith("scanner dADC")
    assert seq["T2W_TSE_tra"]["adc"].startswith("scanner dADC_DWI (x1e-06")
    adc = [e["sequences"]["adc"] for e in m["patients"].values()]
    assert adc.count("computed from b=0 and b=800") == 1


def test_lesion_lands_at_crop_centre_in_every_channel(site):
    _, cache, _, specs = site
    data, idx = by_id(cache)
    for spec in specs:
        img = data.images[idx[spec.patient_id]]
        for ch, dark in ((0, False), (1, False), (2, True)):
            got = blob_centre(img[ch], (C, C), dark=dark)
            assert np.abs(got - C).max() < 0.6, (spec.patient_id, ch, got)


def test_known_offset_lands_at_known_pixel_and_channels_align(site):
    _, cache, _, specs = site
    data, idx = by_id(cache)
    for spec in specs[:2]:
        img = data.images[idx[spec.patient_id]]
        dx, dy = np.subtract(spec.markers[0], spec.lesion)[:2]
        want = (C + dy / PX, C + dx / PX)  # rows follow +y (posterior), columns +x (left): LPS
        t2 = blob_centre(img[0], want, radius=3)
        dwi = blob_centre(img[1], want, radius=3)
        adc = blob_centre(img[2], want, radius=3, dark=True)
        assert np.abs(t2 - want).max() < 0.6, (spec.patient_id, t2, want)
        assert np.abs(dwi - t2).max() < 0.6 and np.abs(adc - t2).max() < 0.6, (t2, dwi, adc)


def test_intensity_ranges_and_adc_physical_scale(site):
    _, cache, _, specs = site
    data, idx = by_id(cache)
    img = data.images[idx["A001"]]
    assert 0.0 <= img[0].min() and img[0].max() <= 1.0 and img[1].max() <= 1.0
    # background ADC 2.0e-3 mm^2/s -> 2/3; the lesion core (~0.8e-3 + blur) well below it
    ring = img[2][5:10, 30:34]
    assert abs(float(np.median(ring)) - 2.0 / 3.0) < 0.03
    assert float(img[2][int(C), int(C)]) < 0.4


def test_manifest_and_cache_contract(site):
    root, cache, _, specs = site
    m = json.loads((cache / "manifest.json").read_text())
    assert m["format_version"] == CACHE_FORMAT_VERSION
    assert m["input_mode"] == "2d" and m["spatial_dims"] == 2 and m["channels"] == ["t2", "dwi", "adc", "mask"]
    assert m["image_shape"] == [4, SIZE, SIZE] and m["feature_names"] == list(FEATURE_NAMES)
    assert m["preprocessing"]["pipeline_version"] and m["preprocessing"]["fov-mm"] == FOV
    assert len(m["salt"]) >= 16 and m["counts"]["included"] == 4
    for e in m["patients"].values():
        assert e["status"] == "included" and len(e["sha256"]) == 64 and len(e["source_hash"]) == 64
    data, idx = by_id(cache)
    np.testing.assert_array_equal(data.clinical[idx["A001"]], encode_row("M", "mid", 3.2, 20.0))
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1]
    qc = list(csv.DictReader(open(cache / "qc.csv", encoding="utf-8")))
    assert len(qc) == 4 and {r["patient_key"] for r in qc} == set(m["patients"])
    assert len(list((cache / "previews").glob("*.png"))) == 4
    with np.load(cache / "patients" / f"{data.keys[0]}.npz") as npz:  # 4th channel: the ROI the model is asked about
        np.testing.assert_array_equal(data.images[0][3], npz["roi"][0].astype(np.float32))
    assert (local_dir(cache) / "scan-index.json").is_file()


def test_rerun_redoes_only_what_changed(site, tmp_path):
    root, cache, first, specs = site
    salt = json.loads((cache / "manifest.json").read_text())["salt"]
    again = prepare_site(root, cache, progress=False)
    assert (again.redone, again.reused, again.parsed_files) == (0, 4, 0)
    assert json.loads((cache / "manifest.json").read_text())["salt"] == salt
    # a half-written / tampered patient file is never trusted: it is rebuilt
    victim = sorted((cache / "patients").glob("*.npz"))[0]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    fixed = prepare_site(root, cache, progress=False)
    assert (fixed.redone, fixed.parsed_files) == (1, 0)
    assert victim.read_bytes() == good
    # a touched DICOM file: one header re-read, one patient rebuilt (same content, same file hash)
    import os

    some_file = next(p for p in sorted((root / "dicom").rglob("IM*")))
    st = some_file.stat()
    os.utime(some_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = prepare_site(root, cache, progress=False)
    assert (touched.redone, touched.parsed_files) == (1, 1)
    # a mask that disappears excludes the patient and removes its stale cache file
    mask = root / "masks" / "A002.nii.gz"
    saved = mask.read_bytes()
    mask.unlink()
    try:
        gone = prepare_site(root, cache, progress=False)
        assert (gone.included, gone.redone) == (3, 1) and len(list((cache / "patients").glob("*.npz"))) == 3
    finally:
        mask.write_bytes(saved)
    assert prepare_site(root, cache, progress=False).redone == 1  # the restored mask is new to prepare
    # a changed clinical row redoes that patient only, with the new label
    csv_path = root / "clinical.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("A003,M,mid,3.2,20,0", "A003,M,mid,3.2,20,1"))
    try:
        changed = prepare_site(root, cache, progress=False)
        assert changed.redone == 1
        data, idx = by_id(cache)
        assert data.labels[idx["A003"]] == 1
    finally:
        csv_path.write_text(text)
        prepare_site(root, cache, progress=False)


def test_workers_give_identical_cache(site, tmp_path):
    root, cache, _, _ = site
    cfg = load_config(cli={"workers": 2})
    prepare_site(root, tmp_path / "c2", cfg, progress=False)
    a, ia = by_id(cache)
    b, ib = by_id(tmp_path / "c2")
    for pid in ia:
        np.testing.assert_array_equal(a.images[ia[pid]], b.images[ib[pid]])


@pytest.mark.parametrize("mode,shape,channels", [
    ("2.5d", [12, 32, 32], ["t2-1", "t2", "t2+1", "dwi-1", "dwi", "dwi+1", "adc-1", "adc", "adc+1",
                            "mask-1", "mask", "mask+1"]),
    ("3d", [4, 8, 32, 32], ["t2", "dwi", "adc", "mask"]),
])
def test_other_input_modes(site, tmp_path, mode, shape, channels):
    root, _, _, _ = site
    cfg = load_config(cli={"input-mode": mode, "crop-size": 32, "crop-depth": 8, "fov-mm": 40.0})
    prepare_site(root, tmp_path / "c", cfg, progress=False)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["image_shape"] == shape and m["channels"] == channels
    assert m["spatial_dims"] == (3 if mode == "3d" else 2)
    data = load_cache(tmp_path / "c")
    assert list(data.images.shape[1:]) == shape
    img = data.images[0]
    with np.load(tmp_path / "c" / "patients" / f"{data.keys[0]}.npz") as npz:  # the mask channels are the ROI crop
        roi = npz["roi"].astype(np.float32)
        np.testing.assert_array_equal(img[-3:] if mode == "2.5d" else img[-1:], roi.reshape((-1,) + img.shape[1:]))
    assert set(np.unique(img[-1]).tolist()) == {0.0, 1.0}
    centre_t2 = img[1] if mode == "2.5d" else img[0, 4]
    assert blob_centre(centre_t2, (15.5, 15.5), radius=4).round(0).tolist() in ([15.0, 15.0], [16.0, 16.0],
                                                                               [15.0, 16.0], [16.0, 15.0])


def test_cli_prepares_and_summarises(site, tmp_path, capsys):
    root, _, _, _ = site
    (root / "site.toml").write_text('site-name = "demo"\n[series-rules]\nmin-dwi-b = 900\n')
    try:
        rc = slmfed(["prepare", str(root), "--cache", str(tmp_path / "c"), "--workers", "1", "--no-progress"])
    finally:
        (root / "site.toml").unlink()
    out = capsys.readouterr().out
    assert rc == 0
    # the site's rule (DWI channel needs b >= 900) excludes the two b=800 patients, with the reason
    assert "patients found: 4; included: 2; excluded: 2" in out
    assert "excluded (sequences): 2" in out and "T2WI: t2_tse_tra" not in out


def test_rigid_refinement_corrects_patient_motion(tmp_path):
    """The patient moved 3 mm left and 2 mm anterior between T2 and DWI: scanner coordinates put
    the DWI lesion off centre; the optional rigid refinement brings it back onto the T2 lesion."""
    root = make_site(tmp_path / "site", [PatientSpec("M001", dwi_motion=(3.0, -2.0, 0.0), adc="computed")])
    want_off = np.array([C - 2.0 / PX, C + 3.0 / PX])  # (row, col) where scanner coordinates put it
    plain = prepare_site(root, tmp_path / "c0", progress=False)
    img = load_cache(tmp_path / "c0").images[0]
    assert plain.included == 1
    assert np.abs(blob_centre(img[1], want_off) - want_off).max() < 0.6
    cfg = load_config(cli={"rigid-refine": True})
    prepare_site(root, tmp_path / "c1", cfg, progress=False)
    img = load_cache(tmp_path / "c1").images[0]
    assert np.abs(blob_centre(img[0], (C, C)) - C).max() < 0.6
    assert np.abs(blob_centre(img[1], (C, C)) - C).max() < 1.0
    assert np.abs(blob_centre(img[2], (C, C), dark=True) - C).max() < 1.0
    m = json.loads((tmp_path / "c1" / "manifest.json").read_text())
    assert "rigid refinement" in m["preprocessing"]["registration"]
    assert any(n.startswith("rigid refinement: 3.") for e in m["patients"].values() for n in e["notes"])


def test_prediction_only_site_has_label_minus_one(tmp_path):
    root = make_site(tmp_path / "site", [PatientSpec("Q1")], rows=["Q1,F,high,7.5,40\n"])
    (root / "clinical.csv").write_text("patient_id,sex,tumor_site,cea,ca199\nQ1,F,high,7.5,40\n", encoding="utf-8")
    prepare_site(root, tmp_path / "c", progress=False)
    data = load_cache(tmp_path / "c")
    assert data.labels.tolist() == [-1] and data.manifest["has_label"] is False
    np.testing.assert_array_equal(data.clinical[0], encode_row("F", "high", 7.5, 40.0))
