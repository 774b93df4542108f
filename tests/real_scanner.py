"""Sites built from files that real scanners wrote (not this project's imitations), for the tests.

Sources (nothing is downloaded at test time; a missing source makes its tests skip with the reason):
- nibabel's wheel (a dependency): nibabel/nicom/tests/data
    siemens_dwi_0.dcm.gz, siemens_dwi_1000.dcm.gz  Siemens TrioTim DTI mosaics (48 tiles of 128 x 128,
        b = 0 and b = 1000 with the CSA header's gradient direction); the pixels were blanked (all zero)
        when the files were anonymised, so the geometry and headers are real but the image is not
    0.dcm                                          TrioTim mosaic header on a 256 x 256 pixel matrix that
        cannot hold its 48 tiles of 128 x 128 (a reduced copy): a mosaic that cannot be unpacked
    csa_slice_norm.dcm                             TrioTim EPI mosaic (32 tiles, oblique), real pixels
- heudiconv's source distribution (heudiconv-*.tar.gz in $SLMFED_TEST_DATA, default
  ~/.cache/slmfed-test-data; .ci/run fetches it with `pip download`): heudiconv/tests/data/b0dwiForFmap
    three Siemens Prisma multiband DWI mosaics of one series (81 tiles of 152 x 150, 1368 x 1350 pixels):
        b = 5 twice (ep_b5#1, two averages of one direction) and b = 1500 (ep_b1500#2), real pixels

What is changed when a site is built: identifiers only (PatientID, PatientName, StudyInstanceUID made
the patient's), plus what a DWI-only source lacks: a classic T2 series written on the DWI's own slice
grid (its pixels are the source's own low-b tiles, so T2 and DWI really overlap) or moved away from it,
and a ball-shaped ROI mask on that T2 grid. Pixels, geometry and vendor tags of the real files are kept.
"""
from __future__ import annotations

import csv
import gzip
import os
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

NIBABEL_DATA = Path(__import__("nibabel").__file__).parent / "nicom" / "tests" / "data"
TEST_DATA = Path(os.environ.get("SLMFED_TEST_DATA", Path.home() / ".cache" / "slmfed-test-data"))
HEUDICONV_DWI = [f"b0dwiForFmap/b0dwi_for_fmap+0000{i}.dcm" for i in (1, 2, 3)]


def nibabel_file(name: str, tmp: Path) -> Path:
    """A real file from nibabel's test data (a .gz decompressed into tmp); skip when absent."""
    src = NIBABEL_DATA / name
    if not src.is_file():
        pytest.skip(f"real scanner file {name} not in nibabel's wheel ({NIBABEL_DATA})")
    if name.endswith(".gz"):
        out = tmp / name[:-3]
        if not out.is_file():
            out.write_bytes(gzip.decompress(src.read_bytes()))
        return out
    return src


def heudiconv_files(tmp: Path, members: list[str]) -> list[Path]:
    """Real files from heudiconv's source distribution (heudiconv/tests/data/<member>); skip when the
    sdist is not in TEST_DATA."""
    sdists = sorted(TEST_DATA.glob("heudiconv-*.tar.gz"))
    if not sdists:
        pytest.skip(f"heudiconv's sdist (real Siemens Prisma mosaic DWI) not in {TEST_DATA}: "
                    "run `pip download --no-deps --no-binary :all: heudiconv -d <that folder>` (.ci/run does)")
    out = tmp / "heudiconv"
    wanted = {m: out / m for m in members}
    if not all(p.is_file() for p in wanted.values()):
        with tarfile.open(sdists[-1]) as tar:
            for info in tar:
                for m, p in wanted.items():
                    if info.name.endswith("heudiconv/tests/data/" + m):
                        p.parent.mkdir(parents=True, exist_ok=True)
                        p.write_bytes(tar.extractfile(info).read())
    missing = [m for m, p in wanted.items() if not p.is_file()]
    if missing:
        pytest.skip(f"{sdists[-1].name} lacks {', '.join(missing)}")
    return [wanted[m] for m in members]


def relabel(src: Path, dst: Path, patient_id: str, study_uid: str, drop: tuple[int, ...] = (),
            changes: dict | None = None) -> Path:
    """Copy a real file with the identifiers made this patient's (and `drop` tags removed, `changes` set:
    for tests that hide one source of a fact to check another)."""
    ds = pydicom.dcmread(src)
    ds.PatientID = patient_id
    ds.PatientName = f"{patient_id}^"
    ds.StudyInstanceUID = study_uid
    for tag in drop:
        if tag in ds:
            del ds[tag]
    for k, v in (changes or {}).items():
        setattr(ds, k, v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def write_t2(out_dir: Path, tiles: list, pixels: np.ndarray, patient_id: str, study_uid: str,
             shift_mm=(0.0, 0.0, 0.0)) -> list[Path]:
    """A classic T2 series ("t2_tse_tra") on the slice grid of `tiles` (the DWI's slice records: same
    orientation, pixel spacing and positions, moved by shift_mm), pixels (n, rows, cols) as uint16."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid(entropy_srcs=[patient_id, "t2"])
    scale = 4000.0 / max(float(pixels.max()), 1.0)
    paths = []
    for k, (rec, img) in enumerate(zip(tiles, pixels)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[patient_id, "t2", str(k)])
        ds.Modality, ds.PatientID, ds.PatientName = "MR", patient_id, f"{patient_id}^"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SeriesDescription = ds.ProtocolName = "t2_tse_tra"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in rec.iop]
        ds.ImagePositionPatient = [f"{v + s:.6f}" for v, s in zip(rec.ipp, shift_mm)]
        ds.PixelSpacing = [f"{v:.6f}" for v in rec.pixel_spacing]
        ds.Rows, ds.Columns = img.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.clip(np.rint(img * scale), 0, 65535).astype(np.uint16).tobytes()
        p = out_dir / f"t2_{k:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def write_ball_mask(t2_paths: list[Path], out: Path, radius_mm: float = 9.0, centre_frac=(0.5, 0.5, 0.5)) -> sitk.Image:
    """A ball-shaped ROI on the T2 grid as prepare reads it (masks/<patient_id>.nii.gz)."""
    from client.dicom_scan import read_header
    from client.volumes import read_volume

    t2, _ = read_volume([read_header(p) for p in t2_paths], "t2")
    size = np.array(t2.GetSize())
    centre = np.array(t2.TransformContinuousIndexToPhysicalPoint([float(v) for v in (size - 1) * np.array(centre_frac)]))
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    idx = np.stack([xx, yy, zz], axis=-1).reshape(-1, 3).astype(float)
    m = np.array(t2.GetDirection()).reshape(3, 3) * np.array(t2.GetSpacing())
    pts = idx @ m.T + np.array(t2.GetOrigin())
    ball = (np.linalg.norm(pts - centre, axis=1) <= radius_mm).reshape(size[::-1]).astype(np.uint8)
    mask = sitk.GetImageFromArray(ball)
    mask.CopyInformation(t2)
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(mask, str(out))
    return mask


def write_clinical(site: Path, patient_ids: list[str]) -> None:
    with open(site / "clinical.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "sex", "tumor_site", "cea", "ca199", "slm"])
        for i, pid in enumerate(patient_ids):
            w.writerow([pid, "MF"[i % 2], ("low", "mid", "high")[i % 3], 4.0 + i, 20.0 + i, i % 2])


def mosaic_patient(site: Path, pid: str, dwi_sources: list[Path], t2_from: int = 0, shift_mm=(0.0, 0.0, 0.0),
                   t2_pixels: np.ndarray | None = None) -> list:
    """One patient from real mosaic DWI files: the files relabelled, a T2 on the tiles' slice grid
    (pixels: the tiles of dwi_sources[t2_from], or t2_pixels), a ball ROI at the grid centre.
    Returns the DWI slice records of the first file (as client/dicom_scan.py reads them)."""
    from client.dicom_scan import read_headers, read_mosaic_tiles

    study = generate_uid(entropy_srcs=[pid, "study"])
    dicom = site / "dicom" / pid
    copies = [relabel(src, dicom / "dwi" / f"{i:02d}.dcm", pid, study) for i, src in enumerate(dwi_sources)]
    tiles = read_headers(copies[t2_from])
    pixels = t2_pixels if t2_pixels is not None else read_mosaic_tiles(tiles[0])
    t2 = write_t2(dicom / "t2", tiles, pixels, pid, study, shift_mm)
    write_ball_mask(t2, site / "masks" / f"{pid}.nii.gz")
    return tiles
