"""One arm's results in results.json: its status, test metrics with intervals, curves, operating point,
overfitting gap, weights and deployment cost."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from data_schemas.base import StrictModel
from data_schemas.metrics import MetricValue
from data_schemas.package import DeploymentCost

ArmStatus = Literal["completed", "skipped", "failed"]
UnitLevel = Literal["slice", "patient"]


class ArmCostSummary(StrictModel):
    """Estimated versus measured cost of training one arm; every field optional."""

    estimated_seconds: float | None = None
    actual_seconds: float | None = None
    estimated_images_per_second: float | None = None
    images_per_second: float | None = None
    flops_per_image: float | None = Field(default=None, description="forward FLOPs per image")
    total_flops: float | None = Field(default=None, description="training FLOPs, forward + backward, all epochs")
    utilisation: float | None = Field(default=None, ge=0, le=1, description="achieved / peak FLOP/s")
    device: str = ""


class TestMetrics(StrictModel):
    """Test-set metrics of one arm at one level (slices, or patients after aggregation), each with a
    patient-level bootstrap confidence interval, on the pooled test predictions of every run of the arm.

    threshold: the decision threshold when every run used the same one; None when each outer fold used its own
    (see ArmResult.operating_point). ece: positive-class ECE, the quantity the reliability diagram plots.
    """

    __test__ = False  # not a pytest test class

    level: UnitLevel = "slice"
    n_images: int = Field(ge=0)
    n_patients: int = Field(ge=0)
    threshold: float | None = None
    ci_level: float = 0.95
    n_bootstrap: int = 0
    n_bootstrap_skipped_auc: int = Field(default=0, description="resamples with a single class, left out of the AUC CI")
    roc_auc: MetricValue
    accuracy: MetricValue
    balanced_accuracy: MetricValue
    sensitivity: MetricValue
    specificity: MetricValue
    f1: MetricValue
    brier: MetricValue
    ece: MetricValue


METRIC_NAMES: tuple[str, ...] = (
    "roc_auc",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "f1",
    "brier",
    "ece",
)


class EpochRecord(StrictModel):
    """One epoch of a learning curve."""

    epoch: int = Field(ge=1)
    train_loss: float | None = None
    val_loss: float | None = None
    train_eval_loss: float | None = Field(default=None, description="plain cross-entropy on training images, eval mode")
    train_auc: float | None = None
    val_auc: float | None = None
    lr: float | None = None
    seconds: float | None = Field(default=None, description="wall-clock seconds of this epoch")


class Convergence(StrictModel):
    """How quickly an arm got close to its best validation AUC."""

    fraction: float = 0.95
    best_val_auc: float | None = None
    epochs_to_fraction: int | None = None
    seconds_to_fraction: float | None = None


class RocPoint(StrictModel):
    """One point of a test ROC curve."""

    fpr: float
    tpr: float
    threshold: float


class CalibrationBin(StrictModel):
    """One equal-width bin of a reliability diagram of the positive-class probability."""

    bin_low: float
    bin_high: float
    mean_predicted: float
    fraction_positive: float
    count: int = Field(ge=0)


class ConfusionMatrix(StrictModel):
    """Counts of test images (or patients): counts[i][j] = true labels[i] predicted as labels[j]."""

    labels: list[str]
    counts: list[list[int]]
    threshold: float | None = None
    level: UnitLevel = "slice"


class OperatingPointChoice(StrictModel):
    """The decision thresholds of one arm and how they were chosen.

    Args:
        rule: the setting, e.g. "youden", "sensitivity:0.9", "fixed:0.3".
        source: "validation" (chosen on each run's validation predictions), "fixed" (given), or "fallback"
            (no usable validation predictions: the fixed 0.5, labelled as such).
        slice_thresholds: one per run (outer fold), chosen on that run's validation slices.
        patient_thresholds: one per run, chosen on that run's validation patients (aggregated probabilities).
        note: why a fallback was used.
    """

    rule: str
    source: Literal["validation", "fixed", "fallback"]
    slice_thresholds: list[float]
    patient_thresholds: list[float]
    note: str = ""


class EarlyStoppingInfo(StrictModel):
    """Which quantity selected the best epoch and stopped training, from the run's config.json."""

    monitor: str
    patience: int | None = None
    min_epochs: int | None = None
    why: str = ""


class ArmWeights(StrictModel):
    """The pretrained weights file an arm started from: shareable name and hash, never its path.

    Args:
        file_name: the weights file's name (what --weights was given, without its folder).
        sha256: SHA-256 of the file.
        source: "file" (--weights), "torch_hub_cache" or "download".
        hash_checked: True when the file name carries a hash prefix and the SHA-256 matched it (torchvision style);
            False means nothing checked that these are the published ImageNet weights.
    """

    file_name: str
    sha256: str
    source: str = "file"
    hash_checked: bool = False


class OverfittingGap(StrictModel):
    """The overfitting gap of one run at one epoch: mean validation loss minus mean training loss, both plain
    cross-entropy in eval mode (positive: the model fits its training images better), with a 95% percentile
    bootstrap interval that resamples training and validation patients independently.

    Args:
        fold: the outer fold (0 in hold-out mode).
        role: "chosen" (the epoch model selection kept; biased towards a small gap, as it has the lowest validation
            loss) or "last" (the last epoch trained).
        epoch: that epoch.
        gap: the gap with its interval; no interval when the run saved no per-image losses (older runs) or a part
            has fewer than two patients.
        val_loss / train_loss: the two means.
        n_val_patients / n_train_patients: patients behind each mean (0 when unknown).
    """

    fold: int = Field(ge=0)
    role: Literal["chosen", "last"]
    epoch: int = Field(ge=1)
    gap: MetricValue
    val_loss: float | None = None
    train_loss: float | None = None
    n_val_patients: int = Field(default=0, ge=0)
    n_train_patients: int = Field(default=0, ge=0)


class ArmResult(StrictModel):
    """One training arm (e.g. "scratch" or "imagenet") and everything measured about it.

    Args:
        name: arm name, unique within a run.
        status: "completed", "skipped" (never started) or "failed" (started, did not finish).
        reason: why the arm was skipped or failed, phrased as what to do about it.
        config: the arm's training configuration (hyper-parameters, weights source); no identifiers.
        seed: the arm's training seed.
        cost: estimated versus actual training cost.
        test_metrics: test-set metrics with CIs; None unless completed.
        learning_curve: per-epoch losses, AUCs, learning rate and time.
        best_epoch: epoch whose weights were kept (by the early-stopping monitor, validation loss by default).
        stopped_epoch: last epoch trained; less than the configured maximum when early stopping fired.
        early_stopped: True when training stopped before the configured number of epochs.
        overfitting_gap: val_loss - train_eval_loss at best_epoch of the first run, both plain cross-entropy in eval
            mode (positive: the model fits train better); None when the run did not record train_eval_loss.
        overfitting: the gap at the chosen and at the last epoch of every run (each outer fold), with intervals.
        patient_metrics: test metrics per patient (aggregated slice probabilities); None unless completed.
        operating_point: the thresholds used and how they were chosen.
        n_runs: runs pooled (1 in hold-out mode, the outer folds in cross-validated mode).
        early_stopping: the monitored quantity and why; learning curves show the first run.
        convergence: epochs and seconds to reach a fraction of the best validation AUC.
        roc: test ROC curve points.
        calibration: test reliability diagram bins.
        confusion: test confusion matrix at the decision threshold.
        profile: the training profile of the arm's runs (config.json), e.g. "smoke"; empty when unknown.
        weights: the pretrained weights file the arm started from; None for random initialisation or when unknown.
        deployment: what the arm's model package costs to run on the machine that made the comparison
            (tasks.packaging.deploy_cost); None when no package was written.
        package_dir: the arm's model package folder (model.pt, MODEL_CARD.md), relative to the report folder.
    """

    name: str = Field(min_length=1)
    status: ArmStatus
    reason: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    cost: ArmCostSummary = Field(default_factory=ArmCostSummary)
    test_metrics: TestMetrics | None = None
    patient_metrics: TestMetrics | None = None
    operating_point: OperatingPointChoice | None = None
    n_runs: int = Field(default=1, ge=0)
    early_stopping: EarlyStoppingInfo | None = None
    learning_curve: list[EpochRecord] = Field(default_factory=list)
    best_epoch: int | None = None
    stopped_epoch: int | None = None
    early_stopped: bool = False
    overfitting_gap: float | None = None
    overfitting: list[OverfittingGap] = Field(default_factory=list)
    convergence: Convergence | None = None
    roc: list[RocPoint] = Field(default_factory=list)
    calibration: list[CalibrationBin] = Field(default_factory=list)
    confusion: ConfusionMatrix | None = None
    profile: str = ""
    weights: ArmWeights | None = None
    deployment: DeploymentCost | None = None
    package_dir: str = ""

    @model_validator(mode="after")
    def _completed_has_metrics(self) -> ArmResult:
        if self.status == "completed" and self.test_metrics is None:
            raise ValueError(f"arm {self.name!r} is completed but has no test_metrics")
        if self.status != "completed" and not self.reason:
            raise ValueError(f"arm {self.name!r} is {self.status} but gives no reason")
        return self
