"""Settings of the evaluation stage: how test predictions become a verdict.

They are part of a comparison's run plan and can be set like training settings (`--set operating_point=...`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from data_schemas.base import StrictModel

EVALUATION_MODES: tuple[str, ...] = ("holdout", "cross-validated")
AGGREGATIONS: tuple[str, ...] = ("mean", "max")
OPERATING_POINT_RULES: tuple[str, ...] = ("youden", "sensitivity:<target>", "specificity:<target>", "fixed:<threshold>")


def parse_operating_point(text: str) -> tuple[str, float | None]:
    """'youden' -> ("youden", None); 'sensitivity:0.9' -> ("sensitivity", 0.9); ValueError lists the valid forms."""
    rule, _, value = text.strip().partition(":")
    rule = rule.strip().lower()
    if rule == "youden" and not value:
        return "youden", None
    if rule in ("sensitivity", "specificity", "fixed") and value:
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if 0.0 < number < 1.0:
            return rule, number
    raise ValueError(f"operating_point {text!r} is not valid; choose from {', '.join(OPERATING_POINT_RULES)} with a "
                     "target in (0, 1).")


class EvaluationSettings(StrictModel):
    """How a comparison is scored.

    Args:
        mode: "holdout" scores one fixed test part; "cross-validated" partitions every labelled patient into
            outer folds, each fold serving once as the test part, and pools the out-of-fold predictions.
        outer_folds: number of outer folds in cross-validated mode.
        aggregation: how a patient's slice probabilities become one patient probability.
        operating_point: threshold rule applied to validation predictions, then used unchanged on the test part.
        non_inferiority_margin: an arm is non-inferior when the lower 95% bound of its AUC difference is above -margin.
        n_bootstrap: patient-level bootstrap resamples for the 95% intervals.
    """

    mode: Literal["holdout", "cross-validated"] = "holdout"
    outer_folds: int = Field(default=5, ge=2, le=20)
    aggregation: Literal["mean", "max"] = "mean"
    operating_point: str = "youden"
    non_inferiority_margin: float = Field(default=0.02, gt=0, lt=0.5)
    n_bootstrap: int = Field(default=1000, ge=10, le=100_000)

    @field_validator("operating_point")
    @classmethod
    def _valid_operating_point(cls, value: str) -> str:
        parse_operating_point(value)
        return value.strip().lower()
