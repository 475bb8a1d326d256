"""What the numbers say to do: "What to train" (budgets, the highest arm, the smallest non-inferior one) and the
recommendation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from data_schemas.base import StrictModel
from data_schemas.metrics import MetricValue
from data_schemas.report.arm import UnitLevel

AUC_TIE_TOLERANCE = 0.0005  # AUCs that print the same at three decimals are a tie, never ranked by list order


class BudgetChoice(StrictModel):
    """Among arms whose measured training compute fits a budget: the highest patient-level test AUC point estimate,
    arms tied with it or with overlapping intervals, and whether the paired tests show it best.

    Args:
        budget_flops: the budget: this arm's measured training FLOPs.
        budget_seconds: that arm's measured training wall time.
        highest_arm: the arm with the highest point estimate within the budget (with a tie, see tied_with).
        auc: its patient-level test AUC with its 95% CI.
        tied_with: other arms within the budget whose AUC equals it at the three decimals shown.
        overlapping: other arms within the budget whose 95% AUC interval overlaps its interval.
        shown_best: True only when the paired patient-level AUC test shows highest_arm above every other arm in
            the budget (Holm-adjusted p < 0.05, with the recommendation's minimum of test patients per class).
    """

    budget_flops: float
    budget_seconds: float | None = None
    highest_arm: str
    auc: MetricValue
    tied_with: list[str] = Field(default_factory=list)
    overlapping: list[str] = Field(default_factory=list)
    shown_best: bool = False


class WhatToTrain(StrictModel):
    """"What to train": answers read off measured numbers, never a winner from a point estimate (reports.wording words
    them).

    Args:
        budgets: for each completed arm's measured training compute as a budget, ascending, the highest point
            estimate within it (the compute-AUC frontier).
        highest_arm: the arm with the highest patient-level test AUC point estimate.
        tied_with: arms tied with it (equal at the three decimals shown).
        overlapping: arms whose 95% AUC interval overlaps highest_arm's.
        shown_best: the paired patient-level AUC test shows highest_arm above every other arm (see BudgetChoice).
        smallest_non_inferior: the arm with the fewest forward FLOPs per image whose patient-level AUC is
            non-inferior to highest_arm and every arm tied with it (lower 95% bound of the paired difference >
            -margin), or highest_arm.
        smallest_ci_of_diff: that arm's AUC minus highest_arm's, 95% CI (None when it is highest_arm).
        margin: the non-inferiority margin (the recommendation's).
        chosen_depth: per imagenet-linear arm, the depth chosen on validation.
        chosen_size: per arm with an input-size curve, the size chosen on validation AUC (absent when no size had a
            validation AUC).
        sentences: the section in words, filled by reports.wording.
    """

    budgets: list[BudgetChoice] = Field(default_factory=list)
    highest_arm: str | None = None
    tied_with: list[str] = Field(default_factory=list)
    overlapping: list[str] = Field(default_factory=list)
    shown_best: bool = False
    smallest_non_inferior: str | None = None
    smallest_ci_of_diff: tuple[float, float] | None = None
    margin: float | None = None
    chosen_depth: dict[str, str] = Field(default_factory=dict)
    chosen_size: dict[str, int] = Field(default_factory=dict)
    sentences: list[str] = Field(default_factory=list)


class Recommendation(StrictModel):
    """What the numbers say to do, derived from them by tasks.evaluation.recommend.recommend (docs/verdict.md).

    Args:
        headline: one or two sentences shown first in the report.
        details: supporting sentences (per-pair tests, costs, caveats).
        preferred_arm: the arm recommended, None when no arm can be recommended.
        basis: "significant" (best AUC higher than every other's, Holm-adjusted exact permutation p < alpha),
            "non_inferior" (an arm with materially fewer FLOPs whose interval lower bound of the AUC difference lies
            above -margin against every arm not materially cheaper), "inconclusive" (nothing settled at this
            sample size), "too_few" (fewer than min_patients_per_class test patients of a class: nothing claimed),
            "single_arm" (only one arm completed), "none" (nothing completed).
        best_arm: the arm with the highest AUC point estimate (a winner only when basis is "significant").
        margin: the non-inferiority margin used, in AUC.
        alpha: the family-wise level of the significance claims.
        level: "patient" or "slice": whose AUC comparisons decided.
        patients_needed: test patients for a non-inferiority claim of the cheaper arm at the margin with `power`,
            if the arms truly performed alike (tasks.evaluation.recommend.patients_needed).
        power: the power patients_needed plans for.
        min_patients_per_class: the rule's minimum of positive and of negative test patients for any claim.
        n_positive / n_negative: test patients of each class.
        cost_measure: what ranks the arms by cost.
        deciding_arms: [arm, other] of the comparison whose interval decided a non-inferior, inconclusive or
            too-few verdict (the preferred or cheapest arm first).
    """

    headline: str
    details: list[str] = Field(default_factory=list)
    preferred_arm: str | None = None
    basis: Literal["significant", "non_inferior", "inconclusive", "too_few", "single_arm", "none"]
    best_arm: str | None = None
    margin: float | None = None
    alpha: float = 0.05
    level: UnitLevel = "patient"
    patients_needed: int | None = None
    power: float = 0.8
    min_patients_per_class: int = 10
    n_positive: int = 0
    n_negative: int = 0
    cost_measure: str = "computed training + inference FLOPs (an arm is cheaper with at least 20% fewer)"
    deciding_arms: list[str] = Field(default_factory=list, description="[arm, other arm] of the pair that decided")
