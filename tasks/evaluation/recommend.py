"""The recommendation rule: which arm the paired patient-level AUC comparisons support, and the patients still needed.

The rule claims only what a test valid at the sample size supports (docs/verdict.md, with its calibration):
below MIN_PATIENTS_PER_CLASS positive or negative test patients nothing is claimed; above it, "significant" rests on
Holm-adjusted paired permutation p-values and "non-inferior" on the lower bound of a MOVER interval that holds near
AUC 1. Arms are ranked by computed FLOPs, never by measured time, so identical predictions give the same verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from scipy import stats

from tasks.evaluation.pairs import AucComparison, holm_adjust

MIN_PATIENTS_PER_CLASS = 10
POWER = 0.8
MATERIAL_COST_RATIO = 1.2  # an arm is cheaper only with at least 20% fewer FLOPs
BASES = ("significant", "non_inferior", "inconclusive", "too_few", "single_arm", "none")


def patients_needed(n_patients: int, se: float, margin: float, level: float = 0.95, power: float = POWER) -> int | None:
    """Test patients for a non-inferiority claim of the cheaper arm at the margin, with the given power.

    Hypothesis: H0 AUC(cheaper) - AUC(dearer) <= -margin against H1 > -margin, one-sided at (1 - level)/2 (the
    lower bound of the two-sided interval), planned for arms that truly perform alike (true difference 0;
    Blackwelder 1982; Chow, Shao & Wang 2008, ch. 3). SE shrinks as 1/sqrt(n), SE(n) = se sqrt(n_patients / n), so
    n = n_patients ((z_(1-alpha/2) + z_power) se / margin)^2. It does not depend on the observed difference, so it
    is continuous across the margin and never answers how many patients would show an arm worse. None when se is
    not a positive number.
    """
    if not (math.isfinite(se) and se > 0) or n_patients < 1 or margin <= 0:
        return None
    z = float(stats.norm.ppf(0.5 + level / 2.0)) + float(stats.norm.ppf(power))
    return max(n_patients, math.ceil(n_patients * (z * se / margin) ** 2))


class ArmSummary(NamedTuple):
    """What recommend needs to know about one arm: its status, AUC and computed cost (training + inference FLOPs)."""

    name: str
    status: str
    auc: float | None = None
    flops: float | None = None


class PairDecision(NamedTuple):
    """One pairwise AUC comparison as the rule used it (diff = AUC of arm_a - AUC of arm_b)."""

    arm_a: str
    arm_b: str
    test: AucComparison
    p_holm: float


class Verdict(NamedTuple):
    """What the statistics support: basis, the preferred arm (or None), and the numbers behind it.

    basis: "significant" (the best arm beats every other, Holm-adjusted), "non_inferior" (a materially cheaper arm
    is within the margin of every arm not materially cheaper than it), "inconclusive", "too_few" (fewer than
    min_per_class test patients of a class: nothing is claimed), "single_arm", "none".
    best_arm is the highest point estimate (ties: first by name), a winner only when basis is "significant".
    """

    basis: str
    preferred_arm: str | None
    best_arm: str | None
    margin: float
    alpha: float
    pairs: list[PairDecision]
    deciding_pair: PairDecision | None = None
    patients_needed: int | None = None
    min_per_class: int = MIN_PATIENTS_PER_CLASS


def _oriented(test: AucComparison, swap: bool) -> AucComparison:
    """The same comparison with the arms swapped when swap (diff and interval negated)."""
    if not swap:
        return test
    low, high = test.ci_of_diff
    return test._replace(auc_a=test.auc_b, auc_b=test.auc_a, diff=-test.diff, ci_of_diff=(-high, -low))


def _between(pairs: Sequence[PairDecision], first: str, second: str) -> PairDecision | None:
    """The comparison of two arms oriented as first vs second (diff = AUC(first) - AUC(second)); None if untested."""
    for pair in pairs:
        if {pair.arm_a, pair.arm_b} == {first, second}:
            return pair._replace(arm_a=first, arm_b=second, test=_oriented(pair.test, pair.arm_a != first))
    return None


def materially_cheaper(cheap: ArmSummary, dear: ArmSummary) -> bool:
    """True when both costs are known and cheap needs at most 1/MATERIAL_COST_RATIO of dear's FLOPs."""
    return bool(cheap.flops and dear.flops and cheap.flops * MATERIAL_COST_RATIO <= dear.flops)


def _non_inferior_arm(
    ranked: list[ArmSummary], pairs: list[PairDecision], margin: float
) -> tuple[ArmSummary, PairDecision] | None:
    """The cheapest arm within the margin of every arm not materially cheaper than it, with its closest call.

    Rivals of arm X: every other arm except those materially cheaper than X; at least one must be materially
    dearer (otherwise X is not cheaper in any sense that matters). Non-inferior: the lower interval bound of
    AUC(X) - AUC(rival) lies above -margin for every rival (an intersection-union test: no multiplicity penalty).
    """
    for arm in ranked:
        rivals = [other for other in ranked if other is not arm and not materially_cheaper(other, arm)]
        if not any(materially_cheaper(arm, other) for other in rivals):
            continue
        checks = [_between(pairs, arm.name, other.name) for other in rivals]
        if all(c is not None and c.test.estimable and c.test.ci_of_diff[0] > -margin for c in checks):
            return arm, min(checks, key=lambda c: c.test.ci_of_diff[0])  # type: ignore[union-attr]
    return None


def recommend(
    arms: Sequence[ArmSummary],
    comparisons: Mapping[tuple[str, str], AucComparison],
    *,
    margin: float,
    n_positive: int,
    n_negative: int,
    alpha: float = 0.05,
    min_per_class: int = MIN_PATIENTS_PER_CLASS,
) -> Verdict:
    """The arm the statistics support, never more (docs/verdict.md).

    0. Fewer than min_per_class positive or negative test patients: "too_few", nothing claimed; patients_needed
       says how many would settle the cheapest arm's comparison.
    1. Non-inferiority (_non_inferior_arm): the cheapest arm, by computed FLOPs with a material gap, whose
       interval lower bound clears -margin against every arm not materially cheaper ("non_inferior"). When that
       arm is also the best and beats every other significantly the verdict is "significant" instead.
    2. best = highest AUC point estimate: if its Holm-adjusted permutation p against every other arm is < alpha
       and its difference is positive, "significant".
    3. Otherwise "inconclusive": "not significant" never reads as "equivalent". It names the cheapest arm's
       weakest comparison and the patients a non-inferiority claim would need at POWER.
    """
    completed = [a for a in arms if a.status == "completed" and a.auc is not None and math.isfinite(a.auc)]
    if not completed:
        return Verdict("none", None, None, margin, alpha, [], min_per_class=min_per_class)
    if len(completed) == 1:
        only = completed[0].name
        return Verdict("single_arm", only, only, margin, alpha, [], min_per_class=min_per_class)
    names = [a.name for a in completed]
    keys = [(x, y) for i, x in enumerate(names) for y in names[i + 1:]
            if (x, y) in comparisons or (y, x) in comparisons]
    raw = [comparisons[k] if k in comparisons else _oriented(comparisons[(k[1], k[0])], True) for k in keys]
    pairs = [PairDecision(k[0], k[1], t, p) for k, t, p in zip(keys, raw, holm_adjust([t.p_value for t in raw]))]
    best = min(completed, key=lambda a: (-(a.auc or 0.0), a.name))
    ranked = sorted(completed, key=lambda a: (a.flops if a.flops else math.inf, a.name))
    verdict = Verdict("inconclusive", None, best.name, margin, alpha, pairs, min_per_class=min_per_class)
    if min(n_positive, n_negative) < min_per_class:
        too_few = _unsettled(verdict._replace(basis="too_few"), ranked, pairs, n_positive + n_negative)
        return too_few._replace(patients_needed=max(2 * min_per_class, too_few.patients_needed or 0))
    others = [_between(pairs, a.name, best.name) for a in completed if a is not best]
    if any(pair is None or not pair.test.estimable for pair in others):
        return verdict
    best_wins = all(pair is not None and pair.p_holm < alpha and pair.test.diff < 0 for pair in others)
    found = _non_inferior_arm(ranked, pairs, margin)
    if found is not None and not (found[0] is best and best_wins):
        return verdict._replace(basis="non_inferior", preferred_arm=found[0].name, deciding_pair=found[1])
    if best_wins:
        return verdict._replace(basis="significant", preferred_arm=best.name)
    return _unsettled(verdict, ranked, pairs, n_positive + n_negative)


def _unsettled(verdict: Verdict, ranked: list[ArmSummary], pairs: list[PairDecision], n_patients: int) -> Verdict:
    """An inconclusive or too-few verdict: the cheapest arm's weakest estimable comparison and the patients needed."""
    open_pairs = [_between(pairs, ranked[0].name, other.name) for other in ranked[1:]]
    usable = sorted((p for p in open_pairs if p is not None and p.test.estimable), key=lambda p: p.test.ci_of_diff[0])
    if not usable:
        return verdict
    weakest = usable[0]
    needed = patients_needed(n_patients, weakest.test.se, verdict.margin, weakest.test.level)
    return verdict._replace(deciding_pair=weakest, patients_needed=needed)
