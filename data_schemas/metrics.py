"""A metric with its confidence interval: shared by results.json (report.py) and model packages (package.py).

Its own module so that report.py can embed package.py's deployment-cost schemas without an import cycle.
"""

from __future__ import annotations

from data_schemas.base import StrictModel


class MetricValue(StrictModel):
    """A point estimate with its confidence interval (None where undefined, e.g. AUC with one class)."""

    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
