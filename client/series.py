"""Group DICOM files into series and pick each patient's T2WI, DWI (high b) and ADC.

Matching works on a normalised text made of SeriesDescription + ProtocolName + SequenceName
(lower case, every non-alphanumeric character turned into a space, so `t2_tse_tra` reads
"t2 tse tra"), on ImageType, and on the b-values read from the headers. Order of the rules:
not MR or ImageType LOCALIZER or an `ignore` pattern -> ignored; then `adc`; then `dwi` (or ImageType
DIFFUSION, or any b-value > 50); then `t2`; then `dwi` for a series of low b only (b <= 50, e.g. the b = 5
of a Prisma export). A site can add patterns (or replace the defaults) in
site.toml:

    [series-rules]
    t2 = ["my t2 name"]       # regular expressions, searched in the raw and the normalised text
    dwi = ["..."]; adc = ["..."]; ignore = ["..."]
    mode = "extend"           # or "replace": drop the default patterns of the listed classes
    min-dwi-b = 600           # the DWI channel is the highest b >= this
    adc-unit = "auto"         # or "mm2/s", "1e-3 mm2/s", "1e-6 mm2/s" for the scanner's ADC

When several series fit, the documented choice (and the note saying so) is:
    T2:  grid matches the mask, not fat-suppressed, most axial, finest in-plane spacing,
         most slices, highest series number;
    DWI: same study as the T2, highest b-value, the scanner's trace (TRACEW / ISOTROPIC) before
         per-direction images, most images, highest series number (per-direction images become the
         trace, their geometric mean, in client/volumes.py read_diffusion);
    ADC: the scanner's ADC of that study on the DWI's slice grid, highest series number;
         else computed from the lowest and highest b on one slice grid.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from client.dicom_scan import FileRecord

DEFAULT_PATTERNS: dict[str, list[str]] = {
    "ignore": [
        r"locali[sz]er", r"\bloc\b", r"scout", r"survey", r"\b3 ?pl(ane)?\b", r"tri ?pilot",
        r"calibration", r"\basset\b", r"\bcal\b", r"\bmip\b", r"\beadc\b", r"exponential",
        r"\bfa\b", r"\bt2 ?star\b", r"\bt1\b", r"\bvibe\b", r"\bdyn", r"\bpost ?contrast\b",
    ],
    "adc": [r"\badc\b", r"\bdadc\b", r"apparent diffusion", r"\badc\w*"],
    "dwi": [r"\bdwi\w*", r"\bdiff\w*", r"ep2d diff", r"\bresolve\b", r"\btrace\w*", r"\bb\d{2,4}\b", r"\bdw\b"],
    "t2": [r"\bt2\w*", r"\bt2 ?w", r"\bfrfse\b"],
}
FATSAT = re.compile(r"\bfs\b|fat ?sat|\bspair\b|\bstir\b|\bspir\b|\bfatsat\b|\bfs\w+")
LOW_B = 50.0  # s/mm^2: an image at b <= LOW_B counts as the b0 of an ADC fit, never as the DWI channel
RULE_KEYS = ("t2", "dwi", "adc", "ignore", "mode", "min-dwi-b", "adc-unit")
ADC_UNITS = {"auto": None, "mm2/s": 1.0, "1e-3 mm2/s": 1e-3, "1e-6 mm2/s": 1e-6}


class RulesError(ValueError):
    """The series-rules table in site.toml is malformed."""


class SelectionError(ValueError):
    """The patient lacks a usable T2WI / DWI / ADC; the message is the QC reason."""


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


@dataclass
class Series:
    """All image files of one SeriesInstanceUID, with the header facts shared by its slices."""

    patient_id: str
    study_uid: str
    series_uid: str
    files: list[FileRecord]

    @property
    def first(self) -> FileRecord:
        return self.files[0]

    @property
    def description(self) -> str:
        return self.first.description or self.first.protocol or "(no description)"

    @property
    def text(self) -> str:
        f = self.first
        return f"{f.description} | {f.protocol} | {f.sequence_name}"

    @property
    def label(self) -> str:
        return f"series {self.first.series_number} '{self.description}'"

    def bvalues(self) -> list[float]:
        return sorted({f.bvalue for f in self.files if f.bvalue is not None})

    def by_b(self) -> dict[float, list[FileRecord]]:
        """Split a multi-b DWI series; slices without a b-value count as b=0 when others have one."""
        out: dict[float, list[FileRecord]] = {}
        for f in self.files:
            out.setdefault(0.0 if f.bvalue is None else float(f.bvalue), []).append(f)
        return out

    def axiality(self) -> float:
        iop = self.first.iop
        if iop is None:
            return 0.0
        n = np.cross(iop[:3], iop[3:])
        return float(abs(n[2]) / (np.linalg.norm(n) + 1e-12))

    def inplane_spacing(self) -> float:
        ps = self.first.pixel_spacing
        return float(min(ps)) if ps else float("inf")

    def n_positions(self) -> int:
        return len({f.ipp for f in self.files})


def group_series(records: Iterable[FileRecord]) -> dict[str, list[Series]]:
    """patient_id -> that patient's series (grouped by study + series UID), in series-number order."""
    groups: dict[tuple[str, str, str], list[FileRecord]] = {}
    for r in records:
        groups.setdefault((r.patient_id, r.study_uid, r.series_uid), []).append(r)
    out: dict[str, list[Series]] = {}
    for (pid, study, uid), files in sorted(groups.items()):
        files.sort(key=lambda f: f.path)
        out.setdefault(pid, []).append(Series(pid, study, uid, files))
    for lst in out.values():
        lst.sort(key=lambda s: (s.study_uid, s.first.series_number, s.series_uid))
    return out


class SeriesRules:
    """Sequence-matching rules: the defaults plus whatever site.toml's [series-rules] adds."""

    def __init__(self, table: dict | None = None):
        table = dict(table or {})
        unknown = [k for k in table if k not in RULE_KEYS]
        if unknown:
            raise RulesError(f"series-rules: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(RULE_KEYS)}")
        mode = table.get("mode", "extend")
        if mode not in ("extend", "replace"):
            raise RulesError(f"series-rules.mode: expected 'extend' or 'replace', found {mode!r}")
        self.patterns: dict[str, list[re.Pattern]] = {}
        for cls, defaults in DEFAULT_PATTERNS.items():
            extra = table.get(cls, [])
            if isinstance(extra, str):
                extra = [extra]
            if not isinstance(extra, list) or not all(isinstance(p, str) for p in extra):
                raise RulesError(f"series-rules.{cls}: expected a list of regular expressions, found {extra!r}")
            chosen = list(extra) + ([] if (mode == "replace" and cls in table) else defaults)
            try:
                self.patterns[cls] = [re.compile(p, re.IGNORECASE) for p in chosen]
            except re.error as exc:
                raise RulesError(f"series-rules.{cls}: invalid regular expression ({exc})") from None
        try:
            self.min_dwi_b = float(table.get("min-dwi-b", 600.0))
        except (TypeError, ValueError):
            raise RulesError(f"series-rules.min-dwi-b: expected a number, found {table.get('min-dwi-b')!r}") from None
        unit = table.get("adc-unit", "auto")
        if unit not in ADC_UNITS:
            raise RulesError(f"series-rules.adc-unit: expected one of {', '.join(ADC_UNITS)}, found {unit!r}")
        self.adc_scale = ADC_UNITS[unit]
        self.table = table

    def _match(self, cls: str, s: Series) -> bool:
        raw, norm = s.text.lower(), normalise(s.text)
        return any(p.search(raw) or p.search(norm) for p in self.patterns[cls])

    def classify(self, s: Series) -> str | None:
        """'t2', 'dwi', 'adc' or None (ignored) for one series."""
        f = s.first
        itype = set(f.image_type)
        if f.modality and f.modality != "MR":
            return None
        if "LOCALIZER" in itype or self._match("ignore", s):
            return None
        if any(t.startswith("ADC") for t in itype) or self._match("adc", s):
            return "adc"
        if self._match("dwi", s) or "DIFFUSION" in itype or any(b > LOW_B for b in s.bvalues()):
            return "dwi"
        if self._match("t2", s):
            return "t2"
        if any(b > 0 for b in s.bvalues()):  # low b only (b <= 50, e.g. b = 5): after the T2 rules
            return "dwi"
        return None


@dataclass
class Selection:
    """What the patient's volumes are built from, plus notes on any choice that was made."""

    t2: Series
    dwi: Series
    dwi_b: float
    dwi_files: list[FileRecord]
    adc: Series | None = None
    adc_files: list[FileRecord] | None = None
    low_b: float | None = None
    low_files: list[FileRecord] | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "t2": self.t2.description,
            "dwi": f"{self.dwi.description} (b={self.dwi_b:g})",
            "adc": self.adc.description if self.adc else f"computed from b={self.low_b:g} and b={self.dwi_b:g}",
        }


def is_trace(files: list[FileRecord]) -> bool:
    """The scanner's trace-weighted (isotropic) image: DiffusionDirectionality ISOTROPIC, ImageType
    TRACEW, a Philips "I" direction or a Siemens "...t" sequence name (client/dicom_scan.py)."""
    return any(f.directionality == "ISOTROPIC" for f in files)


def _grid(files: list[FileRecord]) -> tuple:
    f = files[0]
    pos = sorted({tuple(round(x, 1) for x in r.ipp) for r in files if r.ipp})
    return (f.rows, f.cols, tuple(round(x, 3) for x in (f.iop or ())), tuple(pos))


def _seen(series: list[Series], rules: SeriesRules) -> str:
    parts = [f"{s.first.modality or '?'} '{s.description}'" for s in series[:6]]
    more = f" and {len(series) - 6} more" if len(series) > 6 else ""
    return ", ".join(parts) + more


def select_sequences(
    series: list[Series], rules: SeriesRules, t2_matches_mask: Callable[[Series], bool] | None = None
) -> Selection:
    """Pick T2, DWI and ADC for one patient; raises SelectionError with the QC reason."""
    classes: dict[str, list[Series]] = {"t2": [], "dwi": [], "adc": []}
    for s in series:
        c = rules.classify(s)
        if c:
            classes[c].append(s)
    notes: list[str] = []
    if not classes["t2"]:
        raise SelectionError(f"no T2WI series found (series seen: {_seen(series, rules)})")
    t2s = classes["t2"]
    match = t2_matches_mask or (lambda s: True)
    ranked = t2s if len(t2s) == 1 else sorted(
        t2s,
        key=lambda s: (match(s), not FATSAT.search(normalise(s.text)), round(s.axiality(), 2),
                       -s.inplane_spacing(), s.n_positions(), s.first.series_number),
        reverse=True,
    )
    t2 = ranked[0]
    if len(t2s) > 1:
        notes.append(f"t2: {len(t2s)} candidates, picked {t2.label} (mask grid, no fat-sat, axial, finest, most slices, latest)")

    def same_study(lst: list[Series]) -> list[Series]:
        same = [s for s in lst if s.study_uid == t2.study_uid]
        return same or lst

    dwis = same_study(classes["dwi"])
    if not dwis:
        raise SelectionError(f"no DWI series found (series seen: {_seen(series, rules)})")
    no_b = [s for s in dwis if not s.bvalues()]
    with_b = [s for s in dwis if s.bvalues()]
    if not with_b:
        raise SelectionError(
            f"DWI {no_b[0].label} has no b-value in its headers (DiffusionBValue (0018,9087) "
            "or the Siemens/GE/Philips private b-value tags)"
        )
    options = [(b, s) for s in with_b for b in s.by_b() if b >= rules.min_dwi_b]
    if not options:
        top = max(b for s in with_b for b in s.bvalues())
        raise SelectionError(f"highest DWI b-value is {top:g} s/mm^2; the DWI channel needs b >= {rules.min_dwi_b:g}")
    options.sort(key=lambda o: (o[0], is_trace(o[1].by_b()[o[0]]), len(o[1].by_b()[o[0]]), o[1].first.series_number),
                 reverse=True)
    dwi_b, dwi = options[0]
    dwi_files = dwi.by_b()[dwi_b]
    if len(options) > 1:
        why = "highest b"
        if is_trace(dwi_files) and any(b == dwi_b and not is_trace(s.by_b()[b]) for b, s in options[1:]):
            why = "highest b; the scanner's trace (TRACEW / ISOTROPIC) before per-direction images"
        notes.append(f"dwi: {len(options)} b>={rules.min_dwi_b:g} candidates, picked b={dwi_b:g} of {dwi.label} ({why})")
    if no_b:
        notes.append(f"dwi: ignored {len(no_b)} DWI series without b-values")
    sel = Selection(t2=t2, dwi=dwi, dwi_b=dwi_b, dwi_files=dwi_files, notes=notes)

    grid = _grid(dwi_files)
    adcs = same_study(classes["adc"])
    if adcs:
        adcs = sorted(adcs, key=lambda s: (_grid(s.files) == grid, s.first.series_number), reverse=True)
        sel.adc, sel.adc_files = adcs[0], adcs[0].files
        if len(adcs) > 1:
            notes.append(f"adc: {len(adcs)} candidates, picked {adcs[0].label} (DWI slice grid, latest)")
        return sel
    lows = [(b, s) for s in with_b for b, fs in s.by_b().items() if b < dwi_b and _grid(fs) == grid]
    if not lows:
        raise SelectionError(
            f"no ADC series, and the DWI has no lower b-value on the same slices than b={dwi_b:g}, so ADC cannot be computed"
        )
    lows.sort(key=lambda o: (-o[0], o[1] is dwi), reverse=True)
    sel.low_b, low_series = lows[0]
    sel.low_files = low_series.by_b()[sel.low_b]
    notes.append(f"adc: no scanner ADC series, computed from b={sel.low_b:g} and b={dwi_b:g}")
    return sel
