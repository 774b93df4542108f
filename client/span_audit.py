"""The released-group audit: may a site release statistics on one more patient group?

Why not pairs: a coordinator that adds and subtracts the replies of several groups (the whole cohort,
fold 1 of a 2-fold split, fold 2 of a 3-fold split, fold 3 of a 6-fold split, ...) gets the sums over
any vector in the *linear span* of those groups' indicator vectors. Every pair of groups may differ
by k or more patients and still some combination may be one patient. So the question is about the
span of everything released: across folds, fold seeds (repeats), studies and enrolments.

The argument (per class, since every statistic is released per class as well as overall):
  Let G_1 .. G_m be the patient groups the site has released statistics on, and G the new one.
  Call two patients equivalent when they are in exactly the same groups; the equivalence classes are
  the *atoms* of G_1 .. G_m, G. Every group is a union of atoms, so every linear combination
  v = a_1 1[G_1] + ... + a_m 1[G_m] + a 1[G] is constant on each atom, and the patients it concerns
  (its support) are a union of atoms. Hence, if every atom holds at least k patients of the class,
  every non-zero combination concerns at least k patients of that class. The audit answers G only
  when this holds, for each class.
It is conservative, not exact: an atom under k refuses even when no combination isolates it (groups
A+B and B+C leave atom B out of reach). The exact question (the sparsest non-zero vector of a
subspace) is NP-hard in general; the atom test is linear in the number of group memberships.
A second, independent guard checks the span directly: no single patient's indicator e_p lies in it
(e_p is in the row space of the group matrix M exactly when the orthogonal projector onto that row
space, pinv(M) M, has 1 on its diagonal at p). Under the atom rule it never fires; it is there so a
defect in the atom code cannot release a single patient.

What this costs the protocol: one cross-validation (its held-out folds are the atoms) and every
later study that asks for the same folds at the same fold seed are answered, as are fits on all
patients. A second fold assignment (a repeat of repeated CV, another `folds`, a crafted seed) cuts
the folds into atoms of a few patients and is refused at a real site. After an enrolment, the new
cohort (and its folds) is answered only once at least k new patients of each class (among those that
have one) have joined, and a fold assignment of the new cohort that moves existing patients between
folds is refused.

Statistics that are not sums (AUCs, model weights) are held to the same rule as statistics of their
group. Weighted sums (CF gradients at coefficients the coordinator chose) are another matter: their
weights are checked in client/disclosure.py (logit-slope, Kish's effective number).
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

import numpy as np

Group = Mapping[str, Iterable[str]]  # class name -> salted patient keys


def atom_sizes(groups: list[set[str]]) -> Counter:
    """{membership signature: patients} of the atoms of these groups (patients in none are left out)."""
    signature: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        for p in g:
            signature.setdefault(p, []).append(i)
    return Counter(tuple(s) for s in signature.values())


def isolated_patient(groups: list[set[str]]) -> bool:
    """True when some single patient's indicator lies in the span of the groups' indicators."""
    patients = sorted(set().union(*groups)) if groups else []
    if not patients:
        return False
    col = {p: j for j, p in enumerate(patients)}
    m = np.zeros((len(groups), len(patients)))
    for i, g in enumerate(groups):
        m[i, [col[p] for p in g]] = 1.0
    projector_diag = np.einsum("ij,ji->i", np.linalg.pinv(m), m)  # diag(pinv(M) M)
    return bool(np.any(projector_diag > 1.0 - 1e-6))


def violation(released: list[Group], new: Group, k: int) -> str | None:
    """Why releasing `new` after `released` could let a combination concern 1..k-1 patients of a class
    (a site-only text with the class and atom size), or None when it cannot."""
    for cls in new:
        groups = [g for g in ([set(g.get(cls, ())) for g in released] + [set(new[cls])]) if g]
        small = [n for n in atom_sizes(groups).values() if n < k]
        if small:
            return f"an atom of {min(small)} patient(s) {cls}"
        if isolated_patient(groups):  # the second guard (see the module docstring)
            return f"a single patient {cls} in the span"
    return None
