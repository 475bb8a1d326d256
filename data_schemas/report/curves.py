"""Results along one setting per arm: outer folds, training fraction (data efficiency), input size, probe depth."""

from __future__ import annotations

from pydantic import Field

from data_schemas.base import StrictModel
from data_schemas.metrics import MetricValue
from data_schemas.report.pairs import DeLongResult


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
