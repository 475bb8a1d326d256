"""Plain-language sentences built from the numbers of results.json: the recommendation and each paired comparison.

The statistics stage (tasks/) computes numbers and decisions only; every sentence that carries a p-value, an
interval or a duration is written here, through reports.formatting, so a figure reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from data_schemas.metrics import MetricValue
from data_schemas.report import (
    AUC_TIE_TOLERANCE,
    ArmResult,
    ComparisonResults,
    DeLongResult,
    EvaluationSummary,
    InputSizePoint,
    PairedComparison,
    ProbeDepthPoint,
    Recommendation,
    WhatToTrain,
)
from reports.formatting import fmt, fmt_ci, fmt_p, fmt_si, format_duration


def auc_with_ci(metric: MetricValue | None, level: float = 0.95) -> str:
    """'0.82 (95% CI 0.71 to 0.90)', or 'not estimable'; a zero-width interval (every resample gave the same value)
    is not estimable, never certainty."""
    if metric is None or metric.value is None:
        return "not estimable"
    if metric.ci_low is None or metric.ci_high is None:
        return fmt(metric.value, 2)
    if metric.ci_high - metric.ci_low <= 1e-12:
        return f"{fmt(metric.value, 2)} (interval not estimable)"
    return f"{fmt(metric.value, 2)} ({round(100 * level)}% CI {fmt(metric.ci_low, 2)} to {fmt(metric.ci_high, 2)})"


def p_text(p_value: float | None) -> str:
    """'p = 0.004', 'p < 0.001' or 'p not estimable'."""
    if p_value is None:
        return "p not estimable"
    text = fmt_p(p_value)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def difference_text(test: DeLongResult) -> str:
    """'−0.03 (95% CI −0.09 to 0.03; p = 0.33, Holm-adjusted p = 0.66)', or the reason it is not estimable."""
    if test.diff is None or test.ci_of_diff is None:
        return test.reason or "not estimable"
    low, high = test.ci_of_diff
    holm = f", Holm-adjusted {p_text(test.p_holm)}" if test.p_holm is not None else ""
    return (f"{fmt(test.diff, 3)} ({round(100 * test.level)}% CI {fmt(low, 3)} to {fmt(high, 3)}; "
            f"{p_text(test.p_value)}{holm})")


def significant(test: DeLongResult, minimum: int, alpha: float = 0.05) -> bool:
    """True when a comparison may be worded significant: both classes reach the minimum and Holm's p < alpha."""
    return (test.p_holm is not None and test.p_holm < alpha and test.diff is not None
            and min(test.n_positive, test.n_negative) >= minimum)


def too_few_text(n_positive: int, n_negative: int, minimum: int) -> str:
    """'too few patients to compare (3 positive, 3 negative; the rule needs at least 10 of each)'."""
    return (f"too few patients to compare ({n_positive} positive, {n_negative} negative; the rule needs at least "
            f"{minimum} of each)")


def comparison_sentence(pc: PairedComparison, minimum: int = 10) -> str:
    """One or two sentences on a pair: the patient-level AUC difference, then the slice-level one."""
    parts = []
    for level, test in (("patient", pc.patient_delong), ("slice", pc.delong)):
        if test is None:
            continue
        if test.diff is None:
            parts.append(f"At the {level} level the AUC test is {test.reason or 'not estimable'}.")
            continue
        if min(test.n_positive, test.n_negative) < minimum:
            verdict = f"no claim, {too_few_text(test.n_positive, test.n_negative, minimum)}"
        else:
            verdict = "a significant difference" if significant(test, minimum) else "no significant difference"
        parts.append(
            f"At the {level} level, AUC({pc.arm_a}) − AUC({pc.arm_b}) = {difference_text(test)}; p by "
            f"{test.method}, interval by {test.interval_method}: {verdict}."
        )
    mc = pc.patient_mcnemar
    if mc is not None and mc.p_value is not None:
        parts.append(
            f"At their operating points the two arms disagree on {mc.b + mc.c} patients ({pc.arm_a} right on {mc.b}, "
            f"{pc.arm_b} right on {mc.c}; {mc.method_label}, {p_text(mc.p_value)})."
        )
    return " ".join(parts)


def _arm(arms: Sequence[ArmResult], name: str | None) -> ArmResult | None:
    return next((a for a in arms if a.name == name), None)


def _auc_of(arms: Sequence[ArmResult], name: str | None, level: str) -> str:
    arm = _arm(arms, name)
    if arm is None:
        return "not estimable"
    metrics = arm.patient_metrics if level == "patient" else arm.test_metrics
    return auc_with_ci(metrics.roc_auc if metrics else None)


def _oriented(pc: PairedComparison, first: str, level: str) -> DeLongResult | None:
    """The pair's AUC test at `level` with `first` as arm A (difference and interval negated when swapped)."""
    test = pc.patient_delong if level == "patient" else pc.delong
    if test is None or pc.arm_a == first or test.diff is None or test.ci_of_diff is None:
        return test
    low, high = test.ci_of_diff
    return test.model_copy(update={"auc_a": test.auc_b, "auc_b": test.auc_a, "diff": -test.diff,
                                   "z": None if test.z is None else -test.z, "ci_of_diff": (-high, -low)})


def _find(comparisons: Sequence[PairedComparison], a: str | None, b: str | None) -> PairedComparison | None:
    return next((c for c in comparisons if {c.arm_a, c.arm_b} == {a, b}), None)


def _flops_text(arm: ArmResult | None) -> str:
    """An arm's computed cost, '1.2 PFLOP', or 'cost not recorded'."""
    if arm is None or not arm.cost.total_flops:
        return "cost not recorded"
    return fmt_si(arm.cost.total_flops, "FLOP")


def _rule_details(rec: Recommendation, arms: Sequence[ArmResult], comparisons: Sequence[PairedComparison]) -> list[str]:
    """The per-pair differences, the arms' computed costs and the rule in words."""
    level, margin = rec.level, fmt(rec.margin, 2)
    details = [
        f"{pc.arm_a} vs {pc.arm_b} ({level} level): AUC difference {difference_text(t)}."
        for pc in comparisons if (t := pc.patient_delong if level == "patient" else pc.delong) is not None
    ]
    costed = [f"{a.name} {_flops_text(a)}" for a in arms if a.status == "completed" and a.cost.total_flops]
    if costed:
        details.append(f"Training cost, computed: {', '.join(costed)}; measured times are shown but never rank the "
                       f"arms.")
    details.append(
        f"Rule: no claim with fewer than {rec.min_patients_per_class} test patients of either class. Above that, an "
        f"arm with at least 20% fewer computed FLOPs (training + inference) is preferred only when non-inferior: the "
        f"lower bound of the 95% MOVER interval of its AUC difference to every arm not materially cheaper lies above "
        f"−{margin} (the margin). The best arm is called significantly better only when its Holm-adjusted paired "
        f"permutation p-value against every other arm is below {fmt(rec.alpha, 2)}."
    )
    return details


def recommendation_sentences(
    rec: Recommendation, arms: Sequence[ArmResult], comparisons: Sequence[PairedComparison], n_patients: int
) -> tuple[str, list[str]]:
    """The headline and supporting sentences of a decided Recommendation; each headline words its basis's rule."""
    level, margin = rec.level, fmt(rec.margin, 2)
    best = rec.best_arm
    details = _rule_details(rec, arms, comparisons)
    if rec.basis == "none":
        finished = [a.name for a in arms if a.status == "completed"]
        if finished:  # completed, but the test part holds one class: AUC, sensitivity or specificity are undefined
            return (f"{', '.join(finished)} completed, but no test AUC could be computed: the test part holds "
                    "patients of one class only, so there is nothing to recommend; use more patients or a larger "
                    "test_fraction."), details
        return "No arm completed, so there is nothing to recommend.", details
    if rec.basis == "single_arm":
        return (f"Only {best} completed, with {level}-level test AUC {_auc_of(arms, best, level)}; no comparison is "
                "possible."), details
    if rec.basis == "too_few":
        needed = f" About {rec.patients_needed} test patients would be needed" if rec.patients_needed else ""
        planned = (f"{needed} to show the cheaper arm non-inferior within {margin} AUC with {round(100 * rec.power)}% "
                   f"power, if the arms truly performed alike." if needed else "")
        return (f"No verdict: {too_few_text(rec.n_positive, rec.n_negative, rec.min_patients_per_class)}. The "
                f"highest point estimate is {best}'s ({_auc_of(arms, best, level)}), which is not evidence that it is "
                f"better.{planned}", details)
    others = [a.name for a in arms if a.status == "completed" and a.name != best]
    if rec.basis == "significant":
        beaten = "; ".join(
            f"AUC({best}) − AUC({o}) = {difference_text(t)}" for o in others
            if (pc := _find(comparisons, best, o)) is not None and (t := _oriented(pc, best or "", level)) is not None
        )
        return (f"Use {best}: its {level}-level test AUC {_auc_of(arms, best, level)} is significantly higher than "
                f"every other arm's (Holm-adjusted paired permutation tests; {beaten}).", details)
    if rec.basis == "non_inferior":
        other = rec.deciding_arms[1] if len(rec.deciding_arms) == 2 else best
        pc = _find(comparisons, rec.preferred_arm, other)
        test = _oriented(pc, rec.preferred_arm or "", level) if pc else None
        cheap = _arm(arms, rec.preferred_arm)
        rivals = [a.name for a in arms if a.status == "completed" and a.name != rec.preferred_arm]
        return (f"Prefer the cheaper {rec.preferred_arm} ({_flops_text(cheap)} computed): it is non-inferior within a "
                f"margin of {margin} AUC to every arm that is not materially cheaper ({', '.join(rivals)}); against "
                f"{other}, the closest call, the {level}-level AUC difference is "
                f"{difference_text(test) if test else 'not estimable'}, lower bound above −{margin}.", details)
    pair_text = ""
    if len(rec.deciding_arms) == 2 and (pc := _find(comparisons, *rec.deciding_arms)) is not None:
        test = _oriented(pc, rec.deciding_arms[0], level)
        if test is not None and test.diff is not None:
            pair_text = (f" AUC({rec.deciding_arms[0]}) − AUC({rec.deciding_arms[1]}) = {difference_text(test)}: the "
                         "interval "
                         f"includes losses larger than the margin.")
    reasons = sorted(
        {t.reason for pc in comparisons if (t := pc.patient_delong if level == "patient" else pc.delong) and t.reason}
    )
    if reasons:
        pair_text += f" The AUC comparison is {'; '.join(reasons)}."
    needed = (f" About {rec.patients_needed} test patients (now {n_patients}) would give {round(100 * rec.power)}% "
              f"power to show the cheaper arm non-inferior within {margin} AUC, if the arms truly performed alike."
              if rec.patients_needed else "")
    return (f"Inconclusive at this sample size ({n_patients} test patients): no arm is significantly better than the "
            f"others, and no materially cheaper arm is shown non-inferior within {margin} AUC ({level} level); "
            f"the highest point estimate, {best}'s, is not a winner.{pair_text}{needed}", details)


def _width_sentences(ev: EvaluationSummary, arms: Sequence[ArmResult]) -> str:
    """The measured interval widths of this mode, and the other mode's width as an expectation with its inputs."""
    widths = [
        (a.name, a.patient_metrics.roc_auc) for a in arms if a.status == "completed" and a.patient_metrics is not None
    ]
    measured = ", ".join(f"{name} {fmt(auc.ci_high - auc.ci_low, 2)}" for name, auc in widths
                         if auc.ci_low is not None and auc.ci_high is not None)
    text = (f" Measured here, the width of the patient-level 95% AUC interval: {measured} "
            f"(n = {ev.n_test_patients} test patients).") if measured else ""
    n, total, fraction = ev.n_test_patients, ev.n_labelled_patients, ev.holdout_test_fraction
    if ev.mode == "holdout" and n and total > n:
        text += (f" Expected, not measured: cross-validated mode would test all N = {total} labelled patients; width "
                 f"shrinks roughly as 1/√n, so its intervals would be about √(N/n) = √({total}/{n}) = "
                 f"{(total / n) ** 0.5:.1f}× narrower.")
    elif ev.mode == "cross-validated" and n and fraction:
        text += (f" Expected, not measured: a hold-out test part of test_fraction = {fraction:g} would hold about "
                 f"{fraction * n:.0f} of these {n} patients; width grows roughly as 1/√n, so its intervals would be "
                 f"about √(1/{fraction:g}) = {(1 / fraction) ** 0.5:.1f}× wider.")
    return text


def evaluation_sentences(ev: EvaluationSummary, arms: Sequence[ArmResult] = ()) -> list[str]:
    """How the numbers were produced: the mode, its interval widths (measured) and the other mode's (expected),
    what pooling ignores, aggregation and operating point."""
    runs = sorted(set(ev.runs_per_arm.values()))
    tested = f"{ev.n_test_patients} test patients ({ev.n_test_images} slices)"
    if ev.mode == "cross-validated":
        mode = (f"Cross-validated: {'/'.join(map(str, runs))} outer folds per arm, each labelled patient tested once "
                "by a "
                "model that never saw it; the out-of-fold predictions are pooled, so every metric, interval and test "
                "uses "
                f"{tested}. Pooling treats an arm's fold models as one model: the intervals and tests count the "
                f"variation between test patients but ignore the variation between fold models (each fold's AUC and "
                f"threshold are shown beside the pooled figure).")
    else:
        mode = f"Hold-out: one fixed test part, {tested} of {ev.n_labelled_patients} labelled patients."
    return [
        mode + _width_sentences(ev, arms),
        f"Patient probability: the {ev.aggregation} of the patient's slice probabilities (option: "
        f"{'max' if ev.aggregation == 'mean' else 'mean'}). The recommendation uses the {ev.primary_level}-level AUC "
        "tests.",
        f"Operating point: rule '{ev.operating_point}', chosen on each run's validation predictions (slices and "
        "patients "
        f"separately) and applied unchanged to its test predictions; a run without usable validation predictions uses "
        f"the fixed 0.5, labelled 'fallback'. Thresholds per arm are listed below.",
        f"Intervals: {round(100 * ev.ci_level)}% percentile bootstrap over patients ({ev.n_bootstrap} resamples); "
        f"sensitivity, specificity and accuracy: Clopper-Pearson per patient, Wilson at the cluster-adjusted sample "
        f"size per slice (they hold at 0% and 100%). AUC tests: "
        f"{ev.auc_test}, per patient and per slice (a patient's slices swapped together). Decision tests: "
        f"{ev.decision_test}, or a sign-flip test over discordant patients when fewer than 25 disagree. Pairwise "
        "p-values are "
        f"shown raw and Holm-adjusted over all pairs. Non-inferiority margin {fmt(ev.non_inferiority_margin, 2)} AUC.",
    ]


def word_results(results: ComparisonResults) -> ComparisonResults:
    """The results with every sentence filled in: each paired comparison, the recommendation and the evaluation notes.

    The evaluation stage (tasks.evaluation.evaluate) returns numbers and decisions only; the flow words them here,
    once, before
    the report, results.json and the Prefect artifacts are written.
    """
    minimum = results.evaluation.min_patients_per_class
    comparisons = [pc.model_copy(update={"plain_words": comparison_sentence(pc, minimum)})
                   for pc in results.comparisons]
    n_patients = results.evaluation.n_test_patients
    headline, details = recommendation_sentences(results.recommendation, results.arms, comparisons, n_patients)
    recommendation = results.recommendation.model_copy(update={"headline": headline, "details": details})
    evaluation = results.evaluation.model_copy(update={"notes": evaluation_sentences(results.evaluation, results.arms)})
    update = {"comparisons": comparisons, "recommendation": recommendation, "evaluation": evaluation}
    if results.what_to_train is not None:
        update["what_to_train"] = results.what_to_train.model_copy(update={"sentences": what_to_train_sentences(
            results.what_to_train, results.arms, results.input_sizes or [], results.probe_depths or [])})
    return results.model_copy(update=update)


def _auc_text(arm: ArmResult | None) -> str:
    return fmt_ci(arm.patient_metrics.roc_auc) if arm is not None and arm.patient_metrics is not None else "n/a"


def _names(names: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def ranking_text(highest: str, auc: MetricValue, tied: Sequence[str], overlapping: Sequence[str], shown_best: bool,
                 n_arms: int) -> str:
    """'the highest point estimate is X, AUC ...; tied with ...; its interval overlaps ...; not shown best'."""
    if n_arms == 1:
        return f"the only arm is {highest}, patient-level test AUC {fmt_ci(auc)}"
    if tied:
        text = (f"{_names([highest, *tied])} tie for the highest point estimate of the patient-level test AUC "
                f"({fmt(auc.value)}), so none is ranked above the other")
    else:
        text = f"the highest point estimate of the patient-level test AUC is {highest}'s, {fmt_ci(auc)}"
    if overlapping:
        text += f"; its 95% interval overlaps {_names(list(overlapping))}'s"
    if shown_best:
        return text + "; the paired test (Holm-adjusted) shows it above every other arm, so it is the best here"
    return text + "; the paired test does not show it above every other arm, so no arm is called best"


def _size_sentence(arm: str, rows: Sequence[InputSizePoint]) -> str:
    """One arm's input-size curve: the size chosen on validation, test AUCs, and the paired test against it."""
    chosen = next((p for p in rows if p.chosen), None)
    tests = "; ".join(f"{p.image_size} px {fmt_ci(p.test_auc)}" for p in rows)
    scored = [p for p in rows if p.test_auc.value is not None]
    top = max((p.test_auc.value for p in scored), default=None)
    highest = [f"{p.image_size} px" for p in scored if top is not None and p.test_auc.value >= top - AUC_TIE_TOLERANCE]  # type: ignore[operator]
    point = (f"the highest test point estimate is at {_names(highest)}" if len(highest) == 1
             else f"{_names(highest)} tie for the highest test point estimate") if highest else "no test AUC"
    if chosen is None:
        return (f"{arm}: no input size is chosen, as no size's run has a validation AUC; test AUC (slice level, 95% CI "
                f"by patient): {tests}; {point}, which is no basis for a choice.")
    by_val = ", ".join(f"{p.image_size} px {fmt(p.val_auc)}" for p in rows)
    compared = [p for p in rows if p.vs_chosen is not None]
    pairs = "; ".join(f"{p.image_size} px {difference_text(p.vs_chosen)}" for p in compared)  # type: ignore[arg-type]
    differs = [f"{p.image_size} px" for p in compared if p.vs_chosen and p.vs_chosen.p_holm is not None
               and p.vs_chosen.p_holm < 0.05]
    verdict = (f"the paired test shows {_names(differs)} different from the chosen size" if differs
               else "the paired test shows no size different from the chosen one") if compared else ""
    return (
        f"{arm}: {chosen.image_size} px is chosen on validation AUC (slice level: {by_val}), never on test. "
        f"Test AUC (slice level, 95% CI by patient): {tests}; {point}."
        + (f" AUC(size) − AUC({chosen.image_size} px) on the same test images: {pairs}; {verdict}." if pairs else "")
    )


def what_to_train_sentences(what: WhatToTrain, arms: Sequence[ArmResult], sizes: Sequence[InputSizePoint],
                            depths: Sequence[ProbeDepthPoint]) -> list[str]:
    """The "What to train" section in words: each sentence quotes the measured numbers and intervals it rests on, and
    "best" appears only where the paired test shows it."""
    by_name = {a.name: a for a in arms}
    costed = sorted((a.cost.total_flops for a in arms if a.status == "completed" and a.cost.total_flops), key=float)
    lines = []
    for b in what.budgets:
        seconds = f" ({format_duration(b.budget_seconds)} measured here)" if b.budget_seconds is not None else ""
        n_within = sum(1 for f in costed if f <= b.budget_flops)
        ranked = ranking_text(b.highest_arm, b.auc, b.tied_with, b.overlapping, b.shown_best, n_within)
        lines.append(f"Within a training budget of {fmt_si(b.budget_flops, 'FLOP')}{seconds}, {ranked}.")
    if what.smallest_non_inferior and what.highest_arm:
        top = [what.highest_arm, *what.tied_with]
        small, high = by_name.get(what.smallest_non_inferior), by_name.get(what.highest_arm)
        flops = (
            fmt_si(small.cost.flops_per_image, "FLOP") if small is not None and small.cost.flops_per_image else "n/a"
        )
        reference = f"{_names(top)} (the highest point estimate{'s' if len(top) > 1 else ''}, AUC {_auc_text(high)})"
        if what.smallest_non_inferior in top:
            lines.append(f"No model with fewer FLOPs per image is shown non-inferior within {fmt(what.margin, 2)} AUC "
                         "to "
                         f"{reference}; {what.smallest_non_inferior} runs {flops} per image forward.")
        else:
            low, high_ci = what.smallest_ci_of_diff or (None, None)
            lines.append(f"The smallest model shown non-inferior to {reference} is {what.smallest_non_inferior} "
                         f"({flops} "
                         f"per image forward, AUC {_auc_text(small)}): its AUC difference is {fmt(low)} to "
                         f"{fmt(high_ci)} "
                         f"(95% CI, paired, patient level), above −{fmt(what.margin, 2)}.")
    for arm, depth in what.chosen_depth.items():
        rows = [p for p in depths if p.arm == arm]
        listed = ", ".join(f"{p.depth} {fmt(p.val_auc)}" for p in rows)
        chosen = next(p for p in rows if p.depth == depth)
        lines.append(f"{arm}: the probe on {depth} is chosen on validation AUC (by depth: {listed}); its test AUC is "
                     f"{fmt(chosen.test_auc)} (slice level, no interval: the arm's interval above is for this depth).")
    for arm in dict.fromkeys(p.arm for p in sizes):
        lines.append(_size_sentence(arm, [p for p in sizes if p.arm == arm]))
    return lines
