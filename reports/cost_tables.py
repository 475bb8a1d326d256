"""The cost estimate (cost.json) as text: a compact terminal table and the markdown of the Prefect artifact.

Numbers become text through reports/formatting.py, so a duration or a size reads the same here as in the report.
"""

from __future__ import annotations

from data_schemas.arms import MODEL_LABELS
from data_schemas.cost import THIS_MACHINE, ArmCost, CostReport, WallTimeEstimate
from reports.formatting import fmt_si, format_duration

# Words dropped from catalogue labels in the narrow terminal columns ("Tesla V100 SXM2" -> "V100").
_LABEL_NOISE = ("Tesla ", "GeForce ", "GTX ", " SXM2", " SXM 80GB", " SXM")


def _params(arm: ArmCost) -> str:
    """'25.6 M (25.6 M)': parameters, trainable ones in brackets."""
    return f"{fmt_si(arm.params_total)} ({fmt_si(arm.params_trainable)})"


def _arm_width(report: CostReport) -> int:
    """Width of the arm column: the longest arm name ('mobilenet_v3_large:imagenet-linear') plus two spaces."""
    return max(16, 2 + max(len(a.arm) for a in report.arms))


def _short_label(report: CostReport, name: str) -> str:
    """A device's label without vendor words, 'this' for this machine."""
    if name == THIS_MACHINE:
        return "this"
    label = next(d.label for d in report.devices if d.name == name)
    for noise in _LABEL_NOISE:
        label = label.replace(noise, "")
    return label


def _inputs_line(report: CostReport) -> str:
    """What the estimate is for, in one line."""
    i = report.inputs
    return (
        f"{i.n_images} images, {i.image_size} px, {i.channels} channel(s), {i.epochs} epochs, batch {i.batch_size}, "
        f"{i.precision}, {i.optimizer}"
    )


def format_table(report: CostReport) -> str:
    """Compact terminal table: one row of counts per arm, then estimated time per arm x device and max batch."""
    names = [d.name for d in report.devices]
    short = {name: _short_label(report, name) for name in names}
    width = max(11, 2 + max(len(label) for label in short.values()))  # "109.0 min" + two spaces
    arm_w = _arm_width(report)
    lines = [
        _inputs_line(report) + ("" if report.calibrated else "  (this-machine not calibrated)"),
        "",
        f"{'arm':<{arm_w}}{'model':<19}{'params (train)':>19}{'fwd GF/img':>11}{'train GF/img':>13}{'total PF':>10}"
        f"{'mem@batch':>11}",
    ]
    for a in report.arms:
        lines.append(
            f"{a.arm:<{arm_w}}{MODEL_LABELS[a.model]:<19}{_params(a):>19}{a.forward_flops_per_image / 1e9:>11.2f}"
            f"{a.train_flops_per_image / 1e9:>13.2f}{a.flops_total / 1e15:>10.2f}"
            f"{fmt_si(a.memory.total_bytes, 'B'):>11}"
        )
    lines += ["", f"{'estimated time':<{arm_w}}" + "".join(f"{short[n]:>{width}}" for n in names)]
    for a in report.arms:
        seconds = {d.device: d.seconds for d in a.devices}
        lines.append(f"{a.arm:<{arm_w}}" + "".join(f"{format_duration(seconds[n]):>{width}}" for n in names))
    smallest = {n: min(d.max_batch_size for a in report.arms for d in a.devices if d.device == n) for n in names}
    lines.append(f"{'max batch':<{arm_w}}" + "".join(f"{smallest[n]:>{width}}" for n in names))
    given = [a for a in report.arms if a.max_batch_for_given_memory is not None]
    if given:
        lines.append(
            f"max batch in {report.inputs.device_memory_gb:g} GB: "
            + ", ".join(f"{a.arm} {a.max_batch_for_given_memory}" for a in given)
        )
    return "\n".join(lines)


def markdown_table(report: CostReport) -> str:
    """The Prefect artifact: inputs, counts per arm, estimated time per arm x device, this machine's calibration."""
    names = [d.name for d in report.devices]
    labels = {d.name: d.label for d in report.devices}
    out = [
        "# ctcompare cost estimate",
        "",
        f"{_inputs_line(report)}. {report.flop_convention}",
        "",
        "| arm | model | params (trainable) | fwd GFLOPs/img | train GFLOPs/img | total PFLOPs | memory @ batch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for a in report.arms:
        out.append(
            f"| {a.arm} | {MODEL_LABELS[a.model]} | {_params(a)} | {a.forward_flops_per_image / 1e9:.2f} | "
            f"{a.train_flops_per_image / 1e9:.2f} | "
            f"{a.flops_total / 1e15:.3f} | {fmt_si(a.memory.total_bytes, 'B')} |"
        )
    out += ["", "| arm | " + " | ".join(labels[n] for n in names) + " |", "|---|" + "---:|" * len(names)]
    for a in report.arms:
        by_device = {d.device: d for d in a.devices}
        cells = [f"{format_duration(by_device[n].seconds)} (max batch {by_device[n].max_batch_size})" for n in names]
        out.append(f"| {a.arm} | " + " | ".join(cells) + " |")
    if report.calibration:
        c = report.calibration
        out += [
            "",
            f"This machine: {c.precision} matmul {fmt_si(c.matmul_flops_per_second, 'FLOP/s')}, ResNet-50 training "
            f"{c.train_images_per_second:.1f} img/s at {c.image_size} px (utilisation {c.utilisation:.2f}, "
            f"first-step warm-up {format_duration(c.warmup_seconds)} per run).",
        ]
    out += ["", *[f"- {n}" for n in report.notes]]
    if report.wall_time is not None:
        out += ["", *wall_time_markdown(report.wall_time)]
    return "\n".join(out)


def _range(low: float, high: float) -> str:
    """'4.6 min' or '4.6 to 6.4 min'-style text of a range of seconds."""
    return format_duration(low) if format_duration(low) == format_duration(high) else (f"{format_duration(low)} to "
                                                                                       f"{format_duration(high)}")


def wall_time_line(estimate: WallTimeEstimate) -> str:
    """The one log line of the prediction: 'Predicted wall time of this comparison: ...'."""
    training = [s for s in estimate.stages if s.stage.startswith("training ")]
    spent = sum(s.seconds_min for s in estimate.stages if s.basis == "measured")
    spread = "" if estimate.seconds_min == estimate.seconds_max else (" (the range is early stopping: earliest stop "
                                                                      ".. every epoch)")
    return (
        f"Predicted wall time of this comparison: {_range(estimate.seconds_min, estimate.seconds_max)}{spread}; "
        f"training {_range(sum(s.seconds_min for s in training), sum(s.seconds_max for s in training))}, "
        f"the other stages {format_duration(sum(s.seconds_min for s in estimate.stages if s not in training))}"
        f" ({format_duration(spent)} of them already spent)."
    )


def wall_time_markdown(estimate: WallTimeEstimate) -> list[str]:
    """The prediction as markdown lines: the line, a table of stages, the formula and notes."""
    out = [f"**{wall_time_line(estimate)}**", "", "| stage | predicted | basis |", "|---|---:|---|"]
    out += [f"| {s.stage} | {_range(s.seconds_min, s.seconds_max)} | {s.basis} |" for s in estimate.stages]
    out += ["", f"Formula: {estimate.formula}.", *[f"- {n}" for n in estimate.notes]]
    return out
