"""Cost stage: FLOP counts of the real model, freezing, the device catalogue, the classic figures, cost.json, CLI.

FLOP convention throughout: torch's FlopCounterMode, 2 FLOPs per multiply-add (MAC). ResNet-50 at 224x224x3 is
~4.1 G MAC = ~8.2 GFLOPs forward. Counts run on the meta device (shapes only) and mostly at 64 px to stay fast;
exactly one count is made at 224 px. No test calibrates this machine (calibration is measured by
benchmarks/cost.py; here it is replaced by a fixed Calibration).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from data_schemas.cost import (
    ARM_NAMES,
    COST_FILE,
    ActualCost,
    Calibration,
    CostReport,
)
from tasks import cost as C
from data_schemas.files import read_model_json

DAY = 86_400.0


def _fwd_flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def imagenet_counts() -> C.PhaseCounts:
    """The one 224 px count: ResNet-50, 3 channels, 1000 classes, all layers trainable."""
    return C.count_phase("full", 224, 3, 1000)


# ============================================================================================ counts


def test_resnet50_224x3_forward_is_4_1_gmac_8_2_gflops(imagenet_counts):
    """ResNet-50 at 224x224x3: ~4.1e9 multiply-adds = ~8.2e9 FLOPs (FlopCounterMode counts 2 per MAC);
    25.56 M parameters; full training (fwd + input grads + weight grads) ~3x forward, slightly under because the
    input image needs no gradient: 3 x 8.18 - 2 x 0.118 (conv1 input grad) = 24.3 GFLOPs."""
    fwd = imagenet_counts.forward_flops_per_image
    assert 8.0e9 < fwd < 8.4e9
    assert 4.0e9 < fwd / 2 < 4.2e9  # multiply-adds
    assert imagenet_counts.params_total == 25_557_032
    ratio = imagenet_counts.train_flops_per_image / fwd
    assert 2.9 < ratio < 3.0


def test_conv1_one_channel_costs_one_third_of_three_channels():
    """conv1 FLOPs = 2 x out_pixels x 64 x (C_in x 7 x 7): C_in 1 vs 3 is exactly 1/3, so grayscale saves
    2/3 of conv1 (0.236 GFLOPs at 224 px, ~3% of the net) and nothing else."""
    x1, x3 = torch.zeros(1, 1, 64, 64, device="meta"), torch.zeros(1, 3, 64, 64, device="meta")
    one = _fwd_flops(nn.Conv2d(1, 64, 7, 2, 3, bias=False).to("meta"), x1)
    three = _fwd_flops(nn.Conv2d(3, 64, 7, 2, 3, bias=False).to("meta"), x3)
    assert one * 3 == three
    whole_1 = C.count_phase("full", 64, 1).forward_flops_per_image
    whole_3 = C.count_phase("full", 64, 3).forward_flops_per_image
    assert whole_3 - whole_1 == pytest.approx(three - one)


def test_flops_scale_with_pixel_count():
    """Convolutions cost per output pixel: 128 px has 4x the pixels of 64 px and ~4x the FLOPs (fc is fixed)."""
    f64 = C.count_phase("full", 64, 1).forward_flops_per_image
    f128 = C.count_phase("full", 128, 1).forward_flops_per_image
    assert f128 / f64 == pytest.approx(4.0, rel=0.03)


# ============================================================================================ freezing


def test_frozen_layer_computes_no_weight_gradient():
    """Freezing layer4 (the last stage) keeps its input gradients (layer3 still learns) but drops its weight
    gradients: training FLOPs fall by ~ layer4's forward FLOPs (weight grad of a conv ~= its forward)."""
    model = C._resnet50_for_counting(1, 2, device="meta")
    full = C.count_flops(model, 64, 1, backward=True)
    layer4_fwd = _fwd_flops(model.layer4, torch.zeros(2, 1024, 4, 4, device="meta")) / 2
    C.freeze_modules(model, ("layer4",))
    frozen = C.count_flops(model, 64, 1, backward=True)
    assert frozen < full
    assert full - frozen == pytest.approx(layer4_fwd, rel=0.05)


def test_frozen_prefix_and_frozen_backbone_need_no_backward_there():
    """Frozen stem+layer1 get neither weight nor input gradients; head-only training is forward + fc backward;
    the frozen feature extractor of imagenet-linear has no backward at all (train FLOPs == forward FLOPs)."""
    model = C._resnet50_for_counting(1, 2, device="meta")
    full = C.count_flops(model, 64, 1, backward=True)
    C.freeze_modules(model, ("conv1", "bn1", "layer1"))
    prefix_frozen = C.count_flops(model, 64, 1, backward=True)
    head = C.count_phase("head", 64, 1)
    features = C.count_phase("features", 64, 1)
    assert head.train_flops_per_image < prefix_frozen < full
    assert head.train_flops_per_image - head.forward_flops_per_image < 1e-3 * head.forward_flops_per_image
    assert features.train_flops_per_image == features.forward_flops_per_image
    assert head.params_trainable == 2048 * 2 + 2
    assert features.params_trainable == 0


def test_linear_arm_is_one_forward_pass_plus_a_small_fit():
    """imagenet-linear: n x forward + iterations x 4 x n x 2048 (binary: one weight vector); no epochs."""
    inputs = C.resolve_cost_inputs(n_images=1500, image_size=64, epochs=100, arms=["imagenet-linear"])
    arm = C.estimate_arm("imagenet-linear", inputs, C.load_catalogue())
    fit = 100 * 4 * 1500 * 2048
    assert arm.classifier_fit_flops == fit
    assert arm.flops_total == pytest.approx(1500 * arm.forward_flops_per_image + fit)
    assert arm.params_trainable == 2049 and arm.epochs_effective == 1
    assert arm.memory.gradients_bytes == 0 and arm.memory.optimizer_bytes == 0


def test_head_warmup_epochs_are_cheaper():
    """imagenet with w head-only epochs: w x n x (fwd + fc bwd) + (E - w) x n x (fwd + full bwd)."""
    cat = C.load_catalogue()
    base = C.estimate_arm("imagenet", C.resolve_cost_inputs(n_images=100, image_size=64, epochs=10), cat)
    warm = C.estimate_arm("imagenet", C.resolve_cost_inputs(n_images=100, image_size=64, epochs=10, head_warmup_epochs=3), cat)
    expected = 3 * 100 * warm.head_phase_flops_per_image + 7 * 100 * warm.train_flops_per_image
    assert warm.flops_total == pytest.approx(expected)
    assert warm.flops_total < base.flops_total


# ============================================================================================ memory


def test_memory_breakdown_and_max_batch():
    """weights 4 B x (params + buffers), grads 4 B x trainable, Adam 8 B x trainable (SGD 4 B); activations
    measured per image; max batch = floor((0.9 x memory - fixed) / per image)."""
    inputs = C.resolve_cost_inputs(n_images=100, image_size=64, batch_size=8, device_memory_gb=4)
    arm = C.estimate_arm("scratch", inputs, C.load_catalogue())
    m = arm.memory
    assert m.gradients_bytes == 4 * arm.params_trainable
    assert m.optimizer_bytes == 8 * arm.params_trainable
    assert m.activations_bytes == m.activations_fixed_bytes + 8 * m.activations_bytes_per_image
    assert m.activations_bytes_per_image > 1e6  # ResNet-50 keeps MBs per 64 px image for backward
    fixed = m.weights_bytes + m.gradients_bytes + m.optimizer_bytes + m.activations_fixed_bytes
    assert arm.max_batch_for_given_memory == int((0.9 * 4e9 - fixed) // m.activations_bytes_per_image)
    assert C.max_batch_size(1e6, 10**9, 10) == 0
    fp32 = C.measure_activation_memory("full", 64, 1, "fp32")[1]
    assert m.activations_bytes_per_image < fp32  # bf16 autocast stores less per image than fp32


# ============================================================================================ catalogue


def test_catalogue_has_required_devices_with_public_figures():
    cat = C.load_catalogue()
    names = {d.name for d in cat.devices}
    assert {"m40", "gtx-1080-ti", "v100", "a100", "h100", "h200", "this-machine"} <= names
    assert cat.get("m40").rates["fp32"].peak_tflops == 7.0
    assert cat.get("gtx-1080-ti").rates["fp32"].peak_tflops == 11.3 and cat.get("gtx-1080-ti").memory_gb == 11
    assert cat.get("v100").rates["fp16"].peak_tflops == 125
    assert cat.get("a100").rates["bf16"].peak_tflops == 312 and cat.get("a100").rates["tf32"].peak_tflops == 156
    assert cat.get("h100").rates["bf16"].peak_tflops == 989 and cat.get("h100").rates["tf32"].peak_tflops == 495
    assert cat.get("h200").rates == cat.get("h100").rates and cat.get("h200").memory_gb == 141
    # no bf16 on Maxwell/Pascal: falls back to fp32; Volta falls back to fp16 tensor cores
    assert C.resolve_precision(cat.get("m40"), "bf16") == "fp32"
    assert C.resolve_precision(cat.get("v100"), "bf16") == "fp16"
    assert C.resolve_precision(cat.get("a100"), "tf32") == "tf32"


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
    data = json.loads(C.default_catalogue_path().read_text())
    breakage(data)
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as info:
        C.load_catalogue(path)
    assert str(path) in str(info.value)


# ============================================================================================ classic figures


def test_imagenet_90_epochs_is_1e18_mac_and_about_two_weeks_on_m40(imagenet_counts):
    """1.28e6 images x 90 epochs x 24.3 GFLOPs = 2.8e18 FLOPs = 1.4e18 multiply-adds (the literature's
    "~10^18 single-precision operations"); on an M40 at 7 TFLOP/s x 0.35 utilisation:
    2.8e18 / 2.45e12 = 1.15e6 s = 13.3 days (You et al. 2018: "14 days")."""
    total = 1.28e6 * 90 * imagenet_counts.train_flops_per_image
    assert 1e18 <= total / 2 < 2e18
    days = C.estimate_seconds(total, C.load_catalogue().get("m40"), "fp32") / DAY
    assert 11 < days < 16


def test_1500_images_100_epochs_on_1080ti_is_minutes_to_hours_not_days(imagenet_counts):
    """1,500 x 100 = 1.5e5 image-passes, ~8,500x fewer than ImageNet's 1.15e8; at <= 24.3 GFLOPs each (3-channel,
    an upper bound on 1-channel) that is 3.6e15 FLOPs / (11.3e12 x 0.40) = ~800 s = ~13 minutes."""
    total = 1500 * 100 * imagenet_counts.train_flops_per_image
    seconds = C.estimate_seconds(total, C.load_catalogue().get("gtx-1080-ti"), "bf16")
    assert 5 * 60 < seconds < 24 * 3600


# ============================================================================================ calibration


def _fake_calibration(image_size=64, rate=50e9) -> Calibration:
    key, fields = C._calibration_key(image_size, 1, C.this_machine_precision("bf16"))
    per_image = C.count_phase("full", image_size, 1).train_flops_per_image
    return Calibration(
        key=key, **fields, matmul_flops_per_second=200e9, train_batch_size=16, train_steps=3,
        train_images_per_second=rate / per_image, train_flops_per_image=per_image, train_flops_per_second=rate,
        utilisation=rate / 200e9, seconds_taken=1.0, measured_at="2025-01-01T00:00:00+00:00",
    )


def test_calibration_is_cached_and_prices_this_machine(tmp_path, monkeypatch):
    """The this-machine estimate reproduces the calibrated throughput: seconds = FLOPs / (matmul peak x
    (achieved / peak)) = FLOPs / achieved; the second call reads calibration.json instead of measuring."""
    monkeypatch.setenv("CTCOMPARE_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(C, "calibrate_this_machine", lambda *a, **k: calls.append(a) or _fake_calibration())
    first = C.load_or_calibrate(64, 1, "bf16", 16)
    second = C.load_or_calibrate(64, 1, "bf16", 16)
    assert len(calls) == 1 and first == second and (tmp_path / "calibration.json").is_file()
    report = C.build_cost_report(C.resolve_cost_inputs(n_images=64, image_size=64, epochs=3, arms=["scratch"]), calibration=first)
    est = next(d for d in report.arm("scratch").devices if d.device == "this-machine")
    assert est.seconds == pytest.approx(report.arm("scratch").flops_total / 50e9)


# ============================================================================================ cost.json, flow, CLI


def test_cost_json_round_trip_and_recorded_actual(tmp_path):
    inputs = C.resolve_cost_inputs(n_images=200, image_size=64, epochs=4, arms=["scratch", "imagenet-linear"])
    report = C.build_cost_report(inputs)
    path = C.write_cost_report(tmp_path, report)
    assert read_model_json(path, CostReport) == report
    est = C.estimated_seconds_for(report.arm("scratch"), "this-machine", epochs_run=2)
    actual = ActualCost(device="this-machine", wall_seconds=est * 1.2, epochs_run=2, images_per_second=10.0)
    updated = C.record_actual(path, "scratch", actual)
    recorded = read_model_json(path, CostReport).arm("scratch").actual
    assert recorded == updated.arm("scratch").actual
    assert recorded.actual_over_estimate == pytest.approx(1.2)
    assert C.estimate_vs_actual(report.arm("scratch"), actual) == pytest.approx(1.2)
    assert recorded.achieved_flops_per_second > 0 and recorded.utilisation > 0
    assert "actual / estimate" in C.markdown_table(updated)


def test_flow_writes_cost_json_artifact_and_skips_same_inputs(tmp_path):
    from prefect.artifacts import Artifact

    from flows.cost import ARTIFACT_KEY, cost_flow

    first = cost_flow(n_images=100, image_size=64, epochs=2, out_dir=tmp_path, calibrate=False)
    assert (tmp_path / COST_FILE).is_file() and [a.arm for a in first.arms] == list(ARM_NAMES)
    second = cost_flow(n_images=100, image_size=64, epochs=2, out_dir=tmp_path, calibrate=False)
    assert second.created_at == first.created_at  # reused, not recomputed
    artifact = Artifact.get(ARTIFACT_KEY)
    assert artifact is not None and "scratch" in artifact.data


def _cli(monkeypatch, argv):
    from flows.cli import main

    return main(argv)


def test_cli_json_output_parses(tmp_path, monkeypatch, capsys):
    rc = _cli(monkeypatch, ["cost", "--images", "150", "--size", "64", "--epochs", "2", "--arms", "scratch,imagenet",
                            "--no-calibrate", "--json", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    report = CostReport.model_validate(data)
    assert [a.arm for a in report.arms] == ["scratch", "imagenet"] and report.inputs.n_images == 150


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--images", "10", "--size", "0"], "--size must be between 32 and 2048"),
        (["--images", "10", "--arms", "scratch", "transfer"], "valid arms are scratch, imagenet, imagenet-linear"),
        (["--images", "0"], "--images must be at least 1"),
        (["--size", "64"], "give --dataset DATASET_DIR"),
        (["--images", "10", "--epochs", "2", "--head-warmup-epochs", "3"], "cannot exceed epochs"),
    ],
    ids=["size-0", "unknown-arm", "no-images", "no-source", "warmup>epochs"],
)
def test_bad_argument_exits_2_with_one_sentence(tmp_path, monkeypatch, capsys, argv, fragment):
    rc = _cli(monkeypatch, ["cost", *argv, "--no-calibrate", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and err.startswith("ctcompare cost: ")
    assert not (tmp_path / COST_FILE).exists()


def test_cost_from_dataset_folder_uses_its_card(tmp_path, monkeypatch):
    """--dataset reads dataset.json: labelled image count, image size, classes."""
    card = {"n_images": 40, "n_unlabeled_images": 10, "image_size": 96, "channels": 1,
            "label_distribution": {"a": 10, "b": 10, "c": 10}, "content_hash": "abc"}
    from data_schemas.dataset import DatasetCard

    full = DatasetCard.model_construct(**card)
    monkeypatch.setattr(C, "read_model_json", lambda path, model: full)
    (tmp_path / "dataset.json").write_text("{}")
    inputs = C.resolve_cost_inputs(dataset=tmp_path)
    assert (inputs.n_images, inputs.image_size, inputs.num_classes, inputs.dataset_content_hash) == (30, 96, 3, "abc")
