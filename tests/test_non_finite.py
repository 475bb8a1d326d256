"""A network whose outputs go NaN fails its arm with the epoch and one sentence; no probability is written as 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_schemas.files import read_model_json, read_models_csv
from data_schemas.plan import read_plan
from data_schemas.training import EpochMetrics, PredictionRow, RunSummary, SplitRow
from tasks.training.run_folder import NonFiniteOutputError, write_predictions
from tests.test_train import _cli, make_synthetic_dataset

ARM = "resnet18:scratch"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    make_synthetic_dataset(root)
    return root


def diverge_in_epoch(monkeypatch: pytest.MonkeyPatch, diverging_epoch: int) -> None:
    """The real training epoch, after which (from `diverging_epoch` on, 1-based) one weight of the stem is NaN, as
    after an exploding step: every output of the network is then NaN."""
    import tasks.training.loop as loop

    real_epoch = loop.train_one_epoch

    def epoch_then_nan(setup, x_train, y_train, epoch, progress=None):
        result = real_epoch(setup, x_train, y_train, epoch, progress)
        if epoch + 1 >= diverging_epoch:
            with torch.no_grad():
                next(setup.model.parameters()).view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(loop, "train_one_epoch", epoch_then_nan)


def test_a_diverged_network_fails_its_arm_with_the_epoch(dataset_dir, tmp_path, monkeypatch, capsys):
    """A real smoke training run whose network turns NaN after its second epoch's step: `ctcompare train` exits 1
    with the sentence, status.json says failed with the epoch, nothing is predicted, and the comparison reads the
    arm as failed."""
    from tasks.evaluation.evaluate import read_arm

    diverge_in_epoch(monkeypatch, 2)
    run_dir = tmp_path / "runs" / "scratch"
    capsys.readouterr()
    # a ResNet-18: what a NaN does to a run is the same for every network
    code = _cli(["train", str(dataset_dir), "--arm", ARM, "--out", str(run_dir), "--profile", "smoke"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "NaN or infinite in epoch 2" in err[-1]
    assert not any(line.startswith("Traceback") for line in err)
    summary = read_model_json(run_dir / "status.json", RunSummary)
    assert (
        summary.status == "failed"
        and "the network's validation outputs became NaN or infinite in epoch 2" in summary.reason
    )
    assert "\n" not in summary.reason and summary.reason.endswith("may help.")
    assert [row.epoch for row in read_models_csv(run_dir / "metrics.csv", EpochMetrics)] == [1]  # epoch 1 was fine
    assert not (run_dir / "predictions.csv").exists() and not (run_dir / "val_predictions.csv").exists()
    arm, pooled, _ = read_arm(ARM, [run_dir], read_plan(run_dir / "plan.json").evaluation, None, 0)
    assert arm.status == "failed" and arm.reason == summary.reason and pooled is None


def test_non_finite_probabilities_are_never_written(tmp_path):
    rows = [SplitRow(image_key=f"{i:064x}", patient_key=f"{i:064x}", label="abnormal", part="test") for i in range(3)]
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(NonFiniteOutputError, match=r"the test probabilities became NaN or infinite in epoch 4 \(1 "
                                                       r"of 3"):
            write_predictions(tmp_path, rows=rows, probs=np.array([0.2, bad, 0.7]), positive_label="abnormal", epoch=4)
        assert not (tmp_path / "predictions.csv").exists()
    write_predictions(tmp_path, rows=rows, probs=np.array([0.2, 1.0, 0.0]), positive_label="abnormal", epoch=4)
    assert [row.prob_positive for row in read_models_csv(tmp_path / "predictions.csv", PredictionRow)] == [
        0.2,
        1.0,
        0.0,
    ]
