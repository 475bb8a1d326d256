"""The curves beside a comparison (data efficiency, input size, probe depth) and the "What to train" answers.

None of them names a winner from a point estimate: the highest point estimate is called that, ties (equal at the
three decimals the report shows) and overlapping 95% intervals are listed, and "best" needs the paired test (the
comparisons' patient-level AUC test, Holm-adjusted, with the recommendation's minimum of patients per class). An
input size and a probe depth are chosen on validation AUC, never on test AUC; test AUCs at other sizes are compared
with the chosen size's by a paired test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from data_schemas.evaluation import EvaluationSettings
from data_schemas.files import read_model_json
from data_schemas.metrics import MetricValue
from data_schemas.report import (
    AUC_TIE_TOLERANCE,
    ArmResult,
    BudgetChoice,
    DataEfficiencyPoint,
    DeLongResult,
    InputSizePoint,
    PairedComparison,
    ProbeDepthPoint,
    WhatToTrain,
)
from data_schemas.training import PROBE_DEPTHS_FILE, ProbeDepths
from tasks.evaluation import pairs, statistics as st
from tasks.evaluation.recommend import MIN_PATIENTS_PER_CLASS
from tasks.evaluation.runs import RunData, finite, is_linear, read_run
from tasks.evaluation.verdict import auc_result

ALPHA = 0.05


def _auc_value(run: RunData, evaluation: EvaluationSettings, seed: int) -> MetricValue:
    """A run's slice-level test AUC with its patient-clustered bootstrap 95% CI."""
    t = run.test
    auc = st.bootstrap_ci(
        t.targets, t.probs, t.patient_keys, metrics=["roc_auc"], n_resamples=evaluation.n_bootstrap, seed=seed
    )["roc_auc"]
    return MetricValue(value=finite(auc.value), ci_low=finite(auc.ci_low), ci_high=finite(auc.ci_high))


def efficiency_points(
    arm: str, fraction_dirs: dict[float, Path], evaluation: EvaluationSettings, seed: int
) -> list[DataEfficiencyPoint]:
    """Test AUC (patient-level 95% CI) of the arm trained on each fraction of the training patients."""
    points = []
    for fraction, run_dir in sorted(fraction_dirs.items()):
        run = read_run(Path(run_dir), evaluation)
        if not isinstance(run, RunData):
            continue
        points.append(
            DataEfficiencyPoint(
                arm=arm,
                fraction=fraction,
                n_train_patients=run.config.n_train_patients if run.config else 0,
                n_train_images=run.config.n_train_images if run.config else None,
                test_auc=_auc_value(run, evaluation, seed),
            )
        )
    return points


def _size_tests(runs: dict[int, RunData], chosen: int) -> dict[int, DeLongResult]:
    """AUC(size) - AUC(chosen size) on the test images both scored, by the verdict's paired test (patients as units),
    Holm over the arm's sizes."""
    base = runs[chosen].test
    index = {key: i for i, key in enumerate(base.image_keys)}
    tests = {}
    for size, run in runs.items():
        if size == chosen:
            continue
        shared = [(i, index[k]) for i, k in enumerate(run.test.image_keys) if k in index]
        mine, theirs = np.array([s[0] for s in shared], dtype=int), np.array([s[1] for s in shared], dtype=int)
        tests[size] = pairs.paired_auc_comparison(
            run.test.targets[mine],
            run.test.probs[mine],
            base.probs[theirs],
            groups=[run.test.patient_keys[i] for i in mine],
        )
    holm = pairs.holm_adjust([t.p_value for t in tests.values()])
    return {size: auc_result(t, p) for (size, t), p in zip(tests.items(), holm)}


def size_points(
    arm: str, size_dirs: dict[int, Path], evaluation: EvaluationSettings, seed: int
) -> list[InputSizePoint]:
    """Validation and test AUC and measured training cost of the arm trained at each input size.

    The chosen size has the highest slice-level validation AUC (a tie at three decimals goes to the smaller,
    cheaper size); no size is chosen when no run saved validation predictions. Training FLOPs = images seen x
    training FLOPs per image (timing.json: 3 x the forward count of FlopCounterMode at that size; forward only for
    imagenet-linear); seconds are timing.json's wall time.
    """
    runs = {
        size: run
        for size, run_dir in sorted(size_dirs.items())
        if isinstance(run := read_run(Path(run_dir), evaluation), RunData)
    }
    val_auc = {
        size: finite(st.roc_auc(run.val.targets, run.val.probs)) if run.val is not None else None
        for size, run in runs.items()
    }
    scored = {size: auc for size, auc in val_auc.items() if auc is not None}
    top = max(scored.values(), default=None)
    chosen = min((s for s, auc in scored.items() if top is not None and auc >= top - AUC_TIE_TOLERANCE), default=None)
    tests = _size_tests(runs, chosen) if chosen is not None else {}
    points = []
    for size, run in runs.items():
        timing = run.timing
        per_image = (
            None
            if timing is None
            else (timing.forward_flops_per_image if is_linear(arm) else timing.train_flops_per_image)
        )
        points.append(
            InputSizePoint(
                arm=arm,
                image_size=size,
                test_auc=_auc_value(run, evaluation, seed),
                val_auc=val_auc[size],
                chosen=size == chosen,
                vs_chosen=tests.get(size),
                train_seconds=None if timing is None else timing.wall_seconds,
                train_flops=None if timing is None or per_image is None else per_image * timing.train_images_seen,
                forward_flops_per_image=None if timing is None else timing.forward_flops_per_image,
            )
        )
    return points


def depth_points(arm: str, run_dir: Path) -> list[ProbeDepthPoint]:
    """An imagenet-linear arm's probe at every depth, from its main run's probe_depths.json (none if absent)."""
    path = Path(run_dir) / PROBE_DEPTHS_FILE
    if not is_linear(arm) or not path.is_file():
        return []
    probes = read_model_json(path, ProbeDepths)
    return [
        ProbeDepthPoint(
            arm=arm,
            depth=d.depth,
            feature_dim=d.feature_dim,
            val_auc=finite(d.val_auc),
            test_auc=finite(d.test_auc),
            chosen=d.depth == probes.chosen_depth,
        )
        for d in probes.depths
    ]


# ---------------------------------------------------------------- reading the comparisons


def _auc_of(arm: ArmResult) -> MetricValue:
    return arm.patient_metrics.roc_auc if arm.patient_metrics is not None else MetricValue()


def oriented_diff(comparisons: list[PairedComparison], arm: str, other: str) -> DeLongResult | None:
    """The patient-level AUC test of AUC(arm) - AUC(other), turned round when the pair was stored the other way."""
    for c in comparisons:
        test = c.patient_delong
        if test is None or {c.arm_a, c.arm_b} != {arm, other}:
            continue
        if c.arm_a == arm or test.diff is None or test.ci_of_diff is None:
            return test
        low, high = test.ci_of_diff
        return test.model_copy(
            update={
                "auc_a": test.auc_b,
                "auc_b": test.auc_a,
                "diff": -test.diff,
                "z": None if test.z is None else -test.z,
                "ci_of_diff": (-high, -low),
            }
        )
    return None


def shown_higher(comparisons: list[PairedComparison], arm: str, other: str, alpha: float = ALPHA) -> bool:
    """True when the paired patient-level test shows AUC(arm) > AUC(other) as the recommendation would claim it:
    Holm-adjusted p < alpha for a positive difference, with at least MIN_PATIENTS_PER_CLASS test patients of each
    class (below that the recommendation claims nothing, and neither does this)."""
    test = oriented_diff(comparisons, arm, other)
    return bool(
        test is not None
        and test.p_holm is not None
        and test.diff is not None
        and test.p_holm < alpha
        and test.diff > 0
        and min(test.n_positive, test.n_negative) >= MIN_PATIENTS_PER_CLASS
    )


def _overlaps(a: MetricValue, b: MetricValue) -> bool:
    """True when two intervals share a point, or when either interval is missing (nothing separates them)."""
    if None in (a.ci_low, a.ci_high, b.ci_low, b.ci_high):
        return True
    return a.ci_low <= b.ci_high and b.ci_low <= a.ci_high  # type: ignore[operator]


def ranking(arms: list[ArmResult], comparisons: list[PairedComparison]) -> tuple[ArmResult, list[str], list[str], bool]:
    """The highest point estimate among arms, the arms tied with it, those whose intervals overlap it, and whether
    the paired tests show it above every other; the first of several tied arms by name, never by list order."""
    top = max(_auc_of(a).value or -math.inf for a in arms)
    tied = sorted((a for a in arms if (_auc_of(a).value or -math.inf) >= top - AUC_TIE_TOLERANCE), key=lambda a: a.name)
    highest = tied[0]
    others = [a for a in arms if a is not highest]
    overlapping = [a.name for a in others if a not in tied and _overlaps(_auc_of(a), _auc_of(highest))]
    shown = bool(others) and len(tied) == 1 and all(shown_higher(comparisons, highest.name, a.name) for a in others)
    return highest, [a.name for a in tied[1:]], overlapping, shown


def _smallest_non_inferior(
    done: list[ArmResult], top_group: list[str], comparisons: list[PairedComparison], margin: float
) -> tuple[ArmResult, tuple[float, float] | None]:
    """The fewest forward FLOPs per image among arms non-inferior to every arm of top_group, with its interval
    against top_group[0]; top_group[0] itself when no smaller arm qualifies."""
    for arm in sorted(done, key=lambda a: (a.cost.flops_per_image or math.inf, a.name)):
        if arm.name in top_group:
            return arm, None
        tests = [oriented_diff(comparisons, arm.name, top) for top in top_group]
        if all(t is not None and t.ci_of_diff is not None and t.ci_of_diff[0] > -margin for t in tests):
            return arm, tests[0].ci_of_diff  # type: ignore[union-attr]
    return next(a for a in done if a.name == top_group[0]), None


def what_to_train(
    arms: list[ArmResult],
    comparisons: list[PairedComparison],
    margin: float,
    sizes: list[InputSizePoint],
    depths: list[ProbeDepthPoint],
) -> WhatToTrain | None:
    """The "What to train" numbers: the highest point estimate per compute budget with its ties, overlaps and
    paired-test status, the smallest non-inferior model, and the depth and size chosen on validation.

    Budgets are the completed arms' distinct measured training FLOPs (ArmCostSummary.total_flops); "smallest" means the
    fewest forward FLOPs per image (FlopCounterMode at the arm's size); non-inferior means the lower 95% bound of
    the paired patient-level difference AUC(arm) - AUC(top arm) exceeds -margin (the recommendation's rule).
    """
    done = [a for a in arms if a.status == "completed" and _auc_of(a).value is not None]
    if not done:
        return None
    budgets = []
    for budget_arm in sorted((a for a in done if a.cost.total_flops), key=lambda a: (a.cost.total_flops, a.name)):
        if budgets and budgets[-1].budget_flops == budget_arm.cost.total_flops:
            continue  # the same compute buys the same arms
        within = [a for a in done if a.cost.total_flops and a.cost.total_flops <= budget_arm.cost.total_flops]  # type: ignore[operator]
        top, tied, overlapping, shown = ranking(within, comparisons)
        budgets.append(
            BudgetChoice(
                budget_flops=budget_arm.cost.total_flops,
                budget_seconds=budget_arm.cost.actual_seconds,  # type: ignore[arg-type]
                highest_arm=top.name,
                auc=_auc_of(top),
                tied_with=tied,
                overlapping=overlapping,
                shown_best=shown,
            )
        )
    highest, tied, overlapping, shown = ranking(done, comparisons)
    smallest, smallest_ci = _smallest_non_inferior(done, [highest.name, *tied], comparisons, margin)
    return WhatToTrain(
        budgets=budgets,
        highest_arm=highest.name,
        tied_with=tied,
        overlapping=overlapping,
        shown_best=shown,
        smallest_non_inferior=smallest.name,
        smallest_ci_of_diff=smallest_ci,
        margin=margin,
        chosen_depth={p.arm: p.depth for p in depths if p.chosen},
        chosen_size={p.arm: p.image_size for p in sizes if p.chosen},
    )
