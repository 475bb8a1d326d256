"""Evaluation: statistics over test predictions and the results of a comparison."""

from tasks.evaluation.evaluate import build_results
from tasks.evaluation.statistics import bootstrap_ci, roc_auc

__all__ = ["bootstrap_ci", "build_results", "roc_auc"]
