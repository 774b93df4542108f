"""`prepare` on the synthetic two-center cohort (tiny preset): every patient, the right sequences,
labels as generated, and ADC in physical units matching the generator's truth."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from client.cache import id_map_path, load_cache
from client.prepare import prepare_site
from common.config import load_config
from simulation.synth import generate_cohort

EXPECTED = {
    "center-primary": ("t2_tse_tra", "ep2d_diff_b0_800_tra b=800", "scanner ep2d_diff_b0_800_tra_ADC"),
    "center-external": ("Ax T2 FRFSE", "DWI b1000 b=1000", "scanner dADC"),
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_cohort(root / "cohort", preset="tiny", seed=0, progress=False)
    truth = json.loads((root / "cohort" / "truth.json").read_text())
    cfg = load_config(cli={"workers": 2})
    reports = {s: prepare_site(root / "cohort" / s, root / "cache" / s, cfg, progress=False) for s in EXPECTED}
    return root, truth, reports


@pytest.mark.parametrize("site", sorted(EXPECTED))
def test_every_synthetic_patient_is_included_with_its_sequences(cohort, site):
    root, truth, reports = cohort
    n_truth = sum(1 for p in truth["patients"].values() if p["site"] == site)
    rep = reports[site]
    assert (rep.patients, rep.included, rep.excluded) == (n_truth, n_truth, 0), rep.reasons
    t2, dwi, adc = EXPECTED[site]
    assert rep.sequences["T2WI"] == {t2: n_truth} and rep.sequences["DWI"] == {dwi: n_truth}
    m = json.loads((root / "cache" / site / "manifest.json").read_text())
    assert all(e["sequences"]["adc"].startswith(adc) for e in m["patients"].values())


@pytest.mark.parametrize("site", sorted(EXPECTED))
def test_labels_and_tumour_adc_match_the_generator(cohort, site):
    root, truth, _ = cohort
    cache = root / "cache" / site
    data = load_cache(cache)
    ids = dict(csv.reader(open(id_map_path(cache), encoding="utf-8")))
    for key, img, label in zip(data.keys, data.images, data.labels):
        t = truth["patients"][ids[key]]
        assert label == t["slm"]
        # ADC channel = ADC / 3e-3 mm^2/s; the tumour sits at the crop centre
        adc_centre = float(img[2][28:36, 28:36].mean()) * 3e-3 * 1e6
        assert adc_centre == pytest.approx(t["tumor"]["adc_mean"], rel=0.2), ids[key]
        assert float(img[1][28:36, 28:36].mean()) > float(np.median(img[1]))  # tumour bright on high-b DWI
