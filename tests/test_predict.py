"""`slmfed predict` at a site: the study's final models on the synthetic external centre give the
study's own external-evaluation numbers; mismatched model / preprocessing, missing inputs and
out-of-range clinical inputs give clear errors or marked warnings; the reports stay self-contained."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.app import app as client_app
from client.cache import id_map_path
from client.predict import NOT_ASSIGNED, PredictError, load_bundle, run_predict
from client.prepare import prepare_site
from common.cli import main as slmfed
from common.config import load_config
from server.checkpoint import Checkpoint
from server.protocol import Federation, Study
from server.report import write_run_folder
from simulation.synth import generate_cohort
from tests.browser import Page, find_chromium
from tests.fedtools import LocalGrid

TINY = {"folds": 2, "num-rounds": 1, "local-epochs": 1, "batch-size": 8, "clinical-embed-dim": 4, "augment": False,
        "seed": 3, "cf-l2": 0.5, "site-timeout-s": 5.0}
SITES = ("center-primary", "center-external")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The paper study on the small synthetic cohort (28 + 12 patients), in process: the same
    ServerApp protocol and ClientApp code that `slmfed simulate` runs through Ray."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "cohort"
    generate_cohort(data, preset="small", seed=0, progress=False)
    nodes = []
    for s in SITES:
        prepare_site(data / s, data / "caches" / s, load_config(cli={"workers": 2}), progress=False)
        nodes.append({"cache-dir": str(data / "caches" / s), "site-name": s, "min-cell-size": 3})
    run_dir = root / "run"
    cfg = load_config(run_config={**TINY, "run-dir": str(run_dir)})
    state = Study(Federation(LocalGrid(client_app, nodes), min_sites=2, timeout_s=5), cfg, Checkpoint(run_dir)).run()
    write_run_folder(run_dir, state, cfg)
    return {"root": root, "data": data, "run": run_dir, "model": run_dir / "models" / "final.json",
            "study_id": state["study_id"]}


def _stored(study, model: str) -> dict[str, float]:
    """The external centre's own stored per-patient scores of the study's external evaluation."""
    cache = study["data"] / "caches" / "center-external"
    ids = dict(csv.reader(open(id_map_path(cache), encoding="utf-8")))
    with np.load(cache.parent / "center-external-study" / study["study_id"] / "final" / model / "fold-1-all.npz") as z:
        return {ids[str(k)]: float(p) for k, p in zip(z["keys"], z["probs"])}


def _worklist(out: Path) -> dict[str, dict]:
    with open(out / "worklist.csv", newline="", encoding="utf-8") as fh:
        return {r["patient_id"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def predicted(study):
    """`slmfed predict` on the whole external centre, as a site would type it."""
    out = study["root"] / "predicted"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = slmfed(["predict", "--model", str(study["model"]), str(study["data"] / "center-external"),
                       "--out", str(out)])
    return code, buf.getvalue(), out


def test_predict_on_the_external_centre_gives_the_studys_external_evaluation(study, predicted):
    code, printed, out = predicted
    assert code == 0
    bundle = load_bundle(study["model"])
    assert bundle.model_id in printed and study["study_id"] in printed and "center-primary (28 patients)" in printed
    rows = _worklist(out)
    assert len(rows) == 12 and all(r["status"] == "predicted" for r in rows.values())
    t = bundle.meta["thresholds"]["combined"]
    for model in ("cf", "dl", "combined"):
        stored = _stored(study, model)
        assert set(stored) == set(rows)
        for pid, p in stored.items():
            assert float(rows[pid][f"p_{model}"]) == p, (model, pid)  # the same number, bit for bit
    for pid, r in rows.items():
        p = float(r["p_combined"])
        assert r["risk_group"] == ("high risk" if p >= t else "low risk")
        assert f"{pid:<16}" in printed and r["risk_group"] in printed
        assert r["attention_in_roi_dl"] == "" or 0.0 <= float(r["attention_in_roi_dl"]) <= 1.0  # "": a zero map
        html = (out / r["report"]).read_text()
        assert f"{p:.3f}" in html and "data:image/png;base64," in html
        assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    # the development operating point in the model file is the report's primary-cohort row
    res = json.loads((study["run"] / "results.json").read_text())
    row = next(r for r in res["rows"] if r["model"] == "combined" and r["tag"] == "cv")
    dev = bundle.meta["development"]["combined"]
    assert (dev["sensitivity"], dev["specificity"]) == (row["sensitivity"], row["specificity"])
    ext_row = next(r for r in res["rows"] if r["model"] == "combined" and r["kind"] == "final")
    (ext,) = bundle.meta["external"]["combined"]  # the external validation row, at the development threshold
    assert (ext["cohort"], ext["sensitivity"], ext["specificity"]) == (
        ext_row["cohort"], ext_row["sensitivity"], ext_row["specificity"])
    assert (study["run"] / "report.html").is_file()


def _patient_folder(study, pid: str, dest: Path, clinical: str) -> Path:
    """One patient's folder as a hospital might export it: DICOM files, mask.nii.gz, clinical.csv."""
    site = study["data"] / "center-external"
    dest.mkdir()
    for exam in (site / "dicom").iterdir():
        first = next(p for p in exam.rglob("*") if p.is_file())
        if pydicom.dcmread(first, stop_before_pixels=True).PatientID == pid:
            shutil.copytree(exam, dest / "dicom-export")
    shutil.copy(site / "masks" / f"{pid}.nii.gz", dest / "mask.nii.gz")
    (dest / "clinical.csv").write_text(clinical)
    return dest


def test_a_patient_folder_without_label_and_an_out_of_range_marker(study, tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"slmfed predict tried to open a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # nothing of predict leaves the site
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    pid = "P2-0003"
    row = next(r for r in csv.DictReader(open(study["data"] / "center-external" / "clinical.csv")) if r["patient_id"] == pid)
    folder = _patient_folder(study, pid, tmp_path / "patient",
                             f"patient_id,sex,tumor_site,cea,ca199\n{pid},{row['sex']},{row['tumor_site']},5000,{row['ca199']}\n")
    results = run_predict(study["model"], folder, tmp_path / "out")
    assert [r.status for r in results] == ["predicted"]
    r = results[0]
    assert any("CEA 5000 ng/mL is outside the development range" in w for w in r.warnings), r.warnings
    assert any("plausibility bound" in w for w in r.warnings)
    html = Path(r.report).read_text()
    assert 'id="warnings"' in html and "out of range" in html and "CEA 5000" in html
    assert "CEA 5000" in _worklist(tmp_path / "out")[pid]["warnings"]
    assert r.risk_group == NOT_ASSIGNED and "No risk group is assigned" in html
    assert _worklist(tmp_path / "out")[pid]["risk_group"] == NOT_ASSIGNED
    forced = run_predict(study["model"], folder, tmp_path / "forced", allow_out_of_range=True)[0]
    t = load_bundle(study["model"]).meta["thresholds"]["combined"]
    assert forced.risk_group == ("high risk" if forced.probs["combined"] >= t else "low risk")
    assert "--allow-out-of-range</code> was given" in Path(forced.report).read_text()
    # the ensemble range: the model's prediction is the mean logit of exactly these networks
    for m in ("dl", "combined"):
        members = np.asarray(r.member_probs[m])
        assert len(members) == 3 and members.min() <= r.probs[m] <= members.max()
        logit = np.log(members / (1 - members)).mean()
        assert 1 / (1 + np.exp(-logit)) == pytest.approx(r.probs[m], rel=1e-5)
    # the same image through the MRI DL model: the study's number (up to float32 rounding, as a batch
    # of one patient instead of the centre's 12), whatever the CEA
    assert r.probs["dl"] == pytest.approx(_stored(study, "dl")[pid], rel=1e-5, abs=1e-7)


def test_missing_inputs_are_reported_per_patient_and_unknown_ids_refused(study, tmp_path):
    src = study["data"] / "center-external"
    site = tmp_path / "site"
    site.mkdir()
    (site / "dicom").symlink_to(src / "dicom")
    (site / "masks").mkdir()
    for m in (src / "masks").iterdir():
        if m.name != "P2-0002.nii.gz":
            (site / "masks" / m.name).symlink_to(m)
    lines = (src / "clinical.csv").read_text().splitlines()
    (site / "clinical.csv").write_text("\n".join(lines + ["P2-9999,F,low,2.0,10.0,"]) + "\n")
    results = {r.patient_id: r for r in run_predict(study["model"], site, tmp_path / "out",
                                                    patients=["P2-0001", "P2-0002", "P2-9999"], attention=False)}
    assert results["P2-0001"].status == "predicted"
    assert results["P2-0002"].status == "not predicted" and "mask" in results["P2-0002"].reason
    assert results["P2-9999"].status == "not predicted" and "DICOM" in results["P2-9999"].reason
    with pytest.raises(PredictError, match="--patient P2-4242: not in"):
        run_predict(study["model"], site, tmp_path / "out2", patients=["P2-4242"])


def _tampered(study, tmp_path, edit) -> Path:
    models = tmp_path / "models"
    shutil.copytree(study["model"].parent, models)
    meta = json.loads((models / "final.json").read_text())
    edit(meta)
    (models / "final.json").write_text(json.dumps(meta))
    return models / "final.json"


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m["preprocessing"].update({"channels": ["t2", "dwi"], "image-shape": [2, 64, 64]}), "channels"),
    (lambda m: m["preprocessing"].update({"crop-size": 96, "image-shape": [3, 96, 96]}), "crop-size"),
    (lambda m: m["preprocessing"].update({"clinical-encoding": "slmfed-clinical-2"}), "clinical-encoding"),
    (lambda m: m["preprocessing"].pop("clinical-encoding"), "lacks clinical-encoding"),
    (lambda m: m["models"]["dl"].update({"sha256": "0" * 64}), "does not match the sha256"),
    (lambda m: m["models"]["dl"].update({"weights": "../../secret.npz"}), "not a plain file name"),
    (lambda m: m.update({"preprocessing_conflicts": {"fov-mm": {"a": 48, "b": 60}}}), "prepared their inputs differently"),
])
def test_a_model_that_does_not_match_the_sites_preprocessing_is_refused(study, tmp_path, edit, expected):
    model = _tampered(study, tmp_path, edit)
    with pytest.raises(PredictError, match=expected):
        run_predict(model, study["data"] / "center-external", tmp_path / "out")
    assert not (tmp_path / "out" / "worklist.csv").exists()  # refused before anything was predicted


def test_site_settings_that_differ_from_the_model_are_refused_before_any_image_is_read(study, tmp_path):
    for key, value in (("crop-size", 32), ("fov-mm", 60.0), ("input-mode", "2.5d")):
        cfg = load_config(cli={key: value})
        with pytest.raises(PredictError, match=f"{key} .* the model expects"):
            run_predict(study["model"], study["data"] / "center-external", tmp_path / key, cfg=cfg)
        assert not (tmp_path / key / "prepared").exists()
    assert slmfed(["predict", "--model", str(tmp_path / "nowhere"), str(study["data"] / "center-external"),
                   "--out", str(tmp_path / "o")]) == 2


def test_attention_mass_counts_the_dilated_roi():
    from client.predict import attention_mass_in_roi

    cam = np.zeros((1, 20, 20))
    roi = np.zeros((1, 20, 20), np.uint8)
    roi[0, 8:12, 8:12] = 1
    cam[0, 9, 9] = 3.0      # inside the ROI
    cam[0, 8, 13] = 1.0     # 2 px beside it: inside when grown by 2 px (1 mm pixels, 2 mm margin)
    cam[0, 0, 0] = 4.0      # far away
    assert attention_mass_in_roi(cam, roi, pixel_mm=1.0, margin_mm=2.0) == pytest.approx(0.5)
    assert attention_mass_in_roi(cam, roi, pixel_mm=1.0, margin_mm=0.0) == pytest.approx(0.375)
    assert np.isnan(attention_mass_in_roi(np.zeros_like(cam), roi, 1.0))


NO_BROWSER = "no Chromium here (.ci/run installs the Debian package `chromium`)"
RECTS = """[...document.images].map(i => { const r = i.getBoundingClientRect();
  return {id: i.id, cls: i.className, ok: i.complete && i.naturalWidth > 0,
          box: [Math.round(r.left + scrollX), Math.round(r.top + scrollY), Math.round(r.width), Math.round(r.height)]}; })"""


def _crop(shot: np.ndarray, box) -> np.ndarray:
    x, y, w, h = box
    return shot[y:y + h, x:x + w]


@pytest.mark.skipif(find_chromium() is None, reason=NO_BROWSER)
def test_the_reports_render_in_headless_chromium_with_images_overlay_and_numbers(study, predicted, tmp_path):
    out = predicted[2]
    bundle = load_bundle(study["model"])
    shown = next(r for r in _worklist(out).values() if r["attention_in_roi_dl"])  # a non-zero map
    probs = {m: float(shown[f"p_{m}"]) for m in ("cf", "dl", "combined")}
    bad = tmp_path / "bad.html"  # the checks below can fail: a page with a blocked load and a console error
    bad.write_text('<html><body><img src="http://slmfed.invalid/x.png"><script>console.error("boom")</script></body></html>')
    with Page(find_chromium(), tmp_path / "profile-bad") as page:
        page.open(bad)
        assert any("boom" in e for e in page.errors())
    with Page(find_chromium(), tmp_path / "profile") as page:
        page.open(out / shown["report"])
        shot = page.screenshot()
        images = page.evaluate(RECTS)
        text = page.evaluate("document.body.innerText")
        assert page.errors() == []
        assert [i["id"] or i["cls"] for i in images] == ["channels", "attention", "attention"]
        assert all(i["ok"] for i in images)
        for model in ("cf", "dl", "combined"):
            assert f"{probs[model]:.3f}" in text
        assert shown["risk_group"] in text and bundle.model_id in text
        assert shot.std() > 0.1  # not a blank page
        channels = _crop(shot, images[0]["box"])
        red = (channels[..., 0] > 0.7) & (channels[..., 1] < 0.35) & (channels[..., 2] < 0.35)
        assert red.sum() > 50, "the ROI outline is not visible on the input channels"
        overlay = _crop(shot, images[1]["box"])
        saturation = overlay.max(axis=-1) - overlay.min(axis=-1)
        assert (saturation > 0.3).mean() > 0.2, "the attention overlay is not visible"
        assert channels.std() > 0.1 and overlay.std() > 0.1
        # the study's report.html: report.md's tables and the figures, inline
        page.open(study["run"] / "report.html")
        shot = page.screenshot()
        images = page.evaluate(RECTS)
        text = page.evaluate("document.body.innerText")
        assert page.errors() == []
        assert len(images) >= 6 and all(i["ok"] for i in images)  # ROC, DCA, calibration x 2 cohorts, ...
        res = json.loads((study["run"] / "results.json").read_text())
        for r in res["rows"]:
            assert f"{r['auc']:.3f} ({r['auc_ci_low']:.3f}-{r['auc_ci_high']:.3f})" in text
        assert all(_crop(shot, i["box"]).std() > 0.05 for i in images)


def test_categories_no_development_patient_had_and_ids_that_are_no_file_names():
    from client.clinical_table import ClinicalRow
    from client.predict import ModelBundle, range_warnings
    from client.predict_report import report_filename
    from server.model_bundle import clinical_ranges

    #                    sex   mid   high  log_cea log_ca199 cea>5 ca>37
    ranges = clinical_ranges([0.5, 0.4, 0.0, 1.5, 2.8, 0.4, 0.3], [0.5, 0.49, 1.0, 0.8, 0.9, 0.49, 0.46])
    bundle = ModelBundle(Path("model.json"), {"clinical_ranges": ranges, "clinical_range_z": 3.0})
    high = ClinicalRow("x", 2, sex="F", tumor_site="high", cea=3.0, ca199=10.0)
    assert range_warnings(bundle, high) == ["tumor_site high: no development patient had this value"]
    assert range_warnings(bundle, ClinicalRow("y", 3, sex="M", tumor_site="mid", cea=3.0, ca199=10.0)) == []
    assert report_filename("P-001") == "P-001.html"
    names = {report_filename(p) for p in ("../../etc/x", "a/b", "a_b", "a b")}
    assert len(names) == 4 and all("/" not in n and not n.startswith(".") for n in names)
