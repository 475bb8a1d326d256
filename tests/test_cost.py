"""Cost stage: every figure against independent arithmetic, the device catalogue, cost.json, the flow and the CLI.

Expected values come from tests/resnet50_by_hand.py (ResNet-50 counted from its architecture table with
2 x C_in x C_out x k x k x H_out x W_out per conv), from devices.json figures written out here, and from a fixed
Calibration: never from the function under test. FLOP counts run on the meta device (shapes only), mostly at
64 px; no test calibrates this machine (benchmarks/cost.py measures that).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import resnet50_by_hand as hand

from data_schemas.arms import ARM_NAMES
from data_schemas.cost import COST_FILE, THIS_MACHINE, Calibration, CostReport, ModelCountsCache
from data_schemas.files import read_model_json
from reports.cost_tables import format_table, markdown_table
from tasks.cost import (
    calibration as cost_calibration,
    catalogue as cost_catalogue,
    estimate as cost_estimate,
    flops as cost_flops,
    memory as cost_memory,
)
from tasks.training.models import count_flops, forward_flops_per_image

DAY = 86_400.0
RATE = 50e9  # the fixed calibration's achieved training FLOP/s on this machine
WARMUP = 7.5  # the fixed calibration's first-step warm-up, seconds


@pytest.fixture(scope="module")
def imagenet_counts() -> cost_flops.PhaseCounts:
    """The one 224 px count: ResNet-50, 3 channels, 1000 classes, all layers trainable."""
    return cost_flops.count_phase("full", 224, 3, 1000)


def _calibration(image_size: int = 64, warmup: float = WARMUP) -> Calibration:
    """A fixed calibration: peak 200 GFLOP/s, achieved RATE, so this machine's effective rate is exactly RATE."""
    key, fields = cost_calibration._calibration_key(image_size, 1, cost_catalogue.this_machine_precision("bf16"))
    per_image = hand.full_training_flops(image_size, 1, 2)
    return Calibration(
        key=key, **fields, matmul_flops_per_second=200e9, train_batch_size=16, train_steps=3,
        train_images_per_second=RATE / per_image, train_flops_per_image=per_image, train_flops_per_second=RATE,
        utilisation=RATE / 200e9, warmup_seconds=warmup, seconds_taken=1.0, measured_at="2025-01-01T00:00:00+00:00",
    )


def _freeze(model, prefixes: tuple[str, ...]):
    """Freeze every parameter whose name starts with one of `prefixes` (e.g. ("conv1", "bn1", "layer1"))."""
    for name, parameter in model.named_parameters():
        if name.startswith(prefixes):
            parameter.requires_grad_(False)
    return model


def _this_machine(arm) -> object:
    return next(d for d in arm.devices if d.device == THIS_MACHINE)


# ============================================================================================ counts by hand


def test_stem_conv_flops_by_hand():
    """conv1 at 64 px, 1 channel: 7x7, stride 2 -> 32 x 32 outputs; 2 x 1 x 64 x 7 x 7 x 32 x 32 = 6,422,528."""
    model = cost_flops.phase_model("full", 1, device="meta")
    assert count_flops(model.conv1, 64, 1) == 2 * 1 * 64 * 7 * 7 * 32 * 32 == 6_422_528
    # grey input: the whole net differs from RGB by conv1 alone, 2 x (3 - 1) x 64 x 49 x 32 x 32
    whole_1 = cost_flops.count_phase("full", 64, 1).forward_flops_per_image
    whole_3 = cost_flops.count_phase("full", 64, 3).forward_flops_per_image
    assert whole_3 - whole_1 == 2 * 2 * 64 * 49 * 32 * 32


def test_every_phase_matches_the_architecture_counted_by_hand():
    """64 px, 1 channel, 2 classes: forward = all convs + fc; full training = 3F - conv1; head-only = F + fc's
    weight gradient; feature extraction = F - fc, no backward; parameters and buffers from the table."""
    size, ch, k = 64, 1, 2
    forward = hand.forward_flops(size, ch, k)
    full, head, features = (cost_flops.count_phase(p, size, ch, k) for p in ("full", "head", "features"))
    assert full.forward_flops_per_image == forward == 654_450_688
    assert full.train_flops_per_image == hand.full_training_flops(size, ch, k)
    assert head.train_flops_per_image == hand.head_only_training_flops(size, ch, k) == forward + 2 * 2048 * 2
    assert features.forward_flops_per_image == features.train_flops_per_image == forward - 2 * 2048 * 2
    assert full.params_total == full.params_trainable == hand.parameters(ch, k) == 23_505_858
    assert head.params_trainable == 2048 * 2 + 2 and features.params_trainable == 0
    assert full.buffers == hand.buffers() == 53_173


def test_resnet50_224x3_is_8_2_gflops_and_25_6m_parameters(imagenet_counts):
    """The textbook figures: 4.09 G multiply-adds = 8.18 GFLOPs forward, 25,557,032 parameters, training
    3 x 8.18 - 0.24 (conv1 input gradient not needed) = 24.30 GFLOPs."""
    assert imagenet_counts.forward_flops_per_image == hand.forward_flops(224, 3, 1000) == 8_178_368_512
    assert imagenet_counts.params_total == hand.parameters(3, 1000) == 25_557_032
    assert imagenet_counts.train_flops_per_image == hand.full_training_flops(224, 3, 1000) == 24_299_077_632


def test_one_flop_counter_for_training_and_cost():
    """tasks.training.models.forward_flops_per_image (training's timing.json) and the cost stage give the same count."""
    assert forward_flops_per_image(64) == cost_flops.count_phase("full", 64, 1).forward_flops_per_image
    assert forward_flops_per_image(96, 1, 2) == hand.forward_flops(96, 1, 2)


# ============================================================================================ other models


def _resnet18_convs(size: int, channels: int) -> list[hand.Conv]:
    """ResNet-18 by hand (He et al. 2016, Table 1): 7x7/2 stem with 64 outputs, 3x3/2 max-pool, four stages of two
    basic blocks (3x3 in->w at stride s, 3x3 w->w) of widths 64, 128, 256, 512 at strides 1, 2, 2, 2, with a 1x1/s
    projection on the first block of each stage whose width or stride changes; fc 512 -> classes."""
    stem = hand.stem(size, channels)
    out, h, c = [stem], hand.out_side(stem.h_out, 2), 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            h_out = hand.out_side(h, s)
            out += [hand.Conv(c, width, 3, h_out), hand.Conv(width, width, 3, h_out)]
            if block == 0 and (s != 1 or c != width):
                out.append(hand.Conv(c, width, 1, h_out, projection=True))
            c, h = width, h_out
    return out


def test_resnet18_stem_and_forward_flops_by_hand():
    """ResNet-18 at 64 px, 1 channel, 2 classes: stem 2 x 1 x 64 x 49 x 32 x 32 = 6,422,528; whole forward
    = stem + stage 1 (4 x 2 x 64 x 64 x 9 x 16 x 16) + three stages of 67,108,864 each + fc 2 x 512 x 2
    = 283,248,640; training = 3F - stem; the grey stem costs a third of the RGB one."""
    convs = _resnet18_convs(64, 1)
    by_hand = sum(conv.flops for conv in convs) + 2 * 512 * 2
    assert convs[0].flops == 6_422_528 and by_hand == 283_248_640
    model = cost_flops.phase_model("full", 1, device="meta", model="resnet18")
    assert count_flops(model.conv1, 64, 1) == convs[0].flops
    counts = cost_flops.count_phase("full", 64, 1, 2, "resnet18")
    assert counts.forward_flops_per_image == by_hand == forward_flops_per_image(64, model="resnet18")
    assert counts.train_flops_per_image == 3 * by_hand - convs[0].flops
    rgb = cost_flops.count_phase("full", 64, 3, 2, "resnet18").forward_flops_per_image
    assert rgb - by_hand == 2 * convs[0].flops
    assert (
        counts.params_total == sum(conv.weights for conv in convs) + 2 * sum(conv.c_out for conv in convs) + 512 * 2 + 2
    )


@pytest.mark.parametrize("model", ["resnet50", "resnet18", "mobilenet_v3_large"])
def test_every_model_at_224_matches_torchvision_published_multiply_adds(model):
    """Forward FLOPs of each torchvision model at 224 x 224 x 3, 1000 classes = 2 x the multiply-adds its weights
    enum publishes (meta '_ops', in G multiply-adds, 3 decimals: ResNet-50 4.089, ResNet-18 1.814, MobileNetV3-Large
    0.217), and the parameter count is the enum's num_params."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(model).IMAGENET1K_V1
    counts = cost_flops.count_phase("full", 224, 3, 1000, model)
    assert counts.forward_flops_per_image / 2e9 == pytest.approx(weights.meta["_ops"], abs=0.0015)
    assert counts.params_total == weights.meta["num_params"]


def test_depthwise_convolution_backward_is_counted_by_hand():
    """A depthwise 3x3 conv (64 channels, groups 64) at 16 x 16 after a 1x1 conv 1 -> 64: forward
    2 x 64 x 256 + 2 x 64 x 9 x 256 = 327,680; training adds the 1x1 weight gradient (32,768; the image needs no
    gradient) and the depthwise input and weight gradients (294,912 each) = 950,272. torch's own counter would count
    the depthwise weight gradient 64 times."""
    import torch

    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 64, 1, bias=False), torch.nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
    )
    assert count_flops(net, 16, 1) == 2 * 64 * 256 + 2 * 64 * 9 * 256 == 327_680
    assert count_flops(net, 16, 1, backward=True) == 327_680 + 2 * 64 * 256 + 2 * (2 * 64 * 9 * 256) == 950_272


def test_mobilenet_training_is_three_forwards_less_the_stem():
    """MobileNetV3-Large, 1 channel, 64 px: full training = 3F - stem (3x3/2 conv 1 -> 16: 2 x 16 x 9 x 32 x 32),
    as for the ResNets: every weight gradient and every input gradient but the stem's."""
    counts = cost_flops.count_phase("full", 64, 1, 2, "mobilenet_v3_large")
    stem = 2 * 1 * 16 * 9 * 32 * 32
    assert counts.train_flops_per_image == 3 * counts.forward_flops_per_image - stem


def test_arms_of_every_model_are_priced_by_their_own_model():
    """Mixed arms: each ArmCost names its model and is counted on it (ResNet-18 fine-tuning = n x epochs x (3F - stem);
    the MobileNetV3 probe fits 1280 features), the note says utilisation is ResNet-50's, and the tables name the
    models."""
    arms = ["scratch", "resnet18:imagenet", "mobilenet_v3_large:imagenet-linear"]
    inputs = cost_estimate.resolve_cost_inputs(
        n_images=10, image_size=64, epochs=2, arms=["resnet50:scratch", *arms[1:]]
    )
    assert inputs.arms == arms
    report = cost_estimate.build_cost_report(inputs)
    assert [(a.arm, a.model) for a in report.arms] == [
        ("scratch", "resnet50"),
        ("resnet18:imagenet", "resnet18"),
        ("mobilenet_v3_large:imagenet-linear", "mobilenet_v3_large"),
    ]
    resnet18 = report.arm("resnet18:imagenet")
    convs = _resnet18_convs(64, 1)
    forward = sum(conv.flops for conv in convs) + 2 * 512 * 2
    assert resnet18.flops_total == 2 * 10 * (3 * forward - convs[0].flops)
    assert "ResNet-18 from ImageNet weights" in resnet18.description
    mobile = report.arm("mobilenet_v3_large:imagenet-linear")
    assert mobile.params_trainable == 1280 + 1 and mobile.classifier_fit_flops == 100 * 4 * 10 * 1280
    assert (
        mobile.forward_flops_per_image
        == cost_flops.count_phase("features", 64, 1, 2, "mobilenet_v3_large").forward_flops_per_image
    )
    assert (
        mobile.forward_flops_per_image
        < resnet18.forward_flops_per_image
        < report.arm("scratch").forward_flops_per_image
    )
    assert mobile.memory.optimizer_bytes == 0 and mobile.memory.activations_bytes_per_image > 0
    assert any("ResNet-50's" in note for note in report.notes)
    assert report.arm("resnet50:scratch") == report.arms[0]
    with pytest.raises(KeyError):
        report.arm("vgg16:scratch")
    older = report.model_dump(mode="json")  # a cost.json written before arms named their model
    del older["arms"][0]["model"]
    assert CostReport.model_validate(older).arms[0].model == "resnet50"
    table, markdown = format_table(report), markdown_table(report)
    assert (
        "mobilenet_v3_large:imagenet-linear  MobileNetV3-Large" in table
        and "| resnet18:imagenet | ResNet-18 |" in markdown
    )


# ============================================================================================ freezing


def test_frozen_layer_computes_no_weight_gradient():
    """Freezing layer4 drops exactly its weight gradients (= its forward FLOPs); its input gradients stay."""
    model = cost_flops.phase_model("full", 1, device="meta")
    full = count_flops(model, 64, 1, backward=True)
    layer4 = hand.convs(64, 1)[-10:]  # 3 blocks: 3 convs each + the first block's projection
    _freeze(model, ("layer4",))
    assert full - count_flops(model, 64, 1, backward=True) == sum(conv.flops for conv in layer4)


def test_frozen_prefix_needs_no_backward_there():
    """Frozen stem + layer1 get neither weight nor input gradients: training saves 2 x their forward FLOPs, plus
    layer2's first input gradients (layer1's output needs none), minus nothing else."""
    model = cost_flops.phase_model("full", 1, device="meta")
    full = count_flops(model, 64, 1, backward=True)
    _freeze(model, ("conv1", "bn1", "layer1"))
    frozen = count_flops(model, 64, 1, backward=True)
    convs = hand.convs(64, 1)
    stem, layer1, layer2_inputs = convs[0], convs[1:11], (convs[11], convs[14])  # conv1 and projection read it
    saved = stem.flops + 2 * sum(c.flops for c in layer1) + sum(c.flops for c in layer2_inputs)
    assert full - frozen == saved


# ============================================================================================ arms


def test_scratch_arm_total_is_epochs_times_training_images_times_training_flops():
    """flops_total = epochs x n x (3F - conv1), priced on exactly the n training images it is given."""
    inputs = cost_estimate.resolve_cost_inputs(n_images=37, image_size=64, epochs=5, arms=["scratch"])
    arm = cost_estimate.estimate_arm("scratch", inputs, cost_catalogue.load_catalogue())
    per_image = hand.full_training_flops(64, 1, 2)
    assert arm.n_images == 37 and arm.flops_per_epoch == 37 * per_image
    assert arm.flops_total == 5 * 37 * per_image


def test_head_only_warmup_is_priced_separately():
    """imagenet, 10 epochs of which 3 head-only: 3 x n x (F + fc weight grad) + 7 x n x (3F - conv1); the scratch
    arm ignores the warm-up (it has no pretrained backbone to protect)."""
    inputs = cost_estimate.resolve_cost_inputs(n_images=100, image_size=64, epochs=10, head_warmup_epochs=3)
    catalogue = cost_catalogue.load_catalogue()
    imagenet = cost_estimate.estimate_arm("imagenet", inputs, catalogue)
    scratch = cost_estimate.estimate_arm("scratch", inputs, catalogue)
    head, full = hand.head_only_training_flops(64, 1, 2), hand.full_training_flops(64, 1, 2)
    assert imagenet.flops_total == 100 * (3 * head + 7 * full)
    assert imagenet.head_warmup_epochs == 3 and imagenet.head_phase_flops_per_image == head
    assert scratch.flops_total == 10 * 100 * full


def test_linear_arm_is_one_forward_pass_plus_a_small_fit():
    """imagenet-linear: n x (F - fc) + iterations x 4 x n x 2048 (binary: one weight vector); no epochs."""
    inputs = cost_estimate.resolve_cost_inputs(n_images=1500, image_size=64, epochs=100, arms=["imagenet-linear"])
    arm = cost_estimate.estimate_arm("imagenet-linear", inputs, cost_catalogue.load_catalogue())
    fit = 100 * 4 * 1500 * 2048
    assert arm.classifier_fit_flops == fit
    assert arm.flops_total == 1500 * (hand.forward_flops(64, 1, 2) - 2 * 2048 * 2) + fit
    assert arm.params_trainable == 2049 and arm.epochs_effective == 1
    assert arm.memory.gradients_bytes == 0 and arm.memory.optimizer_bytes == 0
    assert arm.memory.method.startswith("no-grad forward: peak of live tensors")  # not the training phase's method
    a100 = next(d for d in arm.devices if d.device == "a100")
    assert a100.peak_flops_per_second == 312e12 and a100.precision == "bf16"  # devices.json: 312 TFLOP/s bf16
    assert (
        cost_flops.classifier_params(2) == 2049
        and cost_flops.classifier_params(5) == 5 * 2048 + 5
        and cost_flops.classifier_params(3, dim=10) == 33
    )


# ============================================================================================ time


def test_this_machine_time_is_flops_over_the_calibrated_rate_plus_its_warmup():
    """this-machine: seconds = flops_total / achieved rate + the calibrated first-step warm-up (once per run);
    catalogue GPUs: flops_total / (peak x utilisation) with no warm-up."""
    inputs = cost_estimate.resolve_cost_inputs(n_images=64, image_size=64, epochs=3, arms=["scratch"])
    report = cost_estimate.build_cost_report(inputs, calibration=_calibration())
    arm = report.arm("scratch")
    total = 3 * 64 * hand.full_training_flops(64, 1, 2)
    mine = _this_machine(arm)
    assert mine.overhead_seconds == WARMUP
    assert mine.seconds == pytest.approx(total / RATE + WARMUP, rel=1e-12)
    m40 = next(d for d in arm.devices if d.device == "m40")
    assert m40.overhead_seconds == 0 and m40.seconds == pytest.approx(total / (7.0e12 * 0.35), rel=1e-12)


def test_estimate_for_the_epochs_actually_run():
    """A run stopped early is priced for the epochs it ran, head-only epochs at the head-only rate, warm-up once."""
    inputs = cost_estimate.resolve_cost_inputs(n_images=50, image_size=64, epochs=10, head_warmup_epochs=3)
    report = cost_estimate.build_cost_report(inputs, calibration=_calibration())
    head, full = 50 * hand.head_only_training_flops(64, 1, 2), 50 * hand.full_training_flops(64, 1, 2)
    scratch, imagenet, linear = (report.arm(a) for a in ARM_NAMES)
    assert cost_estimate.estimated_seconds_for(scratch, THIS_MACHINE, 4) == pytest.approx(
        4 * full / RATE + WARMUP, rel=1e-12
    )
    assert cost_estimate.estimated_seconds_for(scratch, THIS_MACHINE) == pytest.approx(
        10 * full / RATE + WARMUP, rel=1e-12
    )
    assert cost_estimate.estimated_seconds_for(imagenet, THIS_MACHINE, 2) == pytest.approx(
        2 * head / RATE + WARMUP, rel=1e-12
    )
    assert cost_estimate.estimated_seconds_for(imagenet, THIS_MACHINE, 5) == pytest.approx(
        (3 * head + 2 * full) / RATE + WARMUP, rel=1e-12
    )
    assert cost_estimate.estimated_seconds_for(linear, THIS_MACHINE, 7) == cost_estimate.estimated_seconds_for(
        linear, THIS_MACHINE
    )
    with pytest.raises(KeyError, match="no estimate for device"):
        cost_estimate.estimated_seconds_for(scratch, "tpu-v9", 1)


def test_imagenet_90_epochs_is_1e18_mac_and_about_two_weeks_on_m40(imagenet_counts):
    """1.28e6 images x 90 epochs x 24.30 GFLOPs = 2.80e18 FLOPs = 1.40e18 multiply-adds (the literature's
    "~10^18 single-precision operations"); at 7 TFLOP/s x 0.35: 2.80e18 / 2.45e12 = 1.14e6 s = 13.2 days
    (You et al. 2018: "14 days")."""
    total = 1.28e6 * 90 * hand.full_training_flops(224, 3, 1000)
    seconds = cost_catalogue.estimate_seconds(
        1.28e6 * 90 * imagenet_counts.train_flops_per_image, cost_catalogue.load_catalogue().get("m40"), "bf16"
    )
    assert seconds == pytest.approx(total / (7.0e12 * 0.35), rel=1e-12)
    assert 13.1 < seconds / DAY < 13.3


def test_1500_images_100_epochs_on_1080ti_is_13_minutes(imagenet_counts):
    """1,500 x 100 image-passes x 24.30 GFLOPs = 3.64e15 FLOPs / (11.3e12 x 0.40, bf16 falls back to fp32)
    = 806 s = 13.4 minutes."""
    total = 1500 * 100 * hand.full_training_flops(224, 3, 1000)
    seconds = cost_catalogue.estimate_seconds(
        1500 * 100 * imagenet_counts.train_flops_per_image, cost_catalogue.load_catalogue().get("gtx-1080-ti"), "bf16"
    )
    assert seconds == pytest.approx(total / (11.3e12 * 0.40), rel=1e-12)
    assert 800 < seconds < 812


# ============================================================================================ memory


def test_activation_memory_per_image_is_every_saved_tensor_counted_by_hand():
    """fp32, 64 px: input + conv outputs + ReLU outputs + max-pool output and indices + pooled features
    = 6,987,776 bytes per image (tests/resnet50_by_hand.py), measured exactly."""
    fixed, per_image = cost_memory.measure_activation_memory("full", 64, 1, "fp32")
    assert per_image == hand.fp32_saved_bytes_per_image(64, 1) == 6_987_776
    # batch-independent: each BatchNorm saves its running mean and variance and its batch mean and 1/std
    assert fixed == 4 * 4 * hand.batchnorm_channels()
    bf16_fixed, bf16_per_image = cost_memory.measure_activation_memory("full", 64, 1, "bf16")
    assert bf16_per_image < per_image  # bf16 autocast stores most activations in 2 bytes


def test_memory_breakdown_and_max_batch():
    """weights 4 B x (params + buffers), grads 4 B x trainable, Adam 8 B x trainable; activations fixed + batch x
    per image; max batch = floor((0.9 x memory - everything batch-independent) / per image)."""
    inputs = cost_estimate.resolve_cost_inputs(
        n_images=100, image_size=64, batch_size=8, device_memory_gb=4, precision="fp32"
    )
    m = cost_estimate.estimate_arm("scratch", inputs, cost_catalogue.load_catalogue()).memory
    params = hand.parameters(1, 2)
    per_image = hand.fp32_saved_bytes_per_image(64, 1)
    assert (m.weights_bytes, m.gradients_bytes, m.optimizer_bytes) == (
        4 * (params + hand.buffers()),
        4 * params,
        8 * params,
    )
    assert m.activations_bytes_per_image == per_image
    assert m.activations_bytes == m.activations_fixed_bytes + 8 * per_image
    assert m.total_bytes == 16 * params + 4 * hand.buffers() + m.activations_fixed_bytes + 8 * per_image
    arm = cost_estimate.estimate_arm("scratch", inputs, cost_catalogue.load_catalogue())
    fixed = 16 * params + 4 * hand.buffers() + m.activations_fixed_bytes
    assert arm.max_batch_for_given_memory == int((0.9 * 4e9 - fixed) // per_image)
    sgd = cost_estimate.estimate_arm(
        "scratch", inputs.model_copy(update={"optimizer": "sgd"}), cost_catalogue.load_catalogue()
    ).memory
    assert sgd.optimizer_bytes == 4 * params
    assert cost_memory.max_batch_size(1e6, 10**9, 10) == 0


def test_a_batch_exactly_at_a_devices_limit_fits_and_one_more_does_not():
    """max batch = floor((0.9 x memory - batch-independent bytes) / per image), recomputed here for the first
    catalogue device; a batch of exactly that size fits, one image more does not."""
    catalogue = cost_catalogue.load_catalogue()
    device = catalogue.devices[0]
    inputs = cost_estimate.resolve_cost_inputs(n_images=100, image_size=64, batch_size=8, precision="fp32")
    m = cost_estimate.estimate_arm("scratch", inputs, catalogue).memory
    fixed = m.weights_bytes + m.gradients_bytes + m.optimizer_bytes + m.activations_fixed_bytes
    limit = int((0.9 * device.memory_gb * 1e9 - fixed) // m.activations_bytes_per_image)
    assert 8 < limit < 65_536
    for batch, fits in ((limit, True), (limit + 1, False)):
        arm = cost_estimate.estimate_arm("scratch", inputs.model_copy(update={"batch_size": batch}), catalogue)
        estimate = next(d for d in arm.devices if d.device == device.name)
        assert (estimate.max_batch_size, estimate.batch_fits) == (limit, fits)
    assert ("max_batch = floor((0.9 x device memory - weights - gradients - optimizer - fixed) / per-image activations)"
            in arm.formulas)


# ============================================================================================ calibration


def test_calibration_arithmetic_from_timed_steps(monkeypatch):
    """4 timed steps of batch 16 in 2.0 s after a 3.0 s first step: 32 img/s, achieved = 32 x train FLOPs per
    image, utilisation = achieved / matmul peak, warm-up = 3.0 - 2.0 / 4 = 2.5 s."""
    monkeypatch.setattr(cost_calibration, "_matmul_rate", lambda dtype: 400e9)
    monkeypatch.setattr(
        cost_calibration, "_time_training_steps", lambda *a, **k: cost_calibration.StepTimes(3.0, 4, 2.0)
    )
    calibration = cost_calibration.calibrate_this_machine(64, 1, "bf16", batch_size=16)
    achieved = 32 * hand.full_training_flops(64, 1, 2)
    assert calibration.train_batch_size == 16 and calibration.train_images_per_second == 32
    assert calibration.train_flops_per_second == achieved
    assert calibration.utilisation == pytest.approx(achieved / 400e9, rel=1e-12)
    assert calibration.warmup_seconds == 2.5


def test_the_calibration_times_steps_in_the_memory_format_training_runs_at_its_precision(monkeypatch):
    """fp32 training on a CPU runs contiguous and bf16 autocast channels-last (tasks.common.runtime.planned_runtime),
    so the calibration's timed steps and the probe that checks it later use that format, and a calibration of one
    format is never taken for the other's (the cache key holds it)."""
    from types import SimpleNamespace

    from tasks.common.runtime import planned_runtime

    monkeypatch.setattr(cost_calibration, "_matmul_rate", lambda dtype: 400e9)
    monkeypatch.setattr(cost_calibration, "this_machine_precision", lambda requested: requested)  # both, on any CPU
    timed = []
    monkeypatch.setattr(cost_calibration, "_time_training_steps",
                        lambda *a, **k: timed.append(k["channels_last"]) or cost_calibration.StepTimes(3.0, 4, 2.0))
    keys = set()
    for precision in ("fp32", "bf16"):
        training = planned_runtime(SimpleNamespace(device="cpu", precision=precision, channels_last="auto"))
        calibration = cost_calibration.calibrate_this_machine(64, 1, precision, batch_size=16)
        assert calibration.channels_last is training.channels_last == timed[-1]
        cost_calibration.probe_images_per_second(calibration)
        assert timed[-1] is training.channels_last
        keys.add(calibration.key)
    assert timed == [False, False, True, True] and len(keys) == 2


def test_calibration_is_cached(tmp_path, monkeypatch):
    """The second call reads calibration.json instead of measuring."""
    monkeypatch.setenv("CTCOMPARE_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(cost_calibration, "calibrate_this_machine", lambda *a, **k: calls.append(a) or _calibration())
    first = cost_calibration.load_or_calibrate(64, 1, "bf16", 16)
    second = cost_calibration.load_or_calibrate(64, 1, "bf16", 16)
    assert len(calls) == 1 and first == second and (tmp_path / "calibration.json").is_file()


def test_calibration_records_the_load_and_the_spread_of_its_steps(monkeypatch):
    """Steps of 0.4, 0.5, 0.5 and 0.6 s: spread (0.6 - 0.4) / 0.5 = 40%; the load average at its start is kept."""
    monkeypatch.setattr(cost_calibration, "_matmul_rate", lambda dtype: 400e9)
    monkeypatch.setattr(cost_calibration, "load_average", lambda: 3.5)
    monkeypatch.setattr(cost_calibration, "_time_training_steps",
                        lambda *a, **k: cost_calibration.StepTimes(3.0, 4, 2.0, (0.4, 0.5, 0.5, 0.6)))
    calibration = cost_calibration.calibrate_this_machine(64, 1, "bf16", batch_size=16)
    assert calibration.load_average == 3.5 and calibration.cpus == os.cpu_count()
    assert calibration.step_spread == pytest.approx(0.4, rel=1e-12)
    said = cost_calibration.describe_calibration(calibration)
    assert f"load 3.5 on {os.cpu_count()} CPUs, step spread 40%" in said, said
    one_step = calibration.model_copy(update={"step_spread": None})
    assert "step spread not measured" in cost_calibration.describe_calibration(one_step)


def test_a_cached_calibration_is_checked_by_a_probe_and_measured_again_when_they_disagree(tmp_path, monkeypatch):
    """A calibration cached on a busy machine (half the rate) is replaced once a probe finds the rate 2x higher;
    a probe within 20% keeps it. Each answer says which calibration is used."""
    monkeypatch.setenv("CTCOMPARE_CACHE_DIR", str(tmp_path))
    busy = _calibration()
    quiet = busy.model_copy(update={"train_images_per_second": 2 * busy.train_images_per_second,
                                    "measured_at": "2025-01-02T00:00:00+00:00"})
    measured = [busy, quiet]
    monkeypatch.setattr(cost_calibration, "calibrate_this_machine", lambda *a, **k: measured.pop(0))
    first, said = cost_calibration.checked_calibration(64, 1, "bf16", 16)
    assert first == busy and said.startswith("Calibrated this machine now")

    monkeypatch.setattr(cost_calibration, "probe_images_per_second", lambda c: 1.1 * busy.train_images_per_second)
    kept, said = cost_calibration.checked_calibration(64, 1, "bf16", 16)
    assert kept == busy and len(measured) == 1 and "agrees within 10%" in said and busy.measured_at in said

    monkeypatch.setattr(cost_calibration, "probe_images_per_second", lambda c: 2.0 * busy.train_images_per_second)
    fresh, said = cost_calibration.checked_calibration(64, 1, "bf16", 16)
    assert fresh == quiet and not measured and said.startswith("Re-calibrated") and "disagreed by 100%" in said
    assert cost_calibration.load_or_calibrate(64, 1, "bf16", 16) == quiet  # the cache now holds the new one


def test_counts_and_activation_bytes_are_kept_on_disk_and_counted_again_when_the_code_changes(tmp_path, monkeypatch):
    """A later process reads model_counts.json instead of building a model; another counting code counts again."""
    monkeypatch.setenv("CTCOMPARE_CACHE_DIR", str(tmp_path))
    cost_flops.count_phase.cache_clear()
    cost_memory.measure_activation_memory.cache_clear()
    counts = cost_flops.count_phase("full", 32, 1, 2, "resnet18")
    memory = cost_memory.measure_activation_memory("full", 32, 1, "fp32", 2, "resnet18")
    stored = read_model_json(tmp_path / "model_counts.json", ModelCountsCache)
    assert list(stored.phase_counts.values()) == [counts] and list(stored.activation_bytes.values()) == [memory]
    assert counts.feature_dim == 512 and counts.forward_flops_per_image > 0 and memory[1] > 0

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    cost_flops.count_phase.cache_clear()  # as a new process: only the file remembers
    cost_memory.measure_activation_memory.cache_clear()
    monkeypatch.setattr(cost_flops, "phase_model", no_model)
    monkeypatch.setattr(cost_memory, "phase_model", no_model)
    assert cost_flops.count_phase("full", 32, 1, 2, "resnet18") == counts
    assert cost_memory.measure_activation_memory("full", 32, 1, "fp32", 2, "resnet18") == memory

    cost_flops.count_phase.cache_clear()
    monkeypatch.setattr(cost_flops, "counting_code_version", lambda: "another version of the counting code")
    with pytest.raises(AssertionError, match="a model was built"):
        cost_flops.count_phase("full", 32, 1, 2, "resnet18")
    cost_flops.count_phase.cache_clear()
    cost_memory.measure_activation_memory.cache_clear()


# ============================================================================================ catalogue


def test_catalogue_has_required_devices_with_public_figures():
    cat = cost_catalogue.load_catalogue()
    names = {d.name for d in cat.devices}
    assert {"m40", "gtx-1080-ti", "v100", "a100", "h100", "h200", "this-machine"} <= names
    assert cat.get("m40").rates["fp32"].peak_tflops == 7.0
    assert cat.get("gtx-1080-ti").rates["fp32"].peak_tflops == 11.3 and cat.get("gtx-1080-ti").memory_gb == 11
    assert cat.get("v100").rates["fp16"].peak_tflops == 125
    assert cat.get("a100").rates["bf16"].peak_tflops == 312 and cat.get("a100").rates["tf32"].peak_tflops == 156
    assert cat.get("h100").rates["bf16"].peak_tflops == 989 and cat.get("h100").rates["tf32"].peak_tflops == 495
    assert cat.get("h200").rates == cat.get("h100").rates and cat.get("h200").memory_gb == 141
    # no bf16 on Maxwell/Pascal: falls back to fp32; Volta falls back to fp16 tensor cores
    assert cost_catalogue.resolve_precision(cat.get("m40"), "bf16") == "fp32"
    assert cost_catalogue.resolve_precision(cat.get("v100"), "bf16") == "fp16"
    assert cost_catalogue.resolve_precision(cat.get("a100"), "tf32") == "tf32"


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: d["devices"][0]["rates"]["fp32"].update(utilisation=1.5), "utilisation"),
        (lambda d: d["devices"][1]["rates"].pop("fp32"), "fp32"),
        (lambda d: d["devices"][2].update(name="m40"), "unique"),
        (lambda d: d["devices"][3].update(memory_gb=-1), "memory_gb"),
    ],
    ids=["utilisation>1", "no-fp32", "duplicate-name", "negative-memory"],
)
def test_broken_catalogue_entry_raises_clear_error(tmp_path, breakage, message):
    data = json.loads(cost_catalogue.default_catalogue_path().read_text())
    breakage(data)
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as info:
        cost_catalogue.load_catalogue(path)
    assert str(path) in str(info.value)


# ============================================================================================ cost.json, tables


def test_cost_json_round_trip_and_an_older_file_is_recomputed(tmp_path):
    inputs = cost_estimate.resolve_cost_inputs(
        n_images=200, image_size=64, epochs=4, arms=["scratch", "imagenet-linear"]
    )
    report = cost_estimate.build_cost_report(inputs)
    path = cost_estimate.write_cost_report(tmp_path, report)
    assert read_model_json(path, CostReport) == report
    assert cost_estimate.existing_report(tmp_path, report.config_hash) == report
    older = json.loads(path.read_text())
    older["schema_version"] = "1.0"
    older["arms"][0]["actual"] = None
    path.write_text(json.dumps(older))
    assert cost_estimate.existing_report(tmp_path, report.config_hash) is None


def test_tables_show_every_arm_device_and_duration():
    """The terminal table and the artifact name each arm and device; durations go through format_duration."""
    inputs = cost_estimate.resolve_cost_inputs(
        n_images=64, image_size=64, epochs=3, arms=["scratch", "imagenet"], device_memory_gb=8
    )
    report = cost_estimate.build_cost_report(inputs, calibration=_calibration())
    seconds = _this_machine(report.arm("scratch")).seconds
    total = 3 * 64 * hand.full_training_flops(64, 1, 2) / RATE + WARMUP
    minutes = f"{total / 60:.1f} min" if total >= 120 else f"{total:.0f} s"
    assert seconds == pytest.approx(total)
    table, markdown = format_table(report), markdown_table(report)
    assert "V100" in table and "1080 Ti" in table and "max batch in 8 GB: scratch" in table
    assert minutes in table and minutes in markdown
    assert "| scratch | ResNet-50 | 23.5 M (23.5 M) |" in markdown and "Tesla M40" in markdown
    assert "first-step warm-up 8 s" in markdown


# ============================================================================================ flow and CLI


def test_flow_writes_cost_json_artifact_and_skips_same_inputs(tmp_path):
    from prefect.artifacts import Artifact

    from flows.cost import ARTIFACT_KEY, cost_flow

    inputs = cost_estimate.resolve_cost_inputs(n_images=100, image_size=64, epochs=2)
    first = cost_flow(inputs=inputs, out_dir=tmp_path, calibrate=False)
    assert (tmp_path / COST_FILE).is_file() and [a.arm for a in first.arms] == list(ARM_NAMES)
    assert first.arm("scratch").flops_total == 2 * 100 * hand.full_training_flops(64, 1, 2)
    second = cost_flow(inputs=inputs, out_dir=tmp_path, calibrate=False)
    assert second.created_at == first.created_at  # reused, not recomputed
    artifact = Artifact.get(ARTIFACT_KEY)
    assert artifact is not None and "scratch" in artifact.data
    with pytest.raises(TypeError):
        cost_flow(inputs, tmp_path)  # keyword-only: the flow's callers name what they pass


def _cli(argv: list[str]) -> int:
    from flows.cli import main

    return main(argv)


def test_cli_json_output_parses(tmp_path, capsys):
    rc = _cli(["cost", "--images", "150", "--size", "64", "--epochs", "2", "--arms", "scratch,imagenet",
               "--no-calibrate", "--json", "--out", str(tmp_path)])
    assert rc == 0
    report = CostReport.model_validate(json.loads(capsys.readouterr().out))
    assert [a.arm for a in report.arms] == ["scratch", "imagenet"] and report.inputs.n_images == 150
    assert report.arm("scratch").flops_total == 2 * 150 * hand.full_training_flops(64, 1, 2)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--images", "10", "--size", "0"], "--size must be between 32 and 2048"),
        (["--images", "10", "--arms", "scratch", "transfer"], "choose from scratch, imagenet, imagenet-linear"),
        (["--images", "10", "--arms", "vgg16:scratch"], "MODEL one of resnet50, resnet18, mobilenet_v3_large"),
        (["--images", "10", "--arms", "scratch", "resnet50:scratch"], "each arm may be listed once"),
        (["--images", "0"], "--images must be at least 1"),
        (["--size", "64"], "give --dataset DATASET_DIR"),
        (["--images", "10", "--epochs", "2", "--head-warmup-epochs", "3"], "cannot exceed epochs"),
    ],
    ids=["size-0", "unknown-arm", "unknown-model", "same-arm-twice", "no-images", "no-source", "warmup>epochs"],
)
def test_bad_argument_exits_2_with_one_sentence(tmp_path, capsys, argv, fragment):
    rc = _cli(["cost", *argv, "--no-calibrate", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and err.startswith("ctcompare cost: ")
    assert err.strip().count("\n") == 0
    assert not (tmp_path / COST_FILE).exists()


def test_out_that_is_a_file_is_refused_before_work(tmp_path, capsys):
    out = tmp_path / "not-a-folder"
    out.write_text("x")
    rc = _cli(["cost", "--images", "10", "--size", "64", "--no-calibrate", "--out", str(out)])
    assert rc == 2 and "is not a folder" in capsys.readouterr().err


def test_cost_from_dataset_folder_prices_its_labelled_images(tmp_path, monkeypatch):
    """--dataset reads dataset.json: labelled image count (40 - 10 unlabelled), image size, classes."""
    from data_schemas.dataset import DatasetCard

    card = {"n_images": 40, "n_unlabeled_images": 10, "image_size": 96, "channels": 1,
            "label_distribution": {"a": 10, "b": 10, "c": 10}, "content_hash": "abc"}
    monkeypatch.setattr(cost_estimate, "read_model_json", lambda path, model: DatasetCard.model_construct(**card))
    (tmp_path / "dataset.json").write_text("{}")
    inputs = cost_estimate.resolve_cost_inputs(dataset=tmp_path)
    assert (inputs.n_images, inputs.image_size, inputs.num_classes, inputs.dataset_content_hash) == (30, 96, 3, "abc")
    assert cost_estimate.resolve_cost_inputs(dataset=tmp_path, image_size=64).image_size == 64
    with pytest.raises(ValueError, match="unknown cost setting 'size'"):
        cost_estimate.resolve_cost_inputs(dataset=tmp_path, size=64)
    with pytest.raises(ValueError, match="dataset.json is missing"):
        cost_estimate.resolve_cost_inputs(dataset=Path(tmp_path / "nowhere"))


# ============================================================================================ input errors and timing


@pytest.mark.parametrize(
    "settings, sentence",
    [
        ({"image_size": 16}, "--size must be between 32 and 2048 (got 16)."),
        ({"image_size": 4096}, "--size must be at most 2048 (got 4096)."),
        ({"channels": 0}, "--channels must be between 1 and 3 (got 0)."),
        ({"num_classes": 1}, "--num-classes must be at least 2 (got 1)."),
        ({"device_memory_gb": 0}, "--device-memory-gb must be greater than 0.0 (got 0)."),
        ({"head_warmup_epochs": 5, "epochs": 2}, "head_warmup_epochs (5) cannot exceed epochs (2)."),
        ({"batch_size": "many"}, "--batch-size: Input should be a valid integer, unable to parse string as an integer "
                                 "(got 'many')."),
        ({"optimizer": "lion"}, "--optimizer must be one of 'adam' or 'sgd' (got 'lion')."),
    ],
    ids=["below-range", "above-range", "channels", "at-least", "greater-than", "model-rule", "not-a-number", "choice"],
)
def test_bad_cost_input_is_one_sentence_naming_the_flag(settings, sentence):
    with pytest.raises(ValueError) as caught:
        cost_estimate.resolve_cost_inputs(n_images=10, **settings)
    assert str(caught.value) == sentence


def test_bad_image_count_and_unknown_setting_are_one_sentence():
    with pytest.raises(ValueError) as caught:
        cost_estimate.resolve_cost_inputs(n_images=0)
    assert str(caught.value) == "--images must be at least 1 (got 0)."
    with pytest.raises(ValueError) as caught:
        cost_estimate.resolve_cost_inputs(dataset=Path("cohort"), n_images=10)
    assert str(caught.value) == "give either --dataset DATASET_DIR or --images N, not both."
    with pytest.raises(ValueError, match=r"^unknown cost setting 'epoch'; valid settings are arms, batch_size, "
                                         r"channels, "):
        cost_estimate.resolve_cost_inputs(n_images=10, epoch=3)
    assert cost_estimate._field_bounds("image_size") == (32, 2048) and cost_estimate._field_bounds("n_images") == (
        1,
        None,
    )
    assert cost_estimate._field_bounds("device_memory_gb") == (None, None)  # gt, not ge


def test_timed_training_steps_stop_after_three_or_at_the_deadline(monkeypatch):
    """At least 3 timed steps when time allows (after 2 untimed warm-up steps); 1 when the deadline has passed.
    The loop's logic on a tiny network (ResNet-50's steps are benchmarks/cost.py's business)."""
    import time

    import torch

    built, formats = [], set()

    class Tiny(torch.nn.Sequential):
        def forward(self, x):
            formats.add(x.stride(1) == 1)  # channels-last: neighbouring channels are adjacent (one channel here)
            return super().forward(x)

    def tiny(phase, channels, **_):
        built.append((phase, channels))
        return Tiny(torch.nn.Conv2d(channels, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    monkeypatch.setattr(cost_calibration, "phase_model", tiny)

    enough = cost_calibration._time_training_steps(
        32, 1, batch=2, autocast_on=False, channels_last=False, deadline=time.perf_counter() + 60, min_timed_s=0.0
    )
    assert enough.steps == 3 and enough.timed_seconds > 0 and enough.first_step_seconds > 0
    assert formats == {False}  # the steps ran in the memory format asked for
    late = cost_calibration._time_training_steps(
        32, 1, batch=2, autocast_on=False, channels_last=True, deadline=time.perf_counter() - 1, min_timed_s=0.0
    )
    assert late.steps == 1 and late.timed_seconds > 0
    assert formats == {False, True}
    assert built == [("full", 1), ("full", 1)]  # the full model is timed (every layer trains)
    rate = cost_calibration._matmul_rate(torch.float32, n=64, seconds=0.01)
    assert 0 < rate < float("inf")


@pytest.mark.parametrize("first_step, warmup", [(0.6, 0.1), (0.2, 0.0)], ids=["small", "clipped-at-0"])
def test_calibrated_warmup_is_first_step_minus_a_timed_step_never_negative(monkeypatch, first_step, warmup):
    monkeypatch.setattr(cost_calibration, "_matmul_rate", lambda dtype: 400e9)
    monkeypatch.setattr(
        cost_calibration, "_time_training_steps", lambda *a, **k: cost_calibration.StepTimes(first_step, 4, 2.0)
    )
    assert cost_calibration.calibrate_this_machine(64, 1, "bf16", batch_size=16).warmup_seconds == pytest.approx(
        warmup, abs=1e-12
    )


def test_calibration_cache_is_keyed_by_size_and_precision(tmp_path, monkeypatch):
    """One measurement per (size, channels, precision this machine runs); refresh or a corrupt cache re-measures."""
    import tasks.common.runtime

    monkeypatch.setattr(tasks.common.runtime, "cpu_has_fast_bf16", lambda: True)
    calls = []
    monkeypatch.setattr(cost_calibration, "calibrate_this_machine", lambda *a, **k: calls.append(a) or _calibration())
    cache = tmp_path / "calibration.json"
    cost_calibration.load_or_calibrate(64, 1, "bf16", 16, cache_path=cache)
    cost_calibration.load_or_calibrate(64, 1, "fp16", 16, cache_path=cache)  # runs as bf16 too: the same entry
    cost_calibration.load_or_calibrate(32, 1, "bf16", 8, cache_path=cache)
    cost_calibration.load_or_calibrate(64, 1, "fp32", 16, cache_path=cache)
    cost_calibration.load_or_calibrate(64, 3, "bf16", 16, cache_path=cache)
    assert calls == [(64, 1, "bf16", 16), (32, 1, "bf16", 8), (64, 1, "fp32", 16), (64, 3, "bf16", 16)]
    cost_calibration.load_or_calibrate(64, 1, "bf16", 16, cache_path=cache, refresh=True)
    cache.write_text("{not json")
    cost_calibration.load_or_calibrate(64, 1, "bf16", 16, cache_path=cache)
    assert len(calls) == 6 and cache.is_file()
    assert (
        cost_catalogue.this_machine_precision("fp16") == "bf16"
        and cost_catalogue.this_machine_precision("tf32") == "fp32"
    )
    monkeypatch.setattr(tasks.common.runtime, "cpu_has_fast_bf16", lambda: False)
    assert cost_catalogue.this_machine_precision("bf16") == "fp32"


def test_cost_inputs_from_a_dataset_card(tmp_path):
    """Images = labelled images (all when none is labelled), size, channels and classes from dataset.json."""
    from report_fixtures import make_example_card

    from data_schemas.files import write_model_json

    card = make_example_card(content_hash="f" * 64).model_copy(
        update={
            "n_images": 1500,
            "n_unlabeled_images": 60,
            "image_size": 96,
            "label_distribution": {"a": 500, "b": 500, "c": 440},
        }
    )
    write_model_json(tmp_path / "dataset.json", card)
    inputs = cost_estimate.resolve_cost_inputs(dataset=tmp_path, epochs=3)
    assert (inputs.n_images, inputs.image_size, inputs.channels, inputs.num_classes, inputs.dataset_content_hash) == (
        1440, 96, card.channels, 3, "f" * 64)
    # a setting overrides the card
    assert cost_estimate.resolve_cost_inputs(dataset=tmp_path, image_size=64).image_size == 64
    write_model_json(
        tmp_path / "dataset.json", card.model_copy(update={"n_unlabeled_images": 1500, "label_distribution": {}})
    )
    unlabelled = cost_estimate.resolve_cost_inputs(dataset=tmp_path)
    assert (unlabelled.n_images, unlabelled.num_classes) == (1500, 2)
    (tmp_path / "dataset.json").write_text('{"n_images": "many"}')
    with pytest.raises(ValueError, match=r"dataset.json is not a valid dataset card \("):
        cost_estimate.resolve_cost_inputs(dataset=tmp_path)
    with pytest.raises(ValueError) as caught:
        cost_estimate.resolve_cost_inputs(dataset=tmp_path / "nowhere")
    assert str(caught.value) == (f"{tmp_path / 'nowhere'} is not a ctcompare dataset folder: dataset.json is missing "
                                 "(run 'ctcompare ingest').")
