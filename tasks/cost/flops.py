"""FLOPs of each arm, counted on the real model: forward and training FLOPs per image, the linear probe's fit.

forward FLOPs per image   counted by tasks.training.models.count_flops (FlopCounterMode) on each arm's own model
                          (tasks.training.models.build_model: ResNet-50, ResNet-18 or MobileNetV3-Large, the arm's
                          ArmSpec.model) at the configured size and channel count, on the meta device: shapes only,
                          no arithmetic is done.
training FLOPs per image  counted the same way over a real forward + backward with the arm's freezing applied, so a
                          frozen layer contributes no weight gradient and a frozen prefix no backward at all. For
                          full backprop this is 3 x forward - conv1 (forward F, input gradients F except conv1's,
                          whose input needs none, weight gradients F: Kaplan et al. 2020, "Scaling Laws",
                          C ~ 6N per token = 3 x 2N).

FLOP convention: FlopCounterMode counts 2 FLOPs per multiply-add (MAC), as vendors' TFLOPS figures do; literature
"operations" for ImageNet training are multiply-adds (FLOP_CONVENTION).
"""

from __future__ import annotations

import functools

from data_schemas.arms import DEFAULT_MODEL, parse_arm
from data_schemas.cost import ArmCost, PhaseCounts
from data_schemas.files import sha256_json
from tasks.cost.caches import counting_code_version, read_model_counts, remember_model_counts

FEATURE_DIM = 2048  # ResNet-50's pooled feature width
PHASES = ("full", "head", "features")
FLOP_CONVENTION = (
    "FLOPs as counted by torch.utils.flop_counter.FlopCounterMode: 2 per multiply-add "
    "(ResNet-50 at 224x224x3 = ~4.1 G multiply-adds = ~8.2 GFLOPs forward). Vendor TFLOPS use the same convention. "
    "Literature 'operations' for ImageNet (~1e18 for 90 epochs, You et al. 2018) are multiply-adds: x2 to compare."
)


def phase_model(phase: str, channels: int, num_classes: int = 2, device: str = "cpu", model: str = DEFAULT_MODEL):
    """The arm's `model` (tasks.training.models.build_model, random weights) set up for one training phase.

    phase: "full" every parameter trainable (scratch, imagenet fine-tuning);
           "head" only the classifier head trainable (imagenet head-only warm-up epochs, as training freezes it);
           "features" frozen backbone in eval mode, fc replaced by Identity (imagenet-linear feature extraction).
    """
    import torch

    from tasks.training.models import as_feature_extractor, build_model, is_head_parameter

    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; use {', '.join(PHASES)}")
    with torch.device(device):
        net = build_model(model, num_classes=num_classes, in_channels=channels).train()
    if phase == "features":
        return as_feature_extractor(net)
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(phase == "full" or is_head_parameter(name, model))
    return net


@functools.lru_cache(maxsize=128)
def count_phase(
    phase: str, image_size: int, channels: int, num_classes: int = 2, model: str = DEFAULT_MODEL
) -> PhaseCounts:
    """FLOPs and parameter counts of one phase of `model`, counted on the meta device
    (tasks.training.models.count_flops);
    kept in model_counts.json, so that a later estimate needs no model built.

    full: train = 3 x forward - stem conv (every weight gradient, every input gradient but the first conv's);
    head: train = forward + 2 x D x classes (the head's weight gradient only; nothing below it needs a gradient),
          D = the pooled feature width (tasks.training.models.feature_dim: ResNet-50 2048);
    features: no backward, head removed: forward = full forward - 2 x D x classes.
    """
    key = sha256_json({"phase": phase, "size": image_size, "channels": channels, "classes": num_classes, "model": model,
                       "code": counting_code_version()})
    cached = read_model_counts().phase_counts.get(key)
    if cached is not None:
        return cached
    from tasks.training.models import count_flops, feature_dim

    net = phase_model(phase, channels, num_classes, device="meta", model=model)
    counts = PhaseCounts(
        phase=phase,
        feature_dim=feature_dim(model),
        forward_flops_per_image=count_flops(net, image_size, channels),
        train_flops_per_image=count_flops(net, image_size, channels, backward=True),
        params_total=sum(p.numel() for p in net.parameters()),
        params_trainable=sum(p.numel() for p in net.parameters() if p.requires_grad),
        buffers=sum(b.numel() for b in net.buffers()),
    )
    remember_model_counts(lambda cache: cache.phase_counts.__setitem__(key, counts))
    return counts


def linear_fit_flops(n_images: int, num_classes: int = 2, iterations: int = 100, dim: int = FEATURE_DIM) -> float:
    """FLOPs of fitting logistic regression on the extracted features (imagenet-linear arm).

    iterations x (2 n d c for the logits X.W  +  2 n d c for the gradient X^T.R) = 4 n d c per L-BFGS iteration,
    with c = 1 weight vector for two classes, num_classes otherwise; line-search re-evaluations are ignored. For
    1,500 images that is ~1.2 GFLOPs per 100 iterations: negligible next to the feature pass (~12 TFLOPs).
    """
    c = 1 if num_classes == 2 else num_classes
    return float(iterations) * 4.0 * n_images * dim * c


def classifier_params(num_classes: int = 2, dim: int = FEATURE_DIM) -> int:
    """Parameters of the logistic regression on `dim` features: d x c + c, one vector (c = 1) for two classes."""
    c = 1 if num_classes == 2 else num_classes
    return dim * c + c


def training_flops(
    *, n_images: int, epochs: int, train_per_image: float, head_warmup_epochs: int = 0, head_per_image: float = 0.0
) -> float:
    """FLOPs of `epochs` training epochs, the first `head_warmup_epochs` of them head-only:

        min(epochs, w) x n x head_per_image + max(0, epochs - w) x n x train_per_image

    Used for the planned run (epochs = the configured epochs) and for the epochs a run actually ran.
    """
    head_epochs = min(epochs, head_warmup_epochs)
    return head_epochs * n_images * head_per_image + (epochs - head_epochs) * n_images * train_per_image


def arm_flops_for_epochs(arm: ArmCost, epochs: int) -> float:
    """FLOPs of `arm` after `epochs` epochs (training_flops); the linear arm is one pass: flops_total whatever
    `epochs` is."""
    if parse_arm(arm.arm).mode == "imagenet-linear":
        return arm.flops_total
    return training_flops(
        n_images=arm.n_images,
        epochs=epochs,
        train_per_image=arm.train_flops_per_image,
        head_warmup_epochs=arm.head_warmup_epochs,
        head_per_image=arm.head_phase_flops_per_image or 0.0,
    )
