"""`slmfed fetch`: pull each worklist patient's pre-treatment MR study (and the SEG / RTSTRUCT
masks in it) from the site's own PACS into the site folder that `slmfed prepare` reads.

Why its own module: the plain logic (worklist, study choice, series filter, resume, the atomic
file writes, the summary and the JSON-lines log) is transport-free and testable without a PACS;
client/pacs_dicomweb.py and client/pacs_dimse.py only move DICOM objects.

Layout written (prepare reads any layout; this one makes resume a file-existence test):
    SITE_DIR/dicom/<patient_id>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   images
    SITE_DIR/masks/<patient_id>/<SOPInstanceUID>.dcm                       SEG / RTSTRUCT objects
Each object is written to a hidden `.<name>.partial` file in the same folder whose DICOM prefix
("DICM" at byte 128) is written last, then renamed into place (os.replace): a run killed mid-write
leaves at most a partial file that is not DICOM to any reader (prepare skips it as "not a DICOM
file") and that the next run removes. The PatientID of every written object is the site's
patient_id (prepare matches images, masks and clinical.csv by it); nothing else is changed.

Privacy: console lines and the log name patients by the site's patient_id only; PACS PatientIDs,
accession numbers, names and birth dates are never printed or logged (a reason names the worklist
line instead). The fetched files stay in the site folder.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from client.dicom_scan import FileRecord
from client.series import Series, SeriesRules

MASK_MODALITIES = ("SEG", "RTSTRUCT")
WANTED = ("t2", "dwi", "adc")
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SAFE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
LOG_NAME = "fetch-log.jsonl"
PARTIAL = ".partial"


class FetchError(Exception):
    """One patient cannot be fetched; str() is the one-line reason."""


class ConfigError(ValueError):
    """The [pacs] settings, the secret file or the worklist as a whole are unusable (one line)."""


class PacsError(FetchError):
    """The PACS (or the way to it) failed. `fatal`: it will fail the same way for every patient
    (unreachable, credentials refused, association rejected), so it is not retried per patient."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


# ------------------------------------------------------------------------------------------------
# settings: site.toml [pacs] and the secret file
# ------------------------------------------------------------------------------------------------

@dataclass
class PacsConfig:
    """One PACS the site fetches from (one `[pacs]` table, or one `[pacs.NAME]` sub-table)."""

    name: str
    transport: str  # "dicomweb" | "dimse"
    url: str = ""
    auth: str = "none"  # dicomweb: none | basic | token
    username: str = ""
    secret_file: str = ""
    ca_bundle: str = ""
    host: str = ""
    port: int = 104
    called_ae: str = ""
    calling_ae: str = "SLMFED"
    retrieve: str = "c-get"  # dimse: c-get | c-move
    move_ae: str = ""
    move_port: int = 0
    move_bind: str = "127.0.0.1"
    tls: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    timeout_s: float = 30.0

    def where(self) -> str:
        return self.url if self.transport == "dicomweb" else f"{self.called_ae}@{self.host}:{self.port}"

    def label(self) -> str:
        return f"PACS '{self.name}' ({self.where()})"


PACS_KEYS = {  # key -> (type, allowed values or None); documented in client/README.md
    "transport": (str, ("dicomweb", "dimse")), "url": (str, None), "auth": (str, ("none", "basic", "token")),
    "username": (str, None), "secret-file": (str, None), "ca-bundle": (str, None), "host": (str, None),
    "port": (int, None), "called-ae": (str, None), "calling-ae": (str, None), "retrieve": (str, ("c-get", "c-move")),
    "move-ae": (str, None), "move-port": (int, None), "move-bind": (str, None), "tls": (bool, None),
    "tls-cert": (str, None), "tls-key": (str, None), "timeout-s": (float, None),
}
_PATH_KEYS = ("secret-file", "ca-bundle", "tls-cert", "tls-key")


def read_pacs_table(toml_path: Path) -> dict:
    """The `[pacs]` table of a site.toml (top level, or inside `[slmfed]`); {} when absent."""
    try:
        with open(toml_path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{toml_path} does not exist: the PACS settings live in its [pacs] table") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{toml_path} is not valid TOML: {exc}") from None
    table = data.get("pacs", data.get("slmfed", {}).get("pacs") if isinstance(data.get("slmfed"), dict) else None)
    if table is None:
        raise ConfigError(f"{toml_path} has no [pacs] table (see client/README.md, 'Fetch')")
    if not isinstance(table, dict):
        raise ConfigError(f"{toml_path}: 'pacs' must be a table")
    return table


def parse_pacs(table: dict, base: Path, source: str = "site.toml") -> dict[str, PacsConfig]:
    """Name -> PacsConfig from a [pacs] table: either its own keys (one PACS named 'default') or
    only sub-tables [pacs.NAME]; relative paths are taken from `base` (the site folder)."""
    subs = {k: v for k, v in table.items() if isinstance(v, dict)}
    if subs and len(subs) != len(table):
        raise ConfigError(f"{source} [pacs]: either keys of one PACS or [pacs.NAME] tables, not both")
    tables = subs or {"default": table}
    out = {}
    for name, t in tables.items():
        where = f"{source} [pacs{'' if not subs else '.' + name}]"
        unknown = sorted(set(t) - set(PACS_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(PACS_KEYS)}")
        kw = {}
        for key, value in t.items():
            want, choices = PACS_KEYS[key]
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"{where}: '{key}' must be a {want.__name__}, found {value!r}")
            if choices and value not in choices:
                raise ConfigError(f"{where}: '{key}' must be one of {', '.join(choices)}, found {value!r}")
            if key in _PATH_KEYS and value:
                value = str((base / value).resolve()) if not os.path.isabs(value) else value
            kw[key.replace("-", "_")] = value
        if "transport" not in kw:
            raise ConfigError(f"{where}: 'transport' is required (dicomweb or dimse)")
        cfg = PacsConfig(name=name, **kw)
        if cfg.transport == "dicomweb":
            if not cfg.url.startswith(("http://", "https://")):
                raise ConfigError(f"{where}: 'url' must be the DICOMweb root, http(s)://host[:port]/path")
            if cfg.auth != "none" and not cfg.secret_file:
                raise ConfigError(f"{where}: auth = '{cfg.auth}' needs 'secret-file' (the password or token is never "
                                  "on the command line or in site.toml)")
            if cfg.auth == "basic" and not cfg.username:
                raise ConfigError(f"{where}: auth = 'basic' needs 'username'")
        else:
            if not cfg.host or not cfg.called_ae:
                raise ConfigError(f"{where}: a DIMSE PACS needs 'host' and 'called-ae' (and 'port', default 104)")
            for key in ("called_ae", "calling_ae", "move_ae"):
                v = getattr(cfg, key)
                if v and (len(v) > 16 or not v.isascii() or "\\" in v):
                    raise ConfigError(f"{where}: '{key.replace('_', '-')}' must be at most 16 ASCII characters, found {v!r}")
            cfg.move_ae = cfg.move_ae or cfg.calling_ae
            if cfg.retrieve == "c-move" and not cfg.move_port:
                raise ConfigError(f"{where}: retrieve = 'c-move' needs 'move-port' (the port the PACS sends to, as "
                                  f"registered for AE '{cfg.move_ae}' in the PACS)")
        out[name] = cfg
    return out


def read_secret(path: str) -> str:
    """The secret (password or token) from a file only the site user can read; ConfigError otherwise."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(f"secret file {p} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"secret file {p} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(f"secret file {p} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                          f"run chmod 600 {p}")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ConfigError(f"secret file {p} belongs to another user (uid {st.st_uid}): it must be the site user's own")
    try:
        secret = p.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"secret file {p} cannot be read ({type(exc).__name__})") from None
    if not secret or "\n" in secret:
        raise ConfigError(f"secret file {p} must hold the secret on one line")
    return secret


# ------------------------------------------------------------------------------------------------
# the worklist
# ------------------------------------------------------------------------------------------------

@dataclass
class WorkItem:
    """One worklist row: the site's patient_id and how to find the exam in the PACS."""

    line: int
    patient_id: str
    pacs_patient_id: str = ""
    accession: str = ""
    date_from: str = ""  # YYYYMMDD, inclusive
    date_to: str = ""
    pacs: str = ""  # name of the [pacs.NAME] table; '' = the --pacs default
    error: str = ""  # why this row cannot be used (the row is reported as failed, others go on)

    def window(self) -> str:
        if not (self.date_from or self.date_to):
            return "any date"
        return f"{_iso(self.date_from) or '...'} to {_iso(self.date_to) or '...'}"


WORKLIST_COLUMNS = ("patient_id", "pacs_patient_id", "accession", "date_from", "date_to", "pacs")
_ALIASES = {"patientid": "pacs_patient_id", "pacs_patientid": "pacs_patient_id", "accessionnumber": "accession",
            "accession_number": "accession", "from": "date_from", "to": "date_to"}


def _date(text: str) -> str:
    """'2019-03-01' / '20190301' / '2019/03/01' -> '20190301'; ValueError otherwise."""
    digits = re.sub(r"[-/.]", "", text.strip())
    if not re.fullmatch(r"\d{8}", digits):
        raise ValueError(text)
    time.strptime(digits, "%Y%m%d")
    return digits


def _iso(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:]}" if len(d) == 8 else d


def read_worklist(path: str | Path) -> list[WorkItem]:
    """Rows of the worklist CSV (separator `,` `;` or tab, UTF-8, header names case-insensitive).
    A bad row keeps its place with `error` set; a problem with the whole file raises ConfigError."""
    p = Path(path)
    try:
        text = p.read_text("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"worklist {p} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"worklist {p} is not UTF-8 text") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"worklist {p} is empty")
    head = lines[0]
    sep = max((",", ";", "\t"), key=head.count)
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    header = [re.sub(r"\s+", "_", h.strip().lower()) for h in next(reader)]
    header = [_ALIASES.get(h, h) for h in header]
    if "patient_id" not in header:
        raise ConfigError(f"worklist {p} has no patient_id column (columns found: {', '.join(header) or 'none'}); "
                          f"expected {', '.join(WORKLIST_COLUMNS)}")
    items: list[WorkItem] = []
    seen: dict[str, int] = {}
    for n, row in enumerate(reader, start=2):
        if not any(c.strip() for c in row):
            continue
        vals = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header)}
        pid = vals.get("patient_id", "")
        item = WorkItem(line=n, patient_id=pid, pacs_patient_id=vals.get("pacs_patient_id", ""),
                        accession=vals.get("accession", ""), pacs=vals.get("pacs", ""))
        if not pid:
            item.error = f"worklist line {n}: empty patient_id"
        elif not SAFE_ID_RE.fullmatch(pid) or pid in (".", ".."):
            item.error = (f"worklist line {n}: patient_id must be letters, digits, '.', '_' or '-' (it names the "
                          "patient's folder)")
        elif pid in seen:
            item.error = f"worklist line {n}: patient_id also on line {seen[pid]}"
        if not item.pacs_patient_id and not item.accession:  # the PACS knows the patient by the same id
            item.pacs_patient_id = pid
        for key in ("date_from", "date_to"):
            raw = vals.get(key, "")
            if raw and not item.error:
                try:
                    setattr(item, key, _date(raw))
                except ValueError:
                    item.error = f"worklist line {n}: {key} {raw!r} is not a date (YYYY-MM-DD)"
        if item.date_from and item.date_to and item.date_from > item.date_to and not item.error:
            item.error = f"worklist line {n}: date_from is after date_to"
        if pid and pid not in seen:
            seen[pid] = n
        items.append(item)
    if not items:
        raise ConfigError(f"worklist {p} lists no patient")
    return items


# ------------------------------------------------------------------------------------------------
# choosing the study and the series
# ------------------------------------------------------------------------------------------------

@dataclass
class StudyInfo:
    study_uid: str
    date: str = ""
    modalities: tuple[str, ...] = ()


@dataclass
class InstanceInfo:
    sop_uid: str
    sop_class: str = ""
    image_type: tuple[str, ...] = ()
    protocol: str = ""
    sequence_name: str = ""
    bvalue: float | None = None
    number: int = 0


@dataclass
class SeriesInfo:
    series_uid: str
    modality: str = ""
    description: str = ""
    number: int = 0
    count: int | None = None  # NumberOfSeriesRelatedInstances, when the PACS gives it
    instances: list[InstanceInfo] = field(default_factory=list)
    kind: str = ""  # t2 / dwi / adc / mask / other (--all-series)

    def label(self) -> str:
        return f"series {self.number} '{self.description or '(no description)'}'"


def who(item: WorkItem) -> str:
    """How a reason names the worklist's query without repeating its identifiers."""
    parts = []
    if item.pacs_patient_id:
        parts.append("PatientID")
    if item.accession:
        parts.append("AccessionNumber")
    return f"the {' and '.join(parts)} of worklist line {item.line}"


def select_study(item: WorkItem, studies: list[StudyInfo], pacs_label: str) -> StudyInfo:
    """The one MR study of the worklist row in its date window; FetchError with the reason otherwise."""
    if not studies:
        return _raise(f"{who(item)} matches no study in {pacs_label}")
    mr = [s for s in studies if "MR" in s.modalities or not s.modalities]
    if not mr:
        found = sorted({m for s in studies for m in s.modalities})
        return _raise(f"{len(studies)} study(ies) found but none is MR (modalities: {', '.join(found) or 'none'})")
    inside = [s for s in mr if (not item.date_from or (s.date and s.date >= item.date_from))
              and (not item.date_to or (s.date and s.date <= item.date_to))]
    if not inside:
        dates = ", ".join(sorted(_iso(s.date) or "undated" for s in mr))
        return _raise(f"{len(mr)} MR study(ies) found, none dated within {item.window()} (study dates: {dates})")
    if len(inside) > 1:
        dates = ", ".join(sorted(_iso(s.date) or "undated" for s in inside))
        return _raise(f"{len(inside)} MR studies within {item.window()} (dates: {dates}): narrow the date window or "
                      "give the AccessionNumber")
    return inside[0]


def _raise(msg: str):
    raise FetchError(msg)


def classify_series(s: SeriesInfo, rules: SeriesRules) -> str:
    """'t2' / 'dwi' / 'adc' / 'mask' / '' for one PACS series, by the rules prepare uses
    (client/series.py SeriesRules.classify) applied to the headers the PACS returned."""
    if s.modality.upper() in MASK_MODALITIES:
        return "mask"
    insts = sorted(s.instances, key=lambda i: (i.number, i.sop_uid))
    first = insts[0] if insts else InstanceInfo("")
    recs = [FileRecord(path="", size=0, mtime_ns=0, patient_id="", study_uid="", series_uid=s.series_uid,
                       sop_uid=i.sop_uid, modality=s.modality.upper(), description=s.description,
                       protocol=first.protocol, sequence_name=first.sequence_name,
                       image_type=tuple(x.upper() for x in first.image_type), series_number=s.number,
                       bvalue=i.bvalue) for i in (insts or [first])]
    return rules.classify(Series("", "", s.series_uid, recs)) or ""


def choose_series(series: list[SeriesInfo], rules: SeriesRules, all_series: bool) -> tuple[list[SeriesInfo], list[SeriesInfo]]:
    """(to fetch, left out): T2WI / DWI / ADC candidates and mask objects, or everything."""
    keep, left = [], []
    for s in series:
        s.kind = classify_series(s, rules)
        if all_series or s.kind in WANTED or s.kind == "mask":
            s.kind = s.kind or "other"
            keep.append(s)
        else:
            left.append(s)
    return keep, left


# ------------------------------------------------------------------------------------------------
# the files on disk
# ------------------------------------------------------------------------------------------------

def _write_body(fh, data: bytes) -> None:
    """Everything after the 132-byte preamble + prefix (its own function so a test can interrupt it)."""
    fh.write(data)


def write_instance(path: Path, data: bytes) -> None:
    """Write one DICOM file atomically: a hidden partial file whose "DICM" prefix comes last, then
    os.replace onto `path`. On any exception the partial file is removed and the error re-raised."""
    if data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    tmp = path.with_name(f".{path.name}{PARTIAL}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(b"\0" * 132)  # no DICM prefix until the rest is on disk: readers skip it as "not DICOM"
            _write_body(fh, data[132:])
            fh.flush()
            fh.seek(0)
            fh.write(data[:132])
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def encode(ds, patient_id: str) -> bytes:
    """A received dataset as Part 10 bytes, its PatientID set to the site's patient_id."""
    import pydicom

    if str(getattr(ds, "PatientID", "")) != patient_id:
        ds.PatientID = patient_id
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class PatientStore:
    """Where one patient's objects go, and which of them are already there (by SOPInstanceUID)."""

    def __init__(self, site_dir: Path, patient_id: str):
        self.patient_id = patient_id
        self.images = site_dir / "dicom" / patient_id
        self.masks = site_dir / "masks" / patient_id

    def path(self, series: SeriesInfo, sop_uid: str) -> Path:
        if not UID_RE.fullmatch(sop_uid) or not UID_RE.fullmatch(series.series_uid):
            raise FetchError(f"{series.label()}: the PACS returned a malformed UID")
        if series.kind == "mask":
            return self.masks / f"{sop_uid}.dcm"
        return self.images / series.series_uid / f"{sop_uid}.dcm"

    def present(self, series: SeriesInfo) -> set[str]:
        return {i.sop_uid for i in series.instances if self.path(series, i.sop_uid).is_file()}

    def clean_partials(self) -> int:
        """Remove partial files an interrupted run left (never read as DICOM, but not kept either)."""
        n = 0
        for root in (self.images, self.masks):
            if root.is_dir():
                for p in root.rglob(f".*{PARTIAL}"):
                    p.unlink()
                    n += 1
        return n

    def sink(self, series: SeriesInfo, expected: set[str], counter: Callable[[], None]):
        """The callback a transport hands each received dataset to."""
        def put(ds) -> None:
            sop = str(getattr(ds, "SOPInstanceUID", ""))
            if sop not in expected:  # not asked for (or already on disk): ignore it
                return
            path = self.path(series, sop)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_instance(path, encode(ds, self.patient_id))
            expected.discard(sop)
            counter()
        return put


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------

@dataclass
class PatientResult:
    patient_id: str
    line: int
    status: str = "failed"  # fetched | skipped | failed
    reason: str = ""
    pacs: str = ""
    study_date: str = ""
    series: int = 0
    series_left_out: int = 0
    fetched: int = 0
    present: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


class JsonLog:
    """Append-only JSON lines: one object per event (no PHI: ids are the site's patient_id)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.run = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

    def write(self, event: str, **fields) -> None:
        if self.path is None:
            return
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run": self.run, "event": event, **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="obj", disable=not enabled or total == 0, leave=False)


def fetch_patient(item: WorkItem, transport, site_dir: Path, rules: SeriesRules, all_series: bool,
                  progress: bool, log: JsonLog, pacs_label: str) -> PatientResult:
    res = PatientResult(item.patient_id, item.line)
    studies = transport.find_studies(item.pacs_patient_id, item.accession)
    study = select_study(item, studies, pacs_label)
    res.study_date = _iso(study.date)
    series = transport.find_series(study.study_uid)
    for s in series:
        s.instances = transport.find_instances(study.study_uid, s.series_uid, s.modality)
        if s.count is not None and s.count != len(s.instances):  # asked once more before it counts as a mismatch
            s.instances = transport.find_instances(study.study_uid, s.series_uid, s.modality)
    keep, left = choose_series(series, rules, all_series)
    res.series, res.series_left_out = len(keep), len(left)
    for s in keep:
        res.kinds[s.kind] = res.kinds.get(s.kind, 0) + 1
    if not keep:
        raise FetchError(f"the MR study of {_iso(study.date) or 'no date'} has no T2WI, DWI, ADC or mask series "
                         f"({len(series)} series; see series-rules, or use --all-series)")
    store = PatientStore(site_dir, item.patient_id)
    store.clean_partials()
    todo: list[tuple[SeriesInfo, set[str]]] = []
    for s in keep:
        if s.count is not None and s.count != len(s.instances):
            raise FetchError(f"{s.label()}: the PACS counts {s.count} instances but lists {len(s.instances)}")
        have = store.present(s)
        res.present += len(have)
        todo.append((s, {i.sop_uid for i in s.instances} - have))
    bar = _progress(sum(len(m) for _, m in todo), item.patient_id, progress)

    def tick() -> None:
        res.fetched += 1
        bar.update(1)

    try:
        for s, missing in todo:
            if not missing:
                continue
            wanted = set(missing)
            whole = len(missing) == len(s.instances)
            transport.retrieve(study.study_uid, s.series_uid, sorted(missing), whole, store.sink(s, wanted, tick))
            log.write("series", patient_id=item.patient_id, series_number=s.number, kind=s.kind,
                      instances=len(s.instances), fetched=len(missing) - len(wanted))
    finally:
        bar.close()
    for s in keep:  # verified against the PACS listing: every instance it lists is on disk
        have = store.present(s)
        if len(have) != len(s.instances):
            raise FetchError(f"{s.label()}: {len(have)} of {len(s.instances)} instances retrieved (the PACS sent "
                             "fewer than it lists); run fetch again")
    res.status = "fetched" if res.fetched else "skipped"
    res.reason = "" if res.fetched else "already on disk"
    return res


@dataclass
class FetchReport:
    results: list[PatientResult] = field(default_factory=list)
    elapsed_s: float = 0.0

    def counts(self) -> dict[str, int]:
        out = {"fetched": 0, "skipped": 0, "failed": 0}
        for r in self.results:
            out[r.status] += 1
        return out

    def table(self) -> str:
        rows = [("patient_id", "status", "study", "series", "objects", "on disk", "reason")]
        for r in self.results:
            rows.append((r.patient_id, r.status, r.study_date or "-", str(r.series) if r.status != "failed" else "-",
                         str(r.fetched), str(r.present), r.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:6], widths)) + "  " + row[6] for row in rows]
        c = self.counts()
        lines.append(f"fetched {c['fetched']}, skipped {c['skipped']} (already on disk), failed {c['failed']}; "
                     f"{sum(r.fetched for r in self.results)} objects in {self.elapsed_s:.1f} s")
        return "\n".join(line.rstrip() for line in lines)


def fetch_site(site_dir: str | Path, worklist: list[WorkItem], pacs: dict[str, PacsConfig], default_pacs: str,
               rules: SeriesRules, *, all_series: bool = False, progress: bool = True,
               log_path: Path | None = None, transports: dict | None = None,
               echo: Callable[[str], None] | None = None) -> FetchReport:
    """Fetch every worklist patient; a patient's failure is its result row, never the run's end.
    `transports` (name -> object) replaces the real ones (tests); else they are made on first use."""
    t0 = time.perf_counter()
    site_dir = Path(site_dir)
    (site_dir / "dicom").mkdir(parents=True, exist_ok=True)
    (site_dir / "masks").mkdir(parents=True, exist_ok=True)
    log = JsonLog(log_path)
    log.write("start", patients=len(worklist), pacs=sorted(pacs), all_series=all_series)
    report = FetchReport()
    live: dict[str, object] = dict(transports or {})
    broken: dict[str, str] = {}
    echo = echo or (lambda s: None)
    try:
        for item in worklist:
            name = item.pacs or default_pacs
            res = PatientResult(item.patient_id or f"(line {item.line})", item.line, pacs=name)
            try:
                if item.error:
                    raise FetchError(item.error)
                if name not in pacs:
                    raise FetchError(f"worklist line {item.line}: no PACS named '{name}' in site.toml "
                                     f"(configured: {', '.join(sorted(pacs))})")
                cfg = pacs[name]
                if name in broken:
                    raise FetchError(broken[name])
                if name not in live:
                    live[name] = open_transport(cfg)
                res = fetch_patient(item, live[name], site_dir, rules, all_series, progress, log, cfg.label())
                res.pacs = name
            except PacsError as exc:
                res.reason = str(exc)
                if exc.fatal:
                    broken[name] = str(exc)
            except (FetchError, ConfigError) as exc:
                res.reason = str(exc)
            report.results.append(res)
            echo(f"{res.patient_id}: {res.status}" + (f": {res.reason}" if res.reason else
                                                      f" ({res.fetched} objects, {res.present} already on disk)"))
            log.write("patient", patient_id=res.patient_id, line=res.line, pacs=res.pacs, status=res.status,
                      reason=res.reason, study_date=res.study_date, series=res.series,
                      series_left_out=res.series_left_out, kinds=res.kinds, fetched=res.fetched, on_disk=res.present)
    finally:
        for name, t in live.items():
            if transports is None or name not in transports:
                try:
                    t.close()
                except Exception:  # closing a broken connection must not hide the run's result
                    pass
    report.elapsed_s = time.perf_counter() - t0
    log.write("end", elapsed_s=round(report.elapsed_s, 3), **report.counts())
    return report


def open_transport(cfg: PacsConfig):
    """The transport object of one PACS (imported only when used)."""
    secret = read_secret(cfg.secret_file) if cfg.secret_file else ""
    if cfg.transport == "dicomweb":
        from client.pacs_dicomweb import DicomWebTransport

        return DicomWebTransport(cfg, secret)
    from client.pacs_dimse import DimseTransport

    return DimseTransport(cfg)

