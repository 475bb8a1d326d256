"""A real shipped model for tests: synthetic DICOM cohort -> ingest -> smoke training run -> package.

The one call into the training code is isolated in `train_smoke_run`, so it can follow the training restructure.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from data_schemas.dataset import PRIVATE_INDEX_FILE, PrivateIndexRow
from data_schemas.files import read_models_csv
from data_schemas.plan import build_run_plan, write_plan
from data_schemas.training import SPLITS_FILE, PredictionRow, SplitRow
from flows.ingest import ingest_flow
from tasks.demo.synth import CohortSummary, synthesize_cohort
from tasks.packaging.package import write_package

INGEST_SIZE = 48  # larger than the smoke profile's 32 px, so the ingest -> training resize is exercised
METRICS = {
    "mode": "holdout", "n_test_patients": 3, "n_test_images": 6,
    "patient": {"auc": {"value": 0.8, "ci_low": 0.5, "ci_high": 1.0}, "sensitivity": {"value": 0.67}},
    "slice": {"auc": {"value": 0.75, "ci_low": 0.45, "ci_high": 0.95}},
    "failure_modes": ["Small nodules next to vessels were missed."],
}


@dataclass
class ShippedRun:
    """Everything a shipping test needs, with the paths it produced."""

    cohort: CohortSummary
    dataset_dir: Path
    run_dir: Path
    package_dir: Path


def train_smoke_run(dataset_dir: Path, arm: str, run_dir: Path, weights_path: Path | None = None, *,
                    weights_dir: Path | None = None, settings: dict[str, str] | None = None) -> None:
    """The one call into training: a one-run smoke plan in run_dir (as `ctcompare train` writes it), fp32 (so the
    round trip can be checked to float tolerance); the split lands beside run_dir (run_dir/../splits.csv).
    weights_dir: torchvision-format files of the other models (tasks.training.train.weights_file_for)."""
    from tasks.training.train import train_arm

    plan_path = one_run_plan(run_dir, arm, {"precision": "fp32", **(settings or {})})
    summary = train_arm(dataset_dir=dataset_dir, plan_path=plan_path, run=".", weights_path=weights_path,
                        weights_dir=weights_dir)
    assert summary.status == "completed", summary.reason


def one_run_plan(run_dir: Path, arm: str, settings: dict[str, str] | None = None, seed: int = 0) -> Path:
    """run_dir/plan.json of a single smoke run trained in run_dir itself, its split file beside run_dir (as `ctcompare
    train` writes it)."""
    plan = build_run_plan(profile="smoke", arms=[arm], seed=seed, settings=settings, layout="single-arm")
    plan = plan.model_copy(update={"splits_file": f"../{SPLITS_FILE}"})
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_plan(run_dir, plan)


# The shared run's arm: what the shipping tests check (package, deployment cost, compression, bundle, prediction,
# re-use) is the same for every network, and a ResNet-18 ships in a fraction of a ResNet-50's time; the default
# ResNet-50 ships in tests/test_ship_every_model.py and in test_compare's full run.
SHIPPED_ARM = "resnet18:scratch"


def build_shipped_run(root: Path, arm: str = SHIPPED_ARM, weights_path: Path | None = None) -> ShippedRun:
    """Cohort (12 patients x 2 slices), ingest at 48 px, train one smoke run, package it with a fixed threshold."""
    cohort = synthesize_cohort(root / "cohort", patients=12, slices_per_patient=2, seed=3)
    dataset_dir = root / "dataset"
    ingest_flow(src_dir=str(cohort.dicom_dir), out_dir=str(dataset_dir), labels=str(cohort.labels_path),
                size=INGEST_SIZE, window="lung", workers=1)
    run_dir = root / "runs" / arm.replace(":", "-")
    train_smoke_run(dataset_dir, arm, run_dir, weights_path)
    package_dir = run_dir / "package"
    write_package(run_dir=run_dir, dataset_dir=dataset_dir, out_dir=package_dir, threshold=0.5,
                  threshold_rule="fixed:0.5 (test)", aggregation="mean", metrics=METRICS)
    return ShippedRun(cohort=cohort, dataset_dir=dataset_dir, run_dir=run_dir, package_dir=package_dir)


_BUILT: dict[str, ShippedRun] = {}


def shared_shipped_run(tmp_path_factory) -> ShippedRun:
    """One SHIPPED_ARM run per test session, shared by the shipping test modules (each build trains for seconds)."""
    if SHIPPED_ARM not in _BUILT:
        _BUILT[SHIPPED_ARM] = build_shipped_run(tmp_path_factory.mktemp("ship"))
    return _BUILT[SHIPPED_ARM]


def copy_test_patient_files(shipped: ShippedRun, dest: Path) -> dict[str, str]:
    """Copy the DICOM files of the run's test patients to dest; returns relative path -> training image key."""
    splits = read_models_csv(shipped.run_dir.parent / "splits.csv", SplitRow)
    test_keys = {row.image_key for row in splits if row.part == "test"}
    index = read_models_csv(shipped.dataset_dir / PRIVATE_INDEX_FILE, PrivateIndexRow)
    copied: dict[str, str] = {}
    for row in index:
        if row.image_key in test_keys:
            target = dest / row.relative_path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(shipped.cohort.dicom_dir) / row.relative_path, target)
            copied[row.relative_path] = row.image_key
    return copied


def run_probabilities(run_dir: Path) -> dict[str, float]:
    """image key -> probability in the run's own predictions.csv."""
    return {row.image_key: row.prob_positive for row in read_models_csv(run_dir / "predictions.csv", PredictionRow)}


def paths_of(dataset_dir: Path) -> dict[str, str]:
    """image key -> relative source path of a dataset (its private index)."""
    return {
        row.image_key: row.relative_path for row in read_models_csv(dataset_dir / PRIVATE_INDEX_FILE, PrivateIndexRow)
    }
