"""Turn checked slice lists into SimpleITK volumes on one grid: the patient's T2WI.

Slices (or the frames of an enhanced multi-frame file, one record each) are ordered by their
position along the slice normal (ImageOrientationPatient x ImagePositionPatient), never by file
name, InstanceNumber or frame number, and the stack is checked for missing
or duplicated positions and uneven spacing before SimpleITK reads it (which applies each file's
RescaleSlope / RescaleIntercept). DWI and ADC are resampled onto the T2 grid through scanner
coordinates; the mask must already lie on the T2 grid (a mere difference of origin / direction
representation is fixed by nearest-neighbour resampling). Every problem is a VolumeError whose
message is the patient's QC reason.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from client.dicom_scan import FileRecord, read_mosaic_tiles, read_raw_pixels

MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
ADC_MAX_MM2_S = 5e-3  # free water at body temperature is ~3e-3; beyond 5e-3 is noise


class VolumeError(ValueError):
    """A series or mask cannot be used; the message is the QC reason."""


def slice_normal(iop) -> np.ndarray:
    a0, a1, a2, b0, b1, b2 = (float(v) for v in iop)
    # np.cross's arithmetic, written out (np.cross costs ~100 us a call, and this runs per slice)
    n = np.array([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0])
    return n / (np.linalg.norm(n) + 1e-12)


def check_stack(files: list[FileRecord], what: str) -> tuple[list[FileRecord], float, list[str]]:
    """Order slices along the normal and check the stack; returns (sorted files, slice spacing, notes)."""
    notes: list[str] = []
    refused = [f for f in files if f.refused]
    if refused:
        raise VolumeError(f"{what}: {refused[0].refused}")
    bad = [f for f in files if f.truncated]
    if bad:
        multi = any(f.frame >= 0 for f in bad)
        n = len({f.path for f in bad})
        raise VolumeError(f"{what}: {n} truncated {'multi-frame ' if multi else ''}DICOM file(s) (pixel data incomplete)")
    if any(f.ipp is None or f.iop is None or f.pixel_spacing is None for f in files):
        if any(f.frame >= 0 for f in files):
            raise VolumeError(f"{what}: frames lack PlanePositionSequence / PlaneOrientationSequence / PixelMeasuresSequence "
                              "in their per-frame and shared functional groups")
        raise VolumeError(f"{what}: slices lack ImagePositionPatient / ImageOrientationPatient / PixelSpacing")
    seen: dict[tuple[str, int], FileRecord] = {}
    for f in files:
        k = (f.sop_uid or f.path, f.frame, f.tile)
        if f.sop_uid and k in seen:
            continue
        seen[k] = f
    if len(seen) < len(files):
        notes.append(f"{what}: {len(files) - len(seen)} identical copies of a slice file ignored")
    files = list(seen.values())
    iops = np.array([f.iop for f in files])
    if np.abs(iops - iops[0]).max() > 1e-3:
        raise VolumeError(f"{what}: slices have different orientations (ImageOrientationPatient)")
    if len({(f.rows, f.cols) for f in files}) > 1:
        raise VolumeError(f"{what}: slices have different matrix sizes")
    if np.abs(np.array([f.pixel_spacing for f in files]) - files[0].pixel_spacing).max() > 1e-4:
        raise VolumeError(f"{what}: slices have different pixel spacings")
    n = slice_normal(files[0].iop)
    d = np.array([np.dot(n, f.ipp) for f in files])
    order = np.argsort(d, kind="stable")
    files, d = [files[i] for i in order], d[order]
    if len(files) == 1:
        return files, 1.0, notes
    gaps = np.diff(d)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        raise VolumeError(
            f"{what}: duplicated slice: {dup.size + 1} slices share the position {d[dup[0]]:.1f} mm along the slice normal"
        )
    step = float(np.median(gaps))
    big = np.flatnonzero(gaps > 1.5 * step)
    if big.size:
        i = big[0]
        missing = int(round(gaps[i] / step)) - 1
        raise VolumeError(
            f"{what}: missing slice(s): a gap of {gaps[i]:.1f} mm between {d[i]:.1f} and {d[i + 1]:.1f} mm "
            f"where the spacing is {step:.1f} mm (about {max(missing, 1)} slice(s) missing)"
        )
    if np.abs(gaps - step).max() > 0.05 * step + 0.01:
        raise VolumeError(f"{what}: inconsistent slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm)")
    return files, step, notes


def read_volume(files: list[FileRecord], what: str) -> tuple[sitk.Image, list[str]]:
    """Check and read one slice stack as a float32 image (rescale slope/intercept applied)."""
    files, step, notes = check_stack(files, what)
    tiled = any(f.tile >= 0 for f in files)
    slices = [read_raw_pixels(f) for f in files] if not tiled and all(f.pixel_offset >= 0 for f in files) else [None]
    if tiled:
        img = sitk.GetImageFromArray(read_tiles(files, what))
    elif all(s is not None for s in slices):
        img = sitk.GetImageFromArray(np.stack(slices))
    elif any(f.frame >= 0 for f in files):
        img = sitk.GetImageFromArray(read_frames_pydicom(files, what))
    else:
        img = read_series_sitk([f.path for f in files], what)
    f = files[0]
    if img.GetSize() != (f.cols, f.rows, len(files)):
        raise VolumeError(f"{what}: read {img.GetSize()} voxels, expected {(f.cols, f.rows, len(files))}")
    row_sp, col_sp = f.pixel_spacing
    n = slice_normal(f.iop)
    img.SetSpacing((col_sp, row_sp, step))
    img.SetOrigin(tuple(float(x) for x in f.ipp))
    img.SetDirection(tuple(np.column_stack([f.iop[:3], f.iop[3:], n]).ravel().tolist()))
    return img, notes


def read_frames_pydicom(files: list[FileRecord], what: str) -> np.ndarray:
    """Frames of multi-frame files that the raw path cannot read (compressed, big-endian, ...):
    pydicom decodes each file once; every frame gets its own rescale from its functional groups."""
    import pydicom

    arrays: dict[str, np.ndarray] = {}
    out = []
    for f in files:
        if f.path not in arrays:
            try:
                arr = pydicom.dcmread(f.path).pixel_array
            except Exception as exc:  # decoders raise many types; the patient gets the reason
                raise VolumeError(f"{what}: pixel data could not be decoded ({type(exc).__name__}: {str(exc)[:100]})") from None
            arrays[f.path] = arr.reshape((-1,) + arr.shape[-2:])
        frames = arrays[f.path]
        if f.frame >= frames.shape[0]:
            raise VolumeError(f"{what}: frame {f.frame + 1} missing from the pixel data ({frames.shape[0]} frames)")
        out.append(frames[max(f.frame, 0)].astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept))
    return np.stack(out)


def read_tiles(files: list[FileRecord], what: str) -> np.ndarray:
    """Slices of Siemens mosaic files (client/dicom_scan.py made one record per tile): each file is
    unpacked once by nibabel's MosaicWrapper, then its tiles are taken in the records' order."""
    tiles: dict[str, np.ndarray] = {}
    out = []
    for f in files:
        if f.tile < 0:
            raise VolumeError(f"{what}: mixes mosaic and non-mosaic images")
        if f.path not in tiles:
            try:
                tiles[f.path] = read_mosaic_tiles(f)
            except Exception as exc:  # nibabel / pydicom raise many types; the patient gets the reason
                raise VolumeError(f"{what}: Siemens mosaic could not be unpacked "
                                  f"({type(exc).__name__}: {str(exc)[:100]})") from None
        t = tiles[f.path]
        if t.shape[1:] != (f.rows, f.cols) or f.tile >= t.shape[0]:
            raise VolumeError(f"{what}: Siemens mosaic could not be unpacked (tiles {t.shape[1:]} x {t.shape[0]}, "
                              f"expected {f.rows} x {f.cols} x {f.mosaic})")
        out.append(t[f.tile])
    return np.stack(out)


def _position_keys(files: list[FileRecord]) -> list[float]:
    """Each image's position along the slice normal (mm, 0.01), the normal taken once per orientation."""
    normals: dict[tuple, np.ndarray] = {}
    out = []
    for f in files:
        if not (f.iop and f.ipp):
            out.append(0.0)
            continue
        n = normals.get(f.iop)
        if n is None:
            n = normals[f.iop] = slice_normal(f.iop)
        out.append(round(float(n[0] * f.ipp[0] + n[1] * f.ipp[1] + n[2] * f.ipp[2]), 2))
    return out


def split_diffusion(files: list[FileRecord]) -> tuple[list[list[list[FileRecord]]], list[str]]:
    """The images of one b-value as stacks: [direction][repeat] -> one slice list each.

    Where the scanner's trace (ISOTROPIC / TRACEW) images are among them, only those are kept.
    Images are grouped by gradient direction (from the DICOM diffusion module, the Siemens CSA
    header, the vendors' private tags or the Siemens sequence name "#n"); several images of one
    direction at one position are repeated acquisitions (averages), taken in instance order."""
    notes: list[str] = []
    iso = [f for f in files if f.directionality == "ISOTROPIC"]
    if iso and len(iso) < len(files):
        notes.append(f"{len(files) - len(iso)} per-direction images dropped: the scanner's trace image is used")
        files = iso
    keys = _position_keys(files)
    if len(set(keys)) == len(files) and len({f.direction for f in files}) <= 1:
        return [[files]], notes  # one image per position (the usual export): one stack
    pos = {id(f): k for f, k in zip(files, keys)}
    by_dir: dict[str, list[FileRecord]] = {}
    for f in files:
        by_dir.setdefault("" if f.directionality == "ISOTROPIC" else f.direction, []).append(f)
    out = []
    for _key, fs in sorted(by_dir.items()):
        by_pos: dict[float, list[FileRecord]] = {}
        for f in fs:
            by_pos.setdefault(pos[id(f)], []).append(f)
        counts = {len(v) for v in by_pos.values()}
        uids = {(f.sop_uid or f.path, f.frame, f.tile) for f in fs}
        if len(counts) != 1 or len(uids) < len(fs):  # uneven: check_stack names the problem
            out.append([fs])
            continue
        m = counts.pop()
        for v in by_pos.values():
            v.sort(key=lambda f: (f.instance_number, f.path, f.frame, f.tile))
        out.append([[v[r] for v in by_pos.values()] for r in range(m)])
    return out, notes


def read_diffusion(files: list[FileRecord], what: str, b: float) -> tuple[sitk.Image, list[str]]:
    """One diffusion-weighted volume at one b-value: the scanner's trace when exported, else the trace
    computed as the geometric mean over gradient directions (each direction the mean of its repeats);
    a single stack is read as it is. Refused when every pixel is zero."""
    groups, notes = split_diffusion(files)
    notes = [f"{what}: {n}" for n in notes]
    if len(groups) == 1 and len(groups[0]) == 1:
        img, n = read_volume(groups[0][0], what)
        notes += n
        if b > 50 and all(f.directionality == "DIRECTIONAL" for f in files):
            notes.append(f"{what}: one gradient direction only (no trace / isotropic image in the export): used as it is")
    else:
        ref = None
        dirs = []
        for reps in groups:
            acc = None
            for stack in reps:
                img, n = read_volume(stack, what)
                notes += n
                if ref is None:
                    ref = img
                elif img.GetSize() != ref.GetSize() or not np.allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-3):
                    raise VolumeError(f"{what}: the gradient directions / repeats are not on the same slices")
                a = sitk.GetArrayFromImage(img).astype(np.float64)
                acc = a if acc is None else acc + a
            dirs.append(acc / len(reps))
        if len(dirs) > 1:
            stack = np.stack(dirs)
            with np.errstate(divide="ignore"):
                trace = np.exp(np.log(np.maximum(stack, 1e-300)).mean(axis=0))
            trace[(stack <= 0).any(axis=0)] = 0.0
            notes.append(f"{what}: trace computed as the geometric mean of {len(dirs)} gradient directions")
        else:
            trace = dirs[0]
            if b > 50 and groups[0] and groups[0][0][0].directionality == "DIRECTIONAL":
                notes.append(f"{what}: one gradient direction only (no trace / isotropic image in the export): used as it is")
        reps = max(len(r) for r in groups)
        if reps > 1:
            notes.append(f"{what}: mean of {reps} repeated acquisitions")
        img = sitk.GetImageFromArray(trace.astype(np.float32))
        img.CopyInformation(ref)
    if not sitk.GetArrayViewFromImage(img).any():
        raise VolumeError(f"{what}: every pixel is zero (no image content: a blanked or anonymised export?)")
    return img, notes


def _extent(img: sitk.Image, idx: np.ndarray | None = None) -> np.ndarray:
    """(3, 2) min/max scanner (LPS) coordinates of the given voxel indices (x, y, z), or of the whole grid."""
    if idx is None:
        size = img.GetSize()
        idx = np.array(list(itertools.product(*[(0, s - 1) for s in size])))
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint([float(v) for v in i]) for i in idx])
    return np.stack([pts.min(axis=0), pts.max(axis=0)], axis=1)


def coverage_problem(native: sitk.Image, on_t2: np.ndarray, ref: sitk.Image, roi: np.ndarray, label: str) -> str | None:
    """None when the resampled image covers at least half the ROI; else the reason, with both extents."""
    covered = float((on_t2[roi > 0] != 0).mean()) if roi.any() else 0.0
    if covered >= 0.5:
        return None
    zz, yy, xx = np.nonzero(roi)
    corners = np.array(list(itertools.product((xx.min(), xx.max()), (yy.min(), yy.max()), (zz.min(), zz.max()))))
    a, r = _extent(native), _extent(ref, corners)
    fmt = lambda e: ", ".join(f"{ax} {lo:.1f} to {hi:.1f}" for ax, (lo, hi) in zip("xyz", e))  # noqa: E731
    inside = bool(((a[:, 0] <= r[:, 1] + 1e-3) & (a[:, 1] >= r[:, 0] - 1e-3)).all())
    if covered == 0 and not inside:
        return (f"{label} does not cover the ROI (no overlap in scanner coordinates: the image spans {fmt(a)} mm, "
                f"the ROI {fmt(r)} mm, LPS)")
    return (f"{label} does not cover the ROI ({100 * covered:.0f} % of the ROI voxels have signal; the image spans "
            f"{fmt(a)} mm, the ROI {fmt(r)} mm, LPS)")


def read_series_sitk(paths: list[str], what: str) -> sitk.Image:
    """SimpleITK (GDCM) reading of a slice list in our order: any transfer syntax, per-file rescale."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(paths)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
        raise VolumeError(f"{what}: SimpleITK could not read the series ({first})") from None


def resample_like(img: sitk.Image, ref: sitk.Image, nearest: bool = False,
                  transform: sitk.Transform | None = None) -> sitk.Image:
    """Resample through scanner coordinates (optionally refined by `transform`, which maps ref's
    points into img) onto ref's grid; outside the field of view = 0."""
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    ptype = sitk.sitkUInt8 if nearest else sitk.sitkFloat32
    return sitk.Resample(img, ref, transform or sitk.Transform(), interp, 0.0, ptype)


def rigid_refine(fixed: sitk.Image, moving: sitk.Image, roi: sitk.Image, max_shift_mm: float = 10.0,
                 max_angle_deg: float = 5.0) -> tuple[sitk.Transform, str]:
    """Optional rigid refinement of the scanner-coordinate alignment (patient motion between series).

    Mattes mutual information (T2 and DWI differ in contrast) in a neighbourhood of the ROI, Euler
    3D transform starting at identity. A result beyond max_shift_mm / max_angle_deg is rejected and
    the scanner alignment kept, because a large jump is more likely a failed optimisation than motion.
    Returns the transform to hand to resample_like and a note saying what happened.
    """
    region = sitk.BinaryDilate(roi, [8, 8, 2]) > 0
    fixed_f = sitk.Cast(fixed, sitk.sitkFloat32)
    moving_f = sitk.Cast(moving, sitk.sitkFloat32)
    centre = fixed.TransformContinuousIndexToPhysicalPoint(
        [float(v) for v in np.argwhere(sitk.GetArrayViewFromImage(roi))[:, ::-1].mean(axis=0)])
    tx = sitk.Euler3DTransform()
    tx.SetCenter(centre)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricFixedMask(region)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=0.01, numberOfIterations=100)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(tx, inPlace=True)
    try:
        reg.Execute(fixed_f, moving_f)
    except RuntimeError as exc:
        return sitk.Transform(), f"rigid refinement failed ({str(exc).strip().splitlines()[-1][:80]}); scanner alignment kept"
    ax, ay, az, dx, dy, dz = tx.GetParameters()
    shift = float(np.linalg.norm([dx, dy, dz]))
    angle = float(np.degrees(max(abs(ax), abs(ay), abs(az))))
    if shift > max_shift_mm or angle > max_angle_deg:
        return sitk.Transform(), f"rigid refinement rejected ({shift:.1f} mm, {angle:.1f} deg); scanner alignment kept"
    return tx, f"rigid refinement: {shift:.1f} mm, {angle:.1f} deg"


def compute_adc(low: sitk.Image, high: sitk.Image, b_low: float, b_high: float) -> sitk.Image:
    """ADC = ln(S_low / S_high) / (b_high - b_low) in mm^2/s, clipped to [0, ADC_MAX_MM2_S]."""
    s0 = sitk.GetArrayViewFromImage(low).astype(np.float64)
    s1 = sitk.GetArrayViewFromImage(high).astype(np.float64)
    floor = 1e-3 * max(float(np.percentile(s0, 99)), 1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.log(np.maximum(s0, floor) / np.maximum(s1, floor)) / (b_high - b_low)
    adc[s0 <= floor] = 0.0  # background: no signal to fit
    adc = np.clip(np.nan_to_num(adc), 0.0, ADC_MAX_MM2_S).astype(np.float32)
    out = sitk.GetImageFromArray(adc)
    out.CopyInformation(high)
    return out


def adc_to_mm2_s(adc: np.ndarray, roi: np.ndarray, scale: float | None) -> tuple[np.ndarray, float]:
    """Bring a scanner ADC map to mm^2/s. `scale` None = guess from the magnitude inside the ROI
    (tissue ADC is 0.3-3e-3 mm^2/s, so ~1000 means 1e-6 units and ~1 means 1e-3 units)."""
    if scale is None:
        vals = adc[(roi > 0) & (adc > 0)]
        if vals.size == 0:
            vals = adc[adc > 0]
        med = float(np.median(vals)) if vals.size else 0.0
        scale = 1e-6 if med > 50 else 1e-3 if med > 0.05 else 1.0
    return np.clip(adc * scale, 0.0, ADC_MAX_MM2_S).astype(np.float32), scale


def crop_to_roi(t2: sitk.Image, mask: sitk.Image, fov_mm: float, margin_slices: int) -> tuple[sitk.Image, sitk.Image]:
    """The part of the T2 grid that any crop around the ROI can touch (ROI bounding box + fov/2
    in-plane, + margin slices), so DWI/ADC are resampled onto that sub-grid only. Same voxels,
    same physical positions: the crops are identical to those taken from the whole grid."""
    zz, yy, xx = np.nonzero(sitk.GetArrayViewFromImage(mask))
    sx, sy, _ = t2.GetSpacing()
    nx, ny, nz = t2.GetSize()
    hx, hy = fov_mm / 2 / sx + 2, fov_mm / 2 / sy + 2
    x0, x1 = max(0, int(np.floor(xx.min() - hx))), min(nx, int(np.ceil(xx.max() + hx)) + 1)
    y0, y1 = max(0, int(np.floor(yy.min() - hy))), min(ny, int(np.ceil(yy.max() + hy)) + 1)
    z0, z1 = max(0, int(zz.min()) - margin_slices), min(nz, int(zz.max()) + margin_slices + 1)
    return t2[x0:x1, y0:y1, z0:z1], mask[x0:x1, y0:y1, z0:z1]


def find_mask(masks_dir: Path, patient_id: str) -> Path | None:
    if not patient_id or "/" in patient_id or "\\" in patient_id or patient_id in (".", ".."):
        return None  # such an ID cannot name a file inside masks/
    for suffix in MASK_SUFFIXES:
        p = masks_dir / f"{patient_id}{suffix}"
        if p.is_file():
            return p
    return None


def _same_grid(mask: sitk.Image, ref: sitk.Image, tol: float = 0.1) -> bool:
    """True when every mask voxel centre is a T2 voxel centre (axes may be flipped or permuted)."""
    if int(np.prod(mask.GetSize())) != int(np.prod(ref.GetSize())):
        return False
    if sorted(np.round(mask.GetSpacing(), 3)) != sorted(np.round(ref.GetSpacing(), 3)):
        return False
    size = np.array(ref.GetSize())
    for corner in itertools.product(*[(0, s - 1) for s in mask.GetSize()]):
        pt = mask.TransformIndexToPhysicalPoint([int(c) for c in corner])
        idx = np.array(ref.TransformPhysicalPointToContinuousIndex(pt))
        if np.abs(idx - np.round(idx)).max() > tol or (idx < -tol).any() or (idx > size - 1 + tol).any():
            return False
    return True


def load_mask(path: Path, t2: sitk.Image) -> sitk.Image:
    """Read the ROI mask, check it is binary and non-empty and bring it onto the T2 grid (uint8 0/1)."""
    try:
        mask = sitk.ReadImage(str(path))
    except RuntimeError:
        raise VolumeError("mask could not be read (not a NIfTI/NRRD/MHA image?)") from None
    if mask.GetDimension() != 3:
        raise VolumeError(f"mask is {mask.GetDimension()}D; expected a 3D volume on the T2 grid")
    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"mask has {mask.GetNumberOfComponentsPerPixel()} components; expected one label")
    arr = sitk.GetArrayViewFromImage(mask)
    values = np.unique(arr)
    nonzero = values[values != 0]
    if nonzero.size == 0:
        raise VolumeError("mask is empty (no voxel > 0)")
    if nonzero.size > 1 or not float(nonzero[0]).is_integer() or nonzero[0] < 0:
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise VolumeError(f"mask is not binary (values found: {shown})")
    binary = sitk.GetImageFromArray((arr != 0).astype(np.uint8))
    binary.CopyInformation(mask)
    if mask.GetSize() == t2.GetSize() and np.allclose(mask.GetSpacing(), t2.GetSpacing(), rtol=1e-3) and np.allclose(
        mask.GetOrigin(), t2.GetOrigin(), atol=1e-3
    ) and np.allclose(mask.GetDirection(), t2.GetDirection(), atol=1e-4):
        binary.CopyInformation(t2)
        return binary
    if not _same_grid(mask, t2):
        ms, ts = mask.GetSize(), t2.GetSize()
        msp = tuple(round(float(v), 3) for v in mask.GetSpacing())
        tsp = tuple(round(float(v), 3) for v in t2.GetSpacing())
        if sorted(ms) != sorted(ts):
            raise VolumeError(f"mask has shape {ms} but the T2 series has {ts} (x, y, z voxels)")
        if sorted(msp) != sorted(tsp):
            raise VolumeError(f"mask has spacing {msp} mm but the T2 series has {tsp} mm")
        shift = np.linalg.norm(np.subtract(mask.GetOrigin(), t2.GetOrigin()))
        raise VolumeError(f"mask is not on the T2 grid (origin {shift:.1f} mm away or different orientation)")
    out = resample_like(binary, t2, nearest=True)
    if not sitk.GetArrayViewFromImage(out).any():
        raise VolumeError("mask is empty after alignment to the T2 grid")
    return out


def mask_header_matches(path: Path | None, size: tuple, spacing: tuple) -> bool:
    """Cheap header-only check used to prefer the T2 series the mask was drawn on."""
    if path is None:
        return True
    try:
        r = sitk.ImageFileReader()
        r.SetFileName(str(path))
        r.ReadImageInformation()
    except RuntimeError:
        return True
    return sorted(r.GetSize()) == sorted(size) and sorted(np.round(r.GetSpacing(), 2)) == sorted(np.round(spacing, 2))
