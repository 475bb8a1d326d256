"""ImageNet weights of the arms' models: found (a file, torchvision's cache, a download), checked, and folded to a
grey stem.

Grey input. Every arm is fed z = (g - GRAY_MEAN) / GRAY_STD, with g the [0, 1] grey image. For the pretrained
arms the first convolution's RGB kernel is folded to one input channel so that the network computes what
torchvision's RGB network computes on the grey image replicated three times and normalised per channel with the
mean/std of the weights enum's transforms (ImageNet's):

    sum_c w_c * (g - mean_c) / std_c  =  [GRAY_STD * sum_c w_c / std_c] * z  +  sum_c w_c * (GRAY_MEAN - mean_c) / std_c

The first term is the new 1-channel kernel (the sum of the RGB kernels, each scaled by its channel's 1/std; with
equal stds it is exactly the plain sum of the RGB kernels). The second term is a per-output-channel constant; the
first conv of every supported model has no bias, but a BatchNorm comes next, so the constant is folded into that
BatchNorm's running mean. The result is exact wherever the first conv's window lies inside the image; only the
zero-padding border differs (the RGB network pads with each channel's mean, the grey one with GRAY_MEAN, which
differ by at most 0.04 in [0, 1] units). tests/test_models.py checks the equality on interior positions for every
model. The cost is a third of the replicated-RGB first conv.
"""

from __future__ import annotations

import re
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torchvision.models import ResNet50_Weights, WeightsEnum

from data_schemas.arms import DEFAULT_MODEL
from data_schemas.files import sha256_file
from data_schemas.training import GRAY_MEAN, GRAY_STD, WeightsInfo
from tasks.training.model_defs import model_def, model_label
from tasks.training.weights_record import file_identity, remember_check

_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z0-9]+$")


class WeightsUnavailableError(RuntimeError):
    """No ImageNet weights on this machine and none could be downloaded; the message says where to put them."""


class WeightsFileError(ValueError):
    """A weights file that exists but is not a usable state dict of the model (corrupt, truncated, wrong model, bad
    hash)."""


def hub_checkpoint_dir() -> Path:
    """torchvision's download cache: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_file_name(weights: WeightsEnum = ResNet50_Weights.IMAGENET1K_V2) -> str:
    """The file name torchvision gives a weights enum's download, e.g. resnet50-11ad3fa6.pth."""
    return Path(weights.url).name


def unavailable_message(model: str = DEFAULT_MODEL) -> str:
    """The one sentence printed when no ImageNet weights of `model` can be found."""
    weights = model_def(model).weights[0]
    return (
        f"ImageNet {model_label(model)} weights are not available: put {weights_file_name(weights)} (from "
        f"{weights.url}) in "
        f"{hub_checkpoint_dir()}, or pass --weights PATH to a torchvision-format {model_label(model)} state dict "
        "(the weights parameter of a flow run)."
    )


@lru_cache(maxsize=8)
def _reference_shapes(model: str = DEFAULT_MODEL) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        reference = model_def(model).builder(weights=None)
    return {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def _key_problems(backbone: Mapping[str, Any], expected: set[str]) -> str:
    """'missing n keys (e.g. ...); m unexpected keys (e.g. ...)', or '' when the key sets agree."""
    missing = sorted(expected - set(backbone))
    unexpected = sorted(set(backbone) - expected)
    detail = f"missing {len(missing)} keys (e.g. {missing[:3]})" if missing else ""
    if unexpected:
        detail += ("; " if detail else "") + f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
    return detail


def check_state_dict(
    state: Mapping[str, Any], model: str = DEFAULT_MODEL, source: str = "weights", *, values: bool = True
) -> dict[str, torch.Tensor]:
    """Validate a torchvision state dict of `model`; return its backbone part (the head's keys dropped).

    Accepts checkpoints wrapped as {"state_dict": ...} or {"model": ...}, keys prefixed "module.", and a first conv
    with 3 (RGB) or 1 (already grey) input channels. Raises WeightsFileError naming the first problem. values=False
    leaves out the finite-values check (names and shapes only: no tensor is read), for a file whose full check is
    recorded unchanged (tasks.training.weights_record).
    """
    if not isinstance(state, Mapping):
        raise WeightsFileError(f"{source} does not hold a state dict (found {type(state).__name__}).")
    for wrapper in ("state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    definition, reference = model_def(model), _reference_shapes(model)
    head, stem = definition.head + ".", definition.stem + ".weight"
    cleaned = {str(k).removeprefix("module."): v for k, v in state.items()}
    backbone = {k: v for k, v in cleaned.items() if not k.startswith(head)}
    expected = {k for k in reference if not k.startswith(head)}
    problems = _key_problems(backbone, expected)
    if problems:
        raise WeightsFileError(f"{source} is not a torchvision {model_label(model)} state dict: {problems}.")
    for key in sorted(expected):
        value, want = backbone[key], reference[key]
        if not isinstance(value, torch.Tensor):
            raise WeightsFileError(f"{source}: '{key}' is not a tensor.")
        grey_stem = key == stem and tuple(value.shape) == (want[0], 1, *want[2:])
        if tuple(value.shape) != want and not grey_stem:
            raise WeightsFileError(f"{source}: '{key}' has shape {tuple(value.shape)}, expected {want}.")
        if values and value.is_floating_point() and not torch.isfinite(value).all():
            raise WeightsFileError(f"{source}: '{key}' contains NaN or infinite values.")
    return {k: v.detach().to("cpu") for k, v in backbone.items()}


def check_resnet50_state_dict(state: Mapping[str, Any], source: str = "weights") -> dict[str, torch.Tensor]:
    """check_state_dict for ResNet-50."""
    return check_state_dict(state, DEFAULT_MODEL, source)


def read_weights_file(path: Path, model: str = DEFAULT_MODEL) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Load a local state dict with weights_only=True, check the hash in a torchvision-style name, keys and shapes;
    a passed check is recorded (tasks.training.weights_record), so the next command need not load it to check it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsFileError(f"weights file {path} does not exist.")
    identity = file_identity(path)
    digest = sha256_file(path)
    match = _HASH_IN_NAME.search(path.name)
    if match and not digest.startswith(match.group(1)):
        raise WeightsFileError(
            f"weights file {path} fails its hash check: the name says {match.group(1)} but the SHA-256 starts "
            f"{digest[: len(match.group(1))]} (truncated or corrupt download?)."
        )
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing: the refusal says it
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is unusable
        # torch's own message runs to a paragraph of advice on loading untrusted files: said here in one clause
        reason = ("it holds objects other than tensors, which are never unpickled here (save model.state_dict(), "
                  "not the model)" if "Unsupported global" in str(error) else
                  f"{type(error).__name__} while reading it (truncated, or not a PyTorch weights file?)")
        raise WeightsFileError(f"weights file {path} is not a readable PyTorch state dict: {reason}.") from None
    backbone = check_state_dict(state, model, source=f"weights file {path}")
    info = WeightsInfo(source="file", path=str(path), file_name=path.name, sha256=digest, hash_checked=bool(match))
    remember_check(path, model, info, identity)
    return backbone, info


def _download(model: str) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """The preferred weights enum's download through torchvision (hash-checked); WeightsUnavailableError if it fails."""
    weights = model_def(model).weights[0]
    try:
        state = weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True)
    except Exception as error:  # noqa: BLE001 - offline, proxy, DNS, hash: all mean "not available"
        raise WeightsUnavailableError(
            f"{unavailable_message(model)} (download failed: {type(error).__name__})"
        ) from None
    cached = hub_checkpoint_dir() / weights_file_name(weights)
    backbone = check_state_dict(state, model, source=str(cached))
    info = WeightsInfo(
        source="download", path=str(cached), file_name=cached.name, sha256=sha256_file(cached), hash_checked=True
    )
    return backbone, info


def resolve_imagenet_weights(
    weights_path: Path | str | None = None, allow_download: bool = False, model: str = DEFAULT_MODEL
) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """The backbone state dict of `model` (head dropped) from --weights PATH, else torchvision's cache (the weights
    enums in preference order), else a download when allowed. Raises WeightsUnavailableError (one sentence) or
    WeightsFileError."""
    if weights_path is not None:
        return read_weights_file(Path(weights_path), model)
    for weights in model_def(model).weights:
        cached = hub_checkpoint_dir() / weights_file_name(weights)
        if cached.is_file():
            state, info = read_weights_file(cached, model)
            return state, info.model_copy(update={"source": "torch_hub_cache"})
    if allow_download:
        return _download(model)
    raise WeightsUnavailableError(unavailable_message(model))


def load_imagenet_state_dict(
    weights_path: Path | str | None = None, allow_download: bool = False, model: str = DEFAULT_MODEL
) -> dict[str, torch.Tensor]:
    """The checked backbone state dict only (see resolve_imagenet_weights)."""
    return resolve_imagenet_weights(weights_path, allow_download, model)[0]


def sum_rgb_conv1(weight: torch.Tensor, std: Sequence[float] | None = None) -> torch.Tensor:
    """(O, 3, k, k) -> (O, 1, k, k): the sum over input channels, each divided by std[c] when given."""
    if weight.shape[1] == 1:
        return weight.clone()
    if std is None:
        return weight.sum(dim=1, keepdim=True)
    scale = torch.tensor(tuple(std), dtype=weight.dtype).view(1, -1, 1, 1)
    return (weight / scale).sum(dim=1, keepdim=True)


def input_statistics(model: str = DEFAULT_MODEL) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel the pretrained weights expect: the weights enum's transforms metadata."""
    transforms = model_def(model).weights[0].transforms()
    return tuple(transforms.mean), tuple(transforms.std)


def fold_gray_normalisation(state: Mapping[str, torch.Tensor], model: str = DEFAULT_MODEL) -> dict[str, torch.Tensor]:
    """RGB backbone -> grey one fed (g - GRAY_MEAN)/GRAY_STD; exact on interior positions (module doc)."""
    definition = model_def(model)
    conv_key, norm_key = definition.stem + ".weight", definition.stem_norm + ".running_mean"
    folded = {k: v.clone() for k, v in state.items()}
    weight = folded[conv_key].float()
    if weight.shape[1] == 1:
        return folded
    mean_rgb, std_rgb = input_statistics(model)
    std = torch.tensor(std_rgb).view(1, 3, 1, 1)
    mean = torch.tensor(mean_rgb).view(1, 3, 1, 1)
    folded[conv_key] = (GRAY_STD * sum_rgb_conv1(weight, std_rgb)).to(state[conv_key].dtype)
    offset = (weight * (GRAY_MEAN - mean) / std).sum(dim=(1, 2, 3))  # per output channel
    folded[norm_key] = (folded[norm_key].float() - offset).to(state[norm_key].dtype)
    return folded
