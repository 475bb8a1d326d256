"""ResNet-50 builders and weights loading: grey conv1 folding, checks on files, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18, resnet50

from data_schemas.training import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD
from data_schemas.files import sha256_file
import resnet50_by_hand as hand
from tasks.models import (
    as_feature_extractor,
    WeightsFileError,
    WeightsUnavailableError,
    build_resnet50,
    feature_extractor,
    fold_gray_normalisation,
    forward_flops_per_image,
    hub_checkpoint_dir,
    load_imagenet_state_dict,
    resolve_imagenet_weights,
    scratch_resnet50,
    sum_rgb_conv1,
    weights_file_name,
)


def _save_hashed(state: dict, directory: Path, stem: str = "resnet50") -> Path:
    """Save like torchvision names its files: <stem>-<first 8 hex of SHA-256>.pth."""
    tmp = directory / f"{stem}.tmp"
    torch.save(state, tmp)
    path = directory / f"{stem}-{sha256_file(tmp)[:8]}.pth"
    tmp.rename(path)
    return path


@pytest.fixture(scope="module")
def rgb_state():
    torch.manual_seed(123)
    model = resnet50(weights=None)
    state = model.state_dict()
    state["bn1.running_mean"] = torch.randn(64) * 0.1  # non-trivial statistics to exercise the fold
    state["bn1.running_var"] = torch.rand(64) + 0.5
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, rgb_state):
    return _save_hashed(rgb_state, tmp_path_factory.mktemp("weights"))


def test_scratch_model_shape_and_init():
    torch.manual_seed(0)
    model = scratch_resnet50(num_classes=2, dropout=0.3)
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    # zero-init of the last BN scale of every residual branch
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            assert torch.count_nonzero(block.bn3.weight) == 0
    assert isinstance(model.fc[0], torch.nn.Dropout) and model.fc[0].p == 0.3
    model.eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)


def test_sum_rgb_conv1_is_replicated_input():
    weight = torch.randn(8, 3, 7, 7)
    x = torch.rand(1, 1, 20, 20)
    replicated = torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), weight)
    summed = torch.nn.functional.conv2d(x, sum_rgb_conv1(weight))
    assert torch.allclose(replicated, summed, atol=1e-5)


def test_folded_grey_stem_equals_rgb_network_on_interior(rgb_state):
    rgb = resnet50(weights=None)
    rgb.load_state_dict(rgb_state)
    rgb.eval()
    grey = build_resnet50(weights=rgb_state).eval()
    g = torch.rand(2, 1, 48, 48)
    x_rgb = (g.repeat(1, 3, 1, 1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    z = (g - GRAY_MEAN) / GRAY_STD
    with torch.no_grad():
        a = rgb.relu(rgb.bn1(rgb.conv1(x_rgb)))
        b = grey.relu(grey.bn1(grey.conv1(z)))
    # output rows/cols 2..-2 see only real pixels (7x7 kernel, stride 2, padding 3)
    assert torch.allclose(a[:, :, 2:-2, 2:-2], b[:, :, 2:-2, 2:-2], atol=1e-4)
    assert (a - b).abs().max() < 1.0  # borders differ a little (padding value), documented


def test_pretrained_weights_really_change_the_model(weights_file, rgb_state):
    torch.manual_seed(0)
    scratch = build_resnet50()
    torch.manual_seed(0)
    pretrained = build_resnet50(weights=weights_file)
    key = "layer3.2.conv2.weight"
    assert torch.equal(pretrained.state_dict()[key], rgb_state[key])
    assert not torch.equal(scratch.state_dict()[key], rgb_state[key])
    folded = fold_gray_normalisation(rgb_state)
    assert torch.equal(pretrained.conv1.weight, folded["conv1.weight"])
    assert pretrained.fc[-1].weight.shape == (2, 2048)


def test_resolve_records_hash(weights_file):
    state, info = resolve_imagenet_weights(weights_file)
    assert info.hash_checked and info.sha256 == sha256_file(weights_file)
    assert not any(k.startswith("fc.") for k in state)


def test_missing_weights_give_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(WeightsUnavailableError) as info:
        load_imagenet_state_dict(None, allow_download=False)
    message = str(info.value)
    assert str(hub_checkpoint_dir()) in message and "--weights" in message and weights_file_name() in message
    assert message.count(". ") == 0 and "\n" not in message


def test_truncated_file_gives_clear_error(weights_file, tmp_path):
    data = weights_file.read_bytes()
    truncated = tmp_path / "resnet50-truncated.pth"  # no hash in the name: the unpickler must notice
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="not a readable PyTorch state dict"):
        load_imagenet_state_dict(truncated)
    hashed_name = tmp_path / weights_file.name  # torchvision-style name: the hash check notices first
    hashed_name.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="hash check"):
        load_imagenet_state_dict(hashed_name)


def test_wrong_model_file_gives_clear_error(tmp_path, rgb_state):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsFileError, match="not a torchvision ResNet-50 state dict"):
        load_imagenet_state_dict(path)
    bad = dict(rgb_state)
    bad["layer1.0.conv1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad-shape.pth"
    torch.save(bad, path)
    with pytest.raises(WeightsFileError, match="has shape"):
        load_imagenet_state_dict(path)
    path = tmp_path / "not-a-dict.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsFileError, match="does not hold a state dict"):
        load_imagenet_state_dict(path)


def test_torch_hub_cache_is_used_and_hash_checked(tmp_path, monkeypatch, rgb_state, weights_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = hub_checkpoint_dir()
    cache.mkdir(parents=True)
    # a file under torchvision's real name whose content does not match the name's hash
    os.symlink(weights_file, cache / weights_file_name())
    with pytest.raises(WeightsFileError, match="hash check"):
        load_imagenet_state_dict(None)


def test_wrapped_checkpoint_and_module_prefix(tmp_path, rgb_state):
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in rgb_state.items()}, "epoch": 3}, path)
    state = load_imagenet_state_dict(path)
    assert torch.equal(state["layer4.0.conv1.weight"], rgb_state["layer4.0.conv1.weight"])


def test_feature_extractor_is_frozen(rgb_state):
    model = feature_extractor(rgb_state)
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2048)


def test_flops_count_matches_the_architecture_by_hand():
    """One forward pass of the arms' ResNet-50 (1-channel stem, 2 classes) = every conv's
    2 x C_in x C_out x k x k x H_out x W_out + fc (tests/resnet50_by_hand.py): 8.02 GFLOPs at 224 px, the
    textbook 8.18 less two thirds of the RGB stem (2 x 2 x 64 x 49 x 112 x 112)."""
    flops = forward_flops_per_image(224)
    assert flops == hand.forward_flops(224, 1, 2) == 8_016_928_768
    assert hand.forward_flops(224, 3, 1000) - flops == 2 * 2 * 64 * 49 * 112 * 112 + 2 * 2048 * 998
    assert forward_flops_per_image(112) == hand.forward_flops(112, 1, 2)


def test_feature_extractor_of_a_built_model_drops_only_the_head():
    """as_feature_extractor keeps the backbone's weights, outputs the 2048 pooled features, trains nothing."""
    torch.manual_seed(0)
    model = build_resnet50()
    conv = model.layer2[0].conv2.weight.clone()
    features = as_feature_extractor(model)
    assert torch.equal(features.layer2[0].conv2.weight, conv) and not features.training
    assert not any(p.requires_grad for p in features.parameters())
    with torch.no_grad():
        assert features(torch.rand(2, 1, 32, 32)).shape == (2, 2048)
