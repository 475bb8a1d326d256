"""Model builders and weights loading for every supported model: grey stem, head split, probe depths, file checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import resnet50_by_hand as hand
import torch
from torchvision.models import resnet18, resnet50

from data_schemas.files import sha256_file
from data_schemas.training import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD
from tasks.training.models import (
    as_feature_extractor,
    build_resnet50,
    feature_extractor,
    forward_flops_per_image,
    scratch_resnet50,
)
from tasks.training.weights import (
    WeightsFileError,
    WeightsUnavailableError,
    fold_gray_normalisation,
    hub_checkpoint_dir,
    load_imagenet_state_dict,
    resolve_imagenet_weights,
    sum_rgb_conv1,
    weights_file_name,
)
from tests.weights_files import save_hashed


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
    return save_hashed(rgb_state, tmp_path_factory.mktemp("weights"))


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
    x_rgb = (g.repeat(1, 3, 1, 1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
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


# ============================================================================ every supported model (arms)

import math  # noqa: E402

import numpy as np  # noqa: E402
from torchvision.models import get_model  # noqa: E402

from data_schemas.arms import ARM_MODES, MODEL_NAMES, ArmSpec, canonical_arm_name, parse_arm, parse_arms  # noqa: E402
from tasks.training.model_defs import model_def  # noqa: E402
from tasks.training.models import (  # noqa: E402
    build_arm_model,
    build_model,
    count_flops,
    depth_widths,
    feature_dim,
    is_head_parameter,
    multi_depth_features,
    probe_depths,
    resize_images,
    split_head_backbone,
)
from tasks.training.weights import input_statistics, unavailable_message  # noqa: E402


def test_arm_names_keep_the_legacy_resnet50_names():
    """Bare modes mean ResNet-50 and stay canonical; other models are 'model:mode'; case and spaces tolerated."""
    assert parse_arm("scratch") == ArmSpec(model="resnet50", mode="scratch")
    assert canonical_arm_name("resnet50:imagenet-linear") == "imagenet-linear"
    assert parse_arm(" ResNet18:ImageNet ").name == "resnet18:imagenet"
    assert parse_arm("mobilenet_v3_large:imagenet-linear").pretrained
    assert not parse_arm("resnet18:scratch").pretrained


@pytest.mark.parametrize("bad", ["vgg16:scratch", "resnet18:finetune", "resnet18:", "", "resnet50:imagenet:x"])
def test_bad_arm_name_lists_every_model_and_mode(bad):
    with pytest.raises(ValueError) as info:
        parse_arm(bad)
    message = str(info.value)
    assert all(name in message for name in MODEL_NAMES + ARM_MODES) and "\n" not in message


def test_an_arm_listed_twice_in_two_spellings_is_refused():
    assert [s.name for s in parse_arms(["scratch", "resnet18:scratch"])] == ["scratch", "resnet18:scratch"]
    with pytest.raises(ValueError, match="repeated: scratch"):
        parse_arms(["scratch", "resnet50:scratch"])


def _rgb_state(model: str) -> dict[str, torch.Tensor]:
    """torchvision's RGB `model` with random weights and non-trivial stem BatchNorm statistics."""
    torch.manual_seed(11)
    state = get_model(model, weights=None).state_dict()
    norm = model_def(model).stem_norm
    channels = state[f"{norm}.running_mean"].shape[0]
    state[f"{norm}.running_mean"] = torch.randn(channels) * 0.1
    state[f"{norm}.running_var"] = torch.rand(channels) + 0.5
    return state


@pytest.fixture(scope="module", params=MODEL_NAMES)
def rgb_file(request, tmp_path_factory) -> tuple[str, dict[str, torch.Tensor], Path]:
    """(model, its RGB state dict, that state saved under a torchvision-style hashed name), once per model."""
    state = _rgb_state(request.param)
    return request.param, state, save_hashed(state, tmp_path_factory.mktemp("rgb"), stem=request.param)


def _stem(net: torch.nn.Module, model: str, x: torch.Tensor) -> torch.Tensor:
    """First conv, its BatchNorm and a ReLU (the activation is monotone: equality before it is equality after)."""
    definition = model_def(model)
    return torch.relu(net.get_submodule(definition.stem_norm)(net.get_submodule(definition.stem)(x)))


def test_grey_stem_equals_rgb_network_on_replicated_input(rgb_file):
    """The 1-channel net built from a torchvision-format RGB weights file computes, on every output position whose
    window lies inside the image, what the RGB net computes on the grey image replicated and normalised per
    channel with the weights enum's mean/std; and its first conv costs a third of the RGB one."""
    model, state, path = rgb_file
    rgb = get_model(model, weights=None)
    rgb.load_state_dict(state)
    grey = build_model(model, weights=path).eval()
    rgb.eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in input_statistics(model))
    g = torch.rand(2, 1, 40, 40)
    with torch.no_grad():
        a = _stem(rgb, model, (g.repeat(1, 3, 1, 1) - mean) / std)
        b = _stem(grey, model, (g - GRAY_MEAN) / GRAY_STD)
    conv = grey.get_submodule(model_def(model).stem)
    m = math.ceil(conv.padding[0] / conv.stride[0])  # first output index whose window has no padding
    assert torch.allclose(a[:, :, m:-m, m:-m], b[:, :, m:-m, m:-m], atol=1e-4)
    assert (a - b).abs().max() < 1.0  # the padded border differs a little (documented)
    rgb_conv = rgb.get_submodule(model_def(model).stem)
    assert 3 * count_flops(conv, 40, 1) == count_flops(rgb_conv, 40, 3) > 0


def test_pretrained_weights_load_into_every_layer_but_the_head(rgb_file):
    """Every backbone tensor but the folded stem comes from the file; the head is new, sized for the classes."""
    model, state, path = rgb_file
    grey = build_model(model, num_classes=3, dropout=0.25, weights=path)
    definition = model_def(model)
    folded = {definition.stem + ".weight", definition.stem_norm + ".running_mean"}
    loaded = grey.state_dict()
    for key, value in state.items():
        if not key.startswith(definition.head + ".") and key not in folded:
            assert torch.equal(loaded[key], value), key
    head = grey.get_submodule(definition.head)
    assert isinstance(head[0], torch.nn.Dropout) and head[0].p == 0.25
    assert head[-1].weight.shape == (3, feature_dim(model))


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_head_and_backbone_split(model):
    """The head is exactly the new Linear (warm-up trains it alone); everything else is the backbone."""
    net = build_model(model, num_classes=2)
    head, backbone = split_head_backbone(net, model)
    assert sum(p.numel() for _, p in head) == feature_dim(model) * 2 + 2
    assert len(head) + len(backbone) == len(list(net.parameters()))
    assert not any(is_head_parameter(name, model) for name, _ in backbone)
    assert model_def(model).stem + ".weight" in {name for name, _ in backbone}


def test_arm_models_from_a_weights_file(rgb_file):
    """scratch is random, imagenet carries the file's weights and trains, imagenet-linear is frozen features."""
    model, _, path = rgb_file
    backbone, info = resolve_imagenet_weights(path, model=model)
    assert info.hash_checked
    x = torch.rand(2, 1, 32, 32)
    tuned = build_arm_model(f"{model}:imagenet", dropout=0.1, backbone=backbone)
    assert all(p.requires_grad for p in tuned.parameters()) and tuned.eval()(x).shape == (2, 2)
    linear = build_arm_model(f"{model}:imagenet-linear", backbone=backbone)
    assert not any(p.requires_grad for p in linear.parameters()) and not linear.training
    with torch.no_grad():
        assert linear(x).shape == (2, feature_dim(model))
    assert build_arm_model(f"{model}:scratch").eval()(x).shape == (2, 2)
    with pytest.raises(ValueError, match="resolve_imagenet_weights"):
        build_arm_model(f"{model}:imagenet")


def test_a_file_of_another_model_is_refused_naming_the_expected_model(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsFileError, match="not a torchvision MobileNetV3-Large state dict"):
        load_imagenet_state_dict(path, model="mobilenet_v3_large")
    assert "mobilenet_v3_large-" in unavailable_message("mobilenet_v3_large")
    with pytest.raises(ValueError, match="supported models are resnet50, resnet18, mobilenet_v3_large"):
        build_model("vgg16")


@pytest.mark.parametrize(
    ("model", "widths"),
    [
        ("resnet50", {"layer2": 512, "layer3": 1024, "layer4": 2048}),
        ("resnet18", {"layer2": 128, "layer3": 256, "layer4": 512}),
        ("mobilenet_v3_large", {"features.6": 40, "features.12": 112, "features.16": 960}),
    ],
)
def test_three_depths_in_one_forward_pass(model, widths):
    """Three probe depths give three pooled feature matrices of the stages' widths from ONE pass (the stem runs
    once); the deepest ResNet depth is exactly the pooled features the head reads."""
    torch.manual_seed(0)
    net = build_model(model).eval()
    calls = []
    net.get_submodule(model_def(model).stem).register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        features = multi_depth_features(net, x, probe_depths(model))
    assert len(calls) == 1 and list(features) == list(widths) == list(probe_depths(model))
    assert {d: tuple(f.shape) for d, f in features.items()} == {d: (3, w) for d, w in widths.items()}
    assert depth_widths(model) == widths
    if model.startswith("resnet"):
        with torch.no_grad():
            top = as_feature_extractor(net)(x)
        assert torch.allclose(features["layer4"], top, atol=1e-6)
    with pytest.raises(ValueError, match="unknown depth 'layer9'"):
        multi_depth_features(net, x, ["layer9"])


def test_resize_is_antialiased_bicubic_and_stays_in_range():
    """Shape and range: a constant image stays constant, a sharp edge does not overshoot [0, 1] (the cubic
    kernel's negative lobes are clamped), the mean is kept, and an image at the size comes back untouched."""
    flat = torch.full((1, 1, 64, 64), 0.3)
    assert torch.allclose(resize_images(flat, 16), torch.full((1, 1, 16, 16), 0.3), atol=1e-6)
    edge = torch.zeros(2, 1, 64, 64)
    edge[..., 32:] = 1.0
    small = resize_images(edge, 28)
    assert small.shape == (2, 1, 28, 28) and small.min() >= 0 and small.max() <= 1
    unclamped = torch.nn.functional.interpolate(edge, size=(28, 28), mode="bicubic", antialias=True)
    assert unclamped.max() > 1  # the clamp is needed
    assert abs(float(small.mean()) - 0.5) < 0.02
    assert resize_images(edge, 64) is edge


def test_probe_extraction_in_batches_gives_every_depth_and_the_top_features():
    """tasks.training.linear_probe: three depths over 5 images in batches of 2 (one pass per batch) equal one whole
    pass;
    the deepest equals the single-depth extraction of the same frozen ResNet-18 (its head is Identity)."""
    from tasks.training.augment import normalise
    from tasks.training.linear_probe import extract_features, extract_multi_depth_features

    torch.manual_seed(3)
    net = as_feature_extractor(build_model("resnet18"))
    images = torch.rand(5, 1, 48, 48)
    cpu = torch.device("cpu")
    depths = probe_depths("resnet18")
    batched = extract_multi_depth_features(net, images, depths, batch_size=2, device=cpu)
    with torch.no_grad():
        whole = multi_depth_features(net, normalise(images), depths)
    assert {d: f.shape for d, f in batched.items()} == {"layer2": (5, 128), "layer3": (5, 256), "layer4": (5, 512)}
    for depth in depths:
        assert batched[depth].dtype == np.float32 and np.allclose(batched[depth], whole[depth].numpy(), atol=1e-5)
    top = extract_features(net, images, 2, cpu)
    assert top.shape == (5, 512) and np.allclose(top, batched["layer4"], atol=1e-5)
