"""The study protocol the ServerApp runs: CF model, MRI DL model and Combined model, CV + validation.

A study is a list of fits (`study_plan`). Each fit names the sites that train, the sites whose
held-out fold is evaluated ("val", cross-validation) and the sites evaluated on all patients ("test",
external validation). For each fit and model:
  - clinical standardisation from summed feature statistics of the training sites;
  - CF model: exact federated logistic regression, Newton-Raphson on summed gradients / Hessians;
  - DL / Combined: R rounds of local training + FedAvg (the aggregation Flower's FedAvg strategy uses,
    weighted by num-examples; FedProx via fedprox-mu at the sites), a checkpoint after every round;
  - evaluation: sites store per-patient scores locally and reply the loss and AUC only.
Repeated cross-validation (cv-repeats R): every CV family ("cv", "local-<site>", "central") is run R
times, repeat r > 0 under tag "<family>-r<r>" with its own fold seed (`fold_seed`); the sites treat it
as new patient groups (their max-partitions and no-differencing rules apply), and the threshold, the
headline rows and the figures stay those of repeat 0.
At the end each site summarises its stored predictions (exact AUC with DeLong CI, calibration, DeLong
tests, and k-safe score cells); the server picks the Youden threshold on the pooled out-of-fold cells
of the training sites and derives every operating point and decision curve from the cells.

Each site answers under its own privacy policy (client/disclosure.py). A refused request (or one the
site cannot do, e.g. too few patients for the folds) is not fatal: the site sits out that step (a
fit, an evaluation, a summary), the study goes on with the others, and the report lists it.

Faults (issue 15): a failed or missing reply is asked again (site-retries, backoff doubling from
retry-backoff-s). A training site still away is left out of that round's aggregate, and a training
update that fails the checks of server/robust.py is rejected, while at least min-train-sites updates
remain; otherwise the study checkpoints and stops (StudyStopped) with how to resume. A site away for a
step every site of a fit must answer (standardisation, CF statistics) leaves that fit's training on the
same condition. A missing evaluation or summary is reported missing. All of it is in state["faults"]
and the report.

The protocol talks to sites only through `Federation`, a thin wrapper over Flower's Grid.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import (
    aggregate_metricrecords,
    validate_message_reply_consistency,
)

from common import derive
from common import metrics as M
from common.config import SENT_MODEL_KEYS, model_list
from common.logistic import LogisticFitError, newton_fit, newton_step
from common.model_input import ModelInputError
from common.model_input import validate as validate_model_input
from common.packing import PackingError, is_packed, pack, unpack
from common.records import SITE_CANNOT, SITE_REFUSED, arrays_to_numpy, numpy_to_record, score_cells, to_config_record
from server.checkpoint import WRITING, Checkpoint, StudyInterrupted, StudyStopped
from server.grid import has_push_pull, send_and_receive
from server.robust import aggregate, check_updates

log = logging.getLogger(__name__)
DL_MODELS = ("dl", "combined")
# multisite simulation: the site holding all hospitals' patients, for the "centralized" comparison
CENTRAL_SITE = "pooled-centralized"



class StudyError(RuntimeError):
    """The study cannot go on (a site failed, too few sites, inconsistent data)."""


class Replies(dict):
    """{site: reply content} of the sites that answered, plus `refused`: {site: reason} of those
    that refused under their policy or could not do it, and `failed`: {site: reason} of those that
    sent another error or no reply, every retry included (away for this step)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refused: dict[str, str] = {}
        self.failed: dict[str, str] = {}


MAX_BACKOFF_S = 300.0


# ---- talking to sites ---------------------------------------------------------------------------
class Federation:
    """Node discovery and request/reply over a Flower Grid, with site names instead of node ids."""

    def __init__(self, grid: Grid, min_sites: int, timeout_s: float, retries: int = 0, backoff_s: float = 0.0,
                 registered: dict[int, str] | None = None):
        self.grid = grid
        # the coordinator's site registry (server/registry.py): node id -> site; when given, only these
        # nodes are enrolled, under these names, and any other connected node is logged and ignored
        self.registered = dict(registered or {})
        ignored: set[int] = set()
        self.retries, self.backoff_s = int(retries), float(backoff_s)
        self.retried = 0  # requests sent again (all steps), for the report
        deadline = time.monotonic() + timeout_s
        while True:
            self.node_ids = sorted(grid.get_node_ids())
            if self.registered:
                for node in sorted(set(self.node_ids) - set(self.registered) - ignored):
                    log.warning("node %s is connected but not a registered site (not in the site registry): "
                                "ignored, it gets no message", node)
                    ignored.add(node)
                self.node_ids = [n for n in self.node_ids if n in self.registered]
            if len(self.node_ids) >= min_sites:
                break
            if time.monotonic() > deadline:
                raise StudyError(f"only {len(self.node_ids)} site(s) connected after {timeout_s:.0f} s, need {min_sites}")
            time.sleep(1.0)
        self.timeout_s = timeout_s
        self.bytes_sent = 0
        self.evidence_bytes: dict[str, int] = {}  # message type -> bytes of relayed evidence sent
        self.last_evidence_bytes = 0  # of the last message sent with evidence
        self.site_of: dict[int, str] = {}
        self.node_of: dict[str, int] = {}
        self.released: dict[str, dict[str, int]] = {}  # site -> message type -> replies received
        self.would_refuse: list[dict] = []  # what virtual sites under span-audit = report answered (_would_refuse)

    def ask(self, sites: list[str] | list[int], message_type: str, config: dict, arrays: ArrayRecord | None = None,
            group: str = "", evidence: dict | None = None) -> Replies:
        """Send one message to each site. A refusal goes to `.refused`; another error reply or no
        reply within the timeout is asked again (`retries` times, waiting backoff_s, 2 x, 4 x ...),
        then goes to `.failed`. The same request is sent each time (a site answers an identical
        repeat the same, see client/disclosure.py query-budget). `evidence`: the derivation of the
        request's model (a recipe holding signed entries, see `with_evidence`), which the sites verify."""
        out = Replies()
        extra = with_evidence(evidence) if evidence is not None else {}
        # over a SuperLink a model travels as two arrays, not one object per array (common/packing.py)
        if has_push_pull(self.grid):
            arrays = None if arrays is None else pack(arrays)
            extra = {k: pack(r) if isinstance(r, ArrayRecord) else r for k, r in extra.items()}
        pending = [s if isinstance(s, int) else self.node_of[s] for s in sites]
        why: dict[int, str] = {}
        for attempt in range(self.retries + 1):
            if not pending:
                break
            if attempt:
                wait = min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                log.warning("asking %s again for %s in %.1f s (retry %d of %d): %s", [self.site_of.get(n, n) for n in pending],
                            message_type, wait, attempt, self.retries, "; ".join(why[n] for n in pending))
                time.sleep(wait)
                self.retried += len(pending)
            messages = []
            for node in pending:
                content = RecordDict({"config": to_config_record(config)})
                if arrays is not None:
                    content["arrays"] = arrays
                    self.bytes_sent += arrays.count_bytes()
                for name, record in extra.items():
                    content[name] = record
                if extra:
                    size = self.last_evidence_bytes = sum(r.count_bytes() for r in extra.values())
                    self.bytes_sent += size
                    self.evidence_bytes[message_type] = self.evidence_bytes.get(message_type, 0) + size
                messages.append(Message(content=content, dst_node_id=node, message_type=message_type, group_id=group))
            answered = set()
            for rep in send_and_receive(self.grid, messages, self.timeout_s):
                node = rep.metadata.src_node_id
                if node not in pending or node in answered:
                    continue  # not asked in this attempt, or a duplicate
                name = self.site_of.get(node, f"node {node}")
                key = name if node in self.site_of else node
                if rep.has_error():
                    if rep.error.code in (SITE_REFUSED, SITE_CANNOT):
                        log.warning("site %s sits out %s: %s", name, message_type, rep.error.reason)
                        out.refused[key] = str(rep.error.reason)
                        answered.add(node)
                    else:
                        why[node] = f"error reply (code {rep.error.code}): {str(rep.error.reason)[:300]}"
                    continue
                if isinstance(rep.content.get("arrays"), ArrayRecord) and is_packed(rep.content["arrays"]):
                    try:
                        rep.content["arrays"] = unpack(rep.content["arrays"])
                    except PackingError as exc:
                        why[node] = f"reply with malformed arrays: {exc}"
                        continue
                answered.add(node)
                out[key] = rep.content
                if "notes" in rep.content and "span-audit" in rep.content["notes"]:
                    self._would_refuse(str(key), message_type, config)
                counts = self.released.setdefault(str(key), {})
                counts[message_type] = counts.get(message_type, 0) + 1
            for node in pending:
                if node not in answered and node not in why:
                    why[node] = f"no reply within {self.timeout_s:.0f} s"
            pending = [n for n in pending if n not in answered]
            for n in answered:
                why.pop(n, None)
        for node in pending:
            key = self.site_of.get(node, node)
            out.failed[key] = f"{why[node]} (asked {self.retries + 1} time(s))"
            log.error("site %s is away for %s: %s", key, message_type, out.failed[key])
        return out


    def _would_refuse(self, site: str, message_type: str, config: dict) -> None:
        """A virtual site under span-audit = report answered what a real site would refuse: kept for
        the report (which fits a real site would sit out)."""
        sid = str(config.get("study-id", ""))
        entry = {"site": site, "fit": sid.split("/", 1)[1] if "/" in sid else "", "fold": int(config.get("fold", -1)),
                 "step": message_type}
        if entry not in self.would_refuse:
            self.would_refuse.append(entry)


def metrics_of(content: RecordDict) -> dict[str, Any]:
    return dict(content["metrics"])


def signed_of(content: RecordDict, with_arrays: bool = False) -> dict | None:
    """A reply's signed statement (client/verify.py) as an evidence entry; None when unsigned (a site
    that does not verify models signs nothing, and enforcing sites then refuse what is made of it)."""
    if "signed" not in content.config_records:
        return None
    rec = content["signed"]
    entry = {"statement": str(rec["statement"]), "signature": derive.signature_text(rec["signature"])}
    if with_arrays:
        entry["arrays"] = content["arrays"]
    return entry


def with_evidence(recipe: Any) -> dict[str, Any]:
    """The request records of a recipe whose leaves are evidence entries: each entry becomes its index
    in the evidence (common/derive.py Evidence). An unsigned entry (None) stays None: the sites refuse."""
    ev = derive.Evidence()

    def indexed(obj):
        if isinstance(obj, dict) and "statement" in obj:
            return ev.ref(obj)
        if isinstance(obj, dict):
            return {k: indexed(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [indexed(v) for v in obj]
        return obj
    return ev.records(indexed(recipe))


# ---- the plan -----------------------------------------------------------------------------------
@dataclass
class Fit:
    tag: str                      # prediction-store namespace: "cv", "final", "loco-<site>", "local-<site>"
    fold: int                     # 0..folds-1, or -1 for a fit on all training patients
    train: list[str]
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    repeat: int = 0               # repeated CV (cv-repeats): r > 0 is tag "<family>-r<r>" with its own fold seed


def fold_seed(seed: int, repeat: int) -> int:
    """The seed of repeat `repeat`'s fold assignment: the study seed for repeat 0 (today's folds, so
    cv-repeats = 1 changes nothing), a derived one for each further repeat."""
    if repeat == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(repeat)]).generate_state(1)[0] % 2**31)


def repeat_tag(family: str, repeat: int) -> str:
    """The fit tag of a CV family's repeat: its prediction-store namespace at the sites, so every repeat
    has its own stored predictions, query budget and summary (client/disclosure.py STUDY_ID)."""
    return family if repeat == 0 else f"{family}-r{repeat}"


def family_of(fit: dict | Fit) -> str:
    """The CV family of a planned fit ("cv", "central", "local-<site>"), whatever its repeat."""
    tag, r = (fit.tag, fit.repeat) if isinstance(fit, Fit) else (fit["tag"], int(fit.get("repeat", 0)))
    return tag[: -len(f"-r{r}")] if r else tag


def study_plan(scenario: str, sites: dict[str, dict], folds: int, eval_sites: list[str], repeats: int = 1) -> list[Fit]:
    """The fits of the study. With repeats R > 1 every cross-validation family is run again R - 1
    times with other fold assignments; those fits come after today's plan, so the indices (and the
    seeded initial weights) of repeat 0 and of the final fits do not depend on R."""
    plan = _single_plan(scenario, sites, folds, eval_sites)
    families = [f for f in plan if f.fold >= 0]
    for r in range(1, repeats):
        plan += [Fit(repeat_tag(f.tag, r), f.fold, list(f.train), val=list(f.val), test=list(f.test), repeat=r)
                 for f in families]
    return plan


def _single_plan(scenario: str, sites: dict[str, dict], folds: int, eval_sites: list[str]) -> list[Fit]:
    names = sorted(sites)
    labelled = [s for s in names if sites[s]["has-labels"]]
    if scenario == "paper":
        train = [s for s in labelled if s not in eval_sites]
        test = [s for s in names if s in eval_sites]
        if not train:
            raise StudyError(f"paper scenario: no training site (sites {names}, evaluate-only {eval_sites})")
        plan = [Fit("cv", k, list(train), val=list(train)) for k in range(folds)]
        return plan + [Fit("final", -1, list(train), test=list(test))]
    if scenario in ("federated", "multisite"):
        central = [s for s in labelled if s == CENTRAL_SITE]
        hospitals = [s for s in labelled if s != CENTRAL_SITE]
        if len(hospitals) < 2:
            raise StudyError(f"{scenario} scenario needs at least two labelled sites, found {hospitals}")
        plan = [Fit("cv", k, list(hospitals), val=list(hospitals)) for k in range(folds)]
        plan += [Fit(f"loco-{h}", -1, [s for s in hospitals if s != h], test=[h]) for h in hospitals]
        if scenario == "multisite":
            for s in hospitals:
                plan += [Fit(f"local-{s}", k, [s], val=[s]) for k in range(folds)]
            # the centralized comparison: a simulation-only site holding every hospital's patients
            plan += [Fit("central", k, list(central), val=list(central)) for k in range(folds)] if central else []
        return plan
    raise StudyError(f"unknown scenario {scenario!r}")


# ---- stochastic weight averaging (swa-rounds): the running sum travels in the checkpoint ----------
SWA_PREFIX = "swa-sum."


def _malformed_sums(replies: Replies, n_features: int, n_roi_stats: int) -> dict[str, str]:
    """{site: what is wrong} for standardisation replies whose sums the coordinator cannot pool: a count
    that is not a positive whole number, sums not finite or of another length than the clinical
    vector's or the ROI statistics' (2 per image channel)."""
    bad = {}
    for site, content in replies.items():
        m = metrics_of(content)
        n = m.get("num-examples")
        if not isinstance(n, (int, np.integer)) or n < 1:
            bad[site] = f"num-examples {n!r}"
            continue
        for key in ("sum", "sumsq", "roi-sum", "roi-sumsq"):
            if key not in m:
                continue
            v = np.asarray(m[key], dtype=np.float64)
            want = n_features if key in ("sum", "sumsq") else n_roi_stats
            if v.ndim != 1 or v.size != want or not np.isfinite(v).all():
                bad[site] = f"{key}: expected {want} finite values, found shape {v.shape}"
                break
    return bad


def _unpack_swa(record: ArrayRecord | None) -> tuple[ArrayRecord | None, dict[str, np.ndarray]]:
    if record is None:
        return None, {}
    arrays = arrays_to_numpy(record)
    plain = {k: v for k, v in arrays.items() if not k.startswith(SWA_PREFIX)}
    sums = {k[len(SWA_PREFIX):]: v for k, v in arrays.items() if k.startswith(SWA_PREFIX)}
    return (record if not sums else numpy_to_record(plain)), sums


def _pack_swa(arrays: ArrayRecord, sums: dict[str, np.ndarray]) -> ArrayRecord:
    if not sums:
        return arrays
    return numpy_to_record({**arrays_to_numpy(arrays), **{SWA_PREFIX + k: v for k, v in sums.items()}})


# ---- the study ----------------------------------------------------------------------------------
class Study:
    """Runs the plan; all state needed to resume lives in `self.state` (JSON) + the current weights."""

    def __init__(self, fed: Federation, cfg: dict, checkpoint: Checkpoint,
                 on_progress: Callable[[str], None] | None = None):
        self.fed, self.cfg, self.ckpt = fed, cfg, checkpoint
        self.models = model_list(cfg)
        if "combined" in self.models and cfg["combined-from"] == "dl+cf" and not {"cf", "dl"} <= set(self.models):
            raise StudyError(f"combined-from = dl+cf makes the Combined model from the DL and CF models: models "
                             f"{','.join(self.models)} lacks {' and '.join(sorted({'cf', 'dl'} - set(self.models)))}; "
                             "add them or set combined-from = cf")
        self.say = on_progress or (lambda m: log.info(m))
        self.rounds_done_this_run = 0
        self.state: dict[str, Any] = {}
        # "tag/fold" -> pooled (mean, SD) of the ROI statistics (standardisation); re-asked on a resume
        self.roi_standardisation: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # "tag/fold" -> the training sites' signed standardisation sums, relayed with every request of the fit
        self.std_evidence: dict[str, list] = {}

    # -- set-up --
    def start(self) -> None:
        if self.cfg["resume"] and self.ckpt.exists():
            self.state = self.ckpt.load_state()
            self.say(f"resuming study {self.state['study_id']} at {self.state['position']}")
        else:
            self.state = {"study_id": uuid.uuid4().hex[:12], "position": {"fit": 0, "model": 0, "round": 0},
                          "evaluations": [], "cf": {}, "history": [], "bytes": {}, "sat_out": [], "fits": {}}
        for key, empty in (("sat_out", []), ("fits", {}), ("released", {}), ("incomplete", []), ("not_computed", []),
                           ("faults", []), ("train_counts", {}), ("would_refuse", [])):
            self.state.setdefault(key, empty)
        self.fed.released = self.state["released"]  # what left each site, kept across resumes
        self.fed.would_refuse = self.state["would_refuse"]
        info = self.fed.ask(self.fed.node_ids, "query.info", {})
        if info.refused:
            raise StudyError(f"sites refused to describe themselves: {info.refused}")
        if info.failed:  # the plan needs every connected site's description
            self._stop(f"site(s) {sorted(map(str, info.failed))} did not describe themselves: {info.failed}")
        sites, policies, inputs = {}, {}, {}
        for node, content in info.items():
            m = metrics_of(content)
            name = str(self._site_name(node, content))
            if name in sites:
                raise StudyError(f"two sites call themselves {name!r}: give each SuperNode its own site-name")
            sites[name] = m
            policies[name] = dict(content["policy"]) if "policy" in content else {}
            try:  # how the site prepared its model inputs: kept with the final models (models/<fit>.json)
                inputs[name] = validate_model_input(content["model-input"] if "model-input" in content else {},
                                                    f"site {name}")
            except ModelInputError as exc:
                raise StudyError(str(exc)) from None
            self.fed.site_of[node] = name
            self.fed.node_of[name] = node
            counts = self.fed.released.setdefault(name, {})  # the info reply came before the name was known
            for mtype, n in self.fed.released.pop(str(node), {}).items():
                counts[mtype] = counts.get(mtype, 0) + n
            if not int(m.get("cohort-released", 1)):
                reason = dict(content["notes"]).get("cohort", "") if "notes" in content else ""
                self.sit_out("whole study", -1, name, "all", reason)
        self.sites = sites
        self.state["sites"] = {s: {"num-examples": int(m["num-examples"]), "num-positive": int(m["num-positive"]),
                                   "has-labels": bool(m["has-labels"]), "policy": policies[s], "model-input": inputs[s],
                                   "cohort-released": bool(int(m.get("cohort-released", 1)))} for s, m in sites.items()}
        shapes = {tuple(int(x) for x in m["image-shape"]) for m in sites.values()}
        if len(shapes) != 1:
            raise StudyError(f"sites prepared different model inputs {sorted(shapes)}: use the same `slmfed prepare` settings")
        first = next(iter(sites.values()))
        self.n_channels, self.spatial_dims, self.n_features = int(first["n-channels"]), int(first["spatial-dims"]), int(first["n-features"])
        channels = {tuple(inputs[s].get("channels") or ()) for s in sites}
        if len(channels) != 1:  # the same shape from different inputs (e.g. a mask where another site has none)
            raise StudyError(f"sites prepared different input channels {sorted(channels)}: use the same `slmfed prepare` settings")
        self.channels = list(channels.pop()) or None  # names tell the model which channels hold the ROI mask
        eval_sites = [s.strip() for s in str(self.cfg["eval-sites"]).split(",") if s.strip()]
        # a site whose cohort cannot be released (e.g. it grew by fewer than k patients since a released
        # study) answers nothing in this study: plan without it
        usable = {s: m for s, m in sites.items() if self.state["sites"][s]["cohort-released"]}
        self.plan = study_plan(self.cfg["scenario"], usable, int(self.cfg["folds"]), eval_sites,
                               int(self.cfg["cv-repeats"]))
        self.state["plan"] = [asdict(f) for f in self.plan]

    def _site_name(self, node: int, content: RecordDict) -> str:
        if node in self.fed.registered:  # named by registration, never by the node's own claim
            name = self.fed.registered[node]
            claimed = str(content["site"]["site-name"]) if "site" in content and "site-name" in content["site"] else ""
            if claimed and claimed != name:
                log.warning("node %s calls itself %r but is registered as %r: using %r", node, claimed, name, name)
            return name
        if "site" in content and "site-name" in content["site"]:
            return str(content["site"]["site-name"])
        return f"node-{node}"

    def sit_out(self, tag: str, fold: int, site: str, step: str, reason: str) -> None:
        """Record that `site` does not take part in `step` of fit (tag, fold), and why."""
        entry = {"tag": tag, "fold": fold, "site": site, "step": step, "reason": reason}
        if entry not in self.state["sat_out"]:
            self.state["sat_out"].append(entry)
            self.say(f"{site} sits out {tag} fold {fold} ({step}): {reason}")

    def _drop_refused(self, fit: Fit, replies: Replies, step: str, role: str) -> list[str]:
        """The refusing sites sit out `step` and leave `role` of this fit (only); returns them."""
        for site, reason in replies.refused.items():
            self.sit_out(fit.tag, fit.fold, site, step, reason)
            setattr(fit, role, [s for s in getattr(fit, role) if s != site])
        return list(replies.refused)

    def fault(self, fit: Fit, site: str, step: str, kind: str, reason: str, model: str = "", rnd: int = 0) -> None:
        """Record a fault the study survived (kind: away = left out of a round, left = dropped from a
        fit, rejected = update rejected, missing = an evaluation / summary not answered) or that
        stopped it (stopped)."""
        entry = {"tag": fit.tag, "fold": fit.fold, "model": model, "round": rnd, "site": site, "step": step,
                 "kind": kind, "reason": reason}
        if entry not in self.state["faults"]:
            self.state["faults"].append(entry)
            (log.error if kind == "stopped" else log.warning)("%s %s fold %d %s round %d, %s: %s (%s)", site, fit.tag,
                                                              fit.fold, model, rnd, step, kind, reason)

    def _stop(self, reason: str, arrays: ArrayRecord | None = None) -> None:
        """Checkpoint what is done (the position is the last completed step) and stop, resumable."""
        rnd = self.state.get("position", {}).get("round", 0)
        if rnd > 0 and arrays is not None:
            self.ckpt.save(self.state, arrays)
        elif rnd == 0 and "position" in self.state:
            self.ckpt.save_state(self.state)
        # else (stopped while resuming, before any round): the checkpoint on disk holds this position
        raise StudyStopped(f"the study cannot go on: {reason}. Everything done so far is checkpointed in "
                           f"{self.ckpt.dir}; when the site(s) answer again, resume: `slmfed simulate --resume RUN_DIR` "
                           "(simulation) or `flwr run` with run config resume=true and the same run-dir (deployment)")

    def _sites_away(self, fit: Fit, replies: Replies, step: str) -> None:
        """Sites that did not answer a step a fit needs from all of them: they leave this fit's
        training while at least min-train-sites remain; otherwise the study stops."""
        if not replies.failed:
            return
        left = [s for s in fit.train if s not in replies.failed]
        need = int(self.cfg["min-train-sites"])
        if len(left) < need or not left:
            for site, reason in replies.failed.items():
                self.fault(fit, site, step, "stopped", reason)
            self._stop(f"{fit.tag} fold {fit.fold} {step}: {sorted(replies.failed)} away, {len(left)} training "
                       f"site(s) left, min-train-sites = {need}")
        for site, reason in replies.failed.items():
            self.fault(fit, site, step, "left", reason)
        fit.train = left

    def _not_computed(self, fit: Fit, models: list[str], step: str, reason: str) -> None:
        """These models of this fit do not exist: reported, and left out of the fit tag's summaries."""
        self.sit_out(fit.tag, fit.fold, "(every training site)", step, reason)
        self.state["not_computed"] += [[fit.tag, m] for m in models]

    # -- helpers --
    def _base(self, fit: Fit) -> dict:
        # a CV repeat sends its own seed: the site's fold assignment (and local training stream) follow it
        return {"fold": fit.fold, "folds": int(self.cfg["folds"]), "seed": fold_seed(int(self.cfg["seed"]), fit.repeat),
                "study-id": f"{self.state['study_id']}/{fit.tag}"}

    def _dp_fits(self) -> int:
        """DL trainings the plan asks of its busiest training site (every CV repeat included): a site
        under DP calibrates its noise for this many (client/dp.py); declaring fewer would only get later
        rounds refused."""
        trained = ("dl", "combined") if self.cfg["combined-from"] == "cf" else ("dl",)
        n_dl = sum(m in trained for m in self.models)
        per_site = [sum(s in f.train for f in self.plan) for s in {s for f in self.plan for s in f.train}]
        return max(1, max(per_site, default=1) * n_dl)

    def _record_dp(self, model: str, site_metrics: dict[str, dict]) -> None:
        """The DP figures a site reports with each training reply (epsilon spent so far in this study,
        overall and for this model, and the mechanism's parameters), latest value per site."""
        for site, m in site_metrics.items():
            if "dp-epsilon" not in m:
                continue
            rec = self.state.setdefault("dp", {}).setdefault(site, {"epsilon-per-model": {}})
            rec.update({k[3:]: float(m[k]) for k in ("dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-clip-norm",
                                                     "dp-sample-rate", "dp-lifetime-epsilon", "dp-lifetime-budget")
                        if k in m})
            rec["epsilon-per-model"][model] = float(m["dp-epsilon-model"])
            rec["steps"] = rec.get("steps", 0) + int(m["dp-steps"])

    def _model_keys(self) -> dict:
        return {k: self.cfg[k] for k in SENT_MODEL_KEYS}

    def standardisation(self, fit: Fit) -> tuple[np.ndarray, np.ndarray] | None:
        """Pooled feature mean / SD of the fit's training sites; a refusing site sits the fit out. The
        pooled mean / SD of the model's ROI statistics, when every site sent their sums, are kept in
        self.roi_standardisation[fit.tag/fit.fold] for the model's initial weights (initial_state).
        The sites' signed sums are kept too: every later request of the fit relays them, so each site
        recomputes the standardisation it is sent (client/verify.py)."""
        from common.model import roi_channels

        n_roi_stats = 2 * (self.n_channels - len(roi_channels(self.channels)))
        reference = self.roi_reference(n_roi_stats)
        ask = {**self._base(fit), **({"roi-sums": False} if reference is not None else {})}
        replies = self.fed.ask(fit.train, "query.clinical_sums", ask, group=f"{fit.tag}/{fit.fold}/std")
        self._drop_refused(fit, replies, "training", "train")
        for site, why in _malformed_sums(replies, self.n_features, n_roi_stats).items():  # left out like a site that is away
            del replies[site]
            replies.failed[site] = f"malformed query.clinical_sums reply: {why}"
        self._sites_away(fit, replies, "standardisation")
        if not replies:
            return None
        # each site's training patients in this fit: its training replies must count the same
        self.state["train_counts"][f"{fit.tag}/{fit.fold}"] = {s: int(metrics_of(c)["num-examples"]) for s, c in replies.items()}
        mean, std, roi = derive.pool_sums([metrics_of(c) for c in replies.values()])
        roi = reference if reference is not None else roi
        if roi is not None:
            self.roi_standardisation[f"{fit.tag}/{fit.fold}"] = roi
        self.std_evidence[f"{fit.tag}/{fit.fold}"] = [signed_of(c) for c in replies.values()]
        return mean, std

    def roi_reference(self, n_roi_stats: int):
        """The study's ROI-statistics reference (roi-stats-reference), or None: pooled from the sums."""
        try:
            return derive.roi_reference(self.cfg["roi-stats-reference"], n_roi_stats) if n_roi_stats else None
        except ValueError as exc:
            raise StudyError(str(exc)) from None

    def _std(self, fit: Fit) -> list:
        return self.std_evidence.get(f"{fit.tag}/{fit.fold}", [None])

    def fit_cf(self, fit: Fit, mean, std) -> dict | None:
        base = {**self._base(fit), "clinical-mean": mean, "clinical-std": std}
        p = self.n_features + 1
        l2 = float(self.cfg["cf-l2"])
        points: list[dict] = []  # where the sites answered: coefficients, their signed statistics, the pooled ones

        def stats(beta: np.ndarray) -> dict:
            proof = beta_proof(np.asarray(beta, float), points, l2)
            replies = self.fed.ask(fit.train, "query.logistic_stats", {**base, "beta": np.asarray(beta, float)},
                                   group=f"{fit.tag}/{fit.fold}/cf", evidence={"std": self._std(fit), "beta": proof})
            if replies.refused or replies.failed:
                raise _SiteLeft(replies)
            ms = [metrics_of(c) for c in replies.values()]
            pooled = derive.pool_stats(ms, p)
            points.append({"beta": np.asarray(beta, float), "pooled": pooled,
                           "entries": [signed_of(c) for c in replies.values()]})
            return pooled

        while fit.train:
            points.clear()
            try:
                res = newton_fit(stats, p, l2=l2)
                break
            except _SiteLeft as left:  # refit without the site that refused (e.g. a crafted-looking step) or is away
                self._drop_refused(fit, left.replies, "CF model fit", "train")
                self._sites_away(fit, left.replies, "CF model fit")
            except LogisticFitError as exc:  # e.g. a small site alone separates: the fit does not exist
                return {"error": str(exc)}
        else:
            return None
        return {"beta": np.asarray(res.beta).tolist(), "cov": np.asarray(res.cov).tolist(),
                "n_iter": int(res.n_iter), "converged": bool(res.converged), "loglik": float(res.loglik),
                "proof": beta_proof(np.asarray(res.beta), points, l2)}

    def evaluate(self, fit: Fit, model: str, mean, std, arrays: ArrayRecord | None, beta=None, *, store: bool,
                 rnd: int | None = None, recipe: dict | None = None) -> None:
        """`recipe`: the derivation of a DL model's weights (its leaves evidence entries); a CF model's
        coefficients are proven by the fit's stored CF proof."""
        base = {**self._base(fit), "clinical-mean": mean, "clinical-std": std, "model": model, "store": store,
                "round": int(rnd or 0), "num-rounds": int(self.cfg["num-rounds"])}
        evidence: dict[str, Any] = {"std": self._std(fit)}
        if beta is not None:
            base["beta"] = np.asarray(beta, float)
            evidence["beta"] = (self.state["cf"].get(f"{fit.tag}/{fit.fold}") or {}).get("proof")
        else:
            base.update(self._model_keys())
            evidence["model"] = recipe
        for part, role in (("val", "val"), ("all", "test")):
            sites = getattr(fit, role)
            if not sites:
                continue
            replies = self.fed.ask(sites, "evaluate", {**base, "part": part}, arrays=arrays,
                                   group=f"{fit.tag}/{fit.fold}/{model}/eval", evidence=evidence)
            # not asked again in this fit; its summary for this fit tag would miss this fold
            for site in self._drop_refused(fit, replies, f"evaluation ({part}, from {model})", role):
                self.state["incomplete"].append([fit.tag, site])
            for site, reason in replies.failed.items():  # retried already: reported missing, never dropped silently
                step = f"evaluation ({part}, round {rnd})" if rnd is not None else f"evaluation ({part})"
                self.fault(fit, site, step, "missing", reason, model=model, rnd=int(rnd or 0))
                if store:  # its summary for this fit tag would miss this fold's predictions
                    self.state["incomplete"].append([fit.tag, site])
            for site, content in replies.items():
                m = metrics_of(content)
                rec = {"tag": fit.tag, "fold": fit.fold, "model": model, "site": site, "part": part,
                       "round": rnd, "stored": store, **{k: m[k] for k in m}}
                (self.state["history"] if rnd is not None else self.state["evaluations"]).append(rec)

    @property
    def shape(self) -> dict:
        """The model input the sites prepared, as common/derive.py builds models for it."""
        return {"n-channels": self.n_channels, "spatial-dims": self.spatial_dims, "n-features": self.n_features,
                "channels": self.channels}

    def initial_state(self, model: str, fit_index: int, fit: Fit, cf_beta=None) -> ArrayRecord:
        """Seeded initial weights (common/derive.py, which the sites recompute); the Combined model
        starts from this fit's CF model when there is one; with roi-stats, the fit's pooled ROI
        standardisation (from `standardisation`) is set."""
        # the global RNG as before model verification (the models build from the study seed themselves)
        torch.manual_seed(int(np.random.SeedSequence([int(self.cfg["seed"]), fit_index, DL_MODELS.index(model)]).generate_state(1)[0] % 2**31))
        try:
            return derive.initial_state(self._model_keys(), int(self.cfg["seed"]), model, self.shape, cf_beta,
                                        self.roi_standardisation.get(f"{fit.tag}/{fit.fold}"))
        except ValueError as exc:
            raise StudyError(f"{fit.tag} fold {fit.fold}: {exc}") from None

    def _init_recipe(self, model: str, fit: Fit) -> dict:
        cf = self.state["cf"].get(f"{fit.tag}/{fit.fold}")
        return {"kind": "init", "seed": int(self.cfg["seed"]), "model": model,
                "beta": cf.get("proof") if (cf and model == "combined") else None}

    def _rounds_recipe(self, window: list[list]) -> dict:
        return {"kind": "rounds", "rounds": window, "rule": str(self.cfg["aggregation"]),
                "trim": float(self.cfg["trim-fraction"]), "swa": len(window) if len(window) > 1 else 0}

    def _keep_roi_standardisation(self, arrays: ArrayRecord, fit: Fit) -> ArrayRecord:
        """The ROI statistics' standardisation is the coordinator's (pooled sums), not the sites': an
        aggregate of the sites' copies is put back to it, whatever a site sent."""
        return derive.keep_roi_standardisation(arrays, self.roi_standardisation.get(f"{fit.tag}/{fit.fold}"))

    def fit_dl(self, fit_index: int, fit: Fit, model: str, mean, std, start_round: int,
               arrays: ArrayRecord | None) -> ArrayRecord | None:
        rounds = int(self.cfg["num-rounds"])
        cf = self.state["cf"].get(f"{fit.tag}/{fit.fold}")
        arrays, swa_sum = _unpack_swa(arrays)
        swa_from = rounds - int(self.cfg["swa-rounds"]) + 1  # rounds whose global weights are averaged
        # the signed updates of the rounds the model is made of (the last round's, and those averaged):
        # the sites recompute the model from them
        window = self.ckpt.load_evidence() if start_round else []
        recipe = self._init_recipe(model, fit) if not start_round else self._rounds_recipe(window[-1:])
        arrays = arrays if arrays is not None else self.initial_state(model, fit_index, fit, cf["beta"] if cf else None)
        train_cfg = {**self._base(fit), **self._model_keys(), "clinical-mean": mean, "clinical-std": std, "model": model,
                     "num-rounds": rounds, "dp-fits": self._dp_fits()}
        for rnd in range(start_round + 1, rounds + 1):
            t0 = time.perf_counter()
            replies = self.fed.ask(fit.train, "train", {**train_cfg, "round": rnd}, arrays=arrays,
                                   group=f"{fit.tag}/{fit.fold}/{model}/{rnd}",
                                   evidence={"std": self._std(fit), "model": recipe})
            evidence_size = self.fed.last_evidence_bytes
            self._drop_refused(fit, replies, f"training ({model}, from round {rnd})", "train")
            if not replies and not replies.failed:
                return None
            accepted, rejected = check_updates(
                arrays, replies, float(self.cfg["max-update-ratio"]),
                self.state["train_counts"].get(f"{fit.tag}/{fit.fold}"),
                {s: v["num-examples"] for s, v in self.state["sites"].items()})
            need = int(self.cfg["min-train-sites"])
            halt = not accepted or ((replies.failed or rejected) and len(accepted) < need)
            for site, reason in replies.failed.items():  # recorded per round: left out, or why the study stopped
                self.fault(fit, site, "training", "stopped" if halt else "away", reason, model=model, rnd=rnd)
            for site, reason in rejected.items():
                self.fault(fit, site, "training", "stopped" if halt else "rejected",
                           f"update rejected: {reason}" if halt else reason, model=model, rnd=rnd)
            if halt:
                self._stop(f"{fit.tag} fold {fit.fold} {model} round {rnd}: {len(accepted)} training update(s) "
                           f"accepted, min-train-sites = {need}", _pack_swa(arrays, swa_sum))
            contents = [replies[s] for s in accepted]
            self._record_dp(model, {s: metrics_of(replies[s]) for s in accepted})
            validate_message_reply_consistency(contents, weighted_by_key="num-examples", check_arrayrecord=True)
            arrays = aggregate(arrays, contents, str(self.cfg["aggregation"]), float(self.cfg["trim-fraction"]))
            arrays = self._keep_roi_standardisation(arrays, fit)
            group = [signed_of(c, with_arrays=True) for c in contents]
            window = (window if rnd > max(swa_from, 1) else []) + [group] if rnd >= swa_from else [group]
            recipe = self._rounds_recipe(window[-1:])
            if rnd >= swa_from:
                swa_sum = derive.swa_add(swa_sum, arrays)
            agg = aggregate_metricrecords(contents, "num-examples")
            timing = self.state.setdefault("timing", {"train-rounds-s": 0.0, "train-rounds": 0, "local-training-s": 0.0})
            timing["train-rounds-s"] += time.perf_counter() - t0  # send, local training, reply, FedAvg
            timing["train-rounds"] += 1
            timing["local-training-s"] += sum(float(c["metrics"]["train-seconds"]) for c in contents)
            sizes = [c["arrays"].count_bytes() for c in contents]
            # evidence: the signed updates (and sums) the site verifies its model with, beside the weights
            self.state["bytes"] = {"per-client-per-round": int(np.median(sizes)), "weights": int(arrays.count_bytes()),
                                   "evidence-per-train-request": int(evidence_size)}
            self.state["history"].append({"tag": fit.tag, "fold": fit.fold, "model": model, "round": rnd,
                                          "part": "train", "train-loss": float(agg["train-loss"]) if agg else float("nan"),
                                          "sites": list(accepted)})
            if fit.val:
                self.evaluate(fit, model, mean, std, arrays, store=False, rnd=rnd, recipe=recipe)
            self.state["position"] = {"fit": fit_index, "model": self.models.index(model), "round": rnd}
            self.state["fits"][str(fit_index)] = asdict(fit)
            with WRITING:  # the evidence and the state that needs it, as one step
                self.ckpt.save_evidence(window)
                self.ckpt.save(self.state, _pack_swa(arrays, swa_sum))
            self.rounds_done_this_run += 1
            self.say(f"{fit.tag} fold {fit.fold} {model}: round {rnd}/{rounds} done")
            stop = int(self.cfg["stop-after-rounds"])
            if stop and self.rounds_done_this_run >= stop:
                raise StudyInterrupted(f"stopped after {stop} rounds as configured (stop-after-rounds)")
        return self.swa_result(_pack_swa(arrays, swa_sum), window)

    def swa_result(self, packed: ArrayRecord, window: list[list]) -> tuple[ArrayRecord, dict]:
        """(the fit's model, its recipe), all its rounds done: with swa-rounds N, the mean of the global
        weights of its last N rounds (stochastic weight averaging, done by the server on weights it
        already holds: nothing more leaves a site); else the last round's."""
        arrays, swa_sum = _unpack_swa(packed)
        if not swa_sum:
            return arrays, self._rounds_recipe(window[-1:])
        n = min(int(self.cfg["swa-rounds"]), int(self.cfg["num-rounds"]))  # every round from swa_from on
        return derive.swa_mean(arrays, swa_sum, n), self._rounds_recipe(window[-n:])

    def combine(self, fit: Fit, dl: tuple[ArrayRecord, dict] | None) -> tuple[ArrayRecord, dict] | None:
        """combined-from = "dl+cf": (the Combined model of this fit made of its trained DL model and its
        CF model (common/derive.py combine), with no further training; its recipe)."""
        cf = self.state["cf"].get(f"{fit.tag}/{fit.fold}")
        if dl is None or cf is None:
            missing = " and ".join(m for m, a in (("DL", dl), ("CF", cf)) if a is None)
            self._not_computed(fit, ["combined"], "Combined model", f"combined-from dl+cf: this fit has no {missing} model")
            return None
        seed = int(self.cfg["seed"])
        return (derive.combine(self._model_keys(), seed, self.shape, dl[0], cf["beta"]),
                {"kind": "combine", "seed": seed, "dl": dl[1], "beta": cf.get("proof")})

    # -- the whole run --
    def run(self) -> dict:
        self.start()
        pos = self.state["position"]
        for i, fit in enumerate(self.plan):
            if i < pos["fit"]:
                continue
            if str(i) in self.state["fits"]:  # resuming: the sites that sat out before stay out
                fit = self.plan[i] = Fit(**self.state["fits"][str(i)])
            if fit.repeat and all([fit.tag, m] in self.state["not_computed"] for m in self.models):
                # an earlier fold of this CV repeat left every model not computed (e.g. its only training
                # site refused the repeat's patient groups): its summary cannot exist, so the sites are
                # asked for no more of its groups and nothing more is trained for it
                self.sit_out(fit.tag, fit.fold, "(every training site)", "the whole fit",
                             "skipped: this repeat is not computed (an earlier fold)")
                self.state["fits"][str(i)] = asdict(fit)
                self.state["position"] = {"fit": i + 1, "model": 0, "round": 0}
                continue
            std_ = self.standardisation(fit)
            self.state["fits"][str(i)] = asdict(fit)
            if std_ is None:
                self._not_computed(fit, self.models, "the whole fit", "no training site left")
                self.state["position"] = {"fit": i + 1, "model": 0, "round": 0}
                continue
            mean, std = std_
            dl_made = None  # this fit's trained DL model and its recipe, for a Combined model made of it (combine)
            if fit.fold < 0:  # the final models' standardisation, for `slmfed predict` (models/<fit>.json)
                self.state.setdefault("standardisation", {})[fit.tag] = {"mean": mean.tolist(), "std": std.tolist()}
            for j, model in enumerate(self.models):
                if i == pos["fit"] and j < pos["model"]:
                    continue
                resume_here = i == pos["fit"] and j == pos["model"] and pos["round"] > 0
                if model == "cf":
                    cf = self.fit_cf(fit, mean, std)
                    if cf is None:
                        self._not_computed(fit, ["cf"], "CF model", "no training site left")
                    elif "error" in cf:  # reported n/a for this fit tag, the rest of the study goes on
                        self._not_computed(fit, ["cf"], "CF model", f"not computable: {cf['error']}")
                    else:
                        self.state["cf"][f"{fit.tag}/{fit.fold}"] = {**cf, "mean": mean.tolist(), "std": std.tolist()}
                        self.evaluate(fit, "cf", mean, std, None, beta=cf["beta"], store=True)
                else:
                    if model == "combined" and self.cfg["combined-from"] == "dl+cf":
                        made = self.combine(fit, dl_made)  # records why when it cannot
                    else:
                        start = pos["round"] if resume_here else 0
                        made = self.ckpt.load_arrays() if resume_here else None
                        if start < int(self.cfg["num-rounds"]):
                            made = self.fit_dl(i, fit, model, mean, std, start, made)
                        elif made is not None:  # resumed after the last round: the checkpoint's model
                            made = self.swa_result(made, self.ckpt.load_evidence())
                        if made is None:
                            self._not_computed(fit, [model], f"{model} model", "no training site left")
                    if made is not None:
                        self.evaluate(fit, model, mean, std, made[0], store=True, recipe=made[1])
                        if fit.fold < 0:
                            self.ckpt.save_model(f"{fit.tag}-{model}", made[0])
                    if model == "dl":
                        dl_made = made
                self.state["fits"][str(i)] = asdict(fit)
                self.state["position"] = {"fit": i, "model": j + 1, "round": 0}
            self.state["position"] = {"fit": i + 1, "model": 0, "round": 0}
        return self.summarise()

    def summarise(self) -> dict:
        """Each site's result rows, then the Youden threshold on the pooled out-of-fold cells of the
        training sites (applied to every cohort by the report)."""
        incomplete = {tuple(x) for x in self.state["incomplete"]}
        not_computed = {tuple(x) for x in self.state["not_computed"]}
        summaries = []
        for tag in dict.fromkeys(f.tag for f in self.plan):
            fits = [f for f in self.plan if f.tag == tag]
            repeat = {"repeat": fits[0].repeat, "family": family_of(fits[0])} if fits[0].repeat else {}
            kind = "oof" if fits[0].fold >= 0 else "final"
            sites = sorted({s for f in fits for s in (f.val if kind == "oof" else f.test)})
            sites = [s for s in sites if (tag, s) not in incomplete
                     and all(s in (f.val if kind == "oof" else f.test) for f in fits)]
            # a model missing in one fold (or a fit without any model) has no complete predictions: n/a
            models = [m for m in self.models if (tag, m) not in not_computed]
            if not models:
                continue
            req = {"study-id": f"{self.state['study_id']}/{tag}", "models": ",".join(models), "kind": kind,
                   "folds": int(self.cfg["folds"])}
            replies = self.fed.ask(sites, "query.summary", req, group=f"summary/{tag}")
            for site, reason in replies.refused.items():
                self.sit_out(tag, -1, site, "results summary", reason)
            for site, reason in replies.failed.items():
                self.fault(Fit(tag, -1, []), site, "results summary", "missing", reason)
            for site, content in replies.items():
                notes = dict(content["notes"]) if "notes" in content else {}
                summaries.append({"tag": tag, "kind": kind, "site": site, "metrics": metrics_of(content), "notes": notes,
                                  **repeat})
        self.state["summaries"] = summaries
        self.state["thresholds"] = development_thresholds(summaries, self.models)
        return self.state


def beta_proof(beta: np.ndarray, points: list[dict], l2: float) -> dict:
    """How CF coefficients were reached, for the sites to recompute (client/verify.py): zero, or a
    Newton candidate (step halved j times) from a point where the sites answered with signed statistics.
    Found by recomputing newton_fit's candidates from the points it visited, latest first."""
    if not np.any(beta):
        return {"zero": True}
    for point in reversed(points):
        try:
            step = newton_step(point["pooled"], point["beta"], l2)
        except (LogisticFitError, np.linalg.LinAlgError):
            continue
        for j in range(derive.MAX_HALVINGS + 1):
            if np.array_equal(point["beta"] + 2.0**-j * step, beta):
                return {"ref": point["beta"].tolist(), "t": 2.0**-j, "l2": l2, "stats": point["entries"]}
    return {"unproven": True}  # not reached by newton_fit from the points: the sites refuse it


class _SiteLeft(Exception):
    def __init__(self, replies: Replies):
        super().__init__("a site refused")
        self.replies = replies


def development_thresholds(summaries: list[dict], models: list[str]) -> dict[str, float]:
    """Per model, the Youden threshold on the out-of-fold score cells of the federated CV ("cv"),
    pooled over its sites; other out-of-fold fits when there is no "cv" summary. Only repeat 0 of a
    repeated CV counts (its fold assignment is the study seed's). A model without cells (sites
    withholding them) gets no threshold."""
    out = {}
    for model in models:
        for tags in (("cv",), None):
            parts = [c for s in summaries if s["kind"] == "oof" and not s.get("repeat") and (tags is None or s["tag"] in tags)
                     and (c := score_cells(s["metrics"], model)) is not None]
            if parts:
                edges, neg, pos = M.pool_cells(parts)
                if neg.sum() > 0 and pos.sum() > 0:
                    out[model] = M.youden_from_cells(edges, neg, pos)
                break
    return out
