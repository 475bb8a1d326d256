"""Render a ComparisonResults as report.html (self-contained), report.md and results.json; keep an index.html.

Each report opens with banners for whatever makes its numbers less than they seem (smoke profile, random or
unverified weights, AUC intervals that include 0.5, requested arms that did not complete); configuration dumps,
package versions and seeds sit in report-appendix.html / .md beside it, linked from the report.

Imports only data_schemas, jinja2 and matplotlib (never tasks): a report can be re-rendered from a results.json
alone, on a machine without torch or the dataset. matplotlib comes in with reports.figures when a report is drawn,
so a kept report's summary and metrics table cost no plotting imports.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from pydantic import ValidationError

from data_schemas.files import atomic_write_bytes, atomic_write_text
from data_schemas.package import MODEL_CARD_FILE
from data_schemas.report import (
    FIGURES_DIR,
    METRIC_NAMES,
    REPORT_APPENDIX_HTML_FILE,
    REPORT_APPENDIX_MD_FILE,
    REPORT_HTML_FILE,
    REPORT_MD_FILE,
    REPORT_SCHEMA_VERSION,
    RESULTS_FILE,
    ComparisonResults,
)
from reports.first_screen import first_screen_context
from reports.formatting import fmt, fmt_ci, fmt_p, fmt_pct, fmt_ratio, fmt_si, format_duration as fmt_seconds, md_escape
from reports.gallery import render_visual_html, render_visual_md
from reports.wording import evaluation_sentences

if TYPE_CHECKING:
    from reports.figures import RenderedFigure

TEMPLATES_DIR = Path(__file__).parent / "templates"
INDEX_FILE = "index.html"
METRIC_LABELS: dict[str, str] = {
    "roc_auc": "ROC AUC",
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "f1": "F1",
    "brier": "Brier score (lower is better)",
    "ece": "ECE, positive class as in the calibration plot (lower is better)",
    "patient_roc_auc": "Patient ROC AUC",
}

# The collapsed sections below the first screen, in order, that every report has (besides the optional folds,
# data-efficiency, what-to-train and visual sections).
SECTION_IDS: tuple[str, ...] = (
    "recommendation", "comparisons", "metrics", "evaluation", "cost", "deployment", "learning-curves", "roc",
    "calibration", "confusion", "convergence", "patients", "dataset", "split", "reproducibility",
)



def dataset_label(results: ComparisonResults) -> str:
    """The dataset's own name for headers, or '' when it is only the generic folder name 'dataset'."""
    name = results.dataset.name.strip()
    return "" if name.lower() in ("", "dataset") else name


# ---------------------------------------------------------------- rendering


@lru_cache(maxsize=2)
def _environment(autoescape: bool) -> jinja2.Environment:
    """Jinja environment over reports/templates with the formatting filters; one per autoescape setting and process,
    so each template is compiled once (Jinja reloads a template whose file changed)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        fmt=fmt, fmt_ci=fmt_ci, fmt_seconds=fmt_seconds, fmt_si=fmt_si, fmt_p=fmt_p, fmt_pct=fmt_pct,
        md=md_escape,
    )
    env.globals.update(fmt_ratio=fmt_ratio, metric_labels=METRIC_LABELS, metric_names=METRIC_NAMES)
    return env


QUICK_TIMING_RUNS = 10  # fewer timed forwards than this: the smoke profile's quick timing, not a figure to quote
QUICK_TIMING_BUDGET_S = 5.0  # a shorter time budget than this likewise


def deployment_context(results: ComparisonResults) -> dict[str, Any]:
    """The 'What it costs to run' table's inputs: packaged arms, the compressed variant, and how they were timed."""
    deployed = [arm for arm in results.arms if arm.deployment is not None]
    costs = [arm.deployment for arm in deployed if arm.deployment is not None]
    if results.compression is not None:
        costs.append(results.compression.compressed)
    return {
        "deployed": deployed, "model_card_file": MODEL_CARD_FILE, "compression": results.compression,
        "compressed_dir": results.compression_package_dir,
        "quick_timing": any(cost.timed_runs < QUICK_TIMING_RUNS
                            or (cost.time_budget_seconds or QUICK_TIMING_BUDGET_S) < QUICK_TIMING_BUDGET_S
                            for cost in costs),
        "timing": costs[0] if costs else None,
    }


def overfitting_rows(results: ComparisonResults) -> list[dict[str, Any]]:
    """One row per completed arm and outer fold: its overfitting gap at the chosen and at the last epoch."""
    rows = []
    for arm in results.completed_arms:
        for fold in sorted({gap.fold for gap in arm.overfitting}):
            by_role = {gap.role: gap for gap in arm.overfitting if gap.fold == fold}
            rows.append({"arm": arm.name, "fold": fold, "chosen": by_role.get("chosen"), "last": by_role.get("last")})
    return rows


def _context(results: ComparisonResults, figures: dict[str, RenderedFigure], *, visual_html: str = "",
             visual_md: str = "") -> dict[str, Any]:
    """Values shared by the HTML and Markdown templates."""
    by_part = {part.name: part for part in results.split.parts}
    classes = results.dataset.classes
    not_completed = [arm for arm in results.arms if arm.status != "completed"]
    confusion_max = max(
        (max((max(row) for row in arm.confusion.counts), default=0) for arm in results.completed_arms if arm.confusion),
        default=0,
    )
    return {
        "r": results,
        "card": results.dataset.card,
        "fp": results.dataset.card.fingerprint,
        "parts": [by_part[name] for name in ("train", "val", "test") if name in by_part],
        "classes": classes,
        "completed": results.completed_arms,
        "not_completed": not_completed,
        "figures": figures,
        "confusion_max": confusion_max or 1,
        "evaluation_lines": results.evaluation.notes or evaluation_sentences(results.evaluation, results.arms),
        "overfitting": overfitting_rows(results),
        **first_screen_context(results),
        "dataset_label": dataset_label(results),
        "weighted_arms": [arm for arm in results.arms if arm.weights is not None],
        "appendix_html": REPORT_APPENDIX_HTML_FILE,
        "appendix_md": REPORT_APPENDIX_MD_FILE,
        "visual_html": visual_html,
        "visual_md": visual_md,
        **deployment_context(results),
    }


def render_report(results: ComparisonResults, out_dir: Path) -> dict[str, Path]:
    """Write report.html (self-contained), report.md with figures/*.png, results.json, and the appendix
    (report-appendix.html / .md: configurations, package versions, seeds) into out_dir.

    Returns the written paths keyed "html", "markdown", "results", "appendix_html", "appendix_markdown" and
    "figure:<name>".
    """
    visual = results.visual  # excluded from dumps (and from results.json): carried over by hand
    results = ComparisonResults.model_validate(results.model_dump())  # re-validate whatever was built
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from reports.figures import make_figures

    figures = make_figures(results)
    context = _context(results.model_copy(update={"visual": visual}), figures,
                       visual_html=render_visual_html(visual) if visual is not None else "",
                       visual_md=render_visual_md(visual, out_dir / FIGURES_DIR) if visual is not None else "")

    paths: dict[str, Path] = {}
    for fig in figures.values():
        path = out_dir / FIGURES_DIR / fig.name
        atomic_write_bytes(path, fig.png)
        paths[f"figure:{fig.name}"] = path
    results_path = out_dir / RESULTS_FILE
    atomic_write_text(results_path, results.model_dump_json(indent=2) + "\n")
    paths["results"] = results_path
    for key, template, name, autoescape in (("appendix_markdown", "appendix.md.j2", REPORT_APPENDIX_MD_FILE, False),
                                            ("appendix_html", "appendix.html.j2", REPORT_APPENDIX_HTML_FILE, True)):
        paths[key] = out_dir / name
        atomic_write_text(paths[key], _environment(autoescape).get_template(template).render(**context))
    md_path = out_dir / REPORT_MD_FILE
    atomic_write_text(md_path, _environment(False).get_template("report.md.j2").render(**context))
    paths["markdown"] = md_path
    html_path = out_dir / REPORT_HTML_FILE
    atomic_write_text(html_path, _environment(True).get_template("report.html.j2").render(**context))
    paths["html"] = html_path
    return paths


def load_results(path: Path) -> ComparisonResults:
    """Read and validate a results.json."""
    return ComparisonResults.model_validate_json(Path(path).read_text(encoding="utf-8"))


def _headline_aucs(results: ComparisonResults) -> list[str]:
    """'scratch 0.912' per arm (patient-level AUC, the recommendation's), or 'imagenet skipped'."""
    out = []
    for arm in results.arms:
        if arm.status == "completed" and arm.patient_metrics is not None:
            out.append(f"{arm.name} {fmt(arm.patient_metrics.roc_auc.value, 3)}")
        else:
            out.append(f"{arm.name} {arm.status}")
    return out


def _why_unreadable(path: Path, error: Exception) -> str:
    """'results.json of schema 1.0; this version reads 2.0' for an older report, else the error's type."""
    try:
        version = json.loads(path.read_text(encoding="utf-8")).get("schema_version")
    except (ValueError, OSError, AttributeError):
        version = None
    if version and version != REPORT_SCHEMA_VERSION:
        return (f"results.json of schema {version}; this version reads {REPORT_SCHEMA_VERSION} (re-run the comparison "
                "to update it)")
    return type(error).__name__


def update_index(reports_root: Path) -> Path:
    """Write reports_root/index.html listing every run below it (each folder holding a results.json), newest first."""
    root = Path(reports_root)
    root.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    broken: list[dict[str, str]] = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        if path.parent == root:
            continue
        rel_dir = path.parent.relative_to(root).as_posix()
        try:
            results = load_results(path)
        except (ValidationError, ValueError, OSError) as exc:
            broken.append({"folder": rel_dir, "error": _why_unreadable(path, exc)})
            continue
        has_report = (path.parent / REPORT_HTML_FILE).is_file()
        runs.append(
            {
                "run_id": results.run_id,
                "created_at": results.created_at,
                "date": results.created_at.replace("T", " ")[:16],
                "dataset": dataset_label(results),
                "dataset_hash": results.dataset.card.content_hash[:12],
                "arms": [arm.name for arm in results.arms],
                "aucs": _headline_aucs(results),
                "recommendation": results.recommendation.headline,
                "link": f"{rel_dir}/{REPORT_HTML_FILE}" if has_report else None,
                "folder": rel_dir,
            }
        )
    runs.sort(key=lambda run: run["created_at"], reverse=True)
    html = _environment(True).get_template("index.html.j2").render(runs=runs, broken=broken)
    index = root / INDEX_FILE
    atomic_write_text(index, html)
    return index


def metrics_table(results: ComparisonResults) -> list[dict[str, str]]:
    """One row per arm for a Prefect table artifact, the deciding figures first: the patient-level AUC the
    recommendation compares, the paired difference to the verdict's reference arm, training time, status; then
    every slice-level metric (column names say the level), and why an arm did not complete."""
    deciding = {row.arm: row for row in first_screen_context(results)["deciding"]}  # type: ignore[attr-defined]
    rows: list[dict[str, str]] = []
    for arm in results.arms:
        tm = arm.test_metrics
        row = {
            "arm": arm.name,
            "patient_roc_auc": deciding[arm.name].auc,
            "auc_difference": deciding[arm.name].diff or "—",
            "train_time": fmt_seconds(arm.cost.actual_seconds),
            "status": arm.status,
        }
        for name in METRIC_NAMES:
            row[f"slice_{name}"] = fmt_ci(getattr(tm, name), 3) if tm is not None else "—"
        row["note"] = arm.reason
        rows.append(row)
    return rows


def summary_markdown(results: ComparisonResults, report_link: str | None = None) -> str:
    """Short Markdown for a Prefect artifact: the verdict with its outcome, the warnings, the deciding table, the
    paired tests in words, and a link to the full report when report_link (e.g. flows.serve.report_url) is given."""
    return _environment(False).get_template("summary.md.j2").render(
        r=results, report_link=report_link, **first_screen_context(results))
