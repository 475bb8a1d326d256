"""The training loop of the network arms: state, model and optimizer, one epoch, and fit with model selection.

Everything a resumed run needs is in TrainState (saved whole by tasks.training.run_folder.save_checkpoint). Batch order,
augmentation and dropout are seeded per (seed, epoch) from the training tensor, whose rows are in the split file's
pixel-content order, so the same data, settings and seed give the same per-epoch losses, resumed or not.

Model selection. The best epoch is the one with the best monitored quantity (TrainConfig.early_stopping_monitor):
"val_loss", plain cross-entropy on the validation part (the default: on a small validation set it moves smoothly,
where AUC jumps with a single patient), or "val_auc_ema", an exponential moving average of validation AUC with
weight EMA_ALPHA on the newest epoch. Training stops once the quantity has not improved by more than
early_stopping_min_delta for early_stopping_patience epochs, and never before min_epochs. The test part is never
looked at here.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from data_schemas.arms import ArmSpec, parse_arm
from data_schemas.training import EpochMetrics, TrainConfig
from tasks.common.progress import progress as show_progress
from tasks.common.runtime import Runtime
from tasks.training.augment import augment_batch, mixup, normalise
from tasks.training.models import build_arm_model, is_head_parameter, is_no_decay_parameter
from tasks.training.run_folder import require_finite
from tasks.training.run_identity import EMA_ALPHA, run_logger

TRAIN_EVAL_IMAGES = 512  # the fixed training subsample of EpochMetrics.train_eval_loss


def batch_progress(total_images: int, description: str | None,
                   ) -> contextlib.AbstractContextManager[Callable[[int], None] | None]:
    """Per-batch progress of one epoch's training or evaluation: a bar on a terminal (images/s, time left), off a
    terminal a log line only when LOG_EVERY_S passes without the epoch's own line; nothing when description is None."""
    if description is None:
        return contextlib.nullcontext(None)
    return show_progress(total_images, description, "image", run_logger().info, log_fraction=None, leave=False)


@dataclass
class TrainState:
    """Everything the loop carries from epoch to epoch; a checkpoint stores every field."""

    epoch: int = 0  # finished epochs
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # EpochMetrics rows (JSON form)
    best_metric: float = -math.inf  # the monitored quantity, larger is better
    best_epoch: int | None = None
    best_val_auc: float | None = None
    best_val_loss: float | None = None
    auc_ema: float | None = None
    bad_epochs: int = 0
    stopped: bool = False
    best_state: dict[str, torch.Tensor] | None = None  # None: the live weights are the best ones
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    images_seen: int = 0


@dataclass
class FitData:
    """The tensors of one run (images in [0, 1]); train_eval is the fixed subsample for train_eval_loss."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_train_eval: torch.Tensor
    y_train_eval: torch.Tensor


@dataclass
class FitSetup:
    """Model, optimizer and the fixed settings of one run."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    runtime: Runtime
    seed: int
    head_epochs: int  # head-only warm-up epochs (pretrained arms), backbone frozen
    class_weights: torch.Tensor | None = None
    sample_weights: torch.Tensor | None = None
    scaler: Any = None
    label: str = ""
    model_name: str = "resnet50"  # the torchvision model: which parameters are the head


@dataclass
class EpochResult:
    """What one training epoch did."""

    steps: int
    images: int
    loss_sum: float
    lr: dict[str, float]


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """The seed of one epoch's randomness (salt separates dropout, batch order and the train_eval subsample)."""
    return (seed * 1_000_003 + epoch * 7_919 + salt) % (2**63 - 1)


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A real copy of the weights (not references to the live parameters)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def param_groups(model: torch.nn.Module, config: TrainConfig, backbone_mult: float, model_name: str = "resnet50",
                 ) -> list[dict[str, Any]]:
    """Head/backbone x decay/no-decay groups; "lr_mult" and "is_head" steer the schedule and the frozen phase."""
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        key = (is_head_parameter(name, model_name), is_no_decay_parameter(name, parameter))
        buckets.setdefault(key, []).append(parameter)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else config.weight_decay, "lr": config.lr,
         "lr_mult": 1.0 if is_head else backbone_mult, "is_head": is_head,
         "name": f"{'head' if is_head else 'backbone'}{'-no_decay' if no_decay else ''}"}
        for (is_head, no_decay), params in sorted(buckets.items())
    ]


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (default) or Nesterov SGD over the parameter groups."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True, foreach=True)
    return torch.optim.AdamW(groups, lr=config.lr, foreach=True)


def make_setup(*, config: TrainConfig, runtime: Runtime, backbone: dict[str, torch.Tensor] | None, seed: int,
               y_train: torch.Tensor, label: str = "", arm: ArmSpec | str | None = None) -> FitSetup:
    """Seeded model of the arm (scratch, or its ImageNet backbone + new head), optimizer, class balancing, scaler.

    arm None means ResNet-50: the imagenet arm with a backbone, else scratch."""
    spec = parse_arm(arm if arm is not None else ("imagenet" if backbone is not None else "scratch"))
    if spec.mode == "imagenet-linear":
        raise ValueError("the imagenet-linear arm has no training loop: it fits a linear probe "
                         "(tasks.training.linear_probe).")
    torch.manual_seed(seed)
    model = build_arm_model(spec, num_classes=2, dropout=config.dropout, backbone=backbone if spec.pretrained else None)
    backbone_mult = config.backbone_lr_mult if spec.pretrained else 1.0
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    counts = torch.bincount(y_train, minlength=2).float()
    class_weights = (
        (counts.sum() / (2 * counts.clamp(min=1))).to(runtime.device)
        if config.class_balance == "loss_weights"
        else None
    )
    sample_weights = (1.0 / counts.clamp(min=1))[y_train.cpu()] if config.class_balance == "sampler" else None
    return FitSetup(
        model=model,
        optimizer=make_optimizer(param_groups(model, config, backbone_mult, spec.model), config),
        config=config,
        runtime=runtime,
        seed=seed,
        head_epochs=min(config.freeze_epochs, config.epochs) if spec.pretrained else 0,
        class_weights=class_weights,
        sample_weights=sample_weights,
        scaler=torch.amp.GradScaler("cuda") if runtime.precision == "fp16" else None,
        label=label,
        model_name=spec.model,
    )


def train_eval_subsample(n_train: int, seed: int) -> torch.Tensor:
    """Indices of at most TRAIN_EVAL_IMAGES training images, fixed for the run (sorted)."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, 0, 3))
    return torch.randperm(n_train, generator=generator)[:TRAIN_EVAL_IMAGES].sort().values


def lr_factor(config: TrainConfig, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Schedule factor for (0-based) epoch and step: warm-up then cosine, restarted when the head-only phase ends."""
    head_epochs = min(config.freeze_epochs, config.epochs)
    start, length = (0, head_epochs) if epoch < head_epochs else (head_epochs, config.epochs - head_epochs)
    total = max(1, length * steps_per_epoch)
    t = (epoch - start) * steps_per_epoch + step_in_epoch
    warmup = (
        max(1.0, 0.3 * total)
        if config.schedule == "onecycle"
        else min(config.warmup_epochs * steps_per_epoch, 0.5 * total)
    )
    if warmup > 0 and t < warmup:
        return (t + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (t - warmup) / max(1.0, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def freeze_backbone(model: torch.nn.Module, frozen: bool, model_name: str = "resnet50") -> None:
    """Head-only phase: the backbone's parameters get requires_grad False (no gradient, no optimizer state)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not frozen or is_head_parameter(name, model_name))


def _set_lr(setup: FitSetup, epoch: int, step: int, steps_per_epoch: int, head_phase: bool) -> dict[str, float]:
    factor = lr_factor(setup.config, epoch, step, steps_per_epoch)
    lr_now: dict[str, float] = {}
    for group in setup.optimizer.param_groups:
        mult = 0.0 if (head_phase and not group.get("is_head", True)) else group.get("lr_mult", 1.0)
        group["lr"] = setup.config.lr * mult * factor
        lr_now["head" if group.get("is_head", True) else "backbone"] = group["lr"]
    return lr_now


def _step(setup: FitSetup, xb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One optimizer step on a batch; returns the (detached) training loss."""
    cfg, rt = setup.config, setup.runtime
    with rt.autocast():
        logits = setup.model(xb)
    loss = F.cross_entropy(logits.float(), target, weight=setup.class_weights, label_smoothing=cfg.label_smoothing)
    setup.optimizer.zero_grad(set_to_none=True)
    if setup.scaler is not None:
        setup.scaler.scale(loss).backward()
        setup.scaler.step(setup.optimizer)
        setup.scaler.update()
    else:
        loss.backward()
        setup.optimizer.step()
    return loss.detach()


def train_one_epoch(
    setup: FitSetup, x_train: torch.Tensor, y_train: torch.Tensor, epoch: int, progress: str | None = None
) -> EpochResult:
    """One epoch over the in-memory tensor: seeded order, batched augmentation, autocast, schedule.

    Batch order, augmentation and dropout depend only on (seed, epoch), so a resumed run repeats the same epoch.
    progress: the description of its progress bar (batch_progress), None for none.
    """
    cfg, rt = setup.config, setup.runtime
    n_train = x_train.shape[0]
    batch_size = min(cfg.batch_size, n_train)
    steps_per_epoch = max(1, n_train // batch_size)
    head_phase = epoch < setup.head_epochs
    freeze_backbone(setup.model, head_phase, setup.model_name)
    torch.manual_seed(epoch_seed(setup.seed, epoch, 1))  # dropout
    generator = torch.Generator().manual_seed(epoch_seed(setup.seed, epoch, 2))
    if setup.sample_weights is not None:
        order = torch.multinomial(setup.sample_weights, n_train, replacement=True, generator=generator)
    else:
        order = torch.randperm(n_train, generator=generator)
    order = order.to(x_train.device)
    setup.model.train()
    loss_total, images, lr_now = torch.zeros((), device=rt.device), 0, {}
    with batch_progress(steps_per_epoch * batch_size, progress) as count_images:
        for i in range(steps_per_epoch):
            lr_now = _set_lr(setup, epoch, i, steps_per_epoch, head_phase)
            loss, n_images = _train_batch(
                setup, x_train, y_train, order[i * batch_size : (i + 1) * batch_size], generator
            )
            loss_total += loss
            images += n_images
            if count_images is not None:
                count_images(n_images)  # a host-side count: no device sync
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    lr_now.setdefault("backbone", lr_now.get("head", cfg.lr))
    return EpochResult(steps=steps_per_epoch, images=images, loss_sum=float(loss_total), lr=lr_now)


def _train_batch(setup: FitSetup, x_train: torch.Tensor, y_train: torch.Tensor, index: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Augment, mix and step on the rows `index` of the training tensor; (summed loss as a tensor, images)."""
    cfg, rt = setup.config, setup.runtime
    xb = normalise(augment_batch(x_train.index_select(0, index), cfg.augment, generator)).to(
        rt.device, non_blocking=True
    )
    if rt.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    target = F.one_hot(y_train.index_select(0, index), 2).float().to(rt.device, non_blocking=True)
    if cfg.mixup_alpha > 0:
        xb, target = mixup(xb, target, cfg.mixup_alpha, generator)
    return _step(setup, xb, target) * xb.shape[0], xb.shape[0]


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, x: torch.Tensor, runtime: Runtime, batch_size: int,
                  on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Positive-class probabilities and logits (float32, CPU) of images in [0, 1], in eval mode; on_batch(n) after
    each batch of n images (a progress count)."""
    model.eval()
    logits = []
    for start in range(0, x.shape[0], batch_size):
        xb = normalise(x[start : start + batch_size]).to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits.append(model(xb).float().cpu())
        if on_batch is not None:
            on_batch(xb.shape[0])
    out = torch.cat(logits) if logits else torch.zeros((0, 2))
    return torch.softmax(out, dim=1)[:, 1].numpy(), out


def plain_loss(logits: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Mean cross-entropy without smoothing or class weights (None for an empty part)."""
    return float(F.cross_entropy(logits, targets.cpu())) if len(targets) else None


def auc_or_none(targets: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present."""
    return float(roc_auc_score(targets, probs)) if len(np.unique(targets)) == 2 else None


def update_selection(
    state: TrainState, config: TrainConfig, *, val_loss: float | None, val_auc: float | None, train_loss: float
) -> bool:
    """Update the monitored quantity, best epoch and patience counter after a finished epoch; True when improved.

    Falls back to validation loss when AUC is undefined, and to training loss when the validation part is empty.
    """
    if val_auc is not None:
        state.auc_ema = val_auc if state.auc_ema is None else EMA_ALPHA * val_auc + (1 - EMA_ALPHA) * state.auc_ema
    if config.early_stopping_monitor == "val_auc_ema" and state.auc_ema is not None:
        metric = state.auc_ema
    else:
        metric = -(val_loss if val_loss is not None else train_loss)
    improved = state.best_epoch is None or metric > state.best_metric + config.early_stopping_min_delta
    if improved:
        state.best_metric, state.best_epoch, state.bad_epochs = metric, state.epoch, 0
        state.best_val_auc, state.best_val_loss = val_auc, val_loss
        state.best_state = None  # the live weights are the best; copied after they are saved
    else:
        state.bad_epochs += 1
    patience = config.early_stopping_patience
    state.stopped = (
        patience is not None and state.bad_epochs >= patience and state.epoch >= min(config.min_epochs, config.epochs)
    )
    return improved


def _evaluate(setup: FitSetup, data: FitData, progress: str | None = None, epoch: int | None = None,
              ) -> dict[str, float | None]:
    """Validation loss and AUC, and the like-for-like training loss, in eval mode (progress: batch_progress's
    description). NonFiniteOutputError when an output is NaN or infinite (epoch: the one just trained)."""
    cfg, rt = setup.config, setup.runtime
    with batch_progress(data.x_val.shape[0] + data.x_train_eval.shape[0], progress) as count_images:
        val_probs, val_logits = predict_probs(setup.model, data.x_val, rt, cfg.eval_batch_size, count_images)
        _, train_logits = predict_probs(setup.model, data.x_train_eval, rt, cfg.eval_batch_size, count_images)
    require_finite(val_logits, "the network's validation outputs", epoch)
    require_finite(train_logits, "the network's outputs on training images", epoch)
    return {"val_loss": plain_loss(val_logits, data.y_val), "val_auc": auc_or_none(data.y_val.cpu().numpy(), val_probs),
            "train_eval_loss": plain_loss(train_logits, data.y_train_eval)}


def fit(
    setup: FitSetup, data: FitData, state: TrainState, on_epoch_end: Callable[[TrainState, bool], None]
) -> TrainState:
    """Train until cfg.epochs or early stopping; after each epoch on_epoch_end(state, improved) saves the run."""
    cfg = setup.config
    while state.epoch < cfg.epochs and not state.stopped:
        started = time.perf_counter()
        which = f"{setup.label} epoch {state.epoch + 1}/{cfg.epochs}"
        result = train_one_epoch(setup, data.x_train, data.y_train, state.epoch, which)
        train_seconds = time.perf_counter() - started
        require_finite(result.loss_sum, "the training loss", state.epoch + 1)
        evaluation = _evaluate(setup, data, f"{which} evaluation", state.epoch + 1)
        state.epoch, state.step = state.epoch + 1, state.step + result.steps
        state.train_seconds += train_seconds
        state.eval_seconds += time.perf_counter() - started - train_seconds
        state.images_seen += result.images
        train_loss = result.loss_sum / max(1, result.images)
        improved = update_selection(
            state, cfg, val_loss=evaluation["val_loss"], val_auc=evaluation["val_auc"], train_loss=train_loss
        )
        state.history.append(EpochMetrics(
            epoch=state.epoch, phase="head" if state.epoch <= setup.head_epochs else "full", train_loss=train_loss,
            lr_head=result.lr["head"], lr_backbone=result.lr["backbone"], **evaluation,
            images_per_second=result.images / max(train_seconds, 1e-9), epoch_seconds=time.perf_counter() - started,
            elapsed_seconds=state.train_seconds + state.eval_seconds, is_best=improved,
        ).model_dump(mode="json"))
        on_epoch_end(state, improved)
        if state.best_state is None:  # from the next epoch on the live weights move: keep this epoch's copy
            state.best_state = state_copy(setup.model)
    return state


