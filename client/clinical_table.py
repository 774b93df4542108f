"""Validate a site's clinical.csv and turn each row into the shared encoding (common.clinical).

A problem with the whole file (missing, not UTF-8, required column absent) is a ClinicalTableError:
nothing can be matched without it. A problem with one row (duplicated patient_id, unknown sex
spelling, CEA that is text / NaN / negative, slm not 0/1) excludes only that patient, with a reason
that names the column, the line and the value found. Extreme but possible values are kept and
flagged as plausibility warnings.
"""
from __future__ import annotations

import csv
import difflib
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.clinical import encode_row

REQUIRED = ("patient_id", "sex", "tumor_site", "cea", "ca199")
OPTIONAL = ("slm",)

SEX_SPELLINGS = {
    "m": "M", "male": "M", "man": "M", "masculine": "M",
    "f": "F", "female": "F", "woman": "F", "feminine": "F",
}
SITE_SPELLINGS = {
    "low": "low", "lower": "low", "distal": "low", "l": "low",
    "mid": "mid", "middle": "mid", "medium": "mid", "m": "mid",
    "high": "high", "upper": "high", "proximal": "high", "h": "high",
}
# Multipliers from the site's unit to the encoding's unit (ng/mL, U/mL).
CEA_UNITS = {"ng/mL": 1.0, "ug/L": 1.0}
CA199_UNITS = {"U/mL": 1.0, "kU/L": 1.0}
# Beyond these the value is possible but rare enough to deserve a second look.
PLAUSIBLE_MAX = {"cea": 1000.0, "ca199": 20000.0}


class ClinicalTableError(ValueError):
    """clinical.csv as a whole cannot be used."""


def _canonical_unit(given: str, units: dict[str, float], key: str) -> str:
    """Unit names are matched without regard to case ('ng/ml' is ng/mL); anything else is refused."""
    for name in units:
        if given.strip().lower() == name.lower():
            return name
    raise ClinicalTableError(f"{key}: expected one of {', '.join(units)}, found {given!r}")


def _normalised(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _suggest(missing: str, found: list[str]) -> str:
    """The found column a user most likely meant by `missing` ('tumour_site', 'CA19-9'), or ''."""
    by_norm = {_normalised(c): c for c in found}
    if _normalised(missing) in by_norm:
        return by_norm[_normalised(missing)]
    close = difflib.get_close_matches(_normalised(missing), list(by_norm), n=1, cutoff=0.7)
    return by_norm[close[0]] if close else ""


def _missing_file_message(path: Path) -> str:
    message = f"{path} does not exist (every site needs a clinical.csv)"
    if path.parent.is_dir():
        sheets = sorted(p.name for p in path.parent.iterdir()
                        if p.suffix.lower() in (".xlsx", ".xls", ".ods") and p.stem.lower() == path.stem.lower())
        if sheets:
            message += (f"; {path.parent / sheets[0]} is a spreadsheet: save it as CSV UTF-8 "
                        f"(File > Save as > 'CSV UTF-8') named {path.name}")
    return message


@dataclass
class ClinicalRow:
    """One validated row; `error` is set (and the rest unusable) when the row is rejected."""

    patient_id: str
    line: int
    sex: str = ""
    tumor_site: str = ""
    cea: float = math.nan
    ca199: float = math.nan
    slm: int = -1
    error: str = ""
    warnings: list[str] = field(default_factory=list)

    def encode(self) -> np.ndarray:
        return encode_row(self.sex, self.tumor_site, self.cea, self.ca199)

    def fingerprint(self) -> str:
        return f"{self.sex}|{self.tumor_site}|{self.cea!r}|{self.ca199!r}|{self.slm}|{self.error}"


@dataclass
class ClinicalTable:
    rows: dict[str, ClinicalRow]
    has_label: bool
    path: Path


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ClinicalTableError(
            f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02X} on line {line}); "
            "re-save it as 'CSV UTF-8'"
        ) from None


def _number(text: str, column: str, unit_factor: float) -> tuple[float | None, str]:
    t = text.strip()
    if re.fullmatch(r"[+-]?\d+,\d+", t):  # decimal comma (European spreadsheets)
        t = t.replace(",", ".")
    if t == "" or t.lower() in ("nan", "na", "n/a", "none", "null", "-"):
        return None, f"{column} is missing (found {text.strip()!r})"
    try:
        v = float(t)
    except ValueError:
        return None, f"{column} {text.strip()!r} is not a number"
    if not math.isfinite(v):
        return None, f"{column} {text.strip()!r} is not a finite number"
    if v < 0:
        return None, f"{column} {text.strip()!r} is negative"
    return v * unit_factor, ""


def _label(text: str) -> tuple[int, str]:
    t = text.strip().lower()
    if t in ("", "nan", "na", "n/a"):
        return -1, ""
    if t in ("0", "0.0", "1", "1.0"):
        return int(float(t)), ""
    return -1, f"slm {text.strip()!r} is not 0 or 1"


def read_clinical_table(path: str | Path, cea_unit: str = "ng/mL", ca199_unit: str = "U/mL") -> ClinicalTable:
    """Read and validate clinical.csv; raises ClinicalTableError when the file itself is unusable."""
    path = Path(path)
    if not path.is_file():
        raise ClinicalTableError(_missing_file_message(path))
    cea_unit = _canonical_unit(cea_unit, CEA_UNITS, "cea-unit")
    ca199_unit = _canonical_unit(ca199_unit, CA199_UNITS, "ca199-unit")
    text = _decode(path)
    if not text.strip():
        raise ClinicalTableError(f"{path} is empty")
    first = text.splitlines()[0]
    try:
        sep = csv.Sniffer().sniff(first, delimiters=",;\t").delimiter
    except csv.Error:
        sep = ","
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, ValueError) as exc:
        raise ClinicalTableError(f"{path} is not a readable CSV table: {exc}") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        hints = [f"{c!r} for {m}" for m in missing if (c := _suggest(m, list(df.columns)))]
        raise ClinicalTableError(
            f"{path} lacks required column(s) {', '.join(missing)} (found: {', '.join(df.columns)})"
            + (f"; did you mean {', '.join(hints)}? Rename the column(s) in the header" if hints else "")
        )
    has_label = "slm" in df.columns
    lines: dict[str, list[int]] = {}
    rows: dict[str, ClinicalRow] = {}
    for i, rec in enumerate(df.to_dict("records")):
        line = i + 2  # header is line 1
        pid = str(rec["patient_id"]).strip()
        if not pid:
            continue  # an empty row carries no patient to report
        lines.setdefault(pid, []).append(line)
        rows[pid] = _validate(pid, line, rec, has_label, CEA_UNITS[cea_unit], CA199_UNITS[ca199_unit])
    for pid, where in lines.items():
        if len(where) > 1:
            rows[pid] = ClinicalRow(
                pid, where[0],
                error=f"patient_id appears in {len(where)} rows of clinical.csv (lines {', '.join(map(str, where))})",
            )
    return ClinicalTable(rows=rows, has_label=has_label, path=path)


def _validate(pid: str, line: int, rec: dict, has_label: bool, cea_f: float, ca_f: float) -> ClinicalRow:
    row = ClinicalRow(pid, line)
    problems = []
    sex = SEX_SPELLINGS.get(str(rec["sex"]).strip().lower())
    if sex is None:
        problems.append(f"sex {str(rec['sex']).strip()!r} is not recognised (expected M or F)")
    site = SITE_SPELLINGS.get(str(rec["tumor_site"]).strip().lower())
    if site is None:
        problems.append(f"tumor_site {str(rec['tumor_site']).strip()!r} is not recognised (expected low, mid or high)")
    cea, err = _number(str(rec["cea"]), "cea", cea_f)
    if err:
        problems.append(err)
    ca199, err = _number(str(rec["ca199"]), "ca199", ca_f)
    if err:
        problems.append(err)
    slm = -1
    if has_label:
        slm, err = _label(str(rec["slm"]))
        if err:
            problems.append(err)
    if problems:
        row.error = f"clinical.csv line {line}: " + "; ".join(problems)
        return row
    row.sex, row.tumor_site, row.cea, row.ca199, row.slm = sex, site, cea, ca199, slm
    for name, v in (("cea", cea), ("ca199", ca199)):
        if v > PLAUSIBLE_MAX[name]:
            row.warnings.append(f"{name} {v:g} is above {PLAUSIBLE_MAX[name]:g}: please check the value and unit")
    return row
