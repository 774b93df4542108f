"""A site computes only on models it can derive itself (rule `unverified-model`).

Why: the coordinator runs its own ServerApp, so it can send any weights or coefficients the message
format allows, and a crafted model turns any reply into a probe of single patients (ReLU steps on one
clinical value, trap units that fire for one patient, CF slopes on the binary features). Bounding
each knob leaves the next crafted model open; so the site no longer takes the coordinator's word for
any model. Every train, evaluate and query.logistic_stats request carries its model's derivation
(common/derive.py: a recipe plus the signed statements it uses), and the site recomputes it from:
  - the study settings in the request (already bounded by client/limits.py),
  - statements signed by the sites of its own peer roster (common/signing.py; node config
    `peer-roster`, never the coordinator's), each bound to this study, fit, fold and round:
    standardisation sums, CF statistics at the coefficients they were computed at, training updates
    with the hash of the model they started from.
An honest site signs a contribution only after verifying the model it computed on, so a signed
update attests its starting model, and signed CF statistics attest their coefficients. The site
answers only when the request's model is exactly (DL weights: the same bytes; CF coefficients: to
1e-9 relative, a Newton step's matrix inverse may round differently on another CPU) what it derives;
otherwise it refuses before any patient data is read, naming the rule and both hashes.

What this does not stop (deploy/README.md, threat model): a roster site that colludes with the
coordinator can sign anything; the coordinator chooses which signed contributions of a round it
aggregates (as when a site drops out), and which verified point a CF step starts from. Every such
model is still one computed from patient data by the approved protocol, never a crafted one.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from client.disclosure import Refused
from common import derive
from common.config import SENT_MODEL_KEYS
from common.signing import Roster

RULE = "unverified-model"
MAX_STATEMENTS = 20_000
MAX_RECIPE_CHARS = 1_000_000
VERIFIED_TYPES = ("train", "evaluate", "query.logistic_stats")
# the CF coefficients a site recomputes may differ from the coordinator's in the last bits (LAPACK builds)
BETA_RTOL, BETA_ATOL = 1e-9, 1e-12


def _refuse(why: str) -> Refused:
    return Refused(RULE, f"{why}; a site computes only on models it derives itself from the study settings and "
                         "contributions signed by the sites in its own roster")


class _Statements:
    """The request's signed statements, each checked on first use: signature by a roster site, the
    kind expected, and bound to this request's study, fold and fold seed."""

    def __init__(self, evidence: Mapping[str, Any], roster: Roster, req: Mapping[str, Any]):
        texts, sigs = evidence.get("statements", []), evidence.get("signatures", [])
        if not isinstance(texts, list) or not isinstance(sigs, list) or len(texts) != len(sigs) or len(texts) > MAX_STATEMENTS:
            raise _refuse("the evidence's statements and signatures do not pair up")
        self.texts, self.sigs, self.roster, self.req = texts, sigs, roster, req
        self.parsed: dict[int, dict] = {}

    def get(self, i: Any, kind: str) -> dict:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.texts):
            raise _refuse(f"the recipe names statement {str(i)[:20]!r}, which the evidence does not hold")
        if i not in self.parsed:
            text, sig = self.texts[i], self.sigs[i]
            if not isinstance(text, str) or not isinstance(sig, bytes):
                raise _refuse(f"statement {i} is not a signed text")
            try:
                st = json.loads(text)
            except ValueError:
                raise _refuse(f"statement {i} is not JSON") from None
            if not isinstance(st, dict) or not self.roster.verify(str(st.get("site", "")), text.encode(), sig):
                raise _refuse(f"statement {i} is not signed by a site in this site's peer roster")
            self.parsed[i] = st
        st = self.parsed[i]
        for key in ("study-id", "fold", "seed"):
            if st.get(key) != self.req.get(key):
                raise _refuse(f"statement {i} ({st.get('kind')} of site {st.get('site')}) is for another "
                              f"{key} ({str(st.get(key))[:40]!r}, this request: {str(self.req.get(key))[:40]!r})")
        if st.get("kind") != kind:
            raise _refuse(f"statement {i} is a {str(st.get('kind'))[:20]!r} statement where the recipe needs {kind!r}")
        return st

    def group(self, idxs: Any, kind: str) -> list[dict]:
        if not isinstance(idxs, list) or not idxs:
            raise _refuse(f"the recipe lists no {kind} statements")
        sts = [self.get(i, kind) for i in idxs]
        sites = [st["site"] for st in sts]
        if len(set(sites)) != len(sites):
            raise _refuse(f"the recipe counts a site's {kind} twice")
        return sts


def _floats(v: Any, n: int, what: str) -> np.ndarray:
    if not isinstance(v, list) or len(v) != n or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
        raise _refuse(f"{what}: expected {n} numbers")
    a = np.asarray(v, dtype=np.float64)
    if not np.isfinite(a).all():
        raise _refuse(f"{what}: expected finite numbers")
    return a


def _number(v: Any, lo: float, hi: float, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise _refuse(f"{what}: expected a number in [{lo:g}, {hi:g}]")
    return float(v)


class Verifier:
    """Checks one request's model against its evidence (common/derive.py recipes)."""

    def __init__(self, mtype: str, req: Mapping[str, Any], content: RecordDict, roster: Roster,
                 shape: Mapping[str, Any]):
        self.mtype, self.req, self.content, self.shape = mtype, req, content, shape
        if derive.EVIDENCE not in content.config_records:
            raise _refuse(f"the {mtype} request carries no evidence of how its model was derived")
        evidence = content[derive.EVIDENCE]
        recipe_text = evidence.get("recipe", "")
        if not isinstance(recipe_text, str) or len(recipe_text) > MAX_RECIPE_CHARS:
            raise _refuse("the evidence has no readable recipe")
        try:
            self.recipe = json.loads(recipe_text)
        except ValueError:
            raise _refuse("the evidence's recipe is not JSON") from None
        if not isinstance(self.recipe, dict):
            raise _refuse("the evidence's recipe is not a JSON object")
        self.statements = _Statements(evidence, roster, req)
        self.p = int(shape["n-features"]) + 1

    # -- standardisation and CF --
    def standardisation(self):
        sums = self.statements.group(self.recipe.get("std"), "sums")
        try:
            mean, std, roi = derive.pool_sums(sums)
        except (KeyError, TypeError, ValueError):
            raise _refuse("the standardisation sums cannot be pooled") from None
        if not (np.array_equal(mean, self.req["clinical-mean"]) and np.array_equal(std, self.req["clinical-std"])):
            raise _refuse("the clinical-mean / clinical-std are not the pooled standardisation of the signed sums")
        self.std_hash = derive.values_hash(mean, std)
        return roi

    def beta(self, proof: Any, sent: np.ndarray | None = None) -> np.ndarray:
        """The CF coefficients the proof derives (checked against `sent` when given)."""
        if not isinstance(proof, dict):
            raise _refuse("no derivation of the CF coefficients")
        if proof.get("zero") is True:
            beta = np.zeros(self.p)
        else:
            ref = _floats(proof.get("ref"), self.p, "the Newton step's starting point")
            t = _number(proof.get("t"), 0.0, 1.0, "the Newton step's length")
            if t not in {2.0 ** -j for j in range(derive.MAX_HALVINGS + 1)}:
                raise _refuse(f"the Newton step's length {t!r} is not a halving of the full step")
            l2 = _number(proof.get("l2", 0.0), 0.0, 1e6, "the ridge penalty")
            stats = self.statements.group(proof.get("stats"), "stats")
            ref_hash = derive.values_hash(ref)
            if any(st.get("beta") != ref_hash or st.get("std") != self.std_hash for st in stats):
                raise _refuse("the CF statistics were computed at other coefficients or another standardisation")
            try:
                beta = derive.newton_candidate(ref, derive.pool_stats(stats, self.p), l2, t)
            except (KeyError, TypeError, ValueError, np.linalg.LinAlgError):
                raise _refuse("the Newton step cannot be computed from the signed CF statistics") from None
        if sent is not None and not np.allclose(beta, sent, rtol=BETA_RTOL, atol=BETA_ATOL):
            raise _refuse(f"the CF coefficients (hash {derive.values_hash(sent)[:12]}) are not the Newton iterate of the "
                          f"signed statistics (hash {derive.values_hash(beta)[:12]})")
        return beta if sent is None else sent

    # -- DL models --
    def model(self, recipe: Any, model: str, roi) -> tuple[ArrayRecord, int]:
        """(the derived weights, the round they are the aggregate of; 0 for initial weights)."""
        if not isinstance(recipe, dict):
            raise _refuse("no derivation of the model weights")
        cfg = {k: self.req[k] for k in SENT_MODEL_KEYS}
        kind = recipe.get("kind")
        try:
            if kind == "init":
                if recipe.get("model") != model:
                    raise _refuse(f"the recipe builds a {str(recipe.get('model'))[:20]!r} model, the request is for {model!r}")
                seed = int(_number(recipe.get("seed"), 0, 2**31 - 1, "the initialisation seed"))
                beta = self.beta(recipe["beta"]) if model == "combined" and recipe.get("beta") is not None else None
                return derive.initial_state(cfg, seed, model, self.shape, beta, roi), 0
            if kind == "rounds":
                return self._rounds(recipe, model, roi)
            if kind == "combine":
                if model != "combined":
                    raise _refuse(f"a combine recipe makes a Combined model, the request is for {model!r}")
                seed = int(_number(recipe.get("seed"), 0, 2**31 - 1, "the initialisation seed"))
                dl, rnd = self.model(recipe.get("dl"), "dl", roi)
                return derive.combine(cfg, seed, self.shape, dl, self.beta(recipe.get("beta"))), rnd
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise _refuse(f"the model cannot be derived from its recipe ({type(exc).__name__})") from None
        raise _refuse(f"unknown model recipe {str(kind)[:20]!r}")

    def _rounds(self, recipe: dict, model: str, roi) -> tuple[ArrayRecord, int]:
        groups, rule = recipe.get("rounds"), recipe.get("rule")
        if not isinstance(groups, list) or not groups or len(groups) > 1000:
            raise _refuse("the recipe lists no rounds")
        if rule not in derive.AGGREGATIONS:
            raise _refuse(f"unknown aggregation rule {str(rule)[:20]!r}")
        trim = _number(recipe.get("trim", 0.0), 0.0, 0.49, "the trim fraction")
        swa = recipe.get("swa", 0)
        if swa not in (0, len(groups)) or (not swa and len(groups) != 1):
            raise _refuse("the recipe's weight averaging does not cover exactly its rounds")
        prev_hash, prev_round, sums, agg = None, None, {}, None
        for idxs in groups:
            sts = self.statements.group(idxs, "update")
            rnd, start = sts[0].get("round"), sts[0].get("start")
            if any(st.get("round") != rnd or st.get("start") != start or st.get("model") != model for st in sts):
                raise _refuse("the updates of a round started from different models, rounds or model types")
            if not isinstance(rnd, int) or (prev_round is not None and (rnd != prev_round + 1 or start != prev_hash)):
                raise _refuse("the averaged rounds are not consecutive rounds of one fit")
            contents = []
            for i, st in zip(idxs, sts):
                name = f"{derive.CONTRIB}{i}"
                if name not in self.content.array_records:
                    raise _refuse(f"the evidence lacks the weights of statement {i}")
                arrays = self.content[name]
                if derive.record_hash(arrays) != st.get("payload"):
                    raise _refuse(f"the weights relayed for statement {i} are not the ones site {st['site']} signed")
                n = st.get("num-examples")
                if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                    raise _refuse(f"statement {i} has no valid num-examples")
                contents.append(derive.contribution(arrays, n))
            agg = derive.keep_roi_standardisation(derive.aggregate(contents[0]["arrays"], contents, rule, trim), roi)
            prev_hash, prev_round = derive.record_hash(agg), rnd
            if swa:
                sums = derive.swa_add(sums, agg)
        return (derive.swa_mean(agg, sums, len(groups)) if swa else agg), int(prev_round)


def verify_request(mtype: str, req: Mapping[str, Any], content: RecordDict, roster: Roster,
                   shape: Mapping[str, Any]) -> str | None:
    """Refused (rule unverified-model) unless the request's model is the one its evidence derives.
    Returns the hash of the verified DL weights (a train reply's statement names it as its start)."""
    if mtype not in VERIFIED_TYPES:
        return None
    v = Verifier(mtype, req, content, roster, shape)
    roi = v.standardisation()
    if str(req.get("roi-stats-reference") or ""):  # the study's reference, never the sites' sums
        try:
            roi = derive.roi_reference(req["roi-stats-reference"], None if roi is None else len(roi[0]))
        except ValueError as exc:
            raise _refuse(f"the ROI statistics' reference cannot be used ({exc})") from None
    model = req.get("model", "cf")
    if mtype == "query.logistic_stats" or model == "cf":
        v.beta(v.recipe.get("beta"), np.asarray(req["beta"], dtype=np.float64))
        return None
    if "arrays" not in content.array_records:
        raise Refused("request", f"{mtype} of a DL model needs the model weights ('arrays')")
    derived, rnd = v.model(v.recipe.get("model"), model, roi)
    want, sent = derive.record_hash(derived), derive.record_hash(content["arrays"])
    if want != sent:
        raise _refuse(f"the {model} weights sent (hash {sent[:12]}) are not the ones this site derives from the "
                      f"evidence (hash {want[:12]}; a different torch build also changes it)")
    r = int(req.get("round", 0))
    if mtype == "train" and rnd != r - 1:
        raise _refuse(f"round {r} must start from round {r - 1}'s model, the evidence derives round {rnd}'s")
    if mtype == "evaluate" and not req.get("store") and r and rnd != r:
        raise _refuse(f"the evaluation of round {r} must be of round {r}'s model, the evidence derives round {rnd}'s")
    return sent


def statement(mtype: str, site: str, req: Mapping[str, Any], metrics: Mapping[str, Any],
              reply_arrays: ArrayRecord | None, start: str | None) -> dict | None:
    """What the site signs with its reply: its contribution, bound to this study, fit, fold and round
    (and, for an update, the hash of the model it started from)."""
    base = {"site": site, "study-id": req["study-id"], "fold": req["fold"], "seed": req["seed"]}
    if mtype == "query.clinical_sums":
        return {**base, "kind": "sums", **{k: metrics[k] for k in ("num-examples", "sum", "sumsq", "roi-sum", "roi-sumsq")
                                           if k in metrics}}
    if mtype == "query.logistic_stats":
        return {**base, "kind": "stats", "beta": derive.values_hash(req["beta"]),
                "std": derive.values_hash(req["clinical-mean"], req["clinical-std"]),
                **{k: metrics[k] for k in ("num-examples", "grad", "hess", "loglik")}}
    if mtype == "train" and reply_arrays is not None:
        return {**base, "kind": "update", "model": req["model"], "round": req["round"], "start": start,
                "payload": derive.record_hash(reply_arrays), "num-examples": metrics["num-examples"]}
    return None
