"""The tumour ROI from whatever the hospital's tools wrote: a NIfTI / NRRD / MHA file in masks/
(ITK-SNAP), a DICOM SEG (AI and research tools) or an RTSTRUCT (radiotherapy planning systems),
always brought onto the T2WI grid as a uint8 0/1 image.

SEG and RTSTRUCT objects are found anywhere under dicom/ or masks/ and matched to the patient by
PatientID and to the T2 series by the SeriesInstanceUID they reference, never by file name. The ROI
is chosen by name (SegmentLabel / ROIName) from the site's `roi-names` list (site.toml; default GTV,
tumor, tumour, lesion: whole word, case-insensitive, first list entry wins); no match is a clear
per-patient exclusion, never a guess.

Libraries (documented choice):
- SEG: pydicom reads it (segment labels, each frame's plane position and referenced segment from the
  functional groups, as for enhanced MR in client/dicom_scan.py; BINARY, FRACTIONAL cut at half,
  LABELMAP; empty frames may be left out) and each frame is placed on the T2 grid directly, after
  checking its pixel steps are T2 voxel steps and its first pixel a T2 voxel centre, so the mask is
  read back exactly. highdicom (segread + get_volume, then the same checks) reads what that does not
  take: a frame without a plane position, frames in several orientations or pixel spacings, another
  SegmentationType. Why not highdicom for all: it costs ~22 ms per SEG (its object checks against the
  standard's tables, an SQLite frame index) plus ~0.3 s to load those tables in every fresh worker,
  where pydicom takes ~5 ms, which made the enhanced + SEG path slower per image than classic + NIfTI
  (`slmfed bench prepare`). tests/test_prepare_forms.py checks both readers agree on every type.
  What is kept is ours, not highdicom's: the segment chosen by label, the T2 series matched by the
  UID the SEG references, another patient's SEG refused (dicom_candidates); highdicom's check that
  the object carries every attribute its IOD requires is not made on this path.
- RTSTRUCT: highdicom has no RTSTRUCT reader, and rt-utils would pull in OpenCV (a ~60 MB wheel) for
  one polygon fill; pydicom reads the contours and `fill_polygons` below rasterises them: contour
  points (patient mm) go to continuous T2 indices through the T2 image's own geometry, each contour
  is assigned to the slice it lies on, and a voxel is inside when its centre is inside the
  polygons by the even-odd rule (so an inner contour cuts a hole, as DICOM specifies for
  CLOSED_PLANAR contours on one slice). Exact at voxel centres, no dependency.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from client.dicom_scan import FileRecord, input_form
from client.volumes import VolumeError, load_mask, resample_like

DEFAULT_ROI_NAMES = ("GTV", "tumor", "tumour", "lesion")
OFF_SLICE_TOL = 0.25  # a contour further than this (in slices) from a T2 slice centre belongs to none


@dataclass
class MaskSource:
    """Where a patient's ROI comes from: form nifti / seg / rtstruct, the file, and why it was chosen."""

    form: str
    path: Path
    notes: list[str] = field(default_factory=list)


def match_roi_name(names: list[str], wanted) -> tuple[int, str] | None:
    """(index, name) of the first of `names` that matches the earliest entry of `wanted` (whole word,
    case-insensitive: "GTV" matches "GTV_rectum" and "gtv 1", not "PTV" or "GTVx")."""
    for w in wanted:
        pat = re.compile(rf"(?<![a-z0-9]){re.escape(w.lower())}(?![a-z0-9])")
        for i, n in enumerate(names):
            if pat.search(n.lower().replace("_", " ")):
                return i, n
    return None


def dicom_candidates(objs: list[FileRecord], t2_uid: str, patient_series: set[str]) -> tuple[list[FileRecord], str]:
    """The patient's SEG / RTSTRUCT objects that reference the chosen T2 series (SEG first, then by
    SOP instance UID, so the choice is deterministic), and the reason none do when the list is empty."""
    hits = [o for o in objs if t2_uid in o.ref_series]
    hits.sort(key=lambda o: (input_form(o) != "seg", o.sop_uid))
    if hits or not objs:
        return hits, ""
    forms = sorted({input_form(o).upper() for o in objs})
    if not any(set(o.ref_series) & patient_series for o in objs):
        return [], (f"{len(objs)} DICOM {'/'.join(forms)} object(s) with this PatientID reference no series of this "
                    "patient (another patient's contours, or a series that was not exported)")
    return [], (f"{len(objs)} DICOM {'/'.join(forms)} object(s) reference a series of this patient that is not the "
                "T2WI used (drawn on another sequence?)")


def read_roi(src: MaskSource, t2: sitk.Image, roi_names) -> tuple[sitk.Image, list[str]]:
    """The ROI on the T2 grid (uint8 0/1) and notes; VolumeError with the QC reason."""
    if src.form == "nifti":
        return load_mask(src.path, t2), []
    if src.form == "seg":
        return _read_seg(src.path, t2, roi_names)
    if src.form == "rtstruct":
        return _read_rtstruct(src.path, t2, roi_names)
    raise VolumeError(f"unknown mask form {src.form!r}")


def _onto_t2(mask: sitk.Image, t2: sitk.Image, what: str, tol: float = 0.1) -> tuple[sitk.Image, list[str]]:
    """A mask on (a part of) the T2 lattice placed onto the full T2 grid, exactly (nearest neighbour
    after checking voxel centres coincide); voxels outside the T2 volume are dropped with a note."""
    if sorted(np.round(mask.GetSpacing(), 3)) != sorted(np.round(t2.GetSpacing(), 3)):
        raise VolumeError(f"{what} voxel spacing {tuple(round(v, 3) for v in mask.GetSpacing())} mm differs from "
                          f"the T2 series' {tuple(round(v, 3) for v in t2.GetSpacing())} mm")
    for corner in [(0, 0, 0), tuple(s - 1 for s in mask.GetSize())]:
        idx = np.array(t2.TransformPhysicalPointToContinuousIndex(mask.TransformIndexToPhysicalPoint(corner)))
        if np.abs(idx - np.round(idx)).max() > tol:
            raise VolumeError(f"{what} is not on the T2 voxel grid (its voxel centres fall between the T2's)")
    n_in = int(sitk.GetArrayViewFromImage(mask).astype(bool).sum())
    _check_not_empty(n_in, what)
    out = resample_like(mask > 0, t2, nearest=True)
    return out, _inside_notes(n_in, int(sitk.GetArrayViewFromImage(out).sum()), what)


def _check_not_empty(n_in: int, what: str) -> None:
    if n_in == 0:
        raise VolumeError(f"{what} is empty (no voxel in the ROI)")


def _inside_notes(n_in: int, n_inside: int, what: str) -> list[str]:
    """A mask of n_in voxels, n_inside of them within the T2 volume: the note on the rest, or the error."""
    if n_inside == 0:
        raise VolumeError(f"{what} lies entirely outside the T2 volume")
    return [f"{what}: {100 * (1 - n_inside / n_in):.0f} % of the ROI lies outside the T2 volume and was dropped"] \
        if n_inside < n_in else []


logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines narrate every module copied

SEG_TYPES = ("BINARY", "FRACTIONAL", "LABELMAP")
_SEGMENT_ID, _REF_SEGMENT = 0x0062000A, 0x0062000B  # SegmentIdentificationSequence > ReferencedSegmentNumber


def _read_seg(path: Path, t2: sitk.Image, roi_names) -> tuple[sitk.Image, list[str]]:
    """The SEG's ROI segment on the T2 grid: pydicom reads the object and each frame is placed on the
    T2 lattice directly (`_seg_frames`); what that reader does not take (a frame without a plane position,
    frames in more than one orientation or pixel spacing, an unknown SegmentationType) goes to highdicom."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        labels = [str(getattr(s, "SegmentLabel", "")) for s in ds.SegmentSequence]
        numbers = [int(s.SegmentNumber) for s in ds.SegmentSequence]
    except Exception as exc:  # pydicom raises many types for a broken object: say so for this patient
        raise VolumeError(f"DICOM SEG could not be read ({type(exc).__name__}: {str(exc)[:100]})") from None
    hit = match_roi_name(labels, roi_names)
    if hit is None:
        raise VolumeError(f"DICOM SEG has no segment named like {', '.join(roi_names)} "
                          f"(segments: {', '.join(repr(x) for x in labels[:6]) or 'none'}); set roi-names in site.toml")
    i, label = hit
    what = f"DICOM SEG segment {label!r}"
    frames = _seg_frames(ds, numbers[i], what)
    if frames is None:
        return _read_seg_highdicom(path, t2, roi_names)
    out, notes = _frames_onto_t2(*frames, t2, what)
    return out, [f"mask: {what}"] + notes


def _seg_frames(ds, number: int, what: str):
    """(masks (k, rows, cols) bool, positions (k, 3), orientation (6,), pixel spacing (row, column)) of
    the frames of segment `number`, or None when the object is one for highdicom (see _read_seg).
    The same reading as highdicom's: BINARY frames are the segment where ReferencedSegmentNumber is
    `number`, FRACTIONAL ones are cut at half of MaximumFractionalValue, LABELMAP pixels equal to
    `number` are the segment; frames left out of the object (empty ones) are simply absent."""
    from client.dicom_scan import PER_FRAME_FG, SHARED_FG, first_item, group_facts

    kind = str(getattr(ds, "SegmentationType", "")).upper()
    per = ds.get(PER_FRAME_FG)
    if kind not in SEG_TYPES or per is None or 0x7FE00010 not in ds:
        return None
    try:
        per = list(per.value)
        little = ds.original_encoding[1] is not False
        shared = first_item(ds, SHARED_FG)
        base = group_facts(shared, little)
        facts = [{**base, **group_facts(fg, little)} for fg in per]
        if any("ipp" not in f for f in facts) or len({(f.get("iop"), f.get("pixel_spacing")) for f in facts}) != 1:
            return None
        iop, spacing = facts[0].get("iop"), facts[0].get("pixel_spacing")
        top = int(ds.get("MaximumFractionalValue") or 0) if kind == "FRACTIONAL" else 1
        if iop is None or spacing is None or top <= 0:
            return None
        if kind == "LABELMAP":
            keep = list(range(len(per)))
        else:
            refs = []
            for fg in per:
                item = first_item(fg, _SEGMENT_ID) or first_item(shared, _SEGMENT_ID)
                if item is None or _REF_SEGMENT not in item:
                    return None
                refs.append(int(item[_REF_SEGMENT].value))
            keep = [k for k, n in enumerate(refs) if n == number]
        arr = ds.pixel_array
    except Exception as exc:  # pydicom's decoders and value conversions raise many types
        raise VolumeError(f"DICOM SEG could not be read ({type(exc).__name__}: {str(exc)[:100]})") from None
    arr = arr.reshape((-1,) + arr.shape[-2:])
    if arr.shape[0] != len(per):
        raise VolumeError(f"{what}: {len(per)} frames described but {arr.shape[0]} in the pixel data")
    arr = arr[keep]
    if kind == "LABELMAP":
        masks = arr == number
    elif kind == "FRACTIONAL":  # as highdicom's float reading: value / MaximumFractionalValue, cut at 0.5
        masks = arr.astype(np.float32) / np.float32(top) >= 0.5
    else:
        masks = arr > 0
    positions = np.array([facts[k]["ipp"] for k in keep], dtype=float).reshape(-1, 3)
    return masks, positions, np.array(iop, dtype=float), np.array(spacing, dtype=float)


def _frames_onto_t2(masks: np.ndarray, positions: np.ndarray, iop: np.ndarray, spacing: np.ndarray,
                    t2: sitk.Image, what: str, tol: float = 0.1) -> tuple[sitk.Image, list[str]]:
    """SEG frames placed exactly onto the T2 grid: a frame's pixel steps must be T2 voxel steps and its
    first pixel a T2 voxel centre (within `tol` voxel), else the reason; the same checks and (through
    _check_not_empty / _inside_notes) the same errors and note as _onto_t2, without building the SEG's
    own volume first."""
    origin = np.array(t2.GetOrigin())
    t2_spacing = np.array(t2.GetSpacing())
    inv = np.linalg.inv(np.array(t2.GetDirection()).reshape(3, 3) * t2_spacing[None, :])
    col_step = inv @ (iop[:3] * spacing[1])  # one column along the row direction cosine
    row_step = inv @ (iop[3:] * spacing[0])
    steps = np.stack([row_step, col_step])
    unit = np.round(steps)
    width = max(masks.shape[1:])
    if (not (np.abs(unit).sum(axis=1) == 1).all() or np.abs(unit[0]) @ np.abs(unit[1]) != 0
            or np.abs(np.linalg.norm(steps, axis=1) - 1).max() * width > tol):
        raise VolumeError(f"{what} pixel spacing {tuple(round(float(v), 3) for v in spacing)} mm or orientation does not "
                          f"match the T2 series' voxels {tuple(round(v, 3) for v in t2.GetSpacing())} mm")
    first = (inv @ (positions - origin).T).T  # continuous T2 index of each frame's first pixel
    if np.abs(steps - unit).max() * width > tol or (len(first) and np.abs(first - np.round(first)).max() > tol):
        raise VolumeError(f"{what} is not on the T2 voxel grid (its voxel centres fall between the T2's)")
    _check_not_empty(int(np.count_nonzero(masks)), what)
    k, r, c = np.nonzero(masks)
    idx = np.round(first[k] + r[:, None] * unit[0] + c[:, None] * unit[1]).astype(np.int64)  # (x, y, z) indices
    idx = np.unique(idx, axis=0)  # frames at one position: the union
    size = np.array(t2.GetSize())
    inside = idx[((idx >= 0) & (idx < size)).all(axis=1)]
    notes = _inside_notes(len(idx), len(inside), what)
    arr = np.zeros(tuple(size[::-1]), dtype=np.uint8)
    arr[inside[:, 2], inside[:, 1], inside[:, 0]] = 1
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(t2)
    return out, notes


def _read_seg_highdicom(path: Path, t2: sitk.Image, roi_names) -> tuple[sitk.Image, list[str]]:
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # highdicom raises plain ValueError/AttributeError/... for a broken object
        raise VolumeError(f"DICOM SEG could not be read ({type(exc).__name__}: {str(exc)[:100]})") from None
    labels = [str(getattr(s, "SegmentLabel", "")) for s in seg.SegmentSequence]
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    hit = match_roi_name(labels, roi_names)
    if hit is None:
        raise VolumeError(f"DICOM SEG has no segment named like {', '.join(roi_names)} "
                          f"(segments: {', '.join(repr(x) for x in labels[:6]) or 'none'}); set roi-names in site.toml")
    i, label = hit
    fractional = str(getattr(seg, "SegmentationType", "")).upper() == "FRACTIONAL"
    try:  # float, so a FRACTIONAL SEG (probabilities / occupancy rescaled to 0..1) is cut at 0.5, not truncated
        vol = seg.get_volume(segment_numbers=[numbers[i]], combine_segments=False, dtype=np.float32)
    except Exception as exc:
        raise VolumeError(f"DICOM SEG segment {label!r} cannot be placed in space ({type(exc).__name__}: "
                          f"{str(exc)[:100]})") from None
    arr = np.asarray(vol.array)
    if arr.ndim == 4:  # (slice, row, column, segment): the one segment asked for
        arr = arr[..., 0]
    aff = np.asarray(vol.affine, dtype=float)
    img = sitk.GetImageFromArray((arr >= 0.5 if fractional else arr > 0).astype(np.uint8))  # axes (slice, row, col)
    axes = [aff[:3, 2], aff[:3, 1], aff[:3, 0]]  # sitk x = column, y = row, z = slice
    img.SetSpacing([float(np.linalg.norm(a)) for a in axes])
    img.SetDirection(np.column_stack([a / np.linalg.norm(a) for a in axes]).ravel().tolist())
    img.SetOrigin(aff[:3, 3].tolist())
    out, notes = _onto_t2(img, t2, f"DICOM SEG segment {label!r}")
    return out, [f"mask: DICOM SEG segment {label!r}"] + notes


def fill_polygons(polys: list[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """Even-odd fill at pixel centres of closed polygons given as (m, 2) arrays of (column, row)
    continuous indices; (rows, cols) bool. A centre exactly on an edge counts as inside on the
    left/upper edges only (half-open), so two polygons sharing an edge never both claim a pixel."""
    out = np.zeros((rows, cols), dtype=bool)
    if not polys:
        return out
    x1 = np.concatenate([p[:, 0] for p in polys])
    y1 = np.concatenate([p[:, 1] for p in polys])
    x2 = np.concatenate([np.roll(p[:, 0], -1) for p in polys])
    y2 = np.concatenate([np.roll(p[:, 1], -1) for p in polys])
    c = np.arange(cols, dtype=float)
    for r in range(max(0, int(np.floor(y1.min()))), min(rows, int(np.ceil(y1.max())) + 1)):
        cross = (y1 <= r) != (y2 <= r)  # edges whose half-open y-range holds this row's centre
        if not cross.any():
            continue
        xs = x1[cross] + (r - y1[cross]) * (x2[cross] - x1[cross]) / (y2[cross] - y1[cross])
        out[r] = ((xs[None, :] <= c[:, None]).sum(axis=1) % 2) == 1
    return out


def _read_rtstruct(path: Path, t2: sitk.Image, roi_names) -> tuple[sitk.Image, list[str]]:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        rois = {int(r.ROINumber): str(getattr(r, "ROIName", "")) for r in ds.StructureSetROISequence}
    except Exception as exc:  # a broken structure set: say so for this patient
        raise VolumeError(f"RTSTRUCT could not be read ({type(exc).__name__}: {str(exc)[:100]})") from None
    numbers, names = list(rois), list(rois.values())
    hit = match_roi_name(names, roi_names)
    if hit is None:
        raise VolumeError(f"RTSTRUCT has no ROI named like {', '.join(roi_names)} "
                          f"(ROIs: {', '.join(repr(x) for x in names[:8]) or 'none'}); set roi-names in site.toml")
    number, name = numbers[hit[0]], hit[1]
    contours = [c for item in ds.get("ROIContourSequence", []) if int(item.ReferencedROINumber) == number
                for c in item.get("ContourSequence", [])]
    nx, ny, nz = t2.GetSize()
    origin = np.array(t2.GetOrigin())
    inv = np.linalg.inv(np.array(t2.GetDirection()).reshape(3, 3) * np.array(t2.GetSpacing())[None, :])
    per_slice: dict[int, list[np.ndarray]] = {}
    skipped = {"not closed planar": 0, "outside the T2 slices": 0, "between T2 slices": 0}
    for c in contours:
        if str(getattr(c, "ContourGeometricType", "")).upper() != "CLOSED_PLANAR":
            skipped["not closed planar"] += 1
            continue
        pts = np.asarray([float(v) for v in c.ContourData], dtype=float).reshape(-1, 3)
        idx = (inv @ (pts - origin).T).T  # continuous (x = column, y = row, z = slice) indices
        k = float(np.median(idx[:, 2]))
        kr = int(round(k))
        if np.abs(idx[:, 2] - kr).max() > OFF_SLICE_TOL:
            skipped["between T2 slices" if -0.5 <= k <= nz - 0.5 else "outside the T2 slices"] += 1
            continue
        if not 0 <= kr < nz:
            skipped["outside the T2 slices"] += 1
            continue
        per_slice.setdefault(kr, []).append(idx[:, :2])
    arr = np.zeros((nz, ny, nx), dtype=np.uint8)
    for k, polys in per_slice.items():
        arr[k] = fill_polygons(polys, ny, nx)
    what = f"RTSTRUCT ROI {name!r}"
    if not contours:
        raise VolumeError(f"{what} has no contours")
    if not arr.any():
        why = ", ".join(f"{n} {k}" for k, n in skipped.items() if n) or "contours enclose no T2 voxel centre"
        raise VolumeError(f"{what} does not overlap the T2 volume ({why})")
    notes = [f"mask: {what} ({len(contours)} contours)"]
    notes += [f"mask: {n} contour(s) of {what} {k}: ignored" for k, n in skipped.items() if n]
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(t2)
    return out, notes


def roi_names(cfg: dict) -> tuple[str, ...]:
    """The site's `roi-names` comma list (default GTV, tumor, tumour, lesion)."""
    raw = cfg.get("roi-names") or ",".join(DEFAULT_ROI_NAMES)
    names = tuple(n.strip() for n in str(raw).split(",") if n.strip())
    return names or DEFAULT_ROI_NAMES
