"""A model as two arrays on the wire (common/packing.py): lossless, checked at the site before use."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from client.app import app as client_app
from common.derive import record_hash
from common.packing import DATA, LAYOUT, PackingError, is_packed, pack, unpack
from common.records import SITE_REFUSED, record_to_state
from tests.fedtools import ask_site
from tests.test_dp import _request, _site, _weights


def _state() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({"w": Array(rng.normal(size=(3, 4)).astype(np.float32)),
                        "b": Array(rng.normal(size=4).astype(np.float64)),
                        "count": Array(np.array(7, dtype=np.int64)),
                        "empty": Array(np.zeros((0, 5), dtype=np.float32)),
                        "mask": Array(np.array([True, False, True]))})


def test_unpacking_gives_back_the_same_arrays_and_the_same_hash():
    rec = _state()
    packed = pack(rec)
    assert is_packed(packed) and set(packed) == {DATA, LAYOUT}
    back = unpack(packed)
    assert list(back) == list(rec) and record_hash(back) == record_hash(rec)
    for k in rec:
        a, b = rec[k].numpy(), back[k].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    model = _weights(ensemble=3)  # the study's ensemble: hundreds of arrays become two
    assert len(model) > 100 and len(pack(model)) == 2 and record_hash(unpack(pack(model))) == record_hash(model)


def _crafted(layout, data: bytes) -> ArrayRecord:
    return ArrayRecord({DATA: Array(np.frombuffer(data, dtype=np.uint8).copy()),
                        LAYOUT: Array(np.frombuffer(json.dumps(layout).encode() if not isinstance(layout, bytes)
                                                    else layout, dtype=np.uint8).copy())})


@pytest.mark.parametrize("layout, data, says", [
    ([["w", "<f4", [4]]], b"\0" * 12, "runs past the 12 bytes"),                 # more than was sent
    ([["w", "<f4", [2]]], b"\0" * 12, "describes 8 of the 12 bytes"),            # bytes left over
    ([["w", "<f4", [2**40, 2**40]]], b"\0" * 8, "runs past"),                    # a huge shape, no allocation
    ([["w", "<f4", [-1]]], b"\0" * 8, "non-negative integers"),
    ([["w", "<f4", [1.5]]], b"\0" * 8, "non-negative integers"),
    ([["w", "|O", [1]]], b"\0" * 8, "is not one of"),                            # objects: pickles
    ([["w", ">f4", [2]]], b"\0" * 8, "is not one of"),
    ([["w", "<f4", [1]], ["w", "<f4", [1]]], b"\0" * 8, "repeated"),
    ([[DATA, "<f4", [2]]], b"\0" * 8, "reserved"),
    ([["w", "<f4"]], b"\0" * 8, "expected [name, dtype, shape]"),
    ({"w": 1}, b"\0" * 8, "expected a list"),
    (b"\xff\xfe", b"\0" * 8, "not JSON"),
])
def test_a_layout_that_does_not_describe_its_bytes_is_refused(layout, data, says):
    with pytest.raises(PackingError, match=says if says != "expected [name, dtype, shape]" else r"expected \[name"):
        unpack(_crafted(layout, data))


def test_a_site_answers_a_packed_request_in_kind_and_refuses_a_malformed_one(tmp_path):
    """The same train request, packed or not, gives the same weights; the reply is packed when the
    request was. A malformed packing is refused as a request error before the site trains."""
    plain = ask_site(client_app, _site(tmp_path / "a"), "train", _request(), arrays=_weights())
    packed = ask_site(client_app, _site(tmp_path / "b"), "train", _request(), arrays=pack(_weights()))
    assert not plain.has_error() and not packed.has_error(), (plain.error, packed.error)
    assert not is_packed(plain.content["arrays"]) and is_packed(packed.content["arrays"])
    a, b = record_to_state(plain.content["arrays"]), record_to_state(unpack(packed.content["arrays"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = _crafted([["w", "<f4", [4]]], b"\0" * 12)
    node = _site(tmp_path / "c")
    reply = ask_site(client_app, node, "train", _request(), arrays=bad)
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert "record 'arrays'" in reply.error.reason and "runs past the 12 bytes" in reply.error.reason
    # refused before the site opened its study: no ledger, no patient read, nothing charged
    assert not (tmp_path / "c" / "dp-study").exists() and (tmp_path / "b" / "dp-study").is_dir()


def test_the_coordinator_packs_what_it_sends_over_a_superlink_and_unpacks_the_replies():
    """Over a transport grid (push / pull through a SuperLink) a request's model and its relayed updates
    travel packed and a packed reply arrives unpacked; a reply whose packing is malformed counts as no
    reply. In-process grids get the records as they are."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from server.protocol import Federation
    from tests.test_faults import PushPullGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    class Echo(PushPullGrid):  # node 1 sends the model back packed, node 2 a malformed packing
        def pull_messages(self, ids):
            out = []
            for mid in list(ids):
                m = self.pushed[mid]
                arrays = m.content["arrays"] if m.metadata.dst_node_id == 1 else _crafted([["w", "<f4", [9]]], b"\0" * 4)
                rep = Message(content=RecordDict({"metrics": MetricRecord({"x": 1}), "arrays": arrays}), reply_to=m)
                rep.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
                out.append(rep)
            return out

    grid = Echo({1: 1, 2: 1})
    fed = Federation(grid, min_sites=2, timeout_s=5, retries=0)
    fed.site_of, fed.node_of = {1: "a", 2: "b"}, {"a": 1, "b": 2}
    model = _state()
    out = fed.ask(["a", "b"], "evaluate", {}, arrays=model, evidence={"statement": "x", "signature": b"s" * 64, "arrays": _state()})
    sent = list(grid.pushed.values())
    assert all(is_packed(m.content["arrays"]) for m in sent)
    contribs = [m.content[r] for m in sent for r in m.content.keys() if r.startswith("contrib-")]
    assert len(contribs) == 2 and all(is_packed(c) for c in contribs)
    assert set(out) == {"a"} and record_hash(out["a"]["arrays"]) == record_hash(model)
    assert "malformed arrays" in out.failed["b"] and "runs past" in out.failed["b"]
