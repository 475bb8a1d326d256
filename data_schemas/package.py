"""Schemas of a shipped model: the package (weights + recipe + card), its deployment cost, and predictions.

A package folder, written by tasks.packaging.package.write_package, holds:
    model.pt        one file, torch.load(weights_only=True): {"format", "format_version", "metadata" (the JSON-able
                    ModelPackageMeta below), "state_dict" (plain tensors; quantized tensors for the int8 variant)}
    MODEL_CARD.md   the model card (reports/model_card.py); no identifiers
    SHA256SUMS      `sha256sum -c` format: the SHA-256 of model.pt and MODEL_CARD.md

`ctcompare predict PACKAGE DICOM_DIR --out PRED_DIR` writes into PRED_DIR (owner-only, 0700: it is the clinical
output and names patients):
    dataset/                 the new files ingested with the package's recipe (private/ stays private)
    predictions.csv          ImagePrediction per image: the source file and its DICOM UIDs (identifiers, 0600)
    patient_predictions.csv  PatientPrediction per patient, with the source PatientID (identifiers, 0600)
    quarantine.csv           QuarantineRow per rejected file (paths, 0600)
    predict.json             PredictSummary: counts, quarantine reasons, threshold, runtime, warnings (no identifiers)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from data_schemas.base import StrictModel
from data_schemas.dataset import DatasetFingerprint, WindowSpec
from data_schemas.metrics import MetricValue
from data_schemas.training import LinearProbeModel, RunConfig

PACKAGE_FORMAT = "ctcompare-model-package"
PACKAGE_FORMAT_VERSION = 1
PACKAGE_FILE = "model.pt"
MODEL_CARD_FILE = "MODEL_CARD.md"
CHECKSUMS_FILE = "SHA256SUMS"
PACKAGE_DIR = "package"  # where a run folder keeps its package: RUN_DIR/package/
DEPLOY_COST_FILE = "deploy_cost.json"

PREDICTIONS_FILE = "predictions.csv"
PATIENT_PREDICTIONS_FILE = "patient_predictions.csv"
PREDICT_SUMMARY_FILE = "predict.json"
PREDICT_DATASET_DIR = "dataset"

PackageKind = Literal["network", "linear-probe"]
WeightsVariant = Literal["fp32", "int8", "bf16"]


class PreprocessRecipe(StrictModel):
    """Everything between a DICOM file and the network's input, as the model was trained.

    Args:
        window: the CT window ingest applied (HU -> [0, 1]).
        ingest_image_size: side of the square images ingest wrote (dataset.json image_size).
        train_image_size: side the network was trained at (config.json train.image_size).
        value_mapping: ingest's HU -> value formula, MONOCHROME1 handling included (dataset.json).
        monochrome1: how MONOCHROME1 images are handled, stated on its own.
        interpolation: ingest's resize filter (dataset.json).
        padding: ingest's padding to a square (dataset.json).
        resize_method: the resize from ingest size to training size (tasks.training.augment.images_to_tensor).
        normalisation_mean: subtracted from the [0, 1] grey value before the network.
        normalisation_std: the divisor after the mean is subtracted.
        preprocess_version: tasks.ingest.decode.PREPROCESS_VERSION when the package was written.
    """

    window: WindowSpec
    ingest_image_size: int = Field(ge=16, le=1024)
    train_image_size: int = Field(ge=16, le=1024)
    value_mapping: str
    monochrome1: str
    interpolation: str
    padding: str
    resize_method: str
    normalisation_mean: float
    normalisation_std: float = Field(gt=0)
    preprocess_version: int


class OperatingPoint(StrictModel):
    """The decision rule shipped with the model.

    Args:
        threshold: a patient (or image) is called positive when its probability is >= threshold.
        rule: how the threshold was chosen, e.g. "youden on validation predictions".
        aggregation: how slice probabilities become a patient probability.
    """

    threshold: float = Field(ge=0, le=1)
    rule: str
    aggregation: Literal["mean", "max"] = "mean"


class PackageMetrics(StrictModel):
    """Test metrics with 95% intervals, as the evaluation reported them (passed in; never recomputed here).

    Args:
        mode: evaluation mode, "holdout" or "cross-validated".
        patient: metric name -> value and interval, patient level.
        slice: metric name -> value and interval, image level.
        n_test_patients: patients the metrics were computed on.
        n_test_images: images the metrics were computed on.
        failure_modes: short plain sentences from the error gallery, when one exists (no identifiers).
    """

    mode: Literal["holdout", "cross-validated"] = "holdout"
    patient: dict[str, MetricValue] = Field(default_factory=dict)
    slice: dict[str, MetricValue] = Field(default_factory=dict)
    n_test_patients: int | None = None
    n_test_images: int | None = None
    failure_modes: list[str] = Field(default_factory=list)


class TrainingDataSummary(StrictModel):
    """The training dataset as the package describes it: counts and fingerprint, no identifiers.

    Args:
        content_hash: dataset.json content_hash (the dataset's identity).
        n_images: images in the dataset.
        n_patients: patients in the dataset.
        label_distribution: label -> images.
        n_files_quarantined: source files that did not become images.
        fingerprint: the dataset fingerprint (matrix sizes, spacing, HU, scanners, transfer syntaxes, kVp).
    """

    content_hash: str
    n_images: int
    n_patients: int
    label_distribution: dict[str, int]
    n_files_quarantined: int
    fingerprint: DatasetFingerprint


class ModelPackageMeta(StrictModel):
    """The metadata inside model.pt (JSON-able): what the weights are and how to feed them.

    Args:
        kind: "network" (a fine-tuned ResNet-50) or "linear-probe" (frozen backbone + logistic regression).
        arm: the training arm.
        weights_variant: how the weights are stored: fp32, int8 (post-training quantized) or bf16.
        compression: one sentence on how the variant was made; empty for fp32.
        classes: [negative, positive] class names, model output order.
        positive_label: the class whose probability the model outputs.
        recipe: the preprocessing recipe.
        operating_point: threshold, its rule and the aggregation.
        run_config: the run's config.json, whole.
        training_data: the training dataset summary.
        metrics: the test metrics with intervals, when given.
        linear_probe: the standardiser + logistic regression of a linear-probe package.
        source_files: run/dataset file name -> SHA-256 of the files the package was built from.
        weights_sha256: SHA-256 over the state dict's tensor bytes in key order.
        inputs_sha256: the inputs key the package was made from (tasks.common.reuse): an unchanged re-run reuses it.
        created_at: UTC time the package was written.
        torch_version: torch that wrote it.
    """

    kind: PackageKind
    arm: str
    weights_variant: WeightsVariant = "fp32"
    compression: str = ""
    classes: list[str] = Field(min_length=2, max_length=2)
    positive_label: str
    recipe: PreprocessRecipe
    operating_point: OperatingPoint
    run_config: RunConfig
    training_data: TrainingDataSummary
    metrics: PackageMetrics | None = None
    linear_probe: LinearProbeModel | None = None
    source_files: dict[str, str] = Field(default_factory=dict)
    weights_sha256: str
    inputs_sha256: str = ""
    created_at: str
    torch_version: str


class DeploymentCost(StrictModel):
    """What one model costs to run on a CPU (tasks.packaging.deploy_cost.measure_deployment_cost; methods in its
    docstring).

    Args:
        arm: the arm measured.
        weights_variant: fp32, int8 or bf16 weights.
        parameters: trainable and frozen parameters of the float model (linear-probe: backbone + 2049).
        package_bytes: size of model.pt on disk.
        image_size: the trained image size the figures are measured at.
        forward_gflops_per_image: tasks.training.models.forward_flops_per_image / 1e9 (FlopCounterMode, 2 per MAC).
        latency_ms_median: batch-1 forward latency, median over the timed runs.
        latency_ms_p90: batch-1 forward latency, 90th percentile.
        throughput_images_per_second: images per second at batch `throughput_batch_size`.
        throughput_batch_size: batch size of the throughput figure.
        warmup_runs: untimed batch-1 forwards before timing.
        timed_runs: timed batch-1 forwards (as many as the time budget allowed).
        time_budget_seconds: the fixed time budget the forwards ran within (None: measured by count, older files).
        threads: torch.get_num_threads() during the measurement.
        precision: compute precision (fp32, bf16 autocast, int8).
        channels_last: whether input and model used channels-last.
        cpu: the CPU model name (platform / /proc/cpuinfo).
        torch_version: torch used.
        measured_at: UTC time.
        inputs_sha256: the inputs key of the measurement (package, precision, threads, budget, CPU, torch, code):
            an unchanged re-run reuses the figures (tasks.common.reuse).
        timed_on: the arm whose package's forwards gave the latency and throughput, when it is another package of
            the same network at the same size and runtime, measured in the same stage (a forward's cost depends on
            the shapes and the runtime, not on the weights' values); None: this package's own forwards.
    """

    arm: str
    weights_variant: WeightsVariant
    parameters: int
    package_bytes: int
    image_size: int
    forward_gflops_per_image: float
    latency_ms_median: float
    latency_ms_p90: float
    throughput_images_per_second: float
    throughput_batch_size: int
    warmup_runs: int
    timed_runs: int
    time_budget_seconds: float | None = None
    threads: int
    precision: str
    channels_last: bool
    cpu: str
    torch_version: str
    measured_at: str
    inputs_sha256: str = ""
    timed_on: str | None = None


class CompressionComparison(StrictModel):
    """The compressed variant next to full precision, with the paired change in test AUC judged against a tolerance.

    Args:
        full: the full-precision model's cost.
        compressed: the compressed variant's cost.
        level: the level of the AUCs ("patient": slice probabilities aggregated per patient, as the report's
            patient-level table; "slice").
        reference: what the full-precision AUC is computed from (the run's predictions.csv, the predictions the
            report's metric tables use).
        n_patients: test patients behind the AUCs (the packaged run's test part).
        auc_full: test AUC of the full-precision predictions.
        auc_compressed: test AUC of the compressed variant on the same images.
        auc_change: auc_compressed - auc_full.
        interval: 95% interval of the change: percentile bootstrap over patients, both models' predictions of the
            same resampled patients (paired).
        tolerance: the largest AUC loss accepted (the comparison's non-inferiority margin).
        judgement: "within" (interval's lower bound above -tolerance), "beyond" (its upper bound below -tolerance),
            "undecided" (the interval straddles -tolerance) or "not_estimable" (fewer than 2 patients of a class).
        inside_interval: unused since the paired interval; kept so that older results.json files still read.
        statement: one plain sentence.
    """

    full: DeploymentCost
    compressed: DeploymentCost
    level: Literal["slice", "patient"] = "patient"
    reference: str = ""
    n_patients: int = Field(default=0, ge=0)
    auc_full: float | None
    auc_compressed: float | None
    auc_change: float | None
    interval: tuple[float, float] | None
    tolerance: float | None = None
    judgement: Literal["within", "beyond", "undecided", "not_estimable"] = "not_estimable"
    inside_interval: bool | None = None
    statement: str


class CachedCompression(StrictModel):
    """compression.json beside a compressed package: the comparison and the inputs key it was made from."""

    inputs_sha256: str
    comparison: CompressionComparison


class ImagePrediction(StrictModel):
    """One row of predictions.csv written by predict: an image, the file and DICOM instance it came from (patient
    identifiers: the file is owner-only), and the model's output."""

    source_path: str = Field(default="", description="the source file, relative to the predicted folder")
    frame: int
    patient_id: str = Field(default="", description="the source file's PatientID")
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    prob_positive: float = Field(ge=0, le=1)
    decision: str = Field(description="the positive class when prob_positive >= threshold, else the negative")
    threshold: float
    label: str = Field(default="", description="the given label, when a labels file was passed")
    image_key: str
    patient_key: str


class PatientPrediction(StrictModel):
    """One row of patient_predictions.csv: a patient (source PatientID), slice probabilities aggregated as the
    package says."""

    patient_id: str = Field(default="", description="the source files' PatientID")
    n_images: int
    prob_positive: float = Field(ge=0, le=1)
    decision: str
    threshold: float
    aggregation: Literal["mean", "max"]
    label: str = ""
    patient_key: str


class PredictSummary(StrictModel):
    """predict.json: what a predict run did (counts only, no identifiers); identifier_files names the files of
    PRED_DIR that do hold identifiers, warnings what the user must know about the package."""

    package_sha256: str
    arm: str
    weights_variant: WeightsVariant
    n_files_seen: int
    n_files_quarantined: int
    quarantine_reasons: dict[str, int]
    n_images: int
    n_patients: int
    n_positive_patients: int
    threshold: float
    aggregation: Literal["mean", "max"]
    precision: str
    threads: int
    batch_size: int
    seconds: float
    identifier_files: list[str] = Field(default_factory=list, description="files of PRED_DIR naming patients (0600)")
    warnings: list[str] = Field(default_factory=list, description="what a user must know about the package")
    extra: dict[str, Any] = Field(default_factory=dict)
