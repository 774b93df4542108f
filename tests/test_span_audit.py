"""The released-group audit (client/span_audit.py) attacked as a coordinator would: combinations of more
than two replies, across folds, repeats, studies and enrolments; refusals that could count; and a
property test of random hostile sequences against a brute force over every small support set."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.app import app as client_app
from client.cache import load_cache
from client.span_audit import atom_sizes, isolated_patient, violation
from client.study import Site, stratified_folds
from common.config import load_config
from common.records import SITE_CANNOT, SITE_REFUSED
from tests.fedtools import ask_site, make_cache
from tests.test_disclosure import STD, _enrol, rule_of

SHAPE = (3, 8, 8)
CLASSES = ("without SLM", "with SLM")


def _ledger(node) -> dict:
    study = Path(node["study-dir"]) if "study-dir" in node else Path(node["cache-dir"] + "-study")
    return json.loads((study / "disclosure-ledger.json").read_text())


def _span_holds_small_vector(groups: list[set], k: int) -> tuple[int, ...] | None:
    """Brute force: a support set S of 1..k-1 patients such that some non-zero combination of the groups'
    indicators vanishes outside S (rank(G) > rank(G without S's columns)); None if there is none."""
    patients = sorted(set().union(*groups)) if groups else []
    if not patients:
        return None
    g = np.array([[p in grp for p in patients] for grp in groups], dtype=float)
    full = np.linalg.matrix_rank(g)
    for size in range(1, k):
        for s in itertools.combinations(range(len(patients)), size):
            rest = np.delete(g, s, axis=1)
            if (np.linalg.matrix_rank(rest) if rest.size else 0) < full:
                return s
    return None


# ---- the argument itself ---------------------------------------------------------------------------
def test_atoms_bound_every_combination_and_the_span_guard_finds_a_single_patient():
    a, b, c, d = (set(range(i, i + 4)) for i in (0, 4, 8, 12))
    assert sorted(atom_sizes([a | b, b | c]).values()) == [4, 4, 4]
    assert violation([{"x": a | b}], {"x": b | c}, k=4) is None
    assert violation([{"x": a | b}], {"x": b | c}, k=5) == "an atom of 4 patient(s) x"  # conservative: B is out of reach
    assert _span_holds_small_vector([a | b, b | c], 5) is None  # ... which the brute force confirms
    # (A+x) + (B+x) - (A+B+x) = x: one patient, though every pair of these groups differs by 4 or more
    one = {99}
    groups = [a | b | one, a | one, b | one]
    assert isolated_patient(groups) and _span_holds_small_vector(groups, 2) == (8,)  # patient 99 is column 8
    assert violation([{"x": a | b | one}, {"x": a | one}], {"x": b | one}, k=2) == "an atom of 1 patient(s) x"
    assert not isolated_patient([a | b, b | c, a | b | c])


# ---- 1. four groups of one honest-looking seed (the attack) ---------------------------------
@pytest.fixture(scope="module")
def big_site(tmp_path_factory):
    """200 patients, 78 with SLM, default policy (k = 10)."""
    root = tmp_path_factory.mktemp("span")
    make_cache(root / "site", 200, seed=3, site_name="h", shape=SHAPE, prevalence=0.41)
    return root


def _training_group(y: np.ndarray, folds: int, fold: int, seed: int = 1) -> set[int]:
    return set(np.flatnonzero(stratified_folds(y, folds, seed) != fold))


ATTACK = ((2, 1), (3, 2), (6, 3))  # (folds, fold): training patients of each, all at fold seed 1


def test_the_attack_works_under_the_pairwise_rule(big_site):
    """What the coordinator plans offline from the class counts: the whole cohort and three training groups
    whose every pair differs by >= k patients of each class, and whose span holds one patient."""
    y = load_cache(big_site / "site").labels
    assert int(y.sum()) == 78
    groups = [set(range(len(y)))] + [_training_group(y, f, j) for f, j in ATTACK]
    for cls in (0, 1):
        per_class = [{i for i in g if y[i] == cls} for g in groups]
        for a, b in itertools.combinations(per_class, 2):
            assert len(a ^ b) >= 10  # the pairwise (no-differencing before the span audit) rule answers all four
    assert isolated_patient([{i for i in g if y[i] == 0} for g in groups])  # one patient without SLM, exactly


@pytest.mark.parametrize("vehicle", ["one study", "repeats", "studies"])
def test_a_combination_of_four_groups_is_refused_before_it_completes(big_site, tmp_path, vehicle):
    """The same four groups asked in one study, as repeats of its CV (tags cv, cv-r1, cv-r2: fold counts
    and seeds are the coordinator's to choose), or in four studies: the group that would complete the
    combination (or an earlier one) is refused, and what was released isolates nobody."""
    node = {"cache-dir": str(big_site / "site"), "site-name": "h", "study-dir": str(tmp_path / vehicle)}
    tags = {"one study": ["aaaaaaaaaaaa/cv"] * 3, "repeats": ["aaaaaaaaaaaa/cv", "aaaaaaaaaaaa/cv-r1",
                                                             "aaaaaaaaaaaa/cv-r2"],
            "studies": ["bbbbbbbbbbbb/cv", "cccccccccccc/cv", "dddddddddddd/cv"]}[vehicle]
    whole = ask_site(client_app, node, "query.clinical_sums", {"fold": -1, "folds": 5, "seed": 1,
                                                               "study-id": "aaaaaaaaaaaa/final"})
    assert rule_of(whole) is None
    rules = [rule_of(ask_site(client_app, node, "query.clinical_sums",
                              {"fold": j, "folds": f, "seed": 1, "study-id": tag}))
             for (f, j), tag in zip(ATTACK, tags)]
    assert "no-differencing" in rules and set(rules) <= {None, "no-differencing"}, rules
    released = _ledger(node)["groups"]
    for cls in CLASSES:
        per_class = [set(g[cls]) for g in released]
        assert min(atom_sizes(per_class).values()) >= 10 and not isolated_patient(per_class)


def test_a_second_fold_seed_is_refused_at_its_first_group(big_site, tmp_path):
    """Repeated CV at a real site: the second fold assignment's first group already cuts the folds of the
    first into atoms of a few patients."""
    node = {"cache-dir": str(big_site / "site"), "site-name": "h", "study-dir": str(tmp_path / "s")}
    for fold in range(5):
        assert rule_of(ask_site(client_app, node, "query.clinical_sums",
                                {"fold": fold, "folds": 5, "seed": 1, "study-id": "aaaaaaaaaaaa/cv"})) is None
    # the same folds in a later study: nothing new, answered
    assert rule_of(ask_site(client_app, node, "query.clinical_sums",
                            {"fold": 2, "folds": 5, "seed": 1, "study-id": "bbbbbbbbbbbb/cv"})) is None
    assert rule_of(ask_site(client_app, node, "query.clinical_sums",
                            {"fold": 0, "folds": 5, "seed": 7, "study-id": "bbbbbbbbbbbb/cv-r1"})) == "no-differencing"


def test_an_enrolment_does_not_open_the_span(tmp_path):
    """Before and after enrolments: the grown cohort is answered only once >= k new patients of each class
    joined, and a fold assignment of the grown cohort that moves patients between the old folds is refused."""
    make_cache(tmp_path / "site", 60, seed=4, site_name="h", shape=SHAPE, labels=[i % 2 for i in range(60)])
    node = {"cache-dir": str(tmp_path / "site"), "site-name": "h"}
    sums = lambda fold, sid, folds=2: {"fold": fold, "folds": folds, "seed": 1, "study-id": sid}  # noqa: E731
    for fold in (-1, 0, 1):
        assert rule_of(ask_site(client_app, node, "query.clinical_sums", sums(fold, "aaaaaaaaaaaa/cv"))) is None
    _enrol(tmp_path / "site", 10, seed=1, label=1)
    _enrol(tmp_path / "site", 9, seed=2, label=0)
    assert rule_of(ask_site(client_app, node, "query.clinical_sums", sums(-1, "bbbbbbbbbbbb/final"))) == "cohort-withheld"
    _enrol(tmp_path / "site", 1, seed=3, label=0)  # now 10 new patients of each class
    assert rule_of(ask_site(client_app, node, "query.clinical_sums", sums(-1, "cccccccccccc/final"))) is None
    assert rule_of(ask_site(client_app, node, "query.clinical_sums", sums(0, "cccccccccccc/cv"))) == "no-differencing"
    released = _ledger(node)["groups"]
    for cls in CLASSES:  # (the brute force is for small k: the property test below)
        per_class = [set(g[cls]) for g in released]
        assert min(atom_sizes(per_class).values()) >= 10 and not isolated_patient(per_class)


# ---- 2. refusals say nothing about counts ----------------------------------------------------------
def _hostile_sequence() -> list[tuple[str, dict]]:
    beta = [0.0] * 8
    out: list[tuple[str, dict]] = [("query.info", {})]
    for folds, fold, seed in [(-1, -1, 1), (2, 0, 1), (3, 1, 1), (4, 2, 1), (5, 4, 1), (5, 0, 9), (20, 19, 2)]:
        base = {"fold": fold, "folds": max(folds, 2), "seed": seed, "study-id": "aaaaaaaaaaaa/cv" if fold >= 0 else
                "aaaaaaaaaaaa/final"}
        out.append(("query.clinical_sums", base))
        out.append(("query.logistic_stats", {**base, **STD, "beta": beta}))
        out.append(("evaluate", {**base, **STD, "beta": beta, "model": "cf", "part": "val" if fold >= 0 else "all",
                                 "store": True, "round": 0, "num-rounds": 1}))
    out.append(("query.summary", {"study-id": "aaaaaaaaaaaa/final", "models": "cf", "kind": "final", "folds": 5}))
    out.append(("query.summary", {"study-id": "aaaaaaaaaaaa/cv", "models": "cf", "kind": "oof", "folds": 5}))
    return out


def _replies(node) -> list:
    got = []
    for mtype, cfg in _hostile_sequence():
        r = ask_site(client_app, node, mtype, cfg)
        if r.has_error():
            got.append((r.error.code, r.error.reason))
        else:
            got.append((dict(r.content["metrics"]), dict(r.content["notes"]) if "notes" in r.content else {}))
    return got


@pytest.mark.parametrize("flipped", [0, 1])
def test_two_sites_that_differ_in_one_patients_class_give_identical_replies_when_counts_are_withheld(tmp_path, flipped):
    """k = 10; 30 patients of whom 8 (or, with one patient's class flipped, 9 or 7) have SLM: the smaller
    class is under k, so the counts are withheld, and every reply to a hostile sequence is byte for byte
    the same, whatever the folds asked (today `folds 4` and `folds 5` were refused with different texts)."""
    base = [1] * 8 + [0] * 22
    other = list(base)
    other[0 if flipped else 29] = 1 - other[0 if flipped else 29]  # 7 or 9 with SLM
    replies = []
    for i, labels in enumerate((base, other)):
        make_cache(tmp_path / f"site{i}", 30, seed=6, site_name="h", shape=SHAPE, labels=labels)
        replies.append(_replies({"cache-dir": str(tmp_path / f"site{i}"), "site-name": "h"}))
    assert replies[0] == replies[1]
    errors = [r for r in replies[0] if not isinstance(r[0], dict)]
    assert errors and all(code in (SITE_REFUSED, SITE_CANNOT) for code, _ in errors)
    assert not any(str(tmp_path) in reason for _, reason in errors)  # no site path in any error text
    assert replies[0][0][0]["num-examples"] == -1  # query.info withholds the counts


def test_an_error_reply_never_carries_the_sites_paths(tmp_path):
    make_cache(tmp_path / "site", 40, seed=2, site_name="h", shape=SHAPE, prevalence=0.5)
    node = {"cache-dir": str(tmp_path / "site"), "site-name": "h", "min-cell-size": 3}
    # a summary of predictions that were never stored: the site knows where it looked, the reply does not
    reply = ask_site(client_app, node, "query.summary", {"study-id": "aaaaaaaaaaaa/final", "models": "cf",
                                                          "kind": "final", "folds": 5})
    assert reply.has_error() and reply.error.code == SITE_CANNOT
    assert "no stored predictions" in reply.error.reason and str(tmp_path) not in reply.error.reason


# ---- 3. random hostile sequences against the brute force -------------------------------------------
_counter = itertools.count()


@st.composite
def _step(draw):
    if draw(st.integers(0, 9)) == 0:
        return ("enrol", draw(st.integers(1, 3)), draw(st.integers(0, 1)))
    folds = draw(st.integers(2, 5))
    fold = draw(st.integers(-1, folds - 1))
    return ("sums", folds, fold, draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from(["aaaaaaaaaaaa",
                                                                                          "bbbbbbbbbbbb"])))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(n=st.integers(8, 24), prevalence=st.floats(0.3, 0.6), steps=st.lists(_step(), min_size=2, max_size=12))
def test_random_hostile_sequences_release_no_span_with_a_vector_on_fewer_than_k(tmp_path_factory, n, prevalence, steps):
    """k = 3, up to 16 patients per class. The released groups are rebuilt from the answered replies
    (not from the site's ledger), and the brute force looks at every support set of 1..k-1 patients."""
    k = 3
    root = tmp_path_factory.mktemp(f"prop{next(_counter)}")
    make_cache(root / "c", n, seed=n, site_name="h", shape=SHAPE, prevalence=prevalence)
    node = {"cache-dir": str(root / "c"), "site-name": "h", "min-cell-size": k}
    released: list[tuple[set, set]] = []  # (without SLM, with SLM) of every group a statistic left the site on
    for i, step in enumerate(steps):
        if step[0] == "enrol":
            y = load_cache(root / "c").labels
            if int(np.sum(y == step[2])) + step[1] <= 16:
                _enrol(root / "c", step[1], seed=100 + i, label=step[2])
            continue
        _, folds, fold, seed, study = step
        reply = ask_site(client_app, node, "query.clinical_sums",
                         {"fold": fold, "folds": folds, "seed": seed, "study-id": f"{study}/{'cv' if fold >= 0 else 'final'}"})
        if reply.has_error():
            assert reply.error.code in (SITE_REFUSED, SITE_CANNOT) and not reply.has_content()
            continue
        site = Site.open(load_config(node_config=node))
        for d in (site.data, site.partition(fold, "train", folds, seed)):  # the cohort counts as released too
            keys, y = list(d.keys), d.labels
            released.append(({p for p, c in zip(keys, y) if c == 0}, {p for p, c in zip(keys, y) if c == 1}))
        assert dict(reply.content["metrics"])["num-examples"] == len(site.partition(fold, "train", folds, seed))
    for cls in (0, 1):
        groups = [g[cls] for g in released if g[cls]]
        assert _span_holds_small_vector(groups, k) is None, (cls, steps)
