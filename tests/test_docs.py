"""The documentation by reader stays what it claims to be.

- README.md is a landing page: short, with its sections, its first two commands exactly the ones CI
  runs, no issue numbers, and every relative link (README and the guides) pointing at a file that
  exists (and at a heading that exists, for `file#anchor` links).
- client/README.md's `clinical.csv` reference agrees with the parser (client/clinical_table.py): the
  columns, which are required, the accepted spellings, units, missing-value markers and warning
  limits; its example table is accepted as documented. Its `site.toml` reference lists exactly the
  site preprocessing keys of the config schema (common/config.py), with their defaults and choices,
  and the `[series-rules]` keys of client/series.py.
- The commands in the new guides parse with the real CLI (the checker of tests/test_doc_commands.py).
- LICENSE is Apache-2.0; CITATION.cff cites the project and the paper.
Nothing here runs a study or imports torch.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLIENT = ROOT / "client" / "README.md"
SIMULATION = ROOT / "simulation" / "README.md"
DEPLOY = ROOT / "deploy" / "README.md"
GUIDES = [README, CLIENT, SIMULATION]

INSTALL = "python3 -m venv .venv && .venv/bin/pip install -q -c .ci/constraints.txt -e '.[test]'"
COMMAND_1 = f"{INSTALL} && .venv/bin/slmfed simulate"
COMMAND_2 = f"{INSTALL} && .venv/bin/python -m pytest -q"
# "#12" as an issue reference; not a '#' inside a word, as in the Siemens series name `ep_b1500#2`
ISSUE_NUMBER = re.compile(r"\bissue \d+|(?<!\w)#\d+\b", re.IGNORECASE)
LANDING_SECTIONS = ("## Set-up: the two commands", "## Results", "## What leaves a hospital", "## Where to go next")


def _doc_commands_module():
    """tests/test_doc_commands.py's extraction and checking helpers (kept under a private name, so
    pytest does not collect its tests a second time from here)."""
    name = "_doc_commands_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "test_doc_commands.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # its dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[name]


# ---- markdown helpers ---------------------------------------------------------------------------

def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(info string, lines) of every fenced code block, in order."""
    blocks, info, body = [], None, []
    for line in text.splitlines():
        m = re.match(r"^\s{0,3}(```|~~~)\s*([\w+-]*)", line)
        if info is None and m:
            info, body = m.group(2).lower(), []
        elif info is not None and re.match(r"^\s{0,3}(```|~~~)\s*$", line):
            blocks.append((info, body))
            info = None
        elif info is not None:
            body.append(line)
    return blocks


def prose(text: str) -> str:
    """The text with fenced code blocks blanked (links and headings are looked for outside them)."""
    out, inside = [], False
    for line in text.splitlines():
        if re.match(r"^\s{0,3}(```|~~~)", line):
            inside = not inside
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", prose(path.read_text()), re.M)}


def relative_links(path: Path) -> list[str]:
    targets = re.findall(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(path.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def table_after(text: str, heading: str) -> list[list[str]]:
    """Rows (cells stripped) of the first Markdown table after `heading`, header row included."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == heading)
    rows, seen = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen = True
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif seen:
            break
    assert rows, f"no table after {heading!r}"
    return rows


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


# ---- README.md: the landing page ----------------------------------------------------------------

def test_readme_is_a_landing_page():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines: move detail to the guides it links"
    headings = [l for l in lines if l.startswith("## ")]
    for section in LANDING_SECTIONS:
        assert any(h.startswith(section) for h in headings), (section, headings)
    order = [next(i for i, h in enumerate(headings) if h.startswith(s)) for s in LANDING_SECTIONS]
    assert order == sorted(order), f"landing sections out of order: {headings}"


def test_readme_results_table_names_its_command_and_the_paper():
    text = README.read_text()
    results = text[text.index("## Results"):text.index("## What leaves a hospital")]
    assert "slmfed simulate" in results
    header, *rows = table_after(text, next(l for l in text.splitlines() if l.startswith("## Results")))
    assert any("paper" in h for h in header), header
    assert [r[0] for r in rows] == ["CF model", "MRI DL model", "Combined DL model"]
    # the paper's figures as server/report.py prints them beside the study's (read as text: no import)
    report = (ROOT / "server" / "report.py").read_text()
    figures = re.findall(r'"(0\.\d{3} \(0\.\d{3}-[01]\.\d{3}\))"', report.split("PAPER_AUC", 1)[1][:400])
    assert len(figures) == 6, f"server/report.py's PAPER_AUC not found as 3 models x 2 cohorts: {figures}"
    for figure in figures:
        assert figure in results, f"the paper's {figure} is not beside the results"


def test_readme_first_two_commands_are_install_and_simulate_then_install_and_test():
    text = README.read_text()
    assert text.index("## Set-up: the two commands") < text.index("```")
    info, body = fenced_blocks(text)[0]
    assert info == "bash"
    commands = [l for l in body if l.strip() and not l.lstrip().startswith("#")]
    assert commands[:2] == [COMMAND_1, COMMAND_2]
    assert COMMAND_2 in (ROOT / ".ci" / "run").read_text().splitlines(), "CI must run README command 2"


def test_readme_names_the_system_packages_ci_installs():
    """The tests' Debian packages are the ones .ci/run installs, and the README says so."""
    ci = (ROOT / ".ci" / "run").read_text()
    installed = set(re.findall(r"apt-get install -y -qq (\S+);", ci))
    assert installed, "found no apt-get install in .ci/run"
    setup = README.read_text().split("## Set-up: the two commands", 1)[1].split("\n## ", 1)[0]
    for package in installed:
        assert f"`{package}`" in setup, f".ci/run installs {package}; the README's set-up does not say so"
    assert "skipped" in setup and "`.ci/run`" in setup


@pytest.mark.parametrize("path", GUIDES + [DEPLOY], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers_in_user_facing_docs(path):
    text = path.read_text()
    if path == DEPLOY:  # only the runbook appended to the privacy review is checked there
        text = text.split("## Runbook", 1)[1]
    hits = [m.group(0) for m in ISSUE_NUMBER.finditer(text)]
    assert not hits, f"{path.relative_to(ROOT)}: issue numbers {hits} (history lives in git)"


def test_readme_links_every_guide():
    links = {Path(t.split("#", 1)[0]).as_posix() for t in relative_links(README)}
    for guide in ("client/README.md", "simulation/README.md", "deploy/README.md", "LICENSE", "CITATION.cff"):
        assert guide in links, f"README.md does not link {guide}"


@pytest.mark.parametrize("path", GUIDES + [DEPLOY], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings_that_exist(path):
    bad = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{path.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def test_link_checker_sees_links_and_catches_a_broken_one(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nSee [a](missing.md), [b](doc.md#title), [c](doc.md#nope), [d](https://x.org).\n"
                   "```\n[e](in-code.md)\n```\n")
    assert relative_links(doc) == ["missing.md", "doc.md#title", "doc.md#nope"]
    assert anchors(doc) == {"title"}
    assert slug("Set-up: the two commands") == "set-up-the-two-commands"


# ---- client/README.md: clinical.csv against the parser -------------------------------------------

def clinical_rows() -> dict[str, list[str]]:
    header, *rows = table_after(CLIENT.read_text(), "## clinical.csv reference")
    assert [h.lower() for h in header[:5]] == ["column", "required", "allowed values", "unit", "notes"], header
    out = {}
    for row in rows:
        (name,) = code_spans(row[0])
        out[name] = row
    return out


def test_clinical_columns_and_which_are_required_match_the_parser():
    from client.clinical_table import OPTIONAL, REQUIRED

    rows = clinical_rows()
    assert list(rows) == list(REQUIRED) + list(OPTIONAL), "documented columns differ from the parser's"
    for name, row in rows.items():
        assert row[1].lower() == ("yes" if name in REQUIRED else "no"), (name, row[1])


@pytest.mark.parametrize("column, spellings", [("sex", "SEX_SPELLINGS"), ("tumor_site", "SITE_SPELLINGS")])
def test_clinical_allowed_spellings_are_exactly_what_the_parser_accepts(column, spellings):
    import client.clinical_table as ct

    accepted = getattr(ct, spellings)
    documented = {v.lower() for v in code_spans(clinical_rows()[column][2])}
    assert documented == set(accepted), (
        f"{column}: documented but not accepted {sorted(documented - set(accepted))}, "
        f"accepted but not documented {sorted(set(accepted) - documented)}")
    assert set(accepted.values()) <= {v for v in code_spans(clinical_rows()[column][2])}, \
        "the canonical values must be listed as written"


@pytest.mark.parametrize("column, units, key", [("cea", "CEA_UNITS", "cea-unit"), ("ca199", "CA199_UNITS", "ca199-unit")])
def test_clinical_units_match_the_parser_and_the_site_toml_key(column, units, key):
    import client.clinical_table as ct
    from common.config import SCHEMA

    row = clinical_rows()[column]
    documented = {u for u in code_spans(row[3]) if "/" in u}
    assert {u.lower() for u in documented} == {u.lower() for u in getattr(ct, units)}
    assert set(SCHEMA[key].choices) == set(getattr(ct, units))
    assert f"`{key}`" in row[4] and SCHEMA[key].default in row[4], f"{column}: notes must name {key} and its default"
    limit = f"{ct.PLAUSIBLE_MAX[column]:g}"
    assert re.search(rf"\babove {limit}\b", row[4]), f"{column}: the warning limit {limit} is not documented"


def test_clinical_missing_markers_and_slm_values_behave_as_documented():
    from client.clinical_table import _label, _number

    text = CLIENT.read_text()
    missing = re.search(r"count as missing when empty or one of (.*?),\s*which", text, re.S)
    assert missing, "the missing-value sentence is gone"
    markers = code_spans(missing.group(1))
    assert markers
    for marker in ["", *markers]:
        value, err = _number(marker, "cea", 1.0)
        assert value is None and "missing" in err, (marker, err)
    assert _number("4,2", "cea", 1.0) == (4.2, ""), "the documented decimal comma"
    slm = clinical_rows()["slm"][2]
    known, unknown = slm.split("unknown:")
    for token in code_spans(known):
        assert _label(token) == (int(float(token)), ""), token
    assert "empty" in unknown
    for token in ["", *code_spans(unknown)]:
        assert _label(token) == (-1, ""), token
    assert _label("2")[1] and _label("yes")[1], "values outside the documented ones must be refused"


def test_clinical_example_is_accepted_as_documented(tmp_path):
    from client.clinical_table import OPTIONAL, REQUIRED, read_clinical_table

    (body,) = [b for info, b in fenced_blocks(CLIENT.read_text()) if info == "csv"]
    assert body[0].split(",") == list(REQUIRED) + list(OPTIONAL)
    path = tmp_path / "clinical.csv"
    path.write_text("\n".join(body) + "\n")
    table = read_clinical_table(path)
    assert table.has_label and len(table.rows) == len(body) - 1
    assert not [r.error for r in table.rows.values() if r.error]
    labels = [r.slm for r in table.rows.values()]
    assert labels == [0, 1, -1], "the example shows outcome 0, 1 and one unknown"
    # a required column taken out of the example is refused, naming it
    import pandas as pd

    from client.clinical_table import ClinicalTableError

    pd.read_csv(path).drop(columns=["ca199"]).to_csv(path, index=False)
    with pytest.raises(ClinicalTableError, match="ca199"):
        read_clinical_table(path)


def test_mask_file_suffixes_match_the_reader():
    from client.volumes import MASK_SUFFIXES

    folder = next(b for info, b in fenced_blocks(CLIENT.read_text()) if any(l.strip().startswith("masks/") for l in b))
    line = next(l for l in folder if l.strip().startswith("masks/")).split(", the tumour", 1)[0]
    documented = re.findall(r"\.[a-z]+(?:\.[a-z]+)?", line)
    assert sorted(documented) == sorted(MASK_SUFFIXES), (documented, MASK_SUFFIXES)


# ---- client/README.md: site.toml against the config schema and the series rules ------------------

def site_preprocessing_keys() -> list[str]:
    """The keys of common/config.py's site preprocessing section (read from its source: the
    section comment is the only place that groups them)."""
    src = (ROOT / "common" / "config.py").read_text()
    section = src.split("# --- site preprocessing", 1)[1]
    section = re.split(r"\n    # ---|\n}", section, maxsplit=1)[0]
    return re.findall(r'^    "([a-z0-9-]+)": Key\(', section, re.M)


def test_site_toml_table_lists_every_site_key_with_its_default_and_choices():
    from common.config import SCHEMA

    header, *rows = table_after(CLIENT.read_text(), "## site.toml reference")
    assert [h.lower() for h in header] == ["key", "default", "allowed", "meaning"]
    documented = [code_spans(r[0])[0] for r in rows]
    expected = site_preprocessing_keys()
    assert len(expected) >= 10, expected
    assert sorted(documented) == sorted(expected), (
        f"undocumented: {sorted(set(expected) - set(documented))}; not site keys: {sorted(set(documented) - set(expected))}")
    for key, row in zip(documented, rows):
        (default,) = code_spans(row[1])
        assert tomllib.loads(f"x = {default}")["x"] == SCHEMA[key].default, (key, default, SCHEMA[key].default)
        if SCHEMA[key].choices:
            assert set(code_spans(row[2])) == set(SCHEMA[key].choices), (key, row[2])


def test_series_rules_table_matches_client_series():
    from client.series import ADC_UNITS, RULE_KEYS, SeriesRules

    text = CLIENT.read_text()
    header, *rows = table_after(text, "`[series-rules]` (client/series.py) adds patterns to the defaults or replaces them:")
    documented = {code_spans(r[0])[0]: r[1] for r in rows}
    assert set(documented) == set(RULE_KEYS)
    assert set(code_spans(documented["adc-unit"])) == set(ADC_UNITS)
    default_b = SeriesRules().min_dwi_b
    assert f"default {default_b:g}" in documented["min-dwi-b"]


def test_site_toml_example_loads(tmp_path):
    from client.series import SeriesRules
    from common.config import load_config

    (body,) = [b for info, b in fenced_blocks(CLIENT.read_text()) if info == "toml"]
    path = tmp_path / "site.toml"
    path.write_text("\n".join(body) + "\n")
    cfg = load_config(toml_path=path)
    SeriesRules(cfg["series-rules"])


# ---- the guides' commands parse with the real CLI --------------------------------------------------

@pytest.mark.parametrize("path", [CLIENT, SIMULATION], ids=lambda p: str(p.relative_to(ROOT)))
def test_guide_commands_and_inline_spans_parse(path):
    dc = _doc_commands_module()
    name = str(path.relative_to(ROOT))
    cmds = dc.checked(dc.doc_commands(name))
    assert cmds, f"{name}: no command found"
    bad = dc.failures(cmds)
    bad += [f"{name}:{no}: `{span}` -> {why}" for no, span in dc.inline_spans(name) if (why := dc.inline_problem(span))]
    assert not bad, "\n".join(bad)


def test_each_guide_shows_its_readers_commands():
    dc = _doc_commands_module()

    def progs(name):
        return {" ".join(c.argv[:2]).rsplit("/", 1)[-1] for c in dc.checked(dc.doc_commands(name))}

    assert {"slmfed prepare", "slmfed predict"} <= progs("client/README.md")
    assert {"slmfed simulate", "flwr run", "slmfed synth"} <= progs("simulation/README.md")
    assert {"slmfed deploy", "slmfed site", "flwr run"} <= progs("deploy/README.md")


# ---- LICENSE and CITATION.cff ------------------------------------------------------------------------

def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and "Copyright 2026 the SLM-Fed authors" in text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def test_citation_cites_the_project_and_the_paper():
    import yaml

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["title"].startswith("SLM-Fed") and cff["authors"] and cff["license"] == "Apache-2.0"
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert str(cff["version"]) == version
    (paper,) = cff["references"]
    assert paper["doi"] == "10.1186/s12880-025-01692-3" and paper["journal"] == "BMC Medical Imaging"
    assert paper["year"] == 2025 and paper["authors"][0]["family-names"] == "Sun"
    assert "synchronous liver metastases" in paper["title"]
