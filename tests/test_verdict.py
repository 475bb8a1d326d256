"""The verdict's decision rule: paired AUC comparison, the rule's claims at small samples, cost ranking, wording."""

from __future__ import annotations

import math
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from data_schemas.files import read_model_json, write_model_json
from data_schemas.training import TIMING_FILE, TimingInfo
from reports.wording import recommendation_sentences, word_results
from tasks.evaluation import pairs, recommend as rule
from tasks.evaluation.statistics import roc_auc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _brute_force_p(y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray) -> float:
    """Every assignment of the two arms within each patient, the AUC difference recomputed from scratch."""
    observed = abs(roc_auc(y, a) - roc_auc(y, b))
    units = np.unique(groups)
    hits = 0
    for swap in product([False, True], repeat=units.size):
        flip = np.isin(groups, units[np.array(swap)])
        aa, bb = np.where(flip, b, a), np.where(flip, a, b)
        hits += abs(roc_auc(y, aa) - roc_auc(y, bb)) >= observed - 1e-12
    return hits / 2**units.size


def test_permutation_p_is_the_exact_enumeration_per_patient_and_with_unequal_slices() -> None:
    rng = np.random.default_rng(4)
    y = np.array([0] * 5 + [1] * 5)
    a, b = rng.random(10) * 0.6 + 0.3 * y, rng.random(10) * 0.6 + 0.2 * y
    test = pairs.paired_auc_comparison(y, a, b)
    assert test.p_value == pytest.approx(_brute_force_p(y, a, b, np.arange(10)), abs=1e-12)
    assert test.diff == pytest.approx(roc_auc(y, a) - roc_auc(y, b)) and "exact" in test.test_method
    groups = np.repeat(np.arange(8), [1, 2, 3, 1, 4, 2, 1, 3])
    ys = np.array([0, 1, 0, 1, 0, 1, 0, 1])[groups]
    a, b = rng.random(groups.size) * 0.7 + 0.2 * ys, rng.random(groups.size) * 0.7 + 0.1 * ys
    clustered = pairs.paired_auc_comparison(ys, a, b, groups=groups)
    assert clustered.p_value == pytest.approx(_brute_force_p(ys, a, b, groups), abs=1e-12)
    assert (clustered.n_positive, clustered.n_negative) == (4, 4)


def test_six_patients_cannot_reach_significance_and_the_smallest_p_is_honest() -> None:
    """3 + 3 patients, one arm perfect and one reversed: 2^6 swaps, the observed split is the most extreme pair of
    patterns (all kept, all swapped), so p = 2/64 = 0.031, not DeLong's p ~ 0."""
    y = np.array([0, 0, 0, 1, 1, 1])
    a = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    test = pairs.paired_auc_comparison(y, a, 1 - a)
    assert test.p_value == pytest.approx(2 / 64) and test.diff == 1.0
    assert -1.0 <= test.ci_of_diff[0] < test.ci_of_diff[1] <= 1.0


@pytest.mark.parametrize("n_per_class", [3, 10, 75])
def test_perfect_separation_by_both_arms_is_never_a_zero_width_interval(n_per_class: int) -> None:
    y = np.array([0] * n_per_class + [1] * n_per_class)
    a = np.r_[np.linspace(0.0, 0.4, n_per_class), np.linspace(0.6, 1.0, n_per_class)]
    test = pairs.paired_auc_comparison(y, a, a * 0.9)
    assert test.diff == 0.0 and test.p_value == 1.0 and test.estimable
    low, high = test.ci_of_diff
    assert -1.0 <= low < 0.0 < high <= 1.0  # the score interval of an observed AUC of 1 stays open below 1
    # Wilson-type: the AUC interval of a perfect arm narrows with n but never reaches a width of zero.
    assert pairs.auc_score_interval(1.0, n_per_class, n_per_class)[0] < 1.0


def test_auc_score_interval_solves_its_defining_equation() -> None:
    """(auc - theta)^2 = z^2 V(theta) at both ends, V from Newcombe 2006 method 5 written out here."""
    m, n, auc, z = 12, 9, 0.83, stats.norm.ppf(0.975)
    n_star = (m + n) / 2 - 1

    def v(t: float) -> float:
        return t * (1 - t) / (m * n) * (1 + n_star * ((1 - t) / (2 - t) + t / (1 + t)))

    low, high = pairs.auc_score_interval(auc, m, n)
    for end in (low, high):
        assert (auc - end) ** 2 == pytest.approx(z * z * v(end), rel=1e-6)
    assert low < auc < high


def test_constant_predictions_one_class_and_nan_scores() -> None:
    y = np.array([0, 1] * 6)
    constant = pairs.paired_auc_comparison(y, np.full(12, 0.5), np.full(12, 0.5))
    assert (constant.auc_a, constant.diff, constant.p_value) == (0.5, 0.0, 1.0)
    assert constant.ci_of_diff[0] < 0 < constant.ci_of_diff[1]
    one_class = pairs.paired_auc_comparison(np.ones(6, int), np.linspace(0, 1, 6), np.linspace(1, 0, 6))
    assert not one_class.estimable and "6 positive and 0 negative" in one_class.reason and math.isnan(one_class.p_value)
    with pytest.raises(ValueError, match="finite"):
        pairs.paired_auc_comparison(y, np.r_[np.full(11, 0.5), np.nan], np.full(12, 0.5))


def test_durkalski_uses_per_patient_proportions_with_unequal_slices() -> None:
    """Patients with 1 to 5 slices: X2 = (sum d_k)^2 / sum d_k^2 with d_k = (b_k - c_k) / n_k, computed here by a
    loop over patients (Durkalski et al. 2003; the unscaled Obuchowski 1998 form differs)."""
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 6, size=40)
    groups = np.repeat(np.arange(40), sizes)
    y = np.repeat(rng.integers(0, 2, 40), sizes)
    a, b = (rng.random(groups.size) < 0.7).astype(int), (rng.random(groups.size) < 0.5).astype(int)
    a = np.where(a == 1, y, 1 - y)
    b = np.where(b == 1, y, 1 - y)
    d, unscaled = [], []
    for k in range(40):
        rows = groups == k
        bk = int(np.sum((a[rows] == y[rows]) & (b[rows] != y[rows])))
        ck = int(np.sum((a[rows] != y[rows]) & (b[rows] == y[rows])))
        d.append((bk - ck) / rows.sum())
        unscaled.append(bk - ck)
    d_arr, u_arr = np.array(d), np.array(unscaled)
    expected = d_arr.sum() ** 2 / np.sum(d_arr**2)
    test = pairs.mcnemar_test(y, a, b, method="clustered", groups=groups)
    assert test.statistic == pytest.approx(expected) and test.p_value == pytest.approx(stats.chi2.sf(expected, 1))
    assert test.statistic != pytest.approx(u_arr.sum() ** 2 / np.sum(u_arr**2))  # not the slice-weighted form
    assert "per-patient proportions (Durkalski et al. 2003)" in pairs.METHOD_LABELS["clustered"]


# ---------------------------------------------------------------- the rule


def _cmp(diff: float, low: float, high: float, p: float, n: int = 75, auc_b: float = 0.8) -> pairs.AucComparison:
    se = (high - low) / (2 * 1.959964)
    return pairs.AucComparison(auc_b + diff, auc_b, diff, p, (low, high), se, 0.95, n, n, "permutation", "MOVER")


def _arms(*specs: tuple[str, float, float]) -> list[rule.ArmSummary]:
    return [rule.ArmSummary(name, "completed", auc, flops) for name, auc, flops in specs]


def test_recommend_follows_the_statistics() -> None:
    arms = _arms(("scratch", 0.84, 1e15), ("imagenet", 0.91, 3e15))
    sig = {("imagenet", "scratch"): _cmp(0.07, 0.02, 0.12, 0.004)}
    v = rule.recommend(arms, sig, margin=0.02, n_positive=75, n_negative=75)
    assert (v.basis, v.preferred_arm) == ("significant", "imagenet") and v.pairs[0].p_holm == pytest.approx(0.004)
    loose = {("scratch", "imagenet"): _cmp(-0.07, -0.20, 0.06, 0.27)}
    v = rule.recommend(arms, loose, margin=0.02, n_positive=75, n_negative=75)
    assert v.basis == "inconclusive" and v.preferred_arm is None and v.patients_needed and v.patients_needed > 150
    tight = {("scratch", "imagenet"): _cmp(-0.005, -0.015, 0.005, 0.33)}
    v = rule.recommend(arms, tight, margin=0.02, n_positive=75, n_negative=75)
    assert (v.basis, v.preferred_arm, v.deciding_pair.arm_a) == ("non_inferior", "scratch", "scratch")
    # Three arms: the cheapest is not non-inferior; the middle one is, to the dearest (significantly worse, by less
    # than the margin).
    three = _arms(("linear", 0.80, 1e14), ("imagenet", 0.86, 1e15), ("scratch", 0.87, 3e15))
    tests3 = {("linear", "scratch"): _cmp(-0.07, -0.2, 0.06, 0.3),
              ("linear", "imagenet"): _cmp(-0.06, -0.19, 0.07, 0.4),
              ("imagenet", "scratch"): _cmp(-0.01, -0.015, -0.005, 0.01)}
    v = rule.recommend(three, tests3, margin=0.02, n_positive=75, n_negative=75)
    assert (v.basis, v.preferred_arm, v.deciding_pair.arm_b) == ("non_inferior", "imagenet", "scratch")
    assert rule.recommend([arms[0], rule.ArmSummary("imagenet", "skipped")], {}, margin=0.02, n_positive=75,
                          n_negative=75).basis == "single_arm"
    assert rule.recommend([], {}, margin=0.02, n_positive=0, n_negative=0).basis == "none"


def test_below_the_minimum_nothing_is_claimed_however_small_p_is() -> None:
    arms = _arms(("scratch", 0.70, 1e15), ("imagenet", 0.99, 3e15))
    strong = {("imagenet", "scratch"): _cmp(0.29, 0.2, 0.35, 1e-6, n=9)}
    v = rule.recommend(arms, strong, margin=0.02, n_positive=9, n_negative=40)
    assert (v.basis, v.preferred_arm, v.best_arm) == ("too_few", None, "imagenet")
    assert v.patients_needed is not None and v.patients_needed >= 2 * rule.MIN_PATIENTS_PER_CLASS
    tight = {("scratch", "imagenet"): _cmp(-0.001, -0.005, 0.003, 0.5, n=9)}
    assert rule.recommend(arms, tight, margin=0.02, n_positive=40, n_negative=9).basis == "too_few"


def test_holm_adjusts_over_all_pairs() -> None:
    arms = _arms(("a", 0.90, 3e15), ("b", 0.80, 2e15), ("c", 0.79, 1e15))
    tests = {("a", "b"): _cmp(0.10, 0.01, 0.19, 0.03), ("a", "c"): _cmp(0.11, 0.02, 0.20, 0.02),
             ("b", "c"): _cmp(0.01, -0.08, 0.10, 0.5)}
    v = rule.recommend(arms, tests, margin=0.02, n_positive=50, n_negative=50)
    assert [p.p_holm for p in v.pairs] == pytest.approx([0.06, 0.06, 0.5]) and v.basis != "significant"


def test_cheaper_means_materially_fewer_flops_never_measured_time() -> None:
    """Within 20% of each other the arms cost the same: no non-inferiority preference, whatever their order."""
    tight = {("a", "b"): _cmp(-0.001, -0.01, 0.008, 0.6)}
    close = _arms(("a", 0.85, 1.0e15), ("b", 0.86, 1.1e15))
    assert rule.recommend(close, tight, margin=0.02, n_positive=50, n_negative=50).basis == "inconclusive"
    apart = _arms(("a", 0.85, 1.0e15), ("b", 0.86, 1.3e15))
    v = rule.recommend(apart, tight, margin=0.02, n_positive=50, n_negative=50)
    assert (v.basis, v.preferred_arm) == ("non_inferior", "a")
    unknown = _arms(("a", 0.85, None), ("b", 0.86, 1.3e15))  # type: ignore[arg-type]
    assert rule.recommend(unknown, tight, margin=0.02, n_positive=50, n_negative=50).basis == "inconclusive"


def test_patients_needed_plans_80_percent_power_and_is_continuous_across_the_margin() -> None:
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert rule.patients_needed(100, 0.05, 0.02) == math.ceil(100 * (z * 0.05 / 0.02) ** 2)  # 4906, not 2401
    half_power = math.ceil(100 * (stats.norm.ppf(0.975) * 0.05 / 0.02) ** 2)  # the old figure, 50% power
    assert rule.patients_needed(100, 0.05, 0.02, power=0.5) == half_power
    assert rule.patients_needed(100, 0.0, 0.02) is None and rule.patients_needed(0, 0.05, 0.02) is None
    arms = _arms(("cheap", 0.80, 1e15), ("dear", 0.82, 3e15))
    needed = [rule.recommend(arms, {("cheap", "dear"): _cmp(d, d - 0.06, d + 0.06, 0.5)}, margin=0.02, n_positive=40,
                             n_negative=40).patients_needed for d in (-0.019, -0.02, -0.021)]
    assert needed[0] == needed[1] == needed[2]  # the observed difference never enters: no jump at the margin


def test_identical_predictions_give_the_same_verdict_whatever_the_timings(tmp_path: Path) -> None:
    from report_fixtures import write_comparison
    from test_evaluate import _build

    dataset_dir, splits, arm_runs = write_comparison(tmp_path, arms=("scratch", "imagenet"), mode="holdout",
                                                     n_patients=90)
    timing_path = arm_runs["scratch"][0] / TIMING_FILE
    timing = read_model_json(timing_path, TimingInfo)
    write_model_json(timing_path, timing.model_copy(update={"train_flops_per_image": timing.train_flops_per_image / 3}))
    verdicts = []
    for scratch_seconds in (27.0, 51.0, 2000.0):
        timed = read_model_json(timing_path, TimingInfo).model_copy(update={"wall_seconds": scratch_seconds})
        write_model_json(timing_path, timed)
        rec = _build(tmp_path, arm_runs, "holdout", dataset_dir, splits).recommendation
        verdicts.append((rec.basis, rec.preferred_arm, rec.headline))
    assert verdicts[0] == verdicts[1] == verdicts[2]
    assert "scratch" in verdicts[0][2] and "FLOP" in verdicts[0][2] or verdicts[0][0] != "non_inferior"


# ---------------------------------------------------------------- the headline says what the rule decided


def _worded(verdict: rule.Verdict, aucs: dict[str, float], n_positive: int = 40, n_negative: int = 40):
    from data_schemas.metrics import MetricValue
    from data_schemas.report import ArmCostSummary, ArmResult, PairedComparison, TestMetrics
    from tasks.evaluation.verdict import auc_result, recommendation_of

    others = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "brier", "ece")
    empty = {k: MetricValue() for k in others}
    arms = []
    for name, auc in aucs.items():
        m = TestMetrics(level="patient", n_images=100, n_patients=n_positive + n_negative,
                        roc_auc=MetricValue(value=auc), **empty)
        arms.append(ArmResult(name=name, status="completed", cost=ArmCostSummary(total_flops=1e15 * (1 + len(arms))),
                              test_metrics=m, patient_metrics=m))
    comparisons = [PairedComparison(arm_a=p.arm_a, arm_b=p.arm_b, patient_delong=auc_result(p.test, p.p_holm))
                   for p in verdict.pairs]
    rec = recommendation_of(verdict, n_positive, n_negative)
    return rec, recommendation_sentences(rec, arms, comparisons, n_positive + n_negative)[0]


@pytest.mark.parametrize("basis", ["significant", "non_inferior", "inconclusive", "too_few", "single_arm"])
def test_each_verdict_kind_is_worded_as_decided(basis: str) -> None:
    arms = _arms(("cheap", 0.84, 1e15), ("dear", 0.86, 2e15))
    cases = {
        "significant": ({("cheap", "dear"): _cmp(-0.10, -0.15, -0.05, 0.001, n=40)}, 40),
        "non_inferior": ({("cheap", "dear"): _cmp(-0.002, -0.015, 0.01, 0.6, n=40)}, 40),
        "inconclusive": ({("cheap", "dear"): _cmp(-0.02, -0.09, 0.05, 0.5, n=40)}, 40),
        "too_few": ({("cheap", "dear"): _cmp(-0.10, -0.15, -0.05, 0.001, n=4)}, 4),
        "single_arm": ({}, 40),
    }
    tests, n = cases[basis]
    chosen = arms[:1] if basis == "single_arm" else arms
    verdict = rule.recommend(chosen, tests, margin=0.02, n_positive=n, n_negative=n)
    assert verdict.basis == basis
    rec, headline = _worded(verdict, {a.name: a.auc for a in chosen}, n, n)
    claims_significance = "significantly higher" in headline
    claims_non_inferiority = "non-inferior within" in headline and headline.startswith("Prefer")
    assert claims_significance == (basis == "significant")
    assert claims_non_inferiority == (basis == "non_inferior")
    if basis == "significant":
        assert headline.startswith(f"Use {verdict.preferred_arm}:")
    if basis == "non_inferior":
        assert "to every arm that is not materially cheaper" in headline and "not shown worse" not in headline
    if basis == "too_few":
        assert "too few patients to compare (4 positive, 4 negative" in headline
        assert str(rec.patients_needed) in headline
    if basis == "inconclusive":
        assert headline.startswith("Inconclusive") and "is not a winner" in headline
        assert str(rec.patients_needed) in headline


def test_build_results_words_a_six_patient_comparison_without_claims(tmp_path: Path) -> None:
    from report_fixtures import write_comparison
    from test_evaluate import _build

    dataset_dir, splits, arm_runs = write_comparison(tmp_path, arms=("scratch", "imagenet"), mode="holdout",
                                                     n_patients=18)
    results = _build(tmp_path, arm_runs, "holdout", dataset_dir, splits)
    assert results.recommendation.basis in ("too_few", "none")
    text = results.recommendation.headline + " ".join(pc.plain_words for pc in results.comparisons)
    assert "significant difference" not in text.replace("no significant difference", "") and "Prefer" not in text
    for pc in results.comparisons:
        for test in (pc.delong, pc.patient_delong):
            if test is not None and test.ci_of_diff is not None:
                assert -1.0 <= test.ci_of_diff[0] < test.ci_of_diff[1] <= 1.0
    assert word_results(results).recommendation.headline == results.recommendation.headline


# ---------------------------------------------------------------- the calibration benchmark, small


def test_calibration_benchmark_runs_the_product_rule_and_claims_nothing_below_the_minimum() -> None:
    import verdict_calibration as vc

    truths = (vc.TRUTHS[0], vc.TRUTHS[3])  # no difference at 0.85; difference = margin at 0.96 vs 0.98
    rows = vc.run_calibration(cohorts=6, seed=1, sizes=(6, 22), truths=truths, truth_patients=4000)
    assert [(r.n, r.truth.name) for r in rows] == [(n, t.name) for n in (6, 22) for t in truths]
    for row in rows:
        assert all(0.0 <= v <= 1.0 for v in (row.non_inferior, row.significant_dear, row.significant_cheap))
        if row.n == 6:  # 3 + 3 patients: below the minimum, the worded verdict claims nothing
            assert row.non_inferior == row.significant_dear == row.significant_cheap == 0.0
    assert "significant (cheaper)" in rows[0].false_rates() and "non-inferior" in rows[-1].false_rates()
    assert vc.format_row(rows[-1]).startswith("n=22") and 0.0 <= vc.max_false_rate(rows) <= 1.0


# ---------------------------------------------------------------- intervals of proportions


@pytest.mark.parametrize("k, n", [(0, 3), (3, 3), (7, 20), (19, 20), (1, 1)])
def test_proportion_intervals_match_scipy(k: int, n: int) -> None:
    from tasks.evaluation.statistics import clopper_pearson_interval, wilson_interval

    exact = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    wilson = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert clopper_pearson_interval(k, n) == pytest.approx((exact.low, exact.high), abs=1e-12)
    assert wilson_interval(k, n) == pytest.approx((wilson.low, wilson.high), abs=1e-12)


def test_clustered_wilson_counts_copies_of_a_patient_once_and_independent_rows_fully() -> None:
    from tasks.evaluation.statistics import clustered_wilson_interval, wilson_interval

    hits = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], dtype=float)
    assert clustered_wilson_interval(hits, np.arange(10)) == pytest.approx(wilson_interval(7, 10))
    copies = np.repeat(hits, 4)  # each patient's 4 slices agree: 40 rows carry 10 patients' information
    assert clustered_wilson_interval(copies, np.repeat(np.arange(10), 4)) == pytest.approx(wilson_interval(7, 10))
    assert clustered_wilson_interval(np.ones(12), np.repeat(np.arange(3), 4)) == pytest.approx(wilson_interval(3, 3))


def test_a_perfect_sensitivity_on_three_patients_is_not_a_zero_width_interval() -> None:
    from tasks.evaluation.evaluate import metric_block

    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.6])
    metrics = metric_block(y, p, [f"p{i}" for i in range(7)], np.full(7, 0.5), level="patient", n_bootstrap=50, seed=0)
    exact = stats.binomtest(3, 3).proportion_ci(method="exact")
    assert metrics.sensitivity.value == 1.0
    assert (metrics.sensitivity.ci_low, metrics.sensitivity.ci_high) == pytest.approx((exact.low, exact.high))
    spec = stats.binomtest(3, 4).proportion_ci(method="exact")
    assert (metrics.specificity.ci_low, metrics.specificity.ci_high) == pytest.approx((spec.low, spec.high))
