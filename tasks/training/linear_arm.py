"""The imagenet-linear arm's run: frozen ImageNet features at every probe depth (cached), a logistic-regression probe
per depth fitted on the training patients, the validation-chosen depth's predictions."""

from __future__ import annotations

import io
import time

import numpy as np
import torch

from data_schemas.arms import parse_arm
from data_schemas.files import atomic_write_bytes, write_model_json
from data_schemas.training import (
    FEATURES_FILE,
    LINEAR_MODEL_FILE,
    DepthProbe,
    EpochMetrics,
    LinearProbeModel,
    ProbeDepths,
    RunSummary,
)
from tasks.splits import patient_ordinals
from tasks.training.gap_losses import image_log_losses, probe_losses
from tasks.training.linear_probe import (
    choose_depth,
    extract_multi_depth_features,
    fit_linear_probe,
    predict_linear_probe,
)
from tasks.training.loop import auc_or_none, batch_progress, run_logger as _logger
from tasks.training.models import feature_extractor, probe_depths
from tasks.training.run_context import RunContext, fmt_metric, write_run_timing
from tasks.training.run_folder import write_metrics, write_overfitting_losses, write_predictions, write_probe_depths

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


def train_linear(ctx: RunContext) -> RunSummary:
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
    write_run_timing(
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
        fmt_metric(val_auc),
        fmt_metric(test_auc),
    )
    return ctx.status("completed", epochs_run=1, best_epoch=1, best_val_auc=val_auc, test_auc=test_auc,
                      wall_seconds=time.perf_counter() - ctx.started)
