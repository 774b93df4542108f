"""report.html: the study's report.md as one self-contained web page, with the figures inline.

The body is report.md itself rendered from Markdown (markdown-it, raw HTML off: any text a site sent
is escaped), so the two cannot disagree; the page around it and the figures come from the jinja2
template PAGE below. Figures are embedded as base64 PNG; the page loads nothing (a
Content-Security-Policy forbids it), so it opens offline for researchers and privacy officers.

The template is a string in this module, not a template file: the ServerApp writes this page, and
Flower 1.42 packs only *.py, *.toml, *.md, *.yaml/yml, *.json/jsonl into the app bundle (FAB) that
`flwr run` ships, so a .j2 file beside the code would be missing wherever the app runs from a FAB.
"""
from __future__ import annotations

import base64
from pathlib import Path

from common.atomic import atomic_write_text

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>SLM prediction study {{ res.study_id }} ({{ res.scenario }})</title>
<style>
body { font-family: sans-serif; margin: 1.5em auto; color: #222; max-width: 1200px; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #eee; }
code { background: #f4f4f4; padding: 0 0.2em; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; width: 520px; vertical-align: top; }
figure img { width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
.small { font-size: 0.85em; color: #555; }
</style>
</head>
<body>
<main id="report">
{{ body|safe }}
</main>
{% if figures %}
<section id="figures">
<h2>Figures (inline)</h2>
{% for f in figures %}
<figure><img alt="{{ f.title }}" src="{{ f.src }}"><figcaption>{{ f.title }} (<code>{{ f.file }}</code>)</figcaption></figure>
{% endfor %}
</section>
{% endif %}
<p class="small">Self-contained copy of report.md with its figures; rendered by slmfed {{ res.versions.get('slmfed', '') }}. Nothing on this page is loaded from elsewhere.</p>
</body>
</html>
"""
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
    from jinja2 import DictLoader, Environment
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    env = Environment(loader=DictLoader({"report.html": PAGE}), autoescape=True)
    return env.get_template("report.html").render(res=res, body=body, figures=_figures(Path(run_dir)))


def write_report_html(run_dir: str | Path, res: dict) -> Path:
    """report.html beside report.md (which must be written first), figures inline."""
    run_dir = Path(run_dir)
    path = run_dir / "report.html"
    atomic_write_text(path, render_report_html(run_dir, res, (run_dir / "report.md").read_text("utf-8")))
    return path
