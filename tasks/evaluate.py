"""Evaluate: the run folders of every arm -> one ComparisonResults (results.json) for the report stage.

Reads only validated files (dataset.json, splits.csv/.json, each arm's status/config/metrics/predictions/timing,
cost.json); copies aggregates only, never a patient or image key, into the results.
"""

from __future__ import annotations

import math
import platform
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from itertools import combinations
from pathlib import Path

import numpy as np

from data_schemas.cost import THIS_MACHINE, CostReport
from data_schemas.dataset import DatasetCard
from data_schemas.report import (
    ArmResult,
    ArmFolds,
    CalibrationBin,
    ComparisonResults,
    DataEfficiencyPoint,
    FoldMetrics,
    ConfusionMatrix,
    Convergence,
    ArmCostSummary,
    DatasetSummary,
    DeLongResult,
    EpochRecord,
    McNemarResult,
    MetricValue,
    PairedComparison,
    Reproducibility,
    RocPoint,
    SplitPart,
    SplitSummary,
    TestMetrics,
)
from data_schemas.training import (
    CONFIG_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    STATUS_FILE,
    TIMING_FILE,
    EpochMetrics,
    PredictionRow,
    RunConfig,
    RunSummary,
    SplitRow,
    SplitsInfo,
    TimingInfo,
)
from tasks.cost import estimated_seconds_for
from data_schemas.files import read_model_json, read_models_csv
from tasks.statistics import (
    ArmSummary,
    binary_metrics,
    bootstrap_ci,
    calibration_curve_points,
    confusion,
    delong_test,
    epochs_to_fraction_of_best,
    mcnemar_test,
    plain_words_comparison,
    recommend,
    roc_curve_points,
    seconds_to_epoch,
)


REPORTED_PACKAGES = ("ctcompare", "torch", "torchvision", "monai", "prefect", "pydicom", "scikit-learn", "numpy", "scipy")


@dataclass
class ArmPredictions:
    """Test predictions of one completed arm, aligned by image key (kept out of results.json)."""

    image_keys: list[str]
    patient_keys: list[str]
    targets: np.ndarray
    probs: np.ndarray


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide a run's numbers."""
    found = {}
    for name in REPORTED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def split_summary(rows: list[SplitRow], info: SplitsInfo) -> SplitSummary:
    """Patients and images per part and class, and the checked no-overlap flag."""
    parts = []
    for name in ("train", "val", "test"):
        part_rows = [r for r in rows if r.part == name]
        patient_label = {r.patient_key: r.label for r in part_rows}
        parts.append(SplitPart(
            name=name, n_patients=len(patient_label), n_images=len(part_rows),
            patients_per_class=dict(sorted(Counter(patient_label.values()).items())),
            images_per_class=dict(sorted(Counter(r.label for r in part_rows).items())),
        ))
    return SplitSummary(
        parts=parts, no_patient_overlap=info.patient_overlap == 0, strategy=f"{info.splitter}, grouped by patient, stratified by label",
        seed=info.seed, n_folds=info.folds,
    )


def test_metrics(predictions: ArmPredictions, n_bootstrap: int, seed: int) -> TestMetrics:
    """Point metrics with patient-level bootstrap 95% intervals."""
    point = binary_metrics(predictions.targets, predictions.probs)
    intervals = bootstrap_ci(predictions.targets, predictions.probs, predictions.patient_keys, n_resamples=n_bootstrap, seed=seed)
    values = {
        name: MetricValue(value=_finite(point[name]), ci_low=_finite(intervals[name].ci_low), ci_high=_finite(intervals[name].ci_high))
        for name in point
    }
    return TestMetrics(
        n_images=len(predictions.targets), n_patients=len(set(predictions.patient_keys)), n_bootstrap=n_bootstrap,
        n_bootstrap_skipped_auc=intervals["roc_auc"].n_skipped, **values,
    )


def _learning_curve(history: list[EpochMetrics]) -> list[EpochRecord]:
    return [
        EpochRecord(epoch=m.epoch, train_loss=m.train_loss, val_loss=m.val_loss, val_auc=m.val_auc,
                    lr=m.lr_head, seconds=m.epoch_seconds)
        for m in history
    ]


def _cost(arm: str, timing: TimingInfo | None, cost_file: CostReport | None) -> ArmCostSummary:
    if timing is None:
        return ArmCostSummary()
    estimated = None
    flops_total = None
    if cost_file is not None:
        try:
            arm_cost = cost_file.arm(arm)
            estimated = estimated_seconds_for(arm_cost, THIS_MACHINE, timing.epochs_run)
        except KeyError:
            pass
    if timing.epochs_run and arm != "imagenet-linear":
        flops_total = timing.train_flops_per_image * timing.train_images_seen
    elif arm == "imagenet-linear":
        flops_total = timing.forward_flops_per_image * timing.train_images_seen
    peak = None
    if cost_file is not None:
        for device in cost_file.devices:
            if device.name == THIS_MACHINE:
                rate = device.rates.get(timing.precision) or device.rates.get("fp32")
                peak = rate.peak_tflops * 1e12 if rate else None
    utilisation = timing.achieved_flops_per_second / peak if peak else None
    return ArmCostSummary(
        estimated_seconds=estimated, actual_seconds=timing.wall_seconds, images_per_second=timing.images_per_second,
        flops_per_image=timing.forward_flops_per_image, total_flops=flops_total,
        utilisation=None if utilisation is None else min(1.0, utilisation), device=f"{timing.device} ({timing.precision})",
    )


def read_arm(arm: str, run_dir: Path, cost_file: CostReport | None, n_bootstrap: int, seed: int) -> tuple[ArmResult, ArmPredictions | None]:
    """One arm's ArmResult (and its test predictions when it completed)."""
    status_path = run_dir / STATUS_FILE
    if not status_path.is_file():
        return ArmResult(name=arm, status="failed", reason=f"no {STATUS_FILE} in its run folder: the arm never started"), None
    status = read_model_json(status_path, RunSummary)
    config = read_model_json(run_dir / CONFIG_FILE, RunConfig) if (run_dir / CONFIG_FILE).is_file() else None
    config_dict = {} if config is None else {
        "profile": config.profile, "overrides": config.overrides, "train": config.train.model_dump(mode="json"),
        "precision": config.precision, "channels_last": config.channels_last, "device": config.device,
        "weights": None if config.weights is None else {"file": config.weights.file_name, "sha256": config.weights.sha256, "source": config.weights.source},
        "classes": config.classes, "config_hash": config.config_hash,
    }
    if status.status != "completed":
        reason = status.reason or f"the run ended as {status.status}"
        return ArmResult(name=arm, status="skipped" if status.status == "skipped" else "failed", reason=reason,
                         config=config_dict, seed=None if config is None else config.seed), None

    _, predictions = _read_predictions(run_dir)
    history = read_models_csv(run_dir / METRICS_FILE, EpochMetrics) if (run_dir / METRICS_FILE).is_file() else []
    timing = read_model_json(run_dir / TIMING_FILE, TimingInfo) if (run_dir / TIMING_FILE).is_file() else None
    val_aucs = [m.val_auc for m in history]
    epochs_to = epochs_to_fraction_of_best(val_aucs) if any(v is not None for v in val_aucs) else None
    best = next((m for m in history if m.epoch == status.best_epoch), None)
    gap = None if best is None or best.val_loss is None or best.train_loss is None else best.val_loss - best.train_loss
    classes = config.classes if config else ["negative", "positive"]
    pred = (predictions.probs >= 0.5).astype(np.int64)
    max_epochs = config.train.epochs if config else None
    result = ArmResult(
        name=arm, status="completed", config=config_dict, seed=None if config is None else config.seed,
        cost=_cost(arm, timing, cost_file),
        test_metrics=test_metrics(predictions, n_bootstrap, seed),
        learning_curve=_learning_curve(history), best_epoch=status.best_epoch,
        stopped_epoch=history[-1].epoch if history else None,
        early_stopped=bool(history and max_epochs and history[-1].epoch < max_epochs and arm != "imagenet-linear"),
        overfitting_gap=gap,
        convergence=Convergence(
            best_val_auc=_finite(max((v for v in val_aucs if v is not None), default=None)),
            epochs_to_fraction=epochs_to, seconds_to_fraction=seconds_to_epoch([m.epoch_seconds for m in history], epochs_to),
        ) if history else None,
        roc=[RocPoint(**p) for p in roc_curve_points(predictions.targets, predictions.probs)],
        calibration=[CalibrationBin(**p) for p in calibration_curve_points(predictions.targets, predictions.probs)],
        confusion=ConfusionMatrix(labels=classes, counts=confusion(predictions.targets, pred)),
    )
    return result, predictions


def paired_comparisons(predictions: dict[str, ArmPredictions]) -> tuple[list[PairedComparison], dict]:
    """DeLong and McNemar for every pair of completed arms, on the test images both predicted."""
    comparisons, delongs = [], {}
    for arm_a, arm_b in combinations(sorted(predictions), 2):
        a, b = predictions[arm_a], predictions[arm_b]
        index_b = {key: i for i, key in enumerate(b.image_keys)}
        shared = [(i, index_b[key]) for i, key in enumerate(a.image_keys) if key in index_b]
        if len(shared) < 2:
            continue
        ia, ib = np.array([s[0] for s in shared]), np.array([s[1] for s in shared])
        y = a.targets[ia]
        if y.min() == y.max():
            continue
        # Patients as clusters: a patient's slices are correlated (Obuchowski's extension of DeLong).
        patients = [a.patient_keys[i] for i in ia]
        dl = delong_test(y, a.probs[ia], b.probs[ib], groups=patients)
        mc = mcnemar_test(y, (a.probs[ia] >= 0.5).astype(int), (b.probs[ib] >= 0.5).astype(int), groups=patients)
        delongs[(arm_a, arm_b)] = dl
        comparisons.append(PairedComparison(
            arm_a=arm_a, arm_b=arm_b, delong=DeLongResult(**dl._asdict()), mcnemar=McNemarResult(**mc._asdict()),
            plain_words=plain_words_comparison(arm_a, arm_b, dl, mc),
        ))
    return comparisons, delongs


def _read_predictions(run_dir: Path) -> tuple[RunConfig | None, ArmPredictions] | None:
    """A completed run's config and test predictions; None for a run that did not complete."""
    status_path = run_dir / STATUS_FILE
    if not status_path.is_file() or read_model_json(status_path, RunSummary).status != "completed":
        return None
    rows = read_models_csv(run_dir / PREDICTIONS_FILE, PredictionRow)
    config = read_model_json(run_dir / CONFIG_FILE, RunConfig) if (run_dir / CONFIG_FILE).is_file() else None
    return config, ArmPredictions(
        image_keys=[r.image_key for r in rows], patient_keys=[r.patient_key for r in rows],
        targets=np.array([r.target for r in rows], dtype=np.int64), probs=np.array([r.prob_positive for r in rows]),
    )


def fold_summary(arm: str, fold_dirs: list[Path]) -> ArmFolds | None:
    """Test metrics of each cross-validation fold's model, and their mean and standard deviation (ddof=1)."""
    per_fold = []
    for fold, run_dir in enumerate(fold_dirs):
        found = _read_predictions(run_dir)
        if found is None:
            continue
        config, predictions = found
        metrics = {k: v for k, v in binary_metrics(predictions.targets, predictions.probs).items() if math.isfinite(v)}
        per_fold.append(FoldMetrics(fold=fold, n_train_patients=config.n_train_patients if config else None,
                                    n_test_patients=len(set(predictions.patient_keys)), metrics=metrics))
    if not per_fold:
        return None
    names = sorted(set.intersection(*(set(f.metrics) for f in per_fold)))
    values = {name: np.array([f.metrics[name] for f in per_fold]) for name in names}
    return ArmFolds(
        arm=arm, per_fold=per_fold, mean={n: float(v.mean()) for n, v in values.items()},
        std={n: float(v.std(ddof=1)) if v.size > 1 else 0.0 for n, v in values.items()},
    )


def efficiency_points(arm: str, fraction_dirs: dict[float, Path], n_bootstrap: int, seed: int) -> list[DataEfficiencyPoint]:
    """Test AUC (patient-level 95% CI) of the arm trained on each fraction of the training patients."""
    points = []
    for fraction, run_dir in sorted(fraction_dirs.items()):
        found = _read_predictions(run_dir)
        if found is None:
            continue
        config, predictions = found
        auc = bootstrap_ci(predictions.targets, predictions.probs, predictions.patient_keys, metrics=["roc_auc"], n_resamples=n_bootstrap, seed=seed)["roc_auc"]
        points.append(DataEfficiencyPoint(
            arm=arm, fraction=fraction, n_train_patients=config.n_train_patients if config else 0,
            n_train_images=config.n_train_images if config else None,
            test_auc=MetricValue(value=_finite(auc.value), ci_low=_finite(auc.ci_low), ci_high=_finite(auc.ci_high)),
        ))
    return points


def build_results(
    dataset_dir: Path,
    splits_path: Path,
    run_dirs: dict[str, Path],
    cost_path: Path | None,
    run_id: str,
    seed: int = 0,
    n_bootstrap: int = 1000,
    command: str = "",
    fold_dirs: dict[str, list[Path]] | None = None,
    fraction_dirs: dict[str, dict[float, Path]] | None = None,
) -> ComparisonResults:
    """Assemble every number of the report from the validated files of the earlier stages.

    run_dirs: the main run of each arm (fold 0, all training patients); fold_dirs: every fold's run per arm
    (--folds K); fraction_dirs: runs on fractions of the training patients per arm (--fractions).
    """
    card = read_model_json(Path(dataset_dir) / "dataset.json", DatasetCard)
    rows = read_models_csv(splits_path, SplitRow)
    info = read_model_json(splits_path.with_suffix(".json"), SplitsInfo)
    cost_file = read_model_json(cost_path, CostReport) if cost_path is not None and cost_path.is_file() else None

    arms, predictions, configs, seeds = [], {}, {}, {}
    for arm, run_dir in run_dirs.items():
        result, preds = read_arm(arm, Path(run_dir), cost_file, n_bootstrap, seed)
        arms.append(result)
        configs[arm] = result.config
        if result.seed is not None:
            seeds[arm] = result.seed
        if preds is not None:
            predictions[arm] = preds
    comparisons, delongs = paired_comparisons(predictions)
    summaries = [
        ArmSummary(
            name=a.name, status=a.status,
            auc=a.test_metrics.roc_auc.value if a.test_metrics else None,
            auc_ci=(a.test_metrics.roc_auc.ci_low, a.test_metrics.roc_auc.ci_high)
            if a.test_metrics and a.test_metrics.roc_auc.ci_low is not None else None,
            seconds=a.cost.actual_seconds, reason=a.reason,
        )
        for a in arms
    ]
    # [negative, positive] as the training stage resolved them; any run of the comparison will do.
    classes = next((a.config["classes"] for a in arms if a.config.get("classes")), sorted({r.label for r in rows}))
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return ComparisonResults(
        run_id=run_id, created_at=created,
        dataset=DatasetSummary(card=card, classes=classes, positive_class=classes[-1], name=Path(dataset_dir).name),
        split=split_summary(rows, info), arms=arms, comparisons=comparisons,
        folds=[f for arm, dirs in (fold_dirs or {}).items() if (f := fold_summary(arm, dirs)) is not None] or None,
        data_efficiency=[p for arm, dirs in (fraction_dirs or {}).items() for p in efficiency_points(arm, dirs, n_bootstrap, seed)] or None,
        recommendation=recommend(summaries, delongs),
        reproducibility=Reproducibility(
            run_id=run_id, created_at=created, dataset_hash=card.content_hash,
            ctcompare_version=package_versions().get("ctcompare", ""), package_versions=package_versions(),
            seeds={"split": info.seed, **seeds}, configs=configs, python_version=sys.version.split()[0],
            platform=platform.platform(terse=True), command=command,
        ),
    )
