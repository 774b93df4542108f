"""Unit checks of the prepare building blocks: clinical table, sequence rules, slice stacks."""
from __future__ import annotations

import numpy as np
import pytest
from test_prepare_fixtures import Grid, write_series

from client.clinical_table import ClinicalTableError, read_clinical_table
from client.dicom_scan import FileRecord, read_header
from client.series import RulesError, Series, SeriesRules, group_series, select_sequences
from client.volumes import VolumeError, check_stack, read_volume


def _csv(tmp_path, text, encoding="utf-8"):
    p = tmp_path / "clinical.csv"
    p.write_bytes(text.encode(encoding))
    return p


def test_semicolon_csv_decimal_comma_and_no_label(tmp_path):
    t = read_clinical_table(_csv(tmp_path, "patient_id;Sex;tumor_site;CEA;ca199\n007;Male;Lower;4,5;36\n"))
    row = t.rows["007"]  # leading zeros kept: IDs are text
    assert (row.sex, row.tumor_site, row.cea, row.ca199, row.slm, row.error) == ("M", "low", 4.5, 36.0, -1, "")
    assert not t.has_label


def test_plausibility_warning_keeps_the_patient(tmp_path):
    t = read_clinical_table(_csv(tmp_path, "patient_id,sex,tumor_site,cea,ca199,slm\nA,F,mid,2500,12,1\n"))
    assert t.rows["A"].error == "" and "cea 2500 is above 1000" in t.rows["A"].warnings[0]


def test_bad_label_and_units(tmp_path):
    t = read_clinical_table(_csv(tmp_path, "patient_id,sex,tumor_site,cea,ca199,slm\nA,F,mid,2,12,yes\n"))
    assert "slm 'yes' is not 0 or 1" in t.rows["A"].error
    with pytest.raises(ClinicalTableError, match="cea-unit: expected one of ng/mL, ug/L, found 'mg/L'"):
        read_clinical_table(_csv(tmp_path, "patient_id,sex,tumor_site,cea,ca199\n"), cea_unit="mg/L")


def _series(desc, image_type=("ORIGINAL", "PRIMARY"), b=None, modality="MR", iop=(1, 0, 0, 0, 1, 0), ps=(0.8, 0.8),
            number=1, n=3):
    files = [FileRecord(path=f"/x/{desc}/{k}", size=1, mtime_ns=1, patient_id="P", study_uid="S", series_uid=desc,
                        description=desc, image_type=image_type, modality=modality, bvalue=b, series_number=number,
                        ipp=(0.0, 0.0, 3.0 * k), iop=iop, pixel_spacing=ps, rows=8, cols=8) for k in range(n)]
    return Series("P", "S", desc, files)


@pytest.mark.parametrize("desc,want", [
    ("t2_tse_tra", "t2"), ("Ax T2 FRFSE", "t2"), ("T2W_TSE", "t2"), ("t2_tse_tra_p2", "t2"),
    ("ep2d_diff_b50_800", "dwi"), ("DWI b800", "dwi"), ("DWI_b0_1000_SENSE", "dwi"),
    ("dADC", "adc"), ("ep2d_diff_b0_800_tra_ADC", "adc"), ("ADC (10^-6 mm2/s)", "adc"),
    ("localizer", None), ("t2_haste_loc", None), ("3-Plane Loc", None), ("t1_vibe_dyn", None), ("ep2d_diff_EADC", None),
])
def test_vendor_names_are_classified(desc, want):
    assert SeriesRules().classify(_series(desc)) == want


def test_image_type_and_modality_rules():
    rules = SeriesRules()
    assert rules.classify(_series("whatever", image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC"))) == "adc"
    assert rules.classify(_series("t2_tse_tra", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))) is None
    assert rules.classify(_series("t2_tse_tra", modality="CT")) is None
    assert rules.classify(_series("unnamed", b=1000.0)) == "dwi"


def test_site_rules_extend_or_replace_defaults():
    custom = _series("RECTUM HR AX")
    assert SeriesRules().classify(custom) is None
    assert SeriesRules({"t2": ["rectum hr ax"]}).classify(custom) == "t2"
    replaced = SeriesRules({"t2": ["^rectum"], "mode": "replace"})
    assert replaced.classify(custom) == "t2" and replaced.classify(_series("t2_tse_tra")) is None
    with pytest.raises(RulesError, match="series-rules.adc-unit: expected one of"):
        SeriesRules({"adc-unit": "furlongs"})
    with pytest.raises(RulesError, match="invalid regular expression"):
        SeriesRules({"dwi": ["("]})


def test_several_t2_candidates_pick_by_documented_rule():
    sag = _series("t2_tse_sag", iop=(0, 1, 0, 0, 0, -1), number=2)
    fs = _series("t2_tse_tra_fs", number=4)
    coarse = _series("t2_tse_tra", ps=(1.0, 1.0), number=5)
    fine = _series("t2_tse_tra_hr", ps=(0.6, 0.6), number=3)
    dwi = _series("ep2d_diff", b=800.0, number=6)
    b0 = _series("ep2d_diff", b=0.0, number=6)
    dwi.files += b0.files
    sel = select_sequences([sag, fs, coarse, fine, dwi], SeriesRules())
    assert sel.t2 is fine
    assert any(n.startswith("t2: 4 candidates, picked series 3 't2_tse_tra_hr'") for n in sel.notes)
    assert sel.adc is None and (sel.low_b, sel.dwi_b) == (0.0, 800.0)


def test_low_b_only_dwi_is_refused():
    dwi = _series("ep2d_diff", b=400.0)
    with pytest.raises(Exception, match=r"highest DWI b-value is 400 s/mm\^2; the DWI channel needs b >= 600"):
        select_sequences([_series("t2_tse_tra"), dwi], SeriesRules())


def test_slices_sorted_by_position_and_rescaled(tmp_path):
    vol = np.stack([np.full((8, 8), 10.0 * (k + 1)) for k in range(5)])
    grid = Grid((8, 8, 5), (1.0, 1.0, 2.5), (0, 0, 0), iop=(1, 0, 0, 0, -1, 0))  # normal points to -z
    paths = write_series(tmp_path, vol, grid, patient_id="P", study_uid="1.2", description="t2", number=1, slope=0.5)
    recs = [read_header(p) for p in reversed(paths)]  # file order and InstanceNumber both say nothing
    img, _ = read_volume(recs, "series 1 't2'")
    import SimpleITK as sitk

    got = sitk.GetArrayFromImage(img)[:, 0, 0].tolist()
    assert got == [10.0, 20.0, 30.0, 40.0, 50.0]
    assert img.GetSpacing() == pytest.approx((1.0, 1.0, 2.5))


def test_inconsistent_spacing_reason(tmp_path):
    vol = np.zeros((4, 8, 8))
    paths = write_series(tmp_path, vol, Grid((8, 8, 4), (1, 1, 3.0), (0, 0, 0)), patient_id="P", study_uid="1",
                         description="t2", number=1)
    recs = [read_header(p) for p in paths]
    recs[3].ipp = (0.0, 0.0, 9.6)  # 3.0, 3.0, 3.6
    with pytest.raises(VolumeError, match=r"inconsistent slice spacing \(3.00 to 3.60 mm\)"):
        check_stack(recs, "s")


def test_group_series_keys_patient_study_series(tmp_path):
    a = write_series(tmp_path / "a", np.zeros((2, 4, 4)), Grid((4, 4, 2)), patient_id="P1", study_uid="1.1",
                     description="t2", number=1)
    b = write_series(tmp_path / "b", np.zeros((2, 4, 4)), Grid((4, 4, 2)), patient_id="P2", study_uid="1.2",
                     description="t2", number=1)
    groups = group_series(read_header(p) for p in a + b)
    assert sorted(groups) == ["P1", "P2"] and [len(s.files) for s in groups["P1"]] == [2]


def test_raw_pixel_path_matches_simpleitk(tmp_path):
    """The plain-file fast path gives exactly what SimpleITK/GDCM reads (slope applied)."""
    import SimpleITK as sitk

    from client.volumes import read_series_sitk

    rng = np.random.default_rng(0)
    vol = rng.integers(0, 4000, (4, 12, 10)).astype(float)
    paths = write_series(tmp_path, vol, Grid((10, 12, 4), (0.7, 0.9, 3.0), (1, 2, 3)), patient_id="P",
                         study_uid="1.2", description="t2", number=1, slope=0.25)
    recs = [read_header(p) for p in paths]
    assert all(r.pixel_offset > 0 and r.pixel_dtype == "<u2" for r in recs)
    fast, _ = read_volume(recs, "s")
    ref = read_series_sitk([str(p) for p in paths], "s")
    np.testing.assert_allclose(sitk.GetArrayFromImage(fast), sitk.GetArrayFromImage(ref), rtol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayFromImage(fast), np.round(vol / 0.25) * 0.25, rtol=1e-6)
    recs[0].pixel_offset += 2  # the file is not where the scan saw it: fall back to SimpleITK
    again, _ = read_volume(recs, "s")
    np.testing.assert_allclose(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(ref), rtol=1e-6)
