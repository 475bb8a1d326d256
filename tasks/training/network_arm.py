"""A network arm's run (scratch, imagenet, ...): fit with checkpoints after every epoch (resuming when asked), then
the best epoch's predictions, overfitting losses and timing."""

from __future__ import annotations

import time
from typing import Callable

from data_schemas.training import CHECKPOINT_FILE, EpochMetrics, RunSummary
from tasks.training.gap_losses import network_losses
from tasks.training.loop import (
    FitData,
    FitSetup,
    TrainState,
    auc_or_none,
    fit,
    make_setup,
    predict_probs,
    run_logger as _logger,
    state_copy,
    train_eval_subsample,
)
from tasks.training.run_context import RunContext, fmt_metric, write_run_timing
from tasks.training.run_folder import (
    clear_training_files,
    drop_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_best,
    write_metrics,
    write_overfitting_losses,
    write_predictions,
)


def _fit_data(ctx: RunContext) -> FitData:
    """The loop's tensors; on a GPU the training tensor lives there (augmentation runs there too)."""
    data, rt = ctx.data, ctx.runtime
    x_train, y_train = data.x["train"], data.y["train"]
    if x_train.shape[0] < 2:
        raise ValueError("the training part has fewer than two images.")
    subsample = train_eval_subsample(x_train.shape[0], ctx.seed)
    x_eval, y_eval = x_train.index_select(0, subsample), y_train.index_select(0, subsample)
    if rt.device.type == "cuda":
        # 1,500 x 224 x 224 floats is 0.3 GB; evaluation batches come from pinned host memory, non-blocking
        x_train, y_train = x_train.to(rt.device), y_train.to(rt.device)
        for part in ("val", "test"):
            data.x[part] = data.x[part].pin_memory()
    return FitData(
        x_train=x_train,
        y_train=y_train,
        x_val=data.x["val"],
        y_val=data.y["val"],
        x_train_eval=x_eval,
        y_train_eval=y_eval,
    )


def _start_state(ctx: RunContext, setup: FitSetup, resume: bool) -> TrainState:
    """A fresh TrainState, or the checkpoint's when resuming (then best.pt and metrics.csv are repaired)."""
    log = _logger()
    if resume:
        state, why = load_checkpoint(ctx.run_dir, state_type=TrainState, config_hash=ctx.config.config_hash,
                                     model=setup.model, optimizer=setup.optimizer, scaler=setup.scaler)
        if state is not None:
            if state.best_state is None:
                state.best_state = state_copy(setup.model)
            if state.best_epoch is not None:  # repair what an interrupted epoch may have left half-done
                _write_best(ctx, state, state.best_state, state.best_epoch)
            write_metrics(ctx.run_dir, state.history)
            log.info("%s: resuming after epoch %d of %d", ctx.arm, state.epoch, ctx.config.train.epochs)
            return state
        if why != "no checkpoint":
            log.warning("%s: %s; starting over", ctx.arm, why)
    elif (ctx.run_dir / CHECKPOINT_FILE).is_file():
        log.warning("%s: %s exists; starting over (pass --resume to continue it)", ctx.arm, CHECKPOINT_FILE)
    clear_training_files(ctx.run_dir)
    return TrainState()


def _write_best(ctx: RunContext, state: TrainState, state_dict: dict, epoch: int) -> None:
    """best.pt of this run: the given weights as the best epoch's, with the state's best validation figures."""
    write_best(ctx.run_dir, state_dict=state_dict, epoch=epoch, val_auc=state.best_val_auc,
               val_loss=state.best_val_loss, config_hash=ctx.config.config_hash, arm=ctx.arm, classes=ctx.data.classes)


def _epoch_saver(
    ctx: RunContext, setup: FitSetup, on_epoch_end: Callable[[int], None] | None
) -> Callable[[TrainState, bool], None]:
    """What happens after each epoch: checkpoint, then best.pt and metrics.csv from the same state, a log line."""
    log, cfg = _logger(), ctx.config.train

    def save(state: TrainState, improved: bool) -> None:
        save_checkpoint(ctx.run_dir, state=state, config_hash=ctx.config.config_hash, model=setup.model,
                        optimizer=setup.optimizer, scaler=setup.scaler)
        if improved:
            _write_best(ctx, state, state_copy(setup.model), state.epoch)
        write_metrics(ctx.run_dir, state.history)
        row = EpochMetrics.model_validate(state.history[-1])
        log.info("%s epoch %d/%d%s: train_loss=%.4f train_eval_loss=%s val_loss=%s val_auc=%s lr=%.2e %.1f img/s "
                 "%.1fs%s%s",
                 ctx.arm, row.epoch, cfg.epochs, " (head only)" if row.phase == "head" else "", row.train_loss,
                 fmt_metric(row.train_eval_loss), fmt_metric(row.val_loss), fmt_metric(row.val_auc), row.lr_head or 0.0,
                 row.images_per_second or 0.0, row.epoch_seconds, " [best]" if improved else "",
                 " [early stop]" if state.stopped and row.epoch < cfg.epochs else "")
        if on_epoch_end is not None:
            on_epoch_end(state.epoch)

    return save


def train_network(ctx: RunContext, resume: bool, on_epoch_end: Callable[[int], None] | None) -> RunSummary:
    """Fit (resuming when asked), then predict the validation and test parts with the best epoch's weights."""
    cfg, rt, data = ctx.config.train, ctx.runtime, ctx.data
    setup = make_setup(
        config=cfg,
        runtime=rt,
        backbone=ctx.backbone,
        seed=ctx.seed,
        y_train=data.y["train"],
        label=ctx.arm,
        arm=ctx.arm,
    )
    fit_data = _fit_data(ctx)
    state = fit(setup, fit_data, _start_state(ctx, setup, resume), _epoch_saver(ctx, setup, on_epoch_end))
    started = time.perf_counter()
    last_epoch = len(state.history)
    subsample = train_eval_subsample(len(data.rows["train"]), ctx.seed)
    args = dict(rows=data.rows, subsample=subsample, data=fit_data, runtime=rt, batch_size=cfg.eval_batch_size)
    last = [] if state.best_epoch == last_epoch else network_losses(setup.model, epoch=last_epoch, role="last", **args)
    if state.best_state is not None:
        setup.model.load_state_dict(state.best_state)
    chosen = network_losses(setup.model, epoch=state.best_epoch or last_epoch, role="chosen", **args)
    if state.best_epoch == last_epoch:  # the last epoch is the chosen one
        last = [row.model_copy(update={"role": "last"}) for row in chosen]
    write_overfitting_losses(ctx.run_dir, chosen + last)
    probs = {part: predict_probs(setup.model, data.x[part], rt, cfg.eval_batch_size)[0] for part in ("val", "test")}
    for part in ("val", "test"):
        write_predictions(ctx.run_dir, rows=data.rows[part], probs=probs[part], positive_label=data.positive_label,
                          validation=part == "val", epoch=state.best_epoch)
    write_run_timing(ctx, train_seconds=state.train_seconds,
                     eval_seconds=state.eval_seconds + time.perf_counter() - started,
                     images_seen=state.images_seen, epochs_run=len(state.history))
    test_auc = auc_or_none(data.y["test"].numpy(), probs["test"])
    _logger().info("%s: done, best epoch %s (val loss %s, val AUC %s), test AUC %s", ctx.arm, state.best_epoch,
                   fmt_metric(state.best_val_loss), fmt_metric(state.best_val_auc), fmt_metric(test_auc))
    summary = ctx.status(
        "completed",
        epochs_run=len(state.history),
        best_epoch=state.best_epoch,
        best_val_auc=state.best_val_auc,
        test_auc=test_auc,
        wall_seconds=time.perf_counter() - ctx.started,
    )
    drop_checkpoint(ctx.run_dir)  # after status.json: a crash in between leaves a resumable, not a broken, folder
    return summary
