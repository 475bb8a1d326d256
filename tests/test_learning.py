"""The training pipeline learns: on an easy cohort, where a bright blob marks the positive class, a short run of a
small network reaches a validation AUC well above chance.

Shapes, schemas and file checks all pass for a model that learns nothing (labels shuffled against images, a loss
whose sign or class weights are wrong, a network that is never updated); this test does not.
"""

from __future__ import annotations

from pathlib import Path

from data_schemas.files import read_model_json
from data_schemas.training import RunSummary
from tasks.training.train import train_arm
from tests.ship_fixtures import one_run_plan
from tests.test_train import make_synthetic_dataset


def test_a_short_run_learns_an_easy_lesion(tmp_path: Path) -> None:
    dataset_dir = tmp_path / "dataset"
    make_synthetic_dataset(dataset_dir)
    run_dir = tmp_path / "runs" / "resnet18-scratch"
    settings = {"epochs": "3", "early_stopping_patience": "3", "image_size": "40", "lr": "0.003", "batch_size": "8"}
    plan_path = one_run_plan(run_dir, "resnet18:scratch", settings)
    summary = train_arm(dataset_dir=dataset_dir, plan_path=plan_path, run=".")
    assert summary.status == "completed", summary.reason
    recorded = read_model_json(run_dir / "status.json", RunSummary)
    assert recorded.best_val_auc is not None and recorded.best_val_auc > 0.8, recorded
