"""Run folders written directly with the schemas, and ComparisonResults built from them by the real evaluation
stage (tasks.evaluation.evaluate.build_results), for evaluation, report and flow tests. No training code is involved."""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_schemas.dataset import DatasetCard, DatasetFingerprint, NumericSummary, WindowSpec
from data_schemas.evaluation import EvaluationSettings
from data_schemas.files import write_model_json, write_models_csv
from data_schemas.report import ComparisonResults
from data_schemas.training import (
    CONFIG_FILE,
    METRICS_FILE,
    OVERFITTING_LOSSES_FILE,
    PREDICTIONS_FILE,
    SPLITS_FILE,
    SPLITS_INFO_FILE,
    STATUS_FILE,
    TIMING_FILE,
    VAL_PREDICTIONS_FILE,
    EpochMetrics,
    OverfittingLossRow,
    PartCounts,
    PredictionRow,
    RunConfig,
    RunSummary,
    SplitRow,
    SplitsInfo,
    TimingInfo,
    TrainConfig,
)
from reports.wording import word_results
from tasks.evaluation.evaluate import ArmRunFolders, build_results

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


CLASSES = ["normal", "lesion"]
ARM_STRENGTH = {"scratch": 0.7, "imagenet": 1.3, "imagenet-linear": 0.9}
ARM_SECONDS = {"scratch": 600.0, "imagenet": 640.0, "imagenet-linear": 90.0}


@dataclass
class Patient:
    """A synthetic test or validation patient: pseudonymous key, label, slice count and a patient effect."""

    key: str
    target: int
    n_slices: int
    effect: float


def make_patients(n: int, *, seed: int, prefix: str = "p", slices: tuple[int, int] = (3, 6)) -> list[Patient]:
    """n patients, alternating labels, 3 to 6 slices each, with a shared per-patient effect (clustered slices)."""
    rng = np.random.default_rng(seed)
    return [
        Patient(
            f"{prefix}{i:03d}" + "ab" * 16,
            i % 2,
            int(rng.integers(slices[0], slices[1] + 1)),
            float(rng.normal(0, 0.6)),
        )
        for i in range(n)
    ]


def prediction_rows(patients: list[Patient], strength: float, seed: int) -> list[PredictionRow]:
    """Slice predictions: logit = strength (2y - 1) + patient effect + slice noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in patients:
        for j in range(p.n_slices):
            logit = strength * (2 * p.target - 1) + p.effect + rng.normal(0, 1.0)
            rows.append(PredictionRow(image_key=f"{p.key[:8]}-img{j}", patient_key=p.key, label=CLASSES[p.target],
                                      target=p.target, prob_positive=float(1 / (1 + np.exp(-logit)))))
    return rows


def _history(epochs: int, best: int) -> list[EpochMetrics]:
    """A learning curve whose validation loss is lowest at `best`."""
    return [
        EpochMetrics(
            epoch=e,
            phase="full",
            train_loss=0.8 - 0.05 * e,
            val_loss=0.7 - 0.04 * min(e, best) + 0.02 * max(0, e - best),
            train_eval_loss=0.68 - 0.05 * e,
            val_auc=0.6 + 0.03 * min(e, best),
            lr_head=1e-3,
            epoch_seconds=10.0,
            elapsed_seconds=10.0 * e,
            is_best=e == best,
        )
        for e in range(1, epochs + 1)
    ]


def loss_rows(val: list[Patient], seed: int, *, chosen: int = 5, last: int = 8) -> list[OverfittingLossRow]:
    """Per-image losses of a run that overfits after its chosen epoch: training losses fall, validation ones rise."""
    rng = np.random.default_rng(seed)
    train = make_patients(20, seed=seed + 7, prefix="t")
    means = {("chosen", "train"): 0.43, ("chosen", "val"): 0.60, ("last", "train"): 0.28, ("last", "val"): 0.75}
    return [
        OverfittingLossRow(
            epoch=chosen if role == "chosen" else last,
            role=role,
            part=part,
            patient_key=p.key,
            loss=float(rng.gamma(4.0, mean / 4.0)),
        )
        for (role, part), mean in means.items()
        for p in (train if part == "train" else val)
        for _ in range(p.n_slices)
    ]


def write_run(run_dir: Path, *, arm: str, test: list[Patient], val: list[Patient] | None, seed: int,
              status: str = "completed", reason: str = "", n_train_patients: int = 80) -> Path:
    """A run folder as the training stage writes it: status, config, metrics, timing, test and validation predictions.

    val None: a run made before validation predictions were saved (no val_predictions.csv).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    train = TrainConfig(image_size=32, epochs=8, batch_size=8, lr=1e-3)
    config = RunConfig(
        arm=arm,
        profile="smoke",
        seed=seed,
        fold=0,
        folds=1,
        train=train,
        dataset_hash="ab12cd34" * 8,
        dataset_image_size=32,
        splits_path="splits.csv",
        splits_sha256="0" * 64,
        classes=CLASSES,
        positive_label=CLASSES[1],
        n_train_images=400,
        n_val_images=60,
        n_test_images=sum(p.n_slices for p in test),
        n_train_patients=n_train_patients,
        n_val_patients=len(val or []),
        n_test_patients=len(test),
        patient_overlap=0,
        device="cpu",
        precision="fp32",
        channels_last=False,
        num_threads=1,
        torch_version="2",
        torchvision_version="0",
        config_hash="c" * 64,
        created_at="2025-01-01T10:00:00+00:00",
    )
    write_model_json(run_dir / CONFIG_FILE, config)
    if status != "completed":
        write_model_json(
            run_dir / STATUS_FILE,
            RunSummary(arm=arm, status=status, reason=reason, run_dir=str(run_dir), updated_at="t"),
        )
        return run_dir
    strength = ARM_STRENGTH.get(arm, 1.0)
    write_models_csv(run_dir / PREDICTIONS_FILE, prediction_rows(test, strength, seed), PredictionRow)
    if val is not None:
        write_models_csv(run_dir / VAL_PREDICTIONS_FILE, prediction_rows(val, strength, seed + 1000), PredictionRow)
    if val is not None:
        write_models_csv(run_dir / OVERFITTING_LOSSES_FILE, loss_rows(val, seed), OverfittingLossRow)
    history = _history(8, best=5)
    write_models_csv(run_dir / METRICS_FILE, history, EpochMetrics)
    seconds = ARM_SECONDS.get(arm, 100.0)
    write_model_json(
        run_dir / TIMING_FILE,
        TimingInfo(
            wall_seconds=seconds,
            train_seconds=seconds * 0.9,
            eval_seconds=seconds * 0.1,
            epochs_run=8,
            train_images_seen=3200,
            images_per_second=40.0,
            forward_flops_per_image=4.1e9,
            train_flops_per_image=1.23e10,
            achieved_flops_per_second=5e11,
            device="cpu",
            precision="fp32",
        ),
    )
    write_model_json(run_dir / STATUS_FILE, RunSummary(arm=arm, status="completed", run_dir=str(run_dir), epochs_run=8,
                                                       best_epoch=5, updated_at="2025-01-01T10:00:00+00:00"))
    return run_dir


def write_dataset_and_split(root: Path, test: list[Patient], others: list[Patient]) -> tuple[Path, Path]:
    """dataset.json and splits.csv/.json: `test` in the test part, `others` split between train and val."""
    dataset_dir = root / "dataset"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    write_model_json(dataset_dir / "dataset.json", make_example_card())
    rows = [
        SplitRow(
            image_key=f"{p.key[:8]}-img{j}",
            patient_key=p.key,
            label=CLASSES[p.target],
            part=part,
            fold=None if part == "test" else 0,
        )
        for group, part in ((test, "test"), (others[: len(others) // 5], "val"), (others[len(others) // 5 :], "train"))
        for p in group
        for j in range(p.n_slices)
    ]
    splits = root / SPLITS_FILE
    write_models_csv(splits, rows, SplitRow)
    parts = {
        part: PartCounts(
            images=sum(1 for r in rows if r.part == part),
            patients=len({r.patient_key for r in rows if r.part == part}),
            labels={},
        )
        for part in ("train", "val", "test")
    }
    write_model_json(
        root / SPLITS_INFO_FILE,
        SplitsInfo(
            dataset_hash="ab12cd34" * 8,
            seed=0,
            val_fraction=0.15,
            test_fraction=0.15,
            folds=1,
            splitter="StratifiedGroupKFold",
            parts=parts,
            n_unlabeled_excluded=0,
            patient_overlap=0,
            splits_sha256="0" * 64,
            created_at="2025-01-01T10:00:00+00:00",
        ),
    )
    return dataset_dir, splits


def write_comparison(
    root: Path,
    *,
    arms: tuple[str, ...],
    mode: str,
    folds: int = 3,
    n_patients: int = 36,
    seed: int = 0,
    skip: tuple[str, ...] = (),
    without_val: bool = False,
) -> tuple[Path, Path, dict[str, list[Path]]]:
    """Dataset, split and run folders of a comparison: one run per arm (holdout) or `folds` outer folds
    (cross-validated)."""
    patients = make_patients(n_patients, seed=seed)
    val = make_patients(16, seed=seed + 1, prefix="v")
    if mode == "holdout":
        groups = [patients[: n_patients // 3]]
    else:
        groups = [patients[k::folds] for k in range(folds)]
    tested = [p for g in groups for p in g]
    dataset_dir, splits = write_dataset_and_split(root, groups[0], [p for p in patients if p not in groups[0]] + val)
    arm_runs: dict[str, list[Path]] = {}
    for a, arm in enumerate(arms):
        arm_runs[arm] = [
            write_run(
                root / "runs" / arm / f"fold-{k}",
                arm=arm,
                test=group,
                val=None if without_val else val,
                seed=seed + 10 * a + k,
                status="skipped" if arm in skip else "completed",
                reason=SKIP_REASON if arm in skip else "",
            )
            for k, group in enumerate(groups)
        ]
    assert len({p.key for p in tested}) == len(tested)
    return dataset_dir, splits, arm_runs


@functools.lru_cache(maxsize=8)  # the same arguments give the same (immutable, copied-on-update) results
def make_example_results(
    run_id: str = "20250101-120000-example",
    created_at: str = "2025-01-01T12:00:00+00:00",
    skip_imagenet: bool = False,
    with_folds: bool = True,
    with_data_efficiency: bool = True,
    seed: int = 0,
) -> ComparisonResults:
    """A complete ComparisonResults built by build_results from synthetic run folders: scratch vs imagenet (or imagenet
    skipped), cross-validated over 3 outer folds when with_folds, else hold-out."""
    mode = "cross-validated" if with_folds else "holdout"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset_dir, splits, arm_runs = write_comparison(root, arms=("scratch", "imagenet"), mode=mode, seed=seed,
                                                         skip=("imagenet",) if skip_imagenet else ())
        fractions = None
        if with_data_efficiency:
            test = make_patients(36, seed=seed)[:12]
            fractions = {
                arm: {
                    f: write_run(
                        root / "fractions" / arm / f"{f:g}",
                        arm=arm,
                        test=test,
                        val=None,
                        seed=seed + int(100 * f),
                        n_train_patients=int(80 * f),
                    )
                    for f in (0.25, 0.5, 1.0)
                }
                for arm in arm_runs
                if not (skip_imagenet and arm == "imagenet")
            }
        results = word_results(
            build_results(
                dataset_dir=dataset_dir,
                splits_path=splits,
                runs=ArmRunFolders(pooled=arm_runs, fractions=fractions),
                evaluation=EvaluationSettings(mode=mode, outer_folds=3, n_bootstrap=100),
                cost_path=root / "cost.json",
                run_id=run_id,
                seed=seed,
                command="ctcompare compare --dataset DATASET --profile smoke",
            )
        )
    return results.model_copy(
        update={
            "created_at": created_at,
            "reproducibility": results.reproducibility.model_copy(
                update={
                    "created_at": created_at,
                    "package_versions": {"torch": "2.14.1", "numpy": "2.4.6"},
                    "platform": "Linux-x86_64",
                    "python_version": "3.12.3",
                    "ctcompare_version": "0.1.0",
                }
            ),
        }
    )
