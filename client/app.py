"""The Flower ClientApp: translates study messages into calls of client/study.py.

Message types (the server side is server/protocol.py):
    query.info           -> data shape and counts
    query.clinical_sums  -> feature sums for standardisation
    query.logistic_stats -> gradient / Hessian of the CF model at the sent coefficients
    train                -> one round of local training of a DL model (weights in, weights out)
    evaluate             -> predict a partition, store per-patient scores locally, reply aggregates
    query.summary        -> the site's result rows from its stored predictions
Replies carry a MetricRecord "metrics" (always with num-examples) and, for train, an ArrayRecord
"arrays". Nothing per-patient is ever put into a reply.
"""
from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import study
from common.config import SENT_MODEL_KEYS, app_config
from common.records import record_to_state, to_metric_record

app = ClientApp()


def _site(context: Context, msg: Message | None = None) -> study.Site:
    """The site's data and config; the model/training settings the server sent take precedence."""
    site = study.Site.open(app_config(context.run_config, context.node_config))
    if msg is not None and "config" in msg.content:
        sent = msg.content["config"]
        site.cfg.update({k: sent[k] for k in SENT_MODEL_KEYS if k in sent})
    return site


def _common(cfg) -> dict:
    return {
        "fold": int(cfg["fold"]),
        "folds": int(cfg["folds"]),
        "seed": int(cfg["seed"]),
    }


def _norm(cfg):
    return np.asarray(cfg["clinical-mean"], dtype=np.float64), np.asarray(cfg["clinical-std"], dtype=np.float64)


def _reply(msg: Message, metrics: dict, arrays=None) -> Message:
    content = RecordDict({"metrics": to_metric_record(metrics)})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    site = _site(context)
    reply = _reply(msg, study.site_info(site))
    reply.content["site"] = ConfigRecord({"site-name": site.name})
    return reply


@app.query("clinical_sums")
def clinical_sums(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    return _reply(msg, study.clinical_sums(_site(context), **_common(cfg)))


@app.query("logistic_stats")
def logistic_stats(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    mean, std = _norm(cfg)
    return _reply(msg, study.logistic_stats(_site(context), **_common(cfg), beta=cfg["beta"], mean=mean, std=std))


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    site = _site(context, msg)
    mean, std = _norm(cfg)
    state, metrics = study.train_dl(
        site, str(cfg["model"]), record_to_state(msg.content["arrays"]), **_common(cfg), rnd=int(cfg["round"]),
        mean=mean, std=std,
    )
    return _reply(msg, metrics, arrays=ArrayRecord(state))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    site = _site(context, msg)
    mean, std = _norm(cfg)
    model = str(cfg["model"])
    if model == "cf":
        payload = {"beta": list(cfg["beta"])}
    else:
        payload = {"state": record_to_state(msg.content["arrays"])}
    out = study.evaluate_model(
        site, model, payload, **_common(cfg), part=str(cfg["part"]), mean=mean, std=std,
        study_id=str(cfg["study-id"]), store=bool(cfg["store"]), bins=int(cfg["histogram-bins"]),
    )
    return _reply(msg, out)


@app.query("summary")
def summary(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    models = [m for m in str(cfg["models"]).split(",") if m]
    thresholds = {m: float(cfg[f"threshold.{m}"]) for m in models if f"threshold.{m}" in cfg}
    out = study.summary(
        _site(context), str(cfg["study-id"]), models, str(cfg["kind"]), int(cfg["folds"]), thresholds,
        int(cfg["histogram-bins"]),
    )
    return _reply(msg, out)

