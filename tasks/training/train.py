"""Training one arm on one outer fold: `train_arm` (a plain function) and `train_arm_task` (its Prefect task).

The run's settings come from the run plan (data_schemas/plan.py), never from profile strings. The run's data comes
from tasks/training/split_data.py; a network arm trains in tasks/training/network_arm.py (its loop in loop.py), the
imagenet-linear arm in tasks/training/linear_arm.py; the run folder's files are written by run_folder.py.

Fault model. After every finished epoch checkpoint_last.pt is replaced atomically (model, optimizer, RNG and the
whole TrainState: step, history, early-stopping state, timing, and the best weights when they are not the current
ones); best.pt and metrics.csv are then rewritten from the same state, and rewritten again from the checkpoint on
resume, so a kill at any point leaves the previous epoch's consistent state. Batch order, augmentation and dropout
are seeded per (seed, epoch), so a resumed run repeats exactly the epochs an uninterrupted run would have done.
status.json is written last; only status "completed" means predictions.csv, val_predictions.csv and timing.json
are final. A completed run folder whose config hash equals the new one is not trained again.

Retries. The task retries once (retries=1), and the retry resumes from the last finished epoch. A ValueError is
not retried (see _retry_worthwhile): a bad setting, weights file, split or label fails the same way again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, State

from data_schemas.arms import DEFAULT_MODEL, parse_arm
from data_schemas.plan import PlannedRun, RunPlan, read_plan
from data_schemas.training import RunSummary, TrainConfig, WeightsInfo
from tasks.common.paths import UNWRITABLE_ERRNOS
from tasks.common.progress import RunProgress
from tasks.common.runtime import choose_runtime, planned_runtime
from tasks.cost.first_epoch import first_epoch_watch
from tasks.ingest.dataset_store import load_dataset
from tasks.training.run_folder import completed_run, write_config, write_status
from tasks.training.run_identity import make_run_config, run_logger as _logger
from tasks.training.split_data import RunSplit, build_split_tensors, check_training_part_has_both_classes, run_split
from tasks.training.weights_record import recorded_check

if TYPE_CHECKING:
    import torch

    from tasks.ingest.dataset_store import LoadedDataset
    from tasks.training.run_context import RunContext

SKIPPED_STATE_NAME = "Skipped"  # the state of a run skipped for want of weights: Cancelled type, grey in the UI


class TrainingInterrupted(Exception):
    """Raised by an on_epoch_end hook to stop a run after a finished epoch (used by tests to simulate a kill)."""



def weights_file_for(model: str, weights_path: Path | None, weights_dir: Path | None) -> Path | None:
    """The local weights file of `model`: in weights_dir under torchvision's file name (e.g. resnet18-f37072fd.pth),
    else a single '<model>-<hash>.pth' there; else --weights for ResNet-50; else None (torch hub cache, download)."""
    if weights_dir is not None:
        from tasks.training.model_defs import model_def
        from tasks.training.weights import weights_file_name

        for weights in model_def(model).weights:
            if (candidate := Path(weights_dir) / weights_file_name(weights)).is_file():
                return candidate
        named = sorted(p for p in Path(weights_dir).glob(f"{model}-*.pth") if p.stem[len(model) + 1:].isalnum())
        if len(named) > 1:
            raise ValueError(f"{weights_dir} holds several {model} weights files ({', '.join(p.name for p in named)}); "
                             "keep one.")
        if named:
            return named[0]
    return Path(weights_path) if weights_path is not None and model == DEFAULT_MODEL else None


def _backbone(arm: str, run_dir: Path, config: TrainConfig, weights: tuple[Path | None, Path | None], fold: int,
              ) -> tuple[dict[str, torch.Tensor] | None, WeightsInfo | None, str | None]:
    """(backbone state, WeightsInfo, skip reason) of a pretrained arm; (None, None, None) for scratch.

    weights: (--weights, the ResNet-50 file; --weights-dir, a folder of files named by model)."""
    from tasks.training.weights import WeightsUnavailableError, resolve_imagenet_weights

    spec = parse_arm(arm)
    if not spec.pretrained:
        return None, None, None
    try:
        path = weights_file_for(spec.model, *weights)
        backbone, info = resolve_imagenet_weights(path, allow_download=config.download_weights, model=spec.model)
        return backbone, info, None
    except WeightsUnavailableError as error:
        if spec.model == DEFAULT_MODEL:
            return None, None, str(error)
        # --weights is the ResNet-50 file; the other models' files come from a folder or the cache
        return None, None, f"{str(error).split(', or pass --weights')[0]}, or give --weights-dir DIR holding it."
    except ValueError as error:  # WeightsFileError: a file that exists but is unusable is an error
        write_status(run_dir, arm=arm, status="failed", reason=str(error), fold=fold)
        raise


def train_arm(
    *,
    dataset_dir: Path,
    plan_path: Path,
    run: str,
    weights_path: Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[int], None] | None = None,
    weights_dir: Path | None = None,
) -> RunSummary:
    """Train (or fit, for imagenet-linear) one planned run and write its run folder; see the module doc.

    run: the run's folder as written in the plan (relative to plan_path's folder). weights_path is the ResNet-50
    weights file; weights_dir a folder of torchvision-format files named by model (weights_file_for); without
    them the torch hub cache is searched (tasks.training.weights.resolve_imagenet_weights). Pretrained arms without
    weights are skipped (status.json "skipped", reason = where to put the file), not an error. Bad settings, a bad
    weights file or a mismatched split raise ValueError subclasses with one sentence.
    """
    started = time.perf_counter()
    plan_path = Path(plan_path).resolve()
    plan = read_plan(plan_path)
    planned = plan.run(run)
    run_dir = Path(os.path.normpath(plan_path.parent / planned.run_dir))
    splits_path = Path(os.path.normpath(plan_path.parent / plan.splits_file))
    dataset = load_dataset(Path(dataset_dir), in_memory=True)
    split = run_split(plan, planned, dataset, splits_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        check_training_part_has_both_classes(split.parts, split.classes)
    except ValueError as error:  # before any training: the run is recorded as failed, with the reason
        write_status(run_dir, arm=planned.arm, status="failed", reason=str(error), fold=planned.outer_fold)
        raise
    previous = _completed_unloaded(plan, planned, run_dir, dataset, split, (weights_path, weights_dir))
    if previous is not None:
        return previous
    backbone, weights_info, skip_reason = _backbone(planned.arm, run_dir, planned.config, (weights_path, weights_dir),
                                                    planned.outer_fold)
    runtime = choose_runtime(planned.config)
    config = make_run_config(plan, planned, dataset=dataset, split=split, weights=weights_info, runtime=runtime)
    if skip_reason is None and (previous := _completed(planned.arm, run_dir, config.config_hash)) is not None:
        return previous
    write_config(run_dir, config)
    data = build_split_tensors(dataset.images, {r.image_key: r.index for r in dataset.manifest}, split.parts,
                               planned.config.image_size, split.classes[1], split.classes)
    del dataset
    from tasks.training.run_context import RunContext

    ctx = RunContext(arm=planned.arm, run_dir=run_dir, config=config, runtime=runtime, data=data, seed=plan.seed,
                     fold=planned.outer_fold, backbone=backbone, started=started)
    return _run(ctx, skip_reason, resume=resume, on_epoch_end=on_epoch_end)


def _completed(arm: str, run_dir: Path, config_hash: str) -> RunSummary | None:
    """The run folder's completed run of this configuration (logged as not trained again), else None."""
    previous = completed_run(run_dir, config_hash)
    if previous is not None:
        _logger().info("%s: %s already holds a completed run with this configuration; not training again", arm, run_dir)
    return previous


def _completed_unloaded(plan: RunPlan, planned: PlannedRun, run_dir: Path, dataset: LoadedDataset, split: RunSplit,
                        weights: tuple[Path | None, Path | None]) -> RunSummary | None:
    """The completed run this one would repeat, found without loading weights or importing torch: the runtime from
    the hardware probe and a pretrained arm's weights file from the record of its last check, both unchanged
    (tasks.common.runtime, tasks.training.weights_record). None when either is unknown or the run must train."""
    info = None
    spec = parse_arm(planned.arm)
    if spec.pretrained:
        weights_path, weights_dir = weights
        path = weights_file_for(spec.model, weights_path, None) if weights_dir is None else None
        info = recorded_check(path, spec.model) if path is not None else None
        if info is None:
            return None
    config = make_run_config(plan, planned, dataset=dataset, split=split, weights=info,
                             runtime=planned_runtime(planned.config))
    return _completed(planned.arm, run_dir, config.config_hash)


def _run(ctx: RunContext, skip_reason: str | None, *, resume: bool,
         on_epoch_end: Callable[[int], None] | None) -> RunSummary:
    """The run's outcome in status.json: skipped (for want of weights), or trained by its arm's kind; failed, with
    the first line of the error, when training raises."""
    log, config = _logger(), ctx.config
    if skip_reason is not None:
        log.warning("%s: skipped: %s", ctx.arm, skip_reason)
        return ctx.status("skipped", skip_reason)
    ctx.status("running")
    log.info("%s (outer fold %d): %d train / %d val / %d test images (%d / %d / %d patients), %d px, %s, %s",
             ctx.arm, ctx.fold, config.n_train_images, config.n_val_images, config.n_test_images,
             config.n_train_patients, config.n_val_patients, config.n_test_patients, config.train.image_size,
             ctx.runtime.device, ctx.runtime.precision)
    try:
        if parse_arm(ctx.arm).mode == "imagenet-linear":
            from tasks.training.linear_arm import train_linear

            return train_linear(ctx)
        from tasks.training.network_arm import train_network

        return train_network(ctx, resume, on_epoch_end)
    except BaseException as error:
        ctx.status("failed", str(error).splitlines()[0] if str(error) else type(error).__name__)
        raise


def _retry_worthwhile(task: Any, task_run: Any, state: Any) -> bool:
    """Retry crashes and transient errors; a ValueError (bad setting, weights file, split) or a full or read-only
    disk would fail again."""
    try:
        state.result()
    except ValueError:
        return False
    except OSError as error:
        return error.errno not in UNWRITABLE_ERRNOS
    except BaseException:  # noqa: BLE001
        return True
    return True


def planned_run_name(planned: PlannedRun) -> str:
    """The name of a run's task run: train-<arm>-main, -fold<k>, -fraction<f> or -size<px> (e.g.
    train-imagenet-fold2)."""
    if planned.input_size is not None:
        which = f"size{planned.input_size}"
    elif planned.train_fraction < 1.0:
        which = f"fraction{planned.train_fraction:g}"
    else:
        which = "main" if planned.outer_fold == 0 else f"fold{planned.outer_fold}"
    return f"train-{planned.arm.replace(':', '-')}-{which}"


def train_task_run_name(parameters: dict[str, Any]) -> str:
    """train_arm_task's run name, from its plan_path and run parameters; the run folder when the plan cannot be read
    (the task itself then reports why)."""
    try:
        return planned_run_name(read_plan(Path(parameters["plan_path"])).run(str(parameters["run"])))
    except (OSError, ValueError, KeyError):
        return f"train-{parameters.get('run', 'run')}"


@task(name="train-arm", retries=1, retry_delay_seconds=1, retry_condition_fn=_retry_worthwhile, cache_policy=NO_CACHE,
      task_run_name=train_task_run_name)
def train_arm_task(
    *, dataset_dir: Path, plan_path: Path, run: str, weights_path: Path | None = None, resume: bool = False,
    weights_dir: Path | None = None,
) -> RunSummary | State:
    """train_arm as a Prefect task, its epochs shown as a progress artifact. retries=1: a retry resumes from the
    last finished epoch; a ValueError is not retried (_retry_worthwhile). A skipped run ends in a Cancelled-type
    state named "Skipped" (grey in the UI, not a green success), its reason as the message, its summary as data."""
    from prefect.runtime import task_run

    resume = resume or int(task_run.run_count or 1) > 1
    name = train_task_run_name({"plan_path": plan_path, "run": run})
    try:
        planned = read_plan(Path(plan_path)).run(run)
        arm, epochs = planned.arm, planned.config.epochs
    except (OSError, ValueError):  # train_arm says why in one sentence
        arm, epochs = run, 0
    bar = RunProgress(f"{name}: starting")
    first_epoch_check = first_epoch_watch(Path(plan_path), run, _logger())  # a comparison's cost.json: else None

    def on_epoch_end(epoch: int) -> None:
        check = first_epoch_check(epoch) if first_epoch_check is not None else None
        # after the first epoch, the time left is the calibration's, corrected when the epoch disagreed with it
        bar.update(epoch, epochs, f"{arm}: epoch {epoch}/{epochs} trained and validated",
                   left_s=check.rest_left_s() if check is not None else None)

    summary = train_arm(dataset_dir=dataset_dir, plan_path=plan_path, run=run, weights_path=weights_path,
                        resume=resume, weights_dir=weights_dir, on_epoch_end=on_epoch_end if epochs else None)
    if summary.status == "skipped":
        bar.update(1, 1, f"{arm}: skipped")
        return Cancelled(name=SKIPPED_STATE_NAME, message=f"{arm}: skipped: {summary.reason}", data=summary)
    bar.update(1, 1, f"{arm}: {summary.status} after {summary.epochs_run} epoch(s)")
    return summary


def run_summary(state: State) -> RunSummary:
    """The RunSummary of a finished train-arm task run: completed or skipped (Cancelled "Skipped"); the task's
    error raised for a failed one."""
    return state.result(raise_on_failure=not state.is_cancelled())
