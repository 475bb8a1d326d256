"""Tests of tasks.statistics against sklearn/scipy, hand computations and textbook values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from tasks import statistics as st


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
    assert st.expected_calibration_error(y, p) == pytest.approx(0.4)
    perfect = st.expected_calibration_error(np.array([1, 1, 0, 0]), np.array([1.0, 1.0, 0.0, 0.0]))
    assert perfect == pytest.approx(0.0)
    with pytest.raises(ValueError, match="top_label"):
        st.expected_calibration_error(y, p, mode="bogus")  # type: ignore[arg-type]


def test_single_class_metrics_are_nan() -> None:
    m = st.binary_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert math.isnan(m["roc_auc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)


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
    r = st.delong_test(y, p, p)
    assert r.p_value == 1.0 and r.z == 0.0 and r.diff == 0.0
    assert r.auc_a == pytest.approx(skm.roc_auc_score(y, p))


def test_delong_hand_case_matches_direct_structural_components() -> None:
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    a = np.array([0.9, 0.8, 0.8, 0.6, 0.4, 0.7, 0.3, 0.3, 0.2, 0.1, 0.5])
    b = np.array([0.7, 0.9, 0.4, 0.5, 0.3, 0.8, 0.5, 0.2, 0.4, 0.1, 0.6])
    r = st.delong_test(y, a, b)
    auc_a, auc_b, var = _delong_direct(y, a, b)
    assert r.auc_a == pytest.approx(auc_a) and r.auc_a == pytest.approx(skm.roc_auc_score(y, a))
    assert r.auc_b == pytest.approx(auc_b) and r.auc_b == pytest.approx(skm.roc_auc_score(y, b))
    assert r.z == pytest.approx((auc_a - auc_b) / math.sqrt(var))
    assert r.p_value == pytest.approx(2 * stats.norm.sf(abs(r.z)))
    half = stats.norm.ppf(0.975) * math.sqrt(var)
    assert r.ci_of_diff == pytest.approx((r.diff - half, r.diff + half))


def test_delong_random_cases_match_direct() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        y[:2] = [0, 1]
        a = np.round(rng.random(60) * 0.5 + 0.4 * y, 1)
        b = np.round(rng.random(60) * 0.7 + 0.2 * y, 1)
        r = st.delong_test(y, a, b)
        auc_a, auc_b, var = _delong_direct(y, a, b)
        assert (r.auc_a, r.auc_b) == pytest.approx((auc_a, auc_b))
        assert r.z == pytest.approx((auc_a - auc_b) / math.sqrt(var))


def test_delong_detects_a_real_difference() -> None:
    y, good, _ = _synthetic(200, images_per_patient=1, shift=1.5, seed=4)
    noise = np.random.default_rng(5).random(y.size)
    r = st.delong_test(y, good, noise)
    assert r.diff > 0.2 and r.p_value < 1e-6 and r.ci_of_diff[0] > 0


def test_mcnemar_exact_known_value() -> None:
    # b = 10, c = 2: exact two-sided p = 2 * (1 + 12 + 66) / 2^12 = 158 / 4096 = 0.0386.
    y = np.ones(20, dtype=int)
    pred_a = np.array([1] * 10 + [0] * 2 + [1] * 8)
    pred_b = np.array([0] * 10 + [1] * 2 + [1] * 8)
    r = st.mcnemar_test(y, pred_a, pred_b)
    assert (r.b, r.c, r.method) == (10, 2, "exact")
    assert r.p_value == pytest.approx(158 / 4096)
    assert round(r.p_value, 4) == 0.0386
    assert r.p_value == pytest.approx(stats.binomtest(10, 12, 0.5).pvalue)


def test_mcnemar_chi2_with_continuity_correction() -> None:
    # b = 25, c = 10: (|25 - 10| - 1)^2 / 35 = 5.6; chi2(1) upper tail 0.0180.
    y = np.zeros(40, dtype=int)
    pred_a = np.array([0] * 25 + [1] * 10 + [0] * 5)
    pred_b = np.array([1] * 25 + [0] * 10 + [0] * 5)
    r = st.mcnemar_test(y, pred_a, pred_b)
    assert (r.b, r.c, r.method) == (25, 10, "chi2_cc")
    assert r.statistic == pytest.approx(5.6)
    assert r.p_value == pytest.approx(stats.chi2.sf(5.6, 1)) and round(r.p_value, 3) == 0.018
    # Textbook: Agresti (2013) Table 11.1, presidential approval, b = 150, c = 86:
    # uncorrected z^2 = 64^2/236 = 17.36; corrected (63^2)/236 = 16.82.
    y = np.zeros(236, dtype=int)
    r = st.mcnemar_test(y, np.array([0] * 150 + [1] * 86), np.array([1] * 150 + [0] * 86))
    assert r.statistic == pytest.approx(63**2 / 236) and r.p_value < 1e-4
    assert st.mcnemar_test([1, 0], [1, 0], [1, 0]).p_value == 1.0
    with pytest.raises(ValueError, match="exact"):
        st.mcnemar_test([1], [1], [1], method="fisher")  # type: ignore[arg-type]


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


def test_plain_words() -> None:
    sig = st.DeLongTest(0.91, 0.84, 0.07, 2.9, 0.004, (0.02, 0.12), 0.95)
    text = st.plain_words_comparison("imagenet", "scratch", sig)
    assert text == (
        "imagenet's AUC is 0.07 higher than scratch's (95% CI 0.02 to 0.12, DeLong p = 0.004): "
        "a significant difference."
    )
    ns = st.DeLongTest(0.85, 0.86, -0.01, -0.8, 0.41, (-0.05, 0.03), 0.95)
    text = st.plain_words_comparison("imagenet", "scratch", ns, st.McNemarTest(3, 5, 3.0, 0.73, "exact"))
    assert "0.01 lower" in text and "no significant difference (" not in text
    assert "DeLong p = 0.41): no significant difference." in text and "McNemar p = 0.73" in text


def test_recommend_follows_the_numbers() -> None:
    arms = [
        st.ArmSummary("scratch", "completed", 0.84, (0.80, 0.88), 600.0),
        st.ArmSummary("imagenet", "completed", 0.91, (0.88, 0.94), 1800.0),
    ]
    sig = {("imagenet", "scratch"): st.DeLongTest(0.91, 0.84, 0.07, 2.9, 0.004, (0.02, 0.12), 0.95)}
    rec = st.recommend(arms, sig)
    assert rec.basis == "significant" and rec.preferred_arm == "imagenet"
    assert rec.headline.startswith("Use imagenet")
    tied = {("scratch", "imagenet"): st.DeLongTest(0.84, 0.91, -0.07, -1.1, 0.27, (-0.2, 0.05), 0.95)}
    rec = st.recommend(arms, tied)
    assert rec.basis == "tied_cost" and rec.preferred_arm == "scratch"
    assert "No significant difference" in rec.headline and "10.0 min" in rec.headline
    rec = st.recommend([arms[0], st.ArmSummary("imagenet", "skipped", reason="no weights file")], {})
    assert rec.basis == "single_arm" and rec.headline.startswith("Only scratch completed")
    assert st.recommend([], {}).basis == "none"


def test_clustered_delong_equals_delong_with_one_image_per_patient() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    a, b = (rng.random(60) + 0.3 * y) / 1.3, (rng.random(60) + 0.1 * y) / 1.1
    plain = st.delong_test(y, a, b)
    clustered = st.delong_test(y, a, b, groups=[f"p{i}" for i in range(60)])
    assert clustered.z == pytest.approx(plain.z, rel=1e-9)
    assert clustered.p_value == pytest.approx(plain.p_value, rel=1e-9)


def test_clustered_delong_counts_a_patients_copies_once() -> None:
    """Each image copied 5 times within its patient: Obuchowski's variance equals DeLong's on the originals
    exactly, while the naive image-level test would claim far more certainty."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 40)
    a, b = (rng.random(40) + 0.4 * y) / 1.4, (rng.random(40) + 0.2 * y) / 1.2
    original = st.delong_test(y, a, b)
    reps = 5
    y5, a5, b5 = np.repeat(y, reps), np.repeat(a, reps), np.repeat(b, reps)
    patients = np.repeat(np.arange(40), reps)
    clustered = st.delong_test(y5, a5, b5, groups=patients)
    naive = st.delong_test(y5, a5, b5)
    assert clustered.z == pytest.approx(original.z, rel=1e-9)
    assert clustered.p_value == pytest.approx(original.p_value, rel=1e-9)
    assert naive.p_value < clustered.p_value


def test_clustered_mcnemar_reduces_to_mcnemar_and_discounts_copies() -> None:
    """Durkalski's statistic: (sum_k (b_k - c_k))^2 / sum_k (b_k - c_k)^2; one image per patient gives
    (b - c)^2 / (b + c): b = 10, c = 2 -> 64 / 12 = 5.33."""
    y = np.ones(12, dtype=int)
    a = np.array([1] * 10 + [0] * 2)
    b = np.array([0] * 10 + [1] * 2)
    single = st.mcnemar_test(y, a, b, groups=list(range(12)))
    assert single.method == "clustered" and single.statistic == pytest.approx(64 / 12)
    copies = st.mcnemar_test(np.repeat(y, 4), np.repeat(a, 4), np.repeat(b, 4), groups=np.repeat(np.arange(12), 4))
    assert copies.statistic == pytest.approx(single.statistic)  # 4 copies of a patient are still one patient
    naive = st.mcnemar_test(np.repeat(y, 4), np.repeat(a, 4), np.repeat(b, 4))
    assert naive.p_value < copies.p_value
