"""Fault injection for tests and `slmfed bench faults`: a ClientApp that misbehaves on purpose.

`faulty_client_app(plan)` wraps the real ClientApp (client/app.py) in a new ClientApp object that
the simulation runner or an in-process grid is handed instead of the real one. The faults come from
the `FaultPlan` object given here in Python: nothing in a message, run config or node config can
switch one on, and deployed SuperNodes load `client.app:app`, which has no such hook.

Fault kinds, each for one site and message type, optionally only in some rounds (train/evaluate)
and only the first `times` matching messages (0 = every one):
  raise   the reply Flower's runtime sends when a ClientApp raises (an error reply with
          ErrorCode.CLIENT_APP_RAISED_EXCEPTION): what the server sees of a crash or an outage;
  nan     the training reply's weights hold NaN;
  shape   one array of the training reply has another shape;
  scale   the training reply's weights are multiplied by 1e6.
`times` is counted in files under `plan.count_dir`, so it holds across the Ray workers' processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

KINDS = ("raise", "nan", "shape", "scale")
WEIGHT_KINDS = ("nan", "shape", "scale")


@dataclass(frozen=True)
class Fault:
    site: str
    kind: str
    message_type: str = "train"
    rounds: tuple[int, ...] = ()  # empty: any round
    times: int = 0                # 0: every matching message
    tag: str = ""                 # only this fit tag (e.g. "cv"); empty: any

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.kind in WEIGHT_KINDS and self.message_type != "train":
            raise ValueError(f"fault {self.kind!r} corrupts training replies: message_type must be 'train'")


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[Fault, ...]
    count_dir: str = field(default="")

    def fired(self) -> dict[int, int]:
        """{fault index: times it fired}."""
        if not self.count_dir:
            return {}
        out = {}
        for i in range(len(self.faults)):
            path = Path(self.count_dir) / f"fault-{i}.count"
            out[i] = len(path.read_bytes()) if path.is_file() else 0
        return out

    def _take(self, index: int, fault: Fault) -> bool:
        """Count one firing; False once `times` firings happened."""
        if not self.count_dir:
            raise ValueError("a FaultPlan needs count_dir to count firings")
        path = Path(self.count_dir) / f"fault-{index}.count"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:  # one byte per firing; O_APPEND keeps concurrent workers' counts whole
            if fault.times and (path.stat().st_size >= fault.times):
                return False
            os.write(fd, b".")
        finally:
            os.close(fd)
        return True

    def match(self, site: str, msg: Message) -> tuple[int, Fault] | None:
        mtype = msg.metadata.message_type
        cfg = dict(msg.content["config"]) if "config" in msg.content else {}
        for i, f in enumerate(self.faults):
            if f.site != site or f.message_type != mtype:
                continue
            if f.rounds and int(cfg.get("round", 0) or 0) not in f.rounds:
                continue
            if f.tag and str(cfg.get("study-id", "")).split("/")[-1] != f.tag:
                continue
            if self._take(i, f):
                return i, f
        return None


def corrupt(arrays: ArrayRecord, kind: str) -> ArrayRecord:
    """The training reply's weights, broken the way `kind` says."""
    out = {}
    first_float = next(k for k, v in arrays.items() if v.numpy().dtype.kind == "f")
    for k, v in arrays.items():
        a = v.numpy().copy()
        if a.dtype.kind == "f":
            if kind == "nan" and k == first_float:
                a.ravel()[0] = np.nan
            elif kind == "scale":
                a = a * 1e6
            elif kind == "shape" and k == first_float:
                a = np.concatenate([a.ravel(), np.zeros(1, a.dtype)])
        out[k] = Array(np.ascontiguousarray(a))
    return ArrayRecord(out)


def faulty_client_app(plan: FaultPlan, real: ClientApp | None = None) -> ClientApp:
    """A ClientApp answering as `real` (default: client.app's) except where the plan injects a fault."""
    if real is None:
        from client.app import app as real
    from client.simulated import node_layer
    from common.config import app_config

    out = ClientApp()

    def handler(msg: Message, context: Context) -> Message:
        try:  # the site's name as client/app.py reads it (a simulated node's from the run config)
            site = app_config(context.run_config, node_layer(context.run_config, context.node_config))["site-name"]
        except Exception:  # noqa: BLE001 - no name, no fault: the real ClientApp reports the config problem
            site = ""
        hit = plan.match(site, msg)
        if hit is not None and hit[1].kind == "raise":
            return Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                       reason=f"injected fault {hit[0]}: site {site} raised on "
                                              f"{msg.metadata.message_type}"), reply_to=msg)
        reply = real(msg, context)
        if hit is not None and not reply.has_error() and "arrays" in reply.content:
            content = RecordDict({name: rec for name, rec in reply.content.items() if name != "arrays"})
            content["arrays"] = corrupt(reply.content["arrays"], hit[1].kind)
            return Message(content=content, reply_to=msg)
        return reply

    out.train()(handler)
    out.evaluate()(handler)
    for action in ("info", "clinical_sums", "logistic_stats", "summary"):
        out.query(action)(handler)
    return out

