"""`slmfed fetch` logic without a PACS (#29): worklist parsing, study choice, the series filter (the
rules prepare uses), [pacs] settings and the secret file, atomic writes and resume against an
in-memory transport (the real transports: tests/test_fetch_e2e.py)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from client import fetch
from client.dicom_scan import NotAnImage, read_headers
from client.fetch import InstanceInfo, SeriesInfo, StudyInfo, WorkItem
from client.series import SeriesRules


def test_worklist_rows_separators_aliases_and_bad_rows(tmp_path):
    p = tmp_path / "wl.csv"
    p.write_text("Patient_ID;PatientID;AccessionNumber;date_from;date_to\n"
                 "RC1;MRN1;;2019-01-01;2019-12-31\n"
                 "RC2;;A77;;\n"
                 "RC3;;;;\n"
                 "RC1;MRN9;;;\n"
                 "../x;M;;;\n"
                 "RC5;M5;;2019-13-01;\n"
                 "RC6;M6;;2020-01-01;2019-01-01\n")
    rows = fetch.read_worklist(p)
    assert [r.patient_id for r in rows] == ["RC1", "RC2", "RC3", "RC1", "../x", "RC5", "RC6"]
    assert (rows[0].pacs_patient_id, rows[0].date_from, rows[0].date_to) == ("MRN1", "20190101", "20191231")
    assert (rows[1].accession, rows[1].pacs_patient_id) == ("A77", "")
    assert rows[2].pacs_patient_id == "RC3" and not rows[2].error  # the PACS knows the patient by the same id
    assert rows[3].error == "worklist line 5: patient_id also on line 2"
    assert "names the patient's folder" in rows[4].error
    assert "date_from '2019-13-01' is not a date" in rows[5].error
    assert "date_from is after date_to" in rows[6].error
    (tmp_path / "bad.csv").write_text("name,accession\nx,1\n")
    with pytest.raises(fetch.ConfigError, match="no patient_id column"):
        fetch.read_worklist(tmp_path / "bad.csv")
    with pytest.raises(fetch.ConfigError, match="does not exist"):
        fetch.read_worklist(tmp_path / "none.csv")


def test_study_choice_names_why_none_or_several_match():
    item = WorkItem(3, "RC1", "MRN1", "", "20190101", "20190630")
    mr1, mr2 = StudyInfo("1.1", "20190301", ("MR", "SEG")), StudyInfo("1.2", "20210301", ("MR",))
    assert fetch.select_study(item, [mr1, mr2, StudyInfo("1.3", "20190302", ("CT",))], "PACS 'x'") is mr1
    with pytest.raises(fetch.FetchError, match="the PatientID of worklist line 3 matches no study in PACS 'x'"):
        fetch.select_study(item, [], "PACS 'x'")
    with pytest.raises(fetch.FetchError, match=r"none is MR \(modalities: CT\)"):
        fetch.select_study(item, [StudyInfo("1.3", "20190302", ("CT",))], "PACS 'x'")
    with pytest.raises(fetch.FetchError, match=r"1 MR study\(ies\) found, none dated within 2019-01-01 to 2019-06-30 "
                                               r"\(study dates: 2021-03-01\)"):
        fetch.select_study(item, [mr2], "PACS 'x'")
    with pytest.raises(fetch.FetchError, match="2 MR studies within any date .*narrow the date window"):
        fetch.select_study(WorkItem(4, "RC1", "", "A1"), [mr1, mr2], "PACS 'x'")


def _series(uid, modality, desc, image_type=("ORIGINAL", "PRIMARY"), bvalues=(None,)):
    return SeriesInfo(uid, modality, desc, 1, None,
                      [InstanceInfo(f"{uid}.{k}", "", image_type, desc, "", b, k) for k, b in enumerate(bvalues)])


def test_series_filter_uses_prepares_rules():
    series = [_series("1.1", "MR", "t2_tse_tra"), _series("1.2", "MR", "ep2d_diff_b50_800", bvalues=(50.0, 800.0)),
              _series("1.3", "MR", "dADC", ("DERIVED", "PRIMARY", "ADC")), _series("1.4", "MR", "localizer"),
              _series("1.5", "MR", "t1_vibe_post"), _series("1.6", "SEG", "AI tumour"),
              _series("1.7", "RTSTRUCT", ""), _series("1.8", "MR", "unnamed", bvalues=(0.0, 1000.0)),
              _series("1.9", "MR", "ax hr pelvis")]
    keep, left = fetch.choose_series(series, SeriesRules(), all_series=False)
    assert {s.series_uid: s.kind for s in keep} == {"1.1": "t2", "1.2": "dwi", "1.3": "adc", "1.6": "mask",
                                                    "1.7": "mask", "1.8": "dwi"}
    assert [s.series_uid for s in left] == ["1.4", "1.5", "1.9"]
    keep, left = fetch.choose_series(series, SeriesRules({"t2": ["ax hr pelvis"]}), all_series=False)
    assert "1.9" in {s.series_uid for s in keep}  # the site's own [series-rules] apply as in prepare
    keep, left = fetch.choose_series(series, SeriesRules(), all_series=True)
    assert len(keep) == 9 and not left and {s.kind for s in keep if s.series_uid == "1.4"} == {"other"}


def test_pacs_settings_and_secret_file(tmp_path):
    one = fetch.parse_pacs({"transport": "dicomweb", "url": "https://pacs/dicom-web", "auth": "token",
                            "secret-file": "pacs.secret", "ca-bundle": "ca.pem"}, tmp_path)
    assert list(one) == ["default"] and one["default"].secret_file == str(tmp_path / "pacs.secret")
    two = fetch.parse_pacs({"a": {"transport": "dimse", "host": "h", "called-ae": "PACS", "retrieve": "c-move",
                                  "move-port": 11112}, "b": {"transport": "dimse", "host": "h", "called-ae": "P"}},
                           tmp_path)
    assert two["a"].move_ae == "SLMFED" and two["b"].retrieve == "c-get" and two["b"].port == 104
    bad = [({"transport": "dicomweb", "url": "x"}, "'url' must be the DICOMweb root"),
           ({"transport": "dicomweb", "url": "http://p", "auth": "basic", "username": "u"}, "needs 'secret-file'"),
           ({"transport": "dimse", "host": "h", "called-ae": "P", "retrieve": "c-move"}, "needs 'move-port'"),
           ({"transport": "dimse", "host": "h", "called-ae": "A" * 17}, "at most 16 ASCII"),
           ({"transport": "ftp"}, "'transport' must be one of dicomweb, dimse"),
           ({"transport": "dimse", "password": "x"}, r"unknown key\(s\) password"),
           ({"transport": "dimse", "x": {"transport": "dimse"}}, "not both")]
    for table, msg in bad:
        with pytest.raises(fetch.ConfigError, match=msg):
            fetch.parse_pacs(table, tmp_path)
    s = tmp_path / "secret"
    s.write_text("hunter2\n")
    os.chmod(s, 0o640)
    with pytest.raises(fetch.ConfigError, match=r"readable by others \(mode 0640\): run chmod 600"):
        fetch.read_secret(str(s))
    os.chmod(s, 0o600)
    assert fetch.read_secret(str(s)) == "hunter2"
    with pytest.raises(fetch.ConfigError, match="does not exist"):
        fetch.read_secret(str(tmp_path / "nope"))


def test_dicomweb_session_carries_the_token_and_the_ca_bundle(tmp_path):
    from client.pacs_dicomweb import DicomWebTransport

    cfg = fetch.parse_pacs({"transport": "dicomweb", "url": "https://pacs.example/dicom-web", "auth": "token",
                            "secret-file": "s", "ca-bundle": "/etc/site-ca.pem"}, tmp_path)["default"]
    t = DicomWebTransport(cfg, "tok123")
    assert t.session.headers["Authorization"] == "Bearer tok123" and t.session.verify == "/etc/site-ca.pem"
    cfg.auth, cfg.username = "basic", "slm"
    assert DicomWebTransport(cfg, "pw").session.auth == ("slm", "pw")


def _dataset(sop: str, series: str, study: str = "1.2.3", pid: str = "MRN7") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID, ds.PatientName = study, series, pid, "DOE^JO"
    ds.Modality, ds.SeriesDescription, ds.Rows, ds.Columns = "MR", "t2_tse_tra", 2, 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01\x00" * 4
    return ds


class FakePacs:
    """A PACS in memory: one MR study with a T2 series of 5 instances (and a localizer)."""

    def __init__(self, drop: int = 0):
        self.drop, self.retrieved = drop, []
        self.series = {"1.2.3.1": [_dataset(f"1.2.3.1.{k}", "1.2.3.1") for k in range(5)],
                       "1.2.3.9": [_dataset("1.2.3.9.1", "1.2.3.9")]}

    def find_studies(self, pid, acc):
        return [StudyInfo("1.2.3", "20190301", ("MR",))] if pid == "MRN7" else []

    def find_series(self, study):
        return [SeriesInfo("1.2.3.1", "MR", "t2_tse_tra", 2, 5), SeriesInfo("1.2.3.9", "MR", "localizer", 1, 1)]

    def find_instances(self, study, series, modality="MR"):
        return [InstanceInfo(ds.SOPInstanceUID, "", ("ORIGINAL",), "", "", None, k)
                for k, ds in enumerate(self.series[series])]

    def retrieve(self, study, series, sops, whole, sink):
        for ds in self.series[series]:
            if ds.SOPInstanceUID in sops and ds.SOPInstanceUID not in self.dropped():
                self.retrieved.append(ds.SOPInstanceUID)
                sink(ds.copy())

    def dropped(self):
        return {f"1.2.3.1.{k}" for k in range(self.drop)}

    def close(self):
        pass


def _run(site: Path, pacs: FakePacs, rows: list[WorkItem]):
    cfg = {"x": fetch.PacsConfig("x", "dicomweb", url="http://fake")}
    return fetch.fetch_site(site, rows, cfg, "x", SeriesRules(), progress=False, log_path=site / "log.jsonl",
                            transports={"x": pacs})


def test_resume_fetches_only_what_is_missing_and_verifies_the_count(tmp_path):
    site = tmp_path / "site"
    pacs = FakePacs()
    rows = [WorkItem(2, "RC7", "MRN7"), WorkItem(3, "RC8", "MRN8")]
    report = _run(site, pacs, rows)
    assert [(r.status, r.fetched) for r in report.results] == [("fetched", 5), ("failed", 0)]
    assert "matches no study" in report.results[1].reason  # the other patient went on regardless
    files = sorted((site / "dicom" / "RC7" / "1.2.3.1").glob("*.dcm"))
    assert [f.stem for f in files] == [f"1.2.3.1.{k}" for k in range(5)]
    assert {str(pydicom.dcmread(f).PatientID) for f in files} == {"RC7"}  # prepare matches on the site's id
    files[1].unlink()
    pacs.retrieved.clear()
    report = _run(site, pacs, rows[:1])
    assert pacs.retrieved == ["1.2.3.1.1"] and report.results[0].present == 4
    report = _run(site, pacs, rows[:1])
    assert report.results[0].status == "skipped" and pacs.retrieved == ["1.2.3.1.1"]
    short = tmp_path / "short"
    report = _run(short, FakePacs(drop=2), rows[:1])
    assert report.results[0].status == "failed"
    assert report.results[0].reason == ("series 2 't2_tse_tra': 3 of 5 instances retrieved (the PACS sent fewer than "
                                        "it lists); run fetch again")
    table = report.table()
    assert "RC7" in table and "failed" in table and "DOE" not in table and "MRN7" not in (short / "log.jsonl").read_text()


def test_atomic_write_leaves_no_partial_and_a_partial_is_never_dicom(tmp_path, monkeypatch):
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, _dataset("1.2.3.1.1", "1.2.3.1"), enforce_file_format=True)
    data = buf.getvalue()
    target = tmp_path / "1.2.3.1.1.dcm"

    def dying(fh, body):
        fh.write(body[: len(body) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "_write_body", dying)
    with pytest.raises(KeyboardInterrupt):
        fetch.write_instance(target, data)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    partial = tmp_path / ".1.2.3.1.1.dcm.partial"  # as a kill between the body and the prefix leaves it
    partial.write_bytes(b"\0" * 132 + data[132:])
    with pytest.raises(NotAnImage, match="not a DICOM file"):
        read_headers(partial)
    fetch.write_instance(target, data)  # the re-run writes through the same partial name
    assert target.read_bytes() == data and read_headers(target)[0].sop_uid == "1.2.3.1.1"
    assert not partial.exists()
    partial.write_bytes(b"\0" * 132)
    store = fetch.PatientStore(tmp_path.parent, tmp_path.name)
    store.images = tmp_path
    assert store.clean_partials() == 1 and not partial.exists()
    with pytest.raises(fetch.FetchError, match="malformed UID"):
        store.path(SeriesInfo("1.2.3.1"), "../../etc")


def test_readme_documents_every_pacs_key_and_its_example_parses(tmp_path):
    import re
    import tomllib

    text = (Path(__file__).resolve().parents[1] / "client" / "README.md").read_text()
    section = text.split("`[pacs]` (client/fetch.py)", 1)[1].split("\n\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    documented = {k for ln in rows for k in re.findall(r"`([a-z-]+)`", ln.split("|")[1])}
    documented |= {k for ln in rows for k in re.findall(r"`(tls-[a-z]+)`", ln)}
    assert documented == set(fetch.PACS_KEYS)
    block = text.split("[pacs.main]", 1)[1].split("```", 1)[0]
    pacs = fetch.parse_pacs(tomllib.loads("[pacs.main]" + block)["pacs"], tmp_path)
    assert pacs["main"].auth == "basic" and pacs["archive"].retrieve == "c-move" and pacs["archive"].move_ae == "SLMFED"


def test_dicomweb_over_tls_verifies_the_site_ca_bundle(tmp_path, monkeypatch):
    """A local HTTPS QIDO endpoint (certificate from a throwaway CA; Debian's Orthanc 1.10 cannot
    serve HTTPS): with the site's CA bundle the query goes through and carries the bearer token;
    with another CA it is one line naming TLS and ca-bundle."""
    import json as _json
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from client.pacs_dicomweb import DicomWebTransport
    from simulation.orthanc import make_tls

    ca, server_pem = make_tls(tmp_path / "good")
    other_ca, _ = make_tls(tmp_path / "other")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_ca))  # the site's ca-bundle wins over the environment's
    seen = []

    class Qido(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            page = [] if "offset=0" not in self.path else [{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00080020": {"vr": "DA", "Value": ["20190301"]},
                                 "00080061": {"vr": "CS", "Value": ["MR"]}}]  # get_remaining asks for the next page
            body = _json.dumps(page).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Qido)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server_pem)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{httpd.server_address[1]}/dicom-web"
        table = {"transport": "dicomweb", "url": url, "auth": "token", "secret-file": "s", "timeout-s": 5}
        good = DicomWebTransport(fetch.parse_pacs({**table, "ca-bundle": str(ca)}, tmp_path)["default"], "tok")
        assert good.find_studies("MRN1", "") == [StudyInfo("1.2.3", "20190301", ("MR",))]
        assert seen[0][1] == "Bearer tok" and "PatientID=MRN1" in seen[0][0]
        bad = DicomWebTransport(fetch.parse_pacs({**table, "ca-bundle": str(other_ca)}, tmp_path)["default"], "tok")
        with pytest.raises(fetch.PacsError, match=r"TLS verification failed .*check 'ca-bundle'") as err:
            bad.find_studies("MRN1", "")
        assert err.value.fatal and "\n" not in str(err.value) and len(seen) == 2
    finally:
        httpd.shutdown()
        httpd.server_close()
