"""Test-set statistics for comparing arms: metrics, patient-level bootstrap CIs, DeLong and McNemar tests,
patient aggregation, the operating point, Holm's adjustment and the recommendation rule.

All functions take plain arrays: y_true holds 0/1 labels (1 = positive class), prob the predicted
probability of the positive class, groups the patient of each image (any hashable; never written out).
Functions here return numbers; the sentences that carry them are written in reports/ (one home for formatting).
A test that cannot be estimated (too few patients of a class) returns NaN numbers with a `reason`, never a guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
from scipy import stats

from data_schemas.report import METRIC_NAMES

ArrayLike = Sequence[float] | np.ndarray

ECE_MODES = ("top_label", "positive_class")
MCNEMAR_METHODS = ("auto", "exact", "chi2_cc", "clustered", "exact_permutation")
MCNEMAR_EXACT_BELOW = 25  # fewer discordant units than this: an exact test instead of the chi-square approximation
AGGREGATIONS = ("mean", "max")
NAN = float("nan")

DELONG_CLUSTERED = "clustered DeLong (Obuchowski 1997)"
DELONG_PLAIN = "DeLong (DeLong et al. 1988), one unit per patient"
METHOD_LABELS: dict[str, str] = {
    "clustered": "clustered McNemar (Durkalski 2003), chi-square, no continuity correction",
    "exact_permutation": "exact sign-flip permutation test over discordant patients (few discordant patients)",
    "exact": "exact binomial McNemar test",
    "chi2_cc": "McNemar chi-square with continuity correction",
    "not_estimable": "not estimable",
}


class Interval(NamedTuple):
    """A point estimate with its bootstrap percentile interval."""

    value: float
    ci_low: float
    ci_high: float
    n_valid: int
    n_skipped: int


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


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise ValueError naming the valid choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _as_binary(y_true: ArrayLike) -> np.ndarray:
    """Labels as an int array of 0/1, or ValueError."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must hold only 0 and 1, got values {np.unique(y)[:10].tolist()}")
    return y.astype(np.int64)


def _as_prob(prob: ArrayLike, n: int) -> np.ndarray:
    """Probabilities as a float array of length n in [0, 1], or ValueError."""
    p = np.asarray(prob, dtype=np.float64)
    if p.shape != (n,):
        raise ValueError(f"prob must have shape ({n},), got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("prob must be finite and within [0, 1]")
    return p


def _as_thresholds(threshold: float | ArrayLike, n: int) -> np.ndarray:
    """One threshold for all, or one per image (each fold's own), as a float array of length n."""
    t = np.asarray(threshold, dtype=np.float64)
    if t.ndim == 0:
        return np.full(n, float(t))
    if t.shape != (n,):
        raise ValueError(f"threshold must be a number or have shape ({n},), got {t.shape}")
    return t


def roc_auc(y_true: ArrayLike, prob: ArrayLike) -> float:
    """ROC AUC as the Mann-Whitney U statistic with midranks for ties (Hanley & McNeil 1982); NaN for one class."""
    y = _as_binary(y_true)
    p = np.asarray(prob, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN
    ranks = stats.rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(
    y_true: ArrayLike, prob: ArrayLike, n_bins: int = 10, mode: Literal["top_label", "positive_class"] = "positive_class"
) -> float:
    """ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)| over equal-width bins (Guo et al. 2017, eq. 3).

    mode "positive_class" (the default, and what the reliability diagram plots): confidence is p and accuracy
    is the fraction of positives in the bin. "top_label" (Guo et al.): confidence is max(p, 1 - p) and
    accuracy is whether the prediction at 0.5 is right. Bins are ((m-1)/M, m/M], the first also holding 0.
    """
    _check_choice("mode", mode, ECE_MODES)
    y = _as_binary(y_true)
    p = _as_prob(prob, y.size)
    if y.size == 0:
        return NAN
    if mode == "top_label":
        pred = (p >= 0.5).astype(np.int64)
        conf = np.maximum(p, 1.0 - p)
        hit = (pred == y).astype(np.float64)
    else:
        conf = p
        hit = y.astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_hit = np.bincount(idx, weights=hit, minlength=n_bins)
    return float(np.abs(sum_hit - sum_conf).sum() / y.size)


def binary_metrics(y_true: ArrayLike, prob: ArrayLike, threshold: float | ArrayLike = 0.5) -> dict[str, float]:
    """Test metrics of one arm: keys METRIC_NAMES; NaN where undefined (e.g. AUC with one class).

    roc_auc: Mann-Whitney with midranks (Hanley & McNeil 1982), equal to sklearn.metrics.roc_auc_score.
    accuracy: (TP + TN) / n. sensitivity: TP / (TP + FN). specificity: TN / (TN + FP).
    balanced_accuracy: (sensitivity + specificity) / 2 (Brodersen et al. 2010).
    f1: 2 TP / (2 TP + FP + FN). brier: mean (p - y)^2 (Brier 1950).
    ece: expected calibration error, 10 equal-width bins, positive-class (as the reliability diagram).
    A probability >= threshold counts as a positive prediction; threshold is one number or one per image.
    """
    y = _as_binary(y_true)
    p = _as_prob(prob, y.size)
    pred = (p >= _as_thresholds(threshold, y.size)).astype(np.int64)
    tp = float(np.sum((pred == 1) & (y == 1)))
    tn = float(np.sum((pred == 0) & (y == 0)))
    fp = float(np.sum((pred == 1) & (y == 0)))
    fn = float(np.sum((pred == 0) & (y == 1)))
    n = float(y.size)
    sens = tp / (tp + fn) if tp + fn else NAN
    spec = tn / (tn + fp) if tn + fp else NAN
    return {
        "roc_auc": roc_auc(y, p),
        "accuracy": (tp + tn) / n if n else NAN,
        "balanced_accuracy": (sens + spec) / 2.0,
        "sensitivity": sens,
        "specificity": spec,
        "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else NAN,
        "brier": float(np.mean((p - y) ** 2)) if n else NAN,
        "ece": expected_calibration_error(y, p, n_bins=10) if n else NAN,
    }


MetricFn = Callable[[np.ndarray, np.ndarray], float | Mapping[str, float]]


def _group_members(groups: np.ndarray, y: np.ndarray, p: np.ndarray) -> list[np.ndarray]:
    """Indices of the images of each group, groups ordered by their content (mean probability, positives, size).

    Ordering by content rather than by the group key keeps the resamples, and so the intervals, the same whatever
    the pseudonymization key that named the patients; the key only breaks exact ties.
    """
    keys, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    members = [np.sort(order[s : s + c]) for s, c in zip(starts, counts)]
    signature = [(float(p[m].mean()), int(y[m].sum()), m.size, str(keys[i])) for i, m in enumerate(members)]
    return [members[i] for i in sorted(range(len(members)), key=signature.__getitem__)]


def bootstrap_ci(
    y_true: ArrayLike,
    prob: ArrayLike,
    groups: Sequence[Hashable] | np.ndarray,
    metrics: Sequence[str] | MetricFn | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    threshold: float | ArrayLike = 0.5,
) -> dict[str, Interval]:
    """Cluster (patient-level) bootstrap percentile intervals (Efron & Tibshirani 1993, ch. 13; Field & Welsh 2007).

    Each resample draws patients with replacement and takes all images of each drawn patient, so images
    of one patient never count as independent. A resample where a metric is undefined (NaN, e.g. AUC
    when all drawn images share one class) is skipped for that metric and counted in n_skipped. The
    interval is the (1 - level)/2 and (1 + level)/2 percentiles of the resampled values; for a mean its
    width approaches 2 z_(1-alpha/2) SE (checked in the tests against a known distribution).

    Args:
        y_true: 0/1 label per image.
        prob: positive-class probability per image.
        groups: patient of each image.
        metrics: names out of METRIC_NAMES (default all), or a callable (y, p) -> float or dict of floats.
        n_resamples: bootstrap resamples.
        seed: seed of numpy's default_rng.
        level: interval coverage, e.g. 0.95.
        threshold: decision threshold for the thresholded metrics: one number, or one per image.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    y = _as_binary(y_true)
    p = _as_prob(prob, y.size)
    thr = _as_thresholds(threshold, y.size)
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"groups must have shape {y.shape}, got {g.shape}")
    evaluate = _metric_evaluator(metrics)
    point = evaluate(y, p, thr)
    if y.size == 0:
        return {k: Interval(NAN, NAN, NAN, 0, n_resamples) for k in point}
    members = _group_members(g, y, p)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_resamples):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), size=len(members))])
        for key, value in evaluate(y[idx], p[idx], thr[idx]).items():
            if key in samples and math.isfinite(value):
                samples[key].append(value)
    alpha = (1.0 - level) / 2.0
    result: dict[str, Interval] = {}
    for key, value in point.items():
        vals = np.asarray(samples[key])
        low, high = np.percentile(vals, [100 * alpha, 100 * (1 - alpha)]) if vals.size else (NAN, NAN)
        result[key] = Interval(float(value), float(low), float(high), int(vals.size), n_resamples - int(vals.size))
    return result


def _metric_evaluator(metrics: Sequence[str] | MetricFn | None) -> Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]:
    """(y, p, thresholds) -> {name: value} for named metrics or a callable (y, p)."""
    if callable(metrics):
        fn = metrics

        def evaluate_callable(yy: np.ndarray, pp: np.ndarray, _: np.ndarray) -> dict[str, float]:
            out = fn(yy, pp)
            return {k: float(v) for k, v in out.items()} if isinstance(out, Mapping) else {"metric": float(out)}

        return evaluate_callable
    names = list(METRIC_NAMES if metrics is None else metrics)
    for name in names:
        _check_choice("metric", name, METRIC_NAMES)

    def evaluate_named(yy: np.ndarray, pp: np.ndarray, tt: np.ndarray) -> dict[str, float]:
        if yy.size == 0:
            return {k: NAN for k in names}
        all_metrics = binary_metrics(yy, pp, tt)
        return {k: all_metrics[k] for k in names}

    return evaluate_named


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


def roc_curve_points(y_true: ArrayLike, prob: ArrayLike, max_points: int = 200) -> list[dict[str, float]]:
    """ROC curve (Fawcett 2006) as dicts fpr, tpr, threshold; thresholds clipped to [0, 1], thinned to max_points."""
    from sklearn.metrics import roc_curve

    y = _as_binary(y_true)
    p = _as_prob(prob, y.size)
    if y.min(initial=1) == y.max(initial=0):
        return []
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=True)
    if fpr.size > max_points:
        keep = np.unique(np.round(np.linspace(0, fpr.size - 1, max_points)).astype(np.int64))
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    thr = np.clip(thr, 0.0, 1.0)
    return [{"fpr": float(f), "tpr": float(t), "threshold": float(h)} for f, t, h in zip(fpr, tpr, thr)]


def calibration_curve_points(y_true: ArrayLike, prob: ArrayLike, n_bins: int = 10) -> list[dict[str, float]]:
    """Reliability diagram (DeGroot & Fienberg 1983; Niculescu-Mizil & Caruana 2005): per non-empty equal-width bin."""
    y = _as_binary(y_true)
    p = _as_prob(prob, y.size)
    idx = np.clip(np.ceil(p * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    points: list[dict[str, float]] = []
    for m in range(n_bins):
        mask = idx == m
        count = int(mask.sum())
        if count:
            points.append(
                {
                    "bin_low": m / n_bins,
                    "bin_high": (m + 1) / n_bins,
                    "mean_predicted": float(p[mask].mean()),
                    "fraction_positive": float(y[mask].mean()),
                    "count": count,
                }
            )
    return points


def confusion(y_true: ArrayLike, pred: ArrayLike, labels: Sequence[int] = (0, 1)) -> list[list[int]]:
    """Confusion matrix counts[i][j] = number with true labels[i] predicted labels[j] (binary: [[TN, FP], [FN, TP]])."""
    y = np.asarray(y_true)
    q = np.asarray(pred)
    if y.shape != q.shape:
        raise ValueError(f"y_true and pred must have the same shape, got {y.shape} and {q.shape}")
    return [[int(np.sum((y == t) & (q == s))) for s in labels] for t in labels]


def epochs_to_fraction_of_best(values: Sequence[float | None], fraction: float = 0.95) -> int | None:
    """Number of epochs (1-based) until a value first reaches fraction * max(values); None if no finite values."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    finite = [(i, float(v)) for i, v in enumerate(values) if v is not None and math.isfinite(float(v))]
    if not finite:
        return None
    best = max(v for _, v in finite)
    target = fraction * best
    for i, v in finite:
        if v >= target - 1e-12:
            return i + 1
    return None  # pragma: no cover - unreachable: best itself reaches the target


def seconds_to_epoch(epoch_seconds: Sequence[float | None], epochs: int | None) -> float | None:
    """Cumulative wall-clock seconds of the first `epochs` epochs; None if any of them was not timed."""
    if epochs is None or epochs > len(epoch_seconds):
        return None
    head = epoch_seconds[:epochs]
    if any(s is None for s in head):
        return None
    return float(sum(float(s) for s in head))  # type: ignore[arg-type]




# ---------------------------------------------------------------- patients, operating point, multiplicity


class PatientLevel(NamedTuple):
    """Per-patient label and aggregated probability, in sorted patient order."""

    patients: list[str]
    targets: np.ndarray
    probs: np.ndarray


def aggregate_by_patient(
    patients: Sequence[str], y_true: ArrayLike, prob: ArrayLike, how: Literal["mean", "max"] = "mean"
) -> PatientLevel:
    """One probability per patient: the mean (default) or the max of its slice probabilities.

    A patient's label is positive when any of its images is (patients carry one label in this product, so
    this only matters for inconsistent labels). Patients are returned sorted by key, so the order does not
    depend on the order of the rows.
    """
    _check_choice("aggregation", how, AGGREGATIONS)
    y = _as_binary(y_true)
    p = _as_prob(prob, y.size)
    keys = np.asarray(list(patients))
    if keys.shape != y.shape:
        raise ValueError(f"patients must give one patient per image: {keys.shape} for {y.shape} images")
    unique, inverse = np.unique(keys, return_inverse=True)
    counts = np.bincount(inverse, minlength=unique.size).astype(float)
    if how == "mean":
        agg = np.bincount(inverse, weights=p, minlength=unique.size) / np.maximum(counts, 1)
    else:
        agg = np.full(unique.size, -np.inf)
        np.maximum.at(agg, inverse, p)
    label = np.zeros(unique.size, dtype=np.int64)
    np.maximum.at(label, inverse, y)
    return PatientLevel([str(k) for k in unique], label, np.clip(agg, 0.0, 1.0))


class OperatingPoint(NamedTuple):
    """A decision threshold and how it was chosen ('youden', 'sensitivity', 'specificity', 'fixed', 'fallback')."""

    threshold: float
    rule: str
    target: float | None
    note: str = ""


FALLBACK_THRESHOLD = 0.5


def _candidate_thresholds(prob: np.ndarray) -> np.ndarray:
    """Midpoints between adjacent distinct probabilities, plus one above and one below all of them."""
    values = np.unique(prob)
    mids = (values[:-1] + values[1:]) / 2.0
    return np.concatenate([[min(1.0, values[-1] + 1e-9)], mids[::-1], [max(0.0, values[0] - 1e-9)]])


def choose_operating_point(y_val: ArrayLike, p_val: ArrayLike, rule: str, target: float | None = None) -> OperatingPoint:
    """Threshold chosen on validation predictions, to be applied unchanged to the test predictions.

    youden: maximise J = sensitivity + specificity - 1 (Youden 1950) over midpoints between distinct validation
    probabilities (ties: the highest such threshold). sensitivity:x: the highest threshold whose validation
    sensitivity is >= x. specificity:x: the lowest threshold whose validation specificity is >= x. fixed:x: x.
    A prediction counts as positive when p >= threshold. When the validation part has a single class (or no
    rows) a data-driven rule is impossible: the fixed 0.5 is returned as rule "fallback" with a note.
    """
    if rule == "fixed":
        if target is None:
            raise ValueError("rule 'fixed' needs a threshold")
        return OperatingPoint(float(target), "fixed", target)
    _check_choice("operating point rule", rule, ("youden", "sensitivity", "specificity", "fixed"))
    y = _as_binary(y_val)
    p = _as_prob(p_val, y.size)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        return OperatingPoint(FALLBACK_THRESHOLD, "fallback", target,
                              f"the validation part has {n_pos} positive and {n_neg} negative units")
    thresholds = _candidate_thresholds(p)  # descending
    predicted = p[None, :] >= thresholds[:, None]
    sens = (predicted & (y == 1)).sum(axis=1) / n_pos
    spec = (~predicted & (y == 0)).sum(axis=1) / n_neg
    if rule == "youden":
        best = int(np.argmax(sens + spec - 1.0))  # first = highest threshold among ties
    elif rule == "sensitivity":
        best = int(np.argmax(sens >= float(target) - 1e-12))  # sensitivity rises as the threshold falls
    else:
        ok = np.flatnonzero(spec >= float(target) - 1e-12)
        best = int(ok[-1]) if ok.size else 0
    return OperatingPoint(float(thresholds[best]), rule, target)


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


# ---------------------------------------------------------------- the recommendation rule


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
