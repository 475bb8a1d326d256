"""Training: models and weights, augmentation, the training loop, linear probes and run folders."""

from tasks.training.augment import images_to_tensor, normalise
from tasks.training.linear_probe import predict_linear_probe
from tasks.training.loop import make_optimizer, make_setup, param_groups, train_one_epoch
from tasks.training.model_defs import model_def
from tasks.training.models import (
    as_feature_extractor,
    build_model,
    build_resnet50,
    count_flops,
    feature_dim,
    feature_extractor,
    forward_flops_per_image,
    is_head_parameter,
    pooled_at_depth,
    scratch_resnet50,
)
from tasks.training.train import train_arm, train_arm_task
from tasks.training.weights import hub_checkpoint_dir, read_weights_file, resolve_imagenet_weights, weights_file_name

__all__ = [
    "as_feature_extractor",
    "build_model",
    "build_resnet50",
    "count_flops",
    "feature_dim",
    "feature_extractor",
    "forward_flops_per_image",
    "hub_checkpoint_dir",
    "images_to_tensor",
    "is_head_parameter",
    "make_optimizer",
    "make_setup",
    "model_def",
    "normalise",
    "param_groups",
    "pooled_at_depth",
    "predict_linear_probe",
    "read_weights_file",
    "resolve_imagenet_weights",
    "scratch_resnet50",
    "train_arm",
    "train_arm_task",
    "train_one_epoch",
    "weights_file_name",
]
