"""Test-set statistics of one arm: metrics, patient-level bootstrap intervals, curves and convergence.

All functions take plain arrays: y_true holds 0/1 labels (1 = positive class), prob the predicted
probability of the positive class, groups the patient of each image (any hashable; never written out).
Functions here return numbers; the sentences that carry them are written in reports/ (one home for formatting).
The sibling modules build on these checks: tasks.evaluation.pooling (patients, operating point),
tasks.evaluation.pairs (paired tests of two arms, Holm) and tasks.evaluation.recommend (the decision rule).
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
NAN = float("nan")


class Interval(NamedTuple):
    """A point estimate with its bootstrap percentile interval."""

    value: float
    ci_low: float
    ci_high: float
    n_valid: int
    n_skipped: int


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


def resampled_roc_auc(y_true: ArrayLike, prob: ArrayLike, draws: np.ndarray) -> np.ndarray:
    """roc_auc of every resample at once: row r of `draws` (R, n) holds the indices drawn for resample r; NaN for a
    resample with one class.

    The same midrank statistic, counted per row instead of sorted: a drawn value's midrank is the number of drawn
    values below it plus (the number equal to it + 1) / 2. The rank sums are sums of half-integers, so each AUC is
    the same float roc_auc gives.
    """
    y = _as_binary(y_true)
    values, group = np.unique(np.asarray(prob, dtype=np.float64), return_inverse=True)
    rows, width = draws.shape[0], values.size
    drawn_group = group.reshape(-1)[draws]
    per_group = np.bincount((drawn_group + width * np.arange(rows)[:, None]).ravel(),
                            minlength=rows * width).reshape(rows, width).astype(np.float64)
    midrank = np.cumsum(per_group, axis=1) - per_group + (per_group + 1.0) / 2.0
    drawn_y = y[draws]
    n_pos = drawn_y.sum(axis=1).astype(np.float64)
    n_neg = draws.shape[1] - n_pos
    rank_sum = (np.take_along_axis(midrank, drawn_group, axis=1) * drawn_y).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, NAN)


def expected_calibration_error(
    y_true: ArrayLike, prob: ArrayLike, n_bins: int = 10,
    mode: Literal["top_label", "positive_class"] = "positive_class",
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


def _metric_evaluator(
    metrics: Sequence[str] | MetricFn | None,
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]:
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


# ---------------------------------------------------------------- proportions: sensitivity, specificity, accuracy

PROPORTIONS = {"sensitivity": 1, "specificity": 0, "accuracy": None}  # metric -> class it is a proportion over


def wilson_interval(successes: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson (1927) score interval of a proportion: (p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n).

    n may be an effective (non-integer) sample size; NaN for n = 0.
    """
    if n <= 0:
        return NAN, NAN
    z = float(stats.norm.ppf(0.5 + level / 2.0))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def clopper_pearson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper & Pearson (1934) exact interval: Beta(alpha/2; k, n - k + 1) to Beta(1 - alpha/2; k + 1, n - k)."""
    if n <= 0:
        return NAN, NAN
    alpha = 1.0 - level
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, n - successes + 1))
    high = 1.0 if successes == n else float(stats.beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return low, high


def clustered_wilson_interval(hits: np.ndarray, units: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Wilson's interval at the effective sample size of a proportion over clustered rows (slices of patients).

    p = sum of hits / rows; its ratio-estimator variance over the K clusters, v = K/(K-1) sum_k (x_k - p m_k)^2 /
    (sum_k m_k)^2 (x_k hits and m_k rows of cluster k; Cochran 1977, 6.13), gives n_eff = p(1-p)/v (Kish 1965),
    kept between K and the number of rows: a patient's slices never count for less than one patient or more than
    independent rows. With p at 0 or 1 the variance is 0 and n_eff = K (each patient counts once).
    """
    hits = np.asarray(hits, dtype=np.float64)
    if hits.size == 0:
        return NAN, NAN
    _, cluster = np.unique(units, return_inverse=True)
    x, m = np.bincount(cluster, weights=hits), np.bincount(cluster).astype(np.float64)
    k, p = x.size, float(hits.mean())
    variance = k / (k - 1) * float(np.sum((x - p * m) ** 2)) / float(m.sum()) ** 2 if k > 1 else 0.0
    if variance <= 0 or p in (0.0, 1.0):
        n_eff = float(k)
    else:
        n_eff = min(float(hits.size), max(float(k), p * (1 - p) / variance))
    return wilson_interval(p * n_eff, n_eff, level)


def proportion_intervals(
    y_true: ArrayLike, prob: ArrayLike, threshold: float | ArrayLike, groups: Sequence[Hashable] | np.ndarray,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Intervals of sensitivity, specificity and accuracy that hold at 0 and 1 and at a few patients.

    One row per patient (groups all distinct): Clopper-Pearson on the patient counts. Several rows per patient
    (slices): clustered_wilson_interval over the patients. NaN where the proportion has no rows (e.g. no positives).
    """
    y = _as_binary(y_true)
    p = _as_prob(prob, y.size)
    correct = ((p >= _as_thresholds(threshold, y.size)).astype(np.int64) == y).astype(np.float64)
    g = np.asarray(groups)
    per_patient = np.unique(g).size == g.size
    out = {}
    for name, cls in PROPORTIONS.items():
        rows = np.ones(y.size, bool) if cls is None else y == cls
        if per_patient:
            out[name] = clopper_pearson_interval(int(correct[rows].sum()), int(rows.sum()), level)
        else:
            out[name] = clustered_wilson_interval(correct[rows], g[rows], level)
    return out
