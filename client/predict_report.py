"""The per-patient risk report of `slmfed predict`: one self-contained HTML file (jinja2 template
client/templates/patient_report.html.j2; images inline as base64 PNG; no script, no external asset,
nothing fetched), for a radiologist to read offline at the site.

Shown: the model's identity, the clinical inputs (out-of-range ones marked), the three models'
probabilities (for an ensemble, the range of its networks' probabilities) with the development
threshold and the development and external-validation sensitivity / specificity at it, the Combined
model's risk group (none for out-of-range inputs unless asked for), the input channels of the ROI crop
with the ROI outline, and the Grad-CAM attention of each DL model over the T2WI crop (with its colour
scale) and the share of attention on the (dilated) ROI.
"""
from __future__ import annotations

import base64
import hashlib
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.atomic import atomic_write_text

TEMPLATES = Path(__file__).parent / "templates"
MODEL_LABEL = {"cf": "CF model", "dl": "MRI DL model", "combined": "Combined DL model"}
CHANNEL_LABEL = {"t2": "T2WI", "dwi": "DWI (high b)", "adc": "ADC"}


def jinja_env():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "j2"]),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def png_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plane(a: np.ndarray) -> np.ndarray:
    """The 2D plane to show: itself, or the centre slice of a 3D crop."""
    a = np.asarray(a)
    while a.ndim > 2:
        a = a[a.shape[0] // 2]
    return a


def channel_figure(image: np.ndarray, roi: np.ndarray | None, channels: list[str]) -> str:
    """The crop's sequences side by side (2.5d: the centre slice of each), ROI outlined in red."""
    shown = [(i, c) for i, c in enumerate(channels) if c in CHANNEL_LABEL] or list(enumerate(channels))
    fig = Figure(figsize=(3.0 * len(shown), 3.2))
    FigureCanvasAgg(fig)
    for j, (i, name) in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), j + 1)
        ax.imshow(_plane(image[i]), cmap="gray", vmin=0, vmax=1.5 if name.startswith("adc") else 1.0)
        if roi is not None and _plane(roi).any():
            ax.contour(_plane(roi), levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(CHANNEL_LABEL.get(name, name))
        ax.axis("off")
    fig.tight_layout()
    return png_data_uri(fig)


def attention_figure(image: np.ndarray, roi: np.ndarray | None, cam: np.ndarray, title: str) -> str:
    """Grad-CAM (scaled to its maximum) over the T2WI crop, ROI outlined."""
    fig = Figure(figsize=(4.2, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(_plane(image[0]), cmap="gray", vmin=0, vmax=1)
    c = _plane(cam)
    top = float(c.max())
    shown = ax.imshow(c / top if top > 0 else c, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    if roi is not None and _plane(roi).any():
        ax.contour(_plane(roi), levels=[0.5], colors="white", linewidths=1.2)
    ax.set_title(title)
    ax.axis("off")
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, ticks=[0, 0.5, 1])
    bar.set_label("attention (share of this map's maximum)", fontsize=8)
    bar.ax.tick_params(labelsize=8)
    fig.tight_layout()
    return png_data_uri(fig)


def report_filename(patient_id: str) -> str:
    """A file name for the patient's report (the site's own ID, made safe for any file system)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", patient_id).strip("._")[:100] or "patient"
    if safe != patient_id:  # two IDs that read alike once made safe keep apart
        safe += "-" + hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:8]
    return f"{safe}.html"


def write_patient_report(out_dir: Path, bundle, res, row, entry: dict, image: np.ndarray, roi: np.ndarray | None,
                         cams: dict[str, np.ndarray], channels: list[str]) -> Path:
    from client.predict import risk_group

    meta = bundle.meta
    dev, ext = meta.get("development", {}), meta.get("external", {})
    models = []
    for m in bundle.models:
        d = dev.get(m, {})
        members = res.member_probs.get(m, [])
        models.append({"label": MODEL_LABEL[m], "p": res.probs.get(m), "threshold": meta["thresholds"].get(m),
                       "members": (min(members), max(members), len(members)) if members else None,
                       "sensitivity": d.get("sensitivity"), "specificity": d.get("specificity"),
                       "dev_n": d.get("n"), "dev_cohorts": ", ".join(d.get("cohorts", [])),
                       "interpolated": d.get("interpolated", False), "external": ext.get(m, []),
                       "group": risk_group(res.probs[m], meta["thresholds"].get(m), bool(res.warnings),
                                           res.allow_out_of_range)})
    attention = [{"label": MODEL_LABEL[m], "figure": attention_figure(image, roi, cams[m], MODEL_LABEL[m]),
                  "in_roi": res.attention_in_roi.get(m),
                  "target": "SLM" if res.probs[m] >= 0.5 else "no SLM"} for m in ("dl", "combined") if m in cams]
    ranges = meta.get("clinical_ranges", {})
    flagged = " ".join(res.warnings)
    clinical = [
        {"name": "Sex", "value": row.sex, "flag": "sex " in flagged},
        {"name": "Tumour site", "value": row.tumor_site, "flag": "tumor_site" in flagged},
        {"name": "CEA (ng/mL)", "value": f"{row.cea:g}", "flag": "CEA" in flagged or "cea " in flagged},
        {"name": "CA19-9 (U/mL)", "value": f"{row.ca199:g}", "flag": "CA19-9" in flagged or "ca199 " in flagged},
    ]
    html = jinja_env().get_template("patient_report.html.j2").render(
        patient_id=res.patient_id, res=res, models=models, attention=attention, clinical=clinical,
        channels_figure=channel_figure(image, roi, channels), identity=bundle.identity(), meta=meta,
        ranges=ranges, entry=entry, risk_threshold=meta["thresholds"].get("combined"),
        pre=meta["preprocessing"], margin_mm=_margin(), cam_layer="second-to-last")
    path = Path(out_dir) / "reports" / report_filename(res.patient_id)
    atomic_write_text(path, html)
    return path


def _margin() -> float:
    from client.predict import DILATE_MM

    return DILATE_MM
