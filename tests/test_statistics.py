"""Tests of tasks.evaluation.statistics against sklearn/scipy, hand computations and textbook values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from tasks.evaluation import pairs, pooling, statistics as st


def _synthetic(n_patients: int, images_per_patient: int = 4, shift: float = 1.0, seed: int = 0):
    """Patients with one label each; images of a patient share a patient effect."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n_patients)
    labels[:2] = [0, 1]
    effect = rng.normal(0, 0.5, n_patients)
    y = np.repeat(labels, images_per_patient)
    groups = np.repeat(np.arange(n_patients), images_per_patient)
    logit = shift * (2 * y - 1) + np.repeat(effect, images_per_patient) + rng.normal(0, 1, y.size)
    return y, 1 / (1 + np.exp(-logit)), groups


def _delong_direct(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """O(n^2) DeLong 1988 structural components: returns auc_a, auc_b, var(auc_a - auc_b)."""
    comps = []
    for p in (a, b):
        pos, neg = p[y == 1], p[y == 0]
        psi = (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])
        comps.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, n = int(y.sum()), int((1 - y).sum())
    s10 = np.cov(np.vstack([comps[0][1], comps[1][1]]))
    s01 = np.cov(np.vstack([comps[0][2], comps[1][2]]))
    s = s10 / m + s01 / n
    return comps[0][0], comps[1][0], s[0, 0] + s[1, 1] - 2 * s[0, 1]


def test_binary_metrics_match_sklearn() -> None:
    y, p, _ = _synthetic(40)
    p = np.round(p, 2)  # ties
    m = st.binary_metrics(y, p, threshold=0.5)
    pred = (p >= 0.5).astype(int)
    assert set(m) == set(st.METRIC_NAMES)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert 0 <= m["ece"] <= 1


def test_ece_hand_case() -> None:
    # Top-label: conf 0.9 (right), 0.9 (wrong) -> bin (0.8, 0.9]: |0.5 - 0.9| * 2/4;
    # conf 0.6 right, 0.6 right -> bin (0.5, 0.6]: |1 - 0.6| * 2/4. ECE = 0.2 + 0.2 = 0.4.
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.9, 0.6, 0.4])
    assert st.expected_calibration_error(y, p, mode="top_label") == pytest.approx(0.4)
    # Positive class (the default, as the reliability diagram): bin (0.8, 0.9]: |0.5 - 0.9| * 2/4 = 0.2;
    # bin (0.5, 0.6]: |1 - 0.6| * 1/4 = 0.1; bin (0.3, 0.4]: |0 - 0.4| * 1/4 = 0.1. ECE = 0.4.
    assert st.expected_calibration_error(y, p) == pytest.approx(0.4)
    y2, p2 = np.array([1, 0, 0, 0]), np.array([0.2, 0.2, 0.2, 0.2])
    # Positive class: |0.25 - 0.2| = 0.05; top label: conf 0.8, all predicted negative, 3/4 right: |0.75 - 0.8| = 0.05.
    assert st.expected_calibration_error(y2, p2) == pytest.approx(0.05)
    # They differ when a top-label bin merges p and 1 - p: p = 0.2 and 0.8, both positive.
    # Positive class: |1 - 0.2| / 2 + |1 - 0.8| / 2 = 0.5; top label: conf 0.8 for both, half right: |0.5 - 0.8| = 0.3.
    y3, p3 = np.array([1, 1]), np.array([0.2, 0.8])
    assert st.expected_calibration_error(y3, p3) == pytest.approx(0.5)
    assert st.expected_calibration_error(y3, p3, mode="top_label") == pytest.approx(0.3)
    perfect = st.expected_calibration_error(np.array([1, 1, 0, 0]), np.array([1.0, 1.0, 0.0, 0.0]))
    assert perfect == pytest.approx(0.0)
    with pytest.raises(ValueError, match="top_label"):
        st.expected_calibration_error(y, p, mode="bogus")  # type: ignore[arg-type]


def test_single_class_metrics_are_nan() -> None:
    m = st.binary_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert math.isnan(m["roc_auc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)



def test_resampled_auc_is_roc_auc_of_each_resample() -> None:
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 2, 25), np.round(rng.random(25) * 4) / 4  # few distinct values: many ties
    draws = rng.integers(0, 25, size=(300, 25))
    draws[0] = np.flatnonzero(y == 1)[0]  # one class only: not estimable
    expected = np.array([st.roc_auc(y[d], p[d]) for d in draws])
    assert np.isnan(expected[0])
    np.testing.assert_array_equal(st.resampled_roc_auc(y, p, draws), expected)

def test_bootstrap_covers_point_and_shrinks() -> None:
    y, p, g = _synthetic(30)
    small = st.bootstrap_ci(y, p, g, ["roc_auc", "accuracy"], n_resamples=300, seed=1)
    for iv in small.values():
        assert iv.ci_low <= iv.value <= iv.ci_high
    y2, p2, g2 = _synthetic(300)
    big = st.bootstrap_ci(y2, p2, g2, ["roc_auc", "accuracy"], n_resamples=300, seed=1)
    for name in ("roc_auc", "accuracy"):
        assert big[name].ci_high - big[name].ci_low < small[name].ci_high - small[name].ci_low
    again = st.bootstrap_ci(y, p, g, ["roc_auc"], n_resamples=300, seed=1)
    assert again["roc_auc"] == small["roc_auc"]  # seeded


def test_bootstrap_does_not_depend_on_patient_names_or_row_order() -> None:
    """Another pseudonymization key renames (and reorders) the patients: the intervals stay the same."""
    y, p, g = _synthetic(30, seed=5)
    renamed = np.array([f"{(7919 * int(k)) % 1000:03d}" for k in g])  # another key, another sort order
    order = np.random.default_rng(1).permutation(y.size)
    first = st.bootstrap_ci(y, p, g, ["roc_auc", "sensitivity"], n_resamples=200, seed=3)
    again = st.bootstrap_ci(y[order], p[order], renamed[order], ["roc_auc", "sensitivity"], n_resamples=200, seed=3)
    assert first == again


def test_bootstrap_resamples_patients_and_counts_skips() -> None:
    # 3 patients: two negatives and one positive -> some resamples lack the positive patient.
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.9])
    g = np.array(["a", "a", "b", "b", "c", "c"])
    res = st.bootstrap_ci(y, p, g, ["roc_auc", "accuracy"], n_resamples=200, seed=0)
    auc = res["roc_auc"]
    # P(patient c never drawn) = (2/3)^3; P(only c drawn) = (1/3)^3.
    assert 0 < auc.n_skipped < 200 and auc.n_valid + auc.n_skipped == 200
    assert auc.n_skipped == pytest.approx(200 * ((2 / 3) ** 3 + (1 / 3) ** 3), abs=25)
    assert res["accuracy"].n_skipped == 0


def test_bootstrap_custom_metric_and_bad_name() -> None:
    y, p, g = _synthetic(20)
    res = st.bootstrap_ci(y, p, g, lambda yy, pp: float(np.mean(pp)), n_resamples=50)
    assert res["metric"].ci_low <= res["metric"].value <= res["metric"].ci_high
    with pytest.raises(ValueError, match="roc_auc"):
        st.bootstrap_ci(y, p, g, ["auroc"])


def test_delong_identical_predictors() -> None:
    y, p, _ = _synthetic(30)
    r = pairs.delong_test(y, p, p)
    assert r.p_value == 1.0 and r.z == 0.0 and r.diff == 0.0
    assert r.auc_a == pytest.approx(skm.roc_auc_score(y, p))


def test_delong_hand_case_matches_direct_structural_components() -> None:
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    a = np.array([0.9, 0.8, 0.8, 0.6, 0.4, 0.7, 0.3, 0.3, 0.2, 0.1, 0.5])
    b = np.array([0.7, 0.9, 0.4, 0.5, 0.3, 0.8, 0.5, 0.2, 0.4, 0.1, 0.6])
    r = pairs.delong_test(y, a, b)
    auc_a, auc_b, var = _delong_direct(y, a, b)
    assert r.auc_a == pytest.approx(auc_a) and r.auc_a == pytest.approx(skm.roc_auc_score(y, a))
    assert r.auc_b == pytest.approx(auc_b) and r.auc_b == pytest.approx(skm.roc_auc_score(y, b))
    assert r.z == pytest.approx((auc_a - auc_b) / math.sqrt(var))
    assert r.p_value == pytest.approx(2 * stats.norm.sf(abs(r.z)))
    half = stats.norm.ppf(0.975) * math.sqrt(var) / (1 - r.diff**2)  # Fisher z transform: inside (-1, 1)
    assert r.ci_of_diff == pytest.approx((math.tanh(math.atanh(r.diff) - half), math.tanh(math.atanh(r.diff) + half)))


def test_delong_random_cases_match_direct() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        y[:2] = [0, 1]
        a = np.round(rng.random(60) * 0.5 + 0.4 * y, 1)
        b = np.round(rng.random(60) * 0.7 + 0.2 * y, 1)
        r = pairs.delong_test(y, a, b)
        auc_a, auc_b, var = _delong_direct(y, a, b)
        assert (r.auc_a, r.auc_b) == pytest.approx((auc_a, auc_b))
        assert r.z == pytest.approx((auc_a - auc_b) / math.sqrt(var))


def test_delong_detects_a_real_difference() -> None:
    y, good, _ = _synthetic(200, images_per_patient=1, shift=1.5, seed=4)
    noise = np.random.default_rng(5).random(y.size)
    r = pairs.delong_test(y, good, noise)
    assert r.diff > 0.2 and r.p_value < 1e-6 and r.ci_of_diff[0] > 0


def test_mcnemar_exact_known_value() -> None:
    # b = 10, c = 2: exact two-sided p = 2 * (1 + 12 + 66) / 2^12 = 158 / 4096 = 0.0386.
    y = np.ones(20, dtype=int)
    pred_a = np.array([1] * 10 + [0] * 2 + [1] * 8)
    pred_b = np.array([0] * 10 + [1] * 2 + [1] * 8)
    r = pairs.mcnemar_test(y, pred_a, pred_b)
    assert (r.b, r.c, r.method) == (10, 2, "exact")
    assert r.p_value == pytest.approx(158 / 4096)
    assert round(r.p_value, 4) == 0.0386
    assert r.p_value == pytest.approx(stats.binomtest(10, 12, 0.5).pvalue)


def test_mcnemar_chi2_with_continuity_correction() -> None:
    # b = 25, c = 10: (|25 - 10| - 1)^2 / 35 = 5.6; chi2(1) upper tail 0.0180.
    y = np.zeros(40, dtype=int)
    pred_a = np.array([0] * 25 + [1] * 10 + [0] * 5)
    pred_b = np.array([1] * 25 + [0] * 10 + [0] * 5)
    r = pairs.mcnemar_test(y, pred_a, pred_b)
    assert (r.b, r.c, r.method) == (25, 10, "chi2_cc")
    assert r.statistic == pytest.approx(5.6)
    assert r.p_value == pytest.approx(stats.chi2.sf(5.6, 1)) and round(r.p_value, 3) == 0.018
    # Textbook: Agresti (2013) Table 11.1, presidential approval, b = 150, c = 86:
    # uncorrected z^2 = 64^2/236 = 17.36; corrected (63^2)/236 = 16.82.
    y = np.zeros(236, dtype=int)
    r = pairs.mcnemar_test(y, np.array([0] * 150 + [1] * 86), np.array([1] * 150 + [0] * 86))
    assert r.statistic == pytest.approx(63**2 / 236) and r.p_value < 1e-4
    assert pairs.mcnemar_test([1, 0], [1, 0], [1, 0]).p_value == 1.0
    with pytest.raises(ValueError, match="exact"):
        pairs.mcnemar_test([1], [1], [1], method="fisher")  # type: ignore[arg-type]


def test_curves_and_confusion() -> None:
    y, p, _ = _synthetic(50)
    roc = st.roc_curve_points(y, p, max_points=20)
    assert len(roc) <= 20 and roc[0]["fpr"] == 0 and roc[-1]["tpr"] == 1
    assert all(0 <= pt["threshold"] <= 1 for pt in roc)
    cal = st.calibration_curve_points(y, p, n_bins=10)
    assert sum(b["count"] for b in cal) == y.size
    assert st.confusion([0, 0, 1, 1, 1], [0, 1, 1, 1, 0]) == [[1, 1], [1, 2]]


def test_convergence() -> None:
    vals = [0.6, 0.7, 0.85, 0.9, 0.88]
    assert st.epochs_to_fraction_of_best(vals, 0.95) == 4  # target 0.855: epoch 3 (0.85) falls short
    assert st.epochs_to_fraction_of_best(vals, 0.9) == 3  # target 0.81
    assert st.seconds_to_epoch([10.0, 10.0, 12.0, 9.0, 9.0], 3) == 32.0
    assert st.epochs_to_fraction_of_best([None, float("nan")]) is None


def test_clustered_delong_equals_delong_with_one_image_per_patient() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    a, b = (rng.random(60) + 0.3 * y) / 1.3, (rng.random(60) + 0.1 * y) / 1.1
    plain = pairs.delong_test(y, a, b)
    clustered = pairs.delong_test(y, a, b, groups=[f"p{i}" for i in range(60)])
    assert clustered.z == pytest.approx(plain.z, rel=1e-9)
    assert clustered.p_value == pytest.approx(plain.p_value, rel=1e-9)


def test_clustered_delong_counts_a_patients_copies_once() -> None:
    """Each image copied 5 times within its patient: Obuchowski's variance equals DeLong's on the originals
    exactly, while the naive image-level test would claim far more certainty."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 40)
    a, b = (rng.random(40) + 0.4 * y) / 1.4, (rng.random(40) + 0.2 * y) / 1.2
    original = pairs.delong_test(y, a, b)
    reps = 5
    y5, a5, b5 = np.repeat(y, reps), np.repeat(a, reps), np.repeat(b, reps)
    patients = np.repeat(np.arange(40), reps)
    clustered = pairs.delong_test(y5, a5, b5, groups=patients)
    naive = pairs.delong_test(y5, a5, b5)
    assert clustered.z == pytest.approx(original.z, rel=1e-9)
    assert clustered.p_value == pytest.approx(original.p_value, rel=1e-9)
    assert naive.p_value < clustered.p_value


def test_clustered_mcnemar_reduces_to_mcnemar_and_discounts_copies() -> None:
    """Durkalski's statistic: (sum_k (b_k - c_k))^2 / sum_k (b_k - c_k)^2; one image per patient gives
    (b - c)^2 / (b + c): b = 10, c = 2 -> 64 / 12 = 5.33."""
    y = np.ones(12, dtype=int)
    a = np.array([1] * 10 + [0] * 2)
    b = np.array([0] * 10 + [1] * 2)
    single = pairs.mcnemar_test(y, a, b, method="clustered", groups=list(range(12)))
    assert single.method == "clustered" and single.statistic == pytest.approx(64 / 12)
    copies = pairs.mcnemar_test(np.repeat(y, 4), np.repeat(a, 4), np.repeat(b, 4), method="clustered",
                             groups=np.repeat(np.arange(12), 4))
    assert copies.statistic == pytest.approx(single.statistic)  # 4 copies of a patient are still one patient
    naive = pairs.mcnemar_test(np.repeat(y, 4), np.repeat(a, 4), np.repeat(b, 4))
    assert naive.p_value < copies.p_value


# ---------------------------------------------------------------- McNemar against scipy


def test_mcnemar_few_discordant_patients_is_exact_binomial() -> None:
    """b = 5, c = 0, one image per patient: the issue's case. The chi-square would give p = 0.025; exact is 0.0625."""
    y = np.ones(8, dtype=int)
    a = np.array([1] * 5 + [1] * 3)
    b = np.array([0] * 5 + [1] * 3)
    r = pairs.mcnemar_test(y, a, b, groups=[f"p{i}" for i in range(8)])
    assert r.method == "exact_permutation" and (r.b, r.c, r.n_discordant_units) == (5, 0, 5)
    assert r.p_value == pytest.approx(stats.binomtest(5, 5, 0.5).pvalue) == pytest.approx(0.0625)
    for b_count, c_count in [(7, 2), (3, 9), (10, 10), (1, 0)]:
        n = b_count + c_count
        yy = np.zeros(n, dtype=int)
        pa = np.array([0] * b_count + [1] * c_count)
        r = pairs.mcnemar_test(yy, pa, 1 - pa, groups=np.arange(n))
        assert r.p_value == pytest.approx(stats.binomtest(b_count, n, 0.5).pvalue)


def test_mcnemar_many_discordant_patients_is_durkalski_chi_square() -> None:
    """40 vs 20 discordant patients, one image each: X2 = (b - c)^2 / (b + c) = 6.67 against chi-square(1)."""
    y = np.zeros(70, dtype=int)
    a = np.array([0] * 40 + [1] * 20 + [0] * 10)
    b = np.array([1] * 40 + [0] * 20 + [0] * 10)
    r = pairs.mcnemar_test(y, a, b, groups=np.arange(70))
    assert r.method == "clustered" and r.n_discordant_units == 60
    assert r.statistic == pytest.approx(400 / 60)
    assert r.p_value == pytest.approx(stats.chi2.sf(400 / 60, df=1))
    assert (
        "Durkalski et al. 2003" in pairs.METHOD_LABELS[r.method]
        and "no continuity correction" in pairs.METHOD_LABELS[r.method]
    )


def test_sign_flip_p_value_matches_enumeration() -> None:
    """Per-patient differences of several sizes: the convolution equals brute force over all 2^k sign patterns."""
    d = np.array([3, -1, 2, 2, 1, -4, 1])
    signs = np.array(np.meshgrid(*[[-1, 1]] * d.size)).reshape(d.size, -1).T
    sums = np.abs(signs @ np.abs(d))
    assert pairs.sign_flip_p_value(d) == pytest.approx(np.mean(sums >= abs(d.sum())))
    assert pairs.sign_flip_p_value([0, 0]) == 1.0


# ---------------------------------------------------------------- DeLong and Obuchowski by brute force


def _obuchowski_direct(y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray) -> float:
    """var(AUC_a - AUC_b) by Obuchowski 1997 written out with O(mn) kernels and explicit loops over patients."""
    patients = sorted(set(groups.tolist()))
    m, n, big_i = int(y.sum()), int((1 - y).sum()), len(patients)
    parts = []
    for p in (a, b):
        pos, neg = p[y == 1], p[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        auc = psi.mean()
        v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
        pos_g, neg_g = groups[y == 1], groups[y == 0]
        big_a = np.array([v10[pos_g == k].sum() - auc * (pos_g == k).sum() for k in patients])
        big_b = np.array([v01[neg_g == k].sum() - auc * (neg_g == k).sum() for k in patients])
        parts.append(
            (big_a, big_b, sum((pos_g == k).any() for k in patients), sum((neg_g == k).any() for k in patients))
        )

    def cov(r: int, t: int) -> float:
        ar, br, i10, i01 = parts[r]
        at, bt = parts[t][0], parts[t][1]
        s10 = i10 / ((i10 - 1) * m) * float(ar @ at)
        s01 = i01 / ((i01 - 1) * n) * float(br @ bt)
        s11 = big_i / (big_i - 1) * (float(ar @ bt) + float(at @ br))
        return s10 / m + s01 / n + s11 / (m * n)

    return cov(0, 0) + cov(1, 1) - 2 * cov(0, 1)


def test_clustered_delong_matches_brute_force_obuchowski() -> None:
    y, a, groups = _synthetic(30, images_per_patient=3, seed=7)
    b = np.clip(a + np.random.default_rng(8).normal(0, 0.15, a.size), 0, 1)
    r = pairs.delong_test(y, a, b, groups=groups)
    var = _obuchowski_direct(y, a, b, groups)
    assert r.method == "clustered DeLong (Obuchowski 1997)"
    assert r.z == pytest.approx(r.diff / math.sqrt(var))
    assert r.auc_a == pytest.approx(skm.roc_auc_score(y, a))


# ---------------------------------------------------------------- degenerate cases: not estimable


@pytest.mark.parametrize(
    "y, groups, why",
    [
        ([1, 1, 0, 0], [1, 1, 1, 1], "one patient"),
        ([1, 1, 1, 1], [1, 2, 3, 4], "one class"),
        ([1, 1, 1, 0, 0, 0], [1, 1, 1, 2, 3, 4], "one positive patient with several slices"),
        ([0] * 10 + [1, 1, 1], [0] * 10 + [1, 2, 3], "one negative patient with 10 slices (gave p = 0.0015)"),
        ([1, 0, 0, 0, 0], [1, 2, 3, 4, 5], "exactly one positive image"),
    ],
)
def test_degenerate_cohorts_are_not_estimable(y: list[int], groups: list[int], why: str) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(len(y)), rng.random(len(y))
    r = pairs.delong_test(y, a, b, groups=groups)
    assert not r.estimable and "not estimable" in r.reason, why
    assert all(math.isnan(v) for v in (r.diff, r.z, r.p_value))
    plain = pairs.delong_test(y, a, b) if sum(y) < 2 or len(y) - sum(y) < 2 else None
    assert plain is None or not plain.estimable
    mc = pairs.mcnemar_test(np.array(y), (a > 0.5).astype(int), (b > 0.5).astype(int), groups=groups)
    assert 0 <= mc.p_value <= 1  # the decision test needs only discordant patients, never a crash


def test_single_patient_and_empty_inputs_do_not_crash() -> None:
    ci = st.bootstrap_ci([1, 1], [0.2, 0.9], ["a", "a"], n_resamples=20)
    assert math.isnan(ci["roc_auc"].value) and ci["roc_auc"].n_skipped == 20
    assert ci["sensitivity"].value == pytest.approx(0.5)
    assert pairs.mcnemar_test([], [], [], groups=[]).method == "not_estimable"


# ---------------------------------------------------------------- bootstrap interval coverage


def test_bootstrap_interval_width_matches_its_nominal_level() -> None:
    """A 95% percentile interval of a mean is 2 * 1.96 * SE wide; a 90% one (2 * 1.645 * SE, 16% narrower) fails
    the same 8% tolerance, so an interval mislabelled 95% is caught."""
    rng = np.random.default_rng(11)
    n = 400
    values = rng.normal(0.5, 0.1, n).clip(0, 1)
    y = np.zeros(n, dtype=int)
    se = values.std(ddof=1) / math.sqrt(n)

    def width(level: float) -> float:
        iv = st.bootstrap_ci(
            y, values, np.arange(n), lambda yy, pp: float(np.mean(pp)), n_resamples=3000, seed=2, level=level
        )
        return iv["metric"].ci_high - iv["metric"].ci_low

    assert width(0.95) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.08)
    assert abs(width(0.90) / (2 * 1.96 * se) - 1.0) > 0.08


# ---------------------------------------------------------------- patients, operating point, Holm


def test_patient_aggregation_mean_and_max() -> None:
    patients = ["b", "a", "b", "a", "c"]
    y = [1, 0, 1, 0, 1]
    p = [0.9, 0.2, 0.5, 0.4, 0.6]
    mean = pooling.aggregate_by_patient(patients, y, p, "mean")
    assert mean.patients == ["a", "b", "c"]
    assert mean.probs.tolist() == pytest.approx([0.3, 0.7, 0.6]) and mean.targets.tolist() == [0, 1, 1]
    assert pooling.aggregate_by_patient(patients, y, p, "max").probs.tolist() == pytest.approx([0.4, 0.9, 0.6])
    shuffled = pooling.aggregate_by_patient(patients[::-1], y[::-1], p[::-1], "mean")
    assert shuffled.probs.tolist() == pytest.approx(mean.probs.tolist())
    assert pooling.aggregate_by_patient(["x", "x"], [0, 1], [0.1, 0.2]).targets.tolist() == [1]  # any positive slice
    with pytest.raises(ValueError, match="mean"):
        pooling.aggregate_by_patient(patients, y, p, "median")  # type: ignore[arg-type]


def test_operating_point_rules() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    youden = pooling.choose_operating_point(y, p, "youden")
    # J = 0.75 at thresholds 0.65 (sens 3/4, spec 4/4) and 0.35 (sens 4/4, spec 3/4): the higher one is taken.
    assert youden.threshold == pytest.approx(0.65) and youden.rule == "youden"
    sens = pooling.choose_operating_point(y, p, "sensitivity", 0.9)
    assert sens.threshold == pytest.approx(0.35)  # the highest threshold with sensitivity >= 0.9
    assert ((p >= sens.threshold) & (y == 1)).sum() / 4 >= 0.9
    spec = pooling.choose_operating_point(y, p, "specificity", 1.0)
    assert spec.threshold == pytest.approx(0.65)  # the lowest threshold with specificity 1
    assert pooling.choose_operating_point(y, p, "fixed", 0.3).threshold == 0.3
    fallback = pooling.choose_operating_point([1, 1, 1], [0.2, 0.5, 0.9], "youden")
    assert fallback.rule == "fallback" and fallback.threshold == 0.5 and "3 positive and 0 negative" in fallback.note


def test_holm_adjustment() -> None:
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert pairs.holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = pairs.holm_adjust([0.2, float("nan"), 0.6])
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.6)
    assert pairs.holm_adjust([0.9, 0.8]) == [1.0, 1.0]
