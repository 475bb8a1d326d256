"""Model packages: a real smoke run packaged, handed over alone, and run on its test patients' own DICOM files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_schemas.files import read_models_csv, sha256_file
from data_schemas.package import CHECKSUMS_FILE, MODEL_CARD_FILE, PACKAGE_FILE, ImagePrediction, PatientPrediction
from flows.cli import main
from reports.model_card import CARD_SECTIONS
from tasks.common.reuse import checksums_hold
from tasks.packaging.background import BackgroundWrites
from tasks.packaging.package import PackageError, load_package, write_package
from tasks.training.weights_record import recorded_check
from tests.ship_fixtures import (
    ShippedRun,
    copy_test_patient_files,
    paths_of,
    run_probabilities,
    shared_shipped_run,
    train_smoke_run,
)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> ShippedRun:
    return shared_shipped_run(tmp_path_factory)


def _predicted_by_path(pred_dir: Path) -> dict[str, float]:
    paths = paths_of(pred_dir / "dataset")
    return {
        paths[row.image_key]: row.prob_positive
        for row in read_models_csv(pred_dir / "predictions.csv", ImagePrediction)
    }


def _round_trip(run: ShippedRun, package: Path, tmp_path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Predict the run's test patients from their DICOM files with the package alone; (predicted, run's own) by path."""
    new_files = tmp_path / "new"
    copied = copy_test_patient_files(run, new_files)
    handed_over = tmp_path / "handed-over"
    shutil.copytree(package, handed_over)
    away = run.dataset_dir.with_name("dataset-away")
    run.dataset_dir.rename(away)  # predict must never need the training dataset
    try:
        code = main(
            ["predict", str(handed_over), str(new_files), "--out", str(tmp_path / "pred"), "--precision", "fp32"]
        )
    finally:
        away.rename(run.dataset_dir)
    assert code == 0
    reference = run_probabilities(run.run_dir)
    return _predicted_by_path(tmp_path / "pred"), {path: reference[key] for path, key in copied.items()}


def test_round_trip_equals_the_runs_test_predictions(shipped: ShippedRun, tmp_path: Path) -> None:
    predicted, reference = _round_trip(shipped, shipped.package_dir, tmp_path)
    assert len(reference) >= 4 and set(predicted) == set(reference)
    np.testing.assert_allclose([predicted[p] for p in reference], list(reference.values()), atol=1e-5)
    # patient level: the package's aggregation (mean) of its slices, then the package's threshold
    images = read_models_csv(tmp_path / "pred" / "predictions.csv", ImagePrediction)
    for patient in read_models_csv(tmp_path / "pred" / "patient_predictions.csv", PatientPrediction):
        probs = [r.prob_positive for r in images if r.patient_key == patient.patient_key]
        assert patient.n_images == len(probs) and patient.prob_positive == pytest.approx(np.mean(probs), abs=1e-6)
        assert patient.decision == ("nodule" if patient.prob_positive >= 0.5 else "normal")
    assert (tmp_path / "pred" / "quarantine.csv").is_file()


def test_package_is_one_weights_only_file_with_hashes(shipped: ShippedRun, tmp_path: Path) -> None:
    raw = torch.load(shipped.package_dir / PACKAGE_FILE, weights_only=True)
    assert raw["format"] == "ctcompare-model-package" and all(
        isinstance(v, torch.Tensor) for v in raw["state_dict"].values()
    )
    meta = raw["metadata"]
    json.dumps(meta)  # JSON-able
    recipe = meta["recipe"]
    assert recipe["window"]["name"] == "lung" and recipe["ingest_image_size"] == 48 and recipe["train_image_size"] == 32
    assert meta["classes"] == ["normal", "nodule"] and meta["operating_point"]["aggregation"] == "mean"
    assert meta["training_data"]["content_hash"] == meta["run_config"]["dataset_hash"]
    sums = dict(line.split("  ")[::-1] for line in (shipped.package_dir / CHECKSUMS_FILE).read_text().splitlines())
    assert sums == {name: sha256_file(shipped.package_dir / name) for name in (PACKAGE_FILE, MODEL_CARD_FILE)}
    tampered = tmp_path / "tampered"
    shutil.copytree(shipped.package_dir, tampered)
    data = bytearray((tampered / PACKAGE_FILE).read_bytes())
    data[-100] ^= 0xFF
    (tampered / PACKAGE_FILE).write_bytes(bytes(data))
    with pytest.raises(PackageError, match="does not match its SHA256SUMS"):
        load_package(tampered)


def test_model_card_has_every_section_and_no_identifier(shipped: ShippedRun) -> None:
    card = (shipped.package_dir / MODEL_CARD_FILE).read_text()
    missing = [section for section in CARD_SECTIONS if f"## {section}\n" not in card]
    assert not missing
    assert "0.800 (0.500–1.000)" in card and "0.750 (0.450–0.950)" in card  # patient- and slice-level AUC
    assert "Small nodules next to vessels" in card and "**0.500**" in card
    identifiers = [value for value in shipped.cohort.identifiers if len(value) >= 4]
    assert identifiers
    metadata = json.dumps(load_package(shipped.package_dir).meta.model_dump(mode="json"))
    leaks = [value for value in identifiers if value in card or value in metadata]
    assert not leaks


def test_linear_probe_arm_round_trip(shipped: ShippedRun, resnet50_weights_file: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = shipped.run_dir.parent / "imagenet-linear"
    train_smoke_run(shipped.dataset_dir, "imagenet-linear", run_dir, resnet50_weights_file)
    package = run_dir / "package"
    write_package(run_dir=run_dir, dataset_dir=shipped.dataset_dir, out_dir=package, threshold=0.4,
                  threshold_rule="youden on validation predictions", aggregation="max", metrics=None)
    assert load_package(package).meta.kind == "linear-probe"
    linear = ShippedRun(cohort=shipped.cohort, dataset_dir=shipped.dataset_dir, run_dir=run_dir, package_dir=package)
    predicted, reference = _round_trip(linear, package, tmp_path)
    np.testing.assert_allclose([predicted[p] for p in reference], list(reference.values()), atol=1e-5)
    assert "No test metrics were given" in (package / MODEL_CARD_FILE).read_text()
    # the backbone's SHA-256 from the record of its check, or (no record: an empty cache folder) hashed
    assert recorded_check(resnet50_weights_file, "resnet50") is not None
    monkeypatch.setenv("CTCOMPARE_CACHE_DIR", str(tmp_path / "empty-cache"))
    assert recorded_check(resnet50_weights_file, "resnet50") is None
    unrecorded = write_package(run_dir=run_dir, dataset_dir=shipped.dataset_dir, out_dir=tmp_path / "unrecorded",
                               threshold=0.4, threshold_rule="youden on validation predictions", aggregation="max",
                               metrics=None)
    assert unrecorded.meta.weights_sha256 == load_package(package).meta.weights_sha256


def test_a_package_written_in_the_background_is_the_one_written_at_once(shipped: ShippedRun, tmp_path: Path) -> None:
    common = {"run_dir": shipped.run_dir, "dataset_dir": shipped.dataset_dir, "threshold": 0.5,
              "threshold_rule": "fixed", "aggregation": "mean", "metrics": None}
    writes = BackgroundWrites()
    later = write_package(out_dir=tmp_path / "later", writes=writes, **common)
    writes.result()
    now = write_package(out_dir=tmp_path / "now", **common)
    read = load_package(tmp_path / "later")
    assert (read.sha256, read.meta, later.file_bytes) == (later.sha256, later.meta, later.path.stat().st_size)
    assert now.file_bytes is not None and now.meta.weights_sha256 == later.meta.weights_sha256
    assert checksums_hold(tmp_path / "later")
    failing = BackgroundWrites()
    failing.submit(lambda: (tmp_path / "no such folder" / "file").write_text(""))
    with pytest.raises(FileNotFoundError):
        failing.result()


def test_bad_arguments_are_refused(shipped: ShippedRun, tmp_path: Path) -> None:
    common = {"run_dir": shipped.run_dir, "dataset_dir": shipped.dataset_dir, "out_dir": tmp_path / "p",
              "threshold_rule": "fixed", "metrics": None}
    with pytest.raises(ValueError, match="choose one of mean, max"):
        write_package(threshold=0.5, aggregation="median", **common)
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\]"):
        write_package(threshold=1.5, aggregation="mean", **common)
    with pytest.raises(PackageError, match="not a run folder"):
        write_package(**{**common, "run_dir": tmp_path}, threshold=0.5, aggregation="mean")
    assert not (tmp_path / "p").exists()
