"""Tiny synthetic DICOM site folders for the prepare tests (written with pydicom, read by our code).

A patient has a T2WI stack, a multi-b DWI series on a coarser, shifted grid, optionally the
scanner's ADC, and a spherical mask; a lesion sits at a known physical point in every sequence
(bright on T2 and high-b DWI, dark on ADC), so alignment and centring can be checked.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

_counter = itertools.count(1)


@dataclass
class Grid:
    size: tuple[int, int, int] = (64, 64, 10)  # x, y, z voxels
    spacing: tuple[float, float, float] = (0.8, 0.8, 3.0)  # x, y, z mm
    origin: tuple[float, float, float] = (-25.6, -25.6, -15.0)
    iop: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

    def points(self) -> np.ndarray:
        """Physical coordinates (z, y, x, 3) of every voxel centre."""
        row, col = np.array(self.iop[:3]), np.array(self.iop[3:])
        n = np.cross(row, col)
        i, j, k = np.meshgrid(*[np.arange(s) for s in self.size], indexing="ij")  # x, y, z
        pts = (np.array(self.origin) + i[..., None] * self.spacing[0] * row + j[..., None] * self.spacing[1] * col
               + k[..., None] * self.spacing[2] * n)
        return pts.transpose(2, 1, 0, 3)


@dataclass
class PatientSpec:
    patient_id: str
    lesion: tuple[float, float, float] = (4.0, -3.0, 0.0)  # physical x, y, z (mm)
    radius: float = 5.0
    t2: Grid = field(default_factory=Grid)
    dwi: Grid = field(default_factory=lambda: Grid((36, 36, 7), (1.6, 1.6, 4.0), (-27.0, -28.0, -13.0)))
    bvalues: tuple[float, ...] = (0.0, 800.0)
    adc: str = "scanner"  # "scanner", "computed" (no ADC series) or "none"
    b_tag: str = "standard"  # "standard", "siemens", "ge", "philips" or "none"
    t2_desc: str = "t2_tse_tra"
    dwi_desc: str = "ep2d_diff_b0_800"
    adc_desc: str = "ep2d_diff_b0_800_ADC"
    study_uid: str = ""
    markers: tuple[tuple[float, float, float], ...] = ()  # small extra blobs (not in the mask), physical mm
    dwi_motion: tuple[float, float, float] = (0.0, 0.0, 0.0)  # patient moved by this much before the DWI


def _dataset(pid, study, series, number, desc, image_type, modality="MR") -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.PatientID, ds.PatientName = pid, f"Doe^{pid}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription, ds.ProtocolName = modality, number, desc, desc
    ds.ImageType = list(image_type)
    ds.FrameOfReferenceUID = study
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    return ds


def write_series(folder: Path, vol_zyx: np.ndarray, grid: Grid, *, patient_id: str, study_uid: str, description: str,
                 number: int, image_type=("ORIGINAL", "PRIMARY"), bvalue: float | None = None, b_tag: str = "standard",
                 slope: float = 1.0, modality: str = "MR", series_uid: str | None = None) -> list[Path]:
    """Write one single-frame DICOM file per slice, under random-looking names in shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    row, col = np.array(grid.iop[:3]), np.array(grid.iop[3:])
    n = np.cross(row, col)
    paths = []
    for k in range(vol_zyx.shape[0]):
        ds = _dataset(patient_id, study_uid, series_uid, number, description, image_type, modality)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = vol_zyx.shape[0] - k  # deliberately not the spatial order
        ds.ImagePositionPatient = [float(v) for v in np.array(grid.origin) + k * grid.spacing[2] * n]
        ds.ImageOrientationPatient = list(grid.iop)
        ds.PixelSpacing = [grid.spacing[1], grid.spacing[0]]
        ds.SliceThickness = grid.spacing[2]
        ds.Rows, ds.Columns = vol_zyx.shape[1], vol_zyx.shape[2]
        ds.RescaleSlope, ds.RescaleIntercept = slope, 0.0
        if bvalue is not None:
            if b_tag == "standard":
                ds.add_new((0x0018, 0x9087), "FD", float(bvalue))
            elif b_tag == "siemens":
                ds.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
                ds.add_new((0x0019, 0x100C), "IS", str(int(bvalue)))
            elif b_tag == "ge":
                ds.add_new((0x0043, 0x0010), "LO", "GEMS_PARM_01")
                ds.add_new((0x0043, 0x1039), "IS", [str(int(bvalue) + 1000000000), "8", "0", "0"])
            elif b_tag == "philips":
                ds.add_new((0x2001, 0x0010), "LO", "Philips Imaging DD 001")
                ds.add_new((0x2001, 0x1003), "FL", float(bvalue))
        stored = np.clip(np.round(vol_zyx[k] / slope), 0, 65535).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        p = folder / f"IM{next(_counter):06d}"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _dist(grid: Grid, lesion) -> np.ndarray:
    return np.linalg.norm(grid.points() - np.array(lesion), axis=-1)


def write_patient(site: Path, spec: PatientSpec, write_mask: bool = True) -> dict[str, list[Path]]:
    """Write one patient's DICOM series (and mask) into site/dicom/<random folder>/ and site/masks/."""
    study = spec.study_uid or generate_uid()
    folder = site / "dicom" / f"exam{next(_counter):04d}"
    out: dict[str, list[Path]] = {}
    d_t2 = _dist(spec.t2, spec.lesion)
    t2 = 200.0 + 600.0 * np.exp(-(d_t2 / spec.radius) ** 2)
    for m in spec.markers:
        t2 += 600.0 * np.exp(-(_dist(spec.t2, m) / 2.0) ** 2)
    out["t2"] = write_series(folder / "s1", t2, spec.t2, patient_id=spec.patient_id, study_uid=study,
                             description=spec.t2_desc, number=3)
    moved = np.add(spec.lesion, spec.dwi_motion)
    d_dwi = _dist(spec.dwi, moved)
    adc = 2.0e-3 - 1.2e-3 * np.exp(-(d_dwi / spec.radius) ** 2)  # mm^2/s, restricted in the lesion
    for m in spec.markers:
        adc -= 1.2e-3 * np.exp(-(_dist(spec.dwi, np.add(m, spec.dwi_motion)) / 2.5) ** 2)
    s0 = 1000.0
    dwi_paths = []
    dwi_uid = generate_uid()
    for b in spec.bvalues:
        vol = s0 * np.exp(-b * adc)
        dwi_paths += write_series(folder / "s2", vol, spec.dwi, patient_id=spec.patient_id, study_uid=study,
                                  description=spec.dwi_desc, number=5, image_type=("ORIGINAL", "PRIMARY", "DIFFUSION"),
                                  bvalue=None if spec.b_tag == "none" else b, b_tag=spec.b_tag, series_uid=dwi_uid)
    out["dwi"] = dwi_paths
    if spec.adc == "scanner":
        out["adc"] = write_series(folder / "s3", adc * 1e6, spec.dwi, patient_id=spec.patient_id, study_uid=study,
                                  description=spec.adc_desc, number=6, image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC"))
    if write_mask:
        write_mask_for(site, spec)
    return out


def mask_array(spec: PatientSpec) -> np.ndarray:
    return (_dist(spec.t2, spec.lesion) <= spec.radius).astype(np.uint8)


def write_mask_for(site: Path, spec: PatientSpec, arr: np.ndarray | None = None, grid: Grid | None = None,
                   suffix: str = ".nii.gz") -> Path:
    grid = grid or spec.t2
    arr = mask_array(spec) if arr is None else arr
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    row, col = np.array(grid.iop[:3]), np.array(grid.iop[3:])
    img.SetDirection(tuple(np.column_stack([row, col, np.cross(row, col)]).ravel().tolist()))
    (site / "masks").mkdir(parents=True, exist_ok=True)
    p = site / "masks" / f"{spec.patient_id}{suffix}"
    sitk.WriteImage(img, str(p))
    return p


CLINICAL_HEADER = "patient_id,sex,tumor_site,cea,ca199,slm\n"


def clinical_line(pid: str, sex="M", site="mid", cea="3.2", ca199="20", slm="1") -> str:
    return f"{pid},{sex},{site},{cea},{ca199},{slm}\n"


def make_site(root: Path, specs: list[PatientSpec], rows: list[str] | None = None) -> Path:
    """A site folder with every spec written and a matching clinical.csv (or the given rows)."""
    root.mkdir(parents=True, exist_ok=True)
    for s in specs:
        write_patient(root, s)
    if rows is None:
        rows = [clinical_line(s.patient_id, slm=str(i % 2)) for i, s in enumerate(specs)]
    (root / "clinical.csv").write_text(CLINICAL_HEADER + "".join(rows), encoding="utf-8")
    return root


def test_fixture_writes_readable_dicom_with_geometry(tmp_path):
    spec = PatientSpec("P001")
    out = write_patient(tmp_path, spec)
    ds = pydicom.dcmread(out["t2"][2])
    assert ds.PatientID == "P001"
    assert [float(v) for v in ds.ImagePositionPatient] == [-25.6, -25.6, -15.0 + 2 * 3.0]
    assert ds.pixel_array.shape == (64, 64)
    dwi_b = {float(pydicom.dcmread(p)[0x0018, 0x9087].value) for p in out["dwi"]}
    assert dwi_b == {0.0, 800.0}
    assert (tmp_path / "masks" / "P001.nii.gz").is_file()
