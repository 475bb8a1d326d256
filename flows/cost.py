"""The cost stage: the Prefect flow "cost" (its command: flows/cli/cost.py).

Estimates, before training, what each arm (a model and a mode: scratch, imagenet, imagenet-linear; e.g.
"resnet18:imagenet", bare modes meaning ResNet-50) costs in FLOPs, memory and wall
time on a catalogue of devices and on this machine (calibrated), and writes cost.json plus a markdown artifact
(key "ctcompare-cost"). cost.json holds estimates only: each training run measures itself in its timing.json and
evaluation compares the two. All the work lives in tasks/cost/, the tables in reports/cost_tables.py; this
module only orchestrates.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from data_schemas.cost import COST_FILE, CostReport
from data_schemas.files import sha256_file
from flows.parameters import Calibrate, CostInputsParameter, CostOutFolder, Force, WallTimePlanParameter
from reports.cost_tables import markdown_table, wall_time_line
from tasks.cost.calibration import describe_calibration
from tasks.cost.catalogue import default_catalogue_path
from tasks.cost.estimate import calibrate_task, config_hash, estimate_task, existing_report, write_task
from tasks.cost.wall_time import predict_wall_time

ARTIFACT_KEY = "ctcompare-cost"


def log_wall_time(report: CostReport) -> None:
    """Log a cost report's predicted wall time and which calibration it used, in the current flow run."""
    if report.wall_time is None:
        return
    logger = get_run_logger()
    logger.info("%s", wall_time_line(report.wall_time))
    if report.calibration is not None:
        logger.info("The wall-time prediction used %s.", describe_calibration(report.calibration))
    else:
        logger.info("The wall-time prediction used the device catalogue's guess (this machine not calibrated).")


def _is_subflow() -> bool:
    """True inside a flow run started by another flow run (its parent logs what matters to the person watching)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.parent_task_run_id)


@flow(name="cost", validate_parameters=True)
def cost_flow(*, inputs: CostInputsParameter, out_dir: CostOutFolder, calibrate: Calibrate = True,
              force: Force = False, wall_time_plan: WallTimePlanParameter = None) -> CostReport:
    """Estimate each arm's cost for `inputs` and write cost.json into out_dir.

    inputs: what to price (tasks.cost.estimate.resolve_cost_inputs builds it from a dataset folder or an image count);
    n_images must be the training images only. calibrate: measure this machine (cached) instead of using the
    catalogue's guess. A cost.json made from the same inputs, catalogue and calibration choice is reused unless
    force=True. wall_time_plan: a whole comparison's runs and stages; its predicted wall time is stored in cost.json
    and logged ("Predicted wall time of this comparison: ...", log_wall_time) when this is not a subflow: the
    comparison logs it in its own run.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    expected = config_hash(inputs, sha256_file(default_catalogue_path()), calibrate)
    report = None if force else existing_report(out_dir, expected)
    if report is None or wall_time_plan is not None:
        if report is None:
            calibration = (
                calibrate_task(inputs.image_size, inputs.channels, inputs.precision, inputs.batch_size)
                if calibrate
                else None
            )
            report = estimate_task(inputs, calibration)
        if wall_time_plan is not None:
            predicted = predict_wall_time(report, wall_time_plan, cost_stage_seconds=time.monotonic() - started)
            report = report.model_copy(update={"wall_time": predicted})
            if not _is_subflow():  # a comparison logs its prediction in its own run, where it is read
                log_wall_time(report)
        write_task(out_dir, report)
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=markdown_table(report),
        description=f"cost estimate per arm and device ({out_dir / COST_FILE})",
    )
    return report
