"""Training one arm on one outer fold: `train_arm` (a plain function) and `train_arm_task` (its Prefect task).

The run's settings come from the run plan (data_schemas/plan.py), never from profile strings. The loop lives in
tasks/training/loop.py, the run folder's files in tasks/training/run_folder.py.

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

import io
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, State

from data_schemas.arms import DEFAULT_MODEL, parse_arm
from data_schemas.files import atomic_write_bytes, sha256_json, write_model_json
from data_schemas.plan import PlannedRun, RunPlan, read_plan
from data_schemas.training import (
    CHECKPOINT_FILE,
    FEATURES_FILE,
    LINEAR_MODEL_FILE,
    DepthProbe,
    EpochMetrics,
    LinearProbeModel,
    ProbeDepths,
    RunConfig,
    RunSummary,
    SplitRow,
    TimingInfo,
    TrainConfig,
    WeightsInfo,
)
from tasks.common.paths import UNWRITABLE_ERRNOS
from tasks.common.progress import RunProgress
from tasks.common.runtime import Runtime, choose_runtime
from tasks.cost.first_epoch import first_epoch_watch
from tasks.ingest.dataset_store import LoadedDataset, load_dataset
from tasks.splits import count_patient_overlap, ensure_splits, parts_for_fold, patient_ordinals, subsample_patients
from tasks.training.augment import images_to_tensor
from tasks.training.gap_losses import image_log_losses, network_losses, probe_losses
from tasks.training.linear_probe import (
    choose_depth,
    extract_multi_depth_features,
    fit_linear_probe,
    predict_linear_probe,
)
from tasks.training.loop import (
    FitData,
    FitSetup,
    TrainState,
    auc_or_none,
    batch_progress,
    describe_selection,
    fit,
    make_setup,
    predict_probs,
    run_logger as _logger,
    state_copy,
    train_eval_subsample,
)
from tasks.training.model_defs import model_def
from tasks.training.models import feature_extractor, forward_flops_per_image, probe_depths
from tasks.training.run_folder import (
    clear_training_files,
    completed_run,
    load_checkpoint,
    now,
    save_checkpoint,
    write_best,
    write_config,
    write_metrics,
    write_overfitting_losses,
    write_predictions,
    write_probe_depths,
    write_status,
    write_timing,
)
from tasks.training.weights import WeightsUnavailableError, resolve_imagenet_weights, weights_file_name

NEGATIVE_LABEL_NAMES = frozenset(
    {"0", "normal", "negative", "neg", "healthy", "benign", "control", "absent", "no", "false", "none"}
)


SKIPPED_STATE_NAME = "Skipped"  # the state of a run skipped for want of weights: Cancelled type, grey in the UI


class TrainingInterrupted(Exception):
    """Raised by an on_epoch_end hook to stop a run after a finished epoch (used by tests to simulate a kill)."""


# ----------------------------------------------------------------------------------------------------- the data


@dataclass
class SplitTensors:
    """The three parts as in-memory tensors at the run's image size, plus their split rows."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    rows: dict[str, list[SplitRow]]
    classes: list[str]
    positive_label: str


def _classes(rows: list[SplitRow], positive_label: str | None) -> tuple[list[str], str]:
    """[negative, positive] label names; ValueError unless there are exactly two."""
    labels = sorted({row.label for row in rows})
    if len(labels) != 2:
        raise ValueError(f"training needs exactly two labels; the split has {len(labels)} ({', '.join(labels[:5])}).")
    if positive_label is not None:
        positive = positive_label
    else:  # the label that reads as "negative" is the negative class; otherwise the last in sorted order
        negatives = [label for label in labels if label.strip().lower() in NEGATIVE_LABEL_NAMES]
        positive = labels[1] if negatives == [labels[0]] else labels[0] if negatives == [labels[1]] else labels[-1]
    if positive not in labels:
        raise ValueError(f"positive_label '{positive}' is not one of the dataset's labels ({', '.join(labels)}).")
    negative = labels[0] if labels[1] == positive else labels[1]
    return [negative, positive], positive


def build_split_tensors(
    images: np.ndarray,
    index_of: dict[str, int],
    parts: dict[str, list[SplitRow]],
    size: int,
    positive: str,
    classes: list[str],
) -> SplitTensors:
    """Gather each part's rows (in the split file's pixel-content order) from the array and resize them once."""
    x, y = {}, {}
    for name, rows in parts.items():
        indices = np.asarray([index_of[row.image_key] for row in rows], dtype=np.int64)
        x[name] = images_to_tensor(images[indices] if len(indices) else images[:0], size)
        y[name] = torch.tensor([1 if row.label == positive else 0 for row in rows], dtype=torch.long)
    return SplitTensors(x=x, y=y, rows=parts, classes=classes, positive_label=positive)


# --------------------------------------------------------------------------------------------- run bookkeeping


@dataclass
class RunContext:
    """One run being trained: where it writes, what it trains on, with what."""

    arm: str
    run_dir: Path
    config: RunConfig
    runtime: Runtime
    data: SplitTensors
    seed: int
    fold: int
    backbone: dict[str, torch.Tensor] | None
    started: float = field(default_factory=time.perf_counter)

    def status(self, status: str, reason: str = "", **extra: Any) -> RunSummary:
        """Write status.json of this run."""
        return write_status(self.run_dir, arm=self.arm, status=status, reason=reason, fold=self.fold,
                            config_hash=self.config.config_hash, **extra)


def _config_identity(config: RunConfig) -> dict[str, Any]:
    """What makes two runs the same run (paths, names, thread counts and times excluded)."""
    data = config.model_dump(mode="json")
    for key in (
        "overrides",
        "profile",
        "splits_path",
        "num_threads",
        "config_hash",
        "created_at",
        "torch_version",
        "torchvision_version",
    ):
        data.pop(key, None)
    if data.get("weights"):
        data["weights"] = {"sha256": data["weights"]["sha256"]}
    return data


def _timing(ctx: RunContext, *, train_seconds: float, eval_seconds: float, images_seen: int, epochs_run: int,
            feature_seconds: float | None = None) -> None:
    """timing.json; FLOPs per image from tasks.training.models.forward_flops_per_image (training step = 3 x forward)."""
    flops = forward_flops_per_image(ctx.config.train.image_size, model=parse_arm(ctx.arm).model)
    seconds = feature_seconds if feature_seconds is not None else train_seconds
    ips = images_seen / max(seconds, 1e-9)
    step_flops = flops if feature_seconds is not None else 3 * flops
    write_timing(
        ctx.run_dir,
        TimingInfo(
            wall_seconds=train_seconds + eval_seconds + (feature_seconds or 0.0),
            train_seconds=train_seconds,
            eval_seconds=eval_seconds,
            feature_seconds=feature_seconds,
            epochs_run=epochs_run,
            train_images_seen=images_seen,
            images_per_second=ips,
            forward_flops_per_image=flops,
            train_flops_per_image=step_flops,
            achieved_flops_per_second=step_flops * ips,
            device=str(ctx.runtime.device),
            precision=ctx.runtime.precision,
        ),
    )


def _fmt(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "n/a"


# --------------------------------------------------------------------------------------------------- network arms


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
                 _fmt(row.train_eval_loss), _fmt(row.val_loss), _fmt(row.val_auc), row.lr_head or 0.0,
                 row.images_per_second or 0.0, row.epoch_seconds, " [best]" if improved else "",
                 " [early stop]" if state.stopped and row.epoch < cfg.epochs else "")
        if on_epoch_end is not None:
            on_epoch_end(state.epoch)

    return save


def _train_network(ctx: RunContext, resume: bool, on_epoch_end: Callable[[int], None] | None) -> RunSummary:
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
    _timing(ctx, train_seconds=state.train_seconds, eval_seconds=state.eval_seconds + time.perf_counter() - started,
            images_seen=state.images_seen, epochs_run=len(state.history))
    test_auc = auc_or_none(data.y["test"].numpy(), probs["test"])
    _logger().info("%s: done, best epoch %s (val loss %s, val AUC %s), test AUC %s", ctx.arm, state.best_epoch,
                   _fmt(state.best_val_loss), _fmt(state.best_val_auc), _fmt(test_auc))
    return ctx.status(
        "completed",
        epochs_run=len(state.history),
        best_epoch=state.best_epoch,
        best_val_auc=state.best_val_auc,
        test_auc=test_auc,
        wall_seconds=time.perf_counter() - ctx.started,
    )


# ---------------------------------------------------------------------------------------------------- linear probe


PARTS = ("train", "val", "test")


def _depths(model: str, requested: list[str] | None) -> tuple[str, ...]:
    """The probe depths of the run: linear.depths when set (each one of the model's), else all of them."""
    known = probe_depths(model)
    unknown = [d for d in requested or [] if d not in known]
    if unknown or requested == []:
        raise ValueError(f"linear.depths: {unknown[0] if unknown else '(empty)'!r} is not a probe depth of {model}; "
                         f"choose from {', '.join(known)}.")
    return tuple(d for d in known if d in requested) if requested else known


def _features(ctx: RunContext) -> dict[str, dict[str, np.ndarray]]:
    """{depth: {part: pooled features}} of the frozen ImageNet backbone at every probe depth (tasks.training.models.
    probe_depths), all from one forward pass per batch; cached in features.npz under the config hash."""
    path, rt, cfg = ctx.run_dir / FEATURES_FILE, ctx.runtime, ctx.config.train
    model_name = parse_arm(ctx.arm).model
    depths = _depths(model_name, cfg.linear.depths)
    keys = {(depth, part): f"{depth}|{part}" for depth in depths for part in PARTS}
    if path.is_file():
        with np.load(path, allow_pickle=False) as archive:
            if str(archive["config_hash"]) == ctx.config.config_hash and all(k in archive for k in keys.values()):
                return {depth: {part: archive[keys[depth, part]] for part in PARTS} for depth in depths}
    assert ctx.backbone is not None
    model = feature_extractor(ctx.backbone, model=model_name).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_images = sum(ctx.data.x[part].shape[0] for part in PARTS)
    with batch_progress(n_images, f"{ctx.arm} features") as count_images:
        by_part = {part: extract_multi_depth_features(model, ctx.data.x[part], depths, batch_size=cfg.eval_batch_size,
                                                      device=rt.device, precision=rt.precision,
                                                      channels_last=rt.channels_last, on_batch=count_images)
                   for part in PARTS}
    features = {depth: {part: by_part[part][depth] for part in PARTS} for depth in depths}
    buffer = io.BytesIO()
    np.savez(buffer, config_hash=np.asarray(ctx.config.config_hash),
             **{keys[depth, part]: features[depth][part] for depth in depths for part in PARTS})
    atomic_write_bytes(path, buffer.getbuffer())
    return features


def _log_loss(targets: np.ndarray, probs: np.ndarray) -> float | None:
    """Plain binary cross-entropy (None for an empty part)."""
    return float(np.mean(image_log_losses(targets, probs))) if len(targets) else None


def _probe_every_depth(ctx: RunContext, features: dict[str, dict[str, np.ndarray]],
                       ) -> tuple[ProbeDepths, LinearProbeModel, dict[str, np.ndarray]]:
    """A probe per depth, fitted on the training patients only; the depth chosen by validation AUC.

    Returns probe_depths.json, the chosen depth's LinearProbeModel and its probabilities per part."""
    data, cfg = ctx.data, ctx.config.train
    # patients numbered in the split's pixel-content order, so the folds choosing C do not depend on pseudonyms
    groups = patient_ordinals([r.patient_key for r in data.rows["train"]]).tolist()
    targets = {part: data.y[part].numpy() for part in PARTS}
    probes, probs, rows = {}, {}, []
    for depth, by_part in features.items():
        probes[depth] = fit_linear_probe(by_part["train"], targets["train"], groups, cfg.linear,
                                         balanced=cfg.class_balance != "none", seed=ctx.seed)
        probs[depth] = {part: predict_linear_probe(probes[depth], by_part[part]) for part in PARTS}
        rows.append(DepthProbe(depth=depth, feature_dim=by_part["train"].shape[1], C=probes[depth].C,
                               val_auc=auc_or_none(targets["val"], probs[depth]["val"]),
                               test_auc=auc_or_none(targets["test"], probs[depth]["test"])))
    chosen = choose_depth({row.depth: row.val_auc for row in rows})
    summary = ProbeDepths(model=parse_arm(ctx.arm).model, depths=rows, chosen_depth=chosen)
    last = probe_depths(summary.model)[-1]  # the head's input: a probe there needs no depth to be shipped
    return summary, probes[chosen].model_copy(update={"depth": None if chosen == last else chosen}), probs[chosen]


def _train_linear(ctx: RunContext) -> RunSummary:
    """Logistic regression on frozen features at every probe depth; the validation-chosen depth's predictions."""
    data, log = ctx.data, _logger()
    t0 = time.perf_counter()
    features = _features(ctx)
    feature_seconds = time.perf_counter() - t0
    n_images = sum(v.shape[0] for v in next(iter(features.values())).values())
    t_fit = time.perf_counter()
    depths, probe, probs = _probe_every_depth(ctx, features)
    write_probe_depths(ctx.run_dir, depths)
    write_model_json(ctx.run_dir / LINEAR_MODEL_FILE, probe)
    targets = {part: data.y[part].numpy() for part in PARTS}
    write_predictions(
        ctx.run_dir, rows=data.rows["val"], probs=probs["val"], positive_label=data.positive_label, validation=True
    )
    write_predictions(ctx.run_dir, rows=data.rows["test"], probs=probs["test"], positive_label=data.positive_label)
    write_overfitting_losses(ctx.run_dir, probe_losses(ctx.data.rows, targets, probs))
    fit_seconds = time.perf_counter() - t_fit
    val_auc = auc_or_none(targets["val"], probs["val"])
    write_metrics(
        ctx.run_dir,
        [
            EpochMetrics(
                epoch=1,
                phase="linear",
                val_loss=_log_loss(targets["val"], probs["val"]),
                val_auc=val_auc,
                train_eval_loss=_log_loss(targets["train"], probs["train"]),
                images_per_second=n_images / max(feature_seconds, 1e-9),
                epoch_seconds=feature_seconds + fit_seconds,
                elapsed_seconds=feature_seconds + fit_seconds,
                is_best=True,
            ).model_dump(mode="json")
        ],
    )
    _timing(
        ctx,
        train_seconds=fit_seconds,
        eval_seconds=0.0,
        images_seen=n_images,
        epochs_run=1,
        feature_seconds=feature_seconds,
    )
    test_auc = auc_or_none(targets["test"], probs["test"])
    log.info(
        "%s: features of %d images at %s in %.1fs; depth %s chosen on validation (C=%.3g): val AUC %s, test AUC %s",
        ctx.arm,
        n_images,
        ", ".join(features),
        feature_seconds,
        depths.chosen_depth,
        probe.C,
        _fmt(val_auc),
        _fmt(test_auc),
    )
    return ctx.status("completed", epochs_run=1, best_epoch=1, best_val_auc=val_auc, test_auc=test_auc,
                      wall_seconds=time.perf_counter() - ctx.started)


# ------------------------------------------------------------------------------------------------ entry points


def _run_config(
    plan: RunPlan,
    run: PlannedRun,
    *,
    dataset: LoadedDataset,
    splits_path: Path,
    splits_sha256: str,
    parts: dict[str, list[SplitRow]],
    classes: list[str],
    weights: WeightsInfo | None,
    runtime: Runtime,
) -> RunConfig:
    """config.json of the run, with its config_hash (the run's identity)."""
    def patients(name: str) -> int:
        return len({r.patient_key for r in parts[name]})

    config = RunConfig(
        arm=run.arm, profile=plan.profile, overrides=plan.overrides, seed=plan.seed, fold=run.outer_fold,
        folds=plan.split.outer_folds, train=run.config, dataset_hash=dataset.card.content_hash,
        dataset_image_size=dataset.card.image_size, splits_path=str(splits_path), splits_sha256=splits_sha256,
        classes=classes, positive_label=classes[1], n_train_images=len(parts["train"]), n_val_images=len(parts["val"]),
        n_test_images=len(parts["test"]), n_train_patients=patients("train"), n_val_patients=patients("val"),
        n_test_patients=patients("test"), patient_overlap=count_patient_overlap([r for p in parts.values() for r in p]),
        model_selection=describe_selection(run.config), weights=weights, device=str(runtime.device),
        precision=runtime.precision, channels_last=runtime.channels_last, num_threads=runtime.num_threads,
        torch_version=torch.__version__, torchvision_version=torchvision.__version__, config_hash="", created_at=now(),
    )
    return config.model_copy(update={"config_hash": sha256_json(_config_identity(config))})


def weights_file_for(model: str, weights_path: Path | None, weights_dir: Path | None) -> Path | None:
    """The local weights file of `model`: in weights_dir under torchvision's file name (e.g. resnet18-f37072fd.pth),
    else a single '<model>-<hash>.pth' there; else --weights for ResNet-50; else None (torch hub cache, download)."""
    if weights_dir is not None:
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


def check_training_part_has_both_classes(parts: dict[str, list[SplitRow]], classes: list[str]) -> None:
    """ValueError naming the training part and its class counts when its images are all of one class.

    A model cannot learn to tell two classes apart from one; such a run would otherwise end "completed" with
    nothing to compare. (A validation part with one class is allowed: model selection then falls back to the
    validation loss, tasks.training.loop.update_selection.)
    """
    counts = Counter(row.label for row in parts["train"])
    if sum(1 for label in classes if counts[label]) < 2:
        shown = ", ".join(f"{counts[label]} {label}" for label in classes)
        raise ValueError(
            f"the training part of this run holds images of one class only ({shown} images); it needs both classes: "
            "label more patients of the rarer class, or use a larger train_fraction or another seed."
        )


def _patient_parts(plan: RunPlan, run: PlannedRun, rows: list[SplitRow]) -> dict[str, list[SplitRow]]:
    """The run's train/val/test rows: its outer fold's parts, training patients subsampled for fractions."""
    parts = parts_for_fold(rows, run.outer_fold, plan.split)
    parts["train"] = subsample_patients(parts["train"], run.config.train_fraction, plan.seed)
    return parts


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
    weights
    are skipped (status.json "skipped", reason = where to put the file), not an error. Bad settings, a bad weights
    file or a mismatched split raise ValueError subclasses with one sentence.
    """
    started, log = time.perf_counter(), _logger()
    plan_path = Path(plan_path).resolve()
    plan = read_plan(plan_path)
    planned = plan.run(run)
    run_dir = Path(os.path.normpath(plan_path.parent / planned.run_dir))
    splits_path = Path(os.path.normpath(plan_path.parent / plan.splits_file))
    dataset = load_dataset(Path(dataset_dir), in_memory=True)
    rows, info = ensure_splits(
        manifest_rows=dataset.manifest,
        images=dataset.images,
        dataset_hash=dataset.card.content_hash,
        splits_path=splits_path,
        settings=plan.split,
    )
    parts = _patient_parts(plan, planned, rows)
    classes, positive = _classes(rows, planned.config.positive_label)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        check_training_part_has_both_classes(parts, classes)
    except ValueError as error:  # before any training: the run is recorded as failed, with the reason
        write_status(run_dir, arm=planned.arm, status="failed", reason=str(error), fold=planned.outer_fold)
        raise
    backbone, weights_info, skip_reason = _backbone(planned.arm, run_dir, planned.config, (weights_path, weights_dir),
                                                    planned.outer_fold)
    runtime = choose_runtime(planned.config)
    config = _run_config(plan, planned, dataset=dataset, splits_path=splits_path, splits_sha256=info.splits_sha256,
                         parts=parts, classes=classes, weights=weights_info, runtime=runtime)
    if skip_reason is None and (previous := completed_run(run_dir, config.config_hash)) is not None:
        log.info(
            "%s: %s already holds a completed run with this configuration; not training again", planned.arm, run_dir
        )
        return previous
    write_config(run_dir, config)
    data = build_split_tensors(dataset.images, {r.image_key: r.index for r in dataset.manifest}, parts,
                          planned.config.image_size, positive, classes)
    del dataset
    ctx = RunContext(arm=planned.arm, run_dir=run_dir, config=config, runtime=runtime, data=data, seed=plan.seed,
                     fold=planned.outer_fold, backbone=backbone, started=started)
    if skip_reason is not None:
        log.warning("%s: skipped: %s", planned.arm, skip_reason)
        return ctx.status("skipped", skip_reason)
    ctx.status("running")
    log.info("%s (outer fold %d): %d train / %d val / %d test images (%d / %d / %d patients), %d px, %s, %s",
             planned.arm, planned.outer_fold, config.n_train_images, config.n_val_images, config.n_test_images,
             config.n_train_patients, config.n_val_patients, config.n_test_patients, planned.config.image_size,
             runtime.device, runtime.precision)
    try:
        linear = parse_arm(planned.arm).mode == "imagenet-linear"
        return _train_linear(ctx) if linear else _train_network(ctx, resume, on_epoch_end)
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
        bar.update(epoch, epochs, f"{arm}: epoch {epoch}/{epochs} trained and validated")
        if first_epoch_check is not None:
            first_epoch_check(epoch)

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
