"""A model's arrays as two arrays on the wire: what a deployed message is made of.

Why: Flower 1.42 moves every Array of a message as its own object, one Fleet call each, one after the
other (a SuperNode's pull-object / push-object). The ensemble's state is a few hundred arrays and a
train request relays the signed updates of the previous round beside it, so a deployed request spent
most of its time in ~19 ms calls for small objects (simulation/bench_deploy.py prints them). Packed,
an ArrayRecord is two Arrays: the raw bytes of every array, one after the other, and their layout
(name, dtype, shape) as JSON bytes. Unpacking gives back exactly the same arrays (same names, dtypes,
shapes and bytes: the same `state_hash`), so nothing that checks, signs or aggregates a model sees the
packing. A packed record comes from the other side of the network: `unpack` checks the layout
against the bytes before reading anything, and says what is wrong.
"""
from __future__ import annotations

import json
import math
import numpy as np
from flwr.app import Array, ArrayRecord

DATA, LAYOUT = "packed-data", "packed-layout"
# the dtypes a model state holds (float weights, int64 counters, bool / uint8 masks), little-endian
DTYPES = frozenset({"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"})
MAX_ARRAYS = 100_000
MAX_NAME = 300
MAX_DIMS = 8
MAX_LAYOUT_BYTES = 8 << 20


class PackingError(ValueError):
    """A packed record whose layout does not describe its bytes."""


def is_packed(record: ArrayRecord) -> bool:
    return set(record.keys()) == {DATA, LAYOUT}


def pack(record: ArrayRecord) -> ArrayRecord:
    arrays = [(k, np.asarray(v.numpy(), order="C")) for k, v in record.items()]  # (ascontiguousarray makes 0-d 1-d)
    layout = [[k, a.dtype.str, [int(n) for n in a.shape]] for k, a in arrays]
    data = b"".join(a.tobytes() for _, a in arrays)
    return ArrayRecord({DATA: Array(np.frombuffer(data, dtype=np.uint8).copy()),
                        LAYOUT: Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy())})


def _bytes(record: ArrayRecord, key: str) -> bytes:
    a = record[key].numpy()
    if a.dtype != np.uint8 or a.ndim != 1:
        raise PackingError(f"'{key}': expected a 1-D uint8 array, found {a.dtype} of shape {list(a.shape)}")
    return a.tobytes()


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The arrays a packed record holds, after checking that its layout describes exactly its bytes."""
    if not is_packed(record):
        raise PackingError(f"expected a packed record ({DATA!r}, {LAYOUT!r}), found {sorted(record.keys())[:5]}")
    raw = _bytes(record, LAYOUT)
    if len(raw) > MAX_LAYOUT_BYTES:
        raise PackingError(f"layout of {len(raw)} bytes (at most {MAX_LAYOUT_BYTES})")
    try:
        layout = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise PackingError("layout is not JSON") from None
    if not isinstance(layout, list) or len(layout) > MAX_ARRAYS:
        raise PackingError(f"layout: expected a list of at most {MAX_ARRAYS} [name, dtype, shape] entries")
    data = _bytes(record, DATA)
    out: dict[str, Array] = {}
    at = 0
    for i, entry in enumerate(layout):
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], str)
                and isinstance(entry[2], list)):
            raise PackingError(f"layout entry {i}: expected [name, dtype, shape]")
        name, dtype, shape = entry
        if not name or len(name) > MAX_NAME or name in out or name in (DATA, LAYOUT):
            raise PackingError(f"layout entry {i}: name {name[:60]!r} is empty, too long, repeated or reserved")
        if dtype not in DTYPES:
            raise PackingError(f"layout entry {i} ({name[:60]}): dtype {dtype[:20]!r} is not one of {sorted(DTYPES)}")
        if len(shape) > MAX_DIMS or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n for n in shape):
            raise PackingError(f"layout entry {i} ({name[:60]}): shape must be at most {MAX_DIMS} non-negative integers")
        count = math.prod(shape)  # Python ints: no overflow
        size = np.dtype(dtype).itemsize * count
        if at + size > len(data):
            raise PackingError(f"layout entry {i} ({name[:60]}): {dtype} {shape} runs past the {len(data)} bytes sent")
        out[name] = Array(np.frombuffer(data, dtype=dtype, count=count, offset=at).reshape(shape).copy())
        at += size
    if at != len(data):
        raise PackingError(f"the layout describes {at} of the {len(data)} bytes sent")
    return ArrayRecord(out)

