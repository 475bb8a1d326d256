"""reports.formatting and the headline wording: how intervals read in every table and sentence of the report."""

from __future__ import annotations

from data_schemas.metrics import MetricValue
from reports.formatting import fmt_ci
from reports.wording import auc_with_ci


def test_an_interval_reads_value_then_bounds() -> None:
    assert fmt_ci(MetricValue(value=0.912, ci_low=0.871, ci_high=0.944)) == "0.912 (0.871–0.944)"


def test_a_zero_width_interval_is_not_estimable_never_certainty() -> None:
    # Perfect separation in a small test part: every bootstrap resample gives AUC 1.
    assert fmt_ci(MetricValue(value=1.0, ci_low=1.0, ci_high=1.0)) == "1.000 (interval not estimable)"
    assert fmt_ci(MetricValue(value=0.0, ci_low=0.0, ci_high=0.0), digits=2) == "0.00 (interval not estimable)"


def test_a_missing_interval_shows_the_value_alone() -> None:
    assert fmt_ci(MetricValue(value=0.5, ci_low=None, ci_high=None)) == "0.500"
    assert fmt_ci(None) == "—"


def test_the_headline_says_the_same_of_a_zero_width_interval() -> None:
    assert auc_with_ci(MetricValue(value=1.0, ci_low=1.0, ci_high=1.0)) == "1.00 (interval not estimable)"
    assert auc_with_ci(MetricValue(value=0.82, ci_low=0.71, ci_high=0.9)) == "0.82 (95% CI 0.71 to 0.90)"
