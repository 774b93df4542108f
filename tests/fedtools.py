"""Test doubles and fixtures for the federated study: in-process Flower grid, fake prepared caches.

`LocalGrid` delivers each message straight to the ClientApp callable of the addressed node (with that
node's Context), so the protocol can be tested in seconds without Ray. It records every reply so
tests can inspect exactly what left each site. The real simulation runtime is tested separately.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.cache import CACHE_FORMAT_VERSION, atomic_write_json, patient_key, write_patient
from common.clinical import FEATURE_NAMES, encode_row
from simulation.inprocess import InProcessGrid


class LocalGrid(InProcessGrid):
    """The in-process grid of simulation/inprocess.py: every message straight to the ClientApp of the
    addressed node, every reply recorded in `replies` (what left each site)."""


def make_cache(cache_dir: Path, n: int, seed: int, site_name: str, prevalence: float = 0.4,
               shape=(3, 40, 40), labelled: bool = True, salt: str | None = None, mask_channel: bool = False,
               labels: list[int] | None = None) -> list[str]:
    """A prepared cache with a learnable signal: SLM patients have a bigger, darker-ADC blob and
    higher tumour markers (with mask_channel, the blob's mask as a 4th channel, as `slmfed prepare`
    writes by default); `labels`: each patient's outcome instead of random ones (n of them). Returns the
    raw patient_ids (for leak checks)."""
    rng = np.random.default_rng(seed)
    cache_dir = Path(cache_dir)
    salt = salt or f"salt-{seed}"
    y = (rng.random(n) < prevalence).astype(int)
    y[:2] = [0, 1]  # both classes present
    if labels is not None:  # exactly these outcomes (the images and markers still follow them)
        y = np.asarray(labels, dtype=int)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    r2 = (yy - shape[1] / 2) ** 2 + (xx - shape[2] / 2) ** 2
    patients, ids = {}, []
    for i in range(n):
        pid = f"{site_name}-PID-{i:04d}"
        ids.append(pid)
        radius = 4 + 3 * y[i] + rng.normal(0, 0.8)
        blob = (r2 < radius**2).astype(np.float32)
        img = rng.normal(0.3, 0.05, shape).astype(np.float32)
        img[0] += 0.4 * blob
        img[1] += (0.3 + 0.3 * y[i]) * blob
        img[2] -= (0.1 + 0.15 * y[i]) * blob
        cea = float(np.exp(rng.normal(1.2 + 1.0 * y[i], 0.8)))
        ca199 = float(np.exp(rng.normal(2.8 + 0.8 * y[i], 0.9)))
        clin = encode_row("M" if rng.random() < 0.6 else "F", ["low", "mid", "high"][rng.integers(3)], cea, ca199)
        key = patient_key(pid, salt)
        label = int(y[i]) if labelled else -1
        if mask_channel:
            img = np.concatenate([img, blob[None]])
        sha = write_patient(cache_dir, key, img, clin, label, roi=blob[None].astype(np.uint8) if mask_channel else None)
        patients[key] = {"status": "included", "reason": "", "sha256": sha, "label": label}
    atomic_write_json(cache_dir / "manifest.json", {
        "format_version": CACHE_FORMAT_VERSION, "site_name": site_name, "input_mode": "2d", "spatial_dims": 2,
        "channels": ["t2", "dwi", "adc"] + (["mask"] if mask_channel else []),
        "image_shape": [shape[0] + int(mask_channel), *shape[1:]], "feature_names": list(FEATURE_NAMES),
        "salt": salt, "patients": patients, "counts": {"included": n, "excluded": 0},
    })
    return ids


def ask_site(client_app, node_config: dict, message_type: str, config: dict | None = None, arrays=None,
             records: dict | None = None) -> Message:
    """One message straight to a ClientApp, as a (possibly hostile) coordinator would send it; `records`:
    more records of the message (a model's evidence). The site's model-verification is off unless its node
    config says otherwise: these tests probe the gate's other rules with hand-made models, and
    tests/test_verify.py probes model verification itself (with keys, rosters and evidence)."""
    node_config = {"model-verification": "off", **node_config}
    from flwr.app import ConfigRecord

    from common.records import to_config_record

    content = RecordDict({"config": to_config_record(config or {})}) if config is not None else RecordDict(
        {"config": ConfigRecord({})})
    if arrays is not None:
        content["arrays"] = arrays
    for name, record in (records or {}).items():
        content[name] = record
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(content=content, dst_node_id=1000, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = f"m{next(_ASK_IDS)}"
    ctx = Context(run_id=1, node_id=1000, node_config=dict(node_config), state=RecordDict(), run_config={})
    return client_app(msg, ctx)


_ASK_IDS = itertools.count()
