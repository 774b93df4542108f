"""Handcrafted ("radiomics") features of the tumour ROI, computed once per patient at `slmfed prepare`.

The comparison a radiomics user would pick instead of a deep network: a fixed, small set of shape,
diffusion and texture statistics of the ROI, fed to a logistic regression
(`simulation/handcrafted.py`). They are computed from the aligned 3D volumes on the T2 grid (the
same arrays the crop transform gets: T2WI and high-b DWI in scanner units, ADC in mm^2/s, the ROI
mask, spacing), never from anything but the images and the mask, as at a real hospital.

Features (FEATURE_NAMES order; why each is there):
    volume_ml           ROI volume (voxel count x voxel volume): tumour burden, the classic size marker.
    surface_mm2         ROI surface area (ITK's Crofton estimate, SimpleITK LabelShapeStatistics):
                        with the volume it gives the shape. It reads a few % low on thick slices
                        (about -7 % for an ellipsoid at 0.8 x 0.8 x 3.3 mm), the same for every patient
                        of a scanner.
    sphericity          pi^(1/3) (6 V)^(2/3) / surface (1 for a ball, lower for a lobulated margin):
                        margin irregularity, size-free. Slightly above 1 possible on thick slices (above).
    solidity            ROI volume / volume of the convex hull of its voxels: lobulation and spiculation
                        show as concavities; independent of size and insensitive to the surface bias.
    max_area_mm2        largest in-plane ROI area: the size a radiologist measures on one slice.
    adc_mean_mm2_s      mean ADC in the ROI core: cellularity (lower ADC = denser tumour). Physical
                        units, so comparable across scanners.
    adc_p10_mm2_s       10th percentile of ADC in the core: the most cellular part.
    adc_sd_mm2_s        SD of ADC in the core: diffusion heterogeneity.
    t2_cv               T2WI SD / mean in the core: signal heterogeneity; relative, so the scanner's
                        gain cancels.
    dwi_cv              high-b DWI SD / mean in the core, likewise.
    t2_glcm_contrast    GLCM contrast of T2WI on the largest ROI slice (pairs of core pixels 1 pixel
                        apart in 4 directions, symmetric; intensities relative to the core mean, bins
                        of 0.05): fine-scale texture.
    t2_glcm_entropy     GLCM entropy (bits), same matrix: texture disorder.

The intensity statistics use the ROI *core*: voxels at least CORE_MM inside the ROI border in-plane.
The DWI and ADC are acquired on a coarser grid and resampled onto the T2 grid, so at the border of
an ROI drawn on the T2 they mix tumour with fat and rectal wall (fat has a lower ADC than tumour:
it would pull the 10th percentile down); a ROI too small for a core (< CORE_MIN voxels) uses all
its voxels. Change any definition -> bump VERSION (the cache records it; `prepare` rebuilds).
"""
from __future__ import annotations

import math

import numpy as np

VERSION = "slmfed-radiomics-1"
FEATURE_NAMES: tuple[str, ...] = (
    "volume_ml", "surface_mm2", "sphericity", "solidity", "max_area_mm2",
    "adc_mean_mm2_s", "adc_p10_mm2_s", "adc_sd_mm2_s", "t2_cv", "dwi_cv",
    "t2_glcm_contrast", "t2_glcm_entropy",
)
CORE_MM = 2.0  # about one DWI pixel (1.6-1.8 mm) plus the linear resampling's reach
CORE_MIN = 20  # voxels
GLCM_BIN = 0.05  # relative to the core mean
GLCM_RANGE = (0.5, 1.5)
_GLCM_OFFSETS = ((0, 1), (1, 0), (1, 1), (1, -1))


class RadiomicsError(ValueError):
    """The inputs cannot give features (empty ROI, shapes that disagree, non-finite values)."""


def _core(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxels at least CORE_MM from the ROI border within their slice (in-plane: slices are thick)."""
    from scipy.ndimage import distance_transform_edt

    # one 3D transform whose slice distance is so large that only in-plane background counts
    # (the padding gives every slice background at most a slice width away in-plane)
    far = 1e6
    dist = distance_transform_edt(np.pad(mask, 1), sampling=(far, spacing[1], spacing[0]))[1:-1, 1:-1, 1:-1]
    core = mask & (dist > CORE_MM)
    return core if core.sum() >= CORE_MIN else mask


def _shape(mask: np.ndarray, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
    """(surface mm^2, sphericity, solidity) of the ROI."""
    import SimpleITK as sitk
    from scipy.spatial import ConvexHull, QhullError

    img = sitk.GetImageFromArray(np.pad(mask, 1).astype(np.uint8))  # background all round
    img.SetSpacing(tuple(float(s) for s in spacing))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.SetComputePerimeter(True)
    stats.Execute(img)
    surface = float(stats.GetPerimeter(1))
    volume = float(mask.sum()) * float(np.prod(spacing))
    sphericity = math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / surface if surface > 0 else float("nan")
    # hull of the voxels' corners (not centres): it contains the voxels, so solidity <= 1. Its vertices
    # are corners of voxels on the ROI surface (a face neighbour outside), so only those are listed.
    from scipy.ndimage import binary_erosion

    zyx = np.argwhere(mask & ~binary_erosion(mask, border_value=0))
    offsets = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)])
    half = (2 * zyx[:, None, :] + offsets[None] + 1).reshape(-1, 3)  # corners in half voxels, >= 0
    dims = np.array(mask.shape, dtype=np.int64) * 2 + 2
    code = np.unique((half[:, 0] * dims[1] + half[:, 1]) * dims[2] + half[:, 2])  # 1-D unique: fast
    half = np.stack([code // (dims[1] * dims[2]), code // dims[2] % dims[1], code % dims[2]], axis=1)
    pts = (half - 1) * (np.array(spacing[::-1], dtype=np.float64) / 2)
    try:
        hull = ConvexHull(pts).volume
    except QhullError:  # cannot happen for voxel corners, but say so rather than crash a patient
        raise RadiomicsError("ROI convex hull failed") from None
    return surface, sphericity, volume / hull


def _glcm(t2_slice: np.ndarray, core_slice: np.ndarray) -> tuple[float, float]:
    """(contrast, entropy in bits) of the symmetric GLCM of the core pixels of one slice."""
    mean = float(t2_slice[core_slice].mean())
    lo, hi = GLCM_RANGE
    n_bins = int(round((hi - lo) / GLCM_BIN))
    q = np.clip(np.floor((t2_slice / mean - lo) / GLCM_BIN), 0, n_bins - 1).astype(np.int64)
    counts = np.zeros((n_bins, n_bins))
    ny, nx = core_slice.shape
    for dy, dx in _GLCM_OFFSETS:
        ys, xs = slice(0, ny - dy), slice(max(0, -dx), nx - max(0, dx))
        yd, xd = slice(dy, ny), slice(max(0, dx), nx - max(0, -dx))
        both = core_slice[ys, xs] & core_slice[yd, xd]
        np.add.at(counts, (q[ys, xs][both], q[yd, xd][both]), 1.0)
    counts = counts + counts.T
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts / total
    i, j = np.indices(p.shape)
    nz = p[p > 0]
    return float(((i - j) ** 2 * p).sum()), float(-(nz * np.log2(nz)).sum())


def compute_features(t2: np.ndarray, dwi: np.ndarray, adc: np.ndarray, mask: np.ndarray,
                     spacing: tuple[float, float, float]) -> np.ndarray:
    """The FEATURE_NAMES vector (float64) of one patient.

    t2, dwi, adc, mask: arrays (z, y, x) on the same grid (ADC in mm^2/s); spacing: (x, y, z) in mm,
    as SimpleITK gives it. Raises RadiomicsError for inputs that cannot give features.
    """
    mask = np.asarray(mask) > 0
    arrays = {"t2": np.asarray(t2), "dwi": np.asarray(dwi), "adc": np.asarray(adc)}
    spacing = tuple(float(s) for s in spacing)
    if mask.ndim != 3 or len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise RadiomicsError(f"expected a 3D mask and 3 positive spacings, found shape {mask.shape}, spacing {spacing}")
    for name, a in arrays.items():
        if a.shape != mask.shape:
            raise RadiomicsError(f"{name}: shape {a.shape} differs from the mask's {mask.shape}")
    if not mask.any():
        raise RadiomicsError("the ROI is empty")
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))  # only the ROI's bounding box matters
    mask = mask[box]
    arrays = {name: a[box].astype(np.float64) for name, a in arrays.items()}
    core = _core(mask, spacing)
    vals = {name: a[core] for name, a in arrays.items()}
    for name, v in vals.items():
        if not np.isfinite(v).all():
            raise RadiomicsError(f"{name}: non-finite values inside the ROI")
    for name in ("t2", "dwi"):
        if vals[name].mean() <= 0:
            raise RadiomicsError(f"{name}: mean signal inside the ROI is not positive")
    surface, sphericity, solidity = _shape(mask, spacing)
    pixel_mm2 = spacing[0] * spacing[1]
    area = mask.reshape(mask.shape[0], -1).sum(axis=1)
    z = int(np.argmax(area))  # first slice of maximal area, as the crop transform picks it
    core_z = core[z] if core[z].any() else mask[z]
    contrast, entropy = _glcm(arrays["t2"][z], core_z)
    out = {
        "volume_ml": float(mask.sum()) * pixel_mm2 * spacing[2] / 1000.0,
        "surface_mm2": surface,
        "sphericity": sphericity,
        "solidity": solidity,
        "max_area_mm2": float(area[z]) * pixel_mm2,
        "adc_mean_mm2_s": float(vals["adc"].mean()),
        "adc_p10_mm2_s": float(np.percentile(vals["adc"], 10)),
        "adc_sd_mm2_s": float(vals["adc"].std()),
        "t2_cv": float(vals["t2"].std() / vals["t2"].mean()),
        "dwi_cv": float(vals["dwi"].std() / vals["dwi"].mean()),
        "t2_glcm_contrast": contrast,
        "t2_glcm_entropy": entropy,
    }
    vec = np.array([out[n] for n in FEATURE_NAMES], dtype=np.float64)
    if not np.isfinite(vec).all():
        bad = [n for n, v in zip(FEATURE_NAMES, vec) if not math.isfinite(v)]
        raise RadiomicsError(f"non-finite features: {', '.join(bad)}")
    return vec


def load_features(cache_dir, keys: list[str]) -> np.ndarray:
    """The stored feature vectors of `keys` (rows in that order, e.g. load_cache's patient order),
    each file checked against its manifest hash. Raises client.cache.CacheError, saying to re-run
    `slmfed prepare`, for a cache written before the features existed, with another feature version,
    or with a patient whose features are missing (its qc.csv notes say why)."""
    import io
    from pathlib import Path

    from client import cache as cache_mod

    cache_dir = Path(cache_dir)
    manifest = cache_mod.read_manifest(cache_dir)
    version, names = manifest.get("radiomics_version"), manifest.get("radiomics_features")
    if version is None:
        raise cache_mod.CacheError(f"{cache_dir}: the cache has no handcrafted (radiomics) features (prepared before "
                                   f"they existed); re-run `slmfed prepare` to compute them")
    if version != VERSION or list(names or []) != list(FEATURE_NAMES):
        raise cache_mod.CacheError(f"{cache_dir}: handcrafted features of version {version!r}, expected {VERSION!r}; "
                                   "re-run `slmfed prepare`")
    patients = manifest.get("patients", {})
    rows = []
    for key in keys:
        entry = patients.get(key)
        if not entry or entry.get("status") != "included":
            raise cache_mod.CacheError(f"{cache_dir}: patient {key} is not an included patient of this cache")
        path = cache_dir / cache_mod.PATIENTS_DIR / f"{key}.npz"
        try:
            data = path.read_bytes()
        except OSError:
            raise cache_mod.CacheError(f"{path} is listed as included in the manifest but missing; re-run `slmfed prepare`") from None
        if cache_mod.sha256_bytes(data) != entry.get("sha256"):
            raise cache_mod.CacheError(f"{path} does not match its manifest hash (modified or half-written); "
                                       "re-run `slmfed prepare`")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if "radiomics" not in npz.files:
                why = "; ".join(n for n in entry.get("notes", []) if n.startswith("radiomics:")) or "no reason recorded"
                raise cache_mod.CacheError(f"{path}: patient {key} has no handcrafted features ({why}); "
                                           "see qc.csv, fix the input and re-run `slmfed prepare`")
            vec = np.asarray(npz["radiomics"], dtype=np.float64)
        if vec.shape != (len(FEATURE_NAMES),) or not np.isfinite(vec).all():
            raise cache_mod.CacheError(f"{path}: patient {key}: handcrafted features malformed (shape {vec.shape}); "
                                       "re-run `slmfed prepare`")
        rows.append(vec)
    return np.stack(rows) if rows else np.zeros((0, len(FEATURE_NAMES)))
