"""Edges of tasks/evaluation/statistics.py that mutation testing found unchecked: each test pins a number or a field by
hand.

The clustered DeLong variance is recomputed here from Obuchowski's (1997) definitions with plain loops over
image pairs, independently of the vectorised midrank code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.evaluation import pairs, pooling, statistics as st


def test_bootstrap_with_one_resample_and_with_no_images() -> None:
    one = st.bootstrap_ci([0, 1, 0, 1], [0.2, 0.9, 0.4, 0.6], ["a", "a", "b", "b"], metrics=["accuracy"], n_resamples=1)
    assert one["accuracy"].value == 1.0 and one["accuracy"].n_valid + one["accuracy"].n_skipped == 1
    with pytest.raises(ValueError, match="n_resamples must be >= 1, got 0"):
        st.bootstrap_ci([0, 1], [0.2, 0.9], ["a", "b"], n_resamples=0)
    empty = st.bootstrap_ci([], [], [], metrics=["accuracy", "roc_auc"], n_resamples=5)
    assert set(empty) == {"accuracy", "roc_auc"}
    for interval in empty.values():
        assert all(math.isnan(x) for x in interval[:3]) and (interval.n_valid, interval.n_skipped) == (0, 5)


def test_a_single_image_still_has_its_accuracy_and_bad_metric_names_are_refused() -> None:
    single = st.bootstrap_ci([1], [0.9], ["a"], metrics=["accuracy"], n_resamples=3)
    assert single["accuracy"] == (1.0, 1.0, 1.0, 3, 0)
    with pytest.raises(ValueError, match=r"^metric must be one of \["):
        st.bootstrap_ci([0, 1], [0.2, 0.9], ["a", "b"], metrics=["auc"])


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _obuchowski_cov(y: np.ndarray, probs: list[np.ndarray], groups: np.ndarray) -> np.ndarray:
    """Obuchowski (1997) eq. 3-5 by loops: per-image V10/V01 from psi over all pairs, summed per patient."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    big_m, big_n = len(pos), len(neg)
    patients = sorted(set(groups.tolist()))
    a_dev, b_dev = [], []
    for p in probs:
        auc = sum(_psi(p[i], p[j]) for i in pos for j in neg) / (big_m * big_n)
        v10 = {i: sum(_psi(p[i], p[j]) for j in neg) / big_n for i in pos}
        v01 = {j: sum(_psi(p[i], p[j]) for i in pos) / big_m for j in neg}
        a_dev.append(np.array([sum(v10[i] - auc for i in pos if groups[i] == k) for k in patients]))
        b_dev.append(np.array([sum(v01[j] - auc for j in neg if groups[j] == k) for k in patients]))
    i10 = len({groups[i] for i in pos})
    i01 = len({groups[j] for j in neg})
    n_patients = len(patients)
    cov = np.zeros((len(probs), len(probs)))
    for r in range(len(probs)):
        for t in range(len(probs)):
            s10 = i10 / (i10 - 1) / big_m * float(a_dev[r] @ a_dev[t])
            s01 = i01 / (i01 - 1) / big_n * float(b_dev[r] @ b_dev[t])
            s11 = n_patients / (n_patients - 1) * (float(a_dev[r] @ b_dev[t]) + float(a_dev[t] @ b_dev[r]))
            cov[r, t] = s10 / big_m + s01 / big_n + s11 / (big_m * big_n)
    return cov


def test_clustered_delong_se_matches_obuchowski_by_hand_with_mixed_patients() -> None:
    """Patients holding both positive and negative images make the S11 cross term count."""
    rng = np.random.default_rng(11)
    groups = np.repeat(np.arange(9), 3)
    y = np.tile([1, 0, 1], 9)
    y[::7] = 1 - y[::7]
    a = np.clip(0.35 * y + rng.random(y.size) * 0.7, 0, 1)
    b = np.clip(0.15 * y + rng.random(y.size) * 0.9, 0, 1)
    cov = _obuchowski_cov(y, [a, b], groups)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    test = pairs.delong_test(y, a, b, groups=groups.tolist())
    assert test.method == pairs.DELONG_CLUSTERED
    assert test.se == pytest.approx(math.sqrt(var), rel=1e-9)


def test_not_estimable_delong_has_no_numbers_and_names_its_unit() -> None:
    test = pairs.delong_test([1, 0, 0], [0.9, 0.2, 0.1], [0.8, 0.3, 0.1])
    assert all(math.isnan(x) for x in (test.auc_a, test.auc_b, test.diff, test.z, test.p_value, *test.ci_of_diff))
    assert test.reason == "not estimable: 1 positive and 2 negative images (at least 2 of each are needed)"


def test_zero_variance_is_not_estimable_never_a_zero_width_interval() -> None:
    """A perfect ranking against a perfectly inverted one, or two perfect rankings: both AUC variances are 0."""
    for other in ([0.1, 0.2, 0.8, 0.9], [0.8, 0.7, 0.3, 0.2]):
        test = pairs.delong_test([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1], other)
        assert test.auc_a == 1.0 and not test.estimable and "zero variance" in test.reason
        assert all(math.isnan(x) for x in test.ci_of_diff)
        assert test.p_value == 1.0 if test.diff == 0.0 else math.isnan(test.p_value)


def test_mcnemar_fields_in_the_edge_cases() -> None:
    assert tuple(pairs.mcnemar_test([1, 0], [1, 0], [1, 0], method="exact")[:6]) == (0, 0, 0.0, 1.0, "exact", 0)
    empty = pairs.mcnemar_test([], [], [], groups=[])
    assert (empty.b, empty.c, empty.method, empty.n_discordant_units) == (0, 0, "not_estimable", 0)
    assert math.isnan(empty.statistic) and math.isnan(empty.p_value) and empty.reason == "not estimable: no images"
    # b = 5 (A right, B wrong), c = 2: statistic min(b, c) = 2, p = 2 * (1 + 7 + 21) / 2^7 = 58/128.
    y = [1] * 7
    a = [1, 1, 1, 1, 1, 0, 0]
    b = [0, 0, 0, 0, 0, 1, 1]
    exact = pairs.mcnemar_test(y, a, b, method="exact")
    assert (exact.b, exact.c, exact.statistic, exact.method, exact.n_discordant_units) == (5, 2, 2.0, "exact", 7)
    assert exact.p_value == pytest.approx(58 / 128)


def test_roc_points_run_from_threshold_one_down_to_the_lowest_score() -> None:
    points = st.roc_curve_points([0, 1, 0, 1], [0.1, 0.4, 0.35, 0.8])
    assert points[0] == {"fpr": 0.0, "tpr": 0.0, "threshold": 1.0}
    assert points[-1] == {"fpr": 1.0, "tpr": 1.0, "threshold": 0.1}


def test_calibration_top_bin_holds_a_probability_of_one() -> None:
    points = st.calibration_curve_points([1, 0, 1], [1.0, 0.5, 0.95], n_bins=10)
    assert [(p["bin_low"], p["count"]) for p in points] == [(0.4, 1), (0.9, 2)]


def test_operating_point_thresholds_stay_within_unit_range_and_bad_rules_are_named() -> None:
    """A negative at p = 1: only the threshold above every score has specificity 1, and it is capped at 1.0."""
    point = pooling.choose_operating_point([0, 1, 0, 1], [1.0, 0.9, 0.2, 0.6], "specificity", 1.0)
    assert point.threshold == 1.0
    with pytest.raises(ValueError, match=r"^operating point rule must be one of \['youden'"):
        pooling.choose_operating_point([0, 1], [0.2, 0.9], "f1")


def test_youden_threshold_is_the_midpoint_between_the_two_middle_scores() -> None:
    """Scores 0.1 0.2 | 0.3 0.4 with the negatives below: only the cut at (0.2 + 0.3) / 2 = 0.25 has J = 1; the
    cuts at 0.35 and 0.15 have J = 0.5."""
    point = pooling.choose_operating_point([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], "youden")
    assert (point.threshold, point.rule) == (pytest.approx(0.25), "youden")


def test_a_bad_calibration_mode_is_named_with_its_choices() -> None:
    with pytest.raises(ValueError, match=r"^mode must be one of \['top_label', 'positive_class'\], got 'bogus'$"):
        st.expected_calibration_error([0, 1], [0.2, 0.9], mode="bogus")  # type: ignore[arg-type]
