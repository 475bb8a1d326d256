"""results.json: every number a comparison report shows, and nothing that identifies a patient.

The report stage renders report.html / report.md from one ComparisonResults and nothing else, so the
numbers in the browser, in the Prefect UI and in results.json are always the same numbers.

Privacy: no patient, study, series or image keys appear here as identifier columns. Image-level predictions
stay in the run folders; aggregates (counts, metrics, curves) are copied into this file, plus one row per test
patient (PatientRow) named only by a short prefix of its HMAC pseudonym, the same pseudonym the shareable
manifest uses, so that a reviewer can look the patient's images up without learning who it is. A validator
rejects any mapping key that looks like an identifier column (see FORBIDDEN_KEYS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from data_schemas.base import StrictModel
from data_schemas.cost import WallTimeEstimate
from data_schemas.dataset import DatasetCard
from data_schemas.metrics import MetricValue
from data_schemas.package import CompressionComparison, DeploymentCost
from data_schemas.visual import VisualSummary

REPORT_SCHEMA_VERSION = "2.0"

RESULTS_FILE = "results.json"
REPORT_HTML_FILE = "report.html"
REPORT_MD_FILE = "report.md"
# Configuration dumps, package versions and seeds: linked from the report, kept out of its way.
REPORT_APPENDIX_HTML_FILE = "report-appendix.html"
REPORT_APPENDIX_MD_FILE = "report-appendix.md"
FIGURES_DIR = "figures"
REPORT_LOCK_FILE = ".write.lock"  # held by the one comparison writing into a report folder
# What makes a folder a report folder: a written report, or plan.json (a comparison at work there).
REPORT_FOLDER_FILES = (REPORT_HTML_FILE, REPORT_MD_FILE, RESULTS_FILE, "plan.json")
AUC_TIE_TOLERANCE = 0.0005  # AUCs that print the same at three decimals are a tie, never ranked by list order



def outermost_report_folder(path: Path) -> Path | None:
    """The outermost of `path` and its parents that is a report folder (holds one of REPORT_FOLDER_FILES); None
    when none is. Whatever lies under it is shared with the report, so nothing private may be written there."""
    found = None
    for folder in [Path(path), *Path(path).parents]:
        if any((folder / name).is_file() for name in REPORT_FOLDER_FILES):
            found = folder
    return found


ArmStatus = Literal["completed", "skipped", "failed"]
EvaluationMode = Literal["holdout", "cross-validated"]
UnitLevel = Literal["slice", "patient"]
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


class DeLongResult(StrictModel):
    """Paired comparison of two arms' ROC AUCs on the same test units; numbers None and a reason when not estimable.

    method names the test behind p_value: an exact paired permutation test (each patient's two arms swapped,
    Bandos et al. 2005), at the slice level with all of a patient's slices swapped together. interval_method names
    the interval ci_of_diff: MOVER (Zou & Donner 2008) over Newcombe's score intervals, inside [-1, 1] and never of
    zero width. p_holm: Holm-adjusted over all arm pairs. n_positive / n_negative: patients of each class.
    """

    auc_a: float | None = None
    auc_b: float | None = None
    diff: float | None = Field(default=None, description="auc_a - auc_b")
    z: float | None = None
    p_value: float | None = Field(default=None, ge=0, le=1)
    p_holm: float | None = Field(default=None, ge=0, le=1)
    ci_of_diff: tuple[float, float] | None = None
    level: float = 0.95
    method: str = ""
    interval_method: str = ""
    n_positive: int = Field(default=0, ge=0)
    n_negative: int = Field(default=0, ge=0)
    reason: str = Field(default="", description="why the test is not estimable; empty when it is")

    @field_validator("ci_of_diff")
    @classmethod
    def _inside_unit_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not (-1.0 <= value[0] <= value[1] <= 1.0):
            raise ValueError(f"an AUC difference interval lies in [-1, 1] with low <= high, got {value}")
        return value


class McNemarResult(StrictModel):
    """McNemar-type test of paired right/wrong decisions at each arm's operating point.

    method: "clustered" (Durkalski 2003, chi-square, no continuity correction), "exact_permutation" (exact
    sign-flip test over discordant patients, used when few patients disagree), "exact" (binomial), "chi2_cc",
    or "not_estimable". method_label spells it out for the report.
    """

    b: int = Field(ge=0, description="units arm_a got right and arm_b got wrong")
    c: int = Field(ge=0, description="units arm_a got wrong and arm_b got right")
    statistic: float | None = None
    p_value: float | None = Field(default=None, ge=0, le=1)
    p_holm: float | None = Field(default=None, ge=0, le=1)
    method: Literal["exact", "chi2_cc", "clustered", "exact_permutation", "not_estimable"]
    method_label: str = ""
    n_discordant_units: int = Field(default=0, ge=0, description="patients (or images) whose decisions differ")
    reason: str = ""


class PairedComparison(StrictModel):
    """Two arms compared on the same pooled test predictions, per slice and per patient."""

    arm_a: str
    arm_b: str
    n_images: int = Field(default=0, ge=0)
    n_patients: int = Field(default=0, ge=0)
    delong: DeLongResult | None = None
    mcnemar: McNemarResult | None = None
    patient_delong: DeLongResult | None = None
    patient_mcnemar: McNemarResult | None = None
    plain_words: str = ""


class PatientRow(StrictModel):
    """One test patient of the per-patient table: pseudonym prefix, label, probability and verdict per arm."""

    pseudonym: str = Field(description="first characters of the HMAC pseudonym of the shareable manifest")
    label: str
    n_images: int = Field(ge=1)
    probs: dict[str, float] = Field(default_factory=dict, description="aggregated probability per arm")
    correct: dict[str, bool] = Field(default_factory=dict, description="right at the arm's patient threshold")


class EvaluationSummary(StrictModel):
    """How the numbers were produced.

    Args:
        mode: "holdout" (one fixed test part) or "cross-validated" (outer folds, each patient tested once, pooled).
        runs_per_arm: runs pooled per arm.
        aggregation: how slice probabilities become a patient probability ("mean" or "max").
        operating_point: the threshold rule, chosen on validation predictions.
        non_inferiority_margin: delta of the recommendation rule, in AUC.
        primary_level: the level whose AUC comparisons drive the recommendation.
        n_test_patients / n_test_images: pooled test units (of the first completed arm).
        n_labelled_patients: labelled patients in the split (all of them are tested once in cross-validated mode).
        holdout_test_fraction: the split's test_fraction, the share of patients a hold-out test part holds (the
            expected interval width of the other mode is worked out from it).
    """

    mode: EvaluationMode
    runs_per_arm: dict[str, int] = Field(default_factory=dict)
    aggregation: Literal["mean", "max"] = "mean"
    operating_point: str = "youden"
    non_inferiority_margin: float = 0.02
    n_bootstrap: int = 0
    ci_level: float = 0.95
    alpha: float = 0.05
    primary_level: UnitLevel = "patient"
    n_test_patients: int = 0
    n_test_images: int = 0
    n_labelled_patients: int = 0
    holdout_test_fraction: float | None = Field(default=None, gt=0, lt=1)
    auc_test: str = ("exact paired permutation test, each patient's two arms swapped (Bandos et al. 2005); MOVER "
                     "interval "
                     "(Zou & Donner 2008)")
    decision_test: str = "clustered McNemar with per-patient proportions (Durkalski et al. 2003)"
    min_patients_per_class: int = Field(default=10, description="the verdict's minimum of test patients per class")
    notes: list[str] = Field(default_factory=list, description="the mode, interval width between modes, aggregation, "
                             "operating point and tests, in words (written by reports.wording)")


class FoldMetrics(StrictModel):
    """Test metrics of one arm on one outer fold's test patients, at that fold's own threshold."""

    fold: int = Field(ge=0)
    n_train_patients: int | None = None
    n_test_patients: int | None = None
    threshold: float | None = None
    metrics: dict[str, float]


class ArmFolds(StrictModel):
    """Outer-fold results of one arm: per fold, and mean and standard deviation (ddof=1) over folds."""

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


class InputSizePoint(StrictModel):
    """Validation and test AUC and training cost of one arm trained at one input size (outer fold 0, same split).

    The size is chosen on validation AUC (chosen), never on test AUC; vs_chosen compares this size's test AUC with
    the chosen size's on the same test images (AUC(this) - AUC(chosen), p Holm-adjusted over the arm's sizes).
    """

    arm: str
    image_size: int = Field(ge=16)
    test_auc: MetricValue = Field(description="slice-level test AUC with its patient-clustered bootstrap 95% CI (as "
                                              "data_efficiency)")
    val_auc: float | None = Field(default=None, description="slice-level validation AUC of the same run")
    chosen: bool = Field(default=False, description="the size chosen on validation AUC")
    vs_chosen: DeLongResult | None = None
    train_seconds: float | None = Field(default=None, description="measured training wall time (timing.json)")
    train_flops: float | None = Field(default=None, description="measured images seen x training FLOPs per image")
    forward_flops_per_image: float | None = None


class ProbeDepthPoint(StrictModel):
    """The linear probe of one imagenet-linear arm at one depth (its main run's probe_depths.json)."""

    arm: str
    depth: str
    feature_dim: int = Field(ge=1)
    val_auc: float | None = None
    test_auc: float | None = Field(default=None, description="slice-level test AUC of this depth's probe")
    chosen: bool = Field(description="the depth chosen by validation AUC, whose predictions are the arm's")


class BudgetChoice(StrictModel):
    """Among arms whose measured training compute fits a budget: the highest patient-level test AUC point estimate,
    arms tied with it or with overlapping intervals, and whether the paired tests show it best.

    Args:
        budget_flops: the budget: this arm's measured training FLOPs.
        budget_seconds: that arm's measured training wall time.
        highest_arm: the arm with the highest point estimate within the budget (with a tie, see tied_with).
        auc: its patient-level test AUC with its 95% CI.
        tied_with: other arms within the budget whose AUC equals it at the three decimals shown.
        overlapping: other arms within the budget whose 95% AUC interval overlaps its interval.
        shown_best: True only when the paired patient-level AUC test shows highest_arm above every other arm in
            the budget (Holm-adjusted p < 0.05, with the recommendation's minimum of test patients per class).
    """

    budget_flops: float
    budget_seconds: float | None = None
    highest_arm: str
    auc: MetricValue
    tied_with: list[str] = Field(default_factory=list)
    overlapping: list[str] = Field(default_factory=list)
    shown_best: bool = False


class WhatToTrain(StrictModel):
    """"What to train": answers read off measured numbers, never a winner from a point estimate (reports.wording words
    them).

    Args:
        budgets: for each completed arm's measured training compute as a budget, ascending, the highest point
            estimate within it (the compute-AUC frontier).
        highest_arm: the arm with the highest patient-level test AUC point estimate.
        tied_with: arms tied with it (equal at the three decimals shown).
        overlapping: arms whose 95% AUC interval overlaps highest_arm's.
        shown_best: the paired patient-level AUC test shows highest_arm above every other arm (see BudgetChoice).
        smallest_non_inferior: the arm with the fewest forward FLOPs per image whose patient-level AUC is
            non-inferior to highest_arm and every arm tied with it (lower 95% bound of the paired difference >
            -margin), or highest_arm.
        smallest_ci_of_diff: that arm's AUC minus highest_arm's, 95% CI (None when it is highest_arm).
        margin: the non-inferiority margin (the recommendation's).
        chosen_depth: per imagenet-linear arm, the depth chosen on validation.
        chosen_size: per arm with an input-size curve, the size chosen on validation AUC (absent when no size had a
            validation AUC).
        sentences: the section in words, filled by reports.wording.
    """

    budgets: list[BudgetChoice] = Field(default_factory=list)
    highest_arm: str | None = None
    tied_with: list[str] = Field(default_factory=list)
    overlapping: list[str] = Field(default_factory=list)
    shown_best: bool = False
    smallest_non_inferior: str | None = None
    smallest_ci_of_diff: tuple[float, float] | None = None
    margin: float | None = None
    chosen_depth: dict[str, str] = Field(default_factory=dict)
    chosen_size: dict[str, int] = Field(default_factory=dict)
    sentences: list[str] = Field(default_factory=list)


class Recommendation(StrictModel):
    """What the numbers say to do, derived from them by tasks.evaluation.recommend.recommend (docs/verdict.md).

    Args:
        headline: one or two sentences shown first in the report.
        details: supporting sentences (per-pair tests, costs, caveats).
        preferred_arm: the arm recommended, None when no arm can be recommended.
        basis: "significant" (best AUC higher than every other's, Holm-adjusted exact permutation p < alpha),
            "non_inferior" (an arm with materially fewer FLOPs whose interval lower bound of the AUC difference lies
            above -margin against every arm not materially cheaper), "inconclusive" (nothing settled at this
            sample size), "too_few" (fewer than min_patients_per_class test patients of a class: nothing claimed),
            "single_arm" (only one arm completed), "none" (nothing completed).
        best_arm: the arm with the highest AUC point estimate (a winner only when basis is "significant").
        margin: the non-inferiority margin used, in AUC.
        alpha: the family-wise level of the significance claims.
        level: "patient" or "slice": whose AUC comparisons decided.
        patients_needed: test patients for a non-inferiority claim of the cheaper arm at the margin with `power`,
            if the arms truly performed alike (tasks.evaluation.recommend.patients_needed).
        power: the power patients_needed plans for.
        min_patients_per_class: the rule's minimum of positive and of negative test patients for any claim.
        n_positive / n_negative: test patients of each class.
        cost_measure: what ranks the arms by cost.
        deciding_arms: [arm, other] of the comparison whose interval decided a non-inferior, inconclusive or
            too-few verdict (the preferred or cheapest arm first).
    """

    headline: str
    details: list[str] = Field(default_factory=list)
    preferred_arm: str | None = None
    basis: Literal["significant", "non_inferior", "inconclusive", "too_few", "single_arm", "none"]
    best_arm: str | None = None
    margin: float | None = None
    alpha: float = 0.05
    level: UnitLevel = "patient"
    patients_needed: int | None = None
    power: float = 0.8
    min_patients_per_class: int = 10
    n_positive: int = 0
    n_negative: int = 0
    cost_measure: str = "computed training + inference FLOPs (an arm is cheaper with at least 20% fewer)"
    deciding_arms: list[str] = Field(default_factory=list, description="[arm, other arm] of the pair that decided")


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
        schema_version: "2.0".
        run_id: the run's identifier (also the run folder name).
        created_at: ISO-8601 time the results were assembled.
        title: report title.
        dataset: dataset card and class roles.
        split: patient-level split summary with the no-overlap check.
        arms: every arm, including skipped and failed ones.
        evaluation: mode, aggregation, operating-point rule, margin: how the numbers were produced.
        comparisons: paired tests between completed arms, per slice and per patient.
        patients: the per-patient table (pseudonym prefix, label, probability and verdict per arm).
        folds: per-outer-fold results per arm, in cross-validated mode.
        data_efficiency: test AUC versus training fraction, when run.
        input_sizes: test AUC and training cost versus training image size, when run (--sizes).
        probe_depths: validation and test AUC of each imagenet-linear arm's probe at every depth.
        what_to_train: the "What to train" section, from the numbers above.
        recommendation: the headline recommendation.
        reproducibility: versions, seeds, configs and dataset hash.
        compression: the recommended arm's compressed package (int8, or bf16 weights) against its full-precision
            one: size, latency, test AUC.
        predicted_wall_time: the whole comparison's wall time as the cost stage predicted it (cost.json).
        visual: example images, saliency per network arm and the shortcut check (data_schemas/visual.py). Rendered
            into report.html (inline PNGs) and report.md (figures/visual_*.png) but left out of results.json
            (exclude=True): its PNG data URIs would make the file megabytes of base64 for no number, and its slice
            list carries image and patient keys, which results.json never holds.
    """

    schema_version: Literal["2.0"] = REPORT_SCHEMA_VERSION
    run_id: str
    created_at: str
    title: str = "ResNet-50: from scratch vs ImageNet weights"
    dataset: DatasetSummary
    split: SplitSummary
    evaluation: EvaluationSummary
    arms: list[ArmResult]
    comparisons: list[PairedComparison] = Field(default_factory=list)
    patients: list[PatientRow] = Field(default_factory=list)
    folds: list[ArmFolds] | None = None
    data_efficiency: list[DataEfficiencyPoint] | None = None
    input_sizes: list[InputSizePoint] | None = None
    probe_depths: list[ProbeDepthPoint] | None = None
    what_to_train: WhatToTrain | None = None
    recommendation: Recommendation
    reproducibility: Reproducibility
    compression: CompressionComparison | None = None
    predicted_wall_time: WallTimeEstimate | None = None
    compression_package_dir: str = Field(default="", description="the compressed package's folder, relative to the "
                                                                 "report folder")
    visual: VisualSummary | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> ComparisonResults:
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        known = set(names)
        referenced = [c.arm_a for c in self.comparisons] + [c.arm_b for c in self.comparisons]
        referenced += [f.arm for f in self.folds or []] + [p.arm for p in self.data_efficiency or []]
        referenced += [p.arm for p in self.input_sizes or []] + [p.arm for p in self.probe_depths or []]
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
