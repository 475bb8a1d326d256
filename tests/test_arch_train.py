"""Arms with a model (ResNet-18, MobileNetV3-Large), probes at several depths and the input-size curve, trained end
to end on the smoke profile (32 px, CPU, no network; weights files made here in torchvision's format)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_schemas.files import read_model_json, read_models_csv, sha256_file
from data_schemas.plan import build_run_plan, write_plan
from data_schemas.training import (
    PROBE_DEPTHS_FILE,
    EpochMetrics,
    LinearProbeModel,
    PredictionRow,
    ProbeDepths,
    RunConfig,
    RunSummary,
    resolve_train_config,
)
from tasks.training.train import train_arm, weights_file_for
from tests.test_train import _cli, make_synthetic_dataset
from tests.weights_files import random_torchvision_file


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    make_synthetic_dataset(root)
    return root


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("weights-dir")
    random_torchvision_file(directory, "resnet18", 1)
    random_torchvision_file(directory, "mobilenet_v3_large", 2)
    return directory


def _plan(run_dir: Path, arm: str, **kwargs) -> Path:
    plan = build_run_plan(profile="smoke", arms=[arm], seed=0, layout="single-arm", **kwargs)
    return write_plan(run_dir, plan.model_copy(update={"splits_file": "../splits.csv"}))


# ------------------------------------------------------------------------------------------- arms with a model


def test_arm_names_resolve_profiles_by_mode():
    small = resolve_train_config("smoke", "resnet18:imagenet")
    assert (small.freeze_epochs, small.backbone_lr_mult) == (1, 0.1)  # the imagenet arm's warm-up and rates
    assert resolve_train_config("smoke", "mobilenet_v3_large:scratch").freeze_epochs == 0
    plan = build_run_plan(profile="smoke", arms=["resnet50:scratch", "resnet18:imagenet"], seed=0)
    assert plan.arms == ["scratch", "resnet18:imagenet"]
    assert [r.run_dir for r in plan.runs] == ["runs/scratch/main", "runs/resnet18-imagenet/main"]
    assert plan.main_run("resnet18:imagenet").config.freeze_epochs == 1
    with pytest.raises(ValueError, match="MODEL one of resnet50, resnet18, mobilenet_v3_large"):
        build_run_plan(profile="smoke", arms=["vgg16:scratch"], seed=0)
    with pytest.raises(ValueError, match="listed once"):
        build_run_plan(profile="smoke", arms=["scratch", "resnet50:scratch"], seed=0)


def test_weights_file_for_each_model(weights_dir, resnet50_weights_file):
    assert weights_file_for("resnet18", None, weights_dir).name.startswith("resnet18-")
    assert weights_file_for("mobilenet_v3_large", resnet50_weights_file, weights_dir).name.startswith(
        "mobilenet_v3_large-"
    )
    assert weights_file_for("resnet50", resnet50_weights_file, weights_dir) == resnet50_weights_file
    assert weights_file_for("resnet18", resnet50_weights_file, None) is None  # --weights is ResNet-50's file only


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v3_large"])
def test_small_models_train_from_scratch_and_from_a_weights_file(model, dataset_dir, weights_dir, tmp_path):
    for mode in ("scratch", "imagenet"):
        arm = f"{model}:{mode}"
        run_dir = tmp_path / mode
        summary = train_arm(dataset_dir=dataset_dir, plan_path=_plan(run_dir, arm), run=".", weights_dir=weights_dir)
        assert summary.status == "completed", summary.reason
        assert summary.arm == arm and summary.epochs_run == 2 and summary.test_auc is not None
        config = read_model_json(run_dir / "config.json", RunConfig)
        assert config.arm == arm and "bicubic" in config.resize_method
        metrics = read_models_csv(run_dir / "metrics.csv", EpochMetrics)
        best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
        head_keys = [k for k in best["state_dict"] if k.startswith("fc." if model == "resnet18" else "classifier.3.")]
        assert head_keys, "the new head sits where torchvision's classifier was"
        if mode == "imagenet":
            weights_file = next(weights_dir.glob(f"{model}-*.pth"))
            assert config.weights is not None and config.weights.sha256 == sha256_file(weights_file)
            assert config.weights.hash_checked
            assert metrics[0].phase == "head" and metrics[0].lr_backbone == 0.0
            assert metrics[1].phase == "full" and 0 < metrics[1].lr_backbone < metrics[1].lr_head
        else:
            assert config.weights is None and {m.phase for m in metrics} == {"full"}
        predictions = read_models_csv(run_dir / "predictions.csv", PredictionRow)
        assert predictions and all(0 <= p.prob_positive <= 1 for p in predictions)


def test_small_pretrained_arm_without_weights_is_skipped_and_cli_names_the_folder(dataset_dir, tmp_path, capsys):
    run_dir = tmp_path / "offline"
    code = _cli(["train", str(dataset_dir), "--arm", "resnet18:imagenet", "--out", str(run_dir), "--profile", "smoke",
                 "--set", "download_weights=false"])
    assert code == 0
    summary = read_model_json(run_dir / "status.json", RunSummary)
    assert summary.status == "skipped" and "resnet18-f37072fd.pth" in summary.reason
    base = ["train", str(dataset_dir), "--out", str(tmp_path / "x"), "--profile", "smoke"]
    assert _cli(base + ["--arm", "vgg16:scratch"]) == 2
    assert _cli(base + ["--arm", "resnet18:imagenet", "--weights", str(tmp_path / "x.pth")]) == 2
    assert _cli(base + ["--arm", "resnet18:imagenet", "--weights-dir", str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------------------------------- probes at several depths


def test_choose_depth_uses_validation_only():
    from tasks.training.linear_probe import choose_depth

    assert choose_depth({"layer2": 0.7, "layer3": 0.9, "layer4": 0.8}) == "layer3"
    assert choose_depth({"layer2": 0.9, "layer3": 0.9, "layer4": None}) == "layer2"  # tie: the shallower
    assert choose_depth({"layer2": None, "layer3": None, "layer4": None}) == "layer4"


def test_probe_depths_setting_is_checked_against_the_model():
    from tasks.training.linear_arm import _depths

    assert _depths("resnet18", None) == ("layer2", "layer3", "layer4")
    assert _depths("resnet50", ["layer4", "layer2"]) == ("layer2", "layer4")  # shallow to deep, as probed
    assert _depths("mobilenet_v3_large", None) == ("features.6", "features.12", "features.16")
    with pytest.raises(ValueError, match="choose from layer2, layer3, layer4"):
        _depths("resnet18", ["layer1"])
    config = resolve_train_config("smoke", "imagenet-linear", {"linear.depths": '["layer4"]'})
    assert config.linear.depths == ["layer4"]


def test_probe_at_three_depths_picks_the_best_on_validation(dataset_dir, weights_dir, tmp_path):
    from sklearn.metrics import roc_auc_score

    run_dir = tmp_path / "probe"
    summary = train_arm(dataset_dir=dataset_dir, plan_path=_plan(run_dir, "resnet18:imagenet-linear"), run=".",
                        weights_dir=weights_dir)
    assert summary.status == "completed", summary.reason
    probes = read_model_json(run_dir / PROBE_DEPTHS_FILE, ProbeDepths)
    assert [d.depth for d in probes.depths] == ["layer2", "layer3", "layer4"]
    assert [d.feature_dim for d in probes.depths] == [128, 256, 512]  # ResNet-18's widths: each depth really read
    val_aucs = [d.val_auc for d in probes.depths]
    assert all(v is not None for v in val_aucs) and len(val_aucs) == 3
    chosen = next(d for d in probes.depths if d.depth == probes.chosen_depth)
    assert chosen.val_auc == max(val_aucs)
    # the run's outputs are the chosen depth's: its probe, and validation/test predictions scoring its AUCs
    probe = read_model_json(run_dir / "linear_model.json", LinearProbeModel)
    assert len(probe.coef) == chosen.feature_dim and probe.C == chosen.C
    assert probe.depth == (None if chosen.depth == "layer4" else chosen.depth)
    val = read_models_csv(run_dir / "val_predictions.csv", PredictionRow)
    test = read_models_csv(run_dir / "predictions.csv", PredictionRow)
    assert roc_auc_score([p.target for p in val], [p.prob_positive for p in val]) == pytest.approx(chosen.val_auc)
    assert roc_auc_score([p.target for p in test], [p.prob_positive for p in test]) == pytest.approx(chosen.test_auc)
    assert summary.best_val_auc == pytest.approx(chosen.val_auc)


# ------------------------------------------------------------------------ input sizes and the "What to train" answer


def test_images_are_resized_by_antialiased_bicubic():
    import numpy as np

    from tasks.training.augment import images_to_tensor
    from tasks.training.models import resize_images

    rng = np.random.default_rng(0)
    images = rng.random((3, 1, 40, 40)).astype(np.float16)
    resized = images_to_tensor(images, 24)
    assert torch.equal(resized, resize_images(torch.from_numpy(images.astype(np.float32)), 24))
    plain_bilinear = torch.nn.functional.interpolate(torch.from_numpy(images.astype(np.float32)), size=(24, 24),
                                                     mode="bilinear", antialias=True, align_corners=False)
    assert not torch.allclose(resized, plain_bilinear.clamp(0, 1))
    assert float(resized.min()) >= 0.0 and float(resized.max()) <= 1.0


def test_plan_keys_size_runs_and_refuses_bad_sizes():
    plan = build_run_plan(profile="smoke", arms=["scratch", "resnet18:imagenet"], seed=0, sizes=[64, 48, 32])
    assert plan.sizes == [32, 48, 64]
    assert [r.run_dir for r in plan.runs] == [
        "runs/scratch/main", "runs/scratch/size-48", "runs/scratch/size-64",
        "runs/resnet18-imagenet/main", "runs/resnet18-imagenet/size-48", "runs/resnet18-imagenet/size-64"]
    assert [r.config.image_size for r in plan.size_runs("resnet18:imagenet")] == [32, 48, 64]
    assert [r.run_dir for r in plan.pooled_runs("scratch")] == ["runs/scratch/main"]  # sizes are not pooled
    assert plan.run("runs/scratch/size-64").config.freeze_epochs == 0
    with pytest.raises(ValueError, match="from 32 to 1024"):
        build_run_plan(profile="smoke", arms=["scratch"], seed=0, sizes=[8])


def test_sizes_depths_and_what_to_train_reach_the_report(dataset_dir, weights_dir, tmp_path):
    from data_schemas.evaluation import EvaluationSettings
    from reports.render import render_report
    from reports.wording import word_results
    from tasks.evaluation.evaluate import ArmRunFolders, build_results

    report_dir = tmp_path / "report"
    arms = ["resnet18:scratch", "resnet18:imagenet-linear"]
    plan = build_run_plan(profile="smoke", arms=arms, seed=0, sizes=[32, 36], n_bootstrap=50)
    plan_path = write_plan(report_dir, plan)
    for planned in plan.runs:
        summary = train_arm(dataset_dir=dataset_dir, plan_path=plan_path, run=planned.run_dir, weights_dir=weights_dir)
        assert summary.status == "completed", summary.reason
    small = read_model_json(report_dir / "runs/resnet18-scratch/size-36/config.json", RunConfig)
    assert (small.train.image_size, small.dataset_image_size) == (36, 40) and "bicubic" in small.resize_method
    results = word_results(build_results(
        dataset_dir=dataset_dir, splits_path=report_dir / plan.splits_file,
        runs=ArmRunFolders(pooled={arm: [report_dir / r.run_dir for r in plan.pooled_runs(arm)] for arm in plan.arms},
                           sizes={arm: {r.config.image_size: report_dir / r.run_dir for r in plan.size_runs(arm)}
                                  for arm in plan.arms}),
        evaluation=EvaluationSettings(n_bootstrap=50), cost_path=report_dir / "cost.json", run_id="t", seed=0,
        command="ctcompare compare",
    ))
    assert sorted((p.arm, p.image_size) for p in results.input_sizes) == sorted((a, s) for a in arms for s in (32, 36))
    assert all(p.test_auc.value is not None and p.train_seconds and p.train_flops for p in results.input_sizes)
    scratch_sizes = {p.image_size: p for p in results.input_sizes if p.arm == "resnet18:scratch"}
    assert scratch_sizes[32].forward_flops_per_image < scratch_sizes[36].forward_flops_per_image
    depths = [p for p in results.probe_depths if p.arm == "resnet18:imagenet-linear"]
    assert [p.depth for p in depths] == ["layer2", "layer3", "layer4"] and sum(p.chosen for p in depths) == 1
    what = results.what_to_train
    chosen = next(p for p in depths if p.chosen)
    assert what is not None and what.chosen_depth == {"resnet18:imagenet-linear": chosen.depth}
    assert what.highest_arm in arms and what.smallest_non_inferior in arms and what.margin == 0.02
    assert [b.budget_flops for b in what.budgets] == sorted(b.budget_flops for b in what.budgets) and len(
        what.budgets
    ) == 2
    best_auc = {a.name: a.patient_metrics.roc_auc.value for a in results.arms}
    top = max(best_auc.values())
    assert what.budgets[-1].highest_arm == min(a for a, v in best_auc.items() if v >= top - 0.0005)  # ties by name
    for arm, size in what.chosen_size.items():  # chosen on validation AUC, never on test
        assert (
            size
            == max(
                (p for p in results.input_sizes if p.arm == arm), key=lambda p: (p.val_auc, -p.image_size)
            ).image_size
        )
    assert what.sentences and any("training budget" in s for s in what.sentences)
    paths = render_report(results, tmp_path / "rendered")
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "## What to train" in markdown and "AUC against depth" in markdown and "36 px" in markdown
    assert "What to train" in paths["html"].read_text(encoding="utf-8")
    figures = tmp_path / "rendered" / "figures"
    assert (figures / "input_sizes.png").stat().st_size > 0 and (figures / "probe_depths.png").stat().st_size > 0
    assert "figures/input_sizes.png" in markdown and "figures/probe_depths.png" in markdown
