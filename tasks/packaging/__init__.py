"""Packaging: a trained arm as a shareable package, its int8 copy, deployment cost and prediction."""

from tasks.packaging.deploy_cost import (
    DEFAULT_TIME_BUDGET_S,
    QUICK_TIME_BUDGET_S,
    THROUGHPUT_BATCH_SIZE,
    deploy_cost_task,
    evaluate_compression,
    measure_deployment_cost,
    sample_input,
    time_model,
)
from tasks.packaging.package import load_package, package_metrics, write_package
from tasks.packaging.predict import (
    PackagedModel,
    check_request,
    predict_dataset_task,
    prepare_model,
    window_argument,
)
from tasks.packaging.quantize import write_compressed_package
from tasks.packaging.ship import compress_and_compare, ship_run

__all__ = [
    "DEFAULT_TIME_BUDGET_S",
    "PackagedModel",
    "QUICK_TIME_BUDGET_S",
    "THROUGHPUT_BATCH_SIZE",
    "check_request",
    "compress_and_compare",
    "deploy_cost_task",
    "ship_run",
    "evaluate_compression",
    "load_package",
    "measure_deployment_cost",
    "package_metrics",
    "predict_dataset_task",
    "prepare_model",
    "sample_input",
    "time_model",
    "window_argument",
    "write_compressed_package",
    "write_package",
]
