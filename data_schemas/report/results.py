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

from typing import Any, Literal

from pydantic import Field, model_validator

from data_schemas.base import StrictModel
from data_schemas.cost import WallTimeEstimate
from data_schemas.dataset import DatasetCard
from data_schemas.package import CompressionComparison
from data_schemas.report.arm import ArmResult, UnitLevel
from data_schemas.report.curves import ArmFolds, DataEfficiencyPoint, InputSizePoint, ProbeDepthPoint
from data_schemas.report.pairs import PairedComparison, PatientRow
from data_schemas.report.verdict import Recommendation, WhatToTrain
from data_schemas.visual import VisualSummary

REPORT_SCHEMA_VERSION = "2.0"

EvaluationMode = Literal["holdout", "cross-validated"]
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
