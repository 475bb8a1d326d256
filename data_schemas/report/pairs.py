"""Two arms compared on the same test patients (paired AUC and decision tests), and the per-patient table."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from data_schemas.base import StrictModel


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
