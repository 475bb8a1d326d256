"""How often does the worded verdict claim something false? Simulated clustered cohorts through the product's rule.

    .venv/bin/python benchmarks/verdict_calibration.py [--cohorts 400] [--seed 0] [--workers 2]

Each cohort: n patients (half positive), 1 to 8 slices each, two arms scoring the same slices with correlated
errors (a shared patient effect and a shared slice effect; Gaussian latent scores through a logistic link). The
patient-level AUC of each arm (mean of its slice probabilities) is set to the scenario's by bisection on the class
separation, so "truth" is the population patient-level AUC. The cheaper arm (a third of the dearer arm's FLOPs) is
never better. Each cohort goes through tasks.evaluation.verdict (pair tests, Holm, the rule) and
reports.wording (headline and comparison sentences) exactly as a comparison run does, and the claims are read from
the worded sentences:
  - "non-inferior": the headline prefers the cheaper arm as non-inferior (false when the true difference reaches
    the margin);
  - "significant (dearer)" / "significant (cheaper)": the headline, or a patient-level comparison sentence, says
    that arm's AUC is significantly higher (false under no difference; the cheaper arm is never truly better).
Nominal: 2.5% for each false claim (one-sided 2.5% non-inferiority test; two-sided 5% test = 2.5% per direction).
Prints one line per (n, truth) and ends with `max false-claim rate: X%`. See docs/verdict.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one thread per worker: the matrices are small, the workers are the parallelism

import numpy as np  # noqa: E402
from scipy.special import expit  # noqa: E402

from data_schemas.metrics import MetricValue  # noqa: E402
from data_schemas.report import ArmCostSummary, ArmResult, TestMetrics  # noqa: E402
from reports.wording import comparison_sentence, recommendation_sentences  # noqa: E402
from tasks.evaluation.pooling import aggregate_by_patient  # noqa: E402
from tasks.evaluation.recommend import MIN_PATIENTS_PER_CLASS  # noqa: E402
from tasks.evaluation.runs import PooledArm, Predictions  # noqa: E402
from tasks.evaluation.statistics import roc_auc  # noqa: E402
from tasks.evaluation.verdict import decide, paired_comparisons  # noqa: E402

SIZES = (6, 10, 22, 60, 150)
PATIENT_SHARE = 0.5  # correlation of the two arms' patient effects (shared patient variance)
SLICE_SD, SLICE_SHARE = 1.0, 0.5  # slice noise around the patient score, and the share common to both arms
CHEAP, DEAR = "cheap", "dear"
FLOPS = {CHEAP: 1e15, DEAR: 3e15}


class Truth(NamedTuple):
    """A scenario: the two arms' population patient-level AUCs and the margin of the rule."""

    name: str
    auc_cheap: float
    auc_dear: float
    margin: float

    @property
    def difference(self) -> float:
        return self.auc_cheap - self.auc_dear


TRUTHS = (
    Truth("no difference, AUC 0.85", 0.85, 0.85, 0.02),
    Truth("no difference, AUC 0.98", 0.98, 0.98, 0.02),
    Truth("difference = margin 0.02, AUC 0.83 vs 0.85", 0.83, 0.85, 0.02),
    Truth("difference = margin 0.02, AUC 0.96 vs 0.98", 0.96, 0.98, 0.02),
    Truth("difference = margin 0.05, AUC 0.80 vs 0.85", 0.80, 0.85, 0.05),
    Truth("difference = margin 0.05, AUC 0.93 vs 0.98", 0.93, 0.98, 0.05),
    Truth("difference 0.05 > margin 0.02, AUC 0.93 vs 0.98", 0.93, 0.98, 0.02),
    Truth("difference 0.10, AUC 0.75 vs 0.85", 0.75, 0.85, 0.02),
    Truth("difference 0.10, AUC 0.88 vs 0.98", 0.88, 0.98, 0.02),
)


# ---------------------------------------------------------------- the cohorts


def _slices_per_patient(rng: np.random.Generator, n: int) -> np.ndarray:
    return 1 + np.minimum(rng.poisson(3.0, n), 7)


def simulate_cohort(rng: np.random.Generator, n_patients: int, separations: tuple[float, float]):
    """Labels, patient of each slice, and each arm's slice probabilities of one cohort."""
    n_pos = n_patients // 2
    label = np.r_[np.ones(n_pos, np.int64), np.zeros(n_patients - n_pos, np.int64)]
    patient = np.repeat(np.arange(n_patients), _slices_per_patient(rng, n_patients))
    shared_patient = rng.standard_normal(n_patients)
    shared_slice = rng.standard_normal(patient.size)
    probs = []
    for mu in separations:
        own = rng.standard_normal(n_patients)
        score = mu * label + math.sqrt(PATIENT_SHARE) * shared_patient + math.sqrt(1 - PATIENT_SHARE) * own
        noise = math.sqrt(SLICE_SHARE) * shared_slice + math.sqrt(1 - SLICE_SHARE) * rng.standard_normal(patient.size)
        probs.append(expit(score[patient] + SLICE_SD * noise - mu / 2))
    return label[patient], patient, probs


def separation_for(auc: float, n: int = 40_000, seed: int = 12345) -> float:
    """The class separation mu whose population patient-level AUC is `auc` (bisection on common random numbers)."""
    rng = np.random.default_rng(seed)
    label = np.r_[np.ones(n, np.int64), np.zeros(n, np.int64)]
    patient = np.repeat(np.arange(2 * n), _slices_per_patient(rng, 2 * n))
    latent = rng.standard_normal(2 * n)
    noise = SLICE_SD * rng.standard_normal(patient.size)
    counts = np.bincount(patient)

    def patient_auc(mu: float) -> float:
        slice_probs = expit((mu * label + latent)[patient] + noise - mu / 2)
        return roc_auc(label, np.bincount(patient, slice_probs) / counts)

    low, high = 0.0, 8.0
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if patient_auc(mid) < auc else (low, mid)
    return (low + high) / 2


# ---------------------------------------------------------------- one cohort through the product


def _pooled(targets: np.ndarray, patient: np.ndarray, probs: np.ndarray) -> PooledArm:
    keys = [f"patient-{p:04d}" for p in patient]
    patients = aggregate_by_patient(keys, targets, probs, "mean")
    slices = Predictions([f"image-{i:05d}" for i in range(targets.size)], keys, targets, probs)
    return PooledArm(slices, np.full(targets.size, 0.5), patients, np.full(len(patients.patients), 0.5),
                     {k: int(c) for k, c in zip(*np.unique(keys, return_counts=True))})


def _arm_result(name: str, pooled: PooledArm) -> ArmResult:
    """An ArmResult with what the rule and the headline read: patient-level AUC and the computed cost."""
    others = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "brier", "ece")
    empty = {k: MetricValue() for k in others}
    auc = roc_auc(pooled.patients.targets, pooled.patients.probs)
    metrics = TestMetrics(level="patient", n_images=int(pooled.slices.targets.size),
                          n_patients=len(pooled.patients.patients), roc_auc=MetricValue(value=auc), **empty)
    return ArmResult(name=name, status="completed", cost=ArmCostSummary(total_flops=FLOPS[name], flops_per_image=1e9),
                     test_metrics=metrics.model_copy(update={"level": "slice"}), patient_metrics=metrics)


class Claims(NamedTuple):
    """What one cohort's worded verdict claims."""

    non_inferior: bool
    significant_dear: bool
    significant_cheap: bool


def worded_claims(targets: np.ndarray, patient: np.ndarray, probs: list[np.ndarray], margin: float) -> Claims:
    """Run one cohort through the product's verdict and wording; read the claims back from the sentences."""
    pooled = {CHEAP: _pooled(targets, patient, probs[0]), DEAR: _pooled(targets, patient, probs[1])}
    comparisons, tests = paired_comparisons(pooled)
    arms = [_arm_result(name, pooled[name]) for name in (CHEAP, DEAR)]
    label = pooled[CHEAP].patients.targets
    rec = decide(arms, tests, margin, int(label.sum()), int(label.size - label.sum()))
    headline, _ = recommendation_sentences(rec, arms, comparisons, int(label.size))
    sentence = comparison_sentence(comparisons[0], MIN_PATIENTS_PER_CLASS)
    patient_part = sentence.split("At the slice level")[0]
    said_significant = "a significant difference" in patient_part
    diff = comparisons[0].patient_delong.diff or 0.0  # AUC(cheap) - AUC(dear): pairs are ordered by name
    return Claims(
        non_inferior=headline.startswith(f"Prefer the cheaper {CHEAP}"),
        significant_dear=headline.startswith(f"Use {DEAR}:") or (said_significant and diff < 0),
        significant_cheap=headline.startswith(f"Use {CHEAP}:") or (said_significant and diff > 0),
    )


def _run_cell(args: tuple[int, Truth, tuple[float, float], int, int]) -> tuple[int, str, int, int, int, int, float]:
    n, truth, separations, cohorts, seed = args
    started = time.process_time()
    rng = np.random.default_rng(seed)
    counts = np.zeros(3, np.int64)
    for _ in range(cohorts):
        targets, patient, probs = simulate_cohort(rng, n, separations)
        counts += np.array(worded_claims(targets, patient, probs, truth.margin), dtype=np.int64)
    return n, truth.name, cohorts, int(counts[0]), int(counts[1]), int(counts[2]), time.process_time() - started


# ---------------------------------------------------------------- the table


class Row(NamedTuple):
    """Claim rates of one (n, truth) cell, with which of them are false claims."""

    n: int
    truth: Truth
    cohorts: int
    non_inferior: float
    significant_dear: float
    significant_cheap: float
    cpu_seconds: float = 0.0

    def false_rates(self) -> dict[str, float]:
        """The rates of claims that are false under this truth (each nominal 2.5%)."""
        false = {"significant (cheaper)": self.significant_cheap}
        if self.truth.difference <= -self.truth.margin + 1e-12:
            false["non-inferior"] = self.non_inferior
        if self.truth.difference == 0:
            false["significant (dearer)"] = self.significant_dear
        return false


def run_calibration(cohorts: int, seed: int, sizes: tuple[int, ...] = SIZES, truths: tuple[Truth, ...] = TRUTHS,
                    workers: int = 1, truth_patients: int = 40_000) -> list[Row]:
    """Claim rates of the worded verdict for every (n, truth), `cohorts` simulated cohorts each.

    truth_patients: patients per class of the large sample that sets each arm's separation to its AUC.
    """
    aucs = sorted({a for t in truths for a in (t.auc_cheap, t.auc_dear)})
    separation = {a: separation_for(a, n=truth_patients) for a in aucs}
    seeds = np.random.SeedSequence(seed).generate_state(len(sizes) * len(truths))
    cells = [(n, t, (separation[t.auc_cheap], separation[t.auc_dear]), cohorts, int(seeds[i * len(truths) + j]))
             for i, n in enumerate(sizes) for j, t in enumerate(truths)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            done = list(pool.map(_run_cell, cells))
    else:
        done = [_run_cell(cell) for cell in cells]
    by_name = {t.name: t for t in truths}
    return [Row(n, by_name[name], k, ni / k, sd / k, sc / k, cpu) for n, name, k, ni, sd, sc, cpu in done]


def format_row(row: Row) -> str:
    false = row.false_rates()

    def cell(label: str, value: float) -> str:
        return f"{label} {100 * value:5.1f}%{' (false)' if label in false else '        '}"

    return (f"n={row.n:<4d} {row.truth.name:<50s} cohorts {row.cohorts:<5d} "
            f"{cell('non-inferior', row.non_inferior)}  {cell('significant (dearer)', row.significant_dear)}  "
            f"{cell('significant (cheaper)', row.significant_cheap)}")


def max_false_rate(rows: list[Row]) -> float:
    return max(v for row in rows for v in row.false_rates().values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", type=int, default=400, help="simulated cohorts per (n, truth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes (the machine's cores)")
    args = parser.parse_args(argv)
    if args.cohorts < 1 or args.workers < 1:
        parser.error("--cohorts and --workers must be at least 1")
    start, cpu_start = time.perf_counter(), time.process_time()
    rows = run_calibration(args.cohorts, args.seed, workers=args.workers)
    cpu = time.process_time() - cpu_start + (sum(row.cpu_seconds for row in rows) if args.workers > 1 else 0.0)
    for row in rows:
        print(format_row(row))
    mc = 100 * math.sqrt(0.025 * 0.975 / args.cohorts)
    print(f"nominal 2.5% per false claim; Monte-Carlo standard error at 2.5%: {mc:.2f} points ({args.cohorts} cohorts)")
    print(f"time: {time.perf_counter() - start:.0f} s wall with {args.workers} workers, {cpu:.0f} CPU s in all")
    print(f"max false-claim rate: {100 * max_false_rate(rows):.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
