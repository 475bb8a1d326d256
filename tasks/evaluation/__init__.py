"""Evaluation: statistics over test predictions, paired tests, the recommendation rule and a comparison's results.

The rule itself is tasks.evaluation.recommend.recommend (not re-exported here: the name is its module's).
"""

from tasks.evaluation.evaluate import build_results
from tasks.evaluation.pairs import delong_test, holm_adjust, mcnemar_test
from tasks.evaluation.pooling import aggregate_by_patient, choose_operating_point
from tasks.evaluation.statistics import binary_metrics, bootstrap_ci, roc_auc

__all__ = [
    "aggregate_by_patient",
    "binary_metrics",
    "bootstrap_ci",
    "build_results",
    "choose_operating_point",
    "delong_test",
    "holm_adjust",
    "mcnemar_test",
    "roc_auc",
]
