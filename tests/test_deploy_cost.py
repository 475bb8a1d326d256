"""Deployment cost and the compressed variant, measured on a real packaged smoke run (figures not asserted in time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_schemas.files import read_model_json, read_models_csv
from data_schemas.package import DEPLOY_COST_FILE, PACKAGE_FILE, DeploymentCost, ImagePrediction
from flows.predict import predict_flow
from data_schemas.training import SplitRow
from tasks.ingest.dataset_store import load_dataset
from tasks.packaging.deploy_cost import deploy_cost_task, measure_deployment_cost, parameter_count
from tasks.training.models import forward_flops_per_image, scratch_resnet50
from tasks.packaging.package import load_package
from tasks.packaging.predict import predict_images, prepare_model
from tasks.packaging.quantize import compare_compression, int8_engine, training_images, write_compressed_package
from tests.ship_fixtures import ShippedRun, shared_shipped_run, copy_test_patient_files

QUICK = {"warmup": 1, "runs": 3, "batches": 1}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> ShippedRun:
    return shared_shipped_run(tmp_path_factory)


@pytest.fixture(scope="module")
def compressed(shipped: ShippedRun) -> Path:
    return write_compressed_package(load_package(shipped.package_dir), shipped.dataset_dir,
                                    shipped.run_dir / "package-int8", calibration_images=64)


def test_deployment_cost_figures(shipped: ShippedRun) -> None:
    cost = measure_deployment_cost(shipped.package_dir, precision="fp32", threads=1, **QUICK)
    assert cost.parameters == sum(p.numel() for p in scratch_resnet50().parameters())
    assert cost.package_bytes == (shipped.package_dir / PACKAGE_FILE).stat().st_size
    assert cost.forward_gflops_per_image == pytest.approx(forward_flops_per_image(32) / 1e9)
    assert cost.image_size == 32 and cost.threads == 1 and cost.precision == "fp32" and not cost.channels_last
    assert 0 < cost.latency_ms_median <= cost.latency_ms_p90 and cost.throughput_images_per_second > 0
    assert cost.timed_runs == 3 and cost.throughput_batch_size == 32
    with pytest.raises(ValueError, match="runs, batches >= 1"):
        measure_deployment_cost(shipped.package_dir, runs=0)


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
    assert ("calibrated on 12 training images" if expected == "int8" else "int8 quantization is unsupported") in small.meta.compression
    assert compressed.stat().st_size < 0.5 * (shipped.package_dir / PACKAGE_FILE).stat().st_size
    raw = torch.load(compressed, weights_only=True)  # still one weights-only file
    assert raw["metadata"]["weights_variant"] == expected
    images = load_dataset(shipped.dataset_dir).images
    p_full = predict_images(prepare_model(full, "fp32"), images, progress=False)
    p_small = predict_images(prepare_model(small, "fp32"), images, progress=False)
    r = float(np.corrcoef(p_full, p_small)[0, 1])
    print(f"int8 vs fp32 probabilities: r = {r:.4f} over {len(p_full)} images")
    assert r > 0.9, f"correlation {r:.3f}"
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


def test_auc_change_is_judged_against_the_interval(shipped: ShippedRun) -> None:
    full = measure_deployment_cost(shipped.package_dir, precision="fp32", threads=1, **QUICK)
    small = full.model_copy(update={"weights_variant": "int8", "package_bytes": full.package_bytes // 4})
    inside = compare_compression(full, small, auc_full=0.90, auc_compressed=0.89, interval=(-0.04, 0.04))
    assert inside.inside_interval is True and "inside the bootstrap interval" in inside.statement
    assert inside.auc_change == pytest.approx(-0.01) and "25% of the full-precision size" in inside.statement
    outside = compare_compression(full, small, auc_full=0.90, auc_compressed=0.80, interval=(-0.04, 0.04))
    assert outside.inside_interval is False and "outside" in outside.statement
    unknown = compare_compression(full, small, auc_full=None, auc_compressed=0.8, interval=(-0.04, 0.04))
    assert unknown.inside_interval is None and "unknown" in unknown.statement


def test_deploy_cost_task_writes_the_figures_and_adds_them_to_the_card(shipped: ShippedRun) -> None:
    cost = deploy_cost_task.fn(shipped.package_dir, "fp32", 1)
    assert read_model_json(shipped.package_dir / DEPLOY_COST_FILE, DeploymentCost) == cost
    card = (shipped.package_dir / "MODEL_CARD.md").read_text()
    assert f"{cost.latency_ms_median:.1f} ms median" in card and "1 threads (fp32)" in card
    load_package(shipped.package_dir)  # SHA256SUMS rewritten with the new card
