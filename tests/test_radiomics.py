"""The handcrafted-feature ("radiomics") baseline: the features on known shapes and intensities, on
the tiny synthetic cohort against the generator's truth (the test reads truth.json, the feature code
never does), old caches refused with a clear message, and the baseline's repeated CV / external AUC."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from client import cache as cache_mod
from client.cache import CacheError, id_map_path, load_cache
from client.radiomics import CORE_MM, FEATURE_NAMES, VERSION, compute_features, load_features
from client.study import stratified_folds
from simulation.handcrafted import handcrafted_cv, handcrafted_external

F = {name: i for i, name in enumerate(FEATURE_NAMES)}
SPACING = (0.8, 0.8, 3.3)  # x, y, z mm: the primary centre's T2 grid


def _grid(shape=(24, 96, 96), spacing=SPACING):
    nz, ny, nx = shape
    z = (np.arange(nz) - (nz - 1) / 2)[:, None, None] * spacing[2]
    y = (np.arange(ny) - (ny - 1) / 2)[None, :, None] * spacing[1]
    x = (np.arange(nx) - (nx - 1) / 2)[None, None, :] * spacing[0]
    return z, y, x


def _ellipsoid(a=9.0, b=13.0, c=14.0):
    z, y, x = _grid()
    return ((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 <= 1).astype(np.uint8)


def _features(mask, t2=None, dwi=None, adc=None, spacing=SPACING):
    ones = np.ones(mask.shape)
    return compute_features(ones * 500 if t2 is None else t2, ones * 300 if dwi is None else dwi,
                            ones * 1e-3 if adc is None else adc, mask, spacing)


def test_volume_and_shape_of_a_known_ellipsoid():
    a, b, c = 9.0, 13.0, 14.0
    f = _features(_ellipsoid(a, b, c))
    truth_ml = 4 / 3 * math.pi * a * b * c / 1000
    assert f[F["volume_ml"]] == pytest.approx(truth_ml, rel=0.02)  # voxelisation of a 6.9 mL ellipsoid
    p = 1.6075  # Knud Thomsen's surface formula (error < 1.1 %)
    surface = 4 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)
    assert f[F["surface_mm2"]] == pytest.approx(surface, rel=0.10)  # Crofton estimate on 3.3 mm slices
    assert f[F["max_area_mm2"]] == pytest.approx(math.pi * a * b, rel=0.03)  # the centre slice
    sphericity = math.pi ** (1 / 3) * (6 * 4 / 3 * math.pi * a * b * c) ** (2 / 3) / surface
    assert f[F["sphericity"]] == pytest.approx(sphericity, rel=0.10)
    assert 0.5 < f[F["solidity"]] <= 1.0


def test_a_lobulated_margin_lowers_sphericity_and_solidity():
    z, y, x = _grid()
    r = np.sqrt((x / 11) ** 2 + (y / 11) ** 2 + (z / 11) ** 2)
    phi = np.arctan2(y, x)
    smooth = (r <= 1).astype(np.uint8)
    lobed = (r <= 1 + 0.3 * np.cos(5 * phi)).astype(np.uint8)
    fs, fl = _features(smooth), _features(lobed)
    assert fl[F["sphericity"]] < fs[F["sphericity"]] - 0.05
    assert fl[F["solidity"]] < fs[F["solidity"]] - 0.05


def test_adc_mean_of_a_constant_adc_roi_is_exact_and_the_border_ring_is_left_out():
    mask = _ellipsoid()
    value = 2.0 ** -10  # 0.98e-3 mm^2/s, a tumour ADC that float sums add up exactly
    adc = np.where(mask > 0, value, 0.6e-3)  # tumour in fat (fat has the lower ADC)
    f = _features(mask, adc=adc)
    assert f[F["adc_mean_mm2_s"]] == value and f[F["adc_p10_mm2_s"]] == value and f[F["adc_sd_mm2_s"]] == 0.0
    # the resampled coarse DWI grid mixes the outer ~2 mm of the ROI with its surroundings: the core skips it
    from scipy.ndimage import distance_transform_edt

    ring = np.zeros_like(mask, dtype=bool)
    for k in range(mask.shape[0]):
        if mask[k].any():
            d = distance_transform_edt(np.pad(mask[k], 1), sampling=SPACING[1::-1])[1:-1, 1:-1]
            ring[k] = (mask[k] > 0) & (d <= CORE_MM)
    assert ring.any()
    g = _features(mask, adc=np.where(ring, 0.6e-3, adc))
    assert g[F["adc_mean_mm2_s"]] == value and g[F["adc_p10_mm2_s"]] == value


def test_heterogeneity_features_do_not_depend_on_the_scanner_gain():
    mask = _ellipsoid()
    rng = np.random.default_rng(0)
    t2 = 520 * (1 + 0.2 * rng.standard_normal(mask.shape))
    dwi = 300 * (1 + 0.1 * rng.standard_normal(mask.shape))
    f1 = _features(mask, t2=t2, dwi=dwi)
    f2 = _features(mask, t2=3.1 * t2, dwi=0.45 * dwi)
    for name in ("t2_cv", "dwi_cv", "t2_glcm_contrast", "t2_glcm_entropy"):
        assert f2[F[name]] == pytest.approx(f1[F[name]], rel=1e-9), name
    assert f1[F["t2_cv"]] == pytest.approx(0.2, rel=0.15)
    smooth = _features(mask, t2=520 * (1 + 0.02 * rng.standard_normal(mask.shape)))
    assert smooth[F["t2_glcm_contrast"]] < f1[F["t2_glcm_contrast"]]
    assert smooth[F["t2_glcm_entropy"]] < f1[F["t2_glcm_entropy"]]


def test_bad_inputs_are_refused_with_the_reason():
    from client.radiomics import RadiomicsError

    mask = _ellipsoid()
    with pytest.raises(RadiomicsError, match="empty"):
        _features(np.zeros_like(mask))
    with pytest.raises(RadiomicsError, match="adc: shape"):
        _features(mask, adc=np.ones((3, 3, 3)))
    adc = np.full(mask.shape, 1e-3)
    adc[mask > 0] = np.nan
    with pytest.raises(RadiomicsError, match="adc: non-finite"):
        _features(mask, adc=adc)


# ---- the tiny synthetic cohort, through `slmfed prepare` ------------------------------------------

SITES = ("center-primary", "center-external")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from client.prepare import prepare_site
    from common.config import load_config
    from simulation.synth import generate_cohort

    root = tmp_path_factory.mktemp("radiomics")
    generate_cohort(root / "cohort", preset="tiny", seed=0, progress=False)
    truth = json.loads((root / "cohort" / "truth.json").read_text())
    cfg = load_config(cli={"workers": 1})
    for s in SITES:
        rep = prepare_site(root / "cohort" / s, root / "cache" / s, cfg, progress=False)
        assert rep.excluded == 0, rep.reasons
    return root, truth


def test_features_follow_the_generated_tumours(cohort):
    root, truth = cohort
    rows, tumours = [], []
    for s in SITES:
        cache = root / "cache" / s
        manifest = json.loads((cache / "manifest.json").read_text())
        assert manifest["radiomics_version"] == VERSION and manifest["radiomics_features"] == list(FEATURE_NAMES)
        data = load_cache(cache)
        ids = dict(csv.reader(open(id_map_path(cache), encoding="utf-8")))
        rows.append(load_features(cache, data.keys))
        tumours += [truth["patients"][ids[k]]["tumor"] for k in data.keys]
    X = np.vstack(rows)
    assert X.shape == (len(tumours), len(FEATURE_NAMES)) and len(tumours) == 12
    vol = [t["mask_volume_ml"] for t in tumours]
    assert spearmanr(X[:, F["volume_ml"]], vol)[0] > 0.9
    assert X[:, F["volume_ml"]] == pytest.approx(vol, rel=1e-6)  # the same mask, on the same grid
    adc = [t["adc_mean"] * 1e-6 for t in tumours]  # truth: 1e-6 mm^2/s
    assert spearmanr(X[:, F["adc_mean_mm2_s"]], adc)[0] > 0.9
    assert X[:, F["adc_mean_mm2_s"]] == pytest.approx(adc, rel=0.15)
    assert spearmanr(X[:, F["t2_cv"]], [t["heterogeneity"] for t in tumours])[0] > 0.7


def _strip_features(cache, keys_to_strip=None):
    """Rewrite a cache as one written before the features existed (or with patients lacking them)."""
    manifest = json.loads((cache / cache_mod.MANIFEST).read_text())
    if keys_to_strip is None:
        manifest.pop("radiomics_version")
        manifest.pop("radiomics_features")
        keys_to_strip = [k for k, e in manifest["patients"].items() if e["status"] == "included"]
    for key in keys_to_strip:
        with np.load(cache / cache_mod.PATIENTS_DIR / f"{key}.npz") as z:
            sha = cache_mod.write_patient(cache, key, z["image"], z["clinical"], int(z["label"]), roi=z["roi"])
        manifest["patients"][key]["sha256"] = sha
        manifest["patients"][key]["notes"] = manifest["patients"][key].get("notes", []) + ["radiomics: the ROI is empty"]
    cache_mod.atomic_write_json(cache / cache_mod.MANIFEST, manifest)


def test_an_old_cache_still_loads_and_the_baseline_asks_for_a_new_prepare(cohort, tmp_path):
    import shutil

    root, _ = cohort
    old = tmp_path / "old"
    shutil.copytree(root / "cache" / "center-primary", old)
    _strip_features(old)
    data = load_cache(old)  # old caches keep working for everything else
    assert len(data) == 8
    with pytest.raises(CacheError, match=r"no handcrafted \(radiomics\) features.*re-run `slmfed prepare`"):
        handcrafted_cv(old, [42], folds=2)
    with pytest.raises(CacheError, match="re-run `slmfed prepare`"):
        handcrafted_external(root / "cache" / "center-external", old)

    one = tmp_path / "one"
    shutil.copytree(root / "cache" / "center-primary", one)
    key = load_cache(one).keys[3]
    _strip_features(one, [key])
    with pytest.raises(CacheError, match=f"patient {key} has no handcrafted features.*the ROI is empty"):
        load_features(one, load_cache(one).keys)


# ---- the baseline on a made-up cache: per-seed AUCs, the study's folds ------------------------------

def _fake_cache(path, n, seed, signal=1.5):
    """A cache of n patients whose features carry a known signal (no images needed by the baseline)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    y[:6], y[6:12] = 1, 0  # enough of each class for 5 folds
    patients = {}
    for i in range(n):
        f = np.abs(rng.normal(1.0, 0.2, len(FEATURE_NAMES))) + 0.1
        f[F["volume_ml"]] *= math.exp(signal * y[i] * 0.5)
        f[F["adc_mean_mm2_s"]] = 1e-3 * (1.1 - 0.1 * signal * y[i] + 0.1 * rng.standard_normal())
        clinical = rng.normal(0, 1, 6).astype(np.float32) + signal * 0.5 * y[i]
        key = f"p{seed:04d}{i:012d}"
        sha = cache_mod.write_patient(path, key, np.zeros((3, 4, 4)), clinical, int(y[i]), radiomics=f)
        patients[key] = {"status": "included", "sha256": sha, "label": int(y[i])}
    manifest = {"format_version": cache_mod.CACHE_FORMAT_VERSION, "patients": patients,
                "feature_names": ["c%d" % j for j in range(6)],
                "radiomics_version": VERSION, "radiomics_features": list(FEATURE_NAMES)}
    cache_mod.atomic_write_json(path / cache_mod.MANIFEST, manifest)
    return path


def test_handcrafted_cv_gives_one_auc_per_fold_seed_on_the_study_folds(tmp_path):
    from client.study import Site

    cache = _fake_cache(tmp_path / "primary", 60, 1)
    seeds = [42, 7, 123]
    res = handcrafted_cv(cache, seeds, folds=5)
    assert len(res["aucs"]) == 3 and res["fold_seeds"] == seeds and res["n"] == 60
    assert res["mean"] == pytest.approx(np.mean(res["aucs"])) and res["sd"] == pytest.approx(np.std(res["aucs"], ddof=1))
    assert all(0.75 < a <= 1.0 for a in res["aucs"])  # the planted signal is found
    data = load_cache(cache)
    site = Site({}, data, tmp_path / "study")
    folds = {s: stratified_folds(data.labels, 5, s) for s in seeds}
    for s in seeds:
        assert np.array_equal(folds[s], site.fold_ids(5, s))  # the DL study's split for that seed
    assert not np.array_equal(folds[42], folds[7]) and not np.array_equal(folds[7], folds[123])

    combined = handcrafted_cv(cache, [42], folds=5, with_clinical=True)
    assert combined["features"][-6:] == ["c0", "c1", "c2", "c3", "c4", "c5"]
    assert len(combined["features"]) == len(FEATURE_NAMES) + 6 and "log_volume_ml" in combined["features"]
    with pytest.raises(ValueError, match="at least 40 patients of each class"):
        handcrafted_cv(cache, [42], folds=40)

    external = _fake_cache(tmp_path / "external", 30, 2)
    auc = handcrafted_external(cache, external)
    assert 0.7 < auc <= 1.0
    assert 0.7 < handcrafted_external(cache, external, with_clinical=True) <= 1.0
