"""Paired tests of two arms on the same test units: DeLong (clustered by patient), McNemar, and Holm's adjustment.

A test that cannot be estimated (too few patients of a class) returns NaN numbers with a `reason`, never a guess.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from typing import Literal, NamedTuple

import numpy as np
from scipy import optimize, stats

from tasks.evaluation.statistics import (
    NAN,
    ArrayLike,
    _as_binary,
    _as_prob,
    _check_choice,
    roc_auc,
)

MCNEMAR_METHODS = ("auto", "exact", "chi2_cc", "clustered", "exact_permutation")
MCNEMAR_EXACT_BELOW = 25  # fewer discordant units than this: an exact test instead of the chi-square approximation
DELONG_CLUSTERED = "clustered DeLong (Obuchowski 1997)"
DELONG_PLAIN = "DeLong (DeLong et al. 1988), one unit per patient"
METHOD_LABELS: dict[str, str] = {
    "clustered": "clustered McNemar on per-patient proportions (Durkalski et al. 2003), chi-square, no continuity "
    "correction",
    "exact_permutation": "sign-flip permutation test of per-patient proportions over discordant patients (few "
    "discordant patients)",
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
    se: float = NAN

    @property
    def estimable(self) -> bool:
        """True when the numbers are defined."""
        return not self.reason


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


def not_estimable_reason(
    y_true: ArrayLike, groups: Sequence[Hashable] | np.ndarray | None = None, unit: str = "images"
) -> str:
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
    c = (1, -1); z = diff / sqrt(var); p = 2 (1 - Phi(|z|)). The interval is Fisher's z transform of the
    difference, tanh(atanh(diff) -/+ z_(1-alpha/2) sqrt(var) / (1 - diff^2)) (delta method), so it stays inside
    (-1, 1). A variance of (nearly) zero, e.g. both arms separating the classes perfectly, is not estimable (a
    reason, never a zero-width interval). These are large-sample results: the verdict uses
    paired_auc_comparison, valid at small samples.
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
    if var <= 1e-12 or abs(diff) >= 1.0 - 1e-12:
        reason = ("not estimable: zero variance (the two arms order the positive-negative pairs without any spread, "
                  "e.g. both perfectly)")
        z, p_value = (0.0, 1.0) if abs(diff) < 1e-12 else (NAN, NAN)  # identical orderings: no difference to find
        return DeLongTest(auc_a, auc_b, diff, z, p_value, (NAN, NAN), level, method, reason)
    se = math.sqrt(var)
    z = diff / se
    p_value = float(min(1.0, 2.0 * stats.norm.sf(abs(z))))
    centre, half = math.atanh(diff), zq * se / (1.0 - diff * diff)
    ci = (math.tanh(centre - half), math.tanh(centre + half))
    return DeLongTest(auc_a, auc_b, diff, z, p_value, ci, level, method, "", se)


def sign_flip_p_value(differences: ArrayLike) -> float:
    """Exact two-sided p of the sign-flip permutation test of sum(d) = 0 for integer per-patient differences d.

    Under H0 each patient's difference b_k - c_k is symmetric about 0, so each sign is +/- with probability 1/2
    independently (Fisher 1935; Good 2005, ch. 3). The distribution of S = sum s_k |d_k| is built exactly by
    convolution over patients; p = P(|S| >= |S_obs|). With |d_k| = 1 for every patient it is the exact binomial
    McNemar test, min(1, 2 P(X <= min(b, c))) with X ~ Bin(b + c, 1/2).
    """
    d = np.abs(np.rint(np.asarray(differences, dtype=np.float64))).astype(np.int64)
    d = np.sort(d[d > 0])
    if d.size == 0:
        return 1.0
    observed = abs(int(np.rint(np.sum(np.asarray(differences, dtype=np.float64)))))
    total = int(d.sum())
    dist = np.zeros(2 * total + 1)
    dist[total] = 1.0  # index = S + total
    reach = 0  # |S| <= reach so far: only that window is updated
    for step in d.tolist():
        low, high = total - reach, total + reach + 1
        window = dist[low:high].copy()
        dist[low:high] = 0.0
        dist[low - step:high - step] += 0.5 * window
        dist[low + step:high + step] += 0.5 * window
        reach += step
    values = np.arange(-total, total + 1)
    return float(min(1.0, dist[np.abs(values) >= observed].sum()))


SIGN_FLIP_EXACT_CELLS = 20_000_000  # patients x support of the convolution above which random sign patterns are used
SIGN_FLIP_ENUMERATE_MAX = 16  # at most this many non-integer weights: all 2^k sign patterns are enumerated
SIGN_FLIP_RANDOM = 10_000  # random sign patterns (fixed seed) when neither exact route is cheap


@functools.lru_cache(maxsize=2)
def _random_signs(k: int, seed: int) -> np.ndarray:
    """SIGN_FLIP_RANDOM x k random signs from default_rng(seed), read-only (the same for every test of k units)."""
    signs = np.where(np.random.default_rng(seed).random((SIGN_FLIP_RANDOM, k)) < 0.5, -1.0, 1.0)
    signs.flags.writeable = False
    return signs


class SignFlip(NamedTuple):
    """Two-sided p of a sign-flip permutation test and how it was computed ("exact" or "random")."""

    p_value: float
    how: str


def sign_flip_test(weights: ArrayLike, seed: int = 0) -> SignFlip:
    """Two-sided sign-flip permutation test of T = sum_k w_k against T* = sum_k s_k w_k, s_k = +/-1 independently.

    Under H0 each unit's contribution is symmetric about 0 (its two arms exchangeable; Fisher 1935; Good 2005,
    ch. 3), so p = P(|T*| >= |T|). Integer weights: the distribution of T* is built exactly by convolution
    over units. Other weights: all 2^k patterns when k <= SIGN_FLIP_ENUMERATE_MAX. Otherwise, or when the
    convolution would be large, SIGN_FLIP_RANDOM random patterns from numpy's default_rng(seed), with
    p = (1 + #{|T*| >= |T|}) / (1 + draws) (Phipson & Smyth 2010), which never understates p.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w[w != 0]
    if w.size == 0:
        return SignFlip(1.0, "exact")
    observed = abs(float(w.sum()))
    tolerance = 1e-9 * max(1.0, float(np.abs(w).sum()))
    integer = bool(np.all(np.abs(w - np.rint(w)) < 1e-9))
    if integer:
        w = np.rint(w) / np.gcd.reduce(np.abs(np.rint(w)).astype(np.int64))  # a common factor changes no p-value
    if integer and w.size * float(np.abs(w).sum()) <= SIGN_FLIP_EXACT_CELLS:
        return SignFlip(sign_flip_p_value(w), "exact")
    if w.size <= SIGN_FLIP_ENUMERATE_MAX:
        signs = 1 - 2 * ((np.arange(2**w.size)[:, None] >> np.arange(w.size)) & 1)
        return SignFlip(float(np.mean(np.abs(signs @ w) >= observed - tolerance)), "exact")
    hits = int(np.sum(np.abs(_random_signs(w.size, seed) @ w) >= observed - tolerance))
    return SignFlip((1 + hits) / (1 + SIGN_FLIP_RANDOM), "random")


def _mcnemar_clustered(
    right_a: np.ndarray, right_b: np.ndarray, groups: np.ndarray, counts: tuple[int, int], method: str
) -> McNemarTest:
    """Durkalski et al. 2003 on per-patient proportions, or its sign-flip test (few discordant patients, "auto")."""
    b, c = counts
    _, cluster = np.unique(groups, return_inverse=True)
    size = int(cluster.max()) + 1
    slices = np.bincount(cluster, minlength=size).astype(float)
    per_patient = (np.bincount(cluster, weights=(right_a & ~right_b).astype(float), minlength=size) - np.bincount(
        cluster, weights=(~right_a & right_b).astype(float), minlength=size)) / slices
    discordant = int(np.count_nonzero(per_patient))
    exact = method == "exact_permutation" or (method == "auto" and discordant < MCNEMAR_EXACT_BELOW)
    if discordant == 0:
        return McNemarTest(b, c, 0.0, 1.0, "exact_permutation" if exact else "clustered", 0)
    if exact:
        flip = sign_flip_test(per_patient)
        return McNemarTest(b, c, float(per_patient.sum()), flip.p_value, "exact_permutation", discordant)
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
    22:2417-2428) on per-patient proportions d_k = (b_k - c_k) / n_k, n_k the patient's images:
    X2 = (sum_k d_k)^2 / sum_k d_k^2 against chi-square with 1 df, no continuity correction (Obuchowski 1998 uses
    b_k - c_k unscaled, which weights patients by their image count); with one image per patient it is McNemar's
    (b - c)^2 / (b + c). When fewer than MCNEMAR_EXACT_BELOW patients are discordant, "auto" uses the sign-flip
    permutation test of the same d_k instead (sign_flip_test; statistic = sum_k d_k), method "exact_permutation".

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


# ---------------------------------------------------------------- the paired AUC comparison of the verdict

AUC_PERMUTATION = "paired permutation test, each patient's two arms swapped ({how}; Bandos, Rockette & Gur 2005)"
AUC_MOVER = ("{level}% MOVER interval (Zou & Donner 2008) from each arm's score interval (Newcombe 2006, method 5), "
             "correlation from the {covariance} covariance")


class AucComparison(NamedTuple):
    """A paired comparison of two arms' AUCs on the same test units (diff = AUC_a - AUC_b).

    p_value: two-sided, from the permutation test (test_method). ci_of_diff: the MOVER interval (interval_method),
    inside [-1, 1] by construction and never of zero width; se: its half-width over z, for sample-size planning.
    reason: why nothing is estimable ('' when the numbers are defined).
    """

    auc_a: float
    auc_b: float
    diff: float
    p_value: float
    ci_of_diff: tuple[float, float]
    se: float
    level: float
    n_positive: int
    n_negative: int
    test_method: str
    interval_method: str
    correlation: float = NAN
    reason: str = ""

    @property
    def estimable(self) -> bool:
        """True when the difference, its interval and its p-value are defined."""
        return not self.reason


def _pair_sums(x_pos: np.ndarray, pos_unit: np.ndarray, x_neg: np.ndarray, neg_unit: np.ndarray, k: int) -> np.ndarray:
    """k x k matrix: sum over positive rows of unit u and negative rows of unit v of H(x_pos - x_neg), H(0) = 1/2."""
    out = np.zeros((k, k))
    pos_order, neg_order = np.argsort(pos_unit, kind="stable"), np.argsort(neg_unit, kind="stable")
    xp, up = x_pos[pos_order], pos_unit[pos_order]
    xn, un = x_neg[neg_order], neg_unit[neg_order]
    neg_starts = np.flatnonzero(np.r_[True, un[1:] != un[:-1]])
    block = max(1, 4_000_000 // max(1, xn.size))
    for s in range(0, xp.size, block):
        rows = xp[s:s + block, None]
        h = (rows > xn[None, :]).astype(np.float64) + 0.5 * (rows == xn[None, :])
        per_neg_unit = np.add.reduceat(h, neg_starts, axis=1)
        np.add.at(out, (up[s:s + block, None], un[neg_starts][None, :]), per_neg_unit)
    return out


def permutation_contributions(y: np.ndarray, a: np.ndarray, b: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Each unit's signed share c_u of sum(D) = (AUC_a - AUC_b) M N; swapping the unit's two arms negates it.

    With P_xy[u, v] = sum over positive rows of u and negative rows of v of H(x - y) (Mann-Whitney kernel),
    D = P_aa - P_bb and E = P_ba - P_ab: c_u = (sum_v (D - E)[u, v] + sum_v (D + E)[v, u]) / 2, and 4 c_u is an
    integer (H takes 0, 1/2 and 1). unit: 0..k-1 per row.
    """
    k = int(unit.max()) + 1
    pos, neg = y == 1, y == 0
    p_aa = _pair_sums(a[pos], unit[pos], a[neg], unit[neg], k)
    p_bb = _pair_sums(b[pos], unit[pos], b[neg], unit[neg], k)
    p_ab = _pair_sums(a[pos], unit[pos], b[neg], unit[neg], k)
    p_ba = _pair_sums(b[pos], unit[pos], a[neg], unit[neg], k)
    d, e = p_aa - p_bb, p_ba - p_ab
    return ((d - e).sum(axis=1) + (d + e).sum(axis=0)) / 2.0


def newcombe_variance(theta: float | np.ndarray, m: int, n: int) -> float | np.ndarray:
    """Variance of an AUC estimate as a function of the AUC theta (Newcombe 2006, Stat. Med. 25:559, method 5).

    Hanley & McNeil's (1982) variance with Q1 = theta/(2 - theta), Q2 = 2 theta^2/(1 + theta) and both m - 1
    and n - 1 replaced by N* = (m + n)/2 - 1: theta (1 - theta) [1 + N* ((1 - theta)/(2 - theta) + theta/(1 + theta))]
    / (m n), for m positive and n negative units.
    """
    n_star = (m + n) / 2.0 - 1.0
    return theta * (1 - theta) / (m * n) * (1 + n_star * ((1 - theta) / (2 - theta) + theta / (1 + theta)))


def auc_score_interval(auc: float, m: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The AUCs theta with (auc - theta)^2 <= z^2 V(theta) (V: newcombe_variance): a Wilson-type interval in [0, 1].

    Evaluating the variance at theta rather than at the estimate keeps the interval open at an observed AUC of 1
    (as Wilson's interval does for a proportion of 1), so perfect separation in a small sample is never certainty.
    """
    z = float(stats.norm.ppf(0.5 + level / 2.0))

    def gap(theta: float) -> float:
        return (auc - theta) ** 2 - z * z * float(newcombe_variance(theta, m, n))

    # At the estimate itself the gap is -z^2 V <= 0; at an estimate of 0 or 1 step just inside, where V > 0.
    inner = min(max(auc, 1e-12), 1.0 - 1e-12)
    if gap(inner) >= 0:
        return auc, auc
    low = float(optimize.brentq(gap, 0.0, inner)) if gap(0.0) > 0 else 0.0
    high = float(optimize.brentq(gap, inner, 1.0)) if gap(1.0) > 0 else 1.0
    return min(low, auc), max(high, auc)


def _auc_correlation(y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray | None) -> float:
    """Correlation of the two AUC estimates from the DeLong (clustered: Obuchowski) covariance; 0 when undefined
    or negative (a negative estimate would narrow the interval on a guess)."""
    auc_a, v10_a, v01_a = _structural_components(a[y == 1], a[y == 0])
    auc_b, v10_b, v01_b = _structural_components(b[y == 1], b[y == 0])
    if groups is None:
        m, n = int(y.sum()), int(y.size - y.sum())
        cov = np.cov(np.vstack([v10_a, v10_b])) / m + np.cov(np.vstack([v01_a, v01_b])) / n
    else:
        cov = _clustered_covariance(y, [v10_a, v10_b], [v01_a, v01_b], [auc_a, auc_b], groups)
    if not (cov[0, 0] > 1e-15 and cov[1, 1] > 1e-15):
        return 0.0
    return float(min(1.0, max(0.0, cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1]))))


def _mover_half(first: float, second: float, r: float) -> float:
    """sqrt(first^2 + second^2 - 2 r first second): one side of a MOVER interval from the two arms' distances."""
    return math.sqrt(max(0.0, first * first + second * second - 2.0 * r * first * second))


def paired_auc_comparison(
    y_true: ArrayLike,
    prob_a: ArrayLike,
    prob_b: ArrayLike,
    groups: Sequence[Hashable] | None = None,
    level: float = 0.95,
    seed: int = 0,
) -> AucComparison:
    """AUC_a - AUC_b on the same units, with a test and an interval that hold at small samples.

    Units are patients: the groups (patient of each row), or one row per patient when groups is None.
    Test: the exact permutation distribution of the difference when each patient's two arms are swapped
    (H0: the arms are exchangeable within patient; Bandos, Rockette & Gur 2005, Stat. Med. 24:2873), a
    sign-flip over permutation_contributions (sign_flip_test).
    Interval: MOVER (Zou & Donner 2008, Stat. Med. 27:1693): with (l_x, u_x) each arm's auc_score_interval over
    the m positive and n negative patients and r the correlation of the two estimates,
    low = d - sqrt((A - l_a)^2 + (u_b - B)^2 - 2 r (A - l_a)(u_b - B)), high likewise with (u_a, l_b).
    It stays inside [-1, 1] and has nonzero width even when both arms separate the classes perfectly.
    Fewer than 2 positive or 2 negative patients: not estimable (NaN numbers, a reason).
    """
    y = _as_binary(y_true)
    a, b = _as_prob(prob_a, y.size), _as_prob(prob_b, y.size)
    units = np.arange(y.size) if groups is None else np.asarray(groups)
    if units.shape != y.shape:
        raise ValueError(f"groups must give one patient per image: {units.shape} for {y.shape} images")
    covariance = "DeLong" if groups is None else "clustered DeLong (Obuchowski 1997)"
    interval_method = AUC_MOVER.format(level=round(100 * level), covariance=covariance)
    m, n = len(set(units[y == 1].tolist())), len(set(units[y == 0].tolist()))
    reason = not_estimable_reason(y, None if groups is None else units, "patients")
    if reason:
        return AucComparison(NAN, NAN, NAN, NAN, (NAN, NAN), NAN, level, m, n, AUC_PERMUTATION.format(how="exact"),
                             interval_method, NAN, reason)
    _, unit = np.unique(units, return_inverse=True)
    flip = sign_flip_test(4.0 * permutation_contributions(y, a, b, unit), seed=seed)
    test_method = AUC_PERMUTATION.format(how="exact" if flip.how == "exact" else f"{SIGN_FLIP_RANDOM} random swaps")
    auc_a, auc_b = roc_auc(y, a), roc_auc(y, b)
    r = _auc_correlation(y, a, b, None if groups is None else units)
    (low_a, high_a), (low_b, high_b) = auc_score_interval(auc_a, m, n, level), auc_score_interval(auc_b, m, n, level)
    diff = auc_a - auc_b
    below = _mover_half(auc_a - low_a, high_b - auc_b, r)
    above = _mover_half(high_a - auc_a, auc_b - low_b, r)
    ci = (max(-1.0, diff - below), min(1.0, diff + above))
    se = (ci[1] - ci[0]) / (2.0 * float(stats.norm.ppf(0.5 + level / 2.0)))
    return AucComparison(auc_a, auc_b, diff, flip.p_value, ci, se, level, m, n, test_method, interval_method, r)
