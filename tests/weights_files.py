"""Weights files as torchvision names its downloads, for tests and benchmarks: no machine here reaches a model hub,
and the loading code is the same for random weights as for the real file."""

from __future__ import annotations

from pathlib import Path

import torch

from data_schemas.files import sha256_file


def save_hashed(state: dict, directory: Path, stem: str = "resnet50") -> Path:
    """Save `state` like torchvision names its files: <stem>-<first 8 hex of SHA-256>.pth."""
    tmp = directory / f"{stem}.tmp"
    torch.save(state, tmp)
    path = directory / f"{stem}-{sha256_file(tmp)[:8]}.pth"
    tmp.rename(path)
    return path


def random_torchvision_file(directory: Path, model: str = "resnet50", seed: int = 7) -> Path:
    """A torchvision-format state dict of `model` with random weights (seeded), named '<model>-<SHA-256 prefix>.pth'."""
    import torchvision.models as tvm

    torch.manual_seed(seed)
    return save_hashed(getattr(tvm, model)(weights=None).state_dict(), directory, model)
