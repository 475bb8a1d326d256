"""Reading a comparison's run folders: each run's test and validation predictions, thresholds and files.

A completed run gives a RunData; the runs of one arm are pooled into a PooledArm (one run in hold-out mode, one
per outer fold, with disjoint test patients, in cross-validated mode). Each run's decision threshold is chosen on
its own validation predictions.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_schemas.arms import parse_arm
from data_schemas.evaluation import EvaluationSettings, parse_operating_point
from data_schemas.files import read_model_json, read_models_csv
from data_schemas.training import (
    CONFIG_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    STATUS_FILE,
    TIMING_FILE,
    VAL_PREDICTIONS_FILE,
    EpochMetrics,
    PredictionRow,
    RunConfig,
    RunSummary,
    TimingInfo,
)
from tasks.evaluation import pooling


@dataclass
class Predictions:
    """Predictions of one part (test or validation), aligned row by row; kept out of results.json."""

    image_keys: list[str]
    patient_keys: list[str]
    targets: np.ndarray
    probs: np.ndarray


@dataclass
class RunData:
    """One completed run: its files, test and (when saved) validation predictions, and its thresholds."""

    run_dir: Path
    status: RunSummary
    config: RunConfig | None
    history: list[EpochMetrics]
    timing: TimingInfo | None
    test: Predictions
    val: Predictions | None
    slice_point: pooling.OperatingPoint
    patient_point: pooling.OperatingPoint


@dataclass
class PooledArm:
    """An arm's pooled test predictions with each image's and each patient's own threshold."""

    slices: Predictions
    slice_thresholds: np.ndarray
    patients: pooling.PatientLevel
    patient_thresholds: np.ndarray
    patient_images: dict[str, int]


def finite(value: float | None) -> float | None:
    """The value as a float, None when missing or not finite."""
    return None if value is None or not math.isfinite(value) else float(value)


def read_predictions(path: Path) -> Predictions:
    """predictions.csv or val_predictions.csv as aligned arrays."""
    rows = read_models_csv(path, PredictionRow)
    return Predictions(
        image_keys=[r.image_key for r in rows],
        patient_keys=[r.patient_key for r in rows],
        targets=np.array([r.target for r in rows], dtype=np.int64),
        probs=np.array([r.prob_positive for r in rows], dtype=np.float64),
    )


def operating_points(
    val: Predictions | None, evaluation: EvaluationSettings
) -> tuple[pooling.OperatingPoint, pooling.OperatingPoint]:
    """The slice and patient thresholds of one run, chosen on its validation predictions by the settings' rule."""
    rule, target = parse_operating_point(evaluation.operating_point)
    if rule == "fixed":
        fixed = pooling.OperatingPoint(float(target or 0.5), "fixed", target)
        return fixed, fixed
    if val is None or not val.targets.size:
        note = f"no {VAL_PREDICTIONS_FILE} in the run folder (a run made before they were saved)"
        fallback = pooling.OperatingPoint(pooling.FALLBACK_THRESHOLD, "fallback", target, note)
        return fallback, fallback
    by_slice = pooling.choose_operating_point(val.targets, val.probs, rule, target)
    patients = pooling.aggregate_by_patient(val.patient_keys, val.targets, val.probs, evaluation.aggregation)
    by_patient = pooling.choose_operating_point(patients.targets, patients.probs, rule, target)
    return by_slice, by_patient


def read_run(run_dir: Path, evaluation: EvaluationSettings) -> RunData | RunSummary | None:
    """A completed run's data; its RunSummary when it did not complete; None when it never started."""
    run_dir = Path(run_dir)
    if not (run_dir / STATUS_FILE).is_file():
        return None
    status = read_model_json(run_dir / STATUS_FILE, RunSummary)
    if status.status != "completed":
        return status
    val_path = run_dir / VAL_PREDICTIONS_FILE
    val = read_predictions(val_path) if val_path.is_file() else None
    slice_point, patient_point = operating_points(val, evaluation)
    return RunData(
        run_dir=run_dir,
        status=status,
        config=read_model_json(run_dir / CONFIG_FILE, RunConfig) if (run_dir / CONFIG_FILE).is_file() else None,
        history=read_models_csv(run_dir / METRICS_FILE, EpochMetrics) if (run_dir / METRICS_FILE).is_file() else [],
        timing=read_model_json(run_dir / TIMING_FILE, TimingInfo) if (run_dir / TIMING_FILE).is_file() else None,
        test=read_predictions(run_dir / PREDICTIONS_FILE),
        val=val,
        slice_point=slice_point,
        patient_point=patient_point,
    )


def pool_runs(arm: str, runs: list[RunData], aggregation: str) -> PooledArm:
    """Concatenate the runs' test predictions; ValueError when two runs test the same patient."""
    owner: dict[str, int] = {}
    for index, run in enumerate(runs):
        for patient in set(run.test.patient_keys):
            if patient in owner:
                raise ValueError(
                    f"arm {arm!r}: runs {runs[owner[patient]].run_dir.name} and {run.run_dir.name} both test the same "
                    f"patient; pooled runs must be outer folds with disjoint test patients."
                )
            owner[patient] = index
    slices = Predictions(
        image_keys=[k for r in runs for k in r.test.image_keys],
        patient_keys=[k for r in runs for k in r.test.patient_keys],
        targets=np.concatenate([r.test.targets for r in runs]),
        probs=np.concatenate([r.test.probs for r in runs]),
    )
    slice_thresholds = np.concatenate([np.full(r.test.targets.size, r.slice_point.threshold) for r in runs])
    patients = pooling.aggregate_by_patient(slices.patient_keys, slices.targets, slices.probs, aggregation)  # type: ignore[arg-type]
    patient_thresholds = np.array([runs[owner[p]].patient_point.threshold for p in patients.patients])
    return PooledArm(slices, slice_thresholds, patients, patient_thresholds, dict(Counter(slices.patient_keys)))


def is_linear(arm: str) -> bool:
    """True for an imagenet-linear arm of any model."""
    return parse_arm(arm).mode == "imagenet-linear"
