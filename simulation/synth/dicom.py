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

import struct
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


EXPORTS = ("classic", "enhanced", "mosaic", "directional")


class ExamWriter:
    """Writes the T2, DWI (all b-values in one series) and ADC series of one patient.

    export "classic": one MR Image Storage file per slice; "enhanced": one Enhanced MR Image Storage
    file per series (the same pixels, UIDs and geometry). The random draws (folder and file names) are
    the same in both, so the two exports of a seed hold the same images.
    Two further exports imitate what real scanners write, so the cohort exercises those paths at scale
    (options only: the default "classic" output is unchanged byte for byte):
    "mosaic": on SIEMENS profiles, the DWI (one mosaic file per b-value, trace-weighted: ImageType
    ...TRACEW...MOSAIC, SequenceName "*ep_b800t") and the ADC as Siemens mosaics with a CSA image header
    (client reads them with nibabel); other vendors stay classic. "directional": classic DWI with three
    gradient directions per b > 0 and no trace image, b-values and directions only in the vendor's
    private form (Siemens CSA + (0019,xx0C/0E) + "ep_b800#1"; GE (0043,xx39) "1000000800\\8\\0\\0" +
    (0019,xxBB-BD); Philips (2001,xx03) FL + (2001,xx04) "O" + (2005,xxB0-B2)), no DiffusionBValue.
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
        if self.export == "mosaic" and kind in ("dwi", "adc") and s.manufacturer.upper() == "SIEMENS":
            self._mosaic(series_dir, series_uid, number, kind, description, image_type, grid, place, volumes,
                         slope, tr_te)
            return
        if self.export == "directional" and kind == "dwi":
            self._directional(series_dir, series_uid, number, description, image_type, grid, place, volumes,
                              order, tr_te)
            return
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

    def _save(self, ds: Dataset, series_dir: Path, kind: str) -> None:
        name = f"{self.rng.integers(16**10):010X}"
        path = series_dir / (f"{name}.dcm" if self.scanner.file_style == "flat-dcm" else name)
        ds.save_as(path, enforce_file_format=True)
        self.files.append(path)
        self.series_files.setdefault(kind, []).append(path)

    def _mosaic(self, series_dir, series_uid, number, kind, description, image_type, grid: Grid, place: Placement,
                volumes, slope, tr_te) -> None:
        """One Siemens mosaic file per volume (per b-value for the DWI): the slices tiled row by row on a
        ceil(sqrt(n)) square, ImagePositionPatient that of the whole tiled image (as Siemens writes it,
        which nibabel corrects), NumberOfImagesInMosaic in the CSA header and (0019,xx0A)."""
        info = self.info
        n = grid.slices
        side = int(np.ceil(np.sqrt(n)))
        tr, tc = grid.rows, grid.columns
        ds = self._base(series_uid, number, description, list(image_type) + ["ND", "MOSAIC"], grid, tr_te)
        ds.Rows, ds.Columns = side * tr, side * tc
        ds.AcquisitionMatrix = [tc, 0, 0, tr]
        ds.RescaleSlope = _ds(slope)
        ds.RescaleIntercept = "0"
        # Siemens stores the position of the tiled image's corner: first tile's position minus half the
        # extra extent (see nibabel's MosaicWrapper.image_position, which undoes exactly this)
        first = np.array([place.origin[0], place.origin[1], place.origin[2]], float)
        shift = (np.array([0.0, 1.0, 0.0]) * grid.pixel_mm * (side * tr - tr) / 2
                 + np.array([1.0, 0.0, 0.0]) * grid.pixel_mm * (side * tc - tc) / 2)
        corner = first - shift
        ds.ImagePositionPatient = [_ds(float(x)) for x in corner]
        ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
        ds.add_new(0x0019100A, "US", n)
        ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
        for inst, (b, vol) in enumerate(volumes, start=1):
            tiles = np.zeros((side * tr, side * tc), np.uint16)
            for k in range(n):
                r, c = divmod(k, side)
                tiles[r * tr:(r + 1) * tr, c * tc:(c + 1) * tc] = vol[k]
            csa = {"NumberOfImagesInMosaic": ("US", [n]), "SliceNormalVector": ("FD", [0.0, 0.0, 1.0]),
                   "AcquisitionMatrixText": ("SH", [f"{tr}*{tc}"])}
            if b is not None:
                csa["B_value"] = ("IS", [int(b)])
                ds.SequenceName = f"*ep_b{int(b)}t" if b > 0 else "*ep_b0"
                ds.ImageType = list(image_type[:2]) + ["DIFFUSION", "TRACEW" if b > 0 else "NONE", "ND", "MOSAIC"]
                if 0x0019100C in ds:
                    del ds[0x0019100C]
                ds.add_new(0x0019100C, "IS", int(b))
            ds.add_new(0x00291010, "OB", csa_header(csa))
            ds.SOPInstanceUID = uid(self.seed, info.patient_id, kind, "mosaic", inst)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = inst
            ds.SliceLocation = _ds(float(first[2]))
            ds.PixelData = tiles.tobytes()
            self._save(ds, series_dir, kind)

    def _directional(self, series_dir, series_uid, number, description, image_type, grid: Grid, place: Placement,
                     volumes, order, tr_te) -> None:
        """Classic DWI with three gradient directions (x, y, z) per b > 0 and no trace image, b-value and
        direction only in the vendor's private tags (as older Siemens / GE / Philips classic exports)."""
        s, info = self.scanner, self.info
        ds = self._base(series_uid, number, description, image_type, grid, tr_te)
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = "0"
        vendor = s.manufacturer.upper()
        inst = 0
        for b, vol in volumes:
            for d in ((0, 1, 2) if b else (None,)):
                axis = [0.0, 0.0, 0.0]
                if d is not None:
                    axis[d] = 1.0
                for k in order:
                    inst += 1
                    z = place.origin[2] + k * grid.spacing_mm
                    ds.SOPInstanceUID = uid(self.seed, info.patient_id, "dwi-dir", inst)
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                    ds.InstanceNumber = inst
                    ds.ImagePositionPatient = [_ds(place.origin[0]), _ds(place.origin[1]), _ds(z)]
                    ds.SliceLocation = _ds(z)
                    _vendor_diffusion(ds, vendor, float(b), axis if d is not None else None, d)
                    pixels = vol[k] if d is None else np.clip(np.rint(vol[k] * (0.85, 1.0, 1.15)[d]), 0, 65535)
                    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
                    self._save(ds, series_dir, "dwi")

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


def _vendor_diffusion(ds: Dataset, vendor: str, b: float, axis, d) -> None:
    """b-value and gradient direction in the vendor's private form only (no DiffusionBValue)."""
    if vendor == "SIEMENS":
        ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
        ds.add_new(0x0019100C, "IS", int(b))
        ds.SequenceName = f"ep_b{int(b)}#{d + 1}" if d is not None else "ep_b0"
        csa = {"B_value": ("IS", [int(b)])}
        if axis is not None:
            ds.add_new(0x0019100E, "FD", axis)
            csa["DiffusionGradientDirection"] = ("FD", axis)
            csa["DiffusionDirectionality"] = ("CS", ["DIRECTIONAL"])
        elif 0x0019100E in ds:
            del ds[0x0019100E]
        ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
        ds.add_new(0x00291010, "OB", csa_header(csa))
    elif vendor.startswith("GE"):
        ds.add_new(0x00430010, "LO", "GEMS_PARM_01")
        ds.add_new(0x00431039, "IS", [1_000_000_000 + int(b), 8, 0, 0])
        ds.add_new(0x00190010, "LO", "GEMS_ACQU_01")
        for el, v in zip((0x001910BB, 0x001910BC, 0x001910BD), axis or (0.0, 0.0, 0.0)):
            ds.add_new(el, "DS", _ds(v))
    else:  # Philips
        ds.add_new(0x20010010, "LO", "Philips Imaging DD 001")
        ds.add_new(0x20011003, "FL", float(b))
        ds.add_new(0x20011004, "CS", "O" if axis is not None else "")
        ds.add_new(0x20050010, "LO", "Philips MR Imaging DD 001")
        for el, v in zip((0x200510B0, 0x200510B1, 0x200510B2), axis or (0.0, 0.0, 0.0)):
            ds.add_new(el, "FL", float(v))


def csa_header(tags: dict[str, tuple[str, list]]) -> bytes:
    """A Siemens CSA2 ("SV10") header holding `tags` (name -> (VR, values)).

    Our own code because no library writes CSA: nibabel's csareader (which the client uses) only reads
    it. The layout is the one csareader parses: "SV10", 4 unused bytes, tag count, 77; per tag a
    64-byte name, VM, 4-byte VR, SyngoDT, item count, 77; per item four int32 (the second the length)
    and the value as a null-terminated string padded to 4 bytes."""
    out = [b"SV10", b"\x04\x03\x02\x01", struct.pack("<2I", len(tags), 77)]
    for name, (vr, values) in tags.items():
        out.append(struct.pack("<64si4s3i", name.encode("ascii"), len(values), vr.encode("ascii"), 0, len(values), 77))
        for v in values:
            text = (f"{v:.8f}" if isinstance(v, float) else str(v)).encode("ascii") + b"\x00"
            out.append(struct.pack("<4i", len(text), len(text), 77, len(text)))
            out.append(text + b"\x00" * (-len(text) % 4))
    data = b"".join(out)
    return data + b"\x00" * (len(data) % 2)
