"""Deployment cost and the compressed variant, measured on a real packaged smoke run (figures not asserted in time)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from data_schemas.arms import parse_arm
from data_schemas.files import read_model_json, read_models_csv
from data_schemas.package import DEPLOY_COST_FILE, PACKAGE_FILE, DeploymentCost, ImagePrediction
from data_schemas.training import SplitRow
from flows.predict import predict_flow
from tasks.ingest.dataset_store import load_dataset
from tasks.packaging import deploy_cost
from tasks.packaging.background import BackgroundWrites
from tasks.packaging.deploy_cost import deploy_cost_task, measure_deployment_cost, parameter_count
from tasks.packaging.package import load_package
from tasks.packaging.predict import predict_images, prepare_model
from tasks.packaging.quantize import compare_compression, int8_engine, training_images, write_compressed_package
from tasks.training.models import build_model, forward_flops_per_image
from tests.ship_fixtures import SHIPPED_ARM, ShippedRun, copy_test_patient_files, shared_shipped_run

QUICK = {"budget_seconds": 0.3}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> ShippedRun:
    return shared_shipped_run(tmp_path_factory)


@pytest.fixture(scope="module")
def compressed(shipped: ShippedRun) -> Path:
    return write_compressed_package(load_package(shipped.package_dir), shipped.dataset_dir,
                                    shipped.run_dir / "package-int8", calibration_images=64)


def test_deployment_cost_figures(shipped: ShippedRun) -> None:
    cost = measure_deployment_cost(shipped.package_dir, precision="fp32", threads=1, **QUICK)
    model = parse_arm(SHIPPED_ARM).model
    assert cost.parameters == sum(p.numel() for p in build_model(model).parameters())
    assert cost.package_bytes == (shipped.package_dir / PACKAGE_FILE).stat().st_size
    assert cost.forward_gflops_per_image == pytest.approx(forward_flops_per_image(32, model=model) / 1e9)
    assert cost.image_size == 32 and cost.threads == 1 and cost.precision == "fp32" and not cost.channels_last
    assert 0 < cost.latency_ms_median <= cost.latency_ms_p90 and cost.throughput_images_per_second > 0
    assert cost.timed_runs >= 3 and cost.warmup_runs >= 1 and cost.throughput_batch_size == 32
    assert cost.time_budget_seconds == 0.3
    with pytest.raises(ValueError, match="budget_seconds must be > 0"):
        measure_deployment_cost(shipped.package_dir, budget_seconds=0)



def test_measuring_leaves_the_process_thread_count(shipped: ShippedRun) -> None:
    before = torch.get_num_threads()
    cost = measure_deployment_cost(shipped.package_dir, precision="fp32", threads=before + 1, **QUICK)
    assert cost.threads == before + 1 and torch.get_num_threads() == before

def test_a_timing_waits_for_every_file_being_written(shipped: ShippedRun, monkeypatch: pytest.MonkeyPatch) -> None:
    happened, gate = [], threading.Event()
    writes = BackgroundWrites()
    writes.submit(lambda: (gate.wait(), happened.append("written")))
    timing = deploy_cost._time_model
    monkeypatch.setattr(deploy_cost, "_time_model", lambda *args: (happened.append("timed"), timing(*args))[1])
    threading.Timer(0.2, gate.set).start()
    measure_deployment_cost(shipped.package_dir, precision="fp32", threads=1, **QUICK)
    writes.result()
    assert happened == ["written", "timed"]


def test_calibration_uses_training_images_only(shipped: ShippedRun) -> None:
    meta = load_package(shipped.package_dir).meta
    images = training_images(shipped.dataset_dir, meta, limit=1000)
    splits = read_models_csv(shipped.run_dir.parent / "splits.csv", SplitRow)
    dataset = load_dataset(shipped.dataset_dir)
    train_keys = {row.image_key for row in splits if row.part == "train"}
    train_rows = [row.index for row in dataset.manifest if row.image_key in train_keys]
    assert images.shape[0] == len(train_rows) == meta.run_config.n_train_images
    np.testing.assert_array_equal(images, dataset.images[sorted(train_rows)])


def test_compressed_variant_is_smaller_and_agrees(shipped: ShippedRun, compressed: Path) -> None:
    full, small = load_package(shipped.package_dir), load_package(compressed)
    expected = "int8" if int8_engine() else "bf16"
    assert small.meta.weights_variant == expected
    assert (
        "calibrated on 12 training images" if expected == "int8" else "int8 quantization is unsupported"
    ) in small.meta.compression
    assert compressed.stat().st_size < 0.5 * (shipped.package_dir / PACKAGE_FILE).stat().st_size
    raw = torch.load(compressed, weights_only=True)  # still one weights-only file
    assert raw["metadata"]["weights_variant"] == expected
    images = load_dataset(shipped.dataset_dir).images
    p_full = predict_images(prepare_model(full, "fp32"), images, progress=False)
    p_small = predict_images(prepare_model(small, "fp32"), images, progress=False)
    # The shared fixture's model is barely trained: its probabilities span a few thousandths, so a correlation
    # would weigh int8 rounding against that spread (and vary with the CPU's int8 kernels). Agreement is judged
    # where a decision is made, on the probability scale.
    gap = float(np.abs(p_full - p_small).max())
    print(f"int8 vs fp32 probabilities: largest difference {gap:.4f} over {len(p_full)} images")
    assert gap < 0.01, f"int8 and fp32 probabilities differ by up to {gap:.4f}"
    assert parameter_count(prepare_model(small, "fp32")) == parameter_count(prepare_model(full, "fp32"))
    cost = measure_deployment_cost(compressed, threads=1, **QUICK)
    assert cost.precision == expected and cost.package_bytes == compressed.stat().st_size


def test_predict_runs_the_compressed_package(shipped: ShippedRun, compressed: Path, tmp_path: Path) -> None:
    src = tmp_path / "incoming"
    copy_test_patient_files(shipped, src)
    result = predict_flow(package=str(compressed.parent), dicom_dir=str(src), out_dir=str(tmp_path / "pred"))
    assert result["summary"]["weights_variant"] == ("int8" if int8_engine() else "bf16")
    rows = read_models_csv(tmp_path / "pred" / "predictions.csv", ImagePrediction)
    assert len(rows) == result["summary"]["n_images"] >= 4 and all(0 <= r.prob_positive <= 1 for r in rows)


def _paired_interval_by_hand(y: np.ndarray, a: np.ndarray, b: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    """Patients drawn with replacement, both models scored on the same draw, one-class draws skipped."""
    from tasks.evaluation.statistics import roc_auc

    rng = np.random.default_rng(seed)
    changes = [
        roc_auc(y[i], b[i]) - roc_auc(y[i], a[i])
        for i in rng.integers(0, y.size, (n, y.size))
        if 0 < y[i].sum() < y.size
    ]
    low, high = np.percentile(changes, [2.5, 97.5])
    return float(low), float(high)


def test_compression_is_judged_on_the_predictions_of_the_report_tables(shipped: ShippedRun, compressed: Path) -> None:
    """The full-precision AUC of the int8 line is the patient-level AUC of the run's predictions.csv, the predictions
    the report's tables use; the change has a paired interval over patients (both models on the same patients)."""
    from data_schemas.training import PREDICTIONS_FILE, PredictionRow
    from tasks.evaluation.pooling import aggregate_by_patient
    from tasks.evaluation.statistics import roc_auc
    from tasks.packaging.deploy_cost import evaluate_compression, run_test_images

    full = measure_deployment_cost(shipped.package_dir, precision="fp32", threads=1, **QUICK)
    result = evaluate_compression(
        full_package=shipped.package_dir,
        compressed_package=compressed.parent,
        run_dir=shipped.run_dir,
        dataset_dir=shipped.dataset_dir,
        full_cost=full,
        tolerance=0.02,
        budget_seconds=QUICK["budget_seconds"],
        n_bootstrap=200,
        seed=3,
    )
    rows = read_models_csv(shipped.run_dir / PREDICTIONS_FILE, PredictionRow)
    table = aggregate_by_patient(
        [r.patient_key for r in rows], [r.target for r in rows], [r.prob_positive for r in rows], "mean"
    )
    assert result.level == "patient" and result.n_patients == len(table.patients) and result.tolerance == 0.02
    assert result.auc_full == pytest.approx(roc_auc(table.targets, table.probs), abs=1e-12)
    images, _, _ = run_test_images(shipped.run_dir, shipped.dataset_dir)
    small = aggregate_by_patient(
        [r.patient_key for r in rows],
        [r.target for r in rows],
        predict_images(prepare_model(load_package(compressed.parent), "auto"), images, progress=False),
        "mean",
    )
    assert result.auc_compressed == pytest.approx(roc_auc(small.targets, small.probs), abs=1e-6)
    if result.interval is not None:
        assert result.interval == pytest.approx(
            _paired_interval_by_hand(table.targets, table.probs, small.probs, 200, 3), abs=1e-6
        )
    assert "patient-level test AUC" in result.statement and "report's tables" in result.statement


@pytest.mark.parametrize(
    "scale, noise, judgement", [(1.0, 0.05, "within"), (0.0, 4.0, "beyond"), (1.0, 0.7, "undecided")]
)
def test_auc_change_is_judged_against_the_tolerance(
    shipped: ShippedRun, scale: float, noise: float, judgement: str
) -> None:
    """Within when the paired interval's lower bound lies above -tolerance, beyond when its upper bound lies below,
    undecided otherwise; the statement says which, at the patient level, with the interval and the tolerance."""
    from tasks.packaging.quantize import PairedPredictions

    full = measure_deployment_cost(shipped.package_dir, precision="fp32", threads=1, **QUICK)
    small = full.model_copy(update={"weights_variant": "int8", "package_bytes": full.package_bytes // 4})
    rng = np.random.default_rng(0)
    patients = [f"p{i:03d}" for i in range(60) for _ in range(3)]
    targets = np.array([i % 2 for i in range(60) for _ in range(3)])
    logit = (2 * targets - 1) + rng.normal(0, 1, targets.size)
    shifted = logit * scale + rng.normal(0, noise, targets.size)  # the compressed model: the full one, degraded
    pred = PairedPredictions(targets=targets, patients=patients, full=1 / (1 + np.exp(-logit)),
                             compressed=1 / (1 + np.exp(-shifted)))
    result = compare_compression(full, small, pred, tolerance=0.02, n_bootstrap=300, seed=1)
    y = np.array([i % 2 for i in range(60)])
    a = np.array([np.mean(pred.full[3 * i: 3 * i + 3]) for i in range(60)])
    b = np.array([np.mean(pred.compressed[3 * i: 3 * i + 3]) for i in range(60)])
    assert result.interval == pytest.approx(_paired_interval_by_hand(y, a, b, 300, 1), abs=1e-9)
    low, high = result.interval
    assert result.judgement == judgement == ("within" if low > -0.02 else "beyond" if high < -0.02 else "undecided")
    assert "patient-level" in result.statement and "tolerance of 0.02 AUC" in result.statement
    assert f"{low:+.3f} to {high:+.3f}" in result.statement and "25% of the full-precision size" in result.statement
    one_class = PairedPredictions(
        targets=np.ones(6, dtype=int), patients=list("aabbcc"), full=np.full(6, 0.6), compressed=np.full(6, 0.5)
    )
    assert compare_compression(full, small, one_class, tolerance=0.02).judgement == "not_estimable"


def test_deploy_cost_task_writes_the_figures_and_adds_them_to_the_card(shipped: ShippedRun) -> None:
    cost = deploy_cost_task.fn(shipped.package_dir, "fp32", 1, budget_seconds=0.3)
    assert read_model_json(shipped.package_dir / DEPLOY_COST_FILE, DeploymentCost) == cost
    card = (shipped.package_dir / "MODEL_CARD.md").read_text()
    assert f"{cost.latency_ms_median:.1f} ms median" in card and "1 threads (fp32)" in card
    load_package(shipped.package_dir)  # SHA256SUMS rewritten with the new card
