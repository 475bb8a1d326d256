"""The cost stage: `ctcompare cost` and the Prefect flow "cost".

Estimates, before training, what each arm (scratch, imagenet, imagenet-linear) costs in FLOPs, memory and wall
time on a catalogue of devices and on this machine (calibrated), and writes cost.json plus a markdown artifact
(key "ctcompare-cost"). The training stage later records actual time into the same cost.json
(tasks.cost.record_actual). All the work lives in tasks/cost.py; this module only orchestrates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from data_schemas.cost import ARM_NAMES, OPTIMIZERS, PRECISIONS, ArmName, CostReport, OptimizerName, Precision
from tasks.cost import (
    calibrate_task,
    config_hash,
    default_catalogue_path,
    estimate_task,
    existing_report,
    format_table,
    markdown_table,
    report_json,
    resolve_cost_inputs,
    write_task,
)
from data_schemas.files import sha256_file

ARTIFACT_KEY = "ctcompare-cost"


@flow(name="cost", validate_parameters=True)
def cost_flow(
    n_images: Annotated[int, Field(ge=1)] | None = None,
    dataset: Path | None = None,
    image_size: Annotated[int, Field(ge=32, le=2048)] | None = None,
    channels: Annotated[int, Field(ge=1, le=3)] | None = None,
    epochs: Annotated[int, Field(ge=1)] = 100,
    batch_size: Annotated[int, Field(ge=1)] = 32,
    arms: list[ArmName] | None = None,
    precision: Precision = "bf16",
    optimizer: OptimizerName = "adam",
    head_warmup_epochs: Annotated[int, Field(ge=0)] = 0,
    device_memory_gb: Annotated[float, Field(gt=0)] | None = None,
    out_dir: Path | None = None,
    calibrate: bool = True,
    force: bool = False,
) -> CostReport:
    """Estimate each arm's cost and write cost.json into out_dir (default: the dataset folder, else the cwd).

    Parameters are validated before any work (Prefect + CostInputs); a cost.json made from the same inputs,
    catalogue and calibration choice is reused (and its recorded actuals kept) unless force=True.
    """
    inputs = resolve_cost_inputs(
        dataset=dataset,
        n_images=n_images,
        image_size=image_size,
        channels=channels,
        epochs=epochs,
        batch_size=batch_size,
        arms=arms,
        precision=precision,
        optimizer=optimizer,
        head_warmup_epochs=head_warmup_epochs,
        device_memory_gb=device_memory_gb,
    )
    out = Path(out_dir) if out_dir is not None else (Path(dataset) if dataset is not None else Path.cwd())
    expected = config_hash(inputs, sha256_file(default_catalogue_path()), calibrate)
    report = None if force else existing_report(out, expected)
    if report is None:
        calibration = (
            calibrate_task(inputs.image_size, inputs.channels, inputs.precision, inputs.batch_size) if calibrate else None
        )
        report = estimate_task(inputs, calibration)
        write_task(out, report)
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=markdown_table(report),
        description=f"ResNet-50 cost estimate per arm and device ({out / 'cost.json'})",
    )
    return report


# ============================================================================================ CLI


def run_cost(args: argparse.Namespace) -> int:
    from flows.cli import UsageError, arm_list

    try:
        inputs = resolve_cost_inputs(
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
    except ValueError as error:
        raise UsageError(str(error)) from None
    out = args.out if args.out is not None else (args.dataset if args.dataset is not None else Path.cwd())
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder; give a folder for cost.json.")
    print(
        "ctcompare cost: counting FLOPs and measuring memory"
        + ("; calibrating this machine (about 20 s the first time, cached after)" if not args.no_calibrate else "")
        + " ...",
        file=sys.stderr,
    )
    report = cost_flow(
        n_images=inputs.n_images,
        image_size=inputs.image_size,
        channels=inputs.channels,
        epochs=inputs.epochs,
        batch_size=inputs.batch_size,
        arms=list(inputs.arms),
        precision=inputs.precision,
        optimizer=inputs.optimizer,
        head_warmup_epochs=inputs.head_warmup_epochs,
        device_memory_gb=inputs.device_memory_gb,
        dataset=args.dataset,
        out_dir=Path(out),
        calibrate=not args.no_calibrate,
        force=args.force,
    )
    if args.json:
        print(report_json(report))
    else:
        print(format_table(report))
        print(f"\nwrote {Path(out) / 'cost.json'}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cost",
        help="estimate FLOPs, memory and training time of each arm before training",
        description=(
            "Count ResNet-50 FLOPs at your size and channel count, measure memory, and estimate training time per "
            "arm on a catalogue of GPUs and on this machine (calibrated in seconds, cached). Writes cost.json."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", type=Path, metavar="DATASET_DIR", help="an ingested dataset folder (dataset.json)")
    source.add_argument("--images", type=int, metavar="N", help="number of training images")
    parser.add_argument("--size", type=int, default=None, help="input side in px (default: the dataset's, else 224)")
    parser.add_argument("--channels", type=int, default=None, help="input channels (default 1)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--arms", nargs="+", metavar="ARM", help=f"arms to estimate (default all: {', '.join(ARM_NAMES)})")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="training precision (default bf16)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="for optimizer-state memory")
    parser.add_argument("--head-warmup-epochs", type=int, default=0, help="imagenet arm: head-only epochs first")
    parser.add_argument("--device-memory-gb", type=float, default=None, help="also report the largest batch for this memory")
    parser.add_argument("--out", type=Path, default=None, help="folder for cost.json (default: dataset folder, else cwd)")
    parser.add_argument("--no-calibrate", action="store_true", help="use catalogue defaults for this machine")
    parser.add_argument("--force", action="store_true", help="recompute even if cost.json has the same inputs")
    parser.add_argument("--json", action="store_true", help="print cost.json to stdout instead of the table")
    parser.set_defaults(handler=run_cost)
