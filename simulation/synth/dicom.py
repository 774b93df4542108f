"""Write an exam as real DICOM files (pydicom): one file per image (MR Image Storage, "classic"),
or one multi-frame file per series (Enhanced MR Image Storage, "enhanced", as current Siemens XA
and Philips scanners export): geometry, b-value and rescale then live in the shared / per-frame
functional groups instead of the top-level tags.

Geometry follows the DICOM patient coordinate system (LPS, mm): axial slices with
ImageOrientationPatient 1\\0\\0\\0\\1\\0, ImagePositionPatient at the centre of the first pixel,
PixelSpacing = row spacing \\ column spacing. UIDs derive from the seed and patient (deterministic);
file names are random from the patient's generator, so readers must sort by geometry, not names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID,
                         generate_uid)

from .phantom import Exam, Placement
from .scanners import Grid, Scanner


@dataclass(frozen=True)
class PatientInfo:
    patient_id: str
    sex: str  # M / F
    age: int
    study_date: str  # YYYYMMDD
    institution: str


def uid(seed: int, *parts: object) -> str:
    """A deterministic UID: same seed and parts, same UID."""
    return generate_uid(entropy_srcs=["slmfed-synth", str(seed), *map(str, parts)])


def _to_uint16(vol: np.ndarray, what: str) -> np.ndarray:
    v = np.rint(vol)
    if v.min() < 0 or v.max() > 65535:
        raise ValueError(f"{what}: stored values must fit uint16, found range {v.min()}..{v.max()}")
    return v.astype(np.uint16)


EXPORTS = ("classic", "enhanced")


class ExamWriter:
    """Writes the T2, DWI (all b-values in one series) and ADC series of one patient.

    export "classic": one MR Image Storage file per slice; "enhanced": one Enhanced MR Image Storage
    file per series (the same pixels, UIDs and geometry). The random draws (folder and file names) are
    the same in both, so the two exports of a seed hold the same images.
    """

    def __init__(self, root: Path, scanner: Scanner, info: PatientInfo, seed: int, rng: np.random.Generator,
                 export: str = "classic"):
        if export not in EXPORTS:
            raise ValueError(f"export: expected one of {', '.join(EXPORTS)}, found {export!r}")
        self.root, self.scanner, self.info, self.seed, self.rng = root, scanner, info, seed, rng
        self.export = export
        self.series_files: dict[str, list[Path]] = {}
        self.study_uid = uid(seed, info.patient_id, "study")
        self.frame_uid = uid(seed, info.patient_id, "frame")
        self.files: list[Path] = []
        if scanner.file_style == "flat-dcm":
            self.exam_dir = root / info.patient_id
        else:
            self.exam_dir = root / f"exam_{self.rng.integers(16**8):08x}"

    def write(self, exam: Exam) -> list[Path]:
        s = self.scanner
        self._series(2, "t2", s.t2_description, ["ORIGINAL", "PRIMARY", "M", "NORM"], s.t2, exam.t2_place,
                     [(None, _to_uint16(exam.t2, "T2"))], 1.0, s.t2_tr_te)
        b_vols = [(b, _to_uint16(exam.dwi[b], f"DWI b={b:g}")) for b in s.b_values]
        self._series(4, "dwi", s.dwi_description, ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"], s.dwi,
                     exam.dwi_place, b_vols, 1.0, s.dwi_tr_te, interleave=s.dwi_interleaved)
        self._series(5, "adc", s.adc_description, ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"], s.dwi,
                     exam.dwi_place, [(None, _to_uint16(exam.adc / s.adc_slope, "ADC"))], s.adc_slope, s.dwi_tr_te)
        return self.files

    def _series(self, number, kind, description, image_type, grid: Grid, place: Placement, volumes,
                slope, tr_te, interleave=False):
        s, info = self.scanner, self.info
        series_uid = uid(self.seed, info.patient_id, "series", kind)
        n = grid.slices
        order = list(range(n))[::-1] if s.descending_slices else list(range(n))
        items = [(bi, k) for bi in range(len(volumes)) for k in order]
        if interleave:
            items = [(bi, k) for k in order for bi in range(len(volumes))]
        series_dir = self.exam_dir if s.file_style == "flat-dcm" else self.exam_dir / f"Se{number}"
        series_dir.mkdir(parents=True, exist_ok=True)
        if self.export == "enhanced":
            self._enhanced(series_dir, series_uid, number, kind, description, image_type, grid, place, volumes,
                           items, slope, tr_te)
            return
        ds = self._base(series_uid, number, description, image_type, grid, tr_te)  # reused: only per-image tags change
        ds.RescaleSlope = _ds(slope)
        ds.RescaleIntercept = "0"
        for inst, (bi, k) in enumerate(items, start=1):
            b, vol = volumes[bi]
            z = place.origin[2] + k * grid.spacing_mm
            ds.SOPInstanceUID = uid(self.seed, info.patient_id, kind, inst)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = inst
            ds.ImagePositionPatient = [_ds(place.origin[0]), _ds(place.origin[1]), _ds(z)]
            ds.SliceLocation = _ds(z)
            if b is not None:
                ds.DiffusionBValue = float(b)
                ds.DiffusionDirectionality = "ISOTROPIC" if b > 0 else "NONE"
            ds.PixelData = np.ascontiguousarray(vol[k]).tobytes()
            name = f"{self.rng.integers(16**10):010X}"
            path = series_dir / (f"{name}.dcm" if s.file_style == "flat-dcm" else name)
            ds.save_as(path, enforce_file_format=True)
            self.files.append(path)
            self.series_files.setdefault(kind, []).append(path)

    def _enhanced(self, series_dir, series_uid, number, kind, description, image_type, grid: Grid, place: Placement,
                  volumes, items, slope, tr_te) -> None:
        """One Enhanced MR file: frames in `items` order, position / b-value per frame, orientation and
        pixel measures shared; ADC carries its rescale per frame (as Philips does), the others shared.
        DWI: each b > 0 slice also has three DIRECTIONAL frames (gradient along x, y, z) before its
        ISOTROPIC trace frame, as Siemens XA / Philips enhanced exports do."""
        s, info = self.scanner, self.info
        ds = self._base(series_uid, number, description, image_type, grid, tr_te)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = EnhancedMRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(self.seed, info.patient_id, kind, "enhanced")
        ds.InstanceNumber = 1
        for tag in ("ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
                    "RepetitionTime", "EchoTime", "ScanningSequence", "SequenceVariant"):
            delattr(ds, tag)  # enhanced: these live in the functional groups (or MR-specific modules)
        ds.ImageType = list(image_type)[:4]
        if kind == "dwi":  # as scanners export it: three DIRECTIONAL frames before each b > 0 trace frame
            items = [(bi, k, d) for bi, k in items
                     for d in ((0, 1, 2, None) if volumes[bi][0] else (None,))]
        else:
            items = [(bi, k, None) for bi, k in items]
        ds.NumberOfFrames = len(items)
        ds.ContentQualification = "PRODUCT"
        ds.BurnedInAnnotation = "NO"
        ds.PresentationLUTShape = "IDENTITY"
        ds.AcquisitionContrast = "DIFFUSION" if kind != "t2" else "T2"
        ds.PulseSequenceName = "EP" if kind != "t2" else "TSE"
        ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=uid(self.seed, series_uid, "dim"))])
        dim = [_item(DimensionIndexPointer=0x00209056, FunctionalGroupPointer=0x00209111,
                     DimensionOrganizationUID=ds.DimensionOrganizationSequence[0].DimensionOrganizationUID),
               _item(DimensionIndexPointer=0x00209057, FunctionalGroupPointer=0x00209111,
                     DimensionOrganizationUID=ds.DimensionOrganizationSequence[0].DimensionOrganizationUID)]
        ds.DimensionIndexSequence = Sequence(dim)
        shared = _item(
            PixelMeasuresSequence=Sequence([_item(PixelSpacing=[_ds(grid.pixel_mm), _ds(grid.pixel_mm)],
                                                  SliceThickness=_ds(grid.thickness_mm),
                                                  SpacingBetweenSlices=_ds(grid.spacing_mm))]),
            PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=["1", "0", "0", "0", "1", "0"])]),
            MRTimingAndRelatedParametersSequence=Sequence([_item(RepetitionTime=tr_te[0])]),
            MREchoSequence=Sequence([_item(EffectiveEchoTime=tr_te[1])]),
        )
        rescale = _item(RescaleSlope=_ds(slope), RescaleIntercept="0", RescaleType="US")
        if kind != "adc":
            shared.PixelValueTransformationSequence = Sequence([rescale])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        frames, pixels = [], []
        positions = sorted({k for _, k, _ in items})
        for bi, k, direction in items:
            b, vol = volumes[bi]
            z = place.origin[2] + k * grid.spacing_mm
            fg = _item(
                FrameContentSequence=Sequence([_item(StackID="1", InStackPositionNumber=positions.index(k) + 1,
                                                     DimensionIndexValues=[1, positions.index(k) + 1])]),
                PlanePositionSequence=Sequence([_item(ImagePositionPatient=[_ds(place.origin[0]), _ds(place.origin[1]),
                                                                            _ds(z)])]),
                MRImageFrameTypeSequence=Sequence([_item(FrameType=ds.ImageType)]),
            )
            if b is not None and direction is not None:
                axis = [0.0, 0.0, 0.0]
                axis[direction] = 1.0
                fg.MRDiffusionSequence = Sequence([_item(
                    DiffusionBValue=float(b), DiffusionDirectionality="DIRECTIONAL",
                    DiffusionGradientDirectionSequence=Sequence([_item(DiffusionGradientOrientation=axis)]))])
            elif b is not None:
                fg.MRDiffusionSequence = Sequence([_item(DiffusionBValue=float(b),
                                                         DiffusionDirectionality="ISOTROPIC" if b > 0 else "NONE")])
            if kind == "adc":
                fg.PixelValueTransformationSequence = Sequence([rescale])
            frames.append(fg)
            if direction is None:
                pixels.append(np.ascontiguousarray(vol[k]))
            else:  # anisotropy: each direction differs from the trace (a reader that mixes them in is caught)
                pixels.append(np.clip(np.rint(vol[k] * (0.85, 1.0, 1.15)[direction]), 0, 65535).astype(np.uint16))
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
        ds.PixelData = np.stack(pixels).tobytes()
        name = f"{self.rng.integers(16**10):010X}"
        path = series_dir / (f"{name}.dcm" if s.file_style == "flat-dcm" else name)
        ds.save_as(path, enforce_file_format=True)
        self.files.append(path)
        self.series_files.setdefault(kind, []).append(path)

    def _base(self, series_uid, number, description, image_type, grid: Grid, tr_te) -> Dataset:
        s, info = self.scanner, self.info
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = image_type
        ds.SOPClassUID = MRImageStorage
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = info.study_date
        ds.StudyTime = "093000"
        ds.SeriesTime = f"09{30 + number:02d}00"
        ds.Modality = "MR"
        ds.Manufacturer = s.manufacturer
        ds.InstitutionName = info.institution
        ds.ManufacturerModelName = s.model_name
        ds.StudyDescription = "MRI PELVIS RECTUM"
        ds.SeriesDescription = description
        ds.ProtocolName = description
        ds.PatientName = f"{info.patient_id}^"  # one-component name, unambiguous
        ds.PatientID = info.patient_id
        ds.PatientSex = info.sex
        ds.PatientBirthDate = ""
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.PatientAge = f"{info.age:03d}Y"
        ds.BodyPartExamined = "PELVIS"
        ds.ScanningSequence = "EP" if number > 2 else "SE"
        ds.SequenceVariant = "SK\\SP" if number > 2 else "SK\\SP\\OSP"
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = _ds(grid.thickness_mm)
        ds.SpacingBetweenSlices = _ds(grid.spacing_mm)
        ds.RepetitionTime = _ds(tr_te[0])
        ds.EchoTime = _ds(tr_te[1])
        ds.MagneticFieldStrength = _ds(s.field_t)
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = number
        ds.AcquisitionNumber = 1
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = self.frame_uid
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = grid.rows
        ds.Columns = grid.columns
        ds.PixelSpacing = [_ds(grid.pixel_mm), _ds(grid.pixel_mm)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        return ds


def _item(**kw) -> Dataset:
    """A sequence item with the given keywords."""
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def _ds(v: float) -> str:
    """A DS string (<= 16 chars) that round-trips the float the geometry was computed from."""
    text = f"{v:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        raise ValueError(f"decimal string too long for DICOM DS: {text}")
    return text
