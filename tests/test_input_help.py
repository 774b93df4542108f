"""Where site users go wrong with their inputs, prepare says what to change (not only that it failed)."""
from __future__ import annotations

import pytest
from test_prepare_fixtures import CLINICAL_HEADER, PatientSpec, clinical_line, make_site

from client.cache import id_map_path
from client.clinical_table import ClinicalTableError, read_clinical_table
from client.prepare import PrepareError, local_dir, prepare_site
from common.cli import main as slmfed
from common.config import ConfigError, load_config


def test_misspelled_columns_get_a_did_you_mean(tmp_path):
    csv = tmp_path / "clinical.csv"
    csv.write_text("patient_id,sex,tumour_site,cea,CA19-9\nP1,M,low,2,10\n", encoding="utf-8")
    with pytest.raises(ClinicalTableError) as err:
        read_clinical_table(csv)
    msg = str(err.value)
    assert "lacks required column(s) tumor_site, ca199" in msg
    assert "did you mean 'tumour_site' for tumor_site, 'ca19-9' for ca199?" in msg
    csv.write_text("patient_id,sex,location,cea,ca199\nP1,M,low,2,10\n", encoding="utf-8")
    with pytest.raises(ClinicalTableError) as err:  # nothing close: no guess
        read_clinical_table(csv)
    assert "did you mean" not in str(err.value)


def test_a_spreadsheet_beside_the_missing_csv_is_named(tmp_path):
    (tmp_path / "Clinical.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ClinicalTableError, match=r"Clinical.xlsx is a spreadsheet: save it as CSV UTF-8"):
        read_clinical_table(tmp_path / "clinical.csv")
    (tmp_path / "Clinical.xlsx").unlink()
    with pytest.raises(ClinicalTableError) as err:
        read_clinical_table(tmp_path / "clinical.csv")
    assert "is a spreadsheet" not in str(err.value)


def test_unit_names_are_case_insensitive_but_still_checked(tmp_path):
    cfg = load_config(cli={"cea-unit": "ng/ml", "ca199-unit": "u/ml"})
    assert (cfg["cea-unit"], cfg["ca199-unit"]) == ("ng/mL", "U/mL")
    csv = tmp_path / "clinical.csv"
    csv.write_text(CLINICAL_HEADER + clinical_line("P1", cea="4.5"), encoding="utf-8")
    assert read_clinical_table(csv, cea_unit="UG/L").rows["P1"].cea == 4.5
    with pytest.raises(ConfigError, match="expected one of ng/mL, ug/L, found 'mg/L'"):
        load_config(cli={"cea-unit": "mg/L"})
    with pytest.raises(ClinicalTableError, match="cea-unit: expected one of ng/mL, ug/L, found 'mmol/L'"):
        read_clinical_table(csv, cea_unit="mmol/L")


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """DICOM PatientID 0001234 beside clinical.csv's 1234, a good patient, and a mask named after nobody."""
    root = tmp_path_factory.mktemp("ids") / "site"
    make_site(root, [PatientSpec("GOOD1"), PatientSpec("0001234")],
              rows=[clinical_line("GOOD1"), clinical_line("1234")])
    (root / "masks" / "GOOD01.nii.gz").write_bytes((root / "masks" / "GOOD1.nii.gz").read_bytes())
    cache = root.parent / "cache"
    return root, cache, prepare_site(root, cache, progress=False)


def test_ids_differing_in_leading_zeros_and_stray_masks_are_hinted(mismatched):
    _, _, report = mismatched
    assert report.included == 1
    assert [pid for pid, _ in report.excluded_ids] == ["0001234", "1234"]
    (zeros,) = [h for h in report.hints if "leading zeros" in h]
    assert "'0001234'" in zeros and "'1234'" in zeros
    (stray,) = [h for h in report.hints if "named after no patient" in h]
    assert stray.endswith("GOOD01.nii.gz")


def test_the_summary_lists_excluded_patients_by_id_but_the_cache_does_not(mismatched, tmp_path, capsys):
    root, cache, _ = mismatched
    assert slmfed(["prepare", str(root), "--cache", str(cache), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "excluded patients (by your patient_id; shown on this console only):" in out
    assert "    0001234: clinical: no row in clinical.csv for this DICOM patient" in out
    assert "    1234: DICOM: no DICOM images found for this patient_id" in out
    assert f"id map (salted key -> your patient_id): {id_map_path(cache)}" in out
    blob = b"".join(p.read_bytes() for p in cache.rglob("*") if p.is_file())
    assert b"0001234" not in blob and b"GOOD01" not in blob


def test_a_failed_first_prepare_leaves_no_cache_behind(tmp_path):
    root = make_site(tmp_path / "site", [PatientSpec("P1")])
    good = (root / "clinical.csv").read_text(encoding="utf-8")
    (root / "clinical.csv").write_text("patient_id,sex,tumor_site,cea\nP1,M,low,2\n", encoding="utf-8")
    cache = tmp_path / "cache"
    with pytest.raises(PrepareError, match="lacks required column"):
        prepare_site(root, cache, progress=False)
    assert not cache.exists() and not local_dir(cache).exists()
    (root / "clinical.csv").write_text(good, encoding="utf-8")
    assert prepare_site(root, cache, progress=False).included == 1
    (root / "clinical.csv").write_text("patient_id\nP1\n", encoding="utf-8")
    with pytest.raises(PrepareError):  # a later failed run keeps the cache that was there
        prepare_site(root, cache, progress=False)
    assert (cache / "manifest.json").is_file() and id_map_path(cache).is_file()
