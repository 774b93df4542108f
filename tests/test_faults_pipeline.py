"""The site pipeline under faults (issue 15): one `slmfed prepare` per cache at a time, and random /
hostile clinical tables and DICOM header values never crash it, never lose a valid patient, and
every exclusion has a reason. Small on purpose: tiny images, few examples."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_prepare_fixtures import CLINICAL_HEADER, Grid, PatientSpec, clinical_line, make_site, write_patient

from client.cache import id_map_path, load_cache
from client.cache_lock import cache_lock
from client.prepare import PrepareError, prepare_site
from common.cli import main as slmfed

REPO = Path(__file__).resolve().parents[1]
VALID = ("GOOD1", "GOOD2")


def _spec(pid: str) -> PatientSpec:
    """A small patient (24 x 24 x 5 T2, 16 x 16 x 4 DWI) that prepare accepts."""
    return PatientSpec(pid, lesion=(0.0, 0.0, 0.0), radius=6.0,
                       t2=Grid((24, 24, 5), (2.0, 2.0, 3.0), (-24.0, -24.0, -6.0)),
                       dwi=Grid((16, 16, 4), (3.0, 3.0, 4.0), (-24.0, -24.0, -6.0)))


def _qc(cache: Path) -> dict[str, dict]:
    with open(id_map_path(cache), newline="", encoding="utf-8") as fh:
        ids = {r["patient_key"]: r["patient_id"] for r in csv.DictReader(fh)}
    with open(cache / "qc.csv", newline="", encoding="utf-8") as fh:
        return {ids[r["patient_key"]]: r for r in csv.DictReader(fh)}


def test_a_second_prepare_on_a_locked_cache_refuses_clearly(tmp_path, capsys):
    site = make_site(tmp_path / "site", [_spec(VALID[0])], [clinical_line(VALID[0])])
    cache = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from client.cache_lock import cache_lock\n"
                               "with cache_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
                               str(cache)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(PrepareError, match=rf"cache {cache} is being prepared by pid {holder.pid} .*wait until"):
            prepare_site(site, cache, progress=False)
        assert slmfed(["prepare", str(site), "--cache", str(cache), "--no-progress"]) != 0
        assert "is being prepared by" in capsys.readouterr().err
        assert not (cache / "manifest.json").exists()  # the refused run wrote nothing
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    report = prepare_site(site, cache, progress=False)  # a killed holder never leaves a stale lock
    assert report.included == 1
    with cache_lock(cache):  # and the finished run released it
        pass


# ---- hostile input -------------------------------------------------------------------------------
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_number_like = st.one_of(st.sampled_from(["", "nan", "inf", "-1", "0", "1e309", "3,5", " 4 ", "1e-320", "NULL", "abc"]),
                         st.floats(allow_nan=True, allow_infinity=True).map(repr), _text)
_row = st.fixed_dictionaries({
    "patient_id": _text,
    "sex": st.one_of(st.sampled_from(["M", "F", "m", "female", "", "X"]), _text),
    "tumor_site": st.one_of(st.sampled_from(["low", "mid", "high", "HIGH", "", "rectum"]), _text),
    "cea": _number_like, "ca199": _number_like,
    "slm": st.one_of(st.sampled_from(["0", "1", "2", "", "yes", "-1"]), _text),
})
_HEADER_FIELDS = {
    "SeriesDescription": _text,
    "ImageType": st.lists(_text, max_size=4).map(lambda v: v or [""]),
    "PixelSpacing": st.lists(_number_like.map(lambda s: s[:16]), min_size=1, max_size=3),
    "SliceThickness": _number_like.map(lambda s: s[:16]),
    "ImagePositionPatient": st.lists(_number_like.map(lambda s: s[:16]), min_size=1, max_size=4),
    "ImageOrientationPatient": st.lists(_number_like.map(lambda s: s[:16]), min_size=1, max_size=7),
    "PatientID": _text,
    "Rows": st.integers(0, 70000),
    "RescaleSlope": _number_like.map(lambda s: s[:16]),
}


def _hostile_header(files: list[Path], field: str, value) -> bool:
    """Write `value` into `field` of every file; False when pydicom itself cannot write it."""
    try:
        for f in files:
            ds = pydicom.dcmread(f)
            setattr(ds, field, value)
            ds.save_as(f)
    except Exception:  # noqa: BLE001 - a value pydicom refuses to write is no input we can receive
        return False
    return True


def _normal(pid: str) -> str:
    return pid.strip().casefold()


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the invalid values we write on purpose
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row, max_size=4), field=st.sampled_from(sorted(_HEADER_FIELDS)), data=st.data())
def test_hostile_tables_and_headers_never_crash_never_lose_valid_patients(rows, field, data):
    assume(all(_normal(r["patient_id"]) not in {_normal(v) for v in (*VALID, "HOSTILE")} for r in rows))
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    site = make_site(root / "site", [_spec(v) for v in VALID], [clinical_line(v, slm=str(i)) for i, v in enumerate(VALID)])
    files = write_patient(site, _spec("HOSTILE"))
    value = data.draw(_HEADER_FIELDS[field], label=field)
    assume(_hostile_header(files["t2"], field, value))
    with open(site / "clinical.csv", "a", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["HOSTILE", "M", "mid", "3.2", "20", "1"])
        for r in rows:
            w.writerow([r[k] for k in ("patient_id", "sex", "tumor_site", "cea", "ca199", "slm")])
    cache = root / "cache"
    report = prepare_site(site, cache, progress=False)  # no traceback: any failure here fails the test
    qc = _qc(cache)
    for pid in VALID:
        assert qc[pid]["status"] == "included", (pid, qc[pid])
    assert all(r["status"] == "included" or r["reason"].strip() for r in qc.values()), qc
    data_ = load_cache(cache)
    assert len(data_.keys) == report.included >= len(VALID)
