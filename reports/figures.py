"""The report's figures (ROC, calibration, learning curves, data efficiency, input sizes, probe depths) as PNG bytes:
matplotlib's Agg canvas, no pyplot state. Only reports.render imports it, when it draws a report, so reading a kept
report (its summary and metrics table) does not import matplotlib."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from data_schemas.report import ArmResult, ComparisonResults
from reports.formatting import fmt, fmt_ci

DPI = 100
# Sized for reading: every figure is at least 8 in x 100 dpi = 800 px wide before the tight crop (>= 700 px after),
# with 11-13 pt text, so legends stay legible when the browser shows the PNG at its natural size.
FIGURE_STYLE: dict[str, Any] = {
    "font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 11,
    "xtick.labelsize": 11, "ytick.labelsize": 11, "figure.titlesize": 13,
}
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


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
