"""Test-set statistics for comparing arms: metrics, patient-level bootstrap CIs, DeLong and McNemar tests.

All functions take plain arrays: y_true holds 0/1 labels (1 = positive class), prob the predicted
probability of the positive class, groups the patient of each image (any hashable; never written out).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
from scipy import stats

from data_schemas.report import METRIC_NAMES, Recommendation

ArrayLike = Sequence[float] | np.ndarray

ECE_MODES = ("top_label", "positive_class")
MCNEMAR_METHODS = ("auto", "exact", "chi2_cc", "clustered")
MCNEMAR_EXACT_BELOW = 25


class Interval(NamedTuple):
    """A point estimate with its bootstrap percentile interval."""

    value: float
    ci_low: float
    ci_high: float
    n_valid: int
    n_skipped: int


class DeLongTest(NamedTuple):
    """Result of delong_test; fields match data_schemas.report.DeLongResult."""

    auc_a: float
    auc_b: float
    diff: float
    z: float
    p_value: float
    ci_of_diff: tuple[float, float]
    level: float


class McNemarTest(NamedTuple):
    """Result of mcnemar_test; fields match data_schemas.report.McNemarResult."""

    b: int
    c: int
    statistic: float
    p_value: float
    method: str


class ArmSummary(NamedTuple):
    """What recommend needs to know about one arm."""

    name: str
    status: str
    auc: float | None = None
    auc_ci: tuple[float, float] | None = None
    seconds: float | None = None
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


def roc_auc(y_true: ArrayLike, prob: ArrayLike) -> float:
    """ROC AUC as the Mann-Whitney U statistic with midranks for ties (Hanley & McNeil 1982); NaN for one class."""
    y = _as_binary(y_true)
    p = np.asarray(prob, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(
    y_true: ArrayLike, prob: ArrayLike, n_bins: int = 10, mode: Literal["top_label", "positive_class"] = "top_label"
) -> float:
    """ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)| over equal-width bins (Guo et al. 2017, eq. 3).

    mode "top_label" (Guo et al.): confidence is max(p, 1 - p) and accuracy is whether the thresholded
    prediction is right; "positive_class": confidence is p and accuracy is the fraction of positives.
    Bins are ((m-1)/M, m/M], the first also holding 0.
    """
    _check_choice("mode", mode, ECE_MODES)
    y = _as_binary(y_true)
    p = _as_prob(prob, y.size)
    if y.size == 0:
        return float("nan")
    if mode == "top_label":
        pred = (p >= 0.5).astype(np.int64)
        conf = np.maximum(p, 1.0 - p)
        hit = (pred == y).astype(np.float64)
    else:
        conf = p
        hit = y.astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_hit = np.bincount(idx, weights=hit, minlength=n_bins)
    return float(np.abs(sum_hit - sum_conf).sum() / y.size)


def binary_metrics(y_true: ArrayLike, prob: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Test metrics of one arm: keys METRIC_NAMES; NaN where undefined (e.g. AUC with one class).

    roc_auc: Mann-Whitney with midranks (Hanley & McNeil 1982), equal to sklearn.metrics.roc_auc_score.
    accuracy: (TP + TN) / n. sensitivity: TP / (TP + FN). specificity: TN / (TN + FP).
    balanced_accuracy: (sensitivity + specificity) / 2 (Brodersen et al. 2010).
    f1: 2 TP / (2 TP + FP + FN). brier: mean (p - y)^2 (Brier 1950).
    ece: expected calibration error, 10 equal-width bins, top-label confidence (Guo et al. 2017).
    A probability >= threshold counts as a positive prediction.
    """
    y = _as_binary(y_true)
    p = _as_prob(prob, y.size)
    pred = (p >= threshold).astype(np.int64)
    tp = float(np.sum((pred == 1) & (y == 1)))
    tn = float(np.sum((pred == 0) & (y == 0)))
    fp = float(np.sum((pred == 1) & (y == 0)))
    fn = float(np.sum((pred == 0) & (y == 1)))
    n = float(y.size)
    nan = float("nan")
    sens = tp / (tp + fn) if tp + fn else nan
    spec = tn / (tn + fp) if tn + fp else nan
    return {
        "roc_auc": roc_auc(y, p),
        "accuracy": (tp + tn) / n if n else nan,
        "balanced_accuracy": (sens + spec) / 2.0,
        "sensitivity": sens,
        "specificity": spec,
        "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else nan,
        "brier": float(np.mean((p - y) ** 2)) if n else nan,
        "ece": expected_calibration_error(y, p, n_bins=10),
    }


MetricFn = Callable[[np.ndarray, np.ndarray], float | Mapping[str, float]]


def bootstrap_ci(
    y_true: ArrayLike,
    prob: ArrayLike,
    groups: Sequence[Hashable] | np.ndarray,
    metrics: Sequence[str] | MetricFn | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    threshold: float = 0.5,
) -> dict[str, Interval]:
    """Cluster (patient-level) bootstrap percentile intervals (Efron & Tibshirani 1993, ch. 13; Field & Welsh 2007).

    Each resample draws patients with replacement and takes all images of each drawn patient, so images
    of one patient never count as independent. A resample where a metric is undefined (NaN, e.g. AUC
    when all drawn images share one class) is skipped for that metric and counted in n_skipped.

    Args:
        y_true: 0/1 label per image.
        prob: positive-class probability per image.
        groups: patient of each image.
        metrics: names out of METRIC_NAMES (default all), or a callable (y, p) -> float or dict of floats.
        n_resamples: bootstrap resamples.
        seed: seed of numpy's default_rng.
        level: interval coverage, e.g. 0.95.
        threshold: decision threshold for the thresholded metrics.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    y = _as_binary(y_true)
    p = _as_prob(prob, y.size)
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"groups must have shape {y.shape}, got {g.shape}")

    if callable(metrics):
        fn = metrics

        def evaluate(yy: np.ndarray, pp: np.ndarray) -> dict[str, float]:
            out = fn(yy, pp)
            return {k: float(v) for k, v in out.items()} if isinstance(out, Mapping) else {"metric": float(out)}

    else:
        names = list(METRIC_NAMES if metrics is None else metrics)
        for name in names:
            _check_choice("metric", name, METRIC_NAMES)

        def evaluate(yy: np.ndarray, pp: np.ndarray) -> dict[str, float]:
            all_metrics = binary_metrics(yy, pp, threshold)
            return {k: all_metrics[k] for k in names}

    point = evaluate(y, p)
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    members = [order[s : s + c] for s, c in zip(starts, counts)]
    n_groups = len(members)

    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_resamples):
        drawn = rng.integers(0, n_groups, size=n_groups)
        idx = np.concatenate([members[i] for i in drawn])
        for key, value in evaluate(y[idx], p[idx]).items():
            if key in samples and math.isfinite(value):
                samples[key].append(value)

    alpha = (1.0 - level) / 2.0
    result: dict[str, Interval] = {}
    for key, value in point.items():
        vals = np.asarray(samples[key])
        if vals.size:
            low, high = np.percentile(vals, [100 * alpha, 100 * (1 - alpha)])
        else:
            low = high = float("nan")
        result[key] = Interval(float(value), float(low), float(high), int(vals.size), n_resamples - int(vals.size))
    return result


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
    With one image per cluster it reduces to DeLong's covariance exactly.
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
            s10 = i10 / ((i10 - 1) * big_m) * float(a_dev[r] @ a_dev[t]) if i10 > 1 else 0.0
            s01 = i01 / ((i01 - 1) * big_n) * float(b_dev[r] @ b_dev[t]) if i01 > 1 else 0.0
            s11_rt = n_clusters / (n_clusters - 1) * float(a_dev[r] @ b_dev[t])
            s11_tr = n_clusters / (n_clusters - 1) * float(a_dev[t] @ b_dev[r])
            cov[r, t] = s10 / big_m + s01 / big_n + (s11_rt + s11_tr) / (big_m * big_n)
    return cov


def delong_test(
    y_true: ArrayLike, prob_a: ArrayLike, prob_b: ArrayLike, level: float = 0.95, groups: Sequence[Hashable] | None = None
) -> DeLongTest:
    """Two-sided test of AUC_a = AUC_b on the same images (DeLong, DeLong & Clarke-Pearson 1988).

    Structural components V10, V01 and their covariances S10, S01 computed in O(n log n) with midranks
    (Sun & Xu 2014, IEEE Signal Process. Lett. 21(11)); var(AUC_a - AUC_b) = c' (S10/m + S01/n) c with
    c = (1, -1); z = diff / sqrt(var); p = 2 (1 - Phi(|z|)); CI = diff -/+ z_(1-alpha/2) sqrt(var).
    Identical predictors give z = 0, p = 1. A zero variance with a nonzero difference gives p = 0.
    groups (the patient of each image): images of one patient are correlated, so the covariance is
    Obuchowski's clustered extension (see _clustered_covariance); without groups, images count as independent,
    which makes the p-value optimistic when patients contribute several images.
    """
    y = _as_binary(y_true)
    a = _as_prob(prob_a, y.size)
    b = _as_prob(prob_b, y.size)
    m = int(y.sum())
    n = y.size - m
    if m < 2 or n < 2:
        raise ValueError(f"delong_test needs at least 2 positive and 2 negative images, got {m} and {n}")
    auc_a, v10_a, v01_a = _structural_components(a[y == 1], a[y == 0])
    auc_b, v10_b, v01_b = _structural_components(b[y == 1], b[y == 0])
    if groups is None:
        cov = np.cov(np.vstack([v10_a, v10_b])) / m + np.cov(np.vstack([v01_a, v01_b])) / n
    else:
        group_array = np.asarray(groups)
        if group_array.shape != y.shape:
            raise ValueError(f"groups must give one patient per image: {group_array.shape} for {y.shape} images")
        cov = _clustered_covariance(y, [v10_a, v10_b], [v01_a, v01_b], [auc_a, auc_b], group_array)
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = auc_a - auc_b
    zq = float(stats.norm.ppf(0.5 + level / 2.0))
    if var <= 1e-15:
        if abs(diff) < 1e-12:
            z, p_value = 0.0, 1.0
        else:
            z, p_value = math.copysign(math.inf, diff), 0.0
        half = 0.0
    else:
        se = math.sqrt(var)
        z = diff / se
        p_value = float(min(1.0, 2.0 * stats.norm.sf(abs(z))))
        half = zq * se
    return DeLongTest(auc_a, auc_b, diff, z, p_value, (diff - half, diff + half), level)


def mcnemar_test(
    y_true: ArrayLike,
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    method: Literal["auto", "exact", "chi2_cc", "clustered"] = "auto",
    groups: Sequence[Hashable] | None = None,
) -> McNemarTest:
    """McNemar's test of paired decisions (McNemar 1947; Edwards 1948 continuity correction).

    With groups (the patient of each image), method "auto" becomes "clustered": Durkalski et al. 2003
    (Stat. Med. 22:2417-2428), X2 = (sum_k (b_k - c_k))^2 / sum_k (b_k - c_k)^2 over patients k against
    chi-square with 1 df, which allows for correlated images within a patient; with one image per patient it
    is McNemar's (b - c)^2 / (b + c).

    b = images A got right and B wrong, c = A wrong and B right. "exact": two-sided binomial test of b
    out of b + c at 1/2, p = min(1, 2 * P(X <= min(b, c))), statistic = min(b, c). "chi2_cc":
    (|b - c| - 1)^2 / (b + c) against chi-square with 1 df. "auto" is exact when b + c < 25
    (Agresti 2013, 10.1.4), else chi2_cc. b + c = 0 gives p = 1.
    """
    _check_choice("method", method, MCNEMAR_METHODS)
    y = np.asarray(y_true)
    ya = np.asarray(pred_a)
    yb = np.asarray(pred_b)
    if not (y.shape == ya.shape == yb.shape):
        raise ValueError(f"y_true, pred_a and pred_b must have the same shape, got {y.shape}, {ya.shape}, {yb.shape}")
    right_a = ya == y
    right_b = yb == y
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    n = b + c
    if method == "clustered" or (method == "auto" and groups is not None):
        if groups is None:
            raise ValueError("method 'clustered' needs groups (the patient of each image)")
        _, cluster = np.unique(np.asarray(groups), return_inverse=True)
        if cluster.shape != y.shape:
            raise ValueError(f"groups must give one patient per image: {cluster.shape} for {y.shape} images")
        per_patient = np.bincount(cluster, weights=(right_a & ~right_b).astype(float)) - np.bincount(
            cluster, weights=(~right_a & right_b).astype(float))
        denominator = float(np.sum(per_patient**2))
        if denominator == 0:
            return McNemarTest(b, c, 0.0, 1.0, "clustered")
        statistic = float(per_patient.sum()) ** 2 / denominator
        return McNemarTest(b, c, statistic, float(stats.chi2.sf(statistic, df=1)), "clustered")
    chosen = ("exact" if n < MCNEMAR_EXACT_BELOW else "chi2_cc") if method == "auto" else method
    if n == 0:
        return McNemarTest(b, c, 0.0, 1.0, chosen)
    if chosen == "exact":
        k = min(b, c)
        p_value = float(min(1.0, 2.0 * stats.binom.cdf(k, n, 0.5)))
        return McNemarTest(b, c, float(k), p_value, "exact")
    statistic = (abs(b - c) - 1.0) ** 2 / n
    return McNemarTest(b, c, float(statistic), float(stats.chi2.sf(statistic, df=1)), "chi2_cc")


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


def format_p(p_value: float) -> str:
    """'p = 0.004', 'p = 0.41' or 'p < 0.001'."""
    if p_value < 0.001:
        return "p < 0.001"
    if p_value < 0.01:
        return f"p = {p_value:.3f}"
    return f"p = {p_value:.2f}"


def plain_words_comparison(
    arm_a: str,
    arm_b: str,
    delong: DeLongTest,
    mcnemar: McNemarTest | None = None,
    alpha: float = 0.05,
    threshold: float = 0.5,
) -> str:
    """One or two sentences a radiologist can read: the AUC difference, its CI and p-value, and the verdict."""
    diff = delong.diff
    direction = "higher" if diff > 0 else "lower" if diff < 0 else "the same as"
    amount = f"{abs(diff):.2f} {direction}" if diff != 0 else direction
    low, high = delong.ci_of_diff
    pct = round(delong.level * 100)
    verdict = "a significant difference" if delong.p_value < alpha else "no significant difference"
    text = (
        f"{arm_a}'s AUC is {amount} than {arm_b}'s ({pct}% CI {low:.2f} to {high:.2f}, "
        f"DeLong {format_p(delong.p_value)}): {verdict}."
    )
    if mcnemar is not None:
        text += (
            f" At threshold {threshold:g} the two arms disagree on {mcnemar.b + mcnemar.c} test images "
            f"({arm_a} right on {mcnemar.b}, {arm_b} right on {mcnemar.c}; McNemar {format_p(mcnemar.p_value)})."
        )
    return text


def _fmt_seconds(seconds: float) -> str:
    """'42 s', '12.5 min' or '3.1 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _auc_text(arm: ArmSummary) -> str:
    """'0.91 (95% CI 0.87 to 0.94)'."""
    if arm.auc is None:
        return "n/a"
    if arm.auc_ci is None or not all(math.isfinite(x) for x in arm.auc_ci):
        return f"{arm.auc:.2f}"
    return f"{arm.auc:.2f} (95% CI {arm.auc_ci[0]:.2f} to {arm.auc_ci[1]:.2f})"


def recommend(
    arms: Sequence[ArmSummary],
    comparisons: Mapping[tuple[str, str], DeLongTest],
    alpha: float = 0.05,
) -> Recommendation:
    """A recommendation that follows from the numbers: the best-AUC arm if significantly better, else the cheapest.

    Args:
        arms: every arm; skipped and failed ones only count as not completed (the report shows their reasons).
        comparisons: DeLong result per (arm_a, arm_b) pair of completed arms, either order.
        alpha: significance level.
    """
    completed = [a for a in arms if a.status == "completed" and a.auc is not None and math.isfinite(a.auc)]
    if not completed:
        return Recommendation(
            headline="No arm completed, so there is nothing to recommend.", basis="none"
        )
    if len(completed) == 1:
        only = completed[0]
        return Recommendation(
            headline=f"Only {only.name} completed, with test AUC {_auc_text(only)}; no comparison is possible.",
            preferred_arm=only.name,
            basis="single_arm",
        )

    def lookup(x: str, y: str) -> DeLongTest | None:
        if (x, y) in comparisons:
            return comparisons[(x, y)]
        if (y, x) in comparisons:
            r = comparisons[(y, x)]
            return DeLongTest(r.auc_b, r.auc_a, -r.diff, -r.z, r.p_value, (-r.ci_of_diff[1], -r.ci_of_diff[0]), r.level)
        return None

    best = max(completed, key=lambda a: a.auc or 0.0)
    details: list[str] = []
    beaten: list[str] = []
    tied = [best]
    for other in completed:
        if other is best:
            continue
        res = lookup(best.name, other.name)
        if res is None:
            details.append(f"{best.name} and {other.name} were not tested against each other.")
            tied.append(other)
        elif res.p_value < alpha:
            beaten.append(f"{other.name}'s {res.auc_b:.2f} (DeLong {format_p(res.p_value)})")
            details.append(
                f"{best.name}'s AUC {res.auc_a:.2f} is significantly higher than {other.name}'s {res.auc_b:.2f} "
                f"(difference {res.diff:.2f}, DeLong {format_p(res.p_value)})."
            )
        else:
            details.append(
                f"No significant difference in AUC between {best.name} ({res.auc_a:.2f}) and {other.name} "
                f"({res.auc_b:.2f}; DeLong {format_p(res.p_value)})."
            )
            tied.append(other)

    timed = {a.name: a.seconds for a in completed if a.seconds is not None}
    cost_text = ", ".join(f"{name} {_fmt_seconds(s)}" for name, s in timed.items())
    if cost_text:
        details.append(f"Measured training time: {cost_text}.")

    if len(tied) == 1:
        headline = (
            f"Use {best.name}: its test AUC {_auc_text(best)} is significantly higher than "
            f"{' and '.join(beaten)}."
        )
        return Recommendation(headline=headline, details=details, preferred_arm=best.name, basis="significant")

    names = " and ".join(a.name for a in tied)
    if all(a.seconds is not None for a in tied):
        cheapest = min(tied, key=lambda a: a.seconds or 0.0)
        dearest = max(tied, key=lambda a: a.seconds or 0.0)
        if cheapest is dearest or dearest.seconds == cheapest.seconds:
            cost = "training time is the same, so either will do"
        else:
            cost = (
                f"so prefer the cheaper one, {cheapest.name}: it trained in {_fmt_seconds(cheapest.seconds or 0.0)} "
                f"against {_fmt_seconds(dearest.seconds or 0.0)} for {dearest.name}"
            )
        headline = f"No significant difference in test AUC between {names}; {cost}."
        return Recommendation(headline=headline, details=details, preferred_arm=cheapest.name, basis="tied_cost")
    headline = (
        f"No significant difference in test AUC between {names}; training time was not measured for all "
        f"of them, so choose on cost or convenience."
    )
    return Recommendation(headline=headline, details=details, preferred_arm=None, basis="tied_cost")
