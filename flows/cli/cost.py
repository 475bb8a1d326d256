"""`ctcompare cost`: its parser and argument checks; the cost flow (Prefect, torch) is imported once they pass."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_schemas.arms import ARM_MODES, ARM_NAMES, MODEL_NAMES
from data_schemas.cost import COST_FILE, OPTIMIZERS, PRECISIONS, CostInputs
from flows.cli.checks import arm_list
from flows.cli.errors import UsageError
from tasks.common.paths import refuse_non_folder


def inputs_from_args(args: argparse.Namespace) -> CostInputs:
    """CostInputs from the command line; ValueError (one sentence) for a bad argument."""
    from tasks.cost.estimate import resolve_cost_inputs

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
    from flows.cost import cost_flow
    from reports.cost_tables import format_table

    try:
        inputs = inputs_from_args(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    out = Path(args.out if args.out is not None else (args.dataset if args.dataset is not None else Path.cwd()))
    try:
        refuse_non_folder(out, "--out", f"give a folder for {COST_FILE}")
    except ValueError as error:
        raise UsageError(str(error)) from None
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ctcompare cost`."""
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
    parser.add_argument("--epochs", type=int, default=100, help="training epochs to price (default 100)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="training batch size, for memory and this machine's timed steps (default 32)")
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
    parser.add_argument("--device-memory-gb", type=float, default=None,
                        help="also report the largest batch for this memory")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for cost.json (default: dataset folder, else cwd)")
    parser.add_argument("--no-calibrate", action="store_true", help="use catalogue defaults for this machine")
    parser.add_argument("--force", action="store_true", help="recompute even if cost.json has the same inputs")
    parser.add_argument("--json", action="store_true", help="print cost.json to stdout instead of the table")
    parser.set_defaults(handler=run_cost)
