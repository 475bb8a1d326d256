"""results.json: every number a comparison report shows, and nothing that identifies a patient.

The report stage renders report.html / report.md from one ComparisonResults and nothing else, so the
numbers in the browser, in the Prefect UI and in results.json are always the same numbers.

Privacy: no patient, study, series or image keys appear here. Image-level predictions stay in the
run folders; only aggregates (counts, metrics, curves) are copied into this file. A validator rejects
any mapping key that looks like an identifier column (see FORBIDDEN_KEYS).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from data_schemas.base import StrictModel

from data_schemas.dataset import DatasetCard

REPORT_SCHEMA_VERSION = "1.0"

RESULTS_FILE = "results.json"
REPORT_HTML_FILE = "report.html"
REPORT_MD_FILE = "report.md"
FIGURES_DIR = "figures"

ArmStatus = Literal["completed", "skipped", "failed"]
SplitPartName = Literal["train", "val", "test"]

FORBIDDEN_KEYS = frozenset(
    {
        "patient_key",
        "patient_id",
        "patientid",
        "patient_name",
        "patientname",
        "study_key",
        "series_key",
        "image_key",
        "sop_instance_uid",
        "study_instance_uid",
        "series_instance_uid",
        "accession_number",
    }
)




class MetricValue(StrictModel):
    """A point estimate with its confidence interval (None where undefined, e.g. AUC with one class)."""

    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


class DatasetSummary(StrictModel):
    """The dataset the run used: the shareable dataset card, embedded unchanged, plus the class roles.

    Args:
        card: dataset.json of the dataset folder (counts, label distribution, fingerprint, quarantine
            counts by reason, content hash). Shareable: holds no identifiers.
        classes: class names in model output order, negative first.
        positive_class: the class whose probability the models output (the "disease" class).
        name: short human name of the dataset, e.g. the folder name.
    """

    card: DatasetCard
    classes: list[str]
    positive_class: str
    name: str = ""

    @model_validator(mode="after")
    def _positive_is_a_class(self) -> DatasetSummary:
        if self.positive_class not in self.classes:
            raise ValueError(f"positive_class {self.positive_class!r} is not one of classes {self.classes}")
        return self


class SplitPart(StrictModel):
    """One part of the patient-level split."""

    name: SplitPartName
    n_patients: int = Field(ge=0)
    n_images: int = Field(ge=0)
    patients_per_class: dict[str, int] = Field(default_factory=dict)
    images_per_class: dict[str, int] = Field(default_factory=dict)


class SplitSummary(StrictModel):
    """How patients were divided into train / val / test.

    Args:
        parts: train, val and test, each with patient and image counts per class.
        no_patient_overlap: True when no patient has images in more than one part (checked, not assumed).
        strategy: how the split was drawn, e.g. "stratified by patient label".
        seed: seed of the split.
        n_folds: number of cross-validation folds, None for a single split.
    """

    parts: list[SplitPart]
    no_patient_overlap: bool
    strategy: str = ""
    seed: int | None = None
    n_folds: int | None = None


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
    """Test-set metrics of one arm, each with a patient-level bootstrap confidence interval."""

    __test__ = False  # not a pytest test class

    n_images: int = Field(ge=0)
    n_patients: int = Field(ge=0)
    threshold: float = 0.5
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
    """Counts of test images: counts[i][j] = true labels[i] predicted as labels[j]."""

    labels: list[str]
    counts: list[list[int]]
    threshold: float = 0.5


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
        best_epoch: epoch whose weights were kept (best validation AUC).
        stopped_epoch: last epoch trained; less than the configured maximum when early stopping fired.
        early_stopped: True when training stopped before the configured number of epochs.
        overfitting_gap: val_loss - train_loss at best_epoch (positive: the model fits train better).
        convergence: epochs and seconds to reach a fraction of the best validation AUC.
        roc: test ROC curve points.
        calibration: test reliability diagram bins.
        confusion: test confusion matrix at the decision threshold.
    """

    name: str = Field(min_length=1)
    status: ArmStatus
    reason: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    cost: ArmCostSummary = Field(default_factory=ArmCostSummary)
    test_metrics: TestMetrics | None = None
    learning_curve: list[EpochRecord] = Field(default_factory=list)
    best_epoch: int | None = None
    stopped_epoch: int | None = None
    early_stopped: bool = False
    overfitting_gap: float | None = None
    convergence: Convergence | None = None
    roc: list[RocPoint] = Field(default_factory=list)
    calibration: list[CalibrationBin] = Field(default_factory=list)
    confusion: ConfusionMatrix | None = None

    @model_validator(mode="after")
    def _completed_has_metrics(self) -> ArmResult:
        if self.status == "completed" and self.test_metrics is None:
            raise ValueError(f"arm {self.name!r} is completed but has no test_metrics")
        if self.status != "completed" and not self.reason:
            raise ValueError(f"arm {self.name!r} is {self.status} but gives no reason")
        return self


class DeLongResult(StrictModel):
    """DeLong test of two correlated ROC AUCs on the same test images."""

    auc_a: float
    auc_b: float
    diff: float = Field(description="auc_a - auc_b")
    z: float
    p_value: float = Field(ge=0, le=1)
    ci_of_diff: tuple[float, float]
    level: float = 0.95


class McNemarResult(StrictModel):
    """McNemar test of paired correct/incorrect decisions at the threshold."""

    b: int = Field(ge=0, description="images arm_a got right and arm_b got wrong")
    c: int = Field(ge=0, description="images arm_a got wrong and arm_b got right")
    statistic: float
    p_value: float = Field(ge=0, le=1)
    method: Literal["exact", "chi2_cc", "clustered"]


class PairedComparison(StrictModel):
    """Two arms compared on the same test images."""

    arm_a: str
    arm_b: str
    delong: DeLongResult | None = None
    mcnemar: McNemarResult | None = None
    plain_words: str = ""


class FoldMetrics(StrictModel):
    """Test metrics of one arm on one cross-validation fold."""

    fold: int = Field(ge=0)
    n_train_patients: int | None = None
    n_test_patients: int | None = None
    metrics: dict[str, float]


class ArmFolds(StrictModel):
    """Cross-validation results of one arm: per fold, and mean and standard deviation over folds."""

    arm: str
    per_fold: list[FoldMetrics]
    mean: dict[str, float]
    std: dict[str, float]


class DataEfficiencyPoint(StrictModel):
    """Test AUC of one arm trained on a fraction of the training patients."""

    arm: str
    fraction: float = Field(gt=0, le=1)
    n_train_patients: int = Field(ge=0)
    n_train_images: int | None = None
    test_auc: MetricValue


class Recommendation(StrictModel):
    """What the numbers say to do, derived from them by tasks.statistics.recommend.

    Args:
        headline: one or two sentences shown first in the report.
        details: supporting sentences (per-pair tests, costs, caveats).
        preferred_arm: the arm recommended, None when no arm can be recommended.
        basis: "significant" (a significantly better AUC), "tied_cost" (AUCs not significantly
            different, cheaper arm preferred), "single_arm" (only one arm completed), "none" (nothing
            completed).
    """

    headline: str
    details: list[str] = Field(default_factory=list)
    preferred_arm: str | None = None
    basis: Literal["significant", "tied_cost", "single_arm", "none"]


class Reproducibility(StrictModel):
    """What is needed to rerun and to check that a rerun matched."""

    run_id: str
    created_at: str
    dataset_hash: str
    ctcompare_version: str = ""
    package_versions: dict[str, str] = Field(default_factory=dict)
    seeds: dict[str, int] = Field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    config_hash: str = ""
    python_version: str = ""
    platform: str = ""
    command: str = Field(default="", description="CLI command line of the run, without private paths")


class ComparisonResults(StrictModel):
    """results.json: the complete set of numbers behind one comparison report.

    Args:
        schema_version: "1.0".
        run_id: the run's identifier (also the run folder name).
        created_at: ISO-8601 time the results were assembled.
        title: report title.
        dataset: dataset card and class roles.
        split: patient-level split summary with the no-overlap check.
        arms: every arm, including skipped and failed ones.
        comparisons: paired tests between completed arms.
        folds: cross-validation results per arm, when run.
        data_efficiency: test AUC versus training fraction, when run.
        recommendation: the headline recommendation.
        reproducibility: versions, seeds, configs and dataset hash.
    """

    schema_version: Literal["1.0"] = REPORT_SCHEMA_VERSION
    run_id: str
    created_at: str
    title: str = "ResNet-50: from scratch vs ImageNet weights"
    dataset: DatasetSummary
    split: SplitSummary
    arms: list[ArmResult]
    comparisons: list[PairedComparison] = Field(default_factory=list)
    folds: list[ArmFolds] | None = None
    data_efficiency: list[DataEfficiencyPoint] | None = None
    recommendation: Recommendation
    reproducibility: Reproducibility

    @model_validator(mode="after")
    def _consistent(self) -> ComparisonResults:
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        known = set(names)
        referenced = [c.arm_a for c in self.comparisons] + [c.arm_b for c in self.comparisons]
        referenced += [f.arm for f in self.folds or []] + [p.arm for p in self.data_efficiency or []]
        unknown = sorted(set(referenced) - known)
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; valid arms: {names}")
        bad = sorted(_forbidden_keys(self.model_dump(mode="python")))
        if bad:
            raise ValueError(f"results must not contain identifier fields, found {bad}")
        return self

    def arm(self, name: str) -> ArmResult:
        """The arm called name."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ValueError(f"no arm {name!r}; valid arms: {[a.name for a in self.arms]}")

    @property
    def completed_arms(self) -> list[ArmResult]:
        """Arms with status "completed", in order."""
        return [arm for arm in self.arms if arm.status == "completed"]


def _forbidden_keys(obj: object) -> set[str]:
    """Mapping keys anywhere in obj that name an identifier column."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str) and key.lower() in FORBIDDEN_KEYS:
                found.add(key)
            found |= _forbidden_keys(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found |= _forbidden_keys(value)
    return found
