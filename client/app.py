"""The Flower ClientApp: translates study messages into calls of client/study.py, through the gate.

Message types (the server side is server/protocol.py):
    query.info           -> data shape, the site's privacy policy, cohort counts (when releasable), how
                            its model inputs were prepared (common/model_input.py: settings only)
    query.clinical_sums  -> feature sums for standardisation
    query.logistic_stats -> gradient / Hessian of the CF model at the sent coefficients
    train                -> one round of local training of a DL model (weights in, weights out)
    evaluate             -> predict a partition, store per-patient scores locally, reply loss / AUC
    query.summary        -> the site's result rows from its stored predictions
Every request is validated and every reply released by client/disclosure.py under the site's own
policy (client/policy.py, from the node config). A train, evaluate or query.logistic_stats request is
answered only when its model is one the site derives itself from the request's evidence (signed
contributions of the sites in its own peer roster, client/verify.py); the site signs what it
contributes (clinical sums, CF statistics, training updates) in a ConfigRecord "signed", which the
coordinator relays to the sites that compute on the models made of it. A refusal is an error reply (code SITE_REFUSED)
whose reason names the rule; it is logged here, at the site. Replies carry a MetricRecord "metrics"
and, where there is something to say, a ConfigRecord "notes" (fixed texts: why a value is n/a);
only train replies carry an ArrayRecord "arrays" (the model weights). A request's ArrayRecords may come
packed (common/packing.py: a coordinator behind a SuperLink sends each as two arrays); they are
unpacked, their layout checked, before anything reads them, and the reply is packed when they were.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client import study
from client.cache import read_manifest
from client.disclosure import Refused, validate_request
from client.limits import check_request
from client.policy import SitePolicy
from client.simulated import node_layer
from client.verify import VERIFIED_TYPES, statement, verify_request
from common import derive
from common.clinical import N_FEATURES
from common.config import SENT_MODEL_KEYS, app_config
from common.model_input import describe as describe_model_input
from common.packing import PackingError, is_packed, pack, unpack
from common.records import SITE_CANNOT, SITE_REFUSED, record_to_state, to_metric_record
from common.signing import Roster, SigningError, load_private_key, sign

app = ClientApp()
log = logging.getLogger(__name__)
_ARRAYS_IN = ("train", "evaluate")  # the only requests that may carry weights
_SIGNED = ("query.clinical_sums", "query.logistic_stats", "train")  # the replies that are contributions


def _handle(msg: Message, context: Context, fn: Callable[[study.Site, Any, dict], Any]) -> Message:
    """Validate, answer through the gate, reply; refusals and can't-do become error replies."""
    mtype = msg.metadata.message_type
    try:  # a simulated node's site comes from the run config (client/simulated.py), any other node's from its own
        node_cfg = app_config(context.run_config, node_layer(context.run_config, context.node_config))
    except study.StudyError as exc:
        log.warning("node %s cannot answer %s: %s", context.node_id, mtype, exc)
        return Message(error=Error(code=SITE_CANNOT, reason=str(exc)), reply_to=msg)
    name = node_cfg["site-name"] or node_cfg["cache-dir"]
    try:
        # the request is checked before any patient data is read
        records = set(msg.content.keys())
        allowed = {"config", "arrays"} if mtype in _ARRAYS_IN else {"config"}
        if mtype in VERIFIED_TYPES:  # the model's derivation: its recipe, statements and relayed updates
            allowed |= {derive.EVIDENCE} | {r for r in records if r.startswith(derive.CONTRIB)}
        if not records <= allowed:
            raise Refused("request", f"{mtype} takes no record(s) {sorted(records - allowed)}")
        packed = _unpack_request(msg)
        cfg = dict(msg.content["config"]) if "config" in msg.content else {}
        req = validate_request(mtype, cfg, N_FEATURES)
        policy = SitePolicy.from_config(node_cfg)
        # the manifest (shape, channels, patient count; no patient data) for the caps and the model's derivation
        needs_manifest = mtype in ("train", "evaluate") or (mtype in VERIFIED_TYPES and policy.model_verification == "enforce")
        manifest = read_manifest(node_cfg["cache-dir"]) if needs_manifest and node_cfg.get("cache-dir") else None
        if mtype in ("train", "evaluate") and manifest is not None:  # caps first: no patient data read yet
            check_request(mtype, req, policy, manifest, N_FEATURES)
        key, start = _verified(mtype, req, msg, node_cfg, policy, manifest)  # the model, before any patient data is read
        site = study.Site.open(node_cfg)
        site.cfg.update({k: req[k] for k in SENT_MODEL_KEYS if k in req})
        gate = site.gate()
        answer = gate.answer(mtype, lambda: fn(site, gate, req))
    except Refused as exc:  # the reply names the rule; the numbers behind it stay in the site's log
        log.warning("site %s refused %s: %s %s", name, mtype, exc, f"[{exc.site_detail}]" if exc.site_detail else "")
        return Message(error=Error(code=SITE_REFUSED, reason=str(exc)), reply_to=msg)
    except study.StudyError as exc:
        log.warning("site %s cannot answer %s: %s", name, mtype, exc)
        return Message(error=Error(code=SITE_CANNOT, reason=without_paths(str(exc))), reply_to=msg)
    except (OSError, RuntimeError, ValueError) as exc:  # e.g. an unreadable cache or ledger: the details stay here
        log.exception("site %s could not answer %s", name, mtype)
        return Message(error=Error(code=SITE_CANNOT, reason=f"the site could not answer {mtype}: "
                                                            f"{without_paths(str(exc))} (details in the site's log)"),
                       reply_to=msg)
    metrics, notes, arrays, extra = answer
    notes = {**notes, **gate.notes}
    content = RecordDict({"metrics": to_metric_record(metrics)})
    if key is not None and mtype in _SIGNED:  # what this site contributes, signed: peers verify models made of it
        said = statement(mtype, name, req, dict(content["metrics"]), arrays, start)
        if said is not None:
            text, signature = sign(key, said)
            content["signed"] = ConfigRecord({"statement": text, "signature": signature})
    if notes:
        content["notes"] = ConfigRecord({k: str(v) for k, v in notes.items()})
    if arrays is not None:
        content["arrays"] = pack(arrays) if packed else arrays  # the reply's form follows the request's
    for record_name, record in extra.items():  # info: the site's name and its policy, read-only
        content[record_name] = record
    return Message(content=content, reply_to=msg)


def _unpack_request(msg: Message) -> bool:
    """The request's packed ArrayRecords (common/packing.py: a deployed coordinator sends a model as two
    arrays) unpacked in place, their layout checked first; whether there were any."""
    found = False
    for name in list(msg.content.keys()):
        record = msg.content[name]
        if isinstance(record, ArrayRecord) and is_packed(record):
            try:
                msg.content[name] = unpack(record)
            except PackingError as exc:
                raise Refused("request", f"record {name!r}: {exc}") from None
            found = True
    return found


def _verified(mtype: str, req: dict, msg: Message, node_cfg: dict, policy: SitePolicy, manifest: dict | None):
    """(signing key or None, hash of the verified DL weights or None). With model-verification =
    enforce the site answers a contribution or a model request only with its key and roster, and a
    model request only when client/verify.py derives its model; with off (tests of the other rules)
    it computes on what it is sent and signs nothing, so its replies attest nothing to peers."""
    if policy.model_verification != "enforce" or mtype not in VERIFIED_TYPES + _SIGNED:
        return None, None
    missing = [k for k in ("signing-key", "peer-roster") if not node_cfg.get(k)]
    if missing:
        raise Refused("unverified-model", f"this site has no {' or '.join(missing)} in its node config, so it can "
                                          "neither verify models nor sign what it contributes (slmfed deploy init "
                                          "writes both into the site bundle)")
    try:
        key, roster = load_private_key(node_cfg["signing-key"]), Roster.load(node_cfg["peer-roster"])
    except SigningError as exc:
        raise study.StudyError(str(exc)) from None
    shape = {}
    if mtype in VERIFIED_TYPES:
        if manifest is None:
            raise study.StudyError("node config has no 'cache-dir': point the site at its prepared cache")
        shape = {"n-channels": int(manifest["image_shape"][0]), "spatial-dims": int(manifest.get("spatial_dims", 2)),
                 "n-features": N_FEATURES, "channels": manifest.get("channels")}
    return key, verify_request(mtype, req, msg.content, roster, shape)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s'\"/]+/)*[^\s'\",;)]*")


def without_paths(text: str) -> str:
    """An error text as it may leave the site: every absolute path replaced (where the site keeps its
    cache, study folder or ledger is the site's business; its own log has them)."""
    return _ABSOLUTE_PATH.sub("<site path>", text)


def _metrics_only(fn):
    def run(site, gate, req):
        out = fn(site, gate, req)
        metrics, notes = out if isinstance(out, tuple) else (out, {})
        return metrics, notes, None, {}
    return run


def _arrays(msg: Message) -> ArrayRecord:
    if "arrays" not in msg.content:
        raise Refused("request", f"{msg.metadata.message_type} of a DL model needs the model weights ('arrays')")
    return msg.content["arrays"]


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    def run(site, gate, req):
        metrics, notes = study.site_info(site, gate)
        extra = {"site": ConfigRecord({"site-name": site.name}), "policy": ConfigRecord(site.policy.as_record()),
                 # how the cache's model inputs were made (settings, no patient data): kept with the model
                 "model-input": ConfigRecord(describe_model_input(site.data.manifest))}
        return metrics, notes, None, extra
    return _handle(msg, context, run)


@app.query("clinical_sums")
def clinical_sums(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _metrics_only(study.clinical_sums))


@app.query("logistic_stats")
def logistic_stats(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _metrics_only(study.logistic_stats))


@app.train()
def train(msg: Message, context: Context) -> Message:
    def run(site, gate, req):
        state, metrics = study.train_dl(site, gate, req, record_to_state(_arrays(msg)))
        return metrics, {}, ArrayRecord(state), {}
    return _handle(msg, context, run)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    def run(site, gate, req):
        payload = {"beta": req["beta"]} if req["model"] == "cf" else {"state": record_to_state(_arrays(msg))}
        return study.evaluate_model(site, gate, req, payload), {}, None, {}
    return _handle(msg, context, run)


@app.query("summary")
def summary(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _metrics_only(study.summary))
