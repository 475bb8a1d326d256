"""Training one arm on one fold: `train_arm` (a plain function) and `train_arm_task` (its Prefect task, retries=1).

Fault model. After every finished epoch checkpoint_last.pt is replaced atomically (model, optimizer, step, history,
early-stopping state, timing, and the best weights when they are not the current ones); best.pt and metrics.csv are
then rewritten from the same state, and rewritten again from the checkpoint on resume, so a kill at any point leaves
the previous epoch's consistent state. Batch order, augmentation and dropout are seeded per (seed, epoch), so a
resumed run repeats exactly the epochs an uninterrupted run would have done. status.json is written last; only
status "completed" means predictions.csv and timing.json are final. A completed run folder whose config hash equals
the new one is not trained again.
"""

from __future__ import annotations

import io
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from sklearn.metrics import roc_auc_score

from data_schemas.training import (
    BEST_FILE,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    FEATURES_FILE,
    LINEAR_MODEL_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    PRETRAINED_ARMS,
    SPLITS_FILE,
    STATUS_FILE,
    TIMING_FILE,
    EpochMetrics,
    PredictionRow,
    RunConfig,
    RunSummary,
    SplitRow,
    TimingInfo,
    TrainConfig,
    resolve_train_config,
)
from tasks.augment import augment_batch, images_to_tensor, mixup, normalise
from tasks.dataset_store import load_dataset
from data_schemas.files import atomic_write_bytes, read_model_json, sha256_json, write_model_json, write_models_csv
from tasks.linear_probe import extract_features, fit_linear_probe, predict_linear_probe
from tasks.models import (
    WeightsUnavailableError,
    feature_extractor,
    forward_flops_per_image,
    is_head_parameter,
    is_no_decay_parameter,
    pretrained_resnet50,
    resolve_imagenet_weights,
    scratch_resnet50,
)
from tasks.runtime import Runtime, choose_runtime, cpu_has_fast_bf16  # noqa: F401 - re-exported for callers
from tasks.splits import count_patient_overlap, ensure_splits, n_folds, parts_for_fold, subsample_patients

CHECKPOINT_FORMAT = 1
NEGATIVE_LABEL_NAMES = frozenset({"0", "normal", "negative", "neg", "healthy", "benign", "control", "absent", "no", "false", "none"})
_stdlib_log = logging.getLogger("ctcompare.train")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow/task, else the stdlib logger."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return _stdlib_log


class TrainingInterrupted(Exception):
    """Raised by an on_epoch_end hook to stop a run after a finished epoch (used by tests to simulate a kill)."""


# ----------------------------------------------------------------------------------------------------- the data


@dataclass
class RunData:
    """The three parts as in-memory tensors at the run's image size, plus their split rows."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    rows: dict[str, list[SplitRow]]
    classes: list[str]
    positive_label: str


def _classes(rows: list[SplitRow], positive_label: str | None) -> tuple[list[str], str]:
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


def build_run_data(images: np.ndarray, index_of: dict[str, int], parts: dict[str, list[SplitRow]], size: int, positive: str, classes: list[str]) -> RunData:
    """Gather each part's rows from the in-memory array (read once) and resize them once to `size`."""
    x, y = {}, {}
    for name, rows in parts.items():
        indices = np.asarray([index_of[row.image_key] for row in rows], dtype=np.int64)
        x[name] = images_to_tensor(images[indices] if len(indices) else images[:0], size)
        y[name] = torch.tensor([1 if row.label == positive else 0 for row in rows], dtype=torch.long)
    return RunData(x=x, y=y, rows=parts, classes=classes, positive_label=positive)


# --------------------------------------------------------------------------------------------- run bookkeeping


@dataclass
class RunContext:
    arm: str
    run_dir: Path
    config: RunConfig
    runtime: Runtime
    data: RunData
    seed: int
    fold: int
    backbone: dict[str, torch.Tensor] | None
    started: float = field(default_factory=time.perf_counter)


def _status(ctx_or_arm: Any, run_dir: Path, status: str, reason: str = "", **extra: Any) -> RunSummary:
    arm = ctx_or_arm.arm if isinstance(ctx_or_arm, RunContext) else ctx_or_arm
    summary = RunSummary(arm=arm, status=status, reason=reason, run_dir=str(run_dir), updated_at=_now(), **extra)
    write_model_json(run_dir / STATUS_FILE, summary)
    return summary


def _config_identity(config: RunConfig) -> dict[str, Any]:
    """What makes two runs the same run (paths, names, thread counts and times excluded)."""
    data = config.model_dump(mode="json")
    for key in ("overrides", "profile", "splits_path", "num_threads", "config_hash", "created_at", "torch_version", "torchvision_version"):
        data.pop(key, None)
    if data.get("weights"):
        data["weights"] = {"sha256": data["weights"]["sha256"]}
    return data


def _auc(targets: np.ndarray, probs: np.ndarray) -> float | None:
    if len(np.unique(targets)) < 2:
        return None
    return float(roc_auc_score(targets, probs))


def _write_predictions(ctx: RunContext, probs: np.ndarray) -> None:
    rows = [
        PredictionRow(
            image_key=row.image_key, patient_key=row.patient_key, label=row.label,
            target=int(row.label == ctx.data.positive_label), prob_positive=float(min(1.0, max(0.0, p))),
        )
        for row, p in zip(ctx.data.rows["test"], probs)
    ]
    write_models_csv(ctx.run_dir / PREDICTIONS_FILE, rows, PredictionRow)


def _progress(total: int, desc: str):
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="batch")


# --------------------------------------------------------------------------------------------------- training


def _param_groups(model: torch.nn.Module, config: TrainConfig, backbone_mult: float) -> list[dict[str, Any]]:
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        key = (is_head_parameter(name), is_no_decay_parameter(name, parameter))
        buckets.setdefault(key, []).append(parameter)
    groups = []
    for (is_head, no_decay), params in sorted(buckets.items()):
        groups.append({
            "params": params,
            "weight_decay": 0.0 if no_decay else config.weight_decay,
            "lr": config.lr,
            "lr_mult": 1.0 if is_head else backbone_mult,
            "is_head": is_head,
            "name": f"{'head' if is_head else 'backbone'}{'-no_decay' if no_decay else ''}",
        })
    return groups


def _make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True, foreach=True)
    return torch.optim.AdamW(groups, lr=config.lr, foreach=True)


def lr_factor(config: TrainConfig, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Schedule factor for (0-based) epoch and step: warm-up then cosine, restarted when the head-only phase ends."""
    head_epochs = min(config.freeze_epochs, config.epochs)
    if epoch < head_epochs:
        start, length = 0, head_epochs
    else:
        start, length = head_epochs, config.epochs - head_epochs
    total = max(1, length * steps_per_epoch)
    t = (epoch - start) * steps_per_epoch + step_in_epoch
    if config.schedule == "onecycle":
        warmup = max(1.0, 0.3 * total)
    else:
        warmup = min(config.warmup_epochs * steps_per_epoch, 0.5 * total)
    if warmup > 0 and t < warmup:
        return (t + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (t - warmup) / max(1.0, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + salt) % (2**63 - 1)


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, x: torch.Tensor, runtime: Runtime, batch_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """Positive-class probabilities and logits (float32, CPU) of images in [0, 1]."""
    model.eval()
    logits = []
    for start in range(0, x.shape[0], batch_size):
        xb = normalise(x[start : start + batch_size]).to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits.append(model(xb).float().cpu())
    out = torch.cat(logits) if logits else torch.zeros((0, 2))
    return torch.softmax(out, dim=1)[:, 1].numpy(), out



@dataclass
class EpochResult:
    steps: int
    images: int
    loss_sum: float
    lr: dict[str, float]


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    cfg: TrainConfig,
    rt: Runtime,
    epoch: int,
    seed: int,
    head_phase: bool = False,
    class_weights: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    scaler: Any = None,
    progress: str | None = None,
) -> EpochResult:
    """One training epoch over the in-memory tensor: seeded order, batched augmentation, autocast, schedule.

    Batch order, augmentation and dropout depend only on (seed, epoch), so a resumed run repeats the same epoch.
    In the head-only phase the backbone is frozen (requires_grad off, lr 0). The optimizer's param groups carry
    "lr_mult" and "is_head" (see _param_groups).
    """
    n_train = x_train.shape[0]
    batch_size = min(cfg.batch_size, n_train)
    steps_per_epoch = max(1, n_train // batch_size)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not head_phase or is_head_parameter(name))
    torch.manual_seed(_epoch_seed(seed, epoch, 1))  # dropout
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch, 2))
    if sample_weights is not None:
        order = torch.multinomial(sample_weights, n_train, replacement=True, generator=generator)
    else:
        order = torch.randperm(n_train, generator=generator)
    order = order.to(x_train.device)
    model.train()
    loss_total = torch.zeros((), device=rt.device)
    images = 0
    bar = _progress(steps_per_epoch, progress) if progress else None
    lr_now: dict[str, float] = {}
    for i in range(steps_per_epoch):
        factor = lr_factor(cfg, epoch, i, steps_per_epoch)
        for group in optimizer.param_groups:
            mult = 0.0 if (head_phase and not group.get("is_head", True)) else group.get("lr_mult", 1.0)
            group["lr"] = cfg.lr * mult * factor
            lr_now["head" if group.get("is_head", True) else "backbone"] = group["lr"]
        index = order[i * batch_size : (i + 1) * batch_size]
        xb = augment_batch(x_train.index_select(0, index), cfg.augment, generator)
        xb = normalise(xb).to(rt.device, non_blocking=True)
        if rt.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        target = F.one_hot(y_train.index_select(0, index), 2).float().to(rt.device, non_blocking=True)
        if cfg.mixup_alpha > 0:
            xb, target = mixup(xb, target, cfg.mixup_alpha, generator)
        with rt.autocast():
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), target, weight=class_weights, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_total += loss.detach() * xb.shape[0]
        images += xb.shape[0]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss_total) / images:.4f}")
    if bar is not None:
        bar.close()
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    lr_now.setdefault("backbone", lr_now.get("head", cfg.lr))
    return EpochResult(steps=steps_per_epoch, images=images, loss_sum=float(loss_total), lr=lr_now)


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A real copy of the weights (not references to the live parameters)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_torch(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def _write_best(ctx: RunContext, state: dict[str, torch.Tensor], epoch: int, val_auc: float | None) -> None:
    _save_torch(ctx.run_dir / BEST_FILE, {
        "state_dict": state, "epoch": epoch, "val_auc": val_auc, "config_hash": ctx.config.config_hash, "arm": ctx.arm,
        "classes": ctx.data.classes,
    })


def _write_metrics(ctx: RunContext, history: list[dict[str, Any]]) -> None:
    write_models_csv(ctx.run_dir / METRICS_FILE, [EpochMetrics.model_validate(h) for h in history], EpochMetrics)


def _train_network(ctx: RunContext, resume: bool, on_epoch_end: Callable[[int], None] | None) -> RunSummary:
    cfg, rt, data, log = ctx.config.train, ctx.runtime, ctx.data, _logger()
    torch.manual_seed(ctx.seed)
    if ctx.backbone is None:
        model = scratch_resnet50(num_classes=2, dropout=cfg.dropout)
        backbone_mult = 1.0
    else:
        model = pretrained_resnet50(ctx.backbone, num_classes=2, dropout=cfg.dropout)
        backbone_mult = cfg.backbone_lr_mult
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = _param_groups(model, cfg, backbone_mult)
    optimizer = _make_optimizer(groups, cfg)
    scaler = torch.amp.GradScaler("cuda") if rt.precision == "fp16" else None

    x_train, y_train = data.x["train"], data.y["train"]
    n_train = x_train.shape[0]
    if n_train < 2:
        raise ValueError("the training part has fewer than two images.")
    counts = torch.bincount(y_train, minlength=2).float()
    class_weights = (counts.sum() / (2 * counts.clamp(min=1))) if cfg.class_balance == "loss_weights" else None
    sample_weights = (1.0 / counts.clamp(min=1))[y_train] if cfg.class_balance == "sampler" else None
    if class_weights is not None:
        class_weights = class_weights.to(rt.device)
    val_targets = data.y["val"].numpy()
    if rt.device.type == "cuda":
        # the training tensor lives on the GPU (1,500 x 224 x 224 floats is 0.3 GB): augmentation runs there too;
        # evaluation batches come from pinned host memory with non-blocking copies
        x_train, y_train = x_train.to(rt.device), y_train.to(rt.device)
        for part in ("val", "test"):
            data.x[part] = data.x[part].pin_memory()

    # state that the checkpoint carries
    start_epoch, step, history = 0, 0, []
    best_metric, best_epoch, best_val_auc, bad_epochs, stopped = -math.inf, None, None, 0, False
    best_state: dict[str, torch.Tensor] | None = None
    train_seconds = eval_seconds = 0.0
    images_seen = 0
    checkpoint_path = ctx.run_dir / CHECKPOINT_FILE
    ckpt = None
    if resume and checkpoint_path.is_file():
        try:
            ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - written atomically, so only a foreign or damaged file gets here
            log.warning("%s: cannot read %s (%s); starting over", ctx.arm, checkpoint_path.name, type(error).__name__)
        if ckpt is not None and ckpt.get("config_hash") != ctx.config.config_hash:
            log.warning("%s: %s belongs to another configuration; starting over", ctx.arm, checkpoint_path.name)
            ckpt = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], list(ckpt["history"])
        best_metric, best_epoch, best_val_auc = ckpt["best_metric"], ckpt["best_epoch"], ckpt["best_val_auc"]
        bad_epochs, stopped = ckpt["bad_epochs"], ckpt["stopped"]
        train_seconds, eval_seconds, images_seen = ckpt["train_seconds"], ckpt["eval_seconds"], ckpt["images_seen"]
        best_state = _state_copy(model) if ckpt["best_is_current"] else ckpt["best_state"]
        torch.set_rng_state(ckpt["torch_rng"])
        # repair what an interrupted epoch may have left half-done
        if best_state is not None and best_epoch is not None:
            _write_best(ctx, best_state, best_epoch, best_val_auc)
        _write_metrics(ctx, history)
        log.info("%s: resuming after epoch %d of %d", ctx.arm, start_epoch, cfg.epochs)
    elif checkpoint_path.is_file():
        if not resume:
            log.warning("%s: %s exists; starting over (pass --resume to continue it)", ctx.arm, checkpoint_path.name)
        for name in (CHECKPOINT_FILE, BEST_FILE, METRICS_FILE):
            (ctx.run_dir / name).unlink(missing_ok=True)

    for epoch in range(start_epoch, cfg.epochs):
        if stopped:
            break
        head_phase = epoch < cfg.freeze_epochs and ctx.backbone is not None
        t_epoch = time.perf_counter()
        result = train_one_epoch(
            model, optimizer, x_train, y_train, cfg, rt, epoch, ctx.seed, head_phase, class_weights=class_weights,
            sample_weights=sample_weights, scaler=scaler, progress=f"{ctx.arm} epoch {epoch + 1}/{cfg.epochs}",
        )
        step += result.steps
        loss_sum, loss_count, lr_now = result.loss_sum, result.images, result.lr
        epoch_train = time.perf_counter() - t_epoch
        train_seconds += epoch_train
        images_seen += loss_count

        t_eval = time.perf_counter()
        val_probs, val_logits = predict_probs(model, data.x["val"], rt, cfg.eval_batch_size)
        val_loss = float(F.cross_entropy(val_logits, data.y["val"])) if len(val_targets) else None
        val_auc = _auc(val_targets, val_probs)
        eval_seconds += time.perf_counter() - t_eval

        metric = val_auc if val_auc is not None else (-val_loss if val_loss is not None else -loss_sum / loss_count)
        improved = metric > best_metric + cfg.early_stopping_min_delta or best_epoch is None
        if improved:
            best_metric, best_epoch, best_val_auc, bad_epochs = metric, epoch + 1, val_auc, 0
            best_state = None  # the live weights are the best; copied when written
        else:
            bad_epochs += 1
        if cfg.early_stopping_patience is not None and bad_epochs >= cfg.early_stopping_patience:
            stopped = True
        history.append(EpochMetrics(
            epoch=epoch + 1, phase="head" if head_phase else "full", train_loss=loss_sum / loss_count,
            val_loss=val_loss, val_auc=val_auc, lr_head=lr_now["head"], lr_backbone=lr_now["backbone"],
            images_per_second=loss_count / max(epoch_train, 1e-9), epoch_seconds=time.perf_counter() - t_epoch,
            elapsed_seconds=train_seconds + eval_seconds, is_best=improved,
        ).model_dump(mode="json"))

        current = _state_copy(model)
        _save_torch(checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "config_hash": ctx.config.config_hash, "arm": ctx.arm,
            "epoch": epoch + 1, "step": step, "model": current, "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "history": history,
            "best_metric": best_metric, "best_epoch": best_epoch, "best_val_auc": best_val_auc,
            "bad_epochs": bad_epochs, "stopped": stopped, "best_is_current": best_state is None,
            "best_state": best_state, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "images_seen": images_seen, "torch_rng": torch.get_rng_state(),
        })
        if improved:
            _write_best(ctx, current, epoch + 1, val_auc)
        if best_state is None:
            # from the next epoch on the live weights move; keep this epoch's copy as the best
            best_state = current
        _write_metrics(ctx, history)
        auc_text = f"{val_auc:.3f}" if val_auc is not None else "n/a"
        log.info(
            "%s epoch %d/%d%s: train_loss=%.4f val_loss=%s val_auc=%s lr=%.2e %.1f img/s %.1fs%s%s",
            ctx.arm, epoch + 1, cfg.epochs, " (head only)" if head_phase else "", loss_sum / loss_count,
            f"{val_loss:.4f}" if val_loss is not None else "n/a", auc_text, lr_now["head"],
            loss_count / max(epoch_train, 1e-9), time.perf_counter() - t_epoch, " [best]" if improved else "",
            " [early stop]" if stopped else "",
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)

    # test predictions from the best epoch's weights
    if best_state is not None:
        model.load_state_dict(best_state)
    t_eval = time.perf_counter()
    test_probs, _ = predict_probs(model, data.x["test"], rt, cfg.eval_batch_size)
    eval_seconds += time.perf_counter() - t_eval
    _write_predictions(ctx, test_probs)
    test_auc = _auc(data.y["test"].numpy(), test_probs)
    flops = forward_flops_per_image(cfg.image_size)
    ips = images_seen / max(train_seconds, 1e-9)
    wall = time.perf_counter() - ctx.started
    write_model_json(ctx.run_dir / TIMING_FILE, TimingInfo(
        wall_seconds=train_seconds + eval_seconds, train_seconds=train_seconds, eval_seconds=eval_seconds,
        epochs_run=len(history), train_images_seen=images_seen, images_per_second=ips,
        forward_flops_per_image=flops, train_flops_per_image=3 * flops, achieved_flops_per_second=3 * flops * ips,
        device=str(rt.device), precision=rt.precision,
    ))
    log.info("%s: done, best epoch %s (val AUC %s), test AUC %s, %.1f img/s", ctx.arm, best_epoch,
             f"{best_val_auc:.3f}" if best_val_auc is not None else "n/a",
             f"{test_auc:.3f}" if test_auc is not None else "n/a", ips)
    return _status(ctx, ctx.run_dir, "completed", fold=ctx.fold, config_hash=ctx.config.config_hash,
                   epochs_run=len(history), best_epoch=best_epoch, best_val_auc=best_val_auc, test_auc=test_auc,
                   wall_seconds=wall)


def _train_linear(ctx: RunContext) -> RunSummary:
    cfg, rt, data, log = ctx.config.train, ctx.runtime, ctx.data, _logger()
    assert ctx.backbone is not None
    features_path = ctx.run_dir / FEATURES_FILE
    t0 = time.perf_counter()
    cached = None
    if features_path.is_file():
        with np.load(features_path, allow_pickle=False) as archive:
            if str(archive["config_hash"]) == ctx.config.config_hash:
                cached = {part: archive[part] for part in ("train", "val", "test")}
    if cached is None:
        model = feature_extractor(ctx.backbone).to(rt.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        cached = {
            part: extract_features(model, data.x[part], cfg.eval_batch_size, rt.device, rt.precision, rt.channels_last)
            for part in ("train", "val", "test")
        }
        buffer = io.BytesIO()
        np.savez(buffer, config_hash=np.asarray(ctx.config.config_hash), **cached)
        atomic_write_bytes(features_path, buffer.getbuffer())
    feature_seconds = time.perf_counter() - t0
    n_images = sum(v.shape[0] for v in cached.values())
    log.info("%s: features of %d images in %.1fs", ctx.arm, n_images, feature_seconds)

    t_fit = time.perf_counter()
    probe = fit_linear_probe(
        cached["train"], data.y["train"].numpy(), [r.patient_key for r in data.rows["train"]], cfg.linear,
        balanced=cfg.class_balance != "none", seed=ctx.seed,
    )
    write_model_json(ctx.run_dir / LINEAR_MODEL_FILE, probe)
    val_probs = predict_linear_probe(probe, cached["val"])
    val_auc = _auc(data.y["val"].numpy(), val_probs)
    eps = 1e-7
    vt = data.y["val"].numpy()
    val_loss = float(-np.mean(vt * np.log(val_probs + eps) + (1 - vt) * np.log(1 - val_probs + eps))) if len(vt) else None
    test_probs = predict_linear_probe(probe, cached["test"])
    _write_predictions(ctx, test_probs)
    fit_seconds = time.perf_counter() - t_fit
    _write_metrics(ctx, [EpochMetrics(
        epoch=1, phase="linear", val_loss=val_loss, val_auc=val_auc, images_per_second=n_images / max(feature_seconds, 1e-9),
        epoch_seconds=feature_seconds + fit_seconds, elapsed_seconds=feature_seconds + fit_seconds, is_best=True,
    ).model_dump(mode="json")])
    flops = forward_flops_per_image(cfg.image_size)
    ips = n_images / max(feature_seconds, 1e-9)
    write_model_json(ctx.run_dir / TIMING_FILE, TimingInfo(
        wall_seconds=feature_seconds + fit_seconds, train_seconds=fit_seconds, eval_seconds=0.0,
        feature_seconds=feature_seconds, epochs_run=1, train_images_seen=n_images, images_per_second=ips,
        forward_flops_per_image=flops, train_flops_per_image=flops, achieved_flops_per_second=flops * ips,
        device=str(rt.device), precision=rt.precision,
    ))
    test_auc = _auc(data.y["test"].numpy(), test_probs)
    log.info("%s: C=%.3g val AUC %s, test AUC %s", ctx.arm, probe.C,
             f"{val_auc:.3f}" if val_auc is not None else "n/a", f"{test_auc:.3f}" if test_auc is not None else "n/a")
    return _status(ctx, ctx.run_dir, "completed", fold=ctx.fold, config_hash=ctx.config.config_hash, epochs_run=1,
                   best_epoch=1, best_val_auc=val_auc, test_auc=test_auc, wall_seconds=time.perf_counter() - ctx.started)


# ------------------------------------------------------------------------------------------------ entry points


def default_splits_path(run_dir: Path) -> Path:
    """Where `ctcompare train` keeps the shared split when none is given: beside the run folder."""
    return Path(run_dir).resolve().parent / SPLITS_FILE


def train_arm(
    dataset_dir: Path,
    arm: str,
    run_dir: Path,
    profile: str = "cpu",
    overrides: dict[str, str] | None = None,
    weights_path: Path | None = None,
    seed: int = 0,
    resume: bool = False,
    splits_path: Path | None = None,
    fold: int | None = None,
    folds: int | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> RunSummary:
    """Train (or fit, for imagenet-linear) one arm on one fold and write its run folder; see the module doc.

    Pretrained arms without weights are skipped (status.json "skipped", reason = where to put the file), not an
    error. Bad settings, a bad weights file or a mismatched split raise ValueError subclasses with one sentence.
    """
    run_dir = Path(run_dir)
    overrides = dict(overrides or {})
    config = resolve_train_config(profile, arm, overrides)
    log = _logger()
    started = time.perf_counter()
    dataset = load_dataset(Path(dataset_dir), in_memory=True)
    splits_path = Path(splits_path) if splits_path is not None else default_splits_path(run_dir)
    rows, info = ensure_splits(
        dataset.manifest, dataset.card.content_hash, splits_path, seed, config.val_fraction, config.test_fraction, folds
    )
    fold_index = fold or 0
    parts = parts_for_fold(rows, fold_index)
    parts["train"] = subsample_patients(parts["train"], config.train_fraction, seed)
    classes, positive = _classes(rows, config.positive_label)
    overlap = count_patient_overlap(rows)
    run_dir.mkdir(parents=True, exist_ok=True)

    backbone, weights_info, skip_reason = None, None, None
    if arm in PRETRAINED_ARMS:
        try:
            backbone, weights_info = resolve_imagenet_weights(weights_path, allow_download=config.download_weights)
        except WeightsUnavailableError as error:
            skip_reason = str(error)
        except ValueError as error:  # WeightsFileError: a file that exists but is unusable is an error
            _status(arm, run_dir, "failed", str(error), fold=fold_index)
            raise
    runtime = choose_runtime(config)
    run_config = RunConfig(
        arm=arm, profile=profile, overrides=overrides, seed=seed, fold=fold_index, folds=n_folds(rows), train=config,
        dataset_hash=dataset.card.content_hash, dataset_image_size=dataset.card.image_size,
        splits_path=str(splits_path), splits_sha256=info.splits_sha256, classes=classes, positive_label=positive,
        n_train_images=len(parts["train"]), n_val_images=len(parts["val"]), n_test_images=len(parts["test"]),
        n_train_patients=len({r.patient_key for r in parts["train"]}),
        n_val_patients=len({r.patient_key for r in parts["val"]}),
        n_test_patients=len({r.patient_key for r in parts["test"]}),
        patient_overlap=overlap, weights=weights_info, device=str(runtime.device), precision=runtime.precision,
        channels_last=runtime.channels_last, num_threads=runtime.num_threads, torch_version=torch.__version__,
        torchvision_version=torchvision.__version__, config_hash="", created_at=_now(),
    )
    run_config = run_config.model_copy(update={"config_hash": sha256_json(_config_identity(run_config))})

    status_path = run_dir / STATUS_FILE
    if status_path.is_file() and skip_reason is None:
        try:
            previous = read_model_json(status_path, RunSummary)
        except ValueError:
            previous = None
        if (previous is not None and previous.status == "completed" and previous.config_hash == run_config.config_hash
                and (run_dir / PREDICTIONS_FILE).is_file()):
            log.info("%s: %s already holds a completed run with this configuration; not training again", arm, run_dir)
            return previous

    write_model_json(run_dir / CONFIG_FILE, run_config)
    if skip_reason is not None:
        log.warning("%s: skipped: %s", arm, skip_reason)
        return _status(arm, run_dir, "skipped", skip_reason, fold=fold_index, config_hash=run_config.config_hash)

    _status(arm, run_dir, "running", fold=fold_index, config_hash=run_config.config_hash)
    log.info(
        "%s: %d train / %d val / %d test images (%d / %d / %d patients), %d px, %s, %s%s",
        arm, len(parts["train"]), len(parts["val"]), len(parts["test"]), run_config.n_train_patients,
        run_config.n_val_patients, run_config.n_test_patients, config.image_size, runtime.device, runtime.precision,
        ", channels-last" if runtime.channels_last else "",
    )
    index_of = {row.image_key: row.index for row in dataset.manifest}
    data = build_run_data(dataset.images, index_of, parts, config.image_size, positive, classes)
    del dataset
    ctx = RunContext(arm=arm, run_dir=run_dir, config=run_config, runtime=runtime, data=data, seed=seed,
                     fold=fold_index, backbone=backbone, started=started)
    try:
        if arm == "imagenet-linear":
            return _train_linear(ctx)
        return _train_network(ctx, resume, on_epoch_end)
    except BaseException as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        _status(arm, run_dir, "failed", reason, fold=fold_index, config_hash=run_config.config_hash)
        raise


def _train_arm_task_fn(
    dataset_dir: Path,
    arm: str,
    run_dir: Path,
    profile: str = "cpu",
    overrides: dict[str, str] | None = None,
    weights_path: Path | None = None,
    seed: int = 0,
    resume: bool = False,
    splits_path: Path | None = None,
    fold: int | None = None,
    folds: int | None = None,
) -> RunSummary:
    """A Prefect retry continues from the last finished epoch rather than starting over."""
    try:
        from prefect.runtime import task_run

        resume = resume or int(task_run.run_count or 1) > 1
    except Exception:  # noqa: BLE001
        pass
    return train_arm(dataset_dir, arm, run_dir, profile, overrides, weights_path, seed, resume, splits_path, fold, folds)


def _retry_worthwhile(task: Any, task_run: Any, state: Any) -> bool:
    """Retry crashes and transient errors; a ValueError (bad setting, weights file, split) would fail again."""
    try:
        state.result()
    except ValueError:
        return False
    except BaseException:  # noqa: BLE001
        return True
    return True


def _make_task():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(
        _train_arm_task_fn, name="train-arm", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE,
        task_run_name="train-{arm}-fold{fold}", retry_condition_fn=_retry_worthwhile,
    )


train_arm_task = _make_task()
