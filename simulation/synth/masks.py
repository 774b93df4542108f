"""Write the tumour ROI the way hospital tools do: NIfTI (ITK-SNAP), DICOM SEG (AI / research tools,
written with highdicom) or RTSTRUCT (planning systems: closed planar contours in patient mm).

The SEG is the voxel mask itself on the T2 frames (so `prepare` must read it back identically).
The RTSTRUCT contours are drawn as a planning system would: a smooth polygon along the tumour's true
(analytic) margin on every T2 slice that holds tumour, not the outline of the voxels, so reading it
back measures real rasterisation error. Both reference the T2 series by UID; the file names carry
no patient ID, so readers must match by UIDs.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, RTStructureSetStorage

from .dicom import PatientInfo, _ds, _item, uid

MASK_FORMS = ("nifti", "seg", "rtstruct")
ROI_NAME = "GTV"
CONTOUR_POINTS = 72  # vertices per slice contour (5 degree steps)


def _frame_z(ds: Dataset) -> list[float]:
    """z (mm) of every frame of a multi-frame image, or of the single-frame image."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        return [float(fg.PlanePositionSequence[0].ImagePositionPatient[2]) for fg in ds.PerFrameFunctionalGroupsSequence]
    return [float(ds.ImagePositionPatient[2])]


def _sources(t2_files: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in t2_files]


logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines narrate every module copied


def write_seg(t2_files: list[Path], mask: np.ndarray, origin_z: float, spacing_z: float, out: Path,
              info: PatientInfo, seed: int) -> Path:
    """A binary DICOM SEG (one segment labelled ROI_NAME) on the T2 frames (classic slices or one
    enhanced file), built by highdicom from the source images."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = _sources(t2_files)
    if len(sources) > 1:
        sources.sort(key=lambda d: _frame_z(d)[0])
    zs = [z for d in sources for z in _frame_z(d)]
    ks = [int(round((z - origin_z) / spacing_z)) for z in zs]
    pixel_array = np.stack([mask[k] for k in ks]).astype(np.uint8)
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label=ROI_NAME,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixel_array, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=uid(seed, info.patient_id, "series", "seg"),
        series_number=90, sop_instance_uid=uid(seed, info.patient_id, "seg"), instance_number=1,
        manufacturer="slmfed-synth", manufacturer_model_name="synthetic contouring", software_versions="1.0",
        device_serial_number="0", omit_empty_frames=True,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return out


def margin_polygon(inside: Callable, mask_slice: np.ndarray, x0: float, y0: float, pixel_mm: float, z: float,
                   reach_mm: float, n: int = CONTOUR_POINTS) -> np.ndarray:
    """(n, 2) x/y mm of the tumour margin (inside(x, y, z) = 0) on the plane z: rays from the ROI's
    centroid on that slice, each cut at its outermost zero crossing (linear between 0.05 mm steps)."""
    rr, cc = np.nonzero(mask_slice)
    cx, cy = x0 + cc.mean() * pixel_mm, y0 + rr.mean() * pixel_mm
    if inside(np.array([cx]), np.array([cy]), np.array([z]))[0] <= 0:  # centroid outside: start at a voxel inside
        i = int(np.argmin((cc - cc.mean()) ** 2 + (rr - rr.mean()) ** 2))
        cx, cy = x0 + cc[i] * pixel_mm, y0 + rr[i] * pixel_mm
    ang = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = np.arange(0.0, reach_mm, 0.05)
    px = cx + np.cos(ang)[:, None] * r[None, :]
    py = cy + np.sin(ang)[:, None] * r[None, :]
    f = inside(px.ravel(), py.ravel(), np.full(px.size, z)).reshape(px.shape)
    out = np.empty((n, 2))
    for a in range(n):
        pos = np.flatnonzero(f[a] > 0)
        j = int(pos[-1]) + 1 if pos.size else 0  # the outermost crossing: lobes behind a dip stay inside
        if j == 0 or j >= r.size:
            rad = r[min(j, r.size - 1)]
        else:
            f0, f1 = f[a, j - 1], f[a, j]
            rad = r[j - 1] + (r[j] - r[j - 1]) * (f0 / (f0 - f1) if f0 != f1 else 0.0)
        out[a] = (cx + rad * math.cos(ang[a]), cy + rad * math.sin(ang[a]))
    return out


def write_rtstruct(t2_files: list[Path], mask: np.ndarray, origin: tuple[float, float, float], pixel_mm: float,
                   spacing_z: float, inside: Callable, reach_mm: float, out: Path, info: PatientInfo, seed: int,
                   roi_name: str = ROI_NAME) -> Path:
    """An RT Structure Set with one closed-planar ROI `roi_name` (contours on the T2 slices that hold
    tumour), referencing the T2 series, its study and frame of reference by UID."""
    sources = _sources(t2_files)
    src = sources[0]
    enhanced = "PerFrameFunctionalGroupsSequence" in src
    # which SOP instance (and frame, for an enhanced T2) each slice z belongs to
    by_k: dict[int, Dataset] = {}
    for d in sources:
        for z in _frame_z(d):
            by_k[int(round((z - origin[2]) / spacing_z))] = d
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = uid(seed, info.patient_id, "rtstruct")
    ds.Modality = "RTSTRUCT"
    for k in ("PatientName", "PatientID", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
              "StudyDescription"):
        setattr(ds, k, getattr(src, k))
    ds.SeriesInstanceUID = uid(seed, info.patient_id, "series", "rtstruct")
    ds.SeriesNumber = 91
    ds.InstanceNumber = 1
    ds.Manufacturer = "slmfed-synth"
    ds.StructureSetLabel = "RECTUM"
    ds.StructureSetDate, ds.StructureSetTime = src.StudyDate, "120000"
    refs = [_item(ReferencedSOPClassUID=d.SOPClassUID, ReferencedSOPInstanceUID=d.SOPInstanceUID) for d in sources]
    ds.ReferencedFrameOfReferenceSequence = Sequence([_item(
        FrameOfReferenceUID=src.FrameOfReferenceUID,
        RTReferencedStudySequence=Sequence([_item(
            ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",  # Detached Study Management (as TPSs write)
            ReferencedSOPInstanceUID=src.StudyInstanceUID,
            RTReferencedSeriesSequence=Sequence([_item(SeriesInstanceUID=src.SeriesInstanceUID,
                                                       ContourImageSequence=Sequence(refs))]),
        )]),
    )])
    ds.StructureSetROISequence = Sequence([_item(ROINumber=1, ReferencedFrameOfReferenceUID=src.FrameOfReferenceUID,
                                                 ROIName=roi_name, ROIGenerationAlgorithm="MANUAL")])
    contours = []
    for k in range(mask.shape[0]):
        if not mask[k].any():
            continue
        z = origin[2] + k * spacing_z
        poly = margin_polygon(inside, mask[k], origin[0], origin[1], pixel_mm, z, reach_mm)
        d = by_k[k]
        img = _item(ReferencedSOPClassUID=d.SOPClassUID, ReferencedSOPInstanceUID=d.SOPInstanceUID)
        if enhanced:
            img.ReferencedFrameNumber = _frame_z(d).index(next(v for v in _frame_z(d)
                                                                if int(round((v - origin[2]) / spacing_z)) == k)) + 1
        pts = np.column_stack([poly, np.full(len(poly), z)]).ravel()
        contours.append(_item(ContourImageSequence=Sequence([img]), ContourGeometricType="CLOSED_PLANAR",
                              NumberOfContourPoints=len(poly), ContourData=[_ds(round(float(v), 3)) for v in pts]))
    ds.ROIContourSequence = Sequence([_item(ReferencedROINumber=1, ROIDisplayColor=[255, 0, 0],
                                            ContourSequence=Sequence(contours))])
    ds.RTROIObservationsSequence = Sequence([_item(ObservationNumber=1, ReferencedROINumber=1,
                                                   RTROIInterpretedType="GTV", ROIInterpreter="")])
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out
