"""Packaging: a trained arm as a shareable package, its int8 copy, deployment cost and prediction."""

from tasks.packaging.deploy_cost import (
    QUICK_TIMING,
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

__all__ = ["PackagedModel", "QUICK_TIMING", "THROUGHPUT_BATCH_SIZE", "check_request", "deploy_cost_task", "evaluate_compression", "load_package", "measure_deployment_cost", "package_metrics", "predict_dataset_task", "prepare_model", "sample_input", "time_model", "window_argument", "write_compressed_package", "write_package"]
