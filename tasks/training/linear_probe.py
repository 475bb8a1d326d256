"""The imagenet-linear arm: frozen ImageNet features computed once (at one depth, or at several depths from the
same forward pass), then logistic regression with a cross-validated regularisation strength (patient-grouped folds
inside the training part)."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from data_schemas.training import LinearProbeConfig, LinearProbeModel
from tasks.training.augment import normalise
from tasks.training.models import multi_depth_features


def _batches(
    images: torch.Tensor, batch_size: int, device: torch.device, precision: str, channels_last: bool
) -> Iterator[tuple[int, torch.Tensor, ContextManager[Any]]]:
    """(start, normalised batch on `device`, its autocast context) for every batch of [0, 1] images."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for start in range(0, images.shape[0], batch_size):
        x = normalise(images[start : start + batch_size]).to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield start, x, torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.inference_mode()
def extract_features(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
) -> np.ndarray:
    """(N, 1, S, S) [0, 1] images -> (N, D) float32 pooled features of a model whose head is Identity (ResNet-50:
    D = 2048)."""
    model.eval()
    out: np.ndarray | None = None
    for start, x, context in _batches(images, batch_size, device, precision, channels_last):
        with context:
            features = model(x).float().cpu().numpy()
        if out is None:
            out = np.empty((images.shape[0], features.shape[1]), dtype=np.float32)
        out[start : start + x.shape[0]] = features
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


@torch.inference_mode()
def extract_multi_depth_features(
    model: torch.nn.Module,
    images: torch.Tensor,
    depths: Sequence[str],
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """{depth: (N, C_depth) float32 pooled features} of [0, 1] images, every depth from the same forward pass of each
    batch (tasks.training.models.multi_depth_features; depths e.g. tasks.training.models.probe_depths(model_name));
    on_batch(n) after
    each batch of n images (a progress count, e.g. tasks.training.loop.batch_progress)."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {depth: [] for depth in depths}
    for _start, x, context in _batches(images, batch_size, device, precision, channels_last):
        with context:
            features = multi_depth_features(model, x, depths)
        for depth, value in features.items():
            parts[depth].append(value.cpu().numpy())
        if on_batch is not None:
            on_batch(x.shape[0])
    return {depth: np.concatenate(chunks).astype(np.float32, copy=False) for depth, chunks in parts.items()}


def fit_linear_probe(
    features: np.ndarray,
    targets: np.ndarray,
    groups: list[str],
    config: LinearProbeConfig,
    balanced: bool,
    seed: int,
) -> LinearProbeModel:
    """Standardise, then LogisticRegressionCV (ROC AUC, log grid of Cs) with patient-grouped stratified folds."""
    scaler = StandardScaler().fit(features)
    z = scaler.transform(features)
    n_groups_per_class = min(len({g for g, t in zip(groups, targets) if t == c}) for c in (0, 1))
    n_splits = max(2, min(config.cv_folds, n_groups_per_class))
    folds = list(
        StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(z, targets, groups)
    )
    classifier = LogisticRegressionCV(
        Cs=config.Cs,
        cv=folds,
        scoring="roc_auc",
        class_weight="balanced" if balanced else None,
        max_iter=config.max_iter,
        random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        classifier.fit(z, targets)
    return LinearProbeModel(
        C=float(np.ravel(classifier.C_)[0]),
        Cs_tried=[float(c) for c in classifier.Cs_],
        feature_mean=[float(v) for v in scaler.mean_],
        feature_scale=[float(v) for v in scaler.scale_],
        coef=[float(v) for v in classifier.coef_.ravel()],
        intercept=float(np.ravel(classifier.intercept_)[0]),
        class_weight="balanced" if balanced else None,
    )


def choose_depth(val_aucs: dict[str, float | None]) -> str:
    """The depth whose probe has the highest validation AUC; ties go to the shallower (cheaper) depth. When no
    depth has a validation AUC (a single-class validation part) the deepest depth, the classic pooled features.

    val_aucs is ordered shallow to deep. The test part never enters: the depth is a model-selection choice.
    """
    depths = list(val_aucs)
    if not depths:
        raise ValueError("no probe depth to choose from.")
    scored = [(auc, -i) for i, auc in enumerate(val_aucs.values()) if auc is not None]
    if not scored:
        return depths[-1]
    return depths[-max(scored)[1]]


def predict_linear_probe(model: LinearProbeModel, features: np.ndarray) -> np.ndarray:
    """Probability of the positive class."""
    z = (features - np.asarray(model.feature_mean)) / np.asarray(model.feature_scale)
    logits = z @ np.asarray(model.coef) + model.intercept
    return 1.0 / (1.0 + np.exp(-logits))
