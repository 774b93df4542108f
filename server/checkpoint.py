"""Checkpoints of the study: protocol state (JSON) + the current global weights, written atomically
and verified on load.

Each save writes a new weights file, then moves `state.json` to `state.prev.json` and writes the new
`state.json`; both name their weights file with its SHA-256 and carry a SHA-256 of their own body.
The two newest checkpoints are kept. On load a checkpoint whose state or weights are unreadable or
do not match their hashes (a torn disk, an edited file) is reported and the previous one is used:
the study then redoes one step, which the sites answer the same (identical requests).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from common.atomic import atomic_write_bytes, atomic_write_json
from common.records import arrays_to_numpy, numpy_to_record

log = logging.getLogger(__name__)
NAMES = ("state.json", "state.prev.json")  # newest first
# Held while a checkpoint (and the evidence that goes with it) is written: whoever stops the process
# from outside the study's thread (Ctrl-C in `slmfed simulate`) takes it first, so a stop never falls
# between a checkpoint's evidence and its state.
WRITING = threading.RLock()


class StudyInterrupted(Exception):
    """The study stopped on purpose (stop-after-rounds); the checkpoint allows `resume`."""


class StudyStopped(StudyInterrupted):
    """The study cannot go on now (too few training sites answer); the checkpoint allows `resume`
    once they are back."""


class CheckpointError(RuntimeError):
    """No checkpoint of the run folder can be read and verified."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _body_digest(state: dict) -> str:
    return _digest(json.dumps(state, sort_keys=True, separators=(",", ":"), default=str).encode())


class Checkpoint:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "checkpoint"
        self.models_dir = Path(run_dir) / "models"
        self._loaded: dict | None = None  # the verified checkpoint load_state chose

    def exists(self) -> bool:
        return any((self.dir / n).is_file() for n in NAMES)

    def save(self, state: dict, arrays: ArrayRecord | None) -> None:
        """A new checkpoint (arrays None: a position between DL rounds, no weights needed)."""
        with WRITING:
            self._save(state, arrays)

    def _save(self, state: dict, arrays: ArrayRecord | None) -> None:
        on_disk = [int(p.stem.split("-")[1]) for p in self.dir.glob("weights-*.npz") if p.stem.split("-")[1].isdigit()]
        seq = max([int(state.get("checkpoint_seq", 0)), *on_disk]) + 1  # never reuse a name a checkpoint points at
        state["checkpoint_seq"] = seq
        entry = {"weights_file": None, "weights_sha256": None}
        if arrays is not None:
            data = _npz_bytes(arrays_to_numpy(arrays))
            entry = {"weights_file": f"weights-{seq:06d}.npz", "weights_sha256": _digest(data)}
            atomic_write_bytes(self.dir / entry["weights_file"], data)
        body = json.loads(json.dumps(state, default=_plain))  # what a reader will see
        current = self.dir / NAMES[0]
        if current.is_file():
            os.replace(current, self.dir / NAMES[1])
        atomic_write_json(current, {"state": body, **entry, "state_sha256": _body_digest(body)})
        keep = {self._weights_named(self.dir / n) for n in NAMES}
        for old in self.dir.glob("weights-*.npz"):
            if old.name not in keep:
                old.unlink()

    def save_state(self, state: dict) -> None:
        self.save(state, None)

    def _weights_named(self, path: Path) -> str | None:
        try:
            return json.loads(path.read_text("utf-8")).get("weights_file")
        except (OSError, ValueError, AttributeError):
            return None

    def _verified(self, path: Path) -> dict:
        """The checkpoint at `path`, its state and weights checked against their hashes; raises ValueError."""
        try:
            doc = json.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict):
            raise ValueError("not a checkpoint (no state)")
        if doc.get("state_sha256") != _body_digest(doc["state"]):
            raise ValueError("its state does not match its SHA-256")
        if doc.get("weights_file"):
            wpath = self.dir / Path(str(doc["weights_file"])).name
            try:
                data = wpath.read_bytes()
            except OSError as exc:
                raise ValueError(f"its weights {wpath.name} are unreadable ({exc})") from None
            if _digest(data) != doc.get("weights_sha256"):
                raise ValueError(f"its weights {wpath.name} do not match their SHA-256")
            doc["weights"] = data
        return doc

    def load_state(self) -> dict:
        problems = []
        for name in NAMES:
            path = self.dir / name
            if not path.is_file():
                continue
            try:
                self._loaded = self._verified(path)
            except ValueError as exc:
                problems.append(f"{path}: {exc}")
                log.error("checkpoint %s is corrupted (%s); trying the previous one", path, exc)
                continue
            if problems:
                log.warning("resuming from the previous checkpoint %s (one step is redone)", path)
            return self._loaded["state"]
        raise CheckpointError(f"cannot resume: no valid checkpoint in {self.dir} ({'; '.join(problems) or 'none found'})")

    def load_arrays(self) -> ArrayRecord:
        if self._loaded is None:
            self.load_state()
        if not self._loaded.get("weights"):
            raise CheckpointError(f"cannot resume: the checkpoint in {self.dir} holds no weights for its DL round")
        with np.load(io.BytesIO(self._loaded["weights"]), allow_pickle=False) as z:
            return numpy_to_record({k: z[k] for k in z.files})

    def save_evidence(self, window: list[list[dict | None]]) -> None:
        """The signed updates of the rounds the current DL model is made of (protocol.py fit_dl), so a
        resumed study can still prove its model to the sites: entries' texts and signatures as JSON,
        their weights as arrays, in one atomic file."""
        meta, arrays = [], {}
        for g, group in enumerate(window):
            meta.append([])
            for i, entry in enumerate(group):
                if entry is None:  # an unsigned update: kept as missing, the sites refuse what is made of it
                    meta[-1].append(None)
                    continue
                meta[-1].append({"statement": entry["statement"], "signature": entry["signature"]})
                arrays.update({f"{g}/{i}/{k}": v for k, v in arrays_to_numpy(entry["arrays"]).items()})
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with WRITING:
            atomic_write_bytes(self.dir / "evidence.npz", _npz_bytes(arrays))

    def load_evidence(self) -> list[list[dict | None]]:
        path = self.dir / "evidence.npz"
        if not path.is_file():
            log.warning("the checkpoint in %s holds no evidence of its model: the sites will refuse to train on it", self.dir)
            return []
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["__meta__"].tobytes().decode())
            window = []
            for g, group in enumerate(meta):
                window.append([])
                for i, entry in enumerate(group):
                    if entry is None:
                        window[-1].append(None)
                        continue
                    prefix = f"{g}/{i}/"
                    entry["arrays"] = numpy_to_record({k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)})
                    window[-1].append(entry)
        return window

    def save_model(self, name: str, arrays: ArrayRecord) -> Path:
        path = self.models_dir / f"{name}.npz"
        atomic_write_bytes(path, _npz_bytes(arrays_to_numpy(arrays)))
        return path


def _plain(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
