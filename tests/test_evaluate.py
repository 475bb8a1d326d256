"""Tests of tasks.evaluation.evaluate.build_results on run folders written directly with the schemas (no training
code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from report_fixtures import SKIP_REASON, Patient, make_patients, write_comparison, write_dataset_and_split, write_run

from data_schemas.evaluation import EvaluationSettings
from data_schemas.files import read_models_csv
from data_schemas.report import ComparisonResults
from data_schemas.training import METRICS_FILE, PREDICTIONS_FILE, VAL_PREDICTIONS_FILE, EpochMetrics, PredictionRow
from reports.render import render_report
from reports.wording import word_results
from tasks.evaluation import pooling, statistics as st
from tasks.evaluation.evaluate import ArmRunFolders, build_results


def _build(
    root: Path, arm_runs: dict[str, list[Path]], mode: str, dataset_dir: Path, splits: Path, **settings
) -> ComparisonResults:
    return word_results(
        build_results(
            dataset_dir=dataset_dir,
            splits_path=splits,
            runs=ArmRunFolders(pooled=arm_runs),
            evaluation=EvaluationSettings(mode=mode, outer_folds=3, n_bootstrap=50, **settings),
            cost_path=root / "cost.json",
            run_id="test-run",
            seed=0,
            command="ctcompare compare",
        )
    )


def _test_patients(run_dirs: list[Path]) -> list[str]:
    return [
        key
        for d in run_dirs
        for key in sorted({r.patient_key for r in read_models_csv(d / PREDICTIONS_FILE, PredictionRow)})
    ]


@pytest.mark.parametrize("mode, n_runs", [("holdout", 1), ("cross-validated", 3)])
def test_pooling_covers_each_test_patient_once(tmp_path: Path, mode: str, n_runs: int) -> None:
    dataset_dir, splits, arm_runs = write_comparison(tmp_path, arms=("scratch", "imagenet"), mode=mode)
    results = _build(tmp_path, arm_runs, mode, dataset_dir, splits)
    ComparisonResults.model_validate_json(results.model_dump_json())  # what results.json holds validates again
    assert results.evaluation.mode == mode and results.evaluation.runs_per_arm == {
        "scratch": n_runs,
        "imagenet": n_runs,
    }
    tested = _test_patients(arm_runs["scratch"])
    assert len(tested) == len(set(tested)) == (12 if mode == "holdout" else 36)
    n_images = sum(len(read_models_csv(d / PREDICTIONS_FILE, PredictionRow)) for d in arm_runs["scratch"])
    for arm in results.completed_arms:
        assert arm.n_runs == n_runs
        assert arm.test_metrics.n_images == n_images and arm.test_metrics.n_patients == len(tested)
        assert arm.patient_metrics.level == "patient" and arm.patient_metrics.n_patients == len(tested)
        assert len(arm.operating_point.slice_thresholds) == n_runs and arm.operating_point.source == "validation"
    assert sorted(row.pseudonym for row in results.patients) == sorted(key[:12] for key in tested)
    assert all(set(row.probs) == {"scratch", "imagenet"} for row in results.patients)
    (pair,) = results.comparisons
    assert pair.n_patients == len(tested) and pair.n_images == n_images
    assert "permutation" in pair.delong.method and pair.patient_delong.p_holm is not None
    assert pair.delong.p_holm == pair.delong.p_value  # one pair: Holm's adjustment leaves its p unchanged
    assert results.evaluation.n_test_images == n_images
    assert results.reproducibility.seeds["split"] == 0 and "torch" in results.reproducibility.package_versions
    # one budget per distinct compute: both arms of report_fixtures have the same FLOPs, so one budget holding both,
    # priced by the first arm by name (imagenet, 640 s per run), never by list order
    (budget,) = results.what_to_train.budgets
    assert budget.budget_flops == results.arm("scratch").cost.total_flops == results.arm("imagenet").cost.total_flops
    assert budget.budget_seconds == 640.0 * n_runs
    assert pair.mcnemar.method in ("clustered", "exact_permutation") and "Durkalski" in results.evaluation.decision_test
    assert (results.folds is not None) == (mode == "cross-validated")
    if results.folds:
        assert [len(f.per_fold) for f in results.folds] == [3, 3]
        assert [f.n_test_patients for f in results.folds[0].per_fold] == [12, 12, 12]
    assert results.recommendation.margin == 0.02 and results.recommendation.headline
    assert results.evaluation.notes[0].startswith("Cross-validated" if n_runs > 1 else "Hold-out")
    assert "1/√n" in results.evaluation.notes[0]  # how interval width differs between the modes
    assert "patient_key" not in results.model_dump_json()


def test_each_fold_applies_its_own_validation_threshold(tmp_path: Path) -> None:
    dataset_dir, splits, arm_runs = write_comparison(tmp_path, arms=("scratch",), mode="cross-validated")
    results = _build(tmp_path, arm_runs, "cross-validated", dataset_dir, splits, operating_point="sensitivity:0.8")
    arm = results.arm("scratch")
    hits = positives = 0
    for k, run_dir in enumerate(arm_runs["scratch"]):
        val = read_models_csv(run_dir / VAL_PREDICTIONS_FILE, PredictionRow)
        expected = pooling.choose_operating_point(
            [r.target for r in val], [r.prob_positive for r in val], "sensitivity", 0.8
        )
        assert arm.operating_point.slice_thresholds[k] == pytest.approx(expected.threshold)
        test = read_models_csv(run_dir / PREDICTIONS_FILE, PredictionRow)
        hits += sum(r.target == 1 and r.prob_positive >= expected.threshold for r in test)
        positives += sum(r.target == 1 for r in test)
    assert arm.test_metrics.sensitivity.value == pytest.approx(hits / positives)
    assert arm.operating_point.rule == "sensitivity:0.8" and arm.test_metrics.threshold is None  # three thresholds


def test_runs_without_validation_predictions_fall_back_to_a_labelled_half(tmp_path: Path) -> None:
    dataset_dir, splits, arm_runs = write_comparison(tmp_path, arms=("scratch",), mode="holdout", without_val=True)
    arm = _build(tmp_path, arm_runs, "holdout", dataset_dir, splits).arm("scratch")
    assert arm.operating_point.source == "fallback" and arm.operating_point.slice_thresholds == [0.5]
    assert VAL_PREDICTIONS_FILE in arm.operating_point.note and arm.test_metrics.threshold == 0.5


def test_overlapping_or_surplus_runs_are_refused(tmp_path: Path) -> None:
    dataset_dir, splits, arm_runs = write_comparison(tmp_path, arms=("scratch",), mode="cross-validated")
    twice = {"scratch": [arm_runs["scratch"][0], arm_runs["scratch"][0]]}
    with pytest.raises(ValueError, match="both test the same patient"):
        _build(tmp_path, twice, "cross-validated", dataset_dir, splits)
    with pytest.raises(ValueError, match="cross-validated"):
        _build(tmp_path, arm_runs, "holdout", dataset_dir, splits)


def test_like_for_like_overfitting_gap_and_stopping_monitor(tmp_path: Path) -> None:
    dataset_dir, splits, arm_runs = write_comparison(tmp_path, arms=("scratch",), mode="holdout")
    arm = _build(tmp_path, arm_runs, "holdout", dataset_dir, splits).arm("scratch")
    history = read_models_csv(arm_runs["scratch"][0] / METRICS_FILE, EpochMetrics)
    best = next(m for m in history if m.epoch == arm.best_epoch)
    assert arm.overfitting_gap == pytest.approx(best.val_loss - best.train_eval_loss)
    assert arm.overfitting_gap != pytest.approx(best.val_loss - best.train_loss)
    assert arm.early_stopping.monitor == "val_loss" and "small validation set" in arm.early_stopping.why
    assert arm.learning_curve[0].train_eval_loss == history[0].train_eval_loss


def _single_positive_cohort(tmp_path: Path, test: list[Patient]) -> ComparisonResults:
    val = make_patients(10, seed=5, prefix="v")
    dataset_dir, splits = write_dataset_and_split(tmp_path, test, val)
    arm_runs = {
        arm: [write_run(tmp_path / "runs" / arm, arm=arm, test=test, val=val, seed=i)]
        for i, arm in enumerate(("scratch", "imagenet"))
    }
    return _build(tmp_path, arm_runs, "holdout", dataset_dir, splits)


def test_exactly_one_positive_image_is_not_estimable_not_a_crash(tmp_path: Path) -> None:
    test = [Patient("pos" + "a" * 20, 1, 1, 0.0)] + [Patient(f"neg{i}" + "b" * 20, 0, 3, 0.0) for i in range(5)]
    results = _single_positive_cohort(tmp_path, test)
    (pair,) = results.comparisons
    for test_result in (pair.delong, pair.patient_delong):
        assert test_result.diff is None and test_result.p_value is None and "not estimable" in test_result.reason
    assert results.recommendation.basis == "too_few" and results.recommendation.preferred_arm is None
    assert results.arm("scratch").test_metrics.roc_auc.value is not None  # the AUC itself exists; its test does not
    paths = render_report(results, tmp_path / "report")
    for key in ("html", "markdown"):
        text = paths[key].read_text(encoding="utf-8")
        assert "not estimable: 1 positive and 5 negative patients" in text and "nan" not in text.lower().split()


def test_one_patient_is_not_estimable_not_a_crash(tmp_path: Path) -> None:
    results = _single_positive_cohort(tmp_path, [Patient("only" + "c" * 20, 1, 4, 0.0)])
    arm = results.arm("scratch")
    assert arm.test_metrics.roc_auc.value is None and arm.patient_metrics.n_patients == 1
    assert "not estimable: 1 positive and 0 negative patients" in results.comparisons[0].patient_delong.reason


def test_skipped_arm_keeps_its_reason(tmp_path: Path) -> None:
    dataset_dir, splits, arm_runs = write_comparison(
        tmp_path, arms=("scratch", "imagenet"), mode="cross-validated", skip=("imagenet",)
    )
    results = _build(tmp_path, arm_runs, "cross-validated", dataset_dir, splits)
    imagenet = results.arm("imagenet")
    assert imagenet.status == "skipped" and SKIP_REASON in imagenet.reason and imagenet.reason.startswith("run 1 of 3")
    assert results.recommendation.basis == "single_arm" and not results.comparisons


def test_same_inputs_give_the_same_numbers(tmp_path: Path) -> None:
    dataset_dir, splits, arm_runs = write_comparison(tmp_path, arms=("scratch", "imagenet"), mode="cross-validated")
    first = _build(tmp_path, arm_runs, "cross-validated", dataset_dir, splits)
    again = _build(
        tmp_path, {k: list(v) for k, v in reversed(list(arm_runs.items()))}, "cross-validated", dataset_dir, splits
    )
    assert first.arm("scratch").patient_metrics == again.arm("scratch").patient_metrics
    assert first.comparisons[0].patient_delong == again.comparisons[0].patient_delong
    assert np.isfinite(first.comparisons[0].patient_delong.p_value)


def _auc_by_hand(rows: list[PredictionRow]) -> float:
    """Image-level AUC as the share of (positive, negative) pairs ranked right, ties counting half."""
    pos = [r.prob_positive for r in rows if r.target == 1]
    neg = [r.prob_positive for r in rows if r.target == 0]
    return float(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]))


def test_data_efficiency_and_input_size_points_by_hand(tmp_path: Path) -> None:
    """Each completed run gives one point, sorted by fraction or size (a failed run none): its image-level test AUC
    recomputed by hand, the patient-clustered bootstrap interval with the settings' resamples and the seed, the
    training patients and images from config.json, and FLOPs = per-image FLOPs x images seen from timing.json."""
    from data_schemas.training import TIMING_FILE
    from tasks.evaluation.what_to_train import efficiency_points, size_points

    test = make_patients(14, seed=5)
    evaluation = EvaluationSettings(n_bootstrap=40)
    half = write_run(tmp_path / "half", arm="scratch", test=test, val=None, seed=1, n_train_patients=40)
    full = write_run(tmp_path / "full", arm="scratch", test=test, val=None, seed=2, n_train_patients=80)
    failed = write_run(
        tmp_path / "failed", arm="scratch", test=test, val=None, seed=3, status="failed", reason="out of memory"
    )
    points = efficiency_points("scratch", {1.0: full, 0.25: failed, 0.5: half}, evaluation, seed=7)
    assert [(p.arm, p.fraction, p.n_train_patients, p.n_train_images) for p in points] == [
        ("scratch", 0.5, 40, 400),
        ("scratch", 1.0, 80, 400),
    ]
    for point, run_dir in zip(points, [half, full]):
        rows = read_models_csv(run_dir / PREDICTIONS_FILE, PredictionRow)
        assert point.test_auc.value == pytest.approx(_auc_by_hand(rows), abs=1e-12)
        ci = st.bootstrap_ci([r.target for r in rows], [r.prob_positive for r in rows], [r.patient_key for r in rows],
                             metrics=["roc_auc"], n_resamples=40, seed=7)["roc_auc"]
        assert (point.test_auc.ci_low, point.test_auc.ci_high) == (ci.ci_low, ci.ci_high)
        assert point.test_auc.ci_low < point.test_auc.value < point.test_auc.ci_high
    other_seed = efficiency_points("scratch", {0.5: half}, evaluation, seed=8)[0].test_auc
    assert other_seed.value == points[0].test_auc.value and other_seed.ci_low != points[0].test_auc.ci_low

    linear = write_run(tmp_path / "linear", arm="imagenet-linear", test=test, val=None, seed=4)
    untimed = write_run(tmp_path / "untimed", arm="scratch", test=test, val=None, seed=5)
    (untimed / TIMING_FILE).unlink()
    sizes = size_points("scratch", {64: full, 32: half, 16: failed, 128: untimed}, evaluation, seed=7)
    assert [p.image_size for p in sizes] == [32, 64, 128]
    assert (
        sizes[0].train_seconds == 600.0
        and sizes[0].train_flops == 1.23e10 * 3200
        and sizes[0].forward_flops_per_image == 4.1e9
    )
    assert sizes[0].test_auc.value == pytest.approx(
        _auc_by_hand(read_models_csv(half / PREDICTIONS_FILE, PredictionRow)), abs=1e-12
    )
    assert sizes[0].test_auc.ci_low == points[0].test_auc.ci_low and sizes[0].arm == "scratch"
    assert (sizes[2].train_seconds, sizes[2].train_flops, sizes[2].forward_flops_per_image) == (None, None, None)
    (probe,) = size_points("imagenet-linear", {64: linear}, evaluation, seed=7)
    assert probe.train_flops == 4.1e9 * 3200 and probe.train_seconds == 90.0  # a linear probe only runs forward
    one_class = write_run(
        tmp_path / "one-class", arm="scratch", test=[p for p in test if p.target == 1], val=None, seed=6
    )
    (undefined,) = efficiency_points("scratch", {1.0: one_class}, evaluation, seed=7)
    assert undefined.test_auc.value is None  # no negative image: no AUC, not NaN


def test_fraction_runs_and_a_cost_file_beside_the_runs_reach_the_results(tmp_path: Path) -> None:
    """build_results turns --fractions runs into data-efficiency points (AUC recomputed by hand) and prices each arm
    from the cost.json beside the runs: the estimate of the 8 epochs run is the cost file's planned 8-epoch
    this-machine estimate, and utilisation is the runs' achieved 5e11 FLOP/s over this machine's fp32 peak there.
    An arm the cost file does not price has no estimate."""
    from data_schemas.cost import THIS_MACHINE
    from data_schemas.files import write_model_json
    from tasks.cost import estimate as C

    dataset_dir, splits, arm_runs = write_comparison(tmp_path, arms=("scratch", "imagenet"), mode="holdout")
    cost = C.build_cost_report(C.resolve_cost_inputs(n_images=400, image_size=32, epochs=8, arms=["scratch"]))
    write_model_json(tmp_path / "cost.json", cost)
    half = write_run(
        tmp_path / "half", arm="scratch", test=make_patients(14, seed=5), val=None, seed=1, n_train_patients=40
    )
    results = build_results(
        dataset_dir=dataset_dir, splits_path=splits,
        runs=ArmRunFolders(pooled=arm_runs, fractions={"scratch": {0.5: half}}),
        evaluation=EvaluationSettings(n_bootstrap=20), cost_path=tmp_path / "cost.json", run_id="test-run", seed=0,
        command="ctcompare compare",
    )
    (point,) = results.data_efficiency
    assert (point.arm, point.fraction, point.n_train_patients) == ("scratch", 0.5, 40)
    assert point.test_auc.value == pytest.approx(
        _auc_by_hand(read_models_csv(half / PREDICTIONS_FILE, PredictionRow)), abs=1e-12
    )
    planned = next(d for d in cost.arm("scratch").devices if d.device == THIS_MACHINE)
    peak = next(d for d in cost.devices if d.name == THIS_MACHINE).rates["fp32"].peak_tflops * 1e12
    scratch = results.arm("scratch").cost
    assert scratch.estimated_seconds == pytest.approx(planned.seconds, rel=1e-12)
    assert scratch.utilisation == pytest.approx(min(1.0, 5e11 / peak), rel=1e-12)
    assert results.arm("imagenet").cost.estimated_seconds is None


def test_probe_depths_mark_the_chosen_depth_only(tmp_path: Path) -> None:
    """probe_depths.json of an imagenet-linear run: one point per depth, chosen only at its chosen_depth; a trained
    arm has no depth points."""
    from data_schemas.files import write_model_json
    from data_schemas.training import PROBE_DEPTHS_FILE, DepthProbe, ProbeDepths
    from tasks.evaluation.what_to_train import depth_points

    probes = ProbeDepths(model="resnet50", chosen_depth="layer3", depths=[
        DepthProbe(depth="layer2", feature_dim=512, C=1.0, val_auc=0.7, test_auc=0.68),
        DepthProbe(depth="layer3", feature_dim=1024, C=0.5, val_auc=0.8, test_auc=0.77),
        DepthProbe(depth="layer4", feature_dim=2048, C=0.1, val_auc=0.75, test_auc=None),
    ])
    write_model_json(tmp_path / PROBE_DEPTHS_FILE, probes)
    points = depth_points("imagenet-linear", tmp_path)
    assert [(p.depth, p.feature_dim, p.val_auc, p.test_auc, p.chosen) for p in points] == [
        ("layer2", 512, 0.7, 0.68, False), ("layer3", 1024, 0.8, 0.77, True), ("layer4", 2048, 0.75, None, False)]
    assert depth_points("scratch", tmp_path) == []


def test_overfitting_gap_at_chosen_and_last_epoch_per_fold_with_a_patient_bootstrap(tmp_path: Path) -> None:
    """Every outer fold gets its gap at the chosen and at the last epoch from overfitting_losses.csv: mean validation
    loss minus mean training loss recomputed by hand, and an interval that resamples patients (a resample of whole
    patients by hand with the same generator gives the same bounds)."""
    from data_schemas.training import OVERFITTING_LOSSES_FILE, OverfittingLossRow
    from tasks.evaluation.overfitting import bootstrap_gap

    dataset_dir, splits, arm_runs = write_comparison(tmp_path, arms=("scratch",), mode="cross-validated")
    arm = _build(tmp_path, arm_runs, "cross-validated", dataset_dir, splits).arm("scratch")
    assert sorted((g.fold, g.role) for g in arm.overfitting) == [(f, r) for f in range(3) for r in ("chosen", "last")]
    for gap in arm.overfitting:
        rows = [r for r in read_models_csv(arm_runs["scratch"][gap.fold] / OVERFITTING_LOSSES_FILE, OverfittingLossRow)
                if r.role == gap.role]
        val, train = [r.loss for r in rows if r.part == "val"], [r.loss for r in rows if r.part == "train"]
        assert gap.gap.value == pytest.approx(np.mean(val) - np.mean(train), abs=1e-12)
        assert (
            gap.epoch == (5 if gap.role == "chosen" else 8) and gap.n_val_patients == 16 and gap.n_train_patients == 20
        )
        assert gap.gap.ci_low < gap.gap.value < gap.gap.ci_high
        # by hand: per-patient sums and counts, patients drawn with replacement in each part
        def sums(part: str) -> tuple[np.ndarray, np.ndarray]:
            keys = sorted({r.patient_key for r in rows if r.part == part})
            return (np.array([sum(r.loss for r in rows if r.part == part and r.patient_key == k) for k in keys]),
                    np.array([sum(1 for r in rows if r.part == part and r.patient_key == k) for k in keys]))
        (ts, tn), (vs, vn) = sums("train"), sums("val")
        rng = np.random.default_rng(0)
        ti, vi = rng.integers(0, tn.size, (50, tn.size)), rng.integers(0, vn.size, (50, vn.size))
        boot = vs[vi].sum(1) / vn[vi].sum(1) - ts[ti].sum(1) / tn[ti].sum(1)
        assert (gap.gap.ci_low, gap.gap.ci_high) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
    last = [g.gap.value for g in arm.overfitting if g.role == "last"]
    chosen = [g.gap.value for g in arm.overfitting if g.role == "chosen"]
    assert min(last) > max(chosen)  # the fixture overfits after its chosen epoch: the last epoch shows it
    one = [OverfittingLossRow(epoch=1, role="chosen", part=p, patient_key="k", loss=0.5) for p in ("train", "val")]
    assert bootstrap_gap(one[:1], one[1:], 10, 0).ci_low is None  # one patient per part: no interval


def test_runs_without_per_image_losses_give_point_gaps_from_metrics(tmp_path: Path) -> None:
    from data_schemas.training import OVERFITTING_LOSSES_FILE

    dataset_dir, splits, arm_runs = write_comparison(tmp_path, arms=("scratch",), mode="holdout")
    (arm_runs["scratch"][0] / OVERFITTING_LOSSES_FILE).unlink()
    arm = _build(tmp_path, arm_runs, "holdout", dataset_dir, splits).arm("scratch")
    history = {m.epoch: m for m in read_models_csv(arm_runs["scratch"][0] / METRICS_FILE, EpochMetrics)}
    for gap in arm.overfitting:
        row = history[gap.epoch]
        assert gap.gap.value == pytest.approx(row.val_loss - row.train_eval_loss) and gap.gap.ci_low is None
    assert [g.epoch for g in arm.overfitting] == [5, 8]
