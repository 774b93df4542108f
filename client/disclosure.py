"""Disclosure control: the one place every request is checked and every reply is released.

Build as if the coordinator were curious and the network hostile. For each message the ClientApp
(client/app.py) calls `Gate.answer`, which
  1. validates the request: an allow-listed message type, only the keys that type takes, each value
     type- and bound-checked, identifiers (study-id, model names) matched against strict patterns;
     nothing from a message ever becomes part of a path unchecked;
  2. lets the handler compute its reply inside a ledger transaction, through the checks below;
  3. checks the reply itself (allow-listed keys, numbers only, every released count cell 0 or >= k)
     and only then commits the ledger.
A refusal raises `Refused(rule, detail)`; the ClientApp turns it into an error reply that names the
rule, logs it at the site, and the ledger stays as it was.

The rules (k = the site policy's min-cell-size):
  min-cell-size    every statistic is computed on a patient group with >= k patients of each class;
                   score summaries are released as cells (merged histogram bins) each holding 0 or
                   >= k patients of each class; weighted sums (CF gradients / Hessians) must spread
                   their weight over an effective number (Kish) of >= k patients per class.
  cohort-withheld  while the whole cohort cannot be released (a class under k, or an enrolment since a
                   release too small to answer again) nothing about patients is answered, all with one
                   text: whether and how a request is refused then depends on no withheld count.
  no-differencing  the released-group audit over the whole span (client/span_audit.py): a new patient
                   group is answered only if no linear combination of it and every group released
                   before (across folds, fold seeds, studies and enrolments; the whole cohort counts as
                   released whenever anything is) can concern 1..k-1 patients of a class.
  max-partitions / max-studies   lifetime caps on distinct groups and studies (bounds the number of
                   independent subset sums a coordinator can collect).
  query-budget     each (study, fit, model, partition, round) is evaluated / trained once; a repeat
                   with an identical request is answered (same answer, nothing new), a different
                   one refused; CF statistics at most LOGISTIC_QUERIES times per fit.
  dp-budget        with dp-epsilon > 0 in the policy, every DL / Combined training request is DP-SGD
                   and is charged to the study's epsilon and to the site's lifetime epsilon (every
                   study's added up, dp-lifetime-epsilon) before it trains; a study whose budget would
                   pass the lifetime one, or a request past either, is refused (client/dp.py: what the
                   epsilon covers and what it does not).
  logit-slope      CF coefficients are evaluated only while every slope, per SD of the site's own
                   feature, stays within max-logit-slope (no crafted near-step functions).
  model-caps / rounds-per-fit / batch-size-floor / compute-budget / reply-size   what the site agrees
                   to build and train (client/limits.py, checked before the cache is opened);
  fits-per-study / evaluations   distinct fits one study trains, evaluations per study and lifetime.
  request / message-type / study-id / model-weights   malformed or unplanned requests.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from common.config import MODELS, SENT_MODEL_KEYS, ConfigError, coerce_value

log = logging.getLogger(__name__)

# "<12 hex study id>/<fit tag>"; fit tags are the protocol's (server/protocol.py study_plan): a repeat
# r = 1..19 of repeated cross-validation is "<family>-r<r>" ("cv-r2", "central-r1", "local-<site>-r3")
STUDY_ID = re.compile(r"^(?P<study>[0-9a-f]{12})/(?P<tag>(?:cv|central)(?:-r(?:[1-9]|1[0-9]))?|final|"
                      r"(?:loco|local)-[a-z0-9][a-z0-9_-]{0,62})\Z")
LOGISTIC_QUERIES = 200  # Newton steps x line-search halvings of one CF fit, with a wide margin
MAX_FOLDS = 20
MAX_ROUNDS = 1000


class Refused(Exception):
    """The site's policy refuses this request; `rule` names the rule, `detail` says why.

    str(exc) is what the coordinator receives: it names the rule and what was asked, never a count
    or statistic of the patients (a refusal must not say "1 patient with SLM" about the group it
    refuses). `site_detail` holds those numbers for the site's own log."""

    def __init__(self, rule: str, detail: str, site_detail: str = ""):
        super().__init__(f"refused by the site's privacy policy, rule '{rule}': {detail}")
        self.rule, self.detail, self.site_detail = rule, detail, site_detail


# ---- 1. request validation ----------------------------------------------------------------------
def _int(name: str, lo: int, hi: int) -> Callable[[Any, dict], int]:
    def check(v: Any, _: dict) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
            raise Refused("request", f"'{name}': expected an integer in [{lo}, {hi}], found {v!r}")
        return int(v)
    return check


def _choice(name: str, options: tuple[str, ...]) -> Callable[[Any, dict], str]:
    def check(v: Any, _: dict) -> str:
        if not isinstance(v, str) or v not in options:
            raise Refused("request", f"'{name}': expected one of {', '.join(options)}, found {v!r}")
        return v
    return check


def _bool(name: str) -> Callable[[Any, dict], bool]:
    def check(v: Any, _: dict) -> bool:
        if not isinstance(v, bool):
            raise Refused("request", f"'{name}': expected true/false, found {v!r}")
        return v
    return check


def _vector(name: str, extra: int = 0, positive: bool = False) -> Callable[[Any, dict], np.ndarray]:
    def check(v: Any, ctx: dict) -> np.ndarray:
        n = ctx["n_features"] + extra
        if not isinstance(v, list) or len(v) != n or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
            found = f"{len(v)} values" if isinstance(v, list) else repr(type(v).__name__)
            raise Refused("request", f"'{name}': expected a list of {n} numbers, found {found}")
        arr = np.asarray(v, dtype=np.float64)
        if not np.isfinite(arr).all() or (positive and (arr <= 0).any()):
            raise Refused("request", f"'{name}': expected finite{' positive' if positive else ''} numbers")
        return arr
    return check


def _study_id(v: Any, _: dict) -> str:
    if not isinstance(v, str) or not STUDY_ID.match(v):
        raise Refused("study-id", f"expected '<12 hex digits>/<fit tag>' (e.g. 'a1b2c3d4e5f6/cv'), found {str(v)[:80]!r}")
    return v


def _models(v: Any, _: dict) -> list[str]:
    names = v.split(",") if isinstance(v, str) else None
    if not names or any(m not in MODELS for m in names) or len(set(names)) != len(names):
        raise Refused("request", f"'models': expected a comma list of {', '.join(MODELS)}, found {str(v)[:80]!r}")
    return names


def _sent_model_key(key: str) -> Callable[[Any, dict], Any]:
    def check(v: Any, _: dict) -> Any:
        try:
            return coerce_value(key, v, "the coordinator's message", strict=True)
        except ConfigError as exc:
            raise Refused("request", str(exc)) from None
    return check


_PARTITION = {"fold": _int("fold", -1, MAX_FOLDS - 1), "folds": _int("folds", 2, MAX_FOLDS),
              "seed": _int("seed", 0, 2**31 - 1), "study-id": _study_id}
_STANDARDISED = {"clinical-mean": _vector("clinical-mean"), "clinical-std": _vector("clinical-std", positive=True)}
def _roi_reference(v: Any, ctx: dict) -> str:
    from common.derive import roi_reference

    if not isinstance(v, str) or len(v) > 1000:
        raise Refused("request", "'roi-stats-reference': expected a string of at most 1000 characters")
    try:
        roi_reference(v)
    except ValueError as exc:
        raise Refused("request", str(exc)) from None
    return v


_MODEL_SETTINGS = {k: _sent_model_key(k) for k in SENT_MODEL_KEYS} | {"roi-stats-reference": _roi_reference}
_ROUNDS = {"round": _int("round", 0, MAX_ROUNDS), "num-rounds": _int("num-rounds", 1, MAX_ROUNDS)}
REQUESTS: dict[str, tuple[dict[str, Callable], tuple[str, ...]]] = {
    # message type: (validators of the keys it takes, keys it may omit)
    "query.info": ({}, ()),
    # roi-sums false: the study standardises the ROI statistics from a reference, so none are released
    "query.clinical_sums": ({**_PARTITION, "roi-sums": _bool("roi-sums")}, ("roi-sums",)),
    "query.logistic_stats": ({**_PARTITION, **_STANDARDISED, "beta": _vector("beta", extra=1)}, ()),
    "train": ({**_PARTITION, **_STANDARDISED, **_MODEL_SETTINGS, **_ROUNDS,
               "model": _choice("model", ("dl", "combined")),
               # the study's planned DL trainings at this site; only a DP site reads it (calibration)
               "dp-fits": _int("dp-fits", 1, 10_000)}, ("dp-fits",)),
    "evaluate": ({**_PARTITION, **_STANDARDISED, **_MODEL_SETTINGS, **_ROUNDS, "model": _choice("model", MODELS),
                  "part": _choice("part", ("val", "all")), "store": _bool("store"),
                  "beta": _vector("beta", extra=1)}, ("beta", *SENT_MODEL_KEYS)),
    "query.summary": ({"study-id": _study_id, "models": _models, "kind": _choice("kind", ("oof", "final")),
                       "folds": _int("folds", 2, MAX_FOLDS)}, ()),
}


def validate_request(message_type: str, config: Mapping[str, Any], n_features: int) -> dict[str, Any]:
    """The request's values, each checked; Refused on an unknown type, key, or a bad value."""
    if message_type not in REQUESTS:
        raise Refused("message-type", f"expected one of {', '.join(REQUESTS)}, found {str(message_type)[:60]!r}")
    spec, optional = REQUESTS[message_type]
    unknown = sorted(set(config) - set(spec))
    if unknown:
        raise Refused("request", f"{message_type} takes no key(s) {', '.join(map(repr, unknown[:5]))}")
    missing = [k for k in spec if k not in config and k not in optional]
    if missing:
        raise Refused("request", f"{message_type} needs {', '.join(missing)}")
    ctx = {"n_features": n_features}
    out = {k: spec[k](config[k], ctx) for k in spec if k in config}
    if "fold" in out and "folds" in out and out["fold"] >= out["folds"]:
        raise Refused("request", f"'fold' {out['fold']} is not below 'folds' {out['folds']}")
    if "round" in out and "num-rounds" in out and out["round"] > out["num-rounds"]:
        raise Refused("request", f"'round' {out['round']} is beyond 'num-rounds' {out['num-rounds']}")
    if message_type == "evaluate":
        if out["model"] == "cf" and "beta" not in out:
            raise Refused("request", "evaluate of the CF model needs 'beta'")
        if out["model"] != "cf" and ("beta" in out or any(k not in out for k in SENT_MODEL_KEYS)):
            raise Refused("request", f"evaluate of the {out['model']} model takes the model settings and no 'beta'")
    return out


def digest(*parts: Any) -> str:
    """A stable hash of request content (numbers, strings, arrays), for the query budget."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
        elif isinstance(p, Mapping):
            for k in sorted(p):
                h.update(str(k).encode())
                h.update(digest(p[k]).encode())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:32]


# ---- 2. what a reply may compute on -------------------------------------------------------------
def _classes(keys: list[str], labels: np.ndarray) -> dict[str, set[str]]:
    labels = np.asarray(labels)
    if np.any(labels < 0):  # a prediction-only site: one class, no outcome
        return {"unlabelled": set(keys)}
    return {"with SLM": {k for k, y in zip(keys, labels) if y == 1}, "without SLM": {k for k, y in zip(keys, labels) if y == 0}}


def _stored(group: Mapping[str, set[str]]) -> dict[str, list[str]]:
    return {c: sorted(m) for c, m in group.items()}


def _known(group: Mapping[str, set[str]], released: list[dict]) -> bool:
    """True when `group` equals a released group, class by class."""
    return any(set(old) == set(group) and all(set(old[c]) == m for c, m in group.items()) for old in released)


def _migrated(state: dict) -> list[dict]:
    """The audited groups of a ledger written before the span audit: every group it released."""
    out: list[dict] = []
    for g in state.get("cohorts", []) + state.get("partitions", []):
        if not _known({c: set(m) for c, m in g.items()}, out):
            out.append(g)
    return out


def kish_ess(w: np.ndarray) -> float:
    """Effective number of patients behind a weighted sum: (sum w)^2 / sum w^2."""
    w = np.abs(np.asarray(w, dtype=np.float64))
    s2 = float(np.sum(w**2))
    return float(np.sum(w)) ** 2 / s2 if s2 > 0 else 0.0


@dataclass
class Gate:
    """Applies a SitePolicy to one request, with the site's ledger (see the module docstring)."""

    policy: Any            # client.policy.SitePolicy
    ledger: Any            # client.policy.Ledger
    cohort_keys: list[str]
    cohort_labels: np.ndarray

    def __post_init__(self) -> None:
        self._state: dict | None = None
        self.notes: dict[str, str] = {}  # what the reply says besides its metrics (span-audit = report)

    @property
    def k(self) -> int:
        return int(self.policy.min_cell_size)

    def answer(self, message_type: str, fn: Callable[[], Any]) -> Any:
        """Run `fn` (which calls the checks below) in a ledger transaction; commit only on success.
        `fn` returns a tuple whose first item is the reply's metrics."""
        with self.ledger.transaction() as state:
            self._state = state
            try:
                out = fn()
                check_reply(message_type, out[0], self.k)
            finally:
                self._state = None
        return out

    @property
    def state(self) -> dict:
        if self._state is None:
            raise RuntimeError("Gate checks run only inside Gate.answer")
        return self._state

    # -- studies and budget --
    def study(self, study_id: str) -> None:
        study = study_id.split("/")[0]
        studies = self.state["studies"]
        if study not in studies:
            if len(studies) >= self.policy.max_studies:
                raise Refused("max-studies", f"this site has answered {len(studies)} studies, its policy allows "
                                             f"{self.policy.max_studies}")
            studies.append(study)

    def spend(self, key: str, request_digest: str, limit: int = 1) -> None:
        """Charge one query of `key`; an identical repeat (same digest) is free, a new one counts."""
        used = self.state["budget"].setdefault(key, [])
        if request_digest in used:
            return
        if len(used) >= limit:
            raise Refused("query-budget", f"{key} was already answered {len(used)} time(s); the study plan needs "
                                          f"{limit}")
        used.append(request_digest)

    def count(self, kind: str, study_id: str, item: str) -> None:
        """Charge a distinct `item` (a fit, an evaluation) of this study to the site's caps
        (max-fits-per-study; max-evaluations-per-study and max-evaluations over the site's lifetime)."""
        study = study_id.split("/")[0]
        counts = self.state.setdefault("counts", {}).setdefault(kind, {})
        seen = counts.setdefault(study, [])
        if item in seen:
            return
        pol = self.policy
        if kind == "fits" and len(seen) >= pol.max_fits_per_study:
            raise Refused("fits-per-study", f"this study has trained {len(seen)} fits at this site, its policy allows "
                                            f"{pol.max_fits_per_study}")
        if kind == "evaluations":
            if len(seen) >= pol.max_evaluations_per_study:
                raise Refused("evaluations", f"this study has had {len(seen)} evaluations at this site, its policy "
                                             f"allows {pol.max_evaluations_per_study}")
            total = sum(len(v) for v in counts.values())
            if total >= pol.max_evaluations:
                raise Refused("evaluations", f"this site has answered {total} evaluations, its policy allows "
                                             f"{pol.max_evaluations} over its lifetime")
        seen.append(item)

    # -- patient groups --
    def cohort(self) -> None:
        """Refuse everything about patients while the whole cohort cannot be released.

        One refusal text whatever the reason (a class under k, or an enrolment since a release too
        small to answer again): which of the two, and for which request, would depend on counts the
        site withholds. Once the cohort is released its counts are public (query.info), and later
        refusals may depend on them."""
        cohort = _classes(self.cohort_keys, self.cohort_labels)
        small = [f"{len(m)} patient(s) {c}" for c, m in cohort.items() if len(m) < self.k]
        why = ", ".join(small) or self._audit(cohort)
        if why:
            raise Refused("cohort-withheld", "this site's cohort is withheld under its policy (fewer than k "
                                             "patients of a class, or an enrolment since an earlier release too "
                                             "small to answer again); it releases no statistic until that changes",
                          why)

    def release(self, keys: list[str], labels: np.ndarray, what: str) -> None:
        """Allow statistics on this patient group, or refuse (cohort-withheld, min-cell-size,
        no-differencing, max-partitions)."""
        self.cohort()
        group = _classes(keys, labels)
        for cls, members in group.items():
            if len(members) < self.k:
                raise Refused("min-cell-size", f"{what}: fewer than k = {self.k} patients of a class",
                              f"{len(members)} patient(s) {cls}")
        why = self._audit(group)
        if why:
            raise Refused("no-differencing", f"{what}: with the patient groups this site released before, some "
                                             "combination of statistics would concern fewer than k = "
                                             f"{self.k} patients of a class (client/span_audit.py)", why)
        if not _known(group, self.state["partitions"]):
            if len(self.state["partitions"]) >= self.policy.max_partitions:
                raise Refused("max-partitions", f"{what}: this site has released statistics on "
                                                f"{len(self.state['partitions'])} patient groups, its policy allows "
                                                f"{self.policy.max_partitions}")
            self.state["partitions"].append(_stored(group))

    def _audit(self, group: dict[str, set[str]]) -> str:
        """The span audit (client/span_audit.py) of one more group; records it when it passes.
        Returns the site-only reason to refuse, or "" to answer. Under `span-audit = report` (the
        simulation's own virtual sites) a failing group is answered, with a note saying a real site
        would refuse it, and is kept out of the audited groups, so later notes are what a real site
        (that refused it) would do."""
        from client import span_audit

        groups = self.state.setdefault("groups", _migrated(self.state))
        if _known(group, groups):
            return ""
        why = span_audit.violation(groups, group, self.k)
        if why and self.policy.span_audit == "report":
            self.notes["span-audit"] = ("a site enforcing the released-group audit would refuse this request "
                                        "(rule 'no-differencing')")
            return ""
        if not why:
            groups.append(_stored(group))
        return why or ""

    # -- differential privacy --
    def dp_training(self, study_id: str, model: str, request_digest: str, *, n_train: int,
                    n_min: Callable[[], int], batch: int, epochs: int, rounds: int, dp_fits: int | None):
        """(DPTraining, reply figures) for one training request, charged to the study's epsilon;
        None when the site's policy has no DP. `n_min()`: patients in the study's smallest training
        part (asked only when calibrating). See client/dp.py for the accounting."""
        pol = self.policy
        if pol.dp_epsilon <= 0:
            return None
        from client import dp as D

        if pol.dp_delta * 10 * len(self.cohort_keys) >= 1:
            raise Refused("dp-delta", "the site's dp-delta is not below 1 / (10 x its patients); no DP training "
                                      "until its privacy officer lowers it", f"delta {pol.dp_delta}, n {len(self.cohort_keys)}")
        book = self.state.setdefault("dp", {}).get(study_id.split("/")[0])
        if book is None:
            if dp_fits is None:
                raise Refused("request", "train needs 'dp-fits' (the study's planned DL trainings at this site) "
                                         "under this site's DP policy")
            smallest = min(n_min(), n_train)
            per_fit = rounds * epochs * D.steps_per_epoch(smallest, batch)
            try:
                sigma = D.calibrate(pol.dp_epsilon, pol.dp_delta, batch / smallest, dp_fits * per_fit)
            except ValueError as exc:  # Opacus: no noise multiplier reaches the target
                raise Refused("dp-budget", f"no noise level keeps {dp_fits} trainings x {rounds} rounds x {epochs} "
                                           f"epochs within epsilon {pol.dp_epsilon:g} ({exc})") from None
            others = self._lifetime_spent(exclude=study_id)
            if others + pol.dp_epsilon > pol.dp_lifetime_epsilon * (1 + 1e-9):
                raise Refused("dp-budget", f"a new study's DP budget of epsilon {pol.dp_epsilon:g} would bring this "
                                           f"site's lifetime epsilon to {others + pol.dp_epsilon:.3f}, over its lifetime "
                                           f"budget {pol.dp_lifetime_epsilon:g}; nothing was trained")
            book = {"noise-multiplier": sigma, "epsilon": pol.dp_epsilon, "delta": pol.dp_delta,
                    "clip-norm": pol.dp_clip_norm, "accountant": D.ACCOUNTANT,
                    "planned": {"dp-fits": dp_fits, "rounds": rounds, "epochs": epochs, "batch-size": batch,
                                "sample-rate": batch / smallest, "steps": dp_fits * per_fit},
                    "history": []}
            self.state["dp"][study_id.split("/")[0]] = book
        plan = D.DPTraining(noise_multiplier=book["noise-multiplier"], clip_norm=book["clip-norm"],
                            sample_rate=batch / n_train, steps=epochs * D.steps_per_epoch(n_train, batch),
                            seed=D.secret_seed(D.site_secret(self.ledger.path.with_name("dp-secret")), request_digest))
        history = book["history"]
        if not any(h["request"] == request_digest for h in history):  # an identical retry costs nothing
            entry = {"model": model, "noise-multiplier": plan.noise_multiplier, "sample-rate": plan.sample_rate,
                     "steps": plan.steps, "request": request_digest}
            after = D.epsilon([_dp_step(h) for h in history + [entry]], book["delta"])
            limit = min(book["epsilon"], pol.dp_epsilon)  # a budget the site lowered mid-study applies at once
            if after > limit * (1 + 1e-9):
                raise Refused("dp-budget", f"this training request would bring the study's epsilon at this site to "
                                           f"{after:.3f}, over its budget {limit:g}; nothing was trained")
            lifetime = self._lifetime_spent(exclude=study_id) + after
            if lifetime > pol.dp_lifetime_epsilon * (1 + 1e-9):
                raise Refused("dp-budget", f"this training request would bring this site's lifetime epsilon to "
                                           f"{lifetime:.3f}, over its lifetime budget {pol.dp_lifetime_epsilon:g}; "
                                           "nothing was trained")
            history.append(entry)
            book["spent"] = after
        spent = D.epsilon([_dp_step(h) for h in history], book["delta"])
        spent_model = D.epsilon([_dp_step(h) for h in history if h["model"] == model], book["delta"])
        figures = D.report(plan, spent, spent_model, book["delta"])
        figures.update({"dp-lifetime-epsilon": self._lifetime_spent(exclude=study_id) + spent,
                        "dp-lifetime-budget": float(pol.dp_lifetime_epsilon)})
        return plan, figures

    def _lifetime_spent(self, exclude: str = "") -> float:
        """Epsilon this site has spent over all its studies but `exclude`, added up (basic composition:
        the studies' (epsilon, delta) add; an RDP composition across studies would be lower, so the sum
        is the conservative figure a privacy officer signs)."""
        from client import dp as D

        total = 0.0
        for study, book in self.state.get("dp", {}).items():
            if study == exclude.split("/")[0]:
                continue
            if "spent" not in book:  # a ledger from before the lifetime budget
                book["spent"] = D.epsilon([_dp_step(h) for h in book["history"]], book["delta"])
            total += float(book["spent"])
        return total

    def weighted(self, weights: np.ndarray, what: str) -> None:
        """Refuse a weighted sum whose weight sits on fewer than k patients (Kish's effective number).

        Over the whole group, not per class: an honest fit on a small, well separated cohort already
        puts most of a class's weight on a few patients, whereas a crafted near-step function puts
        nearly all of it on the handful of patients at its boundary."""
        ess = kish_ess(weights)
        if ess < self.k:
            raise Refused("min-cell-size", f"{what}: the weights concentrate on fewer than k = {self.k} "
                                           "effective patients", f"{ess:.1f} effective patients")

    def logit_slopes(self, beta: np.ndarray, std: np.ndarray, site_sd: np.ndarray) -> None:
        """Refuse CF coefficients steeper than max-logit-slope per SD of the site's own features."""
        slope = np.abs(beta[1:]) / std * site_sd
        worst = int(np.argmax(slope))
        if slope[worst] > self.policy.max_logit_slope:
            raise Refused("logit-slope", f"coefficient {worst + 1} changes the logit by more than "
                                         f"{self.policy.max_logit_slope} per SD of this site's feature",
                          f"{slope[worst]:.3g} per SD")

    def cells(self, y: np.ndarray, p: np.ndarray):
        """k-safe score cells (edges, neg, pos, cell of each patient), or Refused."""
        from common import metrics as M

        try:
            return M.k_safe_cells(y, p, self.k, bins=int(self.policy.histogram_bins))
        except M.DegenerateStatistic as exc:
            raise Refused("min-cell-size", f"score summary: fewer than k = {self.k} patients of a class",
                          str(exc)) from None


# ---- 3. the reply itself -------------------------------------------------------------------------
# Keys a reply may carry, per message type (summary keys are "<model>.<name>").
_REPLY_KEYS = {
    "query.info": {"num-examples", "num-positive", "has-labels", "spatial-dims", "n-channels", "n-features",
                   "image-shape", "cohort-released"},
    "query.clinical_sums": {"num-examples", "sum", "sumsq", "roi-sum", "roi-sumsq"},
    "query.logistic_stats": {"num-examples", "grad", "hess", "loglik"},
    "train": {"num-examples", "train-loss", "train-seconds", "dp-epsilon", "dp-epsilon-model", "dp-delta",
              "dp-noise-multiplier", "dp-clip-norm", "dp-sample-rate", "dp-steps", "dp-lifetime-epsilon",
              "dp-lifetime-budget"},
    "evaluate": {"num-examples", "loss", "auc"},
    "query.summary": {"num-examples", "num-positive", "n", "n_pos", "auc", "auc_ci_low", "auc_ci_high", "brier",
                      "calib_intercept", "calib_slope", "hl_stat", "hl_p", "cell-edges", "cell-neg", "cell-pos",
                      "calib-mean-pred", "z", "p"},
}
COUNT_CELLS = ("cell-neg", "cell-pos")


def _dp_step(h: Mapping[str, Any]) -> tuple[float, float, int]:
    return float(h["noise-multiplier"]), float(h["sample-rate"]), int(h["steps"])


def check_reply(message_type: str, out: Mapping[str, Any], k: int) -> None:
    """Last line of defence: only allow-listed keys, finite-length numeric values, k-safe count cells."""
    allowed = _REPLY_KEYS[message_type]
    for key, value in out.items():
        name = key.rsplit(".", 1)[-1]
        if name not in allowed:
            raise Refused("reply", f"{message_type} reply may not carry {key!r}")
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf" or arr.ndim > 1 or arr.size > 10_000:
            raise Refused("reply", f"{key!r}: expected a number or a short list of numbers")
        if name in COUNT_CELLS and np.any((arr > 0) & (arr < k)):
            raise Refused("min-cell-size", f"{key!r} has a cell below k = {k}")
