"""Every bad input of the prepare issue gives its own clear reason, and never costs the valid patients."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from test_prepare_fixtures import (
    CLINICAL_HEADER, Grid, PatientSpec, clinical_line, make_site, mask_array, write_mask_for, write_patient, write_series,
)

from client.cache import id_map_path, load_cache
from client.prepare import PrepareError, prepare_site
from common.cli import main as slmfed
from common.config import load_config


def reasons(cache) -> dict[str, str]:
    """patient_id -> QC reason ('' when included), via the site-local id map."""
    with open(id_map_path(cache), newline="", encoding="utf-8") as fh:
        ids = {r["patient_key"]: r["patient_id"] for r in csv.DictReader(fh)}
    with open(cache / "qc.csv", newline="", encoding="utf-8") as fh:
        return {ids[r["patient_key"]]: (r["reason"] if r["status"] == "excluded" else "") for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory):
    """One site holding a good patient next to one patient per bad-input case."""
    root = tmp_path_factory.mktemp("bad") / "site"
    good = ["GOOD1", "GOOD2"]
    specs = [PatientSpec(p) for p in good]
    make_site(root, specs)
    rows = [clinical_line(p) for p in good]

    def add(pid, **kw):
        spec = PatientSpec(pid, **kw)
        files = write_patient(root, spec)
        rows.append(clinical_line(pid))
        return spec, files

    _, f = add("TRUNC")  # a T2 slice cut short in its pixel data
    data = f["t2"][4].read_bytes()
    f["t2"][4].write_bytes(data[: len(data) - 500])
    _, f = add("GAP")  # a missing T2 slice
    f["t2"][5].unlink()
    _, f = add("DUPPOS")  # a second slice file (new SOP UID) at an existing position
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(f["t2"][3])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(f["t2"][3].parent / "copy_of_slice")
    _, f = add("NOT2")
    for p in f["t2"]:
        p.unlink()
    _, f = add("NODWI", adc="none")
    for p in f["dwi"]:
        p.unlink()
    add("NOB", adc="computed", b_tag="none")
    spec, _ = add("NOMASK")
    (root / "masks" / "NOMASK.nii.gz").unlink()
    spec, _ = add("EMPTYMASK")
    write_mask_for(root, spec, np.zeros_like(mask_array(spec)))
    spec, _ = add("NONBIN")
    m = mask_array(spec)
    m[m > 0] = 2
    m[0, 0, 0] = 1
    write_mask_for(root, spec, m)
    spec, _ = add("SHAPE")
    g = Grid((32, 32, 10), (1.6, 1.6, 3.0), spec.t2.origin)
    write_mask_for(root, spec, np.ones((10, 32, 32), np.uint8), grid=g)
    spec, _ = add("SPACING")
    g = Grid(spec.t2.size, (0.8, 0.8, 4.0), spec.t2.origin)
    write_mask_for(root, spec, mask_array(spec), grid=g)
    spec = PatientSpec("NOROW")  # DICOM but no clinical row
    write_patient(root, spec)
    rows.append(clinical_line("NODICOM"))  # clinical row but no DICOM
    for pid, kw in {
        "DUPID": {}, "NANCEA": {"cea": "NaN"}, "NEGCEA": {"cea": "-2"}, "TEXTCA": {"ca199": "high"},
        "BADSEX": {"sex": "X"}, "BADSITE": {"site": "rectosigmoid"}, "SPELL": {"sex": "female", "site": "Upper"},
    }.items():
        write_patient(root, PatientSpec(pid))
        rows.append(clinical_line(pid, **kw))
    rows.append(clinical_line("DUPID"))
    ct = root / "dicom" / "ct_exam"  # unrelated DICOM: a CT and an MR localizer
    vol = np.full((3, 16, 16), 100.0)
    write_series(ct, vol, Grid((16, 16, 3)), patient_id="CTONLY", study_uid=generate_uid(), description="abdomen",
                 number=2, modality="CT")
    write_series(ct, vol, Grid((16, 16, 3)), patient_id="CTONLY", study_uid=generate_uid(), description="localizer",
                 number=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    rows.append(clinical_line("CTONLY"))
    (root / "dicom" / "notes.txt").write_text("not dicom")
    (root / "dicom" / "junk.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10")
    (root / "clinical.csv").write_text(CLINICAL_HEADER + "".join(rows), encoding="utf-8")
    cache = root.parent / "cache"
    report = prepare_site(root, cache, progress=False)
    return root, cache, report


EXPECTED = {
    "TRUNC": "T2WI: series 3 't2_tse_tra': 1 truncated DICOM file(s) (pixel data incomplete)",
    "GAP": "missing slice(s): a gap of 6.0 mm",
    "DUPPOS": "duplicated slice: 2 slices share the position",
    "NOT2": "sequences: no T2WI series found",
    "NODWI": "sequences: no DWI series found",
    "NOB": "has no b-value in its headers",
    "NOMASK": "mask: missing (expected masks/<patient_id>.nii.gz",
    "EMPTYMASK": "mask: mask is empty (no voxel > 0)",
    "NONBIN": "mask: mask is not binary (values found: 0, 1, 2)",
    "SHAPE": "mask: mask has shape (32, 32, 10) but the T2 series has (64, 64, 10)",
    "SPACING": "mask: mask has spacing (0.8, 0.8, 4.0) mm but the T2 series has (0.8, 0.8, 3.0) mm",
    "NOROW": "clinical: no row in clinical.csv for this DICOM patient",
    "NODICOM": "DICOM: no DICOM images found for this patient_id",
    "DUPID": "patient_id appears in 2 rows of clinical.csv",
    "NANCEA": "cea is missing (found 'NaN')",
    "NEGCEA": "cea '-2' is negative",
    "TEXTCA": "ca199 'high' is not a number",
    "BADSEX": "sex 'X' is not recognised (expected M or F)",
    "BADSITE": "tumor_site 'rectosigmoid' is not recognised",
    "CTONLY": "sequences: no T2WI series found (series seen: ",
}


@pytest.mark.parametrize("pid", sorted(EXPECTED))
def test_each_bad_input_has_its_reason(bad_site, pid):
    _, cache, _ = bad_site
    got = reasons(cache)[pid]
    assert EXPECTED[pid] in got, got
    if pid == "CTONLY":  # the reason lists what was found instead
        assert "MR 'localizer'" in got and "CT 'abdomen'" in got


def test_valid_patients_survive_bad_neighbours(bad_site):
    root, cache, report = bad_site
    r = reasons(cache)
    assert {p for p, why in r.items() if not why} == {"GOOD1", "GOOD2", "SPELL"}
    assert report.included == 3 and report.excluded == len(EXPECTED)
    assert report.skipped_files == {"not a DICOM file": 1, "truncated or empty DICOM header": 1}
    data = load_cache(cache)
    assert data.images.shape == (3, 4, 64, 64)  # T2WI, DWI, ADC and the ROI mask


def test_common_spellings_are_accepted(bad_site):
    _, cache, _ = bad_site
    data = load_cache(cache)
    ids = dict(csv.reader(open(id_map_path(cache), encoding="utf-8")))
    i = [ids[k] for k in data.keys].index("SPELL")
    assert data.clinical[i][:3].tolist() == [0.0, 0.0, 1.0]  # female, tumor_site high


def test_no_raw_identifier_in_the_cache(bad_site):
    root, cache, _ = bad_site
    blob = b"".join(p.read_bytes() for p in cache.rglob("*") if p.is_file())
    for pid in list(EXPECTED) + ["GOOD1", "Doe^GOOD1", str(root)]:
        assert pid.encode() not in blob, pid
    assert id_map_path(cache).is_file() and not id_map_path(cache).is_relative_to(cache)


def test_non_utf8_csv_is_one_clear_error(tmp_path):
    root = make_site(tmp_path / "site", [PatientSpec("P1")])
    (root / "clinical.csv").write_bytes((CLINICAL_HEADER + "Müller,M,mid,3,20,1\n").encode("latin-1"))
    with pytest.raises(PrepareError, match=r"is not UTF-8 text \(byte 0xFC on line 2\)"):
        prepare_site(root, tmp_path / "cache", progress=False)


def test_cli_exit_status_and_sentence(tmp_path, capsys):
    empty = tmp_path / "nosite"
    empty.mkdir()
    assert slmfed(["prepare", str(empty), "--cache", str(tmp_path / "c0")]) == 2
    assert "has no dicom/ folder" in capsys.readouterr().err
    root = make_site(tmp_path / "site", [PatientSpec("P1")])
    (root / "clinical.csv").unlink()
    assert slmfed(["prepare", str(root), "--cache", str(tmp_path / "c1")]) == 2
    assert "clinical.csv does not exist" in capsys.readouterr().err


def test_only_unrelated_dicom_exits_nonzero(tmp_path, capsys):
    root = tmp_path / "site"
    write_series(root / "dicom" / "x", np.full((3, 16, 16), 50.0), Grid((16, 16, 3)), patient_id="C1",
                 study_uid="1.2.3", description="abdomen", number=2, modality="CT")
    (root / "clinical.csv").write_text(CLINICAL_HEADER + clinical_line("C1"), encoding="utf-8")
    assert slmfed(["prepare", str(root), "--cache", str(tmp_path / "c"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no usable patient" in err and "most common exclusion: sequences" in err


def test_missing_required_column(tmp_path):
    root = make_site(tmp_path / "site", [PatientSpec("P1")])
    (root / "clinical.csv").write_text("patient_id,sex,tumor_site,cea\nP1,M,low,2\n", encoding="utf-8")
    with pytest.raises(PrepareError, match="lacks required column"):
        prepare_site(root, tmp_path / "cache", progress=False)


def test_bad_series_rules_named(tmp_path):
    root = make_site(tmp_path / "site", [PatientSpec("P1")])
    cfg = load_config(cli={"series-rules": {"t3": ["x"]}})
    with pytest.raises(PrepareError, match="unknown key"):
        prepare_site(root, tmp_path / "cache", cfg, progress=False)


def test_unforeseen_error_excludes_one_patient_and_keeps_paths_local(tmp_path, monkeypatch):
    import client.transforms as tr
    from client.prepare import local_dir

    root = make_site(tmp_path / "site", [PatientSpec("P1"), PatientSpec("P2", lesion=(-6.0, 4.0, 0.0))])
    real = tr.build_input_transform

    def flaky(*a, **k):  # the chain fails for the patient whose lesion sits left of centre
        chain = real(*a, **k)

        def run(d):
            if d["mask"].nonzero()[2].mean() < d["mask"].shape[2] / 2:
                raise RuntimeError(f"boom in {root}")
            return chain(d)
        return run

    monkeypatch.setattr("client.prepare.build_input_transform", flaky)
    rep = prepare_site(root, tmp_path / "cache", progress=False)
    r = reasons(tmp_path / "cache")
    assert r["P1"] == "" and r["P2"] == "internal error: RuntimeError (traceback in the site-local errors.log)"
    assert rep.included == 1
    assert str(root) in (local_dir(tmp_path / "cache") / "errors.log").read_text()
    assert str(root).encode() not in (tmp_path / "cache" / "manifest.json").read_bytes()
