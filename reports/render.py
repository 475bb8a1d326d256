"""Render a ComparisonResults as report.html (self-contained), report.md and results.json; keep an index.html.

Each report opens with banners for whatever makes its numbers less than they seem (smoke profile, random or
unverified weights, AUC intervals that include 0.5, requested arms that did not complete); configuration dumps,
package versions and seeds sit in report-appendix.html / .md beside it, linked from the report.

Imports only data_schemas, jinja2 and matplotlib (never tasks): a report can be re-rendered from a
results.json alone, on a machine without torch or the dataset.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
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
    ArmResult,
    ComparisonResults,
)
from reports.first_screen import first_screen_context
from reports.formatting import fmt, fmt_ci, fmt_p, fmt_pct, fmt_ratio, fmt_si, format_duration as fmt_seconds, md_escape
from reports.gallery import render_visual_html, render_visual_md
from reports.wording import evaluation_sentences

TEMPLATES_DIR = Path(__file__).parent / "templates"
INDEX_FILE = "index.html"
DPI = 100
# Sized for reading: every figure is at least 8 in x 100 dpi = 800 px wide before the tight crop (>= 700 px after),
# with 11-13 pt text, so legends stay legible when the browser shows the PNG at its natural size.
FIGURE_STYLE: dict[str, Any] = {
    "font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 11,
    "xtick.labelsize": 11, "ytick.labelsize": 11, "figure.titlesize": 13,
}

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

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


# ---------------------------------------------------------------- figures


@dataclass
class RenderedFigure:
    """One PNG figure: file name under figures/, alt text, and its bytes."""

    name: str
    alt: str
    png: bytes

    @property
    def data_uri(self) -> str:
        """The PNG as a data: URI for <img src>."""
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def _png(fig: Figure) -> bytes:
    """Figure as PNG bytes (Agg, no pyplot state)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _roc_figure(arms: Sequence[ArmResult]) -> bytes:
    """ROC curves of all completed arms on one axes."""
    fig = Figure(figsize=(9, 9))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="#999", lw=1, label="chance")
    for i, arm in enumerate(arms):
        auc = arm.test_metrics.roc_auc if arm.test_metrics else None
        ax.plot(
            [p.fpr for p in arm.roc],
            [p.tpr for p in arm.roc],
            color=_COLORS[i % len(_COLORS)],
            lw=2,
            label=f"{arm.name} (AUC {fmt_ci(auc, 2)})",
        )
    ax.set(xlabel="1 − specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           xlim=(0, 1), ylim=(0, 1.01), title="Test ROC curves")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _png(fig)


def _calibration_figure(arms: Sequence[ArmResult]) -> bytes:
    """Reliability diagram of all completed arms; marker area follows bin size."""
    fig = Figure(figsize=(9, 9))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="#999", lw=1, label="perfectly calibrated")
    for i, arm in enumerate(arms):
        if not arm.calibration:
            continue
        total = sum(b.count for b in arm.calibration) or 1
        ece = arm.test_metrics.ece.value if arm.test_metrics else None
        color = _COLORS[i % len(_COLORS)]
        ax.plot([b.mean_predicted for b in arm.calibration], [b.fraction_positive for b in arm.calibration],
                color=color, lw=1.5, label=f"{arm.name} (positive-class ECE {fmt(ece, 3)})")
        ax.scatter([b.mean_predicted for b in arm.calibration], [b.fraction_positive for b in arm.calibration],
                   s=[20 + 300 * b.count / total for b in arm.calibration], color=color, alpha=0.6)
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.04), title="Calibration (10 equal-width bins)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return _png(fig)


def _integer_epochs(ax: Axes) -> None:
    """Epoch axis with whole-number ticks only (no 'epoch 2.5')."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def learning_plot(arm: ArmResult, color: str) -> Figure:
    """Loss and AUC per epoch of one arm, best epoch and early stop marked, epochs as whole numbers."""
    fig = Figure(figsize=(13, 5))
    ax_loss, ax_auc = fig.subplots(1, 2)
    epochs = [r.epoch for r in arm.learning_curve]
    series = (
        (ax_loss, "train_loss", "val_loss", "loss"),
        (ax_auc, "train_auc", "val_auc", "ROC AUC"),
    )
    for ax, train_key, val_key, ylabel in series:
        train = [getattr(r, train_key) for r in arm.learning_curve]
        val = [getattr(r, val_key) for r in arm.learning_curve]
        if any(v is not None for v in train):
            ax.plot(epochs, [math.nan if v is None else v for v in train], color=color, ls="--", lw=0.8,
                    label="train (with augmentation, smoothing)" if train_key == "train_loss" else "train")
        eval_loss = [r.train_eval_loss for r in arm.learning_curve] if train_key == "train_loss" else []
        if any(v is not None for v in eval_loss):
            ax.plot(epochs, [math.nan if v is None else v for v in eval_loss], color=color, ls=":", lw=1.5,
                    label="train, eval mode (plain cross-entropy)")
        if any(v is not None for v in val):
            ax.plot(epochs, [math.nan if v is None else v for v in val], color=color, marker="o", ms=3, label="val")
        if arm.best_epoch is not None:
            ax.axvline(arm.best_epoch, color="#2a2", lw=1.2, ls=":", label=f"best epoch {arm.best_epoch}")
        if arm.early_stopped and arm.stopped_epoch is not None:
            ax.axvline(arm.stopped_epoch, color="#c22", lw=1.2, ls="-.", label=f"early stop {arm.stopped_epoch}")
        ax.set(xlabel="epoch", ylabel=ylabel)
        _integer_epochs(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    gap = f", overfitting gap {fmt(arm.overfitting_gap, 3)}" if arm.overfitting_gap is not None else ""
    fig.suptitle(f"{arm.name}{gap}")
    return fig


def _efficiency_figure(results: ComparisonResults) -> bytes:
    """Test AUC versus fraction of training patients, per arm, with CI error bars."""
    fig = Figure(figsize=(9, 5.5))
    ax = fig.add_subplot()
    points = results.data_efficiency or []
    names = list(dict.fromkeys(p.arm for p in points))
    span = max((p.n_train_patients for p in points), default=1) or 1
    for i, name in enumerate(names):
        offset = (i - (len(names) - 1) / 2) * 0.012 * span  # side by side so error bars do not hide each other
        pts = sorted((p for p in points if p.arm == name), key=lambda p: p.fraction)
        pts = [p for p in pts if p.test_auc.value is not None]
        xs = [p.n_train_patients + offset for p in pts]
        ys = [p.test_auc.value or 0.0 for p in pts]
        lo = [y - (p.test_auc.ci_low if p.test_auc.ci_low is not None else y) for y, p in zip(ys, pts)]
        hi = [(p.test_auc.ci_high if p.test_auc.ci_high is not None else y) - y for y, p in zip(ys, pts)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=_COLORS[i % len(_COLORS)], label=name)
    ax.set(xlabel="training patients", ylabel="test ROC AUC (95% CI)", title="Data efficiency")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _input_size_figure(results: ComparisonResults) -> bytes:
    """Test AUC (95% CI) against training input size and against measured training FLOPs, per arm."""
    fig = Figure(figsize=(11, 5))
    by_size, by_cost = fig.subplots(1, 2)
    points = [p for p in results.input_sizes or [] if p.test_auc.value is not None]
    for i, name in enumerate(dict.fromkeys(p.arm for p in points)):
        pts = sorted((p for p in points if p.arm == name), key=lambda p: p.image_size)
        ys = [p.test_auc.value or 0.0 for p in pts]
        err = [[y - (p.test_auc.ci_low if p.test_auc.ci_low is not None else y) for y, p in zip(ys, pts)],
               [(p.test_auc.ci_high if p.test_auc.ci_high is not None else y) - y for y, p in zip(ys, pts)]]
        style = dict(marker="o", capsize=3, color=_COLORS[i % len(_COLORS)], label=name)
        by_size.errorbar([p.image_size for p in pts], ys, yerr=err, **style)
        costed = [(p.train_flops, y, lo, hi) for p, y, lo, hi in zip(pts, ys, *err) if p.train_flops]
        if costed:
            xs, cy, lo, hi = zip(*costed)
            by_cost.errorbar(xs, cy, yerr=[lo, hi], **style)
    by_size.set(xlabel="training input size (px)", ylabel="test ROC AUC (95% CI)", title="AUC against input size")
    by_cost.set(
        xlabel="measured training FLOPs",
        ylabel="test ROC AUC (95% CI)",
        title="AUC against training cost",
        xscale="log",
    )
    for ax in (by_size, by_cost):
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


def _depth_figure(results: ComparisonResults) -> bytes:
    """Validation and test AUC of the linear probe at each depth, per imagenet-linear arm; the chosen depth ringed."""
    fig = Figure(figsize=(9, 5.5))
    ax = fig.add_subplot()
    points = results.probe_depths or []
    for i, name in enumerate(dict.fromkeys(p.arm for p in points)):
        pts = [p for p in points if p.arm == name]
        xs, color = list(range(len(pts))), _COLORS[i % len(_COLORS)]
        ax.plot(xs, [p.val_auc for p in pts], marker="o", color=color, label=f"{name} validation")
        ax.plot(xs, [p.test_auc for p in pts], marker="s", linestyle="--", color=color, label=f"{name} test")
        for x, p in zip(xs, pts):
            if p.chosen and p.val_auc is not None:
                ax.plot([x], [p.val_auc], marker="o", markersize=14, fillstyle="none", color=color)
        ax.set_xticks(xs, [p.depth for p in pts])
    ax.set(xlabel="probe depth (shallow to deep)", ylabel="ROC AUC", title="Linear probe: AUC against depth (ringed: "
                                                                           "chosen on validation)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def make_figures(results: ComparisonResults) -> dict[str, RenderedFigure]:
    """Every figure the report shows, keyed by role ('roc', 'calibration', 'learning:<arm>', 'data_efficiency')."""
    with matplotlib.rc_context(FIGURE_STYLE):
        return _make_figures(results)


def _make_figures(results: ComparisonResults) -> dict[str, RenderedFigure]:
    """make_figures under the reading style."""
    done = results.completed_arms
    figures: dict[str, RenderedFigure] = {}
    if any(arm.roc for arm in done):
        figures["roc"] = RenderedFigure(
            "roc.png", "ROC curves of all completed arms on the test set", _roc_figure(done)
        )
    if any(arm.calibration for arm in done):
        figures["calibration"] = RenderedFigure(
            "calibration.png", "Calibration plot of all completed arms", _calibration_figure(done)
        )
    for i, arm in enumerate(results.arms):
        if arm.learning_curve:
            figures[f"learning:{arm.name}"] = RenderedFigure(
                f"learning_{_safe(arm.name)}.png",
                f"Learning curves of {arm.name}: loss and AUC per epoch",
                _png(learning_plot(arm, _COLORS[i % len(_COLORS)])),
            )
    if results.data_efficiency:
        figures["data_efficiency"] = RenderedFigure(
            "data_efficiency.png", "Test AUC versus number of training patients", _efficiency_figure(results)
        )
    if results.input_sizes:
        figures["input_sizes"] = RenderedFigure(
            "input_sizes.png", "Test AUC versus training input size and training cost", _input_size_figure(results)
        )
    if results.probe_depths:
        figures["probe_depths"] = RenderedFigure(
            "probe_depths.png", "Linear probe AUC versus depth", _depth_figure(results)
        )
    return figures


def _safe(name: str) -> str:
    """A file-name-safe version of an arm name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def dataset_label(results: ComparisonResults) -> str:
    """The dataset's own name for headers, or '' when it is only the generic folder name 'dataset'."""
    name = results.dataset.name.strip()
    return "" if name.lower() in ("", "dataset") else name


# ---------------------------------------------------------------- rendering


def _environment(autoescape: bool) -> jinja2.Environment:
    """Jinja environment over reports/templates with the formatting filters."""
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
