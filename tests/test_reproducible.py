"""The same cohort, settings and seed give the same verdict on any machine: two comparisons run at once, in two
processes, with two different pseudonymization keys and two different output folders, write the same numbers.

Both processes talk to this test session's Prefect API, as runs of one team talk to its project server: the Prefect
back end records the runs and holds none of the numbers compared here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect.settings import PREFECT_API_URL

from data_schemas.files import read_model_json
from data_schemas.report import ComparisonResults
from tasks.demo.synth import synthesize_cohort

ROOT = Path(__file__).resolve().parents[1]


def comparable_numbers(results: ComparisonResults) -> dict[str, Any]:
    """Every figure of the verdict; run-local things (times, paths, pseudonyms, dates) left out."""
    arms = {}
    for arm in results.arms:
        arms[arm.name] = {
            "status": arm.status,
            "slice": arm.test_metrics.model_dump() if arm.test_metrics else None,
            "patient": arm.patient_metrics.model_dump() if arm.patient_metrics else None,
            "operating_point": arm.operating_point.model_dump() if arm.operating_point else None,
            "losses": [(e.epoch, e.train_loss, e.val_loss, e.val_auc) for e in arm.learning_curve],
            "best_epoch": arm.best_epoch,
        }
    return {
        "arms": arms,
        "split": results.split.model_dump(),
        "recommendation": (
            results.recommendation.basis,
            results.recommendation.preferred_arm,
            results.recommendation.best_arm,
        ),
        # not the content hash: it covers manifest.csv, whose keys are the (key-dependent) pseudonyms
        "dataset": (
            results.dataset.card.n_images,
            results.dataset.card.n_patients,
            results.dataset.card.label_distribution,
        ),
    }


def test_two_processes_with_two_keys_give_the_same_results(tmp_path: Path) -> None:
    cohort = synthesize_cohort(tmp_path / "cohort", patients=10, slices_per_patient=2, seed=5)
    processes = []
    for name, key in (("a", "first-secret-key"), ("b", "another-secret-key")):
        env = {**os.environ, "CTCOMPARE_HMAC_KEY": key, "PREFECT_HOME": str(tmp_path / f"prefect-{name}"),
               "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_API_URL": str(PREFECT_API_URL.value())}
        argv = [
            sys.executable,
            "-m",
            "flows.cli",
            "compare",
            str(cohort.dicom_dir),
            "--labels",
            str(cohort.labels_path),
            "--out",
            str(tmp_path / f"reports-{name}" / "run"),
            "--profile",
            "smoke",
            "--arms",
            "resnet18:scratch",  # the pipeline is the same for every model; test_train checks ResNet-50's split
            "--no-calibrate",
            "--bootstrap",
            "50",
            "--set",
            "test_fraction=0.34",
        ]
        processes.append(
            subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
    first, second = (
        read_model_json(tmp_path / f"reports-{n}" / "run" / "results.json", ComparisonResults) for n in "ab"
    )
    assert first.arms[0].status == "completed"
    assert comparable_numbers(first) == comparable_numbers(second)
    images = [(tmp_path / f"reports-{n}" / "run-dataset" / "images.npy").read_bytes() for n in "ab"]
    assert images[0] == images[1]  # the same rows in the same order whatever the key
