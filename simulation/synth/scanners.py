"""Scanner profiles and cohort presets: how two (or N) hospitals' MRI exams differ.

A scanner fixes what a site's DICOM looks like: vendor naming, voxel grids (T2WI fine, DWI/ADC
coarser, as in real exams), b-values, intensity scale, noise, how ADC is stored, slice and file
order. Presets fix the grid sizes (paper / small / tiny) and the centres' populations.

ADC storage (documented choice): the *rescaled* value, stored * RescaleSlope + RescaleIntercept,
is always ADC in 1e-6 mm^2/s (the unit Siemens and GE display). Siemens-like profiles store it
directly (slope 1); the GE-like and Philips-like profiles store ADC * 10 with slope 0.1, so a
reader that ignores RescaleSlope is off by 10x.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .model import Population


@dataclass(frozen=True)
class Grid:
    """A stack of axial slices: matrix (columns, rows, slices) and spacing in mm."""

    columns: int
    rows: int
    slices: int
    pixel_mm: float  # in-plane, square pixels
    thickness_mm: float  # SliceThickness
    spacing_mm: float  # SpacingBetweenSlices (centre to centre; > thickness means a gap)

    def __post_init__(self) -> None:
        if min(self.columns, self.rows, self.slices) < 2:
            raise ValueError(f"grid matrix: expected at least 2 in every direction, found {self}")
        if min(self.pixel_mm, self.thickness_mm, self.spacing_mm) <= 0:
            raise ValueError(f"grid spacing: expected positive mm values, found {self}")

    def scaled(self, factor: float, slice_factor: float = 1.0) -> "Grid":
        """Same FOV on a matrix `factor` times smaller (used to derive small/tiny presets)."""
        cols = max(2, round(self.columns / factor))
        return replace(
            self,
            columns=cols,
            rows=max(2, round(self.rows / factor)),
            slices=max(2, round(self.slices / slice_factor)),
            pixel_mm=round(self.pixel_mm * self.columns / cols, 3),
            thickness_mm=round(self.thickness_mm * slice_factor, 3),
            spacing_mm=round(self.spacing_mm * slice_factor, 3),
        )

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        return (self.columns * self.pixel_mm, self.rows * self.pixel_mm, self.slices * self.spacing_mm)


@dataclass(frozen=True)
class Scanner:
    """Everything that makes one hospital's exams look like its scanner's."""

    key: str
    manufacturer: str
    model_name: str
    field_t: float
    t2: Grid
    dwi: Grid
    t2_description: str
    dwi_description: str
    adc_description: str
    b_values: tuple[float, ...]
    t2_scale: float  # stored T2 value per unit of phantom T2 signal
    dwi_scale: float
    t2_noise: float  # Rician sigma as a fraction of fat's T2 signal
    dwi_noise: float  # Rician sigma as a fraction of rectal wall's b0 signal
    adc_slope: float  # RescaleSlope of the ADC series (rescaled value = ADC in 1e-6 mm^2/s)
    dwi_interleaved: bool  # GE style: b-values alternate per slice position
    descending_slices: bool  # instance 1 is the most superior slice
    file_style: str  # "flat-dcm" (one folder, .dcm) or "series-noext" (folder per series, no extension)
    dwi_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # DWI FOV centre relative to T2's
    t2_tr_te: tuple[float, float] = (4000.0, 100.0)
    dwi_tr_te: tuple[float, float] = (4500.0, 70.0)

    def __post_init__(self) -> None:
        if len(self.b_values) < 2 or sorted(self.b_values) != list(self.b_values) or self.b_values[-1] < 600:
            raise ValueError(f"scanner {self.key}: b_values must be >= 2 ascending values ending >= 600, found {self.b_values}")
        if self.file_style not in ("flat-dcm", "series-noext"):
            raise ValueError(f"scanner {self.key}: unknown file_style {self.file_style!r}")

    def describe(self) -> dict:
        """The scanner parameters truth.json records."""
        return {
            "key": self.key,
            "manufacturer": self.manufacturer,
            "model": self.model_name,
            "field_strength_t": self.field_t,
            "series_descriptions": {"t2": self.t2_description, "dwi": self.dwi_description, "adc": self.adc_description},
            "b_values": list(self.b_values),
            "t2_grid": _grid_dict(self.t2),
            "dwi_grid": _grid_dict(self.dwi),
            "t2_scale": self.t2_scale,
            "dwi_scale": self.dwi_scale,
            "t2_noise": self.t2_noise,
            "dwi_noise": self.dwi_noise,
            "adc_rescale_slope": self.adc_slope,
            "adc_unit": "1e-6 mm^2/s (after RescaleSlope/Intercept)",
            "dwi_interleaved": self.dwi_interleaved,
            "descending_slices": self.descending_slices,
            "file_style": self.file_style,
        }


def _grid_dict(g: Grid) -> dict:
    return {
        "matrix": [g.columns, g.rows, g.slices],
        "pixel_mm": g.pixel_mm,
        "thickness_mm": g.thickness_mm,
        "spacing_mm": g.spacing_mm,
    }


# Paper-size scanners. Pixel sizes are a cropped pelvic FOV (~100 mm) around the rectum.
SIEMENS_3T = Scanner(
    key="siemens-skyra-3t", manufacturer="SIEMENS", model_name="Skyra", field_t=3.0,
    t2=Grid(128, 128, 22, 0.8, 3.0, 3.3), dwi=Grid(64, 64, 15, 1.6, 4.5, 5.0),
    t2_description="t2_tse_tra", dwi_description="ep2d_diff_b0_800_tra", adc_description="ep2d_diff_b0_800_tra_ADC",
    b_values=(0.0, 800.0), t2_scale=1.0, dwi_scale=1.0, t2_noise=0.025, dwi_noise=0.05, adc_slope=1.0,
    dwi_interleaved=False, descending_slices=True, file_style="flat-dcm", dwi_offset_mm=(1.6, -2.4, 1.5),
)
GE_15T = Scanner(
    key="ge-signa-1.5t", manufacturer="GE MEDICAL SYSTEMS", model_name="Signa HDxt", field_t=1.5,
    t2=Grid(144, 144, 21, 0.7, 3.5, 3.5), dwi=Grid(56, 56, 19, 1.8, 4.0, 4.0),
    t2_description="Ax T2 FRFSE", dwi_description="DWI b1000", adc_description="dADC",
    b_values=(0.0, 1000.0), t2_scale=3.1, dwi_scale=0.45, t2_noise=0.04, dwi_noise=0.08, adc_slope=0.1,
    dwi_interleaved=True, descending_slices=False, file_style="series-noext", dwi_offset_mm=(-2.0, 3.0, -2.0),
    t2_tr_te=(3500.0, 90.0), dwi_tr_te=(5000.0, 75.0),
)
PHILIPS_3T = Scanner(
    key="philips-ingenia-3t", manufacturer="Philips Medical Systems", model_name="Ingenia", field_t=3.0,
    t2=Grid(128, 128, 20, 0.78, 3.0, 3.0), dwi=Grid(60, 60, 15, 1.7, 4.0, 4.4),
    t2_description="T2W_TSE_tra", dwi_description="DWI_b0_1000_SENSE", adc_description="dADC_DWI_b0_1000",
    b_values=(0.0, 1000.0), t2_scale=1.8, dwi_scale=0.7, t2_noise=0.03, dwi_noise=0.06, adc_slope=0.1,
    dwi_interleaved=False, descending_slices=False, file_style="flat-dcm", dwi_offset_mm=(0.8, 1.5, 2.2),
)
SIEMENS_15T = Scanner(
    key="siemens-aera-1.5t", manufacturer="SIEMENS", model_name="Aera", field_t=1.5,
    t2=Grid(120, 120, 18, 0.85, 3.5, 3.8), dwi=Grid(56, 56, 14, 1.8, 5.0, 5.0),
    t2_description="t2_tse_tra_p2", dwi_description="ep2d_diff_b0_400_800", adc_description="ep2d_diff_b0_400_800_ADC",
    b_values=(0.0, 400.0, 800.0), t2_scale=0.8, dwi_scale=1.3, t2_noise=0.035, dwi_noise=0.07, adc_slope=1.0,
    dwi_interleaved=False, descending_slices=True, file_style="series-noext", dwi_offset_mm=(-1.2, -1.0, 0.0),
)
SCANNERS: tuple[Scanner, ...] = (SIEMENS_3T, GE_15T, PHILIPS_3T, SIEMENS_15T)

PRESETS: dict[str, dict] = {
    # sizes: (primary, external); grid_factor shrinks the matrix at the same FOV (pixels grow)
    "paper": {"sizes": (176, 31), "grid_factor": 1.0, "slice_factor": 1.0},
    "small": {"sizes": (28, 12), "grid_factor": 1.5, "slice_factor": 1.25},
    "tiny": {"sizes": (8, 4), "grid_factor": 2.0, "slice_factor": 1.6},
}


@dataclass(frozen=True)
class SiteSpec:
    """One site folder to generate."""

    name: str  # folder name
    id_prefix: str  # patient IDs are f"{id_prefix}-{k:04d}", unique across sites
    n: int
    population: Population
    scanner: Scanner


def _resize(scanner: Scanner, preset: str) -> Scanner:
    p = PRESETS[preset]
    if p["grid_factor"] == 1.0 and p["slice_factor"] == 1.0:
        return scanner
    return replace(
        scanner,
        t2=scanner.t2.scaled(p["grid_factor"], p["slice_factor"]),
        dwi=scanner.dwi.scaled(p["grid_factor"], p["slice_factor"]),
    )


def site_specs(preset: str = "paper", sites: int | None = None, seed: int = 0) -> list[SiteSpec]:
    """The sites of a preset: two centres, or `sites` non-identically distributed hospitals."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, found {preset!r}")
    if sites is None:
        n1, n2 = PRESETS[preset]["sizes"]
        return [
            SiteSpec("center-primary", "P1", n1, Population(0.40), _resize(SIEMENS_3T, preset)),
            SiteSpec("center-external", "P2", n2, Population(0.35, p_male=0.58, p_site=(0.38, 0.36, 0.26)),
                     _resize(GE_15T, preset)),
        ]
    if not isinstance(sites, int) or not 1 <= sites <= 99:
        raise ValueError(f"sites: expected an integer from 1 to 99, found {sites!r}")
    # A larger population split unevenly: sizes ~ Dirichlet, prevalence and case mix vary per site.
    rng = np.random.default_rng([seed, 7919, sites])
    per_site = {"paper": 80, "small": 16, "tiny": 6}[preset]
    total = max(sum(PRESETS[preset]["sizes"]), per_site * sites)
    floor = max(4, per_site // 4)
    weights = rng.dirichlet(np.full(sites, 2.0))
    sizes = floor + np.floor(weights * (total - floor * sites)).astype(int)
    sizes[np.argmax(weights)] += total - int(sizes.sum())
    specs = []
    for k in range(sites):
        p_site = rng.dirichlet([8.0, 7.0, 5.0])
        pop = Population(float(rng.uniform(0.25, 0.50)), p_male=float(rng.uniform(0.5, 0.7)), p_site=tuple(p_site / p_site.sum()))
        base = SCANNERS[k % len(SCANNERS)]
        jitter = float(rng.uniform(0.8, 1.25))
        scanner = replace(
            base, key=f"{base.key}#{k + 1}", t2_scale=round(base.t2_scale * jitter, 3),
            t2_noise=round(base.t2_noise * float(rng.uniform(0.8, 1.3)), 4),
            dwi_noise=round(base.dwi_noise * float(rng.uniform(0.8, 1.3)), 4),
        )
        specs.append(SiteSpec(f"site-{k + 1:02d}", f"S{k + 1:02d}", int(sizes[k]), pop, _resize(scanner, preset)))
    return specs
