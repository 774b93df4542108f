"""Checkpoints of the study: protocol state (JSON) + the current global weights, written atomically.

`state.json` names the weights file it belongs to and is replaced last, so a crash between the two
writes leaves the previous consistent pair in place.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from common.atomic import atomic_write_bytes, atomic_write_json
from common.records import arrays_to_numpy, numpy_to_record


class StudyInterrupted(Exception):
    """The study stopped on purpose (stop-after-rounds); the checkpoint allows `resume`."""


class Checkpoint:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "checkpoint"
        self.models_dir = Path(run_dir) / "models"

    def exists(self) -> bool:
        return (self.dir / "state.json").is_file()

    def save(self, state: dict, arrays: ArrayRecord) -> None:
        pos = state["position"]
        name = f"weights-fit{pos['fit']}-model{pos['model']}-round{pos['round']}.npz"
        atomic_write_bytes(self.dir / name, _npz_bytes(arrays_to_numpy(arrays)))
        atomic_write_json(self.dir / "state.json", {**state, "weights_file": name})
        for old in self.dir.glob("weights-*.npz"):
            if old.name != name:
                old.unlink()

    def load_state(self) -> dict:
        try:
            return json.loads((self.dir / "state.json").read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"cannot resume: {self.dir / 'state.json'} is unreadable ({exc})") from None

    def load_arrays(self) -> ArrayRecord:
        name = self.load_state()["weights_file"]
        with np.load(self.dir / name, allow_pickle=False) as z:
            return numpy_to_record({k: z[k] for k in z.files})

    def save_model(self, name: str, arrays: ArrayRecord) -> Path:
        path = self.models_dir / f"{name}.npz"
        atomic_write_bytes(path, _npz_bytes(arrays_to_numpy(arrays)))
        return path


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
