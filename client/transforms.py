"""MONAI dictionary transforms that turn aligned volumes into the model input.

Input dict: "t2", "dwi", "adc" (float32 arrays z, y, x on the T2 grid; ADC in mm^2/s), "mask"
(uint8, same grid) and "spacing" (x, y, z in mm). The chain:
    RoiCentred            largest-ROI slice (2d / 2.5d) or ROI centroid (3d), in voxel indices
    PhysicalFovCropd      a fixed physical field of view (fov-mm) around that centre, sampled to
                          crop-size x crop-size, so every scanner's pixel size maps to the same crop
    ScaleIntensityRangePercentilesd (T2, DWI)  1st-99th percentile of the crop -> [0, 1]
    AdcScaled             ADC / 3e-3 mm^2/s clipped to [0, 1.5] (physical units, comparable across sites)
    ConcatItemsd          channels T2, DWI, ADC (2.5d: each sequence's slices -1..+1 in a row), then
                          with mask-channel the ROI mask itself (0/1, same slices): the model sees the
                          outline it is asked about instead of having to find the tumour, and can pool
                          inside it (common/model.py roi-pooling)
The crop is centred on the ROI centroid itself (sub-voxel), at pixel (size-1)/2 of the crop.
"""
from __future__ import annotations

import numpy as np
from monai.transforms import Compose, ConcatItemsd, MapTransform, ScaleIntensityRangePercentilesd, ToNumpyd
from scipy.ndimage import map_coordinates

SEQUENCES = ("t2", "dwi", "adc")
ADC_REF_MM2_S = 3e-3
ADC_MAX_SCALED = 1.5


def _inputs(mask_channel: bool) -> tuple[str, ...]:
    return SEQUENCES + ("mask",) if mask_channel else SEQUENCES


def channel_names(mode: str, context: int, mask_channel: bool = False) -> list[str]:
    if mode == "2.5d":
        offs = [f"{o:+d}" if o else "" for o in range(-context, context + 1)]
        return [f"{s}{o}" for s in _inputs(mask_channel) for o in offs]
    return list(_inputs(mask_channel))


def image_shape(mode: str, size: int, depth: int, context: int, mask_channel: bool = False) -> list[int]:
    n = len(_inputs(mask_channel))
    if mode == "3d":
        return [n, depth, size, size]
    if mode == "2.5d":
        return [n * (2 * context + 1), size, size]
    return [n, size, size]


class RoiCentred(MapTransform):
    """Find where to crop: "roi_centre" = (z, y, x) voxel indices; "roi_slice" = its slice."""

    def __init__(self, mask_key: str = "mask", mode: str = "2d"):
        super().__init__([mask_key])
        self.mask_key, self.mode = mask_key, mode

    def __call__(self, data):
        d = dict(data)
        m = np.asarray(d[self.mask_key]) > 0
        if self.mode == "3d":
            zyx = np.argwhere(m).mean(axis=0)
            z = int(round(zyx[0]))
            centre = (float(z), float(zyx[1]), float(zyx[2]))
        else:
            area = m.reshape(m.shape[0], -1).sum(axis=1)
            z = int(np.argmax(area))  # first slice of maximal area on ties
            yx = np.argwhere(m[z]).mean(axis=0)
            centre = (float(z), float(yx[0]), float(yx[1]))
        d["roi_centre"], d["roi_slice"] = centre, z
        d["roi_area_mm2"] = float(m[z].sum() * d["spacing"][0] * d["spacing"][1])
        return d


class PhysicalFovCropd(MapTransform):
    """Sample a fov_mm x fov_mm in-plane window around "roi_centre" onto size x size pixels.

    2d: one slice -> (1, size, size); 2.5d: slices z-c..z+c -> (2c+1, size, size);
    3d: depth slices around z -> (1, depth, size, size). Slices beyond the volume repeat the edge
    slice; in-plane points beyond the field of view are 0. Masks use nearest neighbour.
    """

    def __init__(self, keys, fov_mm: float, size: int, mode: str = "2d", context: int = 1, depth: int = 32,
                 nearest_keys=("mask",)):
        super().__init__(keys)
        self.fov, self.size, self.mode, self.context, self.depth = fov_mm, size, mode, context, depth
        self.nearest = set(nearest_keys)

    def _slices(self, z: int, nz: int) -> np.ndarray:
        if self.mode == "2d":
            offs = np.array([0])
        elif self.mode == "2.5d":
            offs = np.arange(-self.context, self.context + 1)
        else:
            offs = np.arange(self.depth) - self.depth // 2
        return np.clip(z + offs, 0, nz - 1)

    def __call__(self, data):
        d = dict(data)
        zc, yc, xc = d["roi_centre"]
        sx, sy = d["spacing"][0], d["spacing"][1]
        step = self.fov / self.size
        u = (np.arange(self.size) - (self.size - 1) / 2.0) * step
        ys, xs = yc + u / sy, xc + u / sx
        for key in self.key_iterator(d):
            vol = np.asarray(d[key])
            zs = self._slices(int(round(zc)), vol.shape[0])
            zz, yy, xx = np.meshgrid(zs, ys, xs, indexing="ij")
            order = 0 if key in self.nearest else 1
            out = map_coordinates(vol.astype(np.float32, copy=False), [zz, yy, xx], order=order, mode="constant", cval=0.0)
            out = out.astype(np.float32)
            d[key] = out[None] if self.mode == "3d" else out
        return d


class AdcScaled(MapTransform):
    """ADC in mm^2/s -> ADC / 3e-3 clipped to [0, 1.5]: a fixed physical scale, not per-image."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = np.clip(np.asarray(d[key], dtype=np.float32) / ADC_REF_MM2_S, 0.0, ADC_MAX_SCALED)
        return d


class MaskChanneld(MapTransform):
    """The cropped ROI as a float32 0/1 channel under `out_key` (the uint8 "mask" stays for the cache)."""

    def __init__(self, key: str, out_key: str):
        super().__init__([key])
        self.out_key = out_key

    def __call__(self, data):
        d = dict(data)
        d[self.out_key] = (np.asarray(d[self.keys[0]]) > 0).astype(np.float32)
        return d


def build_input_transform(mode: str = "2d", fov_mm: float = 48.0, size: int = 64, depth: int = 32,
                          context: int = 1, mask_channel: bool = False) -> Compose:
    """The crop/normalise chain; output key "image" (float32, channels first) plus "mask" crop."""
    if mode not in ("2d", "2.5d", "3d"):
        raise ValueError(f"input-mode: expected 2d, 2.5d or 3d, found {mode!r}")
    return Compose([
        RoiCentred("mask", mode),
        PhysicalFovCropd(["t2", "dwi", "adc", "mask"], fov_mm, size, mode, context, depth),
        ScaleIntensityRangePercentilesd(["t2", "dwi"], lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True),
        AdcScaled(["adc"]),
        ToNumpyd(list(SEQUENCES), dtype=np.float32),
        *([MaskChanneld("mask", "mask_channel")] if mask_channel else []),
        ConcatItemsd(list(SEQUENCES) + (["mask_channel"] if mask_channel else []), "image", dim=0),
    ])
