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
import functools
import os
import re
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
    mosaic: int = 0  # Siemens mosaic: number of tiles (slices) in the file; 0 for any other image
    tile: int = -1  # index of this slice in its mosaic file; -1 for any other image
    directionality: str = ""  # ISOTROPIC (trace), DIRECTIONAL, NONE (b0) or "" (not said)
    direction: str = ""  # gradient direction of a DIRECTIONAL image ("x,y,z" rounded, or "#n"); "" if not said
    refused: str = ""  # why this image cannot be used at all (e.g. a mosaic that could not be unpacked)

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
    if rec.tile >= 0 or rec.mosaic:
        return "mosaic"
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


# Private blocks as the vendors' scanners write them: the element sits in the block reserved by its
# private creator, (gggg,0010) in practice. Without a creator element (some anonymisers drop them) the
# usual block is read; a creator that names another vendor's block means "not this tag".
_CREATORS = {0x0019: ("SIEMENS MR HEADER", "GEMS_ACQU_01"), 0x0043: ("GEMS_PARM_01",),
             0x2001: ("PHILIPS IMAGING DD 001",), 0x2005: ("PHILIPS MR IMAGING DD 001",)}


def _private(ds, group: int, creator: str, elem: int):
    """The private element `elem` (low byte) of `creator`'s block in `group`, or None."""
    first = _str(ds, (group << 16) | 0x0010).strip().upper()
    if first == creator:
        return ds.get_item((group << 16) | 0x1000 | elem)
    if not first:
        if any(ds.get_item((group << 16) | blk) is not None for blk in range(0x11, 0x20)):
            pass  # creators elsewhere only: search them below
        else:
            return ds.get_item((group << 16) | 0x1000 | elem)  # no creator at all: the usual block
    for blk in range(0x11, 0x100):
        tag = (group << 16) | blk
        if tag in ds and _str(ds, tag).strip().upper() == creator:
            return ds.get_item((group << 16) | (blk << 8) | elem)
    return None


def _elem_value(ds, elem):
    """A (possibly raw) element's value, converted where pydicom knows the VR."""
    if elem is None:
        return None
    try:
        return ds[elem.tag].value
    except Exception:  # an undecodable private element: use its raw bytes
        return elem.value


def _private_b(value, vendor: str) -> float | None:
    """Decode a vendor private b-value (possibly raw UN bytes): Siemens (0019,100C) IS; GE (0043,1039)
    IS x4 whose first value is b, with 10^9 added by current software ("1000000800\\8\\0\\0");
    Philips (2001,1003) FL (4 bytes little-endian when read as UN)."""
    if isinstance(value, bytes):
        if vendor == "philips" and len(value) == 4:
            return float(struct.unpack("<f", value)[0])
        if vendor == "philips" and len(value) == 8:
            return float(struct.unpack("<d", value)[0])
        value = value.decode("ascii", "ignore").strip("\x00 ").split("\\")
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    if isinstance(value, str):
        value = value.strip("\x00 ")
    b = _float_or_none(value)
    if b is None:
        return None
    if vendor == "ge" and b >= 1e5:  # GE adds 10^9 (some versions other powers of ten) to flag the slot
        b = b % 1e5
    return b


_SEQ_B = re.compile(r"^\*?(?:ep|re|ez)_b(\d+)(t?)(?:#(\d+))?", re.IGNORECASE)


def _seq_name_b(seq: str) -> tuple[float | None, str, str]:
    """Siemens SequenceName: "*ep_b800t" (trace), "ep_b1500#2" (direction 2), "ep_b0" (b0); RESOLVE
    "*re_b800t". Returns (b, directionality, direction)."""
    m = _SEQ_B.match(seq.strip())
    if not m:
        return None, "", ""
    b = float(m.group(1))
    if m.group(2):
        return b, "ISOTROPIC", ""
    if m.group(3):
        return b, ("DIRECTIONAL" if b > 0 else "NONE"), f"#{m.group(3)}"
    return b, ("NONE" if b == 0 else ""), ""


@functools.lru_cache(maxsize=1)
def _nicom():
    """nibabel.nicom (csareader, dicomwrappers), imported once, without its "not well tested" banner."""
    import types
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader, dicomwrappers
    return types.SimpleNamespace(csareader=csareader, dicomwrappers=dicomwrappers)


def siemens_csa(ds) -> dict | None:
    """The Siemens CSA image header (0029,xx10) parsed by nibabel's csareader; None when absent or
    unreadable (then the DICOM and the (0019,xx) private tags are all there is)."""
    if 0x00290010 not in ds and not any(0x00290011 <= t <= 0x002900FF for t in ds.keys()):
        return None
    try:
        return _nicom().csareader.get_csa_header(ds, "image")
    except Exception:  # malformed CSA: treated as absent
        return None


def _csa(csa: dict | None, name: str) -> list:
    if not csa:
        return []
    try:
        return list(csa["tags"][name]["items"])
    except (KeyError, TypeError):
        return []


def _direction_key(vec) -> str:
    try:
        v = np.asarray([float(x) for x in vec], float)
    except (TypeError, ValueError):
        return ""
    n = float(np.linalg.norm(v)) if v.size == 3 else 0.0
    if n < 1e-6:
        return ""
    v = v / n
    return ",".join(f"{x:+.2f}" for x in v)


def _bvalue(ds, csa: dict | None = None) -> float | None:
    return _diffusion(ds, csa)[0]


def _diffusion(ds, csa: dict | None = None) -> tuple[float | None, str, str]:
    """(b-value, directionality, direction key) of one image, from the first source that says:
    DiffusionBValue (0018,9087) (top level or MRDiffusionSequence), the Siemens CSA header (B_value,
    DiffusionGradientDirection, DiffusionDirectionality), Siemens (0019,xx0C/0D/0E), GE (0043,xx39)
    with (0019,xxBB-BD), Philips (2001,xx03/04) with (2005,xxB0-B2), then the Siemens SequenceName."""
    b = None
    directionality = ""
    direction = ""
    little = ds.original_encoding[1] is not False
    sources = [ds]
    if 0x00189117 in ds:  # MRDiffusionSequence at the top level of a classic file
        item = first_item(ds, 0x00189117)
        if item is not None:
            sources.append(item)
    for src in sources:
        if b is None and TAG_BVALUE in src:
            v = _raw(src, TAG_BVALUE)
            if isinstance(v, bytes) and len(v) == 8:
                b = float(struct.unpack("<d" if little else ">d", v)[0])
            else:
                b = _float_or_none(v)
        if not directionality:
            directionality = _str(src, 0x00189075).upper()
        if not direction:
            g = first_item(src, 0x00189076)  # DiffusionGradientDirectionSequence
            vec = None
            if g is not None and 0x00189089 in g:
                vec = _fd3(g, little)
            elif 0x00189089 in src:
                vec = _fd3(src, little)
            if vec is not None:
                direction = _direction_key(vec)
    itype = {x.upper() for x in _strs(ds, 0x00080008)}
    if not directionality and ("TRACEW" in itype or "TRACE" in itype or "ISOTROPIC" in itype):
        directionality = "ISOTROPIC"
    if csa:
        vals = _csa(csa, "B_value")
        if b is None and vals:
            b = _float_or_none(vals[0])
        if not directionality:
            d = _csa(csa, "DiffusionDirectionality")
            directionality = str(d[0]).upper() if d else ""
        if not direction:
            g = _csa(csa, "DiffusionGradientDirection")
            direction = _direction_key(g) if len(g) == 3 else ""
    vendors = (
        ("siemens", (0x0019, "SIEMENS MR HEADER", 0x0C), (0x0019, "SIEMENS MR HEADER", 0x0E), None),
        ("ge", (0x0043, "GEMS_PARM_01", 0x39), (0x0019, "GEMS_ACQU_01", (0xBB, 0xBC, 0xBD)), None),
        ("philips", (0x2001, "PHILIPS IMAGING DD 001", 0x03), (0x2005, "PHILIPS MR IMAGING DD 001", (0xB0, 0xB1, 0xB2)),
         (0x2001, "PHILIPS IMAGING DD 001", 0x04)),
    )
    for vendor, btag, gtag, dtag in vendors:
        try:
            vb = _private_b(_elem_value(ds, _private(ds, *btag)), vendor)
            if vb is not None and not 0 <= vb < 1e5:
                vb = None
            if vb is None:
                continue  # this vendor's diffusion block is absent (or says nothing usable)
            if b is None:
                b = vb
            if not direction:
                grp, creator, el = gtag
                if isinstance(el, tuple):
                    vec = [_private_float(_elem_value(ds, _private(ds, grp, creator, e)), vendor) for e in el]
                    vec = None if any(x is None for x in vec) else vec
                else:
                    vec = _elem_value(ds, _private(ds, grp, creator, el))
                    if isinstance(vec, bytes):
                        vec = struct.unpack("<3d", vec) if len(vec) == 24 else None
                if vec is not None:
                    direction = _direction_key(vec)
            if not directionality and dtag is not None:  # Philips: I isotropic, O oblique, R/A/F/... axes
                v = _elem_value(ds, _private(ds, *dtag))
                v = (v.decode("ascii", "ignore") if isinstance(v, bytes) else str(v or "")).strip("\x00 ").upper()
                if v == "I":
                    directionality = "ISOTROPIC"
                elif v and vb:
                    directionality = "DIRECTIONAL"
                    direction = direction or f"#{v}"
        except Exception:  # a malformed private element only means "not said here"
            continue
        break
    sb, sdir, sdirection = _seq_name_b(_str(ds, 0x00180024))
    if b is None:
        b = sb
    directionality = directionality or sdir
    direction = direction or sdirection
    if directionality == "ISOTROPIC":
        direction = ""
    elif direction and not directionality and b:
        directionality = "DIRECTIONAL"  # a gradient direction at b > 0 (GE says no more)
    return b, directionality, direction


def _fd3(item, little: bool):
    v = _raw(item, 0x00189089)
    if isinstance(v, bytes):
        return struct.unpack("<3d" if little else ">3d", v) if len(v) == 24 else None
    try:
        vec = [float(x) for x in v]
    except (TypeError, ValueError):
        return None
    return vec if len(vec) == 3 else None


def _private_float(value, vendor: str) -> float | None:
    if isinstance(value, bytes):
        if len(value) == 4 and vendor == "philips":
            return float(struct.unpack("<f", value)[0])
        value = value.decode("ascii", "ignore").strip("\x00 ").split("\\")
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    return _float_or_none(value.strip("\x00 ") if isinstance(value, str) else value)


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
        csa = siemens_csa(ds)
        rec = _record(ds, path, st, pixel_offset, csa)
        rec.sop_class = sop_class
        n_mosaic = _mosaic_count(rec, csa)
        rec.mosaic = 0  # set per tile by _mosaic_records
        if PER_FRAME_FG in ds or rec.frames > 1:  # PerFrameFunctionalGroupsSequence: enhanced / legacy converted
            return _frame_records(ds, rec)
        if n_mosaic:
            return _mosaic_records(ds, rec, csa, n_mosaic)
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
        g = first_item(item, 0x00189076)  # DiffusionGradientDirectionSequence
        vec = _fd3(g, little) if g is not None and 0x00189089 in g else None
        if vec is not None and _direction_key(vec):
            out["direction"] = _direction_key(vec)
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
                "intercept": None, "directionality": "", "direction": ""}
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
        rec.directionality = facts["directionality"] or base.directionality
        rec.direction = facts["direction"] if rec.directionality != "ISOTROPIC" else ""
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


def _record(ds, path: str, st, pixel_offset: int, csa: dict | None = None) -> FileRecord:
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
    b, directionality, direction = _diffusion(ds, csa)
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
        bvalue=b,
        mosaic=_siemens_mosaic_count(ds),
        directionality=directionality,
        direction=direction,
        study_date=_str(ds, 0x00080020),
        slope=slope[0] if slope else 1.0,
        intercept=intercept[0] if intercept else 0.0,
        truncated=truncated,
        pixel_offset=pixel_offset if plain else -1,
        pixel_dtype=pixel_dtype,
        bits_stored=stored,
        pixel_header=header_len,
    )


# ----------------------------------------------------------------------------------------------
# Siemens mosaic (ImageType MOSAIC): one file holds a whole volume as tiles of one large image.
# nibabel's nicom (MosaicWrapper, csareader) reads the CSA header, the corrected position of the first
# voxel (the DICOM ImagePositionPatient of a mosaic is that of the whole tiled image, not of a slice)
# and the slice normal with its CSA sign, and unpacks the pixels; what is ours is only the mapping of
# its result onto one record per slice, so the rest of prepare sees slices as from any classic export.
# ----------------------------------------------------------------------------------------------

def _mosaic_count(rec: FileRecord, csa: dict | None) -> int:
    """Number of tiles when the image is a Siemens mosaic, else 0: ImageType MOSAIC, or a CSA
    NumberOfImagesInMosaic > 1 with an in-plane size that is a multiple of the acquisition matrix."""
    n = _csa(csa, "NumberOfImagesInMosaic") or ([rec.mosaic] if rec.mosaic else [])
    try:
        n = int(n[0]) if n else 0
    except (TypeError, ValueError):
        n = 0
    if "MOSAIC" in rec.image_type:
        return max(n, 1) if n else -1  # -1: says MOSAIC but gives no tile count
    if n > 1:
        side = int(np.ceil(np.sqrt(n)))
        if rec.rows % side == 0 and rec.cols % side == 0 and rec.rows > side and rec.cols > side:
            return n
    return 0


def _siemens_mosaic_count(ds) -> int:
    """NumberOfImagesInMosaic from Siemens (0019,xx0A) (US), used when the CSA header lacks it."""
    if 0x0019100A not in ds and _str(ds, 0x00190010).strip().upper() != "SIEMENS MR HEADER":
        return 0
    try:
        v = _elem_value(ds, _private(ds, 0x0019, "SIEMENS MR HEADER", 0x0A))
        if isinstance(v, bytes):
            little = ds.original_encoding[1] is not False
            return int.from_bytes(v[:2], "little" if little else "big") if len(v) >= 2 else 0
        v = v[0] if isinstance(v, (list, tuple, MultiValue)) else v
        return int(v) if v is not None else 0
    except Exception:  # malformed: not said
        return 0


def _acq_matrix(ds) -> tuple[int, int] | None:
    """(rows, columns) of one acquired slice from AcquisitionMatrix (0018,1310), or None."""
    v = _raw(ds, 0x00181310)
    if isinstance(v, bytes) and len(v) == 8:
        little = ds.original_encoding[1] is not False
        v = struct.unpack("<4H" if little else ">4H", v)
    try:
        f_rows, f_cols, p_rows, p_cols = (int(x) for x in v)
    except (TypeError, ValueError):
        return None
    rows, cols = (f_rows or p_rows), (f_cols or p_cols)
    return (rows, cols) if rows and cols else None


def _mosaic_records(ds, base: FileRecord, csa: dict | None, n: int) -> list[FileRecord]:
    """One record per slice of a Siemens mosaic, positioned by nibabel's MosaicWrapper; a mosaic that
    cannot be unpacked gives one record with `refused` set (never a tiled image used as one slice)."""
    what = f"Siemens mosaic ({base.rows} x {base.cols} pixels"
    if n < 0:
        return [_refused(base, f"{what}, ImageType MOSAIC) has no NumberOfImagesInMosaic in its CSA header: "
                               "it could not be unpacked into slices")]
    side = int(np.ceil(np.sqrt(n)))
    if base.rows % side or base.cols % side:
        return [_refused(base, f"{what}, {n} tiles per CSA) could not be unpacked: {base.rows} x {base.cols} is not "
                               f"a {side} x {side} grid of equal tiles")]
    tr, tc = base.rows // side, base.cols // side
    acq = _acq_matrix(ds)
    if acq is not None and sorted(acq) != sorted((tr, tc)):
        return [_refused(base, f"{what}, {n} tiles per CSA) could not be unpacked: tiles of {tr} x {tc} do not match "
                               f"the acquisition matrix {acq[0]} x {acq[1]}")]
    try:
        w = _nicom().dicomwrappers.MosaicWrapper(ds, csa or {}, n_mosaic=n)
        first = np.asarray(w.image_position, float)
        normal = np.asarray(w.slice_normal, float)
        step = float(w.voxel_sizes[2])
    except Exception as exc:  # nibabel could not place the tiles: refuse with its reason
        return [_refused(base, f"{what}, {n} tiles) could not be unpacked: geometry unreadable "
                               f"({type(exc).__name__}: {str(exc)[:80]})")]
    if base.ipp is None or base.iop is None or not np.isfinite(first).all() or not np.isfinite(normal).all():
        return [_refused(base, f"{what}, {n} tiles) could not be unpacked: no ImagePositionPatient / "
                               "ImageOrientationPatient to place its slices")]
    out = []
    for k in range(n):
        rec = copy.copy(base)
        rec.rows, rec.cols, rec.mosaic, rec.tile = tr, tc, n, k
        rec.ipp = tuple(float(x) for x in first + k * step * normal)  # pixel_offset: the tiled image's
        out.append(rec)
    return out


def _refused(base: FileRecord, reason: str) -> FileRecord:
    rec = copy.copy(base)
    rec.mosaic = max(rec.mosaic, 1)
    rec.refused = reason
    rec.pixel_offset = -1
    return rec


def read_mosaic_tiles(rec: FileRecord) -> np.ndarray:
    """The slices of the mosaic file `rec` (one of its tile records) belongs to: (n, rows, cols) float32,
    rescale applied; tile k is slice k of the records _mosaic_records made. nibabel's MosaicWrapper does
    the unpacking; the tiled image comes from the raw path of the header scan (a plain little-endian
    file: no second parse of the header), else from pydicom (compressed, big-endian, ...)."""
    side = int(np.ceil(np.sqrt(rec.mosaic)))
    rows, cols = side * rec.rows, side * rec.cols
    pix = _raw_array(rec, rows, cols, 0) if rec.pixel_offset >= 0 and rec.pixel_dtype else None
    slope, intercept = np.float32(rec.slope), np.float32(rec.intercept)
    if pix is None:
        pix = pydicom.dcmread(rec.path).pixel_array
    w = _nicom().dicomwrappers.MosaicWrapper({"Rows": rows, "Columns": cols, "pixel_array": pix}, {},
                                              n_mosaic=rec.mosaic)
    data = w.get_unscaled_data()  # (rows, cols, n): nibabel's axis 0 is the row index
    return np.moveaxis(data, 2, 0).astype(np.float32) * slope + intercept


_PIXEL_TAG = b"\xe0\x7f\x10\x00"


def read_raw_pixels(rec: FileRecord) -> "np.ndarray | None":
    """Pixels of a plain (uncompressed, little-endian, MONOCHROME2) image, or of one frame of such a
    multi-frame file, straight from disk at the offset found by the header scan, rescale applied;
    None when the file is not as the scan saw it (then the caller uses SimpleITK / pydicom)."""
    if rec.pixel_offset < 0 or not rec.pixel_dtype or rec.tile >= 0:
        return None
    arr = _raw_array(rec, rec.rows, rec.cols, max(rec.frame, 0))
    if arr is None:
        return None
    return arr.astype(np.float32) * np.float32(rec.slope) + np.float32(rec.intercept)


def _raw_array(rec: FileRecord, rows: int, cols: int, frame: int) -> "np.ndarray | None":
    """One rows x cols image (frame `frame`) straight from disk at the scan's pixel offset (stored
    values, bits beyond BitsStored masked); None when the file is not as the scan saw it."""
    dtype = np.dtype(rec.pixel_dtype)
    n = rows * cols
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
    arr = np.frombuffer(buf, dtype=dtype).reshape(rows, cols)
    if dtype.kind == "u" and rec.bits_stored < dtype.itemsize * 8:
        arr = arr & np.array((1 << rec.bits_stored) - 1, dtype=dtype)
    return arr


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
