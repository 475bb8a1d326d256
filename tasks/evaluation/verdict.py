"""From pooled test predictions to the verdict: every pair's tests per slice and per patient, Holm, and the rule.

build_results calls these on the arms' pooled predictions; benchmarks/verdict_calibration.py calls the same
functions on simulated cohorts, so the calibration measured there is the product's.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from data_schemas.report import ArmCostSummary, ArmResult, DeLongResult, McNemarResult, PairedComparison, Recommendation
from tasks.evaluation import pairs
from tasks.evaluation.recommend import ArmSummary, Verdict, recommend
from tasks.evaluation.runs import PooledArm


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def auc_result(test: pairs.AucComparison, p_holm: float) -> DeLongResult:
    """The schema form of a paired AUC comparison; no interval unless it is estimable."""
    return DeLongResult(
        auc_a=_finite(test.auc_a), auc_b=_finite(test.auc_b), diff=_finite(test.diff),
        p_value=_finite(test.p_value), p_holm=_finite(p_holm),
        ci_of_diff=None if test.reason else (float(test.ci_of_diff[0]), float(test.ci_of_diff[1])),
        level=test.level, method=test.test_method, interval_method=test.interval_method,
        n_positive=test.n_positive, n_negative=test.n_negative, reason=test.reason,
    )


def _mcnemar_result(test: pairs.McNemarTest, p_holm: float) -> McNemarResult:
    return McNemarResult(
        b=test.b, c=test.c, statistic=_finite(test.statistic), p_value=_finite(test.p_value), p_holm=_finite(p_holm),
        method=test.method, method_label=pairs.METHOD_LABELS.get(test.method, test.method),  # type: ignore[arg-type]
        n_discordant_units=test.n_discordant_units, reason=test.reason,
    )


@dataclass
class PairTests:
    """The four tests of one pair: AUC and decisions, per slice and per patient."""

    n_images: int
    n_patients: int
    slice_auc: pairs.AucComparison
    slice_decision: pairs.McNemarTest
    patient_auc: pairs.AucComparison
    patient_decision: pairs.McNemarTest


def pair_tests(a: PooledArm, b: PooledArm) -> PairTests | None:
    """AUC comparison and McNemar per slice (clustered by patient) and per patient, on the images both arms scored."""
    index_b = {key: i for i, key in enumerate(b.slices.image_keys)}
    shared = [(i, index_b[key]) for i, key in enumerate(a.slices.image_keys) if key in index_b]
    if not shared:
        return None
    ia, ib = np.array([s[0] for s in shared]), np.array([s[1] for s in shared])
    y = a.slices.targets[ia]
    patients = [a.slices.patient_keys[i] for i in ia]
    pa, pb = a.slices.probs[ia], b.slices.probs[ib]
    slice_auc = pairs.paired_auc_comparison(y, pa, pb, groups=patients)
    slice_decision = pairs.mcnemar_test(
        y, (pa >= a.slice_thresholds[ia]).astype(int), (pb >= b.slice_thresholds[ib]).astype(int), groups=patients)
    # Patient level: the patients both arms scored, each arm's aggregated probability and patient threshold.
    pos_a = {k: i for i, k in enumerate(a.patients.patients)}
    pos_b = {k: i for i, k in enumerate(b.patients.patients)}
    keys = sorted(set(patients))
    ka, kb = np.array([pos_a[k] for k in keys]), np.array([pos_b[k] for k in keys])
    yp = a.patients.targets[ka]
    qa, qb = a.patients.probs[ka], b.patients.probs[kb]
    patient_auc = pairs.paired_auc_comparison(yp, qa, qb)
    patient_decision = pairs.mcnemar_test(
        yp, (qa >= a.patient_thresholds[ka]).astype(int), (qb >= b.patient_thresholds[kb]).astype(int), groups=keys)
    return PairTests(len(shared), len(keys), slice_auc, slice_decision, patient_auc, patient_decision)


def paired_comparisons(
    pooled: dict[str, PooledArm],
) -> tuple[list[PairedComparison], dict[tuple[str, str], pairs.AucComparison]]:
    """Every pair of completed arms, with Holm-adjusted p-values per family (test and level) over all pairs."""
    tested = [(x, y, t) for x, y in combinations(sorted(pooled), 2)
              if (t := pair_tests(pooled[x], pooled[y])) is not None]
    families = ("slice_auc", "slice_decision", "patient_auc", "patient_decision")
    holm = {f: pairs.holm_adjust([getattr(t, f).p_value for _, _, t in tested]) for f in families}
    comparisons = [
        PairedComparison(
            arm_a=x, arm_b=y, n_images=t.n_images, n_patients=t.n_patients,
            delong=auc_result(t.slice_auc, holm["slice_auc"][k]),
            mcnemar=_mcnemar_result(t.slice_decision, holm["slice_decision"][k]),
            patient_delong=auc_result(t.patient_auc, holm["patient_auc"][k]),
            patient_mcnemar=_mcnemar_result(t.patient_decision, holm["patient_decision"][k]),
        )
        for k, (x, y, t) in enumerate(tested)
    ]
    return comparisons, {(x, y): t.patient_auc for x, y, t in tested}


def arm_flops(cost: ArmCostSummary, n_test_images: int) -> float | None:
    """Computed cost of an arm: training FLOPs plus forward FLOPs over the test images; None when not recorded."""
    if not cost.total_flops:
        return None
    return float(cost.total_flops) + float(cost.flops_per_image or 0.0) * n_test_images


def class_counts(pooled: dict[str, PooledArm]) -> tuple[int, int]:
    """Positive and negative test patients (every arm scores the same ones; the first arm by name counts)."""
    if not pooled:
        return 0, 0
    targets = pooled[sorted(pooled)[0]].patients.targets
    return int(targets.sum()), int(targets.size - targets.sum())


def decide(
    arms: list[ArmResult], tests: dict[tuple[str, str], pairs.AucComparison], margin: float,
    n_positive: int, n_negative: int,
) -> Recommendation:
    """The rule of tasks.evaluation.recommend on the patient-level comparisons (reports.wording words it)."""
    summaries = [
        ArmSummary(a.name, a.status, a.patient_metrics.roc_auc.value if a.patient_metrics else None,
                   arm_flops(a.cost, a.patient_metrics.n_images if a.patient_metrics else 0))
        for a in arms
    ]
    verdict = recommend(summaries, tests, margin=margin, n_positive=n_positive, n_negative=n_negative)
    return recommendation_of(verdict, n_positive, n_negative)


def recommendation_of(verdict: Verdict, n_positive: int, n_negative: int) -> Recommendation:
    """The schema form of a Verdict (headline left empty for reports.wording)."""
    deciding = verdict.deciding_pair
    return Recommendation(
        headline="", basis=verdict.basis, preferred_arm=verdict.preferred_arm,  # type: ignore[arg-type]
        best_arm=verdict.best_arm, margin=verdict.margin, alpha=verdict.alpha, level="patient",
        patients_needed=verdict.patients_needed, min_patients_per_class=verdict.min_per_class,
        n_positive=n_positive, n_negative=n_negative,
        deciding_arms=[deciding.arm_a, deciding.arm_b] if deciding else [],
    )
