"""Training stage end to end on a small synthetic dataset (smoke profile, CPU, no network)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_schemas.dataset import DatasetCard, DatasetFingerprint, ManifestRow, NumericSummary, WindowSpec
from data_schemas.files import read_model_json, read_models_csv, sha256_file
from data_schemas.plan import build_run_plan
from data_schemas.training import (
    BEST_FILE,
    CHECKPOINT_FILE,
    VAL_PREDICTIONS_FILE,
    EpochMetrics,
    LinearProbeModel,
    PredictionRow,
    ProbeDepths,
    RunConfig,
    RunSummary,
    SplitRow,
    TimingInfo,
    TrainConfig,
    resolve_train_config,
)
from flows.cli import UsageError
from tasks.common.runtime import choose_runtime
from tasks.ingest.dataset_store import write_dataset
from tasks.training.loop import predict_probs, state_copy
from tasks.training.train import TrainingInterrupted, train_arm
from tests.ship_fixtures import one_run_plan

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
    from flows.cli import train as train_flow_module

    parser = argparse.ArgumentParser(prog="ctcompare")
    train_flow_module.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError:
        return 2


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
    code = _cli(
        ["train", str(dataset_dir), "--arm", "scratch", "--out", str(run_dir), "--profile", "smoke", "--seed", "0"]
    )
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

    # a completed run is not resumed, so its checkpoint (several times best.pt's size) is gone
    assert not (run_dir / CHECKPOINT_FILE).exists()
    # a second run with the same configuration is not trained again
    stamp = (run_dir / BEST_FILE).stat().st_mtime_ns
    assert _cli(["train", str(dataset_dir), "--arm", "scratch", "--out", str(run_dir), "--profile", "smoke"]) == 0
    assert (run_dir / BEST_FILE).stat().st_mtime_ns == stamp


def test_best_checkpoint_is_the_best_epoch(dataset_dir, runs):
    run_dir = runs / "scratch"  # made by the test above
    metrics = _metrics(run_dir)
    best_epoch = 1 + int(np.argmin([m.val_loss for m in metrics]))  # default monitor; first minimum wins ties
    best = torch.load(run_dir / BEST_FILE, map_location="cpu", weights_only=True)
    assert best["epoch"] == best_epoch
    assert [m.epoch for m in metrics if m.is_best][-1] == best_epoch
    # the test predictions were made with exactly these weights
    config = read_model_json(run_dir / "config.json", RunConfig)
    from tasks.ingest.dataset_store import load_dataset
    from tasks.training.augment import images_to_tensor
    from tasks.training.models import scratch_resnet50

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

    import tasks.training.train as train_module

    reference = _metrics(runs / "scratch")  # uninterrupted, same seed and config
    run_dir = runs / "scratch-interrupted"
    calls: list[dict] = []
    real_train_arm = train_module.train_arm

    def flaky_train_arm(*args, **kwargs):
        record = {"resume": kwargs["resume"], "epochs": []}
        calls.append(record)
        publish_progress = kwargs.pop("on_epoch_end", None)  # the task's progress artifact

        def on_epoch_end(epoch: int) -> None:
            if publish_progress is not None:
                publish_progress(epoch)
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
    summary = train_arm(
        dataset_dir=dataset_dir, plan_path=one_run_plan(run_dir, "imagenet"), run=".", weights_path=weights_file
    )
    assert _check_outputs(run_dir).status == "completed" and summary.epochs_run == 2
    config = read_model_json(run_dir / "config.json", RunConfig)
    assert (
        config.weights is not None
        and config.weights.sha256 == sha256_file(weights_file)
        and config.weights.hash_checked
    )
    assert config.splits_sha256 == read_model_json(runs / "scratch" / "config.json", RunConfig).splits_sha256
    metrics = _metrics(run_dir)
    assert metrics[0].phase == "head" and metrics[0].lr_backbone == 0.0  # head-only warm-up epoch
    assert metrics[1].phase == "full" and 0 < metrics[1].lr_backbone < metrics[1].lr_head


def test_linear_arm(dataset_dir, runs, weights_file):
    run_dir = runs / "linear"
    summary = train_arm(
        dataset_dir=dataset_dir, plan_path=one_run_plan(run_dir, "imagenet-linear"), run=".", weights_path=weights_file
    )
    assert _check_outputs(run_dir).status == "completed" and summary.epochs_run == 1
    probe = read_model_json(run_dir / "linear_model.json", LinearProbeModel)
    depths = read_model_json(run_dir / "probe_depths.json", ProbeDepths)
    assert [d.depth for d in depths.depths] == ["layer2", "layer3", "layer4"]
    assert [d.feature_dim for d in depths.depths] == [512, 1024, 2048]
    assert (
        len(probe.coef) == {d.depth: d.feature_dim for d in depths.depths}[depths.chosen_depth]
        and probe.C in probe.Cs_tried
    )
    assert _metrics(run_dir)[0].phase == "linear"
    _check_overfitting_losses(run_dir, _metrics(run_dir), chosen=1, last=1)


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
    from flows.cli import train as train_flow_module

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
    from tasks.ingest.dataset_store import load_dataset
    from tasks.training.augment import images_to_tensor

    dataset = load_dataset(dataset_dir)
    index_of = {r.image_key: r.index for r in dataset.manifest}
    return images_to_tensor(dataset.images[[index_of[k] for k in keys]], size)


# The arm of the cases whose subject is the training loop (early stopping, its wording, independence of the
# pseudonyms), not the network: a ResNet-18 runs the same loop as the default ResNet-50 in a fraction of the time.
LOOP_ARM = "resnet18:scratch"


def _epoch_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The training log's per-epoch lines ('ARM epoch N/M ...')."""
    return [r.getMessage() for r in caplog.records if " epoch " in r.getMessage() and "train_loss=" in r.getMessage()]


def test_early_stopping_fires_and_outputs_come_from_the_best_epoch(dataset_dir, runs, caplog):
    """A run stopped early whose best epoch is not its last: predictions and logged validation figures come from
    best.pt on the validation part (never the test part, never the last epoch's weights). Its last epoch's log
    line, epoch 3 of 12, says "early stop"."""
    import torch.nn.functional as F

    from data_schemas.plan import read_plan
    from tasks.splits import parts_for_fold, read_splits
    from tasks.training.loop import auc_or_none
    from tasks.training.models import build_model

    run_dir = runs / "early-stop"
    # no later epoch can improve the validation loss by 10: epoch 1 stays best, patience 1 would stop after epoch 2,
    # min_epochs 3 holds it to epoch 3, long before the 12 allowed epochs
    settings = {"epochs": "12", "early_stopping_patience": "1", "early_stopping_min_delta": "10", "min_epochs": "3"}
    plan_path = one_run_plan(run_dir, LOOP_ARM, settings)
    caplog.set_level("INFO", logger="ctcompare.train")
    summary = train_arm(dataset_dir=dataset_dir, plan_path=plan_path, run=".")
    assert summary.status == "completed" and summary.epochs_run == 3 and summary.best_epoch == 1
    lines = _epoch_lines(caplog)
    assert [line.split(": ")[0] for line in lines] == [f"{LOOP_ARM} epoch {n}/12" for n in (1, 2, 3)]
    assert [line.endswith("[early stop]") for line in lines] == [False, False, True], lines
    metrics = _metrics(run_dir)
    assert [m.is_best for m in metrics] == [True, False, False]
    assert all(m.train_eval_loss is not None and m.train_eval_loss > 0 for m in metrics)
    config = read_model_json(run_dir / "config.json", RunConfig)
    assert "val_loss" in config.model_selection and config.train.early_stopping_monitor == "val_loss"

    best = torch.load(run_dir / BEST_FILE, map_location="cpu", weights_only=True)
    assert best["epoch"] == 1
    model = build_model("resnet18", dropout=config.train.dropout)
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
    _check_overfitting_losses(run_dir, metrics, chosen=1, last=3)


def test_a_run_whose_patience_ends_on_its_last_planned_epoch_is_not_called_an_early_stop(dataset_dir, runs, caplog):
    """Patience 1 runs out after epoch 2 of 2: training ended where it was planned to, so no line says "early
    stop"."""
    run_dir = runs / "stop-on-last-epoch"
    settings = {"epochs": "2", "early_stopping_patience": "1", "early_stopping_min_delta": "10", "min_epochs": "1"}
    caplog.set_level("INFO", logger="ctcompare.train")
    summary = train_arm(dataset_dir=dataset_dir, plan_path=one_run_plan(run_dir, LOOP_ARM, settings), run=".")
    assert summary.status == "completed" and summary.epochs_run == 2 and summary.best_epoch == 1
    lines = _epoch_lines(caplog)
    assert [line.split(": ")[0] for line in lines] == [f"{LOOP_ARM} epoch 1/2", f"{LOOP_ARM} epoch 2/2"]
    assert not [line for line in lines if "early stop" in line], lines


def _check_overfitting_losses(run_dir: Path, metrics: list, *, chosen: int, last: int) -> None:
    """overfitting_losses.csv holds, at the chosen and at the last epoch, per-image losses whose means are that
    epoch's logged val_loss and train_eval_loss, one row per validation image and per training-subsample image."""
    from data_schemas.training import OVERFITTING_LOSSES_FILE, OverfittingLossRow

    rows = read_models_csv(run_dir / OVERFITTING_LOSSES_FILE, OverfittingLossRow)
    n_val = len(read_models_csv(run_dir / VAL_PREDICTIONS_FILE, PredictionRow))
    for role, epoch in (("chosen", chosen), ("last", last)):
        logged = next(m for m in metrics if m.epoch == epoch)
        val = [r.loss for r in rows if r.role == role and r.part == "val"]
        train = [r.loss for r in rows if r.role == role and r.part == "train"]
        assert {r.epoch for r in rows if r.role == role} == {epoch} and len(val) == n_val and train
        assert np.mean(val) == pytest.approx(logged.val_loss, rel=1e-4, abs=1e-6)
        assert np.mean(train) == pytest.approx(logged.train_eval_loss, rel=1e-4, abs=1e-6)


def test_head_only_phase_freezes_the_backbone(weights_file):
    """In the head-only epoch the backbone is bit-identical afterwards, has requires_grad False, no gradient and
    no optimizer state; the head does learn."""
    from tasks.training.loop import make_setup, train_one_epoch
    from tasks.training.models import is_head_parameter
    from tasks.training.weights import resolve_imagenet_weights

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
    from tasks.demo.synth import synthesize_cohort
    from tasks.ingest.dataset_store import load_dataset
    from tasks.ingest.pseudonymize import HMAC_KEY_ENV

    cohort = synthesize_cohort(tmp_path / "cohort", patients=10, slices_per_patient=2, seed=5, matrix_sizes=(64,))
    outcomes = []
    for key in ("first-secret", "second-secret"):
        monkeypatch.setenv(HMAC_KEY_ENV, key)
        dataset_dir = tmp_path / key / "dataset"
        ingest_flow(src_dir=str(cohort.dicom_dir), out_dir=str(dataset_dir), labels=str(cohort.labels_path), size=32)
        run_dir = tmp_path / key / "runs" / "scratch"
        summary = train_arm(dataset_dir=dataset_dir, plan_path=one_run_plan(run_dir, LOOP_ARM), run=".")
        assert summary.status == "completed"
        dataset = load_dataset(dataset_dir)
        pixels = {r.image_key: dataset.images[r.index].tobytes() for r in dataset.manifest}
        split = [
            (pixels[r.image_key], r.part, r.fold)
            for r in read_models_csv(tmp_path / key / "runs" / "splits.csv", SplitRow)
        ]
        losses = [(m.train_loss, m.val_loss, m.train_eval_loss) for m in _metrics(run_dir)]
        outcomes.append((set(pixels), {r.patient_key for r in dataset.manifest}, split, losses))
    (keys_a, patients_a, split_a, losses_a), (keys_b, patients_b, split_b, losses_b) = outcomes
    assert not (keys_a & keys_b) and not (patients_a & patients_b)  # the pseudonyms really differ
    assert split_a == split_b
    assert losses_a == losses_b


# ------------------------------------------------------------------------------------------------------- the plan


def test_plan_resolves_settings_once_with_one_set_of_names():
    from data_schemas.plan import EVALUATION_SETTING_KEYS, with_cost_inputs

    plan = build_run_plan(profile="smoke", arms=["scratch", "imagenet"], seed=4,
                          settings={"epochs": "3", "operating_point": "sensitivity:0.9", "aggregation": "max"},
                          fractions=[0.5, 1.0])
    assert plan.overrides == {"epochs": "3"} and not set(plan.overrides) & set(EVALUATION_SETTING_KEYS)
    assert plan.evaluation.operating_point == "sensitivity:0.9" and plan.evaluation.aggregation == "max"
    assert plan.split.mode == "holdout" and plan.split.outer_folds == 1 and plan.split.seed == 4
    assert [r.run_dir for r in plan.runs] == [
        "runs/scratch/main",
        "runs/scratch/fraction-0.5",
        "runs/imagenet/main",
        "runs/imagenet/fraction-0.5",
    ]
    assert all(r.config.epochs == 3 for r in plan.runs) and plan.run("runs/imagenet/main").config.freeze_epochs == 1
    assert plan.run("runs/scratch/fraction-0.5").config.train_fraction == 0.5
    costed = with_cost_inputs(plan, n_train_images=40).cost
    assert (costed.n_images, costed.epochs, costed.head_warmup_epochs, costed.arms) == (
        40,
        3,
        1,
        ["scratch", "imagenet"],
    )

    cross = build_run_plan(profile="smoke", arms=["scratch"], seed=0, folds=3)
    assert cross.split.mode == cross.evaluation.mode == "cross-validated" and cross.split.outer_folds == 3
    assert [r.run_dir for r in cross.pooled_runs("scratch")] == [
        "runs/scratch/main",
        "runs/scratch/fold-1",
        "runs/scratch/fold-2",
    ]
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


# ------------------------------------------------- the training loop in-process (tiny network: seconds, no Prefect)


class _TinyNet(torch.nn.Module):
    """A two-layer network with ResNet-50's parameter names for the head ("fc") and a norm layer (no decay)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 3, 3)
        self.bn1 = torch.nn.BatchNorm2d(3)
        self.drop = torch.nn.Dropout(dropout)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn1(self.conv1(x))).mean(dim=(2, 3))))


def _tiny_config(**overrides) -> TrainConfig:

    values = dict(image_size=32, epochs=6, batch_size=4, eval_batch_size=3, lr=0.05, device="cpu", precision="fp32",
                  channels_last="off", augment={"enabled": False}, class_balance="none", label_smoothing=0.0,
                  dropout=0.0, early_stopping_patience=2, min_epochs=1, schedule="constant", warmup_epochs=0.0)
    return TrainConfig(**{**values, **overrides})


def _tiny_setup(config, *, head_epochs: int = 0, seed: int = 0, backbone_mult: float = 1.0):
    from tasks.training.loop import FitSetup, make_optimizer, param_groups

    torch.manual_seed(seed)
    model = _TinyNet()
    optimizer = make_optimizer(param_groups(model, config, backbone_mult), config)
    return FitSetup(model=model, optimizer=optimizer, config=config, runtime=choose_runtime(config), seed=seed,
                    head_epochs=head_epochs)


def _tiny_data(n_train: int = 10, n_val: int = 6):
    from tasks.training.loop import FitData

    generator = torch.Generator().manual_seed(1)
    x_train, x_val = torch.rand(n_train, 1, 8, 8, generator=generator), torch.rand(n_val, 1, 8, 8, generator=generator)
    y_train, y_val = torch.arange(n_train) % 2, torch.arange(n_val) % 2
    return FitData(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_train_eval=x_train[:5],
                   y_train_eval=y_train[:5])


def _select(config, val_losses, val_aucs=None, train_losses=None):
    """update_selection over a scripted sequence of epochs: (improved flags, bad_epochs, stopped flags, state)."""
    from tasks.training.loop import TrainState, update_selection

    state, improved, bad, stopped = TrainState(), [], [], []
    for i, val_loss in enumerate(val_losses):
        state.epoch = i + 1
        state.best_state = {"marker": torch.zeros(1)}  # a copy taken after the previous epoch
        improved.append(update_selection(state, config, val_loss=val_loss,
                                         val_auc=None if val_aucs is None else val_aucs[i],
                                         train_loss=0.5 if train_losses is None else train_losses[i]))
        bad.append(state.bad_epochs)
        stopped.append(state.stopped)
    return improved, bad, stopped, state


def test_selection_by_validation_loss_and_patience():
    improved, bad, stopped, state = _select(_tiny_config(early_stopping_patience=2), [1.0, 0.75, 0.875, 0.8125],
                                            val_aucs=[0.5, 0.625, 0.9, 0.95])
    assert improved == [True, True, False, False] and bad == [0, 0, 1, 2] and stopped == [False, False, False, True]
    assert state.best_epoch == 2 and state.best_metric == -0.75
    assert state.best_val_loss == 0.75 and state.best_val_auc == 0.625  # the best epoch's, not the last or best AUC
    assert state.best_state == {"marker": torch.zeros(1)}  # kept: the last improvement was an earlier epoch
    improved, bad, _, state = _select(_tiny_config(early_stopping_patience=2), [1.0, 1.5, 0.5])
    assert improved == [True, False, True] and bad == [0, 1, 0] and state.best_state is None  # the live weights


def test_an_improvement_must_exceed_min_delta():
    config = _tiny_config(early_stopping_min_delta=0.25, early_stopping_patience=5)
    improved, bad, _, state = _select(config, [1.0, 0.75, 0.5, 0.25])  # 0.25 better is not more than 0.25 better
    assert improved == [True, False, True, False] and bad == [0, 1, 0, 1] and state.best_epoch == 3


def test_no_early_stop_before_min_epochs_capped_at_epochs():
    worse = [1.0, 1.5, 2.0, 2.5, 3.0]
    _, _, stopped, _ = _select(_tiny_config(early_stopping_patience=1, min_epochs=3, epochs=6), worse)
    assert stopped == [False, False, True, True, True]
    _, _, stopped, _ = _select(_tiny_config(early_stopping_patience=1, min_epochs=5, epochs=2), worse[:2])
    assert stopped == [False, True]  # min_epochs beyond the epochs planned is capped at them
    _, _, stopped, _ = _select(_tiny_config(early_stopping_patience=None), worse)
    assert stopped == [False] * 5  # no patience: never stops


def test_selection_by_auc_moving_average():
    from tasks.training.loop import EMA_ALPHA

    assert EMA_ALPHA == 0.5
    config = _tiny_config(early_stopping_monitor="val_auc_ema", early_stopping_patience=5)
    # EMA: 0.6, (1.0 + 0.6) / 2 = 0.8, (0.9 + 0.8) / 2 = 0.85, (0.5 + 0.85) / 2 = 0.675: the third epoch wins, not the
    # second with the highest raw AUC; the validation loss is ignored.
    improved, _, _, state = _select(config, [0.1, 0.9, 0.9, 0.05], val_aucs=[0.6, 1.0, 0.9, 0.5])
    assert improved == [True, True, True, False] and state.best_epoch == 3
    assert state.best_metric == pytest.approx(0.85) and state.auc_ema == pytest.approx(0.675)
    assert state.best_val_auc == 0.9 and state.best_val_loss == 0.9
    # Without AUC (one class in validation) the loss decides; an undefined AUC leaves the average alone.
    improved, _, _, state = _select(config, [1.0, 0.5, 0.75], val_aucs=[None, None, None])
    assert improved == [True, True, False] and state.auc_ema is None and state.best_metric == -0.5
    improved, _, _, state = _select(config, [1.0, 1.0], val_aucs=[0.8, None])
    assert state.auc_ema == 0.8 and improved == [True, False]


def test_selection_falls_back_to_training_loss_without_validation():
    improved, _, _, state = _select(_tiny_config(), [None, None, None], train_losses=[0.75, 0.5, 0.625])
    assert improved == [True, True, False] and state.best_epoch == 2 and state.best_metric == -0.5


def test_epoch_seeds_are_distinct_and_wrap_below_2_63():
    from tasks.training.loop import epoch_seed

    assert epoch_seed(1, 2, 3) == 1_000_003 + 2 * 7_919 + 3
    assert epoch_seed(0, 0, 0) == 0
    # 2**63 = 1 modulo 2**63 - 1, and 1_000_003 = 2 * 500_001 + 1: 2**62 * 1_000_003 = 500_001 + 2**62 (mod 2**63 - 1)
    assert epoch_seed(2**62, 0, 0) == 2**62 + 500_001


def test_learning_rate_schedule_values():
    from tasks.training.loop import lr_factor

    cosine = _tiny_config(epochs=4, schedule="cosine", warmup_epochs=1.0)
    # 2 steps per epoch: 8 steps, warm-up over min(1 * 2, 0.5 * 8) = 2 steps, then cosine over the 6 others.
    factors = [lr_factor(cosine, epoch, step, 2) for epoch in range(4) for step in range(2)]
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert factors == pytest.approx(expected)
    capped = _tiny_config(epochs=2, schedule="cosine", warmup_epochs=3.0)  # warm-up capped at half the steps: 2
    assert [lr_factor(capped, 0, s, 2) for s in range(2)] == pytest.approx([0.5, 1.0])
    assert lr_factor(capped, 1, 1, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    constant = _tiny_config(epochs=3, schedule="constant", warmup_epochs=1.0)
    assert [lr_factor(constant, e, s, 4) for e in range(3) for s in range(4)] == pytest.approx(
        [0.25, 0.5, 0.75] + [1.0] * 9
    )
    onecycle = _tiny_config(epochs=2, schedule="onecycle", warmup_epochs=0.0)  # warm-up 30% of 10 steps
    assert [lr_factor(onecycle, 0, s, 5) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_factor(onecycle, 1, 4, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 7)))
    # A head-only phase restarts the schedule: 1 head epoch, then 3 full epochs (6 steps, warm-up 2 steps).
    phased = _tiny_config(epochs=4, freeze_epochs=1, schedule="cosine", warmup_epochs=1.0)
    assert [lr_factor(phased, 0, s, 2) for s in range(2)] == pytest.approx([1.0, 1.0])  # warm-up min(2, 0.5*2) = 1
    assert [lr_factor(phased, 1, s, 2) for s in range(2)] == pytest.approx([0.5, 1.0])
    assert lr_factor(phased, 3, 1, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 4)))
    none = _tiny_config(epochs=2, schedule="cosine", warmup_epochs=0.0)
    assert lr_factor(none, 0, 0, 2) == 1.0 and lr_factor(none, 1, 1, 2) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 3 / 4))
    )


def test_parameter_groups_and_optimizers():
    from tasks.training.loop import make_optimizer, param_groups

    config = _tiny_config(weight_decay=0.25, lr=0.125)
    model = _TinyNet()
    groups = {g["name"]: g for g in param_groups(model, config, backbone_mult=0.5)}
    assert set(groups) == {"head", "head-no_decay", "backbone", "backbone-no_decay"}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["head"] == {id(model.fc.weight)} and ids["head-no_decay"] == {id(model.fc.bias)}
    assert ids["backbone"] == {id(model.conv1.weight)}
    assert ids["backbone-no_decay"] == {id(model.conv1.bias), id(model.bn1.weight), id(model.bn1.bias)}
    assert {n: g["weight_decay"] for n, g in groups.items()} == {
        "head": 0.25,
        "head-no_decay": 0.0,
        "backbone": 0.25,
        "backbone-no_decay": 0.0,
    }
    assert {n: g["lr_mult"] for n, g in groups.items()} == {
        "head": 1.0,
        "head-no_decay": 1.0,
        "backbone": 0.5,
        "backbone-no_decay": 0.5,
    }
    assert {n: g["is_head"] for n, g in groups.items()} == {
        "head": True,
        "head-no_decay": True,
        "backbone": False,
        "backbone-no_decay": False,
    }
    assert all(g["lr"] == 0.125 for g in groups.values())
    adamw = make_optimizer(param_groups(model, config, 1.0), config)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["lr"] == 0.125
    sgd_config = _tiny_config(optimizer="sgd", momentum=0.75)
    sgd = make_optimizer(param_groups(model, sgd_config, 1.0), sgd_config)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.75 and sgd.defaults["nesterov"] is True
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.05, 0.0, 0.05, 0.0]  # sorted: backbone first


def test_head_phase_learning_rates_and_freezing():
    from tasks.training.loop import _set_lr, freeze_backbone

    config = _tiny_config(lr=0.5, schedule="constant", warmup_epochs=0.0)
    setup = _tiny_setup(config, backbone_mult=0.25)
    assert _set_lr(setup, 0, 0, 2, head_phase=True) == {"head": 0.5, "backbone": 0.0}
    assert _set_lr(setup, 0, 0, 2, head_phase=False) == {"head": 0.5, "backbone": 0.125}
    assert sorted(g["lr"] for g in setup.optimizer.param_groups) == [0.125, 0.125, 0.5, 0.5]
    untagged = torch.optim.SGD(setup.model.parameters(), lr=1.0)  # a group without lr_mult/is_head: the head's rate
    setup_untagged = _tiny_setup(config)
    setup_untagged.optimizer = untagged
    assert _set_lr(setup_untagged, 0, 0, 2, head_phase=True) == {"head": 0.5} and untagged.param_groups[0]["lr"] == 0.5
    freeze_backbone(setup.model, True)
    assert {n: p.requires_grad for n, p in setup.model.named_parameters()} == {
        "conv1.weight": False,
        "conv1.bias": False,
        "bn1.weight": False,
        "bn1.bias": False,
        "fc.weight": True,
        "fc.bias": True,
    }
    freeze_backbone(setup.model, False)
    assert all(p.requires_grad for p in setup.model.parameters())


def test_one_epoch_steps_images_order_and_loss():
    """10 images in batches of 4: 2 steps of 4 (the last partial batch dropped); the loss sum is the images' loss
    recomputed from the same batches; the same (seed, epoch) repeats exactly, another epoch reorders."""
    from tasks.training.augment import normalise
    from tasks.training.loop import epoch_seed, train_one_epoch

    config = _tiny_config(lr=1e-9)  # the weights barely move: the loss sum is recomputable from the start weights
    data = _tiny_data()
    setup = _tiny_setup(config)
    start = state_copy(setup.model)
    result = train_one_epoch(setup, data.x_train, data.y_train, epoch=0)
    assert (result.steps, result.images) == (2, 8) and result.lr == {"head": 1e-9, "backbone": 1e-9}
    generator = torch.Generator().manual_seed(epoch_seed(0, 0, 2))  # the batch order's seed
    order = torch.randperm(10, generator=generator)[:8]
    fresh = _TinyNet()
    fresh.load_state_dict(start)
    fresh.train()
    with torch.no_grad():
        expected = sum(
            float(
                torch.nn.functional.cross_entropy(
                    fresh(normalise(data.x_train[order[i : i + 4]])), data.y_train[order[i : i + 4]]
                )
            )
            * 4
            for i in (0, 4)
        )
    assert result.loss_sum == pytest.approx(expected, rel=1e-4)
    again = _tiny_setup(config)
    assert train_one_epoch(again, data.x_train, data.y_train, epoch=0).loss_sum == result.loss_sum
    assert torch.equal(again.model.fc.weight, setup.model.fc.weight)
    other = _tiny_setup(config)
    assert train_one_epoch(other, data.x_train, data.y_train, epoch=1).loss_sum != result.loss_sum
    whole = train_one_epoch(_tiny_setup(_tiny_config(batch_size=32)), data.x_train, data.y_train, epoch=0)
    assert (whole.steps, whole.images) == (1, 10)


def test_one_epoch_with_a_head_phase_trains_only_the_head():
    from tasks.training.loop import train_one_epoch

    config = _tiny_config(lr=0.1)
    data = _tiny_data()
    setup = _tiny_setup(config, head_epochs=1, backbone_mult=0.5)
    before = state_copy(setup.model)
    result = train_one_epoch(setup, data.x_train, data.y_train, epoch=0)
    assert result.lr == {"head": 0.1, "backbone": 0.0}
    assert (
        torch.equal(setup.model.conv1.weight.detach(), before["conv1.weight"]) and setup.model.conv1.weight.grad is None
    )
    assert not torch.equal(setup.model.fc.weight.detach(), before["fc.weight"])
    result = train_one_epoch(setup, data.x_train, data.y_train, epoch=1)
    assert result.lr == {"head": 0.1, "backbone": 0.05}
    assert not torch.equal(setup.model.conv1.weight.detach(), before["conv1.weight"])


def test_class_weighted_loss_and_label_smoothing_in_a_step():
    """_step's loss: cross-entropy with class weights and label smoothing, computed here by hand."""
    from tasks.training.augment import normalise
    from tasks.training.loop import _step

    config = _tiny_config(lr=1e-9, label_smoothing=0.25)
    setup = _tiny_setup(config)
    setup.class_weights = torch.tensor([1.0, 3.0])
    x = normalise(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    y = torch.tensor([0, 1, 1, 0])
    setup.model.eval()  # batch norm from running statistics: the same logits before and during the step
    with torch.no_grad():
        logp = torch.log_softmax(setup.model(x), dim=1)
    target = torch.nn.functional.one_hot(y, 2).float() * 0.75 + 0.125  # smoothing 0.25 over 2 classes
    weights = torch.tensor([1.0, 3.0])
    # Soft targets: sum over images of -sum_c w_c t_ic log p_ic, divided by the number of images.
    expected = float(-(target * weights * logp).sum() / 4)
    loss = _step(setup, x, torch.nn.functional.one_hot(y, 2).float())
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert setup.model.fc.weight.grad is not None


def test_predictions_and_validation_metrics_by_hand():
    """predict_probs in eval mode (dropout off), any batch size; _evaluate's losses and AUC recomputed by hand."""
    from tasks.training.augment import normalise
    from tasks.training.loop import _evaluate, auc_or_none, plain_loss, predict_probs

    data = _tiny_data(n_val=8)
    config = _tiny_config(eval_batch_size=3)
    setup = _tiny_setup(config)
    setup.model.drop.p = 0.9
    setup.model.train()
    probs, logits = predict_probs(setup.model, data.x_val, setup.runtime, batch_size=3)
    assert not setup.model.training
    with torch.no_grad():
        reference = setup.model(normalise(data.x_val))
    assert torch.allclose(logits, reference, atol=1e-6)
    assert np.allclose(probs, (1 / (1 + torch.exp(reference[:, 0] - reference[:, 1]))).numpy(), atol=1e-6)
    empty_probs, empty_logits = predict_probs(setup.model, data.x_val[:0], setup.runtime, batch_size=3)
    assert empty_probs.shape == (0,) and empty_logits.shape == (0, 2)

    def by_hand_loss(logit: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.mean(torch.logsumexp(logit, dim=1) - logit[torch.arange(len(y)), y]))

    def by_hand_auc(y: np.ndarray, p: np.ndarray) -> float:
        pos, neg = p[y == 1], p[y == 0]
        return float(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]))

    metrics = _evaluate(setup, data)
    assert metrics["val_loss"] == pytest.approx(by_hand_loss(reference, data.y_val), rel=1e-5)
    assert metrics["val_auc"] == pytest.approx(by_hand_auc(data.y_val.numpy(), probs))
    with torch.no_grad():
        train_reference = setup.model(normalise(data.x_train_eval))
    assert metrics["train_eval_loss"] == pytest.approx(by_hand_loss(train_reference, data.y_train_eval), rel=1e-5)
    assert plain_loss(torch.zeros((0, 2)), torch.zeros(0, dtype=torch.long)) is None
    assert plain_loss(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1])) == pytest.approx(math.log(4 / 3))
    assert auc_or_none(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert auc_or_none(np.array([1, 1]), np.array([0.1, 0.4])) is None


def test_train_eval_subsample_is_fixed_sorted_and_capped():
    from tasks.training.loop import TRAIN_EVAL_IMAGES, train_eval_subsample

    assert TRAIN_EVAL_IMAGES == 512
    assert torch.equal(train_eval_subsample(10, seed=0), torch.arange(10))
    big = train_eval_subsample(2000, seed=0)
    assert (
        len(big) == 512
        and len(set(big.tolist())) == 512
        and torch.equal(big, big.sort().values)
        and int(big.max()) < 2000
    )
    assert torch.equal(big, train_eval_subsample(2000, seed=0)) and not torch.equal(
        big, train_eval_subsample(2000, seed=1)
    )


def test_fit_stops_early_and_keeps_the_best_epochs_weights(monkeypatch):
    """Scripted validation losses 0.9, 0.7, 0.8, 0.75: the best epoch is 2, patience 2 ends the run after epoch 4;
    the best weights are those saved after epoch 2 (a copy, not the live weights that trained on)."""
    import tasks.training.loop as train_loop

    losses = iter([0.9, 0.7, 0.8, 0.75, 0.1, 0.1])
    monkeypatch.setattr(
        train_loop,
        "_evaluate",
        lambda setup, data, progress=None, epoch=None: {
            "val_loss": next(losses), "val_auc": 0.5, "train_eval_loss": 0.25,
        },
    )
    config = _tiny_config(epochs=6, early_stopping_patience=2, min_epochs=1, lr=0.05, freeze_epochs=1)
    setup, data = _tiny_setup(config, head_epochs=1), _tiny_data()
    saved, calls = {}, []

    def on_epoch_end(state, improved):
        calls.append((state.epoch, improved, state.best_state is None))
        saved[state.epoch] = state_copy(setup.model)

    import time

    started = time.perf_counter()
    state = train_loop.fit(setup, data, train_loop.TrainState(), on_epoch_end)
    wall = time.perf_counter() - started
    assert 0 < state.train_seconds and 0 <= state.eval_seconds and state.train_seconds + state.eval_seconds <= wall
    assert calls == [(1, True, True), (2, True, True), (3, False, False), (4, False, False)]
    assert state.epoch == 4 and state.stopped and state.best_epoch == 2 and state.best_val_loss == 0.7
    assert state.step == 4 * 2 and state.images_seen == 4 * 8
    assert all(torch.equal(state.best_state[k], saved[2][k]) for k in saved[2])
    assert not torch.equal(state.best_state["fc.weight"], setup.model.fc.weight.detach())
    history = [EpochMetrics.model_validate(row) for row in state.history]
    assert [h.epoch for h in history] == [1, 2, 3, 4] and [h.is_best for h in history] == [True, True, False, False]
    assert [h.phase for h in history] == ["head", "full", "full", "full"] and [h.val_loss for h in history] == [
        0.9,
        0.7,
        0.8,
        0.75,
    ]
    assert [h.lr_backbone for h in history] == [0.0, 0.05, 0.05, 0.05] and all(
        h.train_eval_loss == 0.25 for h in history
    )
    assert history[-1].elapsed_seconds == pytest.approx(state.train_seconds + state.eval_seconds)
    assert train_loop.fit(setup, data, state, on_epoch_end) is state and len(calls) == 4  # stopped: nothing more


def test_fit_runs_all_epochs_without_patience(monkeypatch):
    import tasks.training.loop as train_loop

    monkeypatch.setattr(
        train_loop,
        "_evaluate",
        lambda setup, data, progress=None, epoch=None: {"val_loss": 1.0, "val_auc": None, "train_eval_loss": None},
    )
    config = _tiny_config(epochs=3, early_stopping_patience=None)
    state = train_loop.fit(_tiny_setup(config), _tiny_data(), train_loop.TrainState(), lambda state, improved: None)
    assert state.epoch == 3 and not state.stopped and state.best_epoch == 1 and state.bad_epochs == 2
    assert [row["train_loss"] > 0 for row in state.history] == [True] * 3


def test_selection_is_described_with_its_numbers():
    from tasks.training.run_identity import describe_selection

    text = describe_selection(_tiny_config(early_stopping_patience=4, min_epochs=9, epochs=6))
    assert text.startswith("best epoch by val_loss: plain cross-entropy")
    assert "stop after 4 epochs without improvement, not before epoch 6" in text and text.endswith("the test part is "
                                                                                                   "never used")
    text = describe_selection(_tiny_config(early_stopping_monitor="val_auc_ema", early_stopping_patience=None))
    assert "weight 0.5 on the newest epoch" in text and "no early stopping" in text


def test_setup_of_each_arm_kind():
    """Seeded model, head-only epochs only for a pretrained arm (capped at the epochs), its backbone's weights and
    lower learning rate, and the class balancing (weights n / (2 n_c) or a sampler of 1 / n_c), on ResNet-18."""
    from torchvision.models import resnet18

    from tasks.training.loop import make_setup

    config = _tiny_config(epochs=3, freeze_epochs=5, backbone_lr_mult=0.25, class_balance="loss_weights")
    runtime = choose_runtime(config)
    y = torch.tensor([0, 0, 0, 1])
    scratch = make_setup(
        config=config, runtime=runtime, backbone=None, seed=3, y_train=y, label="s", arm="resnet18:scratch"
    )
    assert (scratch.head_epochs, scratch.model_name, scratch.label, scratch.seed) == (0, "resnet18", "s", 3)
    assert torch.allclose(scratch.class_weights, torch.tensor([4 / 6, 4 / 2])) and scratch.sample_weights is None
    assert scratch.scaler is None and scratch.config is config and scratch.runtime is runtime
    assert {g["lr_mult"] for g in scratch.optimizer.param_groups} == {1.0}  # scratch trains the backbone at full rate
    assert {n for g in scratch.optimizer.param_groups for n in [g["name"]]} == {
        "head",
        "head-no_decay",
        "backbone",
        "backbone-no_decay",
    }
    again = make_setup(config=config, runtime=runtime, backbone=None, seed=3, y_train=y, arm="resnet18:scratch")
    same = [torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), scratch.model.state_dict().values())]
    assert all(same)
    other = make_setup(config=config, runtime=runtime, backbone=None, seed=4, y_train=y, arm="resnet18:scratch")
    assert not torch.equal(other.model.state_dict()["conv1.weight"], scratch.model.state_dict()["conv1.weight"])

    torch.manual_seed(11)
    backbone = {k: v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}
    pretrained = make_setup(
        config=config, runtime=runtime, backbone=backbone, seed=3, y_train=y, arm="resnet18:imagenet"
    )
    assert pretrained.head_epochs == 3 and pretrained.model_name == "resnet18"  # min(freeze_epochs 5, epochs 3)
    assert torch.equal(pretrained.model.state_dict()["layer1.0.conv1.weight"], backbone["layer1.0.conv1.weight"])
    assert {g["name"]: g["lr_mult"] for g in pretrained.optimizer.param_groups} == {
        "backbone": 0.25, "backbone-no_decay": 0.25, "head": 1.0, "head-no_decay": 1.0}
    two = _tiny_config(epochs=3, freeze_epochs=2)
    assert (
        make_setup(
            config=two, runtime=runtime, backbone=backbone, seed=0, y_train=y, arm="resnet18:imagenet"
        ).head_epochs
        == 2
    )

    sampler = make_setup(
        config=_tiny_config(class_balance="sampler"),
        runtime=runtime,
        backbone=None,
        seed=0,
        y_train=y,
        arm="resnet18:scratch",
    )
    assert sampler.class_weights is None and torch.allclose(
        sampler.sample_weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    )
    plain = make_setup(
        config=_tiny_config(class_balance="none", optimizer="sgd"),
        runtime=runtime,
        backbone=None,
        seed=0,
        y_train=torch.tensor([1, 1]),
        arm="resnet18:scratch",
    )
    assert plain.class_weights is None and plain.sample_weights is None and type(plain.optimizer) is torch.optim.SGD
    one_class = make_setup(
        config=config, runtime=runtime, backbone=None, seed=0, y_train=torch.tensor([1, 1]), arm="resnet18:scratch"
    )
    assert torch.allclose(one_class.class_weights, torch.tensor([1.0, 0.5]))  # an absent class counts as 1: 2 / (2 * 1)
    with pytest.raises(ValueError, match="linear probe"):
        make_setup(config=config, runtime=runtime, backbone=backbone, seed=0, y_train=y, arm="resnet18:imagenet-linear")
    default = make_setup(config=config, runtime=runtime, backbone=None, seed=0, y_train=y)  # no arm, no backbone
    assert (default.model_name, default.head_epochs) == ("resnet50", 0)  # the ResNet-50 scratch arm
