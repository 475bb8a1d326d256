"""Factory of realistic ComparisonResults from synthetic predictions, for report and flow tests."""

from __future__ import annotations

import numpy as np

from data_schemas.dataset import DatasetCard, DatasetFingerprint, NumericSummary, WindowSpec
from data_schemas.report import (
    ArmFolds,
    ArmResult,
    CalibrationBin,
    ComparisonResults,
    Convergence,
    ConfusionMatrix,
    ArmCostSummary,
    DataEfficiencyPoint,
    DatasetSummary,
    DeLongResult,
    EpochRecord,
    FoldMetrics,
    McNemarResult,
    MetricValue,
    PairedComparison,
    Reproducibility,
    RocPoint,
    SplitPart,
    SplitSummary,
    TestMetrics,
)
from tasks import statistics as st

SKIP_REASON = (
    "no ImageNet weights file found; put resnet50-11ad3fa6.pth in $TORCH_HOME/hub/checkpoints "
    "or pass --weights PATH"
)


def make_example_card(content_hash: str = "ab12cd34" * 8) -> DatasetCard:
    """A plausible dataset.json for 120 patients, 1440 images."""
    summary = NumericSummary(count=1440, min=0.6, p05=0.65, median=0.74, p95=0.9, max=0.98, mean=0.75, std=0.07)
    return DatasetCard(
        created_at="2025-01-01T10:00:00+00:00",
        ctcompare_version="0.1.0",
        image_size=224,
        value_mapping="HU window [-160, 240] -> [0, 1]",
        window=WindowSpec(name="abdomen", level=40, width=400),
        interpolation="area",
        padding="centre pad with 0 to square",
        n_images=1440,
        n_patients=120,
        n_studies=124,
        n_series=130,
        n_files_seen=1460,
        n_files_ingested=1440,
        n_files_quarantined=20,
        quarantine_reasons={"not_ct": 12, "no_pixel_data": 5, "truncated": 3},
        labels_source="PatientID",
        label_distribution={"normal": 760, "lesion": 680},
        n_unlabeled_images=0,
        fingerprint=DatasetFingerprint(
            matrix_sizes={"512x512": 1400, "768x768": 40},
            pixel_spacing_mm=summary,
            slice_thickness_mm=NumericSummary(count=1440, min=1.0, median=2.5, max=5.0, mean=2.7, std=1.1),
            hounsfield_units=NumericSummary(count=144000, min=-1024, p05=-1000, median=20, p95=300, max=3071),
            manufacturers={"SIEMENS": 900, "GE MEDICAL SYSTEMS": 540},
            transfer_syntaxes={"1.2.840.10008.1.2.1": 1300, "1.2.840.10008.1.2.4.90": 140},
            kvp=NumericSummary(count=1440, min=100, median=120, max=140, mean=118, std=8),
        ),
        content_hash=content_hash,
    )


def _metric_values(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> tuple[TestMetrics, int]:
    """TestMetrics with bootstrap CIs of synthetic predictions."""
    ci = st.bootstrap_ci(y, p, groups, n_resamples=100, seed=0)
    values = {k: MetricValue(value=iv.value, ci_low=iv.ci_low, ci_high=iv.ci_high) for k, iv in ci.items()}
    return (
        TestMetrics(
            n_images=int(y.size),
            n_patients=int(np.unique(groups).size),
            n_bootstrap=100,
            n_bootstrap_skipped_auc=ci["roc_auc"].n_skipped,
            **values,
        ),
        ci["roc_auc"].n_skipped,
    )


def _curve(n_epochs: int, final_auc: float, speed: float, seconds: float) -> list[EpochRecord]:
    """A learning curve that rises to final_auc and starts overfitting near the end."""
    out = []
    for e in range(1, n_epochs + 1):
        frac = 1 - np.exp(-speed * e)
        train_loss = 0.7 - 0.5 * frac - 0.01 * e
        val_loss = 0.7 - 0.4 * frac + 0.004 * max(0, e - n_epochs + 4) ** 2
        out.append(
            EpochRecord(
                epoch=e,
                train_loss=round(train_loss, 4),
                val_loss=round(val_loss, 4),
                train_auc=round(min(0.999, 0.5 + (final_auc - 0.45) * frac + 0.005 * e), 4),
                val_auc=round(0.5 + (final_auc - 0.5) * frac - 0.004 * max(0, e - n_epochs + 4) ** 2, 4),
                lr=1e-3 * 0.5 * (1 + np.cos(np.pi * (e - 1) / n_epochs)),
                seconds=seconds,
            )
        )
    return out


def _arm(
    name: str, y: np.ndarray, p: np.ndarray, groups: np.ndarray, seed: int, speed: float, secs: float, stop: int
) -> ArmResult:
    """A completed arm with every section filled in from synthetic predictions; trained `stop` of 12 epochs."""
    metrics, _ = _metric_values(y, p, groups)
    curve = _curve(12, metrics.roc_auc.value or 0.5, speed, secs)[:stop]
    best = max(curve, key=lambda r: r.val_auc or 0)
    epochs = st.epochs_to_fraction_of_best([r.val_auc for r in curve], 0.95)
    pred = (p >= 0.5).astype(int)
    return ArmResult(
        name=name,
        status="completed",
        config={"pretrained": name == "imagenet", "lr": 1e-3, "batch_size": 32, "epochs": 12, "optimizer": "AdamW"},
        seed=seed,
        cost=ArmCostSummary(
            estimated_seconds=secs * 11,
            actual_seconds=secs * stop,
            estimated_images_per_second=95.0,
            images_per_second=88.0,
            flops_per_image=4.1e9,
            total_flops=4.1e9 * 3 * 1000 * 12,
            utilisation=0.31,
            device="cpu",
        ),
        test_metrics=metrics,
        learning_curve=curve,
        best_epoch=best.epoch,
        stopped_epoch=stop,
        early_stopped=stop < 12,
        overfitting_gap=round((best.val_loss or 0) - (best.train_loss or 0), 4),
        convergence=Convergence(
            fraction=0.95,
            best_val_auc=best.val_auc,
            epochs_to_fraction=epochs,
            seconds_to_fraction=st.seconds_to_epoch([r.seconds for r in curve], epochs),
        ),
        roc=[RocPoint(**pt) for pt in st.roc_curve_points(y, p, max_points=60)],
        calibration=[CalibrationBin(**b) for b in st.calibration_curve_points(y, p)],
        confusion=ConfusionMatrix(labels=["normal", "lesion"], counts=st.confusion(y, pred)),
    )


def _part(name: str, patients: dict[str, int], images: dict[str, int]) -> SplitPart:
    """One split part from per-class counts."""
    return SplitPart(
        name=name,  # type: ignore[arg-type]
        n_patients=sum(patients.values()),
        n_images=sum(images.values()),
        patients_per_class=patients,
        images_per_class=images,
    )


def make_example_results(
    run_id: str = "20250101-120000-example",
    created_at: str = "2025-01-01T12:00:00+00:00",
    skip_imagenet: bool = False,
    with_folds: bool = True,
    with_data_efficiency: bool = True,
    seed: int = 0,
) -> ComparisonResults:
    """A complete ComparisonResults: scratch vs imagenet (or imagenet skipped), from synthetic predictions."""
    rng = np.random.default_rng(seed)
    n_patients, per = 24, 6
    labels = np.array([0, 1] * (n_patients // 2))
    y = np.repeat(labels, per)
    groups = np.repeat(np.arange(n_patients), per)
    noise = rng.normal(0, 1, y.size)
    p_scratch = 1 / (1 + np.exp(-(0.7 * (2 * y - 1) + 1.1 * noise)))
    p_imagenet = 1 / (1 + np.exp(-(1.2 * (2 * y - 1) + 0.8 * noise + 0.7 * rng.normal(0, 1, y.size))))

    card = make_example_card()
    scratch = _arm("scratch", y, p_scratch, groups, seed=1, speed=0.25, secs=50.0, stop=12)
    arms = [scratch]
    comparisons: list[PairedComparison] = []
    if skip_imagenet:
        arms.append(ArmResult(name="imagenet", status="skipped", reason=SKIP_REASON, config={"pretrained": True}))
    else:
        imagenet = _arm("imagenet", y, p_imagenet, groups, seed=1, speed=0.6, secs=52.0, stop=10)
        arms.append(imagenet)
        dl = st.delong_test(y, p_imagenet, p_scratch)
        mc = st.mcnemar_test(y, (p_imagenet >= 0.5).astype(int), (p_scratch >= 0.5).astype(int))
        comparisons.append(
            PairedComparison(
                arm_a="imagenet",
                arm_b="scratch",
                delong=DeLongResult(**dl._asdict()),
                mcnemar=McNemarResult(**mc._asdict()),
                plain_words=st.plain_words_comparison("imagenet", "scratch", dl, mc),
            )
        )
    summaries = [
        st.ArmSummary(
            a.name,
            a.status,
            a.test_metrics.roc_auc.value if a.test_metrics else None,
            (a.test_metrics.roc_auc.ci_low, a.test_metrics.roc_auc.ci_high) if a.test_metrics else None,
            a.cost.actual_seconds,
            a.reason,
        )
        for a in arms
    ]
    delongs = {
        (c.arm_a, c.arm_b): st.DeLongTest(**c.delong.model_dump()) for c in comparisons if c.delong is not None
    }
    completed = [a.name for a in arms if a.status == "completed"]

    folds = None
    if with_folds:
        folds = []
        for k, name in enumerate(completed):
            per_fold = [
                FoldMetrics(
                    fold=f,
                    n_train_patients=80,
                    n_test_patients=20,
                    metrics={"roc_auc": 0.8 + 0.05 * k + 0.01 * f, "accuracy": 0.74 + 0.04 * k + 0.01 * f},
                )
                for f in range(5)
            ]
            keys = per_fold[0].metrics
            folds.append(
                ArmFolds(
                    arm=name,
                    per_fold=per_fold,
                    mean={m: float(np.mean([f.metrics[m] for f in per_fold])) for m in keys},
                    std={m: float(np.std([f.metrics[m] for f in per_fold], ddof=1)) for m in keys},
                )
            )
    efficiency = None
    if with_data_efficiency:
        efficiency = [
            DataEfficiencyPoint(
                arm=name,
                fraction=frac,
                n_train_patients=int(80 * frac),
                test_auc=MetricValue(
                    value=auc, ci_low=auc - 0.1 * (1.2 - frac), ci_high=min(1.0, auc + 0.1 * (1.2 - frac))
                ),
            )
            for k, name in enumerate(completed)
            for frac in (0.25, 0.5, 1.0)
            for auc in [0.62 + 0.12 * k * (1 - frac) + 0.2 * frac]
        ]

    return ComparisonResults(
        run_id=run_id,
        created_at=created_at,
        dataset=DatasetSummary(card=card, classes=["normal", "lesion"], positive_class="lesion", name="example-ct"),
        split=SplitSummary(
            parts=[
                _part("train", {"normal": 38, "lesion": 34}, {"normal": 456, "lesion": 408}),
                _part("val", {"normal": 13, "lesion": 11}, {"normal": 152, "lesion": 136}),
                _part("test", {"normal": 12, "lesion": 12}, {"normal": 72, "lesion": 72}),
            ],
            no_patient_overlap=True,
            strategy="patient-level, stratified by label",
            seed=0,
        ),
        arms=arms,
        comparisons=comparisons,
        folds=folds,
        data_efficiency=efficiency,
        recommendation=st.recommend(summaries, delongs),
        reproducibility=Reproducibility(
            run_id=run_id,
            created_at=created_at,
            dataset_hash=card.content_hash,
            ctcompare_version="0.1.0",
            package_versions={"torch": "2.14.1", "torchvision": "0.29.1", "monai": "1.6.1", "numpy": "2.4.6"},
            seeds={"split": 0, **{a.name: a.seed for a in arms if a.seed is not None}},
            configs={a.name: a.config for a in arms},
            config_hash="0f" * 32,
            python_version="3.12.3",
            platform="Linux-x86_64",
            command="ctcompare compare --dataset DATASET --epochs 12",
        ),
    )
