"""Evaluate: the run folders of every arm -> one ComparisonResults (results.json) for the report stage.

Each arm contributes a list of runs whose test predictions are pooled: one run in hold-out mode, one run per
outer fold (disjoint test patients) in cross-validated mode. Every metric, bootstrap interval (by patient) and
paired test is computed on the pooled predictions, per slice and per patient (slice probabilities aggregated by
mean or max). Each run's decision threshold is chosen on its own validation predictions and applied unchanged to
its test predictions. Reads only validated files; copies aggregates, plus a short pseudonym prefix per test
patient for the per-patient table, never an original identifier.
"""

from __future__ import annotations

import math
import platform
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from data_schemas.cost import THIS_MACHINE, CostReport
from data_schemas.dataset import DatasetCard
from data_schemas.evaluation import EvaluationSettings
from data_schemas.files import read_model_json, read_models_csv
from data_schemas.metrics import MetricValue
from data_schemas.plan import RunPlan
from data_schemas.report import (
    ArmCostSummary,
    ArmFolds,
    ArmResult,
    ArmWeights,
    CalibrationBin,
    ComparisonResults,
    ConfusionMatrix,
    Convergence,
    DatasetSummary,
    EarlyStoppingInfo,
    EpochRecord,
    EvaluationSummary,
    FoldMetrics,
    OperatingPointChoice,
    PatientRow,
    Reproducibility,
    RocPoint,
    SplitPart,
    SplitSummary,
    TestMetrics,
)
from data_schemas.training import (
    STATUS_FILE,
    EpochMetrics,
    RunConfig,
    RunSummary,
    SplitRow,
    SplitsInfo,
    TimingInfo,
)
from tasks.cost.estimate import estimated_seconds_for
from tasks.evaluation import pooling, statistics as st
from tasks.evaluation.overfitting import run_gaps
from tasks.evaluation.runs import PooledArm, RunData, finite, is_linear, pool_runs, read_run
from tasks.evaluation.verdict import class_counts, decide, paired_comparisons
from tasks.evaluation.what_to_train import depth_points, efficiency_points, size_points, what_to_train

REPORTED_PACKAGES = (
    "ctcompare",
    "torch",
    "torchvision",
    "monai",
    "prefect",
    "pydicom",
    "scikit-learn",
    "numpy",
    "scipy",
)
PSEUDONYM_CHARS = 12
MONITOR_WHY = {
    "val_loss": "plain validation cross-entropy: it uses every validation image's probability, so it moves smoothly "
    "on a small validation set where AUC jumps with a single patient",
    "val_auc_ema": "an exponential moving average of validation AUC: smoothing keeps one noisy epoch from "
    "selecting the model or stopping training",
}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide a run's numbers."""
    found = {}
    for name in REPORTED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


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
        parts=parts, no_patient_overlap=info.patient_overlap == 0, strategy=f"{info.splitter}, grouped by patient, "
                                                                            "stratified by label",
        seed=info.seed, n_folds=info.folds,
    )


# ---------------------------------------------------------------- reading runs


# ---------------------------------------------------------------- metrics


def metric_block(
    targets: np.ndarray,
    probs: np.ndarray,
    groups: list[str],
    thresholds: np.ndarray,
    *,
    level: str,
    n_bootstrap: int,
    seed: int,
) -> TestMetrics:
    """Point metrics at the given per-unit thresholds with 95% intervals: patient-level bootstrap, except
    sensitivity, specificity and accuracy (Clopper-Pearson per patient, cluster-adjusted Wilson per slice)."""
    intervals = st.bootstrap_ci(targets, probs, groups, n_resamples=n_bootstrap, seed=seed, threshold=thresholds)
    values = {
        name: MetricValue(value=finite(iv.value), ci_low=finite(iv.ci_low), ci_high=finite(iv.ci_high))
        for name, iv in intervals.items()
    }
    if targets.size:
        for name, (low, high) in st.proportion_intervals(targets, probs, thresholds, groups).items():
            values[name] = values[name].model_copy(update={"ci_low": finite(low), "ci_high": finite(high)})
    distinct = np.unique(thresholds)
    return TestMetrics(
        level=level, n_images=int(targets.size) if level == "slice" else 0, n_patients=len(set(groups)),  # type: ignore[arg-type]
        threshold=float(distinct[0]) if distinct.size == 1 else None, n_bootstrap=n_bootstrap,
        n_bootstrap_skipped_auc=intervals["roc_auc"].n_skipped, **values,
    )


def pooled_metrics(pooled: PooledArm, n_bootstrap: int, seed: int) -> tuple[TestMetrics, TestMetrics]:
    """Slice-level and patient-level test metrics of one arm's pooled predictions."""
    s = pooled.slices
    by_slice = metric_block(
        s.targets, s.probs, s.patient_keys, pooled.slice_thresholds, level="slice", n_bootstrap=n_bootstrap, seed=seed
    )
    p = pooled.patients
    by_patient = metric_block(
        p.targets, p.probs, p.patients, pooled.patient_thresholds, level="patient", n_bootstrap=n_bootstrap, seed=seed
    )
    by_patient = by_patient.model_copy(update={"n_images": int(s.targets.size)})
    return by_slice, by_patient


def fold_summary(arm: str, runs: list[RunData], aggregation: str) -> ArmFolds | None:
    """Each outer fold's test metrics at its own threshold (slice level, plus patient AUC); mean and std (ddof=1)."""
    if len(runs) < 2:
        return None
    per_fold = []
    for fold, run in enumerate(runs):
        t = run.test
        metrics = {
            k: v
            for k, v in st.binary_metrics(t.targets, t.probs, run.slice_point.threshold).items()
            if math.isfinite(v)
        }
        patients = pooling.aggregate_by_patient(t.patient_keys, t.targets, t.probs, aggregation)  # type: ignore[arg-type]
        patient_auc = st.roc_auc(patients.targets, patients.probs)
        if math.isfinite(patient_auc):
            metrics["patient_roc_auc"] = patient_auc
        per_fold.append(
            FoldMetrics(
                fold=fold,
                n_train_patients=run.config.n_train_patients if run.config else None,
                n_test_patients=len(patients.patients),
                threshold=run.slice_point.threshold,
                metrics=metrics,
            )
        )
    names = sorted(set.intersection(*(set(f.metrics) for f in per_fold)))
    values = {name: np.array([f.metrics[name] for f in per_fold]) for name in names}
    return ArmFolds(arm=arm, per_fold=per_fold, mean={n: float(v.mean()) for n, v in values.items()},
                    std={n: float(v.std(ddof=1)) for n, v in values.items()})


def _operating_point_choice(runs: list[RunData], evaluation: EvaluationSettings) -> OperatingPointChoice:
    """The thresholds of every run and how they were chosen."""
    rules = {r.slice_point.rule for r in runs}
    source = (
        "fixed"
        if rules == {"fixed"}
        else "fallback"
        if "fallback" in rules | {r.patient_point.rule for r in runs}
        else "validation"
    )
    notes = sorted({r.slice_point.note or r.patient_point.note for r in runs} - {""})
    return OperatingPointChoice(
        rule=evaluation.operating_point,
        source=source,  # type: ignore[arg-type]
        slice_thresholds=[r.slice_point.threshold for r in runs],
        patient_thresholds=[r.patient_point.threshold for r in runs],
        note="; ".join(notes),
    )


# ---------------------------------------------------------------- one arm


def _learning_curve(history: list[EpochMetrics]) -> list[EpochRecord]:
    return [
        EpochRecord(epoch=m.epoch, train_loss=m.train_loss, val_loss=m.val_loss, train_eval_loss=m.train_eval_loss,
                    val_auc=m.val_auc, lr=m.lr_head, seconds=m.epoch_seconds)
        for m in history
    ]



def _cost(arm: str, timings: list[TimingInfo], cost_file: CostReport | None) -> ArmCostSummary:
    """Estimated and measured cost of all of an arm's runs (seconds and FLOPs summed over outer folds)."""
    if not timings:
        return ArmCostSummary()
    first = timings[0]
    estimated = None
    if cost_file is not None:
        try:
            arm_cost = cost_file.arm(arm)
            estimated = sum(estimated_seconds_for(arm_cost, THIS_MACHINE, t.epochs_run) for t in timings)
        except KeyError:
            pass
    per_image = (lambda t: t.forward_flops_per_image) if is_linear(arm) else (lambda t: t.train_flops_per_image)
    flops_total = sum(per_image(t) * t.train_images_seen for t in timings)
    peak = None
    for device in cost_file.devices if cost_file is not None else []:
        if device.name == THIS_MACHINE:
            rate = device.rates.get(first.precision) or device.rates.get("fp32")
            peak = rate.peak_tflops * 1e12 if rate else None
    utilisation = first.achieved_flops_per_second / peak if peak else None
    return ArmCostSummary(
        estimated_seconds=estimated,
        actual_seconds=sum(t.wall_seconds for t in timings),
        images_per_second=first.images_per_second,
        flops_per_image=first.forward_flops_per_image,
        total_flops=flops_total or None,
        utilisation=None if utilisation is None else min(1.0, utilisation),
        device=f"{first.device} ({first.precision})",
    )


def _config_dict(config: RunConfig | None) -> dict:
    """The shareable part of a run's config.json."""
    if config is None:
        return {}
    return {
        "profile": config.profile,
        "overrides": config.overrides,
        "train": config.train.model_dump(mode="json"),
        "precision": config.precision,
        "channels_last": config.channels_last,
        "device": config.device,
        "weights": None
        if config.weights is None
        else {"file": config.weights.file_name, "sha256": config.weights.sha256, "source": config.weights.source},
        "classes": config.classes,
        "config_hash": config.config_hash,
    }


def _arm_weights(config: RunConfig | None) -> ArmWeights | None:
    """The weights file of a run's config.json by name and hash (its path stays out of results.json)."""
    if config is None or config.weights is None:
        return None
    w = config.weights
    return ArmWeights(file_name=w.file_name, sha256=w.sha256, source=w.source, hash_checked=w.hash_checked)


def _training_story(arm: str, run: RunData) -> dict:
    """Learning curve, best and stopping epoch, like-for-like overfitting gap and early-stopping monitor of one run."""
    history, config = run.history, run.config
    val_aucs = [m.val_auc for m in history]
    epochs_to = st.epochs_to_fraction_of_best(val_aucs) if any(v is not None for v in val_aucs) else None
    best = next((m for m in history if m.epoch == run.status.best_epoch), None)
    # Like for like: plain eval-mode cross-entropy on both sides (train_loss carries smoothing, weights, augmentation).
    gap = (
        None
        if best is None or best.val_loss is None or best.train_eval_loss is None
        else best.val_loss - best.train_eval_loss
    )
    max_epochs = config.train.epochs if config else None
    stopping = None if config is None or is_linear(arm) else EarlyStoppingInfo(
        monitor=config.train.early_stopping_monitor, patience=config.train.early_stopping_patience,
        min_epochs=config.train.min_epochs, why=MONITOR_WHY.get(config.train.early_stopping_monitor, ""),
    )
    return dict(
        learning_curve=_learning_curve(history),
        best_epoch=run.status.best_epoch,
        stopped_epoch=history[-1].epoch if history else None,
        early_stopped=bool(history and max_epochs and history[-1].epoch < max_epochs and not is_linear(arm)),
        overfitting_gap=gap,
        early_stopping=stopping,
        convergence=Convergence(
            best_val_auc=finite(max((v for v in val_aucs if v is not None), default=None)),
            epochs_to_fraction=epochs_to,
            seconds_to_fraction=st.seconds_to_epoch([m.epoch_seconds for m in history], epochs_to),
        )
        if history
        else None,
    )


def read_arm(
    arm: str, run_dirs: list[Path], evaluation: EvaluationSettings, cost_file: CostReport | None, seed: int
) -> tuple[ArmResult, PooledArm | None, list[RunData]]:
    """One arm's ArmResult from its pooled runs, with the pooled predictions when every run completed."""
    found = [read_run(Path(d), evaluation) for d in run_dirs]
    configs = [f.config if isinstance(f, RunData) else None for f in found]
    config = next((c for c in configs if c is not None), None)
    common = dict(
        name=arm,
        config=_config_dict(config),
        seed=None if config is None else config.seed,
        n_runs=len(run_dirs),
        profile="" if config is None else config.profile,
        weights=_arm_weights(config),
    )
    unfinished = [(i, f) for i, f in enumerate(found) if not isinstance(f, RunData)]
    if not run_dirs or unfinished:
        where = (lambda i: f"run {i + 1} of {len(run_dirs)}: ") if len(run_dirs) > 1 else (lambda i: "")
        i, summary = unfinished[0] if unfinished else (0, None)
        if summary is None:
            reason = f"{where(i)}no {STATUS_FILE} in its run folder: the arm never started"
        else:
            reason = where(i) + (summary.reason or f"the run ended as {summary.status}")
        skipped = bool(unfinished) and all(isinstance(f, RunSummary) and f.status == "skipped" for _, f in unfinished)
        return ArmResult(status="skipped" if skipped else "failed", reason=reason, **common), None, []
    runs: list[RunData] = found  # type: ignore[assignment]
    pooled = pool_runs(arm, runs, evaluation.aggregation)
    by_slice, by_patient = pooled_metrics(pooled, evaluation.n_bootstrap, seed)
    s = pooled.slices
    pred = (s.probs >= pooled.slice_thresholds).astype(np.int64)
    classes = config.classes if config else ["negative", "positive"]
    result = ArmResult(
        status="completed", cost=_cost(arm, [r.timing for r in runs if r.timing is not None], cost_file),
        test_metrics=by_slice, patient_metrics=by_patient, operating_point=_operating_point_choice(runs, evaluation),
        roc=[RocPoint(**p) for p in st.roc_curve_points(s.targets, s.probs)],
        calibration=[CalibrationBin(**p) for p in st.calibration_curve_points(s.targets, s.probs)],
        confusion=ConfusionMatrix(labels=classes, counts=st.confusion(s.targets, pred), threshold=by_slice.threshold),
        overfitting=[gap for fold, run in enumerate(runs) for gap in run_gaps(run, fold, evaluation.n_bootstrap, seed)],
        **_training_story(arm, runs[0]), **common,
    )
    return result, pooled, runs


def patient_table(pooled: dict[str, PooledArm], classes: list[str]) -> list[PatientRow]:
    """One row per pooled test patient: pseudonym prefix, label, images, probability and right/wrong per arm."""
    rows: dict[str, PatientRow] = {}
    for arm in sorted(pooled):
        p = pooled[arm]
        for i, key in enumerate(p.patients.patients):
            row = rows.setdefault(
                key,
                PatientRow(
                    pseudonym=key[:PSEUDONYM_CHARS],
                    label=classes[int(p.patients.targets[i])],
                    n_images=p.patient_images[key],
                ),
            )
            row.probs[arm] = round(float(p.patients.probs[i]), 4)
            row.correct[arm] = bool((p.patients.probs[i] >= p.patient_thresholds[i]) == bool(p.patients.targets[i]))
    return [rows[k] for k in sorted(rows)]



# ---------------------------------------------------------------- assembly


def _evaluation_summary(evaluation: EvaluationSettings, arms: list[ArmResult], rows: list[SplitRow],
                        info: SplitsInfo) -> EvaluationSummary:
    """How the numbers were produced (reports.wording says it in words)."""
    done = [a for a in arms if a.status == "completed" and a.patient_metrics is not None]
    summary = EvaluationSummary(
        mode=evaluation.mode, runs_per_arm={a.name: a.n_runs for a in arms}, aggregation=evaluation.aggregation,
        operating_point=evaluation.operating_point, non_inferiority_margin=evaluation.non_inferiority_margin,
        n_bootstrap=evaluation.n_bootstrap, n_test_patients=done[0].patient_metrics.n_patients if done else 0,  # type: ignore[union-attr]
        n_test_images=done[0].patient_metrics.n_images if done else 0,  # type: ignore[union-attr]
        n_labelled_patients=len({r.patient_key for r in rows}), holdout_test_fraction=info.test_fraction,
    )
    return summary


def _check_runs(arm_runs: dict[str, list[Path]], evaluation: EvaluationSettings) -> None:
    """Refuse run lists that do not match the evaluation mode."""
    if evaluation.mode == "holdout":
        several = sorted(arm for arm, dirs in arm_runs.items() if len(dirs) > 1)
        if several:
            raise ValueError(f"hold-out mode scores one run per arm, but {', '.join(several)} has several; "
                             f"use mode 'cross-validated' to pool outer folds.")


@dataclass(frozen=True)
class ArmRunFolders:
    """The run folders a comparison scores, per arm.

    Args:
        pooled: the runs whose test predictions are pooled (one in hold-out mode, the outer folds in cross-validated
            mode); imagenet-linear arms' probe_depths.json (first run) gives AUC against depth.
        fractions: runs on fractions of the training patients, by fraction (--fractions).
        sizes: runs at each training image size, by size (--sizes).
    """

    pooled: dict[str, list[Path]]
    fractions: dict[str, dict[float, Path]] | None = None
    sizes: dict[str, dict[int, Path]] | None = None

    @classmethod
    def of_plan(cls, plan: RunPlan, report_dir: Path) -> ArmRunFolders:
        """A comparison plan's run folders under report_dir: fractions when an arm has several, sizes when planned."""
        fractions = {a: {r.train_fraction: report_dir / r.run_dir for r in plan.fraction_runs(a)} for a in plan.arms}
        sizes = {a: {r.config.image_size: report_dir / r.run_dir for r in plan.size_runs(a)} for a in plan.arms}
        return cls(pooled={arm: [report_dir / r.run_dir for r in plan.pooled_runs(arm)] for arm in plan.arms},
                   fractions=fractions if any(len(runs) > 1 for runs in fractions.values()) else None,
                   sizes=sizes if plan.sizes else None)


def build_results(
    *,
    dataset_dir: Path,
    splits_path: Path,
    runs: ArmRunFolders,
    evaluation: EvaluationSettings,
    cost_path: Path,
    run_id: str,
    seed: int,
    command: str,
) -> ComparisonResults:
    """Assemble every number of the report from the validated files of the earlier stages (runs: which run folders
    are pooled, and which make the data-efficiency and input-size curves)."""
    _check_runs(runs.pooled, evaluation)
    card = read_model_json(Path(dataset_dir) / "dataset.json", DatasetCard)
    rows = read_models_csv(splits_path, SplitRow)
    info = read_model_json(splits_path.with_suffix(".json"), SplitsInfo)
    cost_file = read_model_json(cost_path, CostReport) if cost_path is not None and Path(cost_path).is_file() else None
    arms, pooled, folds = _read_arms(runs.pooled, evaluation, cost_file, seed)
    comparisons, tests = paired_comparisons(pooled)
    # [negative, positive] as the training stage resolved them; any run of the comparison will do.
    classes = next((a.config["classes"] for a in arms if a.config.get("classes")), sorted({r.label for r in rows}))
    sizes = [p for arm, dirs in (runs.sizes or {}).items() for p in size_points(arm, dirs, evaluation, seed)]
    depths = [p for arm, dirs in runs.pooled.items() if dirs for p in depth_points(arm, Path(dirs[0]))]
    efficiency = [p for arm, dirs in (runs.fractions or {}).items()
                  for p in efficiency_points(arm, dirs, evaluation, seed)]
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return ComparisonResults(
        run_id=run_id,
        created_at=created,
        dataset=DatasetSummary(card=card, classes=classes, positive_class=classes[-1], name=Path(dataset_dir).name),
        split=split_summary(rows, info),
        evaluation=_evaluation_summary(evaluation, arms, rows, info),
        arms=arms,
        comparisons=comparisons,
        patients=patient_table(pooled, classes),
        folds=folds or None,
        data_efficiency=efficiency or None,
        input_sizes=sizes or None,
        probe_depths=depths or None,
        predicted_wall_time=cost_file.wall_time if cost_file is not None else None,
        what_to_train=what_to_train(arms, comparisons, evaluation.non_inferiority_margin, sizes, depths),
        recommendation=decide(arms, tests, evaluation.non_inferiority_margin, *class_counts(pooled)),
        reproducibility=_reproducibility(run_id=run_id, created_at=created, card=card, info=info, arms=arms,
                                         command=command),
    )


def _read_arms(arm_runs: dict[str, list[Path]], evaluation: EvaluationSettings, cost_file: CostReport | None,
               seed: int) -> tuple[list[ArmResult], dict[str, PooledArm], list[ArmFolds]]:
    """Every arm's result, the pooled predictions of the arms that have some, and their per-fold summaries."""
    arms, pooled, folds = [], {}, []
    for arm, run_dirs in arm_runs.items():
        result, pooled_arm, runs = read_arm(arm, list(run_dirs), evaluation, cost_file, seed)
        arms.append(result)
        if pooled_arm is not None:
            pooled[arm] = pooled_arm
            if (summary := fold_summary(arm, runs, evaluation.aggregation)) is not None:
                folds.append(summary)
    return arms, pooled, folds


def _reproducibility(*, run_id: str, created_at: str, card: DatasetCard, info: SplitsInfo, arms: list[ArmResult],
                     command: str) -> Reproducibility:
    """What is needed to rerun the comparison and to check that a rerun matched."""
    versions = package_versions()
    return Reproducibility(
        run_id=run_id,
        created_at=created_at,
        dataset_hash=card.content_hash,
        ctcompare_version=versions.get("ctcompare", ""),
        package_versions=versions,
        seeds={"split": info.seed, **{a.name: a.seed for a in arms if a.seed is not None}},
        configs={a.name: a.config for a in arms},
        python_version=sys.version.split()[0],
        platform=platform.platform(terse=True),
        command=command,
    )
