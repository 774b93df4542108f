"""The site cache: what `slmfed prepare` writes once and every training round reads.

Layout of CACHE_DIR:
    manifest.json              format version, preprocessing parameters, per-patient status + hashes
                               + order (rank of the patient_id: the patient order load_cache uses)
    qc.csv                     one row per patient: patient_key, status (included/excluded), reason, ...
    patients/<patient_key>.npz image (float32, C x H x W for 2d/2.5d, C x D x H x W for 3d),
                               clinical (float32, common.clinical.FEATURE_NAMES order),
                               label (int8: 0/1, -1 when the site has no outcome),
                               roi (uint8, the ROI mask on the crop's grid: reports and attention maps)
                               radiomics (float64, client.radiomics.FEATURE_NAMES order; optional:
                               caches from before it, or a patient whose features failed, lack it)
Beside it (not inside, never shared): CACHE_DIR.parent / f"{CACHE_DIR.name}-id-map.csv" maps the
salted patient_key back to the hospital's patient_id for the site's own use.

Every file is written to a temporary name in the same folder and renamed into place, so a reader
never sees a half-written file; `load_cache` checks each file's sha256 against the manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
QC_CSV = "qc.csv"
PATIENTS_DIR = "patients"


class CacheError(RuntimeError):
    """The cache is missing, incomplete or does not match its manifest."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def patient_key(patient_id: str, salt: str) -> str:
    """Salted hash used instead of the patient_id everywhere outside the id-map file."""
    return "p" + hashlib.sha256(f"{salt}:{patient_id}".encode("utf-8")).hexdigest()[:16]


def encode_patient(image: np.ndarray, clinical: np.ndarray, label: int, roi: np.ndarray | None = None,
                   radiomics: np.ndarray | None = None) -> bytes:
    """Serialise one patient's record to .npz bytes (no pickle)."""
    buf = io.BytesIO()
    extra = {} if roi is None else {"roi": np.ascontiguousarray(roi, dtype=np.uint8)}
    if radiomics is not None:
        extra["radiomics"] = np.ascontiguousarray(radiomics, dtype=np.float64)
    np.savez(
        buf,
        image=np.ascontiguousarray(image, dtype=np.float32),
        clinical=np.ascontiguousarray(clinical, dtype=np.float32),
        label=np.int8(label),
        **extra,
    )
    return buf.getvalue()


def write_patient(cache_dir: str | Path, key: str, image: np.ndarray, clinical: np.ndarray, label: int,
                  roi: np.ndarray | None = None, radiomics: np.ndarray | None = None) -> str:
    """Atomically write one patient file; returns its sha256 for the manifest."""
    data = encode_patient(image, clinical, label, roi, radiomics)
    atomic_write_bytes(Path(cache_dir) / PATIENTS_DIR / f"{key}.npz", data)
    return sha256_bytes(data)


def id_map_path(cache_dir: str | Path) -> Path:
    cache_dir = Path(cache_dir).resolve()
    return cache_dir.parent / f"{cache_dir.name}-id-map.csv"


@dataclass
class SiteData:
    """A site's included patients, stacked for training (images N x C x ..., clinical N x F)."""

    keys: list[str]
    images: np.ndarray
    clinical: np.ndarray
    labels: np.ndarray
    manifest: dict

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx) -> "SiteData":
        idx = np.asarray(idx, dtype=int)
        return SiteData([self.keys[i] for i in idx], self.images[idx], self.clinical[idx], self.labels[idx], self.manifest)


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{cache_dir} is not a prepared cache: {MANIFEST} is missing (run `slmfed prepare` first)")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format version {manifest.get('format_version')!r}, expected {CACHE_FORMAT_VERSION}; "
            "re-run `slmfed prepare`"
        )
    return manifest


def patient_order(cache_dir, keys: list[str], ranks: list, images, clinical, labels) -> list[int]:
    """The site's patient order, as indices into `keys` (salted keys, sorted).

    It must not depend on the cache's random salt (a re-prepared cache would get other folds), nor on
    the image bytes: the same cohort exported in another form (an RTSTRUCT rasterised instead of a
    voxel mask) gives slightly different crops, and the folds, hence every study result, CF's too,
    would move with them. So `slmfed prepare` records each patient's "order" in the manifest: the rank
    of its patient_id among the site's patient_ids. A cache written before that field existed keeps
    its former order, a hash of each patient's content, so it loads and trains as it did.
    """
    where = Path(cache_dir) / MANIFEST
    given = [r is not None for r in ranks]
    if not any(given):
        return sorted(range(len(keys)), key=lambda i: hashlib.sha256(
            images[i].tobytes() + clinical[i].tobytes() + bytes([labels[i] & 0xFF])).hexdigest())
    for key, r in zip(keys, ranks):
        if type(r) is not int or r < 0:
            raise CacheError(f"{where}: patient {key} has order {r!r}, expected an integer >= 0 "
                             "(every included patient has one, or none does); re-run `slmfed prepare`")
    dup = [r for r, n in Counter(ranks).items() if n > 1]
    if dup:
        raise CacheError(f"{where}: more than one included patient has order {dup[0]}; re-run `slmfed prepare`")
    return sorted(range(len(keys)), key=ranks.__getitem__)


def load_cache(cache_dir: str | Path, verify: bool = True) -> SiteData:
    """Load every included patient of a prepared cache (checking hashes against the manifest), in the
    site's patient order (`patient_order`): folds and mini-batches derive from it."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    keys, images, clinical, labels, ranks = [], [], [], [], []
    for key, entry in sorted(manifest.get("patients", {}).items()):
        if entry.get("status") != "included":
            continue
        ranks.append(entry.get("order"))
        path = cache_dir / PATIENTS_DIR / f"{key}.npz"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CacheError(f"{path} is listed as included in the manifest but missing; re-run `slmfed prepare`") from None
        if verify and sha256_bytes(data) != entry.get("sha256"):
            raise CacheError(f"{path} does not match its manifest hash (modified or half-written); re-run `slmfed prepare`")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            images.append(npz["image"])
            clinical.append(npz["clinical"])
            labels.append(int(npz["label"]))
        keys.append(key)
    if not keys:
        raise CacheError(f"{cache_dir}: the cache holds no included patient")
    order = patient_order(cache_dir, keys, ranks, images, clinical, labels)
    return SiteData(
        keys=[keys[i] for i in order],
        images=np.stack([images[i] for i in order]).astype(np.float32, copy=False),
        clinical=np.stack([clinical[i] for i in order]).astype(np.float32, copy=False),
        labels=np.asarray([labels[i] for i in order], dtype=np.int64),
        manifest=manifest,
    )
