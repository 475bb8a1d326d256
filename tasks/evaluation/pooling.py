"""Patients and operating points: slice probabilities pooled into one per patient, and the decision threshold.

A patient's probability is the mean (or max) of its slices; the threshold is chosen on validation predictions and
applied unchanged to the test predictions (each outer fold its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np

from tasks.evaluation.statistics import ArrayLike, _as_binary, _as_prob, _check_choice

AGGREGATIONS = ("mean", "max")


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


def choose_operating_point(
    y_val: ArrayLike, p_val: ArrayLike, rule: str, target: float | None = None
) -> OperatingPoint:
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

