"""The overfitting gap of each run at its chosen and at its last epoch, with a bootstrap interval by patient.

Gap = mean validation loss - mean training loss, both plain cross-entropy in eval mode, from the run's
overfitting_losses.csv (tasks.training.gap_losses). Interval: 95% percentile bootstrap resampling the training
patients and the validation patients independently (each part with replacement, its own size), the means weighting
every image equally as the point estimate does. A run without that file (made before it was written) gives the
point estimates from metrics.csv and no interval.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from data_schemas.files import read_models_csv
from data_schemas.metrics import MetricValue
from data_schemas.report import OverfittingGap
from data_schemas.training import OVERFITTING_LOSSES_FILE, EpochMetrics, OverfittingLossRow
from tasks.evaluation.runs import RunData, finite

CI_LEVEL = 0.95


def _patient_sums(rows: list[OverfittingLossRow]) -> tuple[np.ndarray, np.ndarray]:
    """Per patient: the sum of its images' losses and its image count."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        sums[row.patient_key] += row.loss
        counts[row.patient_key] += 1
    keys = sorted(sums)
    return np.array([sums[k] for k in keys]), np.array([counts[k] for k in keys], dtype=float)


def bootstrap_gap(
    train: list[OverfittingLossRow], val: list[OverfittingLossRow], n_resamples: int, seed: int
) -> MetricValue:
    """Mean validation loss - mean training loss, with its patient bootstrap interval (None with < 2 patients)."""
    (t_sum, t_n), (v_sum, v_n) = _patient_sums(train), _patient_sums(val)
    if not t_n.size or not v_n.size:
        return MetricValue()
    value = v_sum.sum() / v_n.sum() - t_sum.sum() / t_n.sum()
    if t_n.size < 2 or v_n.size < 2:
        return MetricValue(value=finite(value))
    rng = np.random.default_rng(seed)
    ti = rng.integers(0, t_n.size, size=(n_resamples, t_n.size))
    vi = rng.integers(0, v_n.size, size=(n_resamples, v_n.size))
    gaps = v_sum[vi].sum(axis=1) / v_n[vi].sum(axis=1) - t_sum[ti].sum(axis=1) / t_n[ti].sum(axis=1)
    tail = 100 * (1 - CI_LEVEL) / 2
    low, high = np.percentile(gaps, [tail, 100 - tail])
    return MetricValue(value=finite(value), ci_low=finite(low), ci_high=finite(high))


def _from_metrics(history: list[EpochMetrics], fold: int, role: str, epoch: int) -> OverfittingGap | None:
    """The point estimate from metrics.csv (no per-image losses, no interval)."""
    row = next((m for m in history if m.epoch == epoch), None)
    if row is None or row.val_loss is None or row.train_eval_loss is None:
        return None
    return OverfittingGap(
        fold=fold,
        role=role,
        epoch=epoch,
        gap=MetricValue(value=finite(row.val_loss - row.train_eval_loss)),  # type: ignore[arg-type]
        val_loss=row.val_loss,
        train_loss=row.train_eval_loss,
    )


def run_gaps(run: RunData, fold: int, n_resamples: int, seed: int) -> list[OverfittingGap]:
    """The gap of one run at its chosen and its last epoch."""
    path = run.run_dir / OVERFITTING_LOSSES_FILE
    if not path.is_file():
        chosen, last = run.status.best_epoch, run.history[-1].epoch if run.history else None
        found = [
            _from_metrics(run.history, fold, role, epoch)
            for role, epoch in (("chosen", chosen), ("last", last))
            if epoch is not None
        ]
        return [gap for gap in found if gap is not None]
    rows = read_models_csv(path, OverfittingLossRow)
    gaps = []
    for role in ("chosen", "last"):
        mine = [r for r in rows if r.role == role]
        train, val = [r for r in mine if r.part == "train"], [r for r in mine if r.part == "val"]
        if not mine:
            continue
        gaps.append(
            OverfittingGap(
                fold=fold,
                role=role,
                epoch=mine[0].epoch,
                gap=bootstrap_gap(train, val, n_resamples, seed),  # type: ignore[arg-type]
                val_loss=finite(float(np.mean([r.loss for r in val]))) if val else None,
                train_loss=finite(float(np.mean([r.loss for r in train]))) if train else None,
                n_val_patients=len({r.patient_key for r in val}),
                n_train_patients=len({r.patient_key for r in train}),
            )
        )
    return gaps
