"""report.html: the study's report.md as one self-contained web page, with the figures inline.

The body is report.md itself rendered from Markdown (markdown-it, raw HTML off: any text a site sent
is escaped), so the two cannot disagree; the page around it and the figures come from the jinja2
template server/templates/report.html.j2. Figures are embedded as base64 PNG; the page loads nothing
(a Content-Security-Policy forbids it), so it opens offline for researchers and privacy officers.
"""
from __future__ import annotations

import base64
from pathlib import Path

from common.atomic import atomic_write_text

TEMPLATES = Path(__file__).parent / "templates"
FIGURE_KINDS = (("roc-", "ROC"), ("dca-", "Decision curves"), ("calibration-", "Calibration"),
                ("learning-curves", "Learning curves"))


def _figures(run_dir: Path) -> list[dict]:
    out = []
    for prefix, kind in FIGURE_KINDS:
        for png in sorted(run_dir.glob(f"{prefix}*.png")):
            cohort = png.stem[len(prefix):].replace("--", ": ").replace("-", " ").strip()
            out.append({"title": f"{kind}: {cohort}" if cohort else kind, "file": png.name,
                        "src": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")})
    return out


def render_report_html(run_dir: str | Path, res: dict, markdown_text: str) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("report.html.j2").render(res=res, body=body, figures=_figures(Path(run_dir)))


def write_report_html(run_dir: str | Path, res: dict) -> Path:
    """report.html beside report.md (which must be written first), figures inline."""
    run_dir = Path(run_dir)
    path = run_dir / "report.html"
    atomic_write_text(path, render_report_html(run_dir, res, (run_dir / "report.md").read_text("utf-8")))
    return path
