"""Training: models and weights, augmentation, the training loop, linear probes and run folders.

The names below are imported from their modules on first use: most of them pull in torch, and a re-run that finds
every run completed, or a check of a weights file already checked, needs none of them.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF: dict[str, str] = {
    **dict.fromkeys(("images_to_tensor", "normalise"), "augment"),
    "predict_linear_probe": "linear_probe",
    **dict.fromkeys(("make_optimizer", "make_setup", "param_groups", "train_one_epoch"), "loop"),
    "model_def": "model_defs",
    **dict.fromkeys(("as_feature_extractor", "build_model", "build_resnet50", "count_flops", "feature_dim",
                     "feature_extractor", "forward_flops_per_image", "is_head_parameter", "pooled_at_depth",
                     "scratch_resnet50"), "models"),
    **dict.fromkeys(("train_arm", "train_arm_task"), "train"),
    **dict.fromkeys(("hub_checkpoint_dir", "read_weights_file", "resolve_imagenet_weights", "weights_file_name"),
                    "weights"),
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """A name of __all__, imported from its module (tasks.training.<module>) when first asked for."""
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"tasks.training.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'tasks.training' has no attribute {name!r}")
