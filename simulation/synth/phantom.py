"""A digital pelvis phantom: tissue maps in world (patient LPS, mm) coordinates.

The anatomy and the tumour are continuous functions of position, so the fine T2 grid and the coarse
DWI grid sample the same patient without any resampling here (the reader has to resample). Each
structure blends in with a soft edge (partial volume). The tumour sits in the rectal wall and its
look follows the four latent image features (see `model.py`):
    volume        -> size of an ellipsoid elongated along the wall
    irregularity  -> amplitude of random low-order lobulation of its margin
    adc           -> lower mean ADC (denser cells), brighter on high-b DWI
    heterogeneity -> amplitude of a random texture in ADC and T2
The maps are noise-free tissue properties; `acquire` adds the scanner (scale, bias, Rician noise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, ndtr

from .scanners import Grid, Scanner

# tissue: (T2 signal, DWI b0 signal, ADC in 1e-6 mm^2/s)
TISSUES: dict[str, tuple[float, float, float]] = {
    "pelvic_fat": (950.0, 40.0, 600.0),
    "muscle": (280.0, 220.0, 1400.0),
    "marrow": (700.0, 120.0, 500.0),
    "cortex": (60.0, 20.0, 800.0),
    "urine": (1800.0, 1100.0, 2900.0),
    "meso_fat": (1000.0, 40.0, 600.0),
    "fascia": (220.0, 100.0, 1200.0),
    "muscularis": (300.0, 380.0, 1550.0),
    "mucosa": (650.0, 450.0, 1650.0),
    "gas": (30.0, 10.0, 2000.0),
    "gel": (1600.0, 800.0, 2600.0),
}
TUMOUR_T2 = 520.0
TUMOUR_S0 = 620.0
EDGE_MM = 0.5  # width of the soft tissue boundaries


@dataclass(frozen=True)
class TumourLook:
    """Physical tumour parameters, monotone in the latent image features."""

    volume_ml: float
    irregularity: float  # relative RMS lobulation of the margin
    adc: float  # mean ADC, 1e-6 mm^2/s
    heterogeneity: float  # relative SD of the texture

    @classmethod
    def from_features(cls, f: np.ndarray, sd_image: float) -> "TumourLook":
        u = np.asarray(f, dtype=np.float64) / math.sqrt(1.0 + sd_image**2)  # ~N(0, 1) marginally
        squash = 2.5 * np.tanh(u / 2.5)  # monotone, bounded: keeps the tumour in the FOV
        return cls(
            volume_ml=float(6.0 * np.exp(0.6 * squash[0])),
            irregularity=float(0.03 + 0.22 * ndtr(u[1])),
            adc=float(1000.0 - 140.0 * squash[2]),
            heterogeneity=float(0.04 + 0.30 * ndtr(u[3])),
        )

    def as_dict(self) -> dict:
        return {"volume_ml": self.volume_ml, "irregularity": self.irregularity, "adc_mean": self.adc,
                "heterogeneity": self.heterogeneity}


class Patient:
    """One patient's anatomy + tumour, drawn from `rng` (nuisance only: nothing here depends on SLM)."""

    def __init__(self, look: TumourLook, rng: np.random.Generator):
        self.look = look
        u = rng.uniform
        # rectum: elliptic lumen, slightly tilted axis, gas or gel filling
        self.rect_c = np.array([u(-6, 6), u(-4, 6)])
        self.rect_tilt = np.array([u(-0.15, 0.15), u(-0.25, 0.05)])
        self.lumen_ab = np.array([u(7, 11), u(6, 10)])
        self.wall = u(3.0, 4.5)
        self.gel = bool(rng.random() < 0.5)
        self.meso_ab = np.array([u(26, 32), u(24, 30)])
        self.meso_dy = u(3, 7)  # mesorectum is thicker posteriorly
        self.bladder = np.array([u(-6, 6), u(-52, -44), u(24, 34), u(14, 20)])
        self.sacrum = np.array([u(-4, 4), u(44, 52), u(40, 50), u(9, 13)])
        self.muscle_x = u(38, 46)
        self.femur_x = u(56, 64)
        # tumour: position on the wall, shape axes, lobulation harmonics, texture waves
        self.theta = u(0, 2 * math.pi)
        self.tz = u(-4, 4)
        r = (3 * look.volume_ml * 1000 / (4 * math.pi)) ** (1 / 3)
        self.axes = np.array([0.75, 1.15, 1.16]) * r  # radial, tangential, along z
        self.harm = [(int(rng.integers(2, 7)), int(rng.integers(0, 4)), u(0, 2 * math.pi), u(0, 2 * math.pi),
                      1.0 / math.sqrt(k + 1)) for k in range(6)]
        self.harm_norm = math.sqrt(sum(a * a for *_, a in self.harm) / 4.0)
        self.tex = _waves(rng, 20, 2.5, 8.0)
        self.bg_tex = _waves(rng, 4, 8.0, 25.0)
        self.bias = rng.normal(0, 0.12, size=4)

    def axis_at(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.rect_c[0] + self.rect_tilt[0] * z, self.rect_c[1] + self.rect_tilt[1] * z

    def tumour_centre(self) -> np.ndarray:
        cx, cy = self.axis_at(np.array(self.tz))
        rad = float(np.mean(self.lumen_ab)) + self.wall / 2
        return np.array([cx + rad * math.cos(self.theta), cy + rad * math.sin(self.theta), self.tz])

    def tissue_maps(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
        """T2, b0 and ADC property maps and the tumour 'inside' score (mm inside the margin).

        x, y, z are 1-D coordinate arrays shaped (1, 1, nx), (1, ny, 1), (nz, 1, 1). Structures
        that do not change along z are painted once in 2-D; every structure is painted only inside
        its bounding box (the soft edge is negligible 3 mm out).
        """
        nz, ny, nx = z.shape[0], y.shape[1], x.shape[2]
        xs, ys = x.ravel(), y.ravel()
        plane = np.empty((3, 1, ny, nx), dtype=np.float32)
        plane[:] = np.asarray(TISSUES["pelvic_fat"], dtype=np.float32)[:, None, None, None]
        for sx in (-1, 1):
            _paint(plane, "muscle", x, y, sx * self.muscle_x, 4, 10, 26)
            _paint(plane, "cortex", x, y, sx * self.femur_x, -2, 22, 22)
            _paint(plane, "marrow", x, y, sx * self.femur_x, -2, 19, 19)
        bx, by, ba, bb = self.sacrum
        _paint(plane, "cortex", x, y, bx, by, ba, bb)
        _paint(plane, "marrow", x, y, bx, by, ba - 2.5, bb - 2.5)
        props = np.repeat(plane, nz, axis=1)
        qx, qy, qa, qb = self.bladder
        shrink = np.clip(1 - (z / 70.0) ** 2, 0.3, 1)
        _paint(props, "muscle", x, y, qx, qy, qa * shrink + 2, qb * shrink + 2, box=(qa + 2, qb + 2))
        _paint(props, "urine", x, y, qx, qy, qa * shrink, qb * shrink, box=(qa, qb))
        cx, cy = self.axis_at(z)
        ma, mb = self.meso_ab
        la, lb = self.lumen_ab
        layers = [("fascia", self.meso_dy, ma + 1.2, mb + 1.2), ("meso_fat", self.meso_dy, ma, mb),
                  ("muscularis", 0, la + self.wall, lb + self.wall), ("mucosa", 0, la + 1.3, lb + 1.3),
                  ("gel" if self.gel else "gas", 0, la, lb)]
        for tissue, dy, a, b in layers:
            _paint(props, tissue, x, y, cx, cy + dy, a, b, box=(a, b))
        props[0] *= 1 + 0.03 * _field(self.bg_tex, x, y, z)

        inside = np.full((nz, ny, nx), -1e3, dtype=np.float32)
        c = self.tumour_centre()
        reach = float(np.max(self.axes)) * (1 + 3 * self.look.irregularity) + 3 * EDGE_MM
        bx_, by_, bz_ = (_span(v, ci - reach, ci + reach) for v, ci in ((xs, c[0]), (ys, c[1]), (z.ravel(), c[2])))
        if all(b.stop > b.start for b in (bx_, by_, bz_)):
            sub = (x[:, :, bx_], y[:, by_, :], z[bz_])
            ins, member = self._tumour(*sub)
            inside[bz_, by_, bx_] = ins
            tex = _field(self.tex, *sub)
            h = self.look.heterogeneity
            tumour = (TUMOUR_T2 * (1 + 0.9 * h * tex), TUMOUR_S0 * (1 + 0.3 * h * tex),
                      np.maximum(self.look.adc * (1 - h * tex), 250.0))
            for i, v in enumerate(tumour):
                region = props[i, bz_, by_, bx_]
                props[i, bz_, by_, bx_] = region * (1 - member) + v * member
        return props[0], props[1], props[2], inside

    def _tumour(self, x, y, z):
        c = self.tumour_centre()
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        ct, st = math.cos(self.theta), math.sin(self.theta)
        rad, tan = dx * ct + dy * st, -dx * st + dy * ct
        a, b, cz = self.axes
        pr, pt, pz = rad / a, tan / b, dz / cz
        rho = np.sqrt(pr**2 + pt**2 + pz**2) + 1e-9
        phi = np.arctan2(pt, pr)
        psi = np.arcsin(np.clip(pz / rho, -1, 1))
        g = sum(amp * np.cos(n * phi + p1) * np.cos(m * psi + p2) for n, m, p1, p2, amp in self.harm)
        boundary = 1 + self.look.irregularity * g / self.harm_norm
        inside = (boundary - rho) * float(np.min(self.axes))  # ~ mm inside the margin
        return inside, expit(inside / EDGE_MM * 4)

    def bias_field(self, x, y) -> np.ndarray:
        """Smooth multiplicative coil shading (same for T2 and DWI; it cancels in ADC)."""
        a = self.bias
        return np.exp(a[0] * x / 60 + a[1] * y / 60 + a[2] * (x / 60) ** 2 + a[3] * x * y / 3600)


def _ellipse(x, y, a, b) -> np.ndarray:
    """Soft membership of an ellipse (1 inside, 0 outside, EDGE_MM transition)."""
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    return expit((1 - r) * np.minimum(a, b) / EDGE_MM * 4).astype(np.float32)


def _span(v: np.ndarray, lo, hi) -> slice:
    """Index range of the sorted 1-D coordinates v that fall in [min(lo), max(hi)]."""
    lo, hi = float(np.min(lo)), float(np.max(hi))
    return slice(int(np.searchsorted(v, lo)), int(np.searchsorted(v, hi, side="right")))


def _paint(props, tissue, x, y, cx, cy, a, b, box=None) -> None:
    """Blend `tissue` into props (3, z, y, x) inside a soft ellipse centred (cx, cy), in place.

    cx, cy, a, b may vary along z (arrays shaped (nz, 1, 1)); `box` gives the largest half-axes
    when they do, so the work stays inside the ellipse's bounding box.
    """
    ha, hb = box if box is not None else (a, b)
    m = 3 * EDGE_MM
    bx = _span(x.ravel(), np.asarray(cx) - ha - m, np.asarray(cx) + ha + m)
    by = _span(y.ravel(), np.asarray(cy) - hb - m, np.asarray(cy) + hb + m)
    if bx.stop <= bx.start or by.stop <= by.start:
        return
    member = _ellipse(x[..., bx] - cx, y[:, by, :] - cy, a, b)
    vals = np.asarray(TISSUES[tissue], dtype=np.float32)
    for i in range(3):
        region = props[i, :, by, bx]
        props[i, :, by, bx] = region + (vals[i] - region) * member


def _waves(rng: np.random.Generator, k: int, lo_mm: float, hi_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Random plane waves for a smooth unit-variance random field."""
    d = rng.standard_normal((k, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    wl = rng.uniform(lo_mm, hi_mm, size=k)
    return d * (2 * math.pi / wl)[:, None], rng.uniform(0, 2 * math.pi, size=k)


def _field(waves, x, y, z) -> np.ndarray:
    """Sum of plane waves, each built from per-axis complex exponentials (cheap broadcasting)."""
    kv, ph = waves
    out = 0.0
    for (kx, ky, kz), p in zip(kv, ph):
        ex = np.exp(1j * (kx * x + p)).astype(np.complex64)
        ey = np.exp(1j * ky * y).astype(np.complex64)
        ez = np.exp(1j * kz * z).astype(np.complex64)
        out = out + ((ex * ey) * ez).real
    return out * np.float32(math.sqrt(2.0 / len(ph)))


@dataclass(frozen=True)
class Placement:
    """Where a grid sits in the patient: world position of voxel (0, 0, 0) (LPS mm, identity axes)."""

    origin: tuple[float, float, float]

    @classmethod
    def centred(cls, grid: Grid, centre: np.ndarray) -> "Placement":
        fx, fy, _ = grid.fov_mm
        zext = (grid.slices - 1) * grid.spacing_mm
        # rounded to 0.001 mm so the DICOM DS strings and the mask header carry the same numbers
        return cls((round(float(centre[0] - (fx - grid.pixel_mm) / 2), 3),
                    round(float(centre[1] - (fy - grid.pixel_mm) / 2), 3),
                    round(float(centre[2] - zext / 2), 3)))


def grid_points(grid: Grid, place: Placement, sub: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World coordinates (z, y, x order arrays broadcastable to (slices, rows, cols)), sub-sampled.

    With sub > 1 each voxel is sampled at sub x sub x sub points spread over its extent (slice
    thickness along z); callers average blocks back to one value per voxel (partial volume).
    """
    off = (np.arange(sub) + 0.5) / sub - 0.5
    xs = place.origin[0] + (np.arange(grid.columns)[:, None] + off).ravel() * grid.pixel_mm
    ys = place.origin[1] + (np.arange(grid.rows)[:, None] + off).ravel() * grid.pixel_mm
    zs = place.origin[2] + (np.arange(grid.slices)[:, None] * grid.spacing_mm + off * grid.thickness_mm).ravel()
    return xs[None, None, :], ys[None, :, None], zs[:, None, None]


def _block_mean(a: np.ndarray, sub: int) -> np.ndarray:
    if sub == 1:
        return a
    s, r, c = (n // sub for n in a.shape)
    return a.reshape(s, sub, r, sub, c, sub).mean(axis=(1, 3, 5))


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    re = signal + rng.normal(0, sigma, signal.shape)
    im = rng.normal(0, sigma, signal.shape)
    return np.hypot(re, im)


@dataclass
class Exam:
    """What the scanner produced: volumes in (slices, rows, cols) order, ascending z."""

    t2: np.ndarray  # float, scanner units
    t2_place: Placement
    mask: np.ndarray  # uint8 on the T2 grid
    dwi: dict[float, np.ndarray]  # b-value -> float volume on the DWI grid
    adc: np.ndarray  # ADC in 1e-6 mm^2/s on the DWI grid
    dwi_place: Placement


def acquire(patient: Patient, scanner: Scanner, rng: np.random.Generator, dwi_sub: int = 2) -> Exam:
    """Render the patient on the scanner's T2 and DWI grids, with bias field and Rician noise."""
    centre = np.array([patient.rect_c[0], patient.rect_c[1], 0.0]) * 0.5  # FOV roughly on the rectum
    t2_place = Placement.centred(scanner.t2, centre)
    x, y, z = grid_points(scanner.t2, t2_place)
    t2, _, _, inside = patient.tissue_maps(x, y, z)
    fat = TISSUES["pelvic_fat"][0]
    t2 = t2 * patient.bias_field(x, y) * scanner.t2_scale
    t2 = _rician(rng, t2, scanner.t2_noise * fat * scanner.t2_scale)
    mask = (inside > 0).astype(np.uint8)

    dwi_place = Placement.centred(scanner.dwi, centre + np.asarray(scanner.dwi_offset_mm))
    x, y, z = grid_points(scanner.dwi, dwi_place, dwi_sub)
    _, s0, adc_true, _ = patient.tissue_maps(x, y, z)
    s0 = s0 * patient.bias_field(x, y) * scanner.dwi_scale
    sigma = scanner.dwi_noise * TISSUES["muscularis"][1] * scanner.dwi_scale
    dwi = {b: _rician(rng, _block_mean(s0 * np.exp(-b * adc_true * 1e-6), dwi_sub), sigma) for b in scanner.b_values}
    return Exam(t2, t2_place, mask, dwi, scanner_adc(dwi, sigma), dwi_place)


def scanner_adc(dwi: dict[float, np.ndarray], sigma: float) -> np.ndarray:
    """Mono-exponential ADC from the lowest and highest b, as the console computes it.

    Voxels whose low-b signal is under 3 noise SDs are set to 0 (vendors mask the background),
    and values are clipped to 0..4000 (1e-6 mm^2/s).
    """
    lo, hi = min(dwi), max(dwi)
    s_lo, s_hi = np.maximum(dwi[lo], 1e-3), np.maximum(dwi[hi], 1e-3)
    adc = np.log(s_lo / s_hi) / (hi - lo) * 1e6
    adc = np.clip(adc, 0, 4000)
    adc[dwi[lo] < 3 * sigma] = 0
    return adc
