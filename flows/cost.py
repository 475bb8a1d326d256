"""The cost stage: `ctcompare cost` and the Prefect flow "cost".

Estimates, before training, what each arm (a model and a mode: scratch, imagenet, imagenet-linear; e.g.
"resnet18:imagenet", bare modes meaning ResNet-50) costs in FLOPs, memory and wall
time on a catalogue of devices and on this machine (calibrated), and writes cost.json plus a markdown artifact
(key "ctcompare-cost"). cost.json holds estimates only: each training run measures itself in its timing.json and
evaluation compares the two. All the work lives in tasks/cost/estimate.py, the tables in reports/cost_tables.py; this
module only orchestrates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from data_schemas.arms import ARM_MODES, MODEL_NAMES
from data_schemas.cost import ARM_NAMES, COST_FILE, OPTIMIZERS, PRECISIONS, CostInputs, CostReport, WallTimePlan
from data_schemas.files import sha256_file
from flows.parameters import Calibrate, CostInputsParameter, CostOutFolder, Force, WallTimePlanParameter
from reports.cost_tables import format_table, markdown_table, wall_time_line
from tasks.cost.estimate import (
    calibrate_task,
    config_hash,
    default_catalogue_path,
    estimate_task,
    existing_report,
    predict_wall_time,
    resolve_cost_inputs,
    write_task,
)

ARTIFACT_KEY = "ctcompare-cost"


@flow(name="cost", validate_parameters=True)
def cost_flow(*, inputs: CostInputsParameter, out_dir: CostOutFolder, calibrate: Calibrate = True,
              force: Force = False, wall_time_plan: WallTimePlanParameter = None) -> CostReport:
    """Estimate each arm's cost for `inputs` and write cost.json into out_dir.

    inputs: what to price (tasks.cost.estimate.resolve_cost_inputs builds it from a dataset folder or an image count);
    n_images must be the training images only. calibrate: measure this machine (cached) instead of using the
    catalogue's guess. A cost.json made from the same inputs, catalogue and calibration choice is reused unless
    force=True. wall_time_plan: a whole comparison's runs and stages; its predicted wall time is logged
    ("Predicted wall time of this comparison: ...") and stored in cost.json.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    expected = config_hash(inputs, sha256_file(default_catalogue_path()), calibrate)
    report = None if force else existing_report(out_dir, expected)
    if report is None or wall_time_plan is not None:
        if report is None:
            calibration = (
                calibrate_task(inputs.image_size, inputs.channels, inputs.precision, inputs.batch_size) if calibrate else None
            )
            report = estimate_task(inputs, calibration)
        if wall_time_plan is not None:
            predicted = predict_wall_time(report, wall_time_plan, cost_stage_seconds=time.monotonic() - started)
            report = report.model_copy(update={"wall_time": predicted})
            get_run_logger().info("%s", wall_time_line(predicted))
        write_task(out_dir, report)
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=markdown_table(report),
        description=f"cost estimate per arm and device ({out_dir / COST_FILE})",
    )
    return report


# ============================================================================================ CLI


def inputs_from_args(args: argparse.Namespace) -> CostInputs:
    """CostInputs from the command line; ValueError (one sentence) for a bad argument."""
    from flows.cli import arm_list

    return resolve_cost_inputs(
        dataset=args.dataset,
        n_images=args.images,
        image_size=args.size,
        channels=args.channels,
        epochs=args.epochs,
        batch_size=args.batch_size,
        arms=arm_list(args.arms) or None,
        precision=args.precision,
        optimizer=args.optimizer,
        head_warmup_epochs=args.head_warmup_epochs,
        device_memory_gb=args.device_memory_gb,
    )


def run_cost(args: argparse.Namespace) -> int:
    """`ctcompare cost`: check the arguments, run the flow, print the table (or cost.json with --json)."""
    from flows.cli import UsageError

    try:
        inputs = inputs_from_args(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    out = Path(args.out if args.out is not None else (args.dataset if args.dataset is not None else Path.cwd()))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; give a folder for {COST_FILE}.")
    print(
        "ctcompare cost: counting FLOPs and measuring memory"
        + ("; calibrating this machine (about 20 s the first time, cached after)" if not args.no_calibrate else "")
        + " ...",
        file=sys.stderr,
    )
    report = cost_flow(inputs=inputs, out_dir=out, calibrate=not args.no_calibrate, force=args.force)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print(format_table(report))
        print(f"\nwrote {out / COST_FILE}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cost",
        help="estimate FLOPs, memory and training time of each arm before training",
        description=(
            "Count each arm's model FLOPs at your size and channel count, measure memory, and estimate training time "
            "per arm on a catalogue of GPUs and on this machine (calibrated in seconds, cached). Writes cost.json."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", type=Path, metavar="DATASET_DIR", help="an ingested dataset folder (dataset.json)")
    source.add_argument("--images", type=int, metavar="N", help="number of training images")
    parser.add_argument("--size", type=int, default=None, help="input side in px (default: the dataset's, else 224)")
    parser.add_argument("--channels", type=int, default=None, help="input channels (default 1)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--arms",
        nargs="+",
        metavar="ARM",
        help=(
            f"arms to estimate, MODEL:MODE (MODEL one of {', '.join(MODEL_NAMES)}; MODE one of {', '.join(ARM_MODES)}; "
            f"a bare MODE means resnet50), e.g. resnet18:imagenet (default: {', '.join(ARM_NAMES)})"
        ),
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="training precision (default bf16)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="for optimizer-state memory")
    parser.add_argument("--head-warmup-epochs", type=int, default=0, help="imagenet arm: head-only epochs first")
    parser.add_argument("--device-memory-gb", type=float, default=None, help="also report the largest batch for this memory")
    parser.add_argument("--out", type=Path, default=None, help="folder for cost.json (default: dataset folder, else cwd)")
    parser.add_argument("--no-calibrate", action="store_true", help="use catalogue defaults for this machine")
    parser.add_argument("--force", action="store_true", help="recompute even if cost.json has the same inputs")
    parser.add_argument("--json", action="store_true", help="print cost.json to stdout instead of the table")
    parser.set_defaults(handler=run_cost)
