"""`slmfed fetch` against a real Orthanc (#29): a tiny synthetic cohort (classic and enhanced
exports, SEG and RTSTRUCT masks, a decoy localizer per patient, a second exam outside the date
window, PACS PatientIDs that differ from the site's patient_ids, names and birth dates set) is
stored into a private Orthanc on loopback; fetched over DICOMweb, DIMSE C-GET and DIMSE C-MOVE,
each fetched site prepares to the same per-patient arrays as the cohort's own folders. An
interruption injected mid-write leaves no partial file and the re-run completes without
duplicates; a wrong password, an unknown AE title, an unreachable PACS and an accession that
matches nothing each give one line naming the problem while the other patients are fetched.
Skips (saying why) where Orthanc or its DICOMweb plugin is not installed (.ci/run installs them).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client import fetch
from client.cache import id_map_path
from client.prepare import prepare_site
from client.series import SeriesRules
from common.config import load_config
from simulation import orthanc as orthanc_mod

pytestmark = pytest.mark.skipif(bool(orthanc_mod.missing()), reason=orthanc_mod.missing() or "ok")

FORMS = [("enhanced", "seg"), ("classic", "rtstruct"), ("classic", "seg"), ("enhanced", "rtstruct")]
NAME, BIRTH = "DOE^JANE", "19580317"
MOVE_AE = "SLMFETCH"


def write_cohort(site: Path) -> list[str]:
    """The tiny preset's external centre (4 patients), each in its own export and mask form."""
    from simulation.synth.cohort import _clinical_csv, _PatientTask, _write_patient, draw_site
    from simulation.synth.model import oracle_risks
    from simulation.synth.scanners import site_specs

    spec = site_specs("tiny", None, 0)[1]
    d = draw_site(spec, 0, 1)
    risks = oracle_risks(spec.population, d)
    (site / "dicom").mkdir(parents=True)
    (site / "masks").mkdir()
    ids = [f"{spec.id_prefix}-{i + 1:04d}" for i in range(spec.n)]
    (site / "clinical.csv").write_text(_clinical_csv(ids, d))
    for i, pid in enumerate(ids):
        export, masks = FORMS[i % len(FORMS)]
        _write_patient(_PatientTask(site, spec, pid, 0, 1, i, d.features[i], d.row(i), float(d.risk[i]), float(d.z[i]),
                                    {n: float(r[i]) for n, r in risks.items()}, export, masks))
    return ids


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def pacs_copy(site: Path, ids: list[str]) -> tuple[list[bytes], dict]:
    """What the hospital's PACS holds: the cohort with PACS PatientIDs (MRN...), accession numbers,
    a name and birth date, plus per patient a decoy localizer and, for the first, a later exam."""
    from pydicom.uid import generate_uid

    out, facts = [], {"dates": {}, "decoy_sops": set()}
    files = [p for root in ("dicom", "masks") for p in sorted((site / root).rglob("*")) if p.is_file()]
    later: list = []
    for p in files:
        ds = pydicom.dcmread(p)
        pid = str(ds.PatientID)
        k = ids.index(pid)
        facts["dates"][pid] = str(ds.StudyDate)
        ds.PatientID, ds.AccessionNumber = f"MRN{k:05d}", f"ACC{k:04d}"
        ds.PatientName, ds.PatientBirthDate = f"{NAME}{k}", BIRTH
        out.append(_bytes(ds))
        if ds.Modality == "MR" and "LOCALIZER" not in ds.get("ImageType", []) and int(ds.SeriesNumber) == 2:
            if not any(x.SeriesInstanceUID == ds.SeriesInstanceUID for x in later if x.PatientID == ds.PatientID):
                loc = pydicom.dcmread(p)  # one decoy localizer image per patient, in the same study
                loc.PatientID, loc.AccessionNumber, loc.PatientName = ds.PatientID, ds.AccessionNumber, ds.PatientName
                loc.SeriesInstanceUID = generate_uid(entropy_srcs=["decoy", pid])
                loc.SOPInstanceUID = loc.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["decoy-sop", pid])
                loc.SeriesDescription = loc.ProtocolName = "localizer 3-plane"
                loc.SeriesNumber = 1
                facts["decoy_sops"].add(str(loc.SOPInstanceUID))
                out.append(_bytes(loc))
            later.append(ds)
        if k == 0 and ds.Modality == "MR":  # the first patient's later (post-treatment) exam: outside the window
            re = pydicom.dcmread(p)
            re.PatientID, re.PatientName = ds.PatientID, ds.PatientName
            re.AccessionNumber = "ACC-LATER"
            re.StudyInstanceUID = generate_uid(entropy_srcs=["later-study", pid])
            re.SeriesInstanceUID = generate_uid(entropy_srcs=["later-series", str(ds.SeriesInstanceUID)])
            re.SOPInstanceUID = re.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                entropy_srcs=["later", str(ds.SOPInstanceUID)])
            re.StudyDate = str(int(ds.StudyDate[:4]) + 2) + ds.StudyDate[4:]
            facts["decoy_sops"].add(str(re.SOPInstanceUID))
            out.append(_bytes(re))
    return out, facts


def _cache(cache: Path) -> dict[str, dict]:
    ids = dict(csv.reader(open(id_map_path(cache), encoding="utf-8")))
    out = {}
    for p in (cache / "patients").glob("*.npz"):
        with np.load(p) as z:
            out[ids[p.stem]] = {k: z[k] for k in z.files}
    return out


def _secret(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    os.chmod(path, 0o600)
    return str(path)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch-e2e")
    own = root / "own"
    ids = write_cohort(own)
    objects, facts = pacs_copy(own, ids)
    move_port = orthanc_mod.free_port()
    server = orthanc_mod.Orthanc(root / "orthanc", modalities={MOVE_AE: ("127.0.0.1", move_port)})
    server.start()
    try:
        for data in objects:
            server.request("POST", "/instances", data)
        cfg = load_config(cli={"workers": 1})
        ref = prepare_site(own, root / "cache-own", cfg, progress=False)
        assert ref.included == len(ids)
        yield {"root": root, "own": own, "ids": ids, "facts": facts, "server": server, "move_port": move_port,
               "cfg": cfg, "ref": _cache(root / "cache-own"), "n_objects": len(objects)}
    finally:
        server.stop()


def worklist(path: Path, ids: list[str], facts: dict, rows: dict | None = None) -> Path:
    """patient_id, pacs_patient_id / accession, a window around the pre-treatment exam, pacs."""
    lines = ["patient_id,pacs_patient_id,accession,date_from,date_to,pacs"]
    for k, pid in enumerate(ids):
        d = facts["dates"][pid]
        y = int(d[:4])
        row = {"pacs_patient_id": f"MRN{k:05d}" if k % 2 == 0 else "", "accession": f"ACC{k:04d}" if k % 2 else "",
               "date_from": f"{y - 1}{d[4:]}", "date_to": f"{y + 1}{d[4:]}" if k == 0 else "", "pacs": ""}
        row.update((rows or {}).get(pid, {}))
        lines.append(",".join([pid] + [row[c] for c in ("pacs_patient_id", "accession", "date_from", "date_to", "pacs")]))
    path.write_text("\n".join(lines) + "\n")
    return path


def pacs_tables(p: dict, secret: str) -> dict:
    s = p["server"]
    return {
        "web": {"transport": "dicomweb", "url": s.dicomweb_url, "auth": "basic", "username": s.username,
                "secret-file": secret, "timeout-s": 10},
        "get": {"transport": "dimse", "host": "127.0.0.1", "port": s.dicom_port, "called-ae": s.aet,
                "calling-ae": MOVE_AE, "retrieve": "c-get", "timeout-s": 10},
        "move": {"transport": "dimse", "host": "127.0.0.1", "port": s.dicom_port, "called-ae": s.aet,
                 "calling-ae": MOVE_AE, "retrieve": "c-move", "move-port": p["move_port"], "timeout-s": 10},
    }


def run_fetch(p: dict, site: Path, name: str, tables: dict, wl: Path, **kw):
    lines: list[str] = []
    pacs = fetch.parse_pacs(tables, site)
    report = fetch.fetch_site(site, fetch.read_worklist(wl), pacs, name, SeriesRules(), progress=False,
                              log_path=site / fetch.LOG_NAME, echo=lines.append, **kw)
    return report, lines


def _site(p: dict, name: str) -> Path:
    site = p["root"] / name
    site.mkdir()
    (site / "clinical.csv").write_text((p["own"] / "clinical.csv").read_text())
    return site


@pytest.mark.parametrize("transport", ["web", "get", "move"])
def test_fetched_site_prepares_to_the_same_cache(pacs, transport):
    p = pacs
    site = _site(p, f"site-{transport}")
    secret = _secret(p["root"] / f"secret-{transport}", p["server"].password)
    wl = worklist(p["root"] / f"wl-{transport}.csv", p["ids"], p["facts"])
    report, lines = run_fetch(p, site, transport, pacs_tables(p, secret), wl)
    assert report.counts() == {"fetched": 4, "skipped": 0, "failed": 0}, report.table()
    on_disk = [f for f in site.rglob("*") if f.is_file() and f.suffix == ".dcm"]
    sops = [f.stem for f in on_disk]
    assert len(sops) == len(set(sops))
    assert not set(sops) & p["facts"]["decoy_sops"]  # no localizer, nothing of the later exam
    assert not [f for f in site.rglob("*.partial")]
    assert all(r.series_left_out == 1 for r in report.results)
    got = {str(pydicom.dcmread(f, stop_before_pixels=True).PatientID) for f in on_disk}
    assert got == set(p["ids"])  # the PACS's MRNs became the site's patient_ids
    masks = sorted(site.glob("masks/*/*.dcm"))
    assert len(masks) == 4
    text = "\n".join(lines) + report.table() + (site / fetch.LOG_NAME).read_text()
    assert NAME not in text and BIRTH not in text and "MRN" not in text and "ACC" not in text
    import tomli_w

    (site / "site.toml").write_bytes(tomli_w.dumps({"pacs": pacs_tables(p, secret)}).encode())  # prepare reads it too
    cache = p["root"] / f"cache-{transport}"
    rep = prepare_site(site, cache, load_config(toml_path=site / "site.toml", cli={"workers": 1}), progress=False)
    assert rep.included == 4, rep.summary()
    got = _cache(cache)
    assert sorted(got) == sorted(p["ref"])
    for pid, ref in p["ref"].items():
        for key in ("image", "roi", "clinical", "label"):
            np.testing.assert_array_equal(got[pid][key], ref[key], err_msg=f"{transport} {pid} {key}")
    if transport != "web":  # the resume check below runs once (the same fetch_patient code for every transport)
        return
    again, _ = run_fetch(p, site, transport, pacs_tables(p, secret), wl)  # resume: nothing fetched twice
    assert again.counts() == {"fetched": 0, "skipped": 4, "failed": 0}
    assert sum(r.fetched for r in again.results) == 0
    log = [json.loads(x) for x in (site / fetch.LOG_NAME).read_text().splitlines()]
    assert [x["event"] for x in log].count("patient") == 8


def test_interrupted_fetch_leaves_no_partial_file_and_the_rerun_completes(pacs, monkeypatch):
    """An exception injected half-way through writing the 7th object stands for a kill: nothing
    half-written stays (and a partial file a SIGKILL would leave is not DICOM to prepare's scan and
    is removed by the re-run); the re-run fetches only what is missing, each SOP instance once."""
    from client.dicom_scan import NotAnImage, read_headers

    p = pacs
    site = _site(p, "site-interrupted")
    secret = _secret(p["root"] / "secret-int", p["server"].password)
    wl = worklist(p["root"] / "wl-int.csv", p["ids"], p["facts"])
    calls = {"n": 0}
    real = fetch._write_body

    def dying(fh, data):
        calls["n"] += 1
        if calls["n"] == 7:
            fh.write(data[: len(data) // 2])
            raise KeyboardInterrupt("injected")
        real(fh, data)

    monkeypatch.setattr(fetch, "_write_body", dying)
    with pytest.raises(KeyboardInterrupt):
        run_fetch(p, site, "web", pacs_tables(p, secret), wl)
    monkeypatch.setattr(fetch, "_write_body", real)
    written = [f for f in site.rglob("*.dcm")]
    assert len(written) == 6 and not list(site.rglob("*.partial"))
    for f in written:  # every file on disk is whole
        assert read_headers(f)[0].sop_uid == f.stem
    killed = written[0].with_name(f".{'1.2.3.4'}.dcm.partial")  # what a SIGKILL mid-write leaves
    killed.write_bytes(b"\0" * 132 + written[0].read_bytes()[132:1000])
    with pytest.raises(NotAnImage, match="not a DICOM file"):
        read_headers(killed)
    report, _ = run_fetch(p, site, "web", pacs_tables(p, secret), wl)
    assert report.counts()["failed"] == 0, report.table()
    assert sum(r.present for r in report.results) == 6
    assert not list(site.rglob("*.partial"))
    sops = [f.stem for f in site.rglob("*.dcm")]
    assert len(sops) == len(set(sops)) == sum(r.present + r.fetched for r in report.results)


def test_each_connection_problem_is_one_line_and_the_other_patients_are_fetched(pacs, tmp_path, capsys):
    """Through the command line: site.toml [pacs.NAME] tables, secrets in 0600 files; a wrong password,
    an unknown called AE title, an unreachable PACS and an accession that matches nothing."""
    import tomli_w

    from common.cli import main

    p = pacs
    site = _site(p, "site-errors")
    good = _secret(tmp_path / "good", p["server"].password)
    bad = _secret(tmp_path / "bad", "not-the-password")
    tables = pacs_tables(p, good)
    tables["badpw"] = {**tables["web"], "secret-file": bad}
    tables["badae"] = {**tables["get"], "called-ae": "NOSUCHPACS"}
    tables["down"] = {**tables["web"], "url": f"http://127.0.0.1:{orthanc_mod.free_port()}/dicom-web"}
    (site / "site.toml").write_bytes(tomli_w.dumps({"pacs": tables}).encode())
    ids = p["ids"]
    wl = worklist(tmp_path / "wl.csv", ids, p["facts"], {ids[1]: {"pacs": "badpw"}, ids[2]: {"pacs": "badae"},
                                                          ids[3]: {"pacs": "down"}})
    with open(wl, "a") as fh:
        fh.write("RC-NOPE,,ACC-NO-SUCH,,,web\n")
    rc = main(["fetch", str(site), "--worklist", str(wl), "--pacs", "web", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1, out
    lines = {ln.split(":", 1)[0]: ln for ln in out.splitlines() if ln.startswith(tuple(ids) + ("RC-NOPE",))
             and ": " in ln and not ln.startswith("patient_id")}
    assert lines[ids[0]].startswith(f"{ids[0]}: fetched"), out
    assert "PACS 'badpw'" in lines[ids[1]] and "refused the credentials (HTTP 401" in lines[ids[1]], out
    assert "PACS 'badae'" in lines[ids[2]] and "called ae title not recognised" in lines[ids[2]].lower(), out
    assert "PACS 'down'" in lines[ids[3]] and "unreachable (connection refused)" in lines[ids[3]], out
    assert "AccessionNumber of worklist line 6 matches no study" in lines["RC-NOPE"], out
    for pid in ids[1:] + ["RC-NOPE"]:
        assert lines[pid].count("\n") == 0 and ": failed: " in lines[pid]
    assert "fetched 1, skipped 0 (already on disk), failed 4" in out, out
    assert (site / "dicom" / ids[0]).is_dir() and not (site / "dicom" / ids[1]).exists()
    assert "not-the-password" not in out and p["server"].password not in out and "ACC-NO-SUCH" not in out
    os.chmod(bad, 0o644)  # a secret others can read is refused before anything is asked
    tables = {"web": {**tables["web"], "secret-file": bad}}
    (site / "site.toml").write_bytes(tomli_w.dumps({"pacs": tables}).encode())
    rc = main(["fetch", str(site), "--worklist", str(wl), "--pacs", "web", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "readable by others (mode 0644)" in out and "chmod 600" in out
