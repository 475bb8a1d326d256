"""`ctcompare demo`: a synthetic cohort, its ingest and the whole comparison on it, in one command.

Every argument (the cohort's, the comparison's and the weights file) is checked before Prefect starts; the run plan
resolved in that check is the one the comparison runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_schemas.arms import ARM_NAMES
from data_schemas.training import PROFILE_NAMES
from flows.cli.checks import arm_list
from flows.cli.compare import report_outcome
from flows.cli.errors import UsageError
from flows.parameters import (
    MAX_SEED,
    Arms,
    Patients,
    Profile,
    SlicesPerPatient,
    WeightsFile,
    check_flow_parameters,
    check_weights_loadable,
    help_for,
)

DEMO_INGEST_SIZE = 224


def _run_demo(args: argparse.Namespace) -> int:
    """Synth, ingest (with the cohort's true nodule discs for the shortcut check), compare; prints the outcome."""
    from data_schemas.visual import LESIONS_SIDECAR_FILE
    from flows.compare import compare_flow, comparison_plan
    from flows.ingest import ingest_flow
    from flows.synth import synth_flow
    from tasks.ingest.lesions import attach_lesions

    root = Path(args.out).resolve()
    cohort = root / "cohort"
    try:
        check_flow_parameters(synth_flow, {"out_dir": str(cohort), "patients": args.patients,
                                           "slices_per_patient": args.slices_per_patient, "seed": args.seed})
        plan = comparison_plan(profile=args.profile, arms=arm_list(args.arms) or list(ARM_NAMES), seed=args.seed)
        check_weights_loadable(args.weights)
    except ValueError as error:
        raise UsageError(str(error)) from None
    synth_flow(out_dir=str(cohort), patients=args.patients, slices_per_patient=args.slices_per_patient, seed=args.seed)
    dataset = root / "dataset"
    ingest_flow(src_dir=str(cohort / "dicom"), out_dir=str(dataset), labels=str(cohort / "labels.csv"),
                size=DEMO_INGEST_SIZE)
    if (cohort / LESIONS_SIDECAR_FILE).is_file():
        attach_lesions(dataset_dir=dataset, sidecar=cohort / LESIONS_SIDECAR_FILE)
    state = compare_flow(
        source=str(dataset), out_dir=str(root / "reports" / f"demo-{args.profile}"), profile=args.profile,
        arms=plan.arms, weights=args.weights, seed=args.seed, plan=plan, return_state=True,
    )
    print(f"Index of every report: {root / 'reports' / 'index.html'}")
    return report_outcome(state)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ctcompare demo`."""
    demo = subparsers.add_parser(
        "demo", help="synthetic demo cohort + the whole comparison (cpu profile)",
        description="Try ctcompare without data of your own: write a synthetic chest-CT cohort (DICOM files with "
        "made-up patients, and its labels.csv) into OUT/cohort, ingest it into OUT/dataset, and compare the arms on "
        "it; the report is OUT/reports/demo-PROFILE/report.html, and OUT/reports/index.html lists every report. "
        "The cpu profile takes minutes on a laptop; --profile smoke takes seconds (its numbers mean nothing). "
        "Without ImageNet weights (--weights, or the torch hub cache) the pretrained arms are skipped and the "
        "result is partial (exit code 3).")
    demo.add_argument("--out", default="demo", help="demo folder (cohort/, dataset/, reports/); default ./demo")
    demo.add_argument("--profile", default="cpu", choices=PROFILE_NAMES, help=help_for(Profile, "cpu"))
    demo.add_argument("--arms", nargs="+", help=help_for(Arms, "all"))
    demo.add_argument("--weights", help=help_for(WeightsFile))
    demo.add_argument("--patients", type=int, default=150, help=help_for(Patients, 150))
    demo.add_argument("--slices-per-patient", type=int, default=10, help=help_for(SlicesPerPatient, 10))
    demo.add_argument("--seed", type=int, default=0, help="random seed of the cohort, the split, the training runs and "
                      f"the bootstrap: the same seed gives the same demo (a whole number from 0 to {MAX_SEED}; "
                      "default 0)")
    demo.set_defaults(handler=_run_demo)
