"""Find every DICOM image under a site's `dicom/` folder and read only the header fields we need.

Files are found by content, not by name (any nesting, any file name). Reading stops before the
pixel data, so a scan costs about one header parse per file; the byte offset of the pixel data is
kept so a truncated file (header fine, pixels cut short) is caught here and not later.
A file that is not DICOM, or is DICOM but not an image (DICOMDIR, reports), is skipped with a
reason that the caller counts. Records are plain dataclasses so they pickle to worker processes
and serialise to the site-local scan index that lets a re-run skip unchanged files.

Input forms (`input_form`): "classic" single-frame MR Image Storage gives one record per file;
Enhanced MR Image Storage and Legacy Converted Enhanced MR give one record per frame (`frame` >= 0),
with position, orientation, pixel spacing, b-value and rescale read from that frame's per-frame
functional groups, else the shared ones (PlanePositionSequence, PlaneOrientationSequence,
PixelMeasuresSequence, MRDiffusionSequence, PixelValueTransformationSequence; for a legacy
conversion the b-value may sit in the unassigned converted attributes), so everything downstream
(series grouping, b-value split, stack checks) works on frames exactly as on slices. Per-direction
diffusion frames (DiffusionDirectionality DIRECTIONAL / BMATRIX) are dropped where the file holds
the trace (ISOTROPIC) frames of the same b-value; without a trace they are kept, and the stack check
then names the duplicated positions. pydicom's
object model is used for the functional groups (highdicom adds nothing a header scan needs).
DICOM SEG and RTSTRUCT objects give one "mask object" record (no pixels read here) carrying the
series UIDs they reference, so masks are matched to the patient's T2 by UID, never by file name.
A DICOMDIR is skipped and counted: the layout it describes is read from the image headers instead.
"""
from __future__ import annotations

import copy
import os
import struct
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import Tag

# Vendor private b-value tags (used only when the standard DiffusionBValue is absent).
TAG_BVALUE = Tag(0x0018, 0x9087)
TAG_SIEMENS_B = Tag(0x0019, 0x100C)
TAG_GE_B = Tag(0x0043, 0x1039)
TAG_PHILIPS_B = Tag(0x2001, 0x1003)

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
MEDIA_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"
MASK_SOP_CLASSES = {SEG_STORAGE: "seg", RTSTRUCT_STORAGE: "rtstruct"}


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
    pixel_offset: int = -1  # byte offset of the PixelData element when it can be read raw, else -1
    pixel_dtype: str = ""  # numpy dtype of the raw pixels (e.g. "<u2") for that fast path
    bits_stored: int = 0
    pixel_header: int = 12  # 12 bytes before the pixels in explicit VR, 8 in implicit VR
    frame: int = -1  # index of this frame in a multi-frame file; -1 for a single-frame file
    sop_class: str = ""
    ref_series: tuple[str, ...] = ()  # SEG / RTSTRUCT: the series UIDs the mask object references

    def to_json(self) -> list:
        """Compact form for the scan index (field order of the dataclass)."""
        return [getattr(self, f) for f in _FIELDS]

    @classmethod
    def from_json(cls, values: list) -> "FileRecord":
        d = dict(zip(_FIELDS, values))
        for k in ("image_type", "ipp", "iop", "pixel_spacing", "ref_series"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


_FIELDS = tuple(f.name for f in fields(FileRecord))


class NotAnImage(Exception):
    """The file is unreadable, not DICOM, or DICOM without an image."""


def input_form(rec: FileRecord) -> str:
    """How a record's data came: classic, enhanced, legacy-enhanced (multi-frame MR), seg or rtstruct."""
    if rec.sop_class in MASK_SOP_CLASSES:
        return MASK_SOP_CLASSES[rec.sop_class]
    if rec.frame >= 0:
        return "legacy-enhanced" if rec.sop_class == LEGACY_ENHANCED_MR_STORAGE else "enhanced"
    return "classic"


def is_mask_object(rec: FileRecord) -> bool:
    return rec.sop_class in MASK_SOP_CLASSES


_US = {0x00280010, 0x00280011, 0x00280100, 0x00280002}


def _raw(ds, tag: int):
    """An element's value without pydicom's (slow) conversion: bytes for raw elements."""
    elem = ds.get_item(tag)
    return None if elem is None else elem.value


def _strs(ds, tag: int) -> list[str]:
    v = _raw(ds, tag)
    if v is None:
        return []
    if isinstance(v, bytes):
        try:
            text = v.decode("utf-8")
        except UnicodeDecodeError:
            text = v.decode("latin-1")
        return [x.strip(" \x00") for x in text.split("\\")]
    if isinstance(v, (list, tuple, MultiValue)):
        return [str(x).strip() for x in v]
    return [str(v).strip()]


def _str(ds, tag: int) -> str:
    return "\\".join(_strs(ds, tag))


def _floats(ds, tag: int) -> list[float] | None:
    try:
        vals = [float(x) for x in _strs(ds, tag) if x != ""]
    except ValueError:
        return None
    return vals or None


def _int(ds, tag: int, default: int = 0) -> int:
    v = _raw(ds, tag)
    if v is None:
        return default
    if isinstance(v, bytes) and tag in _US:
        little = ds.original_encoding[1] is not False
        return int.from_bytes(v[:2], "little" if little else "big") if len(v) >= 2 else default
    f = _floats(ds, tag)
    return int(f[0]) if f else default


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
        value = value.decode("ascii", "ignore").strip("\x00 ").split("\\")
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
        v = _raw(ds, TAG_BVALUE)
        if isinstance(v, bytes) and len(v) == 8:
            little = ds.original_encoding[1] is not False
            return float(struct.unpack("<d" if little else ">d", v)[0])
        b = _float_or_none(v)
        if b is not None:
            return b
    for tag, vendor in ((TAG_SIEMENS_B, "siemens"), (TAG_GE_B, "ge"), (TAG_PHILIPS_B, "philips")):
        if tag in ds:
            try:
                b = _private_b(ds[tag], vendor)
            except Exception:  # a malformed private element only means "no b-value here"
                b = None
            if b is not None and 0 <= b < 1e5:
                return b
    seq = _str(ds, 0x00180024)  # Siemens SequenceName: "*ep_b800t"
    if seq.startswith("*ep_b"):
        digits = "".join(ch for ch in seq[5:].split("t")[0] if ch.isdigit())
        if digits:
            return float(digits)
    return None


def read_header(path: str | os.PathLike) -> FileRecord:
    """The record of a single-frame file (the first frame's of a multi-frame file); see read_headers."""
    return read_headers(path)[0]


def read_headers(path: str | os.PathLike) -> list[FileRecord]:
    """Read one file's header: one record per image (frame); raises NotAnImage with the reason when
    the file cannot be used."""
    path = str(path)
    st = os.stat(path)
    try:
        with open(path, "rb") as fh:
            # no specific_tags: pydicom walks every element either way, and the filter costs time
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            pixel_offset = fh.tell()
    except InvalidDicomError:
        raise NotAnImage("not a DICOM file") from None
    except (OSError, EOFError, ValueError, struct.error, KeyError, TypeError) as exc:
        raise NotAnImage(f"unreadable DICOM header ({type(exc).__name__})") from None
    if len(ds) == 0:
        raise NotAnImage("truncated or empty DICOM header")
    try:
        sop_class = _str(ds, 0x00080016) or str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        if sop_class == MEDIA_DIRECTORY_STORAGE or 0x00041220 in ds:
            raise NotAnImage("DICOMDIR (media index; the study layout is read from the image headers instead)")
        if sop_class in MASK_SOP_CLASSES:
            return [_mask_record(ds, path, st, sop_class)]
        rec = _record(ds, path, st, pixel_offset)
        rec.sop_class = sop_class
        if PER_FRAME_FG in ds or rec.frames > 1:  # PerFrameFunctionalGroupsSequence: enhanced / legacy converted
            return _frame_records(ds, rec)
        return [rec]
    except (ValueError, TypeError, struct.error, AttributeError, IndexError) as exc:
        raise NotAnImage(f"malformed DICOM header value ({type(exc).__name__}: {exc})"[:160]) from None


# Functional-group sequences (by tag: a keyword costs a dictionary lookup on every access) and the
# attributes read from them. pydicom parses the sequences; the leaf values are read raw (as in
# _record), since pydicom's DS / FD conversion costs more than the rest of a frame's record.
PER_FRAME_FG, SHARED_FG = 0x52009230, 0x52009229
_FG_POSITION, _FG_ORIENTATION, _FG_MEASURES = 0x00209113, 0x00209116, 0x00289110
_FG_DIFFUSION, _FG_RESCALE = 0x00189117, 0x00289145
_UNASSIGNED_PER_FRAME, _UNASSIGNED_SHARED = 0x00209171, 0x00209170


def first_item(group, tag: int):
    """The first item of sequence `tag` in a functional-group item, or None."""
    if group is None:
        return None
    try:
        seq = group[tag].value
    except KeyError:
        return None
    return seq[0] if seq else None


def _fd(ds, tag: int, little: bool) -> float | None:
    """A single FD value (raw 8 bytes in the file's byte order, or already converted)."""
    v = _raw(ds, tag)
    if isinstance(v, bytes):
        return float(struct.unpack("<d" if little else ">d", v)[0]) if len(v) == 8 else None
    return _float_or_none(v)


def group_facts(group, little: bool) -> dict:
    """What one functional-groups item (a frame's, or the shared one) says about the frame: only the
    attributes it carries with a usable value (the shared item fills in the rest)."""
    out: dict = {}
    if group is None:
        return out
    item = first_item(group, _FG_POSITION)
    v = _floats(item, 0x00200032) if item is not None else None
    if v and len(v) == 3:
        out["ipp"] = tuple(v)
    item = first_item(group, _FG_ORIENTATION)
    v = _floats(item, 0x00200037) if item is not None else None
    if v and len(v) == 6:
        out["iop"] = tuple(v)
    item = first_item(group, _FG_MEASURES)
    v = _floats(item, 0x00280030) if item is not None else None
    if v and len(v) == 2:
        out["pixel_spacing"] = tuple(v)
    item = first_item(group, _FG_DIFFUSION)
    if item is not None:
        b = _fd(item, TAG_BVALUE, little)
        if b is not None:
            out["bvalue"] = b
        d = _str(item, 0x00189075).upper()  # DiffusionDirectionality
        if d:
            out["directionality"] = d
    item = first_item(group, _FG_RESCALE)
    if item is not None:
        for key, tag in (("slope", 0x00281053), ("intercept", 0x00281052)):
            v = _floats(item, tag)
            if v:
                out[key] = v[0]
    return out


def _frame_records(ds, base: FileRecord) -> list[FileRecord]:
    """One record per frame of an Enhanced (or Legacy Converted Enhanced) MR file, from its functional
    groups: each attribute from the frame's own group, else from the shared group (read once)."""
    per = ds.get(PER_FRAME_FG)
    per = list(per.value) if per is not None else []
    if len(per) != base.frames:
        raise NotAnImage(f"multi-frame file with {base.frames} frames but {len(per)} per-frame functional groups "
                         "(truncated or malformed header)")
    little = ds.original_encoding[1] is not False
    shared = first_item(ds, SHARED_FG)
    shared_facts = group_facts(shared, little)
    unassigned_shared = first_item(shared, _UNASSIGNED_SHARED)
    legacy_b = _bvalue_in(unassigned_shared, ds) if unassigned_shared is not None else None
    defaults = {"ipp": None, "iop": None, "pixel_spacing": None, "bvalue": None, "slope": None,
                "intercept": None, "directionality": ""}
    out = []
    directional: set[int] = set()
    for i, fg in enumerate(per):
        facts = {**defaults, **shared_facts, **group_facts(fg, little)}
        b = facts["bvalue"]
        if b is None:  # legacy converted: the classic tags sit in the unassigned converted attributes
            item = first_item(fg, _UNASSIGNED_PER_FRAME)
            b = _bvalue_in(item, ds) if item is not None else None
            b = legacy_b if b is None else b
        if facts["directionality"] in ("DIRECTIONAL", "BMATRIX"):
            directional.add(i)
        rec = copy.copy(base)
        rec.frame, rec.ipp, rec.iop, rec.pixel_spacing = i, facts["ipp"], facts["iop"], facts["pixel_spacing"]
        rec.bvalue = b if b is not None else base.bvalue
        rec.slope = facts["slope"] if facts["slope"] is not None else base.slope
        rec.intercept = facts["intercept"] if facts["intercept"] is not None else base.intercept
        out.append(rec)
    if directional:  # per-direction diffusion frames: the trace (ISOTROPIC) frames of the same b are the DWI
        traced = {out[i].bvalue for i in range(len(out)) if i not in directional}
        out = [r for i, r in enumerate(out) if i not in directional or r.bvalue not in traced]
    return out


def _bvalue_in(item, ds) -> float | None:
    """_bvalue on a sequence item (which has no encoding of its own: the file's is used)."""
    try:
        item.set_original_encoding(*ds.original_encoding)
    except (AttributeError, TypeError):
        pass
    try:
        return _bvalue(item)
    except (AttributeError, TypeError, ValueError, struct.error):
        return None


def _ref_series(ds, sop_class: str) -> tuple[str, ...]:
    """Series UIDs a SEG (ReferencedSeriesSequence, else its source images' series) or an RTSTRUCT
    (ReferencedFrameOfReference > RTReferencedStudy > RTReferencedSeries) points at."""
    uids: list[str] = []
    if sop_class == SEG_STORAGE:
        for item in ds.get("ReferencedSeriesSequence", []) or []:
            uids.append(str(item.get("SeriesInstanceUID", "")))
        for item in ds.get("StudiesContainingOtherReferencedInstancesSequence", []) or []:
            for s in item.get("ReferencedSeriesSequence", []) or []:
                uids.append(str(s.get("SeriesInstanceUID", "")))
    else:
        for fr in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
            for st in fr.get("RTReferencedStudySequence", []) or []:
                for se in st.get("RTReferencedSeriesSequence", []) or []:
                    uids.append(str(se.get("SeriesInstanceUID", "")))
    return tuple(dict.fromkeys(u for u in uids if u))


def _mask_record(ds, path: str, st, sop_class: str) -> FileRecord:
    """A SEG / RTSTRUCT: who it belongs to and which series it references (its content is read later)."""
    return FileRecord(
        path=path, size=st.st_size, mtime_ns=st.st_mtime_ns, patient_id=_str(ds, 0x00100020),
        study_uid=_str(ds, 0x0020000D), series_uid=_str(ds, 0x0020000E), sop_uid=_str(ds, 0x00080018),
        modality=_str(ds, 0x00080060).upper(), description=_str(ds, 0x0008103E), study_date=_str(ds, 0x00080020),
        frames=max(1, _int(ds, 0x00280008, 1)), sop_class=sop_class, ref_series=_ref_series(ds, sop_class),
    )


def _record(ds, path: str, st, pixel_offset: int) -> FileRecord:
    series_uid = _str(ds, 0x0020000E)
    rows, cols = _int(ds, 0x00280010), _int(ds, 0x00280011)
    if not series_uid or not rows or not cols:
        raise NotAnImage("DICOM file without an image (no series UID or no rows/columns)")
    frames = max(1, _int(ds, 0x00280008, 1))
    bits = _int(ds, 0x00280100, 16) or 16
    spp = _int(ds, 0x00280002, 1) or 1
    implicit = ds.original_encoding[0]
    header_len = 8 if implicit else 12
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    truncated = False
    if pixel_offset >= st.st_size:
        truncated = True  # the file ends before its pixel data starts
    elif not (ts and pydicom.uid.UID(ts).is_compressed):
        truncated = st.st_size < pixel_offset + header_len + rows * cols * frames * spp * bits // 8
    pixel_dtype = ""
    signed = _int(ds, 0x00280103) == 1
    stored = _int(ds, 0x00280101, bits) or bits
    little = ds.original_encoding[1] is not False
    plain = (not truncated and little and not (ts and pydicom.uid.UID(ts).is_compressed) and spp == 1
             and _str(ds, 0x00280004) == "MONOCHROME2" and bits in (8, 16, 32) and (not signed or stored == bits))
    if plain:
        pixel_dtype = f"<{'i' if signed else 'u'}{bits // 8}"
    ipp, iop, ps = _floats(ds, 0x00200032), _floats(ds, 0x00200037), _floats(ds, 0x00280030)
    slope, intercept = _floats(ds, 0x00281053), _floats(ds, 0x00281052)
    return FileRecord(
        path=path,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        patient_id=_str(ds, 0x00100020),
        study_uid=_str(ds, 0x0020000D),
        series_uid=series_uid,
        sop_uid=_str(ds, 0x00080018),
        modality=_str(ds, 0x00080060).upper(),
        description=_str(ds, 0x0008103E),
        protocol=_str(ds, 0x00181030),
        sequence_name=_str(ds, 0x00180024),
        image_type=tuple(x.upper() for x in _strs(ds, 0x00080008)),
        series_number=_int(ds, 0x00200011),
        instance_number=_int(ds, 0x00200013),
        ipp=tuple(ipp) if ipp and len(ipp) == 3 else None,
        iop=tuple(iop) if iop and len(iop) == 6 else None,
        pixel_spacing=tuple(ps) if ps and len(ps) == 2 else None,
        rows=rows,
        cols=cols,
        frames=frames,
        bvalue=_bvalue(ds),
        study_date=_str(ds, 0x00080020),
        slope=slope[0] if slope else 1.0,
        intercept=intercept[0] if intercept else 0.0,
        truncated=truncated,
        pixel_offset=pixel_offset if plain else -1,
        pixel_dtype=pixel_dtype,
        bits_stored=stored,
        pixel_header=header_len,
    )


_PIXEL_TAG = b"\xe0\x7f\x10\x00"


def read_raw_pixels(rec: FileRecord) -> "np.ndarray | None":
    """Pixels of a plain (uncompressed, little-endian, MONOCHROME2) image, or of one frame of such a
    multi-frame file, straight from disk at the offset found by the header scan, rescale applied;
    None when the file is not as the scan saw it (then the caller uses SimpleITK / pydicom)."""
    if rec.pixel_offset < 0 or not rec.pixel_dtype:
        return None
    dtype = np.dtype(rec.pixel_dtype)
    n = rec.rows * rec.cols
    frame = max(rec.frame, 0)
    with open(rec.path, "rb") as fh:
        fh.seek(rec.pixel_offset)
        head = fh.read(12)
        if head[:4] != _PIXEL_TAG:
            return None
        start = rec.pixel_header
        length = int.from_bytes(head[start - 4: start], "little")
        if length == 0xFFFFFFFF or length < n * dtype.itemsize * max(rec.frames, 1):
            return None
        fh.seek(rec.pixel_offset + start + frame * n * dtype.itemsize)
        buf = fh.read(n * dtype.itemsize)
    if len(buf) < n * dtype.itemsize:
        return None
    arr = np.frombuffer(buf, dtype=dtype).reshape(rec.rows, rec.cols)
    if dtype.kind == "u" and rec.bits_stored < dtype.itemsize * 8:
        arr = arr & np.array((1 << rec.bits_stored) - 1, dtype=dtype)
    return arr.astype(np.float32) * np.float32(rec.slope) + np.float32(rec.intercept)


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


def scan_files(paths: Iterable[str]) -> list[tuple[str, list[FileRecord] | None, str]]:
    """Read many headers; each result is (path, records (one per frame) or None, skip reason)."""
    out = []
    for p in paths:
        try:
            out.append((p, read_headers(p), ""))
        except NotAnImage as exc:
            out.append((p, None, str(exc)))
        except OSError as exc:
            out.append((p, None, f"unreadable file ({exc.strerror or type(exc).__name__})"))
    return out


def dicomdir_summary(path: str, root: str | Path) -> tuple[str, bool]:
    """What a DICOMDIR lists (patients, studies, series, image files) and whether every file it
    references is present: a media copy that lost files is flagged, since the patients' series
    would then be incomplete. The layout itself is not used: series are grouped from the headers.
    Returns (one line for the report, complete?)."""
    rel = os.path.relpath(path, root)
    try:
        ds = pydicom.dcmread(path, force=True)
        records = list(ds.get("DirectoryRecordSequence", []) or [])
    except Exception as exc:  # an unreadable index is worth a line, never a failure of the site
        return f"DICOMDIR {rel}: unreadable ({type(exc).__name__}); layout taken from the image headers", True
    kinds = Counter(str(r.get("DirectoryRecordType", "")).upper() for r in records)
    base = os.path.dirname(path)
    listed = missing = 0
    for r in records:
        ref = r.get("ReferencedFileID")
        if ref is None:
            continue
        parts = [str(p) for p in (ref if isinstance(ref, (list, tuple, MultiValue)) else [ref])]
        listed += 1
        p = os.path.join(base, *parts)
        if not (os.path.isfile(p) or os.path.isfile(os.path.join(base, *[x.lower() for x in parts]))):
            missing += 1
    line = (f"DICOMDIR {rel}: {kinds.get('PATIENT', 0)} patient(s), {kinds.get('STUDY', 0)} study(ies), "
            f"{kinds.get('SERIES', 0)} series, {listed} file(s) listed")
    if missing:
        return line + f"; {missing} of them MISSING (incomplete media copy?); layout taken from the image headers", False
    return line + ", all present; layout taken from the image headers", True
