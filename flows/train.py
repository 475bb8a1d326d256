"""The train flow: the runs of a plan, one `train-arm` task each (its command: flows/cli/train.py).

The command line resolves the settings once into a run plan (RUN_DIR/plan.json, data_schemas/plan.py): one run, or with
`--folds K` one run per outer fold (RUN_DIR/fold-<k>; every labelled patient is tested in exactly one of them).
The flow is thin: one `train-arm` task per planned run (tasks.training.train; retries=1, a retry resumes from the last
finished epoch). A comparison hands single runs of its own plan to this flow on a work pool (`run=...`).
Outputs per run folder are described in data_schemas/training.py.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.states import Cancelled, State

from data_schemas.plan import read_plan
from data_schemas.training import RunSummary
from flows.parameters import PlanFile, PlannedRunFolder, Resume, TrainDataset, TrainWeights, WeightsFolder
from flows.run_logs import tidy_run_logs


class RunsSkipped(RuntimeError):
    """Every run of a train flow run was skipped (no weights): the data of its "Skipped" state, which a deployment's
    flow-run process can raise as an error (a plain list it cannot); `summaries` holds each run's RunSummary."""

    def __init__(self, message: str, summaries: list[RunSummary]) -> None:
        super().__init__(message, summaries)  # both in args, so the error pickles with the summaries

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def summaries(self) -> list[RunSummary]:
        """Each skipped run's RunSummary (status "skipped", reason)."""
        return self.args[1]


@flow(name="train", log_prints=True)
def train_flow(
    *,
    dataset_dir: TrainDataset,
    plan_path: PlanFile,
    run: PlannedRunFolder = None,
    weights_path: TrainWeights = None,
    resume: Resume = False,
    weights_dir: WeightsFolder = None,
) -> list[RunSummary] | State:
    """Train the runs of a plan: every run, or only `run` (its folder as written in the plan).

    run=... is how a comparison hands one training run to a work pool. weights_path: the ResNet-50 weights file;
    weights_dir: a folder of torchvision-format weights files named by model (e.g. resnet18-f37072fd.pth).
    When every run was skipped (no weights), the flow run ends "Skipped" (Cancelled type, grey in the UI), its data
    a RunsSkipped holding the summaries.
    """
    from tasks.training.train import SKIPPED_STATE_NAME, run_summary, train_arm_task

    tidy_run_logs(RunsSkipped)
    plan = read_plan(Path(plan_path))
    runs = [plan.run(run).run_dir] if run is not None else [planned.run_dir for planned in plan.runs]
    summaries = [
        run_summary(train_arm_task(dataset_dir=Path(dataset_dir), plan_path=Path(plan_path), run=name,
                                   weights_path=weights_path, resume=resume,
                                   weights_dir=Path(weights_dir) if weights_dir else None, return_state=True))
        for name in runs
    ]
    if summaries and all(summary.status == "skipped" for summary in summaries):
        reasons = "; ".join(f"{summary.arm}: {summary.reason}" for summary in summaries)
        message = f"Skipped: {reasons}"
        return Cancelled(name=SKIPPED_STATE_NAME, message=message, data=RunsSkipped(message, summaries))
    return summaries

