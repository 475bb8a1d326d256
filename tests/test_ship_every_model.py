"""Every arm the planner accepts can be shipped: ResNet-50, ResNet-18 and MobileNetV3-Large, each scratch, imagenet
and imagenet-linear, trained for one smoke epoch at 32 px, then packaged, costed and predicted (and, for each model's
network arm, compressed to int8). ResNet-50 scratch and imagenet-linear are shipped by test_package/test_deploy_cost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_schemas.arms import parse_arm
from data_schemas.files import read_models_csv
from data_schemas.package import ImagePrediction
from tasks.ingest.dataset_store import load_dataset
from tasks.packaging.deploy_cost import deploy_cost_task, measure_deployment_cost
from tasks.packaging.package import load_package, write_package
from tasks.packaging.predict import predict_dataset, predict_images, prepare_model
from tasks.packaging.quantize import int8_engine, write_compressed_package
from tasks.training.models import build_model, forward_flops_per_image
from tests.ship_fixtures import SHIPPED_ARM, ShippedRun, run_probabilities, shared_shipped_run, train_smoke_run
from tests.weights_files import random_torchvision_file

BUDGET_S = 0.2  # deployment-cost timing per package: the figures are not what is tested
# Every model and mode but the shared run's own (SHIPPED_ARM, shipped by the fixture itself).
ARMS = [arm for arm in (f"{model}:{mode}" for model in ("resnet50", "resnet18", "mobilenet_v3_large")
                        for mode in ("scratch", "imagenet", "imagenet-linear")) if arm != SHIPPED_ARM]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> ShippedRun:
    return shared_shipped_run(tmp_path_factory)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("every-model-weights")
    random_torchvision_file(directory, "resnet18", 1)
    random_torchvision_file(directory, "mobilenet_v3_large", 2)
    return directory


@pytest.mark.parametrize("arm", ARMS)
def test_the_arm_is_packaged_costed_and_predicted(arm, shipped, weights_dir, resnet50_weights_file, tmp_path):
    spec = parse_arm(arm)
    run_dir = tmp_path / "run"
    train_smoke_run(shipped.dataset_dir, spec.name, run_dir, resnet50_weights_file, weights_dir=weights_dir,
                    settings={"epochs": "1"})
    package = run_dir / "package"
    write_package(run_dir=run_dir, dataset_dir=shipped.dataset_dir, out_dir=package, threshold=0.5,
                  threshold_rule="fixed:0.5 (test)", aggregation="mean", metrics=None)
    meta = load_package(package).meta
    assert meta.arm == spec.name and meta.kind == ("linear-probe" if spec.mode == "imagenet-linear" else "network")

    cost = deploy_cost_task.fn(package, "fp32", 1, budget_seconds=BUDGET_S)
    assert cost.arm == spec.name and cost.latency_ms_median > 0 and cost.throughput_images_per_second > 0
    if meta.linear_probe is None:  # the arm's own network, not a ResNet-50
        assert cost.parameters == sum(p.numel() for p in build_model(spec.model).parameters())
        assert cost.forward_gflops_per_image == pytest.approx(forward_flops_per_image(32, model=spec.model) / 1e9)

    # predict reproduces the run's own test probabilities from the package alone
    summary = predict_dataset(package, shipped.dataset_dir, tmp_path / "pred", precision="fp32")
    dataset = load_dataset(shipped.dataset_dir)
    assert summary.arm == spec.name and summary.n_images == len(dataset.manifest)
    predicted = {row.image_key: row.prob_positive for row in read_models_csv(tmp_path / "pred" / "predictions.csv",
                                                                             ImagePrediction)}
    reference = run_probabilities(run_dir)
    assert len(reference) >= 4
    np.testing.assert_allclose([predicted[key] for key in reference], list(reference.values()), atol=1e-5)

    if spec.mode == "scratch":  # the compressed variant of the model's network
        compressed = write_compressed_package(load_package(package), shipped.dataset_dir, tmp_path / "int8",
                                              calibration_images=16)
        small = load_package(compressed)
        assert small.meta.weights_variant == ("int8" if int8_engine() else "bf16")
        probabilities = predict_images(prepare_model(small), dataset.images, progress=False)
        assert probabilities.shape == (len(dataset.manifest),) and np.isfinite(probabilities).all()
        assert (
            measure_deployment_cost(compressed, threads=1, budget_seconds=BUDGET_S).precision
            == small.meta.weights_variant
        )
