"""The recommendation rule: which arm the paired patient-level AUC tests support, and the patients still needed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from scipy import stats

from tasks.evaluation.pairs import DeLongTest, holm_adjust


def patients_needed(n_patients: int, se: float, diff: float, margin: float, level: float = 0.95) -> int | None:
    """Rough number of patients for the interval of an AUC difference to settle a non-inferiority question.

    SE shrinks as 1/sqrt(n), so SE(n) = SE_obs sqrt(n_obs / n). The lower bound diff - z SE(n) clears -margin when
    n >= n_obs (z SE_obs / (diff + margin))^2 (non-inferiority of the arm with AUC difference diff; Blackwelder
    1982). When diff <= -margin non-inferiority is out of reach; then the n at which the interval excludes 0,
    n_obs (z SE_obs / diff)^2, is returned (a difference shown). None when se or diff makes both undefined.
    z = z_(1 - (1 - level)/2). Assumes the observed difference and variance hold, so it is an order of magnitude.
    """
    if not (math.isfinite(se) and math.isfinite(diff)) or se <= 0 or n_patients < 1:
        return None
    z = float(stats.norm.ppf(0.5 + level / 2.0))
    gap = diff + margin if diff > -margin else abs(diff)
    if gap <= 0:
        return None
    return int(math.ceil(n_patients * (z * se / gap) ** 2))


class ArmSummary(NamedTuple):
    """What recommend needs to know about one arm: its status, AUC and measured training cost."""

    name: str
    status: str
    auc: float | None = None
    seconds: float | None = None


class PairDecision(NamedTuple):
    """One pairwise AUC comparison as the rule used it (diff = AUC of arm_a - AUC of arm_b)."""

    arm_a: str
    arm_b: str
    test: DeLongTest
    p_holm: float


class Verdict(NamedTuple):
    """What the statistics support: basis, the preferred arm (or None), and the numbers behind it.

    basis: "significant" (best arm beats every other, Holm-adjusted), "non_inferior" (a cheaper arm is within the
    margin of every dearer arm not shown worse), "inconclusive", "single_arm", "none".
    """

    basis: str
    preferred_arm: str | None
    best_arm: str | None
    margin: float
    alpha: float
    pairs: list[PairDecision]
    deciding_pair: PairDecision | None = None
    patients_needed: int | None = None


def _oriented(test: DeLongTest, swap: bool) -> DeLongTest:
    """The same test with the arms swapped when swap (diff and CI negated)."""
    if not swap:
        return test
    low, high = test.ci_of_diff
    return test._replace(auc_a=test.auc_b, auc_b=test.auc_a, diff=-test.diff, z=-test.z, ci_of_diff=(-high, -low))


def recommend(
    arms: Sequence[ArmSummary],
    comparisons: Mapping[tuple[str, str], DeLongTest],
    *,
    margin: float,
    n_patients: int,
    alpha: float = 0.05,
) -> Verdict:
    """The arm the statistics support, never more: pairwise DeLong p-values Holm-adjusted over all pairs.

    1. By measured training time, the cheapest arm that is non-inferior to every dearer arm is preferred
       ("non_inferior"): the lower bound of the 95% CI of AUC(cheaper) - AUC(dearer) lies above -margin (two-sided
       95% CI, i.e. a one-sided 2.5% non-inferiority test; Blackwelder 1982). A loss within the margin is accepted
       for a lower cost. The dearest arm is never preferred this way.
    2. Otherwise, best = highest AUC: if its Holm-adjusted p against every other arm is < alpha (and it is
       higher), use it ("significant"; also when the arm found in 1 is best and beats every other significantly).
    3. Otherwise "inconclusive": "not significant" never reads as "equivalent". It names the cheapest arm's
       weakest comparison and patients_needed() from its SE scaled by sqrt(n). A comparison with the best arm that
       is not estimable, or a training time not measured, also leaves the non-inferiority step out.
    """
    completed = [a for a in arms if a.status == "completed" and a.auc is not None and math.isfinite(a.auc)]
    if not completed:
        return Verdict("none", None, None, margin, alpha, [])
    if len(completed) == 1:
        return Verdict("single_arm", completed[0].name, completed[0].name, margin, alpha, [])
    names = [a.name for a in completed]
    keys = [(x, y) for i, x in enumerate(names) for y in names[i + 1:] if (x, y) in comparisons or (y, x) in comparisons]
    raw = [comparisons[k] if k in comparisons else _oriented(comparisons[(k[1], k[0])], True) for k in keys]
    pairs = [PairDecision(k[0], k[1], t, p) for k, t, p in zip(keys, raw, holm_adjust([t.p_value for t in raw]))]
    best = max(completed, key=lambda a: a.auc or 0.0)
    others = [_between(pairs, a.name, best.name) for a in completed if a is not best]
    if any(pair is None or not pair.test.estimable for pair in others):
        return Verdict("inconclusive", None, best.name, margin, alpha, pairs)  # too few patients to compare at all
    best_wins = all(pair is not None and pair.p_holm < alpha and pair.test.diff < 0 for pair in others)
    ranked = sorted(completed, key=lambda a: (a.seconds or 0.0, a.name))
    timed = all(a.seconds is not None for a in completed)
    for i, arm in enumerate(ranked[:-1] if timed else []):
        checks = [_between(pairs, arm.name, dearer.name) for dearer in ranked[i + 1:]]
        if all(c is not None and c.test.estimable and c.test.ci_of_diff[0] > -margin for c in checks):
            if arm is best and best_wins:
                break
            weakest = min(checks, key=lambda c: c.test.ci_of_diff[0])  # type: ignore[union-attr]
            return Verdict("non_inferior", arm.name, best.name, margin, alpha, pairs, weakest)
    if best_wins:
        return Verdict("significant", best.name, best.name, margin, alpha, pairs)
    open_pairs = [_between(pairs, ranked[0].name, other.name) for other in ranked[1:]]
    usable = sorted((p for p in open_pairs if p is not None and p.test.estimable), key=lambda p: p.test.ci_of_diff[0])
    return _inconclusive(best.name, usable, margin, alpha, pairs, n_patients)


def _between(pairs: Sequence[PairDecision], first: str, second: str) -> PairDecision | None:
    """The comparison of two arms oriented as first vs second (diff = AUC(first) - AUC(second)); None if untested."""
    for pair in pairs:
        if {pair.arm_a, pair.arm_b} == {first, second}:
            return pair._replace(arm_a=first, arm_b=second, test=_oriented(pair.test, pair.arm_a != first))
    return None


def _inconclusive(
    best: str, open_pairs: Sequence[PairDecision | None], margin: float, alpha: float, pairs: list[PairDecision],
    n_patients: int,
) -> Verdict:
    """An inconclusive verdict: the first unresolved pair (weakest first) and the patients it needs."""
    usable = [p for p in open_pairs if p is not None and p.test.estimable]
    for pair in usable:
        needed = patients_needed(n_patients, pair.test.se, pair.test.diff, margin, pair.test.level)
        if needed is not None:
            return Verdict("inconclusive", None, best, margin, alpha, pairs, pair, needed)
    return Verdict("inconclusive", None, best, margin, alpha, pairs, usable[0] if usable else None)
