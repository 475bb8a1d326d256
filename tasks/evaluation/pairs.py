"""Paired tests of two arms on the same test units: DeLong (clustered by patient), McNemar, and Holm's adjustment.

A test that cannot be estimated (too few patients of a class) returns NaN numbers with a `reason`, never a guess.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Literal, NamedTuple

import numpy as np
from scipy import stats

from tasks.evaluation.statistics import (
    NAN,
    ArrayLike,
    _as_binary,
    _as_prob,
    _check_choice,
)

MCNEMAR_METHODS = ("auto", "exact", "chi2_cc", "clustered", "exact_permutation")
MCNEMAR_EXACT_BELOW = 25  # fewer discordant units than this: an exact test instead of the chi-square approximation
DELONG_CLUSTERED = "clustered DeLong (Obuchowski 1997)"
DELONG_PLAIN = "DeLong (DeLong et al. 1988), one unit per patient"
METHOD_LABELS: dict[str, str] = {
    "clustered": "clustered McNemar (Durkalski 2003), chi-square, no continuity correction",
    "exact_permutation": "exact sign-flip permutation test over discordant patients (few discordant patients)",
    "exact": "exact binomial McNemar test",
    "chi2_cc": "McNemar chi-square with continuity correction",
    "not_estimable": "not estimable",
}


class DeLongTest(NamedTuple):
    """Result of delong_test; NaN numbers and a reason when the test is not estimable."""

    auc_a: float
    auc_b: float
    diff: float
    z: float
    p_value: float
    ci_of_diff: tuple[float, float]
    level: float
    method: str = DELONG_CLUSTERED
    reason: str = ""

    @property
    def estimable(self) -> bool:
        """True when the numbers are defined."""
        return not self.reason

    @property
    def se(self) -> float:
        """Standard error of the difference, recovered from the interval half-width."""
        z = float(stats.norm.ppf(0.5 + self.level / 2.0))
        return (self.ci_of_diff[1] - self.ci_of_diff[0]) / (2.0 * z)


class McNemarTest(NamedTuple):
    """Result of mcnemar_test: b, c discordant images (or patients), and the method actually used."""

    b: int
    c: int
    statistic: float
    p_value: float
    method: str
    n_discordant_units: int = 0
    reason: str = ""


def _structural_components(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC, V10 (per positive) and V01 (per negative) by midranks (Sun & Xu 2014, section 3)."""
    m, n = pos.size, neg.size
    tx = stats.rankdata(pos)
    ty = stats.rankdata(neg)
    tz = stats.rankdata(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() / m - (m + 1) / 2.0) / n
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    return float(auc), v10, v01


def _clustered_covariance(
    y: np.ndarray, v10: list[np.ndarray], v01: list[np.ndarray], aucs: list[float], groups: np.ndarray
) -> np.ndarray:
    """Covariance of correlated AUCs with clustered images (Obuchowski 1997, Biometrics 53:567-578, eq. 3-5).

    Per cluster i (a patient): A_i = sum of V10 over its positive images, B_i = sum of V01 over its negatives,
    m_i / n_i its positive / negative counts; M, N the totals; I10 / I01 the clusters with positives / negatives.
    S10 = I10 / ((I10 - 1) M) sum (A_i - m_i AUC)(A_i' - m_i AUC'),  S01 likewise with B, n, N, I01,
    S11 = I / (I - 1) sum (A_i - m_i AUC)(B_i' - n_i AUC');  cov = S10 / M + S01 / N + (S11 + S11') / (M N).
    With one image per cluster it reduces to DeLong's covariance exactly. The caller guarantees I10, I01 >= 2
    (delong_test reports "not estimable" otherwise; a variance component is never silently set to 0).
    """
    _, cluster = np.unique(groups, return_inverse=True)
    n_clusters = int(cluster.max()) + 1
    pos_cluster, neg_cluster = cluster[y == 1], cluster[y == 0]
    m_i = np.bincount(pos_cluster, minlength=n_clusters).astype(float)
    n_i = np.bincount(neg_cluster, minlength=n_clusters).astype(float)
    big_m, big_n = float(m_i.sum()), float(n_i.sum())
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    a_dev = [np.bincount(pos_cluster, weights=v, minlength=n_clusters) - m_i * auc for v, auc in zip(v10, aucs)]
    b_dev = [np.bincount(neg_cluster, weights=v, minlength=n_clusters) - n_i * auc for v, auc in zip(v01, aucs)]
    k = len(aucs)
    cov = np.zeros((k, k))
    for r in range(k):
        for t in range(k):
            s10 = i10 / ((i10 - 1) * big_m) * float(a_dev[r] @ a_dev[t])
            s01 = i01 / ((i01 - 1) * big_n) * float(b_dev[r] @ b_dev[t])
            s11_rt = n_clusters / (n_clusters - 1) * float(a_dev[r] @ b_dev[t])
            s11_tr = n_clusters / (n_clusters - 1) * float(a_dev[t] @ b_dev[r])
            cov[r, t] = s10 / big_m + s01 / big_n + (s11_rt + s11_tr) / (big_m * big_n)
    return cov


def not_estimable_reason(y_true: ArrayLike, groups: Sequence[Hashable] | np.ndarray | None = None, unit: str = "images") -> str:
    """Why an AUC variance cannot be estimated ('' when it can): fewer than 2 positive or 2 negative units.

    A unit is a patient when groups are given (a patient with a positive image counts as a positive unit, one
    with a negative image as a negative unit), else one row, named `unit` (e.g. "patients" for rows that are
    already one per patient). One patient, or one class, fails the check.
    """
    y = _as_binary(y_true)
    if groups is None:
        n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    else:
        g = np.asarray(groups)
        n_pos, n_neg, unit = len(set(g[y == 1].tolist())), len(set(g[y == 0].tolist())), "patients"
    if n_pos < 2 or n_neg < 2:
        return f"not estimable: {n_pos} positive and {n_neg} negative {unit} (at least 2 of each are needed)"
    return ""


def _not_estimable_delong(reason: str, level: float, method: str) -> DeLongTest:
    """A DeLongTest whose numbers are NaN, carrying why."""
    return DeLongTest(NAN, NAN, NAN, NAN, NAN, (NAN, NAN), level, method, reason)


def delong_test(
    y_true: ArrayLike,
    prob_a: ArrayLike,
    prob_b: ArrayLike,
    level: float = 0.95,
    groups: Sequence[Hashable] | None = None,
    unit: str = "images",
) -> DeLongTest:
    """Two-sided test of AUC_a = AUC_b on the same images (DeLong, DeLong & Clarke-Pearson 1988).

    Structural components V10, V01 and their covariances S10, S01 computed in O(n log n) with midranks
    (Sun & Xu 2014, IEEE Signal Process. Lett. 21(11)); var(AUC_a - AUC_b) = c' (S10/m + S01/n) c with
    c = (1, -1); z = diff / sqrt(var); p = 2 (1 - Phi(|z|)); CI = diff -/+ z_(1-alpha/2) sqrt(var).
    Identical predictors give z = 0, p = 1. A zero variance with a nonzero difference gives p = 0.
    groups (the patient of each image): images of one patient are correlated, so the covariance is
    Obuchowski's clustered extension (see _clustered_covariance); without groups, images count as independent.
    Fewer than 2 positive or 2 negative units (patients with groups, else rows called `unit`): not estimable
    (NaN numbers, a reason).
    """
    y = _as_binary(y_true)
    a = _as_prob(prob_a, y.size)
    b = _as_prob(prob_b, y.size)
    method = DELONG_PLAIN if groups is None else DELONG_CLUSTERED
    group_array = None if groups is None else np.asarray(groups)
    if group_array is not None and group_array.shape != y.shape:
        raise ValueError(f"groups must give one patient per image: {group_array.shape} for {y.shape} images")
    reason = not_estimable_reason(y, group_array, unit)
    if reason:
        return _not_estimable_delong(reason, level, method)
    m, n = int(y.sum()), int(y.size - y.sum())
    auc_a, v10_a, v01_a = _structural_components(a[y == 1], a[y == 0])
    auc_b, v10_b, v01_b = _structural_components(b[y == 1], b[y == 0])
    if group_array is None:
        cov = np.cov(np.vstack([v10_a, v10_b])) / m + np.cov(np.vstack([v01_a, v01_b])) / n
    else:
        cov = _clustered_covariance(y, [v10_a, v10_b], [v01_a, v01_b], [auc_a, auc_b], group_array)
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = auc_a - auc_b
    zq = float(stats.norm.ppf(0.5 + level / 2.0))
    if var <= 1e-15:
        z, p_value = (0.0, 1.0) if abs(diff) < 1e-12 else (math.copysign(math.inf, diff), 0.0)
        half = 0.0
    else:
        se = math.sqrt(var)
        z = diff / se
        p_value = float(min(1.0, 2.0 * stats.norm.sf(abs(z))))
        half = zq * se
    return DeLongTest(auc_a, auc_b, diff, z, p_value, (diff - half, diff + half), level, method)


def sign_flip_p_value(differences: ArrayLike) -> float:
    """Exact two-sided p of the sign-flip permutation test of sum(d) = 0 for integer per-patient differences d.

    Under H0 each patient's difference b_k - c_k is symmetric about 0, so each sign is +/- with probability 1/2
    independently (Fisher 1935; Good 2005, ch. 3). The distribution of S = sum s_k |d_k| is built exactly by
    convolution over patients; p = P(|S| >= |S_obs|). With |d_k| = 1 for every patient it is the exact binomial
    McNemar test, min(1, 2 P(X <= min(b, c))) with X ~ Bin(b + c, 1/2).
    """
    d = np.abs(np.rint(np.asarray(differences, dtype=np.float64))).astype(np.int64)
    d = d[d > 0]
    if d.size == 0:
        return 1.0
    observed = abs(int(np.rint(np.sum(np.asarray(differences, dtype=np.float64)))))
    total = int(d.sum())
    dist = np.zeros(2 * total + 1)
    dist[total] = 1.0  # index = S + total
    for step in d:
        dist = 0.5 * (np.roll(dist, step) + np.roll(dist, -step))
    values = np.arange(-total, total + 1)
    return float(min(1.0, dist[np.abs(values) >= observed].sum()))


def _mcnemar_clustered(
    right_a: np.ndarray, right_b: np.ndarray, groups: np.ndarray, counts: tuple[int, int], method: str
) -> McNemarTest:
    """Durkalski 2003, or the exact sign-flip test ("auto": when fewer than MCNEMAR_EXACT_BELOW patients disagree)."""
    b, c = counts
    _, cluster = np.unique(groups, return_inverse=True)
    size = int(cluster.max()) + 1
    per_patient = np.bincount(cluster, weights=(right_a & ~right_b).astype(float), minlength=size) - np.bincount(
        cluster, weights=(~right_a & right_b).astype(float), minlength=size)
    discordant = int(np.count_nonzero(per_patient))
    exact = method == "exact_permutation" or (method == "auto" and discordant < MCNEMAR_EXACT_BELOW)
    if discordant == 0:
        return McNemarTest(b, c, 0.0, 1.0, "exact_permutation" if exact else "clustered", 0)
    if exact:
        return McNemarTest(b, c, float(per_patient.sum()), sign_flip_p_value(per_patient), "exact_permutation", discordant)
    statistic = float(per_patient.sum()) ** 2 / float(np.sum(per_patient**2))
    return McNemarTest(b, c, statistic, float(stats.chi2.sf(statistic, df=1)), "clustered", discordant)


def mcnemar_test(
    y_true: ArrayLike,
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    method: Literal["auto", "exact", "chi2_cc", "clustered", "exact_permutation"] = "auto",
    groups: Sequence[Hashable] | None = None,
) -> McNemarTest:
    """McNemar's test of paired decisions (McNemar 1947; Edwards 1948 continuity correction).

    With groups (the patient of each image), "auto" is the clustered test of Durkalski et al. 2003 (Stat. Med.
    22:2417-2428): X2 = (sum_k (b_k - c_k))^2 / sum_k (b_k - c_k)^2 over patients k against chi-square with 1 df,
    no continuity correction; with one image per patient it is McNemar's (b - c)^2 / (b + c). When fewer than
    MCNEMAR_EXACT_BELOW patients are discordant, "auto" uses the exact sign-flip permutation test of the same
    per-patient differences instead (sign_flip_p_value; statistic = sum_k (b_k - c_k)), method "exact_permutation".

    b = images A got right and B wrong, c = A wrong and B right. Without groups: "exact" is the two-sided binomial
    test of b out of b + c at 1/2, p = min(1, 2 P(X <= min(b, c))), statistic = min(b, c); "chi2_cc" is
    (|b - c| - 1)^2 / (b + c) against chi-square with 1 df; "auto" is exact when b + c < MCNEMAR_EXACT_BELOW
    (Agresti 2013, 10.1.4), else chi2_cc. No discordant pair gives p = 1.
    """
    _check_choice("method", method, MCNEMAR_METHODS)
    y, ya, yb = np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)
    if not (y.shape == ya.shape == yb.shape):
        raise ValueError(f"y_true, pred_a and pred_b must have the same shape, got {y.shape}, {ya.shape}, {yb.shape}")
    right_a, right_b = ya == y, yb == y
    b, c = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    if method in ("clustered", "exact_permutation") or (method == "auto" and groups is not None):
        if groups is None:
            raise ValueError(f"method {method!r} needs groups (the patient of each image)")
        group_array = np.asarray(groups)
        if group_array.shape != y.shape:
            raise ValueError(f"groups must give one patient per image: {group_array.shape} for {y.shape} images")
        if y.size == 0:
            return McNemarTest(0, 0, NAN, NAN, "not_estimable", 0, "not estimable: no images")
        return _mcnemar_clustered(right_a, right_b, group_array, (b, c), method)
    n = b + c
    chosen = ("exact" if n < MCNEMAR_EXACT_BELOW else "chi2_cc") if method == "auto" else method
    if n == 0:
        return McNemarTest(b, c, 0.0, 1.0, chosen, 0)
    if chosen == "exact":
        k = min(b, c)
        return McNemarTest(b, c, float(k), float(min(1.0, 2.0 * stats.binom.cdf(k, n, 0.5))), "exact", n)
    statistic = (abs(b - c) - 1.0) ** 2 / n
    return McNemarTest(b, c, float(statistic), float(stats.chi2.sf(statistic, df=1)), "chi2_cc", n)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values: p_(i) -> max_{j <= i} min(1, (m - j + 1) p_(j)).

    NaN entries (tests not estimable) are left NaN and do not count in m.
    """
    values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(values.shape, NAN)
    finite = np.flatnonzero(np.isfinite(values))
    m = finite.size
    running = 0.0
    for rank, i in enumerate(finite[np.argsort(values[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * float(values[i])))
        adjusted[i] = running
    return adjusted.tolist()
