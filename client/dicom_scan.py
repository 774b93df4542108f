"""Find every DICOM image under a site's `dicom/` folder and read only the header fields we need.

Files are found by content, not by name (any nesting, any file name). Reading stops before the
pixel data, so a scan costs about one header parse per file; the byte offset of the pixel data is
kept so a truncated file (header fine, pixels cut short) is caught here and not later.
A file that is not DICOM, or is DICOM but not an image (DICOMDIR, reports), is skipped with a
reason that the caller counts. Records are plain dataclasses so they pickle to worker processes
and serialise to the site-local scan index that lets a re-run skip unchanged files.
"""
from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import Tag

# Vendor private b-value tags (used only when the standard DiffusionBValue is absent).
TAG_BVALUE = Tag(0x0018, 0x9087)
TAG_SIEMENS_B = Tag(0x0019, 0x100C)
TAG_GE_B = Tag(0x0043, 0x1039)
TAG_PHILIPS_B = Tag(0x2001, 0x1003)

HEADER_TAGS = [
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality",
    "SeriesDescription", "ProtocolName", "SequenceName", "ImageType", "SeriesNumber",
    "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames", "StudyDate",
    "RescaleSlope", "RescaleIntercept", "SliceThickness", "FrameOfReferenceUID", "PixelData",
    TAG_BVALUE, TAG_SIEMENS_B, TAG_GE_B, TAG_PHILIPS_B,
]


@dataclass
class FileRecord:
    """The header facts of one DICOM image file that sequence matching and QC need."""

    path: str
    size: int
    mtime_ns: int
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str = ""
    modality: str = ""
    description: str = ""
    protocol: str = ""
    sequence_name: str = ""
    image_type: tuple[str, ...] = ()
    series_number: int = 0
    instance_number: int = 0
    ipp: tuple[float, float, float] | None = None
    iop: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, float] | None = None
    rows: int = 0
    cols: int = 0
    frames: int = 1
    bvalue: float | None = None
    study_date: str = ""
    slope: float = 1.0
    intercept: float = 0.0
    truncated: bool = False
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "FileRecord":
        d = dict(d)
        for k in ("image_type", "ipp", "iop", "pixel_spacing"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


class NotAnImage(Exception):
    """The file is unreadable, not DICOM, or DICOM without an image."""


def _text(ds, name: str) -> str:
    v = ds.get(name)
    if v is None:
        return ""
    return str(v.value if hasattr(v, "value") else v).strip()


def _float_or_none(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _private_b(elem, vendor: str) -> float | None:
    """Decode a vendor private b-value element (possibly read as raw UN bytes)."""
    value = elem.value
    if isinstance(value, bytes):
        if vendor == "philips" and len(value) == 4:
            return float(struct.unpack("<f", value)[0])
        try:
            value = value.decode("ascii", "ignore").strip("\x00 ").split("\\")
        except Exception:
            return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    b = _float_or_none(value)
    if b is None:
        return None
    if vendor == "ge" and b >= 1e9:  # GE adds 10^9 to flag the b-value slot
        b -= 1e9
    return b


def _bvalue(ds) -> float | None:
    if TAG_BVALUE in ds:
        b = _float_or_none(ds[TAG_BVALUE].value)
        if b is not None:
            return b
    for tag, vendor in ((TAG_SIEMENS_B, "siemens"), (TAG_GE_B, "ge"), (TAG_PHILIPS_B, "philips")):
        if tag in ds:
            b = _private_b(ds[tag], vendor)
            if b is not None and 0 <= b < 1e5:
                return b
    seq = _text(ds, "SequenceName")  # Siemens: "*ep_b800t"
    if seq.startswith("*ep_b"):
        digits = "".join(ch for ch in seq[5:] if ch.isdigit())
        if digits:
            return float(digits)
    return None


def read_header(path: str | os.PathLike) -> FileRecord:
    """Read one file's header; raises NotAnImage with the reason when it cannot be used."""
    path = str(path)
    st = os.stat(path)
    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            pixel_offset = fh.tell()
    except InvalidDicomError:
        raise NotAnImage("not a DICOM file") from None
    except (OSError, EOFError, ValueError, struct.error, KeyError, TypeError) as exc:
        raise NotAnImage(f"unreadable DICOM header ({type(exc).__name__})") from None
    if len(ds) == 0:
        raise NotAnImage("truncated or empty DICOM header")
    series_uid = _text(ds, "SeriesInstanceUID")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not series_uid or not rows or not cols:
        raise NotAnImage("DICOM file without an image (no series UID or no rows/columns)")
    frames = int(_float_or_none(ds.get("NumberOfFrames", 1)) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    implicit = getattr(ds, "original_encoding", (False, True))[0]
    header_len = 8 if implicit else 12
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    truncated = False
    if pixel_offset >= st.st_size:
        truncated = True  # the file ends before its pixel data starts
    elif not getattr(ts and pydicom.uid.UID(ts), "is_compressed", False):
        expected = rows * cols * frames * spp * bits // 8
        truncated = st.st_size < pixel_offset + header_len + expected
    iop = ds.get("ImageOrientationPatient")
    ipp = ds.get("ImagePositionPatient")
    ps = ds.get("PixelSpacing")
    return FileRecord(
        path=path,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        patient_id=_text(ds, "PatientID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=series_uid,
        sop_uid=_text(ds, "SOPInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        description=_text(ds, "SeriesDescription"),
        protocol=_text(ds, "ProtocolName"),
        sequence_name=_text(ds, "SequenceName"),
        image_type=tuple(str(x).upper() for x in (ds.get("ImageType") or [])),
        series_number=int(_float_or_none(ds.get("SeriesNumber")) or 0),
        instance_number=int(_float_or_none(ds.get("InstanceNumber")) or 0),
        ipp=tuple(float(x) for x in ipp) if ipp is not None and len(ipp) == 3 else None,
        iop=tuple(float(x) for x in iop) if iop is not None and len(iop) == 6 else None,
        pixel_spacing=tuple(float(x) for x in ps) if ps is not None and len(ps) == 2 else None,
        rows=rows,
        cols=cols,
        frames=frames,
        bvalue=_bvalue(ds),
        study_date=_text(ds, "StudyDate"),
        slope=_float_or_none(ds.get("RescaleSlope")) or 1.0,
        intercept=_float_or_none(ds.get("RescaleIntercept")) or 0.0,
        truncated=truncated,
    )


def list_files(dicom_dir: str | Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every regular file under dicom_dir, sorted, hidden files included."""
    out = []
    for root, dirs, files in os.walk(dicom_dir):
        dirs.sort()
        for name in files:
            p = os.path.join(root, name)
            try:
                st = os.stat(p)
            except OSError:
                continue
            if os.path.isfile(p):
                out.append((p, st.st_size, st.st_mtime_ns))
    out.sort()
    return out


def scan_files(paths: Iterable[str]) -> list[tuple[str, FileRecord | None, str]]:
    """Read many headers; each result is (path, record or None, skip reason)."""
    out = []
    for p in paths:
        try:
            out.append((p, read_header(p), ""))
        except NotAnImage as exc:
            out.append((p, None, str(exc)))
        except OSError as exc:
            out.append((p, None, f"unreadable file ({exc.strerror or type(exc).__name__})"))
    return out
