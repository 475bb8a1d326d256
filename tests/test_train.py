"""Training stage end to end on a small synthetic dataset (smoke profile, CPU, no network)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from data_schemas.dataset import DatasetCard, DatasetFingerprint, ManifestRow, NumericSummary, WindowSpec
from data_schemas.training import (
    BEST_FILE,
    CHECKPOINT_FILE,
    EpochMetrics,
    LinearProbeModel,
    PredictionRow,
    ProbeDepths,
    RunConfig,
    RunSummary,
    SplitRow,
    TimingInfo,
)
from flows.cli import UsageError
from tasks.dataset_store import write_dataset
from data_schemas.files import read_model_json, read_models_csv, sha256_file
from data_schemas.plan import build_run_plan, write_plan
from data_schemas.training import VAL_PREDICTIONS_FILE, resolve_train_config
from tasks.runtime import choose_runtime
from tasks.train import TrainingInterrupted, train_arm
from tasks.train_loop import predict_probs, state_copy

N_PATIENTS, PER_PATIENT, SIZE = 18, 3, 40


def make_synthetic_dataset(root: Path, seed: int = 0) -> DatasetCard:
    """Positive images carry a bright blob; negatives are noise. Keys look hashed, never real identifiers."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images, rows = [], []
    for p in range(N_PATIENTS):
        label = "abnormal" if p % 2 else "normal"
        for _ in range(PER_PATIENT):
            img = 0.3 + 0.08 * rng.standard_normal((SIZE, SIZE))
            if label == "abnormal":
                cy, cx = rng.integers(SIZE // 4, 3 * SIZE // 4, 2)
                img += 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (SIZE / 8) ** 2))
            images.append(np.clip(img, 0, 1)[None])
            i = len(rows)
            rows.append(ManifestRow(
                index=i, image_key=f"{i:064x}", patient_key=f"{p + 1000:064x}", study_key=f"s{p}", series_key=f"r{p}",
                frame=0, label=label, rows=SIZE, columns=SIZE,
            ))
    stats = NumericSummary(count=0)
    card = DatasetCard(
        created_at="2024-01-01T00:00:00+00:00", ctcompare_version="test", image_size=SIZE, value_mapping="window",
        window=WindowSpec(name="soft", level=40, width=400), interpolation="area", padding="zero",
        n_images=len(rows), n_patients=N_PATIENTS, n_studies=N_PATIENTS, n_series=N_PATIENTS, n_files_seen=len(rows),
        n_files_ingested=len(rows), n_files_quarantined=0, quarantine_reasons={},
        label_distribution={"abnormal": len(rows) // 2, "normal": len(rows) // 2}, n_unlabeled_images=0,
        fingerprint=DatasetFingerprint(matrix_sizes={f"{SIZE}x{SIZE}": len(rows)}, pixel_spacing_mm=stats,
                                       slice_thickness_mm=stats, hounsfield_units=stats, manufacturers={},
                                       transfer_syntaxes={}, kvp=stats),
        content_hash="",
    )
    return write_dataset(root, np.stack(images).astype(np.float16), rows, card)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    make_synthetic_dataset(root)
    return root


@pytest.fixture(scope="module")
def weights_file(resnet50_weights_file) -> Path:
    """conftest's torchvision-style ResNet-50 state dict (random weights, hash prefix in the name)."""
    return resnet50_weights_file


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def _cli(argv: list[str]) -> int:
    from flows import train as train_flow_module

    parser = argparse.ArgumentParser(prog="ctcompare")
    train_flow_module.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError:
        return 2


def one_run_plan(run_dir: Path, arm: str, settings: dict[str, str] | None = None, profile: str = "smoke") -> Path:
    """RUN_DIR/plan.json of one run with the split beside RUN_DIR, as `ctcompare train` writes it."""
    plan = build_run_plan(profile=profile, arms=[arm], seed=0, settings=settings, layout="single-arm")
    return write_plan(run_dir, plan.model_copy(update={"splits_file": "../splits.csv"}))


def _metrics(run_dir: Path) -> list[EpochMetrics]:
    return read_models_csv(run_dir / "metrics.csv", EpochMetrics)


def _check_outputs(run_dir: Path) -> RunSummary:
    summary = read_model_json(run_dir / "status.json", RunSummary)
    assert summary.status == "completed", summary.reason
    config = read_model_json(run_dir / "config.json", RunConfig)
    assert config.patient_overlap == 0 and config.config_hash == summary.config_hash
    read_model_json(run_dir / "timing.json", TimingInfo)
    predictions = read_models_csv(run_dir / "predictions.csv", PredictionRow)
    val_predictions = read_models_csv(run_dir / VAL_PREDICTIONS_FILE, PredictionRow)
    splits = read_models_csv(Path(config.splits_path), SplitRow)
    assert {p.image_key for p in predictions} == {r.image_key for r in splits if r.part == "test"}
    assert {p.image_key for p in val_predictions} == {r.image_key for r in splits if r.part == "val"}
    assert all(0.0 <= p.prob_positive <= 1.0 for p in predictions)
    assert len(_metrics(run_dir)) == summary.epochs_run
    return summary


def test_scratch_arm_end_to_end_via_cli(dataset_dir, runs, capsys):
    run_dir = runs / "scratch"
    code = _cli(["train", str(dataset_dir), "--arm", "scratch", "--out", str(run_dir), "--profile", "smoke", "--seed", "0"])
    assert code == 0
    summary = _check_outputs(run_dir)
    assert summary.epochs_run == 2
    config = read_model_json(run_dir / "config.json", RunConfig)
    assert config.train.image_size == 32 and config.dataset_image_size == SIZE  # resized once in memory
    assert config.weights is None and config.classes == ["normal", "abnormal"]
    assert (runs / "splits.csv").is_file() and (runs / "splits.json").is_file()
    metrics = _metrics(run_dir)
    assert all(m.train_loss is not None and m.images_per_second > 0 and m.lr_head is not None for m in metrics)
    assert "completed" in capsys.readouterr().out

    # a second run with the same configuration is not trained again
    stamp = (run_dir / CHECKPOINT_FILE).stat().st_mtime_ns
    assert _cli(["train", str(dataset_dir), "--arm", "scratch", "--out", str(run_dir), "--profile", "smoke"]) == 0
    assert (run_dir / CHECKPOINT_FILE).stat().st_mtime_ns == stamp


def test_best_checkpoint_is_the_best_epoch(dataset_dir, runs):
    run_dir = runs / "scratch"  # made by the test above
    metrics = _metrics(run_dir)
    best_epoch = 1 + int(np.argmin([m.val_loss for m in metrics]))  # default monitor; first minimum wins ties
    best = torch.load(run_dir / BEST_FILE, map_location="cpu", weights_only=True)
    assert best["epoch"] == best_epoch
    assert [m.epoch for m in metrics if m.is_best][-1] == best_epoch
    # the test predictions were made with exactly these weights
    config = read_model_json(run_dir / "config.json", RunConfig)
    from tasks.models import scratch_resnet50
    from tasks.augment import images_to_tensor
    from tasks.dataset_store import load_dataset

    model = scratch_resnet50(dropout=config.train.dropout)
    model.load_state_dict(best["state_dict"])
    predictions = read_models_csv(run_dir / "predictions.csv", PredictionRow)
    dataset = load_dataset(dataset_dir)
    index_of = {r.image_key: r.index for r in dataset.manifest}
    x = images_to_tensor(dataset.images[[index_of[p.image_key] for p in predictions]], config.train.image_size)
    runtime = choose_runtime(config.train)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    probs, _ = predict_probs(model, x, runtime, 64)
    assert np.allclose(probs, [p.prob_positive for p in predictions], atol=1e-5)


def test_best_state_is_a_real_copy():
    model = torch.nn.Linear(3, 2)
    copy = state_copy(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(copy["weight"], model.weight)


def test_prefect_retry_resumes_from_last_epoch_and_matches_uninterrupted(dataset_dir, runs, monkeypatch):
    """A crash after epoch 1; the task's Prefect retry resumes (as --resume does) and finishes epoch 2 only."""
    from prefect import flow

    import tasks.train as train_module

    reference = _metrics(runs / "scratch")  # uninterrupted, same seed and config
    run_dir = runs / "scratch-interrupted"
    calls: list[dict] = []
    real_train_arm = train_module.train_arm

    def flaky_train_arm(*args, **kwargs):
        record = {"resume": kwargs["resume"], "epochs": []}
        calls.append(record)

        def on_epoch_end(epoch: int) -> None:
            record["epochs"].append(epoch)
            if len(calls) == 1:
                assert len(_metrics(run_dir)) == 1 and (run_dir / CHECKPOINT_FILE).is_file()
                raise TrainingInterrupted("simulated crash after epoch 1")

        return real_train_arm(*args, on_epoch_end=on_epoch_end, **kwargs)

    monkeypatch.setattr(train_module, "train_arm", flaky_train_arm)

    plan_path = one_run_plan(run_dir, "scratch")

    @flow
    def one_arm():
        return train_module.train_arm_task(dataset_dir=dataset_dir, plan_path=plan_path, run=".", resume=False)

    summary = one_arm()
    assert summary.status == "completed"
    assert [c["resume"] for c in calls] == [False, True]
    assert calls[0]["epochs"] == [1] and calls[1]["epochs"] == [2]  # epoch 1 was not trained again
    resumed = _metrics(run_dir)
    assert [m.epoch for m in resumed] == [1, 2]
    # same seed, same split: the same first-epoch loss on the CPU; and the resumed epoch equals the uninterrupted one
    assert resumed[0].train_loss == pytest.approx(reference[0].train_loss, rel=1e-4)
    assert resumed[1].train_loss == pytest.approx(reference[1].train_loss, rel=1e-4)
    assert resumed[1].val_auc == pytest.approx(reference[1].val_auc, abs=1e-6)


def test_imagenet_arm_uses_weights_file(dataset_dir, runs, weights_file):
    run_dir = runs / "imagenet"
    summary = train_arm(dataset_dir=dataset_dir, plan_path=one_run_plan(run_dir, "imagenet"), run=".", weights_path=weights_file)
    assert _check_outputs(run_dir).status == "completed" and summary.epochs_run == 2
    config = read_model_json(run_dir / "config.json", RunConfig)
    assert config.weights is not None and config.weights.sha256 == sha256_file(weights_file) and config.weights.hash_checked
    assert config.splits_sha256 == read_model_json(runs / "scratch" / "config.json", RunConfig).splits_sha256
    metrics = _metrics(run_dir)
    assert metrics[0].phase == "head" and metrics[0].lr_backbone == 0.0  # head-only warm-up epoch
    assert metrics[1].phase == "full" and 0 < metrics[1].lr_backbone < metrics[1].lr_head


def test_linear_arm(dataset_dir, runs, weights_file):
    run_dir = runs / "linear"
    summary = train_arm(dataset_dir=dataset_dir, plan_path=one_run_plan(run_dir, "imagenet-linear"), run=".", weights_path=weights_file)
    assert _check_outputs(run_dir).status == "completed" and summary.epochs_run == 1
    probe = read_model_json(run_dir / "linear_model.json", LinearProbeModel)
    depths = read_model_json(run_dir / "probe_depths.json", ProbeDepths)
    assert [d.depth for d in depths.depths] == ["layer2", "layer3", "layer4"]
    assert [d.feature_dim for d in depths.depths] == [512, 1024, 2048]
    assert len(probe.coef) == {d.depth: d.feature_dim for d in depths.depths}[depths.chosen_depth] and probe.C in probe.Cs_tried
    assert _metrics(run_dir)[0].phase == "linear"


def test_pretrained_arm_without_weights_is_skipped(dataset_dir, runs, capsys):
    run_dir = runs / "imagenet-offline"
    code = _cli(["train", str(dataset_dir), "--arm", "imagenet", "--out", str(run_dir), "--profile", "smoke",
                 "--set", "download_weights=false"])
    assert code == 0
    summary = read_model_json(run_dir / "status.json", RunSummary)
    assert summary.status == "skipped" and "--weights" in summary.reason
    assert "skipped" in capsys.readouterr().out
    assert not (run_dir / "predictions.csv").exists()


def test_bad_weights_file_is_a_clear_error(dataset_dir, runs, weights_file, tmp_path):
    truncated = tmp_path / "broken.pth"
    truncated.write_bytes(weights_file.read_bytes()[:1000])
    run_dir = runs / "imagenet-broken"
    from flows import train as train_flow_module

    parser = argparse.ArgumentParser(prog="ctcompare")
    train_flow_module.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", str(dataset_dir), "--arm", "imagenet", "--out", str(run_dir), "--profile",
                              "smoke", "--weights", str(truncated)])
    with pytest.raises(UsageError, match="not a readable PyTorch state dict") as refused:
        args.handler(args)  # refused before Prefect starts, by the training stage's own loader
    assert str(truncated) in str(refused.value) and "\n" not in str(refused.value)
    assert not run_dir.exists()


def test_bad_arguments_are_usage_errors(dataset_dir, runs, tmp_path):
    base = ["train", str(dataset_dir), "--arm", "scratch", "--out", str(runs / "x"), "--profile", "smoke"]
    assert _cli(base + ["--set", "no_such_key=1"]) == 2
    assert _cli(base + ["--set", "epochs=zero"]) == 2
    assert _cli(base + ["--set", "epochs"]) == 2
    assert _cli(["train", str(tmp_path), "--arm", "scratch", "--out", str(runs / "x")]) == 2
    assert _cli(base + ["--weights", str(tmp_path / "missing.pth")]) == 2


def test_overrides_are_recorded():
    config = resolve_train_config("smoke", "imagenet", {"augment.hflip": "true", "mixup_alpha": "0.2"})
    assert config.augment.hflip is True and config.mixup_alpha == 0.2 and config.freeze_epochs == 1


# ---------------------------------------------------------------------------------- model selection and freezing


def _part_tensor(dataset_dir: Path, keys: list[str], size: int) -> torch.Tensor:
    from tasks.augment import images_to_tensor
    from tasks.dataset_store import load_dataset

    dataset = load_dataset(dataset_dir)
    index_of = {r.image_key: r.index for r in dataset.manifest}
    return images_to_tensor(dataset.images[[index_of[k] for k in keys]], size)


def test_early_stopping_fires_and_outputs_come_from_the_best_epoch(dataset_dir, runs):
    """A run stopped early whose best epoch is not its last: predictions and logged validation figures come from
    best.pt on the validation part (never the test part, never the last epoch's weights)."""
    import torch.nn.functional as F

    from data_schemas.plan import read_plan
    from data_schemas.training import SplitRow
    from tasks.models import scratch_resnet50
    from tasks.splits import parts_for_fold, read_splits
    from tasks.train_loop import auc_or_none

    run_dir = runs / "early-stop"
    # no later epoch can improve the validation loss by 10: epoch 1 stays best, patience 1 would stop after epoch 2,
    # min_epochs 3 holds it to epoch 3, long before the 12 allowed epochs
    settings = {"epochs": "12", "early_stopping_patience": "1", "early_stopping_min_delta": "10", "min_epochs": "3"}
    plan_path = one_run_plan(run_dir, "scratch", settings)
    summary = train_arm(dataset_dir=dataset_dir, plan_path=plan_path, run=".")
    assert summary.status == "completed" and summary.epochs_run == 3 and summary.best_epoch == 1
    metrics = _metrics(run_dir)
    assert [m.is_best for m in metrics] == [True, False, False]
    assert all(m.train_eval_loss is not None and m.train_eval_loss > 0 for m in metrics)
    config = read_model_json(run_dir / "config.json", RunConfig)
    assert "val_loss" in config.model_selection and config.train.early_stopping_monitor == "val_loss"

    best = torch.load(run_dir / BEST_FILE, map_location="cpu", weights_only=True)
    assert best["epoch"] == 1
    model = scratch_resnet50(dropout=config.train.dropout)
    model.load_state_dict(best["state_dict"])
    runtime = choose_runtime(config.train)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)

    rows, _ = read_splits(Path(config.splits_path))
    parts = parts_for_fold(rows, 0, read_plan(plan_path).split)
    val_rows = read_models_csv(run_dir / VAL_PREDICTIONS_FILE, PredictionRow)
    assert [r.image_key for r in val_rows] == [r.image_key for r in parts["val"]]  # the validation part, in order
    for file, expected in (("predictions.csv", parts["test"]), (VAL_PREDICTIONS_FILE, parts["val"])):
        predicted = read_models_csv(run_dir / file, PredictionRow)
        x = _part_tensor(dataset_dir, [r.image_key for r in predicted], config.train.image_size)
        probs, logits = predict_probs(model, x, runtime, config.train.eval_batch_size)
        assert np.allclose(probs, [p.prob_positive for p in predicted], atol=1e-5), file
        if file == VAL_PREDICTIONS_FILE:
            targets = torch.tensor([p.target for p in predicted])
            assert metrics[0].val_loss == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-4, abs=1e-6)
            assert metrics[0].val_auc == pytest.approx(auc_or_none(targets.numpy(), probs), abs=1e-6)
    assert {r.image_key for r in expected} == {p.image_key for p in predicted}


def test_head_only_phase_freezes_the_backbone(weights_file):
    """In the head-only epoch the backbone is bit-identical afterwards, has requires_grad False, no gradient and
    no optimizer state; the head does learn."""
    from tasks.models import is_head_parameter, resolve_imagenet_weights
    from tasks.train_loop import make_setup, train_one_epoch

    config = resolve_train_config("smoke", "imagenet", {"augment.enabled": "false"})
    assert config.freeze_epochs == 1
    runtime = choose_runtime(config)
    backbone, _ = resolve_imagenet_weights(weights_file, allow_download=False)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 32, 32, generator=generator), torch.arange(16) % 2
    setup = make_setup(config=config, runtime=runtime, backbone=backbone, seed=0, y_train=y)
    before = state_copy(setup.model)
    train_one_epoch(setup, x, y, epoch=0)
    named = dict(setup.model.named_parameters())
    backbone_names = [n for n in named if not is_head_parameter(n)]
    head_names = [n for n in named if is_head_parameter(n)]
    assert backbone_names and head_names
    for name in backbone_names:
        assert torch.equal(named[name].detach().cpu(), before[name]), name
        assert not named[name].requires_grad and named[name].grad is None, name
        assert named[name] not in setup.optimizer.state, name
    assert any(not torch.equal(named[n].detach().cpu(), before[n]) for n in head_names)
    train_one_epoch(setup, x, y, epoch=1)  # the full phase trains the backbone again
    assert all(named[n].requires_grad for n in backbone_names)
    assert any(not torch.equal(named[n].detach().cpu(), before[n]) for n in backbone_names)


# ------------------------------------------------------------------------------ independence of the pseudonyms


def test_split_and_losses_do_not_depend_on_the_pseudonymization_key(tmp_path, monkeypatch):
    """The same DICOM ingested with two HMAC keys: other pseudonyms and row order, the same split by pixel content
    and the same per-epoch training losses."""
    from flows.ingest import ingest_flow
    from tasks.dataset_store import load_dataset
    from tasks.pseudonymize import HMAC_KEY_ENV
    from tasks.synth import synthesize_cohort

    cohort = synthesize_cohort(tmp_path / "cohort", patients=10, slices_per_patient=2, seed=5, matrix_sizes=(64,))
    outcomes = []
    for key in ("first-secret", "second-secret"):
        monkeypatch.setenv(HMAC_KEY_ENV, key)
        dataset_dir = tmp_path / key / "dataset"
        ingest_flow(src_dir=str(cohort.dicom_dir), out_dir=str(dataset_dir), labels=str(cohort.labels_path), size=32)
        run_dir = tmp_path / key / "runs" / "scratch"
        summary = train_arm(dataset_dir=dataset_dir, plan_path=one_run_plan(run_dir, "scratch"), run=".")
        assert summary.status == "completed"
        dataset = load_dataset(dataset_dir)
        pixels = {r.image_key: dataset.images[r.index].tobytes() for r in dataset.manifest}
        split = [(pixels[r.image_key], r.part, r.fold) for r in read_models_csv(tmp_path / key / "runs" / "splits.csv", SplitRow)]
        losses = [(m.train_loss, m.val_loss, m.train_eval_loss) for m in _metrics(run_dir)]
        outcomes.append((set(pixels), {r.patient_key for r in dataset.manifest}, split, losses))
    (keys_a, patients_a, split_a, losses_a), (keys_b, patients_b, split_b, losses_b) = outcomes
    assert not (keys_a & keys_b) and not (patients_a & patients_b)  # the pseudonyms really differ
    assert split_a == split_b
    assert losses_a == losses_b


# ------------------------------------------------------------------------------------------------------- the plan


def test_plan_resolves_settings_once_with_one_set_of_names():
    from data_schemas.plan import EVALUATION_SETTING_KEYS, build_run_plan, with_cost_inputs

    plan = build_run_plan(profile="smoke", arms=["scratch", "imagenet"], seed=4,
                          settings={"epochs": "3", "operating_point": "sensitivity:0.9", "aggregation": "max"},
                          fractions=[0.5, 1.0])
    assert plan.overrides == {"epochs": "3"} and not set(plan.overrides) & set(EVALUATION_SETTING_KEYS)
    assert plan.evaluation.operating_point == "sensitivity:0.9" and plan.evaluation.aggregation == "max"
    assert plan.split.mode == "holdout" and plan.split.outer_folds == 1 and plan.split.seed == 4
    assert [r.run_dir for r in plan.runs] == ["runs/scratch/main", "runs/scratch/fraction-0.5", "runs/imagenet/main", "runs/imagenet/fraction-0.5"]
    assert all(r.config.epochs == 3 for r in plan.runs) and plan.run("runs/imagenet/main").config.freeze_epochs == 1
    assert plan.run("runs/scratch/fraction-0.5").config.train_fraction == 0.5
    costed = with_cost_inputs(plan, n_train_images=40).cost
    assert (costed.n_images, costed.epochs, costed.head_warmup_epochs, costed.arms) == (40, 3, 1, ["scratch", "imagenet"])

    cross = build_run_plan(profile="smoke", arms=["scratch"], seed=0, folds=3)
    assert cross.split.mode == cross.evaluation.mode == "cross-validated" and cross.split.outer_folds == 3
    assert [r.run_dir for r in cross.pooled_runs("scratch")] == ["runs/scratch/main", "runs/scratch/fold-1", "runs/scratch/fold-2"]
    single = build_run_plan(profile="smoke", arms=["scratch"], seed=0, folds=2, layout="single-arm")
    assert [r.run_dir for r in single.runs] == ["fold-0", "fold-1"]
    full = build_run_plan(profile="full", arms=["scratch"], seed=0)
    assert (full.evaluation.mode, full.split.outer_folds, len(full.runs)) == ("cross-validated", 5, 5)
    with pytest.raises(ValueError, match="operating_point"):
        build_run_plan(profile="smoke", arms=["scratch"], seed=0, settings={"operating_point": "best"})
    with pytest.raises(ValueError, match="known settings: .*non_inferiority_margin"):
        build_run_plan(profile="smoke", arms=["scratch"], seed=0, settings={"epochz": "3"})
    with pytest.raises(ValueError, match="choose one of smoke, cpu, full"):
        build_run_plan(profile="gpu", arms=["scratch"], seed=0)
