"""What a report shows first: the verdict coloured by its outcome, the warnings, and the one table that decides it.

Everything else in a report is collapsed below this (report.html) or follows it (report.md, the Prefect summary).
The deciding table gives, per requested arm, the patient-level test AUC the recommendation compares, each outer
fold's AUC and threshold beside a pooled figure, the paired AUC difference to the reference arm of the verdict,
the measured training cost, and for an arm that did not complete its reason (said here and nowhere else).
"""

from __future__ import annotations

from dataclasses import dataclass

from data_schemas.report import ArmResult, ComparisonResults, PairedComparison
from data_schemas.training import PRETRAINED_ARMS
from reports.formatting import fmt, fmt_ci, fmt_p, fmt_si, format_duration as fmt_seconds
from reports.wording import auc_with_ci

SMOKE_PROFILE = "smoke"

# basis of the recommendation -> (CSS kind, label above the headline); a basis not listed reads as open
OUTCOMES: dict[str, tuple[str, str]] = {
    "significant": ("decided", "Decided: significantly better"),
    "non_inferior": ("decided", "Decided: non-inferior and cheaper"),
    "inconclusive": ("open", "Inconclusive"),
    "too_few": ("open", "Too few patients to compare"),
    "single_arm": ("no-comparison", "No comparison possible"),
    "none": ("failed", "Nothing to recommend"),
}


@dataclass(frozen=True)
class Outcome:
    """How the verdict box looks: kind (the CSS class suffix) and its label."""

    kind: str
    label: str


def verdict_outcome(basis: str) -> Outcome:
    """The verdict box's colour and label for a recommendation basis; green only for a decided comparison."""
    kind, label = OUTCOMES.get(basis, ("open", basis.replace("_", " ").capitalize()))
    return Outcome(kind, label)


# ---------------------------------------------------------------- banners


@dataclass(frozen=True)
class Banner:
    """A warning the report, report.md and the summary artifact open with.

    Args:
        kind: "smoke", "weights", "chance" or "partial" (also the HTML class).
        title: fixed wording, e.g. "Smoke profile".
        text: the sentence; carries user-supplied names, so templates escape it.
    """

    kind: str
    title: str
    text: str


def _smoke_banner(results: ComparisonResults) -> Banner | None:
    """The smoke profile: seconds of training on tiny images, a test of the plumbing, not of the models."""
    smoke = [arm.name for arm in results.arms if arm.profile == SMOKE_PROFILE]
    if not smoke:
        return None
    return Banner(
        "smoke",
        "Smoke profile",
        f"for testing: numbers not meaningful. {', '.join(smoke)} ran with the "
        f"'{SMOKE_PROFILE}' profile (tiny images, a couple of epochs); use --profile cpu or full for a real "
        "comparison.",
    )


def _weights_banner(results: ComparisonResults) -> Banner | None:
    """Completed pretrained arms that started from no weights file, or from a file whose hash nothing checked."""
    lines = []
    for arm in results.completed_arms:
        if arm.name not in PRETRAINED_ARMS:
            continue
        if arm.weights is None:
            lines.append(
                f"{arm.name} records no pretrained weights file, so it may have started from randomly initialised "
                "weights"
            )
        elif not arm.weights.hash_checked:
            lines.append(
                f"{arm.name} used the weights file {arm.weights.file_name} (SHA-256 {arm.weights.sha256}), whose "
                f"name carries no hash that was checked: nothing shows these are the published ImageNet weights"
            )
    if not lines:
        return None
    return Banner("weights", "Randomly initialised or unverified weights", "; ".join(lines) + ".")


def _chance_banner(results: ComparisonResults) -> Banner | None:
    """Arms whose primary-level test AUC interval includes 0.5 (not shown better than chance)."""
    level = results.evaluation.primary_level
    hits = []
    for arm in results.completed_arms:
        metrics = arm.patient_metrics if level == "patient" and arm.patient_metrics is not None else arm.test_metrics
        auc = metrics.roc_auc if metrics is not None else None
        if auc is not None and auc.ci_low is not None and auc.ci_high is not None and auc.ci_low <= 0.5 <= auc.ci_high:
            hits.append(f"{arm.name} {metrics.level}-level AUC {auc_with_ci(auc, metrics.ci_level)}")  # type: ignore[union-attr]
    if not hits:
        return None
    return Banner(
        "chance",
        "AUC interval includes 0.5",
        "; ".join(hits) + ". These arms are not shown to rank patients better than chance at this sample size.",
    )


def _partial_banner(results: ComparisonResults) -> Banner | None:
    """Requested arms that were skipped or failed, by name."""
    missing = [arm for arm in results.arms if arm.status != "completed"]
    if not missing:
        return None
    names = ", ".join(f"{arm.name} ({arm.status})" for arm in missing)
    return Banner(
        "partial",
        "Partial result",
        f"{len(missing)} of {len(results.arms)} requested arms did not complete: "
        f"{names}. The comparison covers the completed arms only; the table below gives each reason.",
    )


def report_banners(results: ComparisonResults) -> list[Banner]:
    """Every banner that applies, in reading order: smoke profile, weights, AUC intervals including 0.5, partial."""
    checks = (_smoke_banner, _weights_banner, _chance_banner, _partial_banner)
    return [banner for check in checks if (banner := check(results)) is not None]


# ---------------------------------------------------------------- the deciding table


@dataclass(frozen=True)
class DecidingRow:
    """One requested arm in the deciding table, every cell already formatted."""

    arm: str
    status: str
    reason: str
    auc: str
    folds: str
    diff: str
    train_time: str
    train_flops: str


def reference_arm(results: ComparisonResults) -> str | None:
    """The arm the differences are taken against: the verdict's deciding other arm, else its best arm."""
    rec = results.recommendation
    return rec.deciding_arms[1] if len(rec.deciding_arms) == 2 else rec.best_arm


def _diff_text(comparisons: list[PairedComparison], arm: str, reference: str) -> str:
    """'+0.031 (−0.060 to 0.122), Holm p 0.41': AUC(arm) − AUC(reference), patient level, or why there is none."""
    pair = next((c for c in comparisons if {c.arm_a, c.arm_b} == {arm, reference}), None)
    test = pair.patient_delong if pair is not None else None
    if test is None:
        return "not compared"
    if test.diff is None or test.ci_of_diff is None:
        return test.reason or "not estimable"
    sign = 1 if pair.arm_a == arm else -1  # type: ignore[union-attr]
    low, high = sorted((sign * test.ci_of_diff[0], sign * test.ci_of_diff[1]))
    return f"{sign * test.diff:+.3f} ({fmt(low)} to {fmt(high)}), Holm p {fmt_p(test.p_holm)}"


def _folds_text(results: ComparisonResults, arm: ArmResult) -> str:
    """Each outer fold's patient-level AUC at its patient threshold, e.g. '0.80 at 0.41 · 0.77 at 0.52'."""
    folds = next((f for f in results.folds or [] if f.arm == arm.name), None)
    if folds is None:
        return ""
    thresholds = arm.operating_point.patient_thresholds if arm.operating_point else []
    cells = [f"{fmt(f.metrics.get('patient_roc_auc'), 2)} at {fmt(t, 2)}" for f, t in zip(folds.per_fold, thresholds)]
    return " · ".join(cells)


def deciding_rows(results: ComparisonResults) -> list[DecidingRow]:
    """One row per requested arm, in the order requested."""
    reference = reference_arm(results)
    several = len(results.completed_arms) > 1
    rows = []
    for arm in results.arms:
        done = arm.status == "completed"
        auc = arm.patient_metrics.roc_auc if done and arm.patient_metrics is not None else None
        if not done or not several or reference is None:
            diff = ""
        else:
            diff = "reference" if arm.name == reference else _diff_text(results.comparisons, arm.name, reference)
        rows.append(
            DecidingRow(
                arm=arm.name,
                status=arm.status,
                reason=arm.reason,
                auc=fmt_ci(auc) if done else "—",
                folds=_folds_text(results, arm) if done else "",
                diff=diff,
                train_time=fmt_seconds(arm.cost.actual_seconds),
                train_flops=fmt_si(arm.cost.total_flops, "FLOP"),
            )
        )
    return rows


def first_screen_context(results: ComparisonResults) -> dict[str, object]:
    """What the templates need for the first screen: outcome, banners, deciding rows and their column flags."""
    rows = deciding_rows(results)
    return {
        "outcome": verdict_outcome(results.recommendation.basis),
        "banners": report_banners(results),
        "deciding": rows,
        "reference": reference_arm(results),
        "show_folds": any(r.folds for r in rows),
        "show_diff": any(r.diff for r in rows),
        "primary_level": results.evaluation.primary_level,
    }
