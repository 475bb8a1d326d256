""" "What to train" and the input-size curve never name a winner from a point estimate; interval-width sentences say
what was measured and what is expected. Built by the real evaluation stage from run folders (report_fixtures)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import report_fixtures
from report_fixtures import make_patients, write_comparison, write_dataset_and_split, write_run

from data_schemas.evaluation import EvaluationSettings
from data_schemas.files import read_models_csv
from data_schemas.report import ComparisonResults
from data_schemas.training import PREDICTIONS_FILE, VAL_PREDICTIONS_FILE, PredictionRow
from reports.render import render_report
from reports.wording import word_results
from tasks.evaluation import pairs, statistics as st
from tasks.evaluation.evaluate import ArmRunFolders, build_results
from tasks.evaluation.what_to_train import size_points


def _results(
    root: Path,
    arm_runs: dict[str, list[Path]],
    dataset_dir: Path,
    splits: Path,
    mode: str = "holdout",
    size_dirs: dict[str, dict[int, Path]] | None = None,
) -> ComparisonResults:
    return word_results(
        build_results(
            dataset_dir=dataset_dir,
            splits_path=splits,
            runs=ArmRunFolders(pooled=arm_runs, sizes=size_dirs),
            evaluation=EvaluationSettings(mode=mode, outer_folds=3, n_bootstrap=60),
            cost_path=root / "cost.json",
            run_id="t",
            seed=0,
            command="ctcompare compare",
        )
    )


def _auc(path: Path) -> float:
    rows = read_models_csv(path, PredictionRow)
    return st.roc_auc([r.target for r in rows], [r.prob_positive for r in rows])


def test_a_tie_is_named_a_tie_whatever_the_arm_order(tmp_path: Path) -> None:
    """Two arms with identical predictions tie: both are named, neither is 'best', and the order of the arms given
    to the evaluation does not change which one the numbers name first."""
    test, val = make_patients(24, seed=3), make_patients(12, seed=4, prefix="v")
    dataset_dir, splits = write_dataset_and_split(tmp_path, test, val)
    arms = (
        "resnet18:scratch",
        "resnet18:imagenet",
    )  # the same strength in report_fixtures: same seed, same predictions
    runs = {
        arm: [write_run(tmp_path / "runs" / arm.replace(":", "-"), arm=arm, test=test, val=val, seed=1)] for arm in arms
    }
    assert _auc(runs[arms[0]][0] / PREDICTIONS_FILE) == _auc(runs[arms[1]][0] / PREDICTIONS_FILE)
    first = _results(tmp_path, runs, dataset_dir, splits)
    again = _results(tmp_path, dict(reversed(list(runs.items()))), dataset_dir, splits)
    for results in (first, again):
        what = results.what_to_train
        assert (what.highest_arm, what.tied_with, what.shown_best) == ("resnet18:imagenet", ["resnet18:scratch"], False)
        text = " ".join(what.sentences)
        assert "resnet18:imagenet and resnet18:scratch tie for the highest point estimate" in text
        assert "no arm is called best" in text and "best arm is" not in text
    html = render_report(first, tmp_path / "report")["html"].read_text(encoding="utf-8")
    assert "tie for the highest point estimate" in html


def test_best_only_when_the_paired_test_shows_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weak and a strong arm on many patients: the paired test separates them and only then is one called best;
    on few patients with overlapping intervals the highest point estimate is named as such and nothing more."""
    monkeypatch.setitem(report_fixtures.ARM_STRENGTH, "scratch", 0.05)
    monkeypatch.setitem(report_fixtures.ARM_STRENGTH, "imagenet", 3.0)
    dataset_dir, splits, runs = write_comparison(
        tmp_path / "many", arms=("scratch", "imagenet"), mode="holdout", n_patients=150
    )
    what = _results(tmp_path / "many", runs, dataset_dir, splits).what_to_train
    assert what.highest_arm == "imagenet" and what.shown_best and not what.tied_with and not what.overlapping
    assert any("so it is the best here" in s for s in what.sentences)

    monkeypatch.setitem(report_fixtures.ARM_STRENGTH, "scratch", 0.5)
    monkeypatch.setitem(report_fixtures.ARM_STRENGTH, "imagenet", 0.8)
    dataset_dir, splits, runs = write_comparison(
        tmp_path / "few", arms=("scratch", "imagenet"), mode="holdout", n_patients=36
    )
    results = _results(tmp_path / "few", runs, dataset_dir, splits)
    what = results.what_to_train
    pair = results.comparisons[0].patient_delong
    assert not what.shown_best and not (pair.p_holm is not None and pair.p_holm < 0.05)
    aucs = {a.name: a.patient_metrics.roc_auc for a in results.completed_arms}
    other = next(name for name in aucs if name != what.highest_arm)
    assert aucs[what.highest_arm].value > aucs[other].value + 0.0005 and not what.tied_with
    overlap = (
        aucs[other].ci_low <= aucs[what.highest_arm].ci_high and aucs[what.highest_arm].ci_low <= aucs[other].ci_high
    )
    assert (other in what.overlapping) == overlap
    text = " ".join(what.sentences)
    assert "highest point estimate" in text and "no arm is called best" in text and "best here" not in text

    # the same two arms far apart on 8 test patients (4 per class): below the recommendation's minimum, never best
    monkeypatch.setitem(report_fixtures.ARM_STRENGTH, "scratch", 0.05)
    monkeypatch.setitem(report_fixtures.ARM_STRENGTH, "imagenet", 3.0)
    dataset_dir, splits, runs = write_comparison(
        tmp_path / "tiny", arms=("scratch", "imagenet"), mode="holdout", n_patients=24
    )
    results = _results(tmp_path / "tiny", runs, dataset_dir, splits)
    assert results.recommendation.basis == "too_few" and results.comparisons[0].patient_delong.n_positive < 10
    assert not results.what_to_train.shown_best and "best here" not in " ".join(results.what_to_train.sentences)


def test_input_size_is_chosen_on_validation_never_on_test(tmp_path: Path) -> None:
    """The size whose run has the higher validation AUC is chosen even when another size has the higher test AUC;
    the other size's test AUC is compared with the chosen one's by a paired test on the same test images."""
    test, val = make_patients(24, seed=3), make_patients(16, seed=4, prefix="v")
    strong = write_run(tmp_path / "size-64", arm="imagenet", test=test, val=val, seed=2)  # strength 1.3
    weak = write_run(tmp_path / "size-32", arm="scratch", test=test, val=val, seed=5)  # strength 0.7
    # swap the validation predictions: the weak run now looks better on validation, the strong one on test
    shutil.copy(strong / VAL_PREDICTIONS_FILE, tmp_path / "strong_val.csv")
    shutil.copy(weak / VAL_PREDICTIONS_FILE, strong / VAL_PREDICTIONS_FILE)
    shutil.copy(tmp_path / "strong_val.csv", weak / VAL_PREDICTIONS_FILE)
    val_auc = {32: _auc(weak / VAL_PREDICTIONS_FILE), 64: _auc(strong / VAL_PREDICTIONS_FILE)}
    test_auc = {32: _auc(weak / PREDICTIONS_FILE), 64: _auc(strong / PREDICTIONS_FILE)}
    assert val_auc[32] > val_auc[64] and test_auc[64] > test_auc[32]
    points = {
        p.image_size: p for p in size_points("scratch", {32: weak, 64: strong}, EvaluationSettings(n_bootstrap=40), 0)
    }
    assert points[32].chosen and not points[64].chosen
    assert points[32].val_auc == pytest.approx(val_auc[32]) and points[64].val_auc == pytest.approx(val_auc[64])
    rows = {s: read_models_csv(d / PREDICTIONS_FILE, PredictionRow) for s, d in ((32, weak), (64, strong))}
    by_hand = pairs.paired_auc_comparison(
        [r.target for r in rows[64]],
        [r.prob_positive for r in rows[64]],
        [r.prob_positive for r in rows[32]],
        groups=[r.patient_key for r in rows[64]],
    )
    assert points[64].vs_chosen.diff == pytest.approx(test_auc[64] - test_auc[32])
    assert points[64].vs_chosen.p_value == pytest.approx(by_hand.p_value) and points[32].vs_chosen is None

    dataset_dir, splits = write_dataset_and_split(tmp_path, test, val)
    results = _results(
        tmp_path, {"scratch": [weak]}, dataset_dir, splits, size_dirs={"scratch": {32: weak, 64: strong}}
    )
    assert results.what_to_train.chosen_size == {"scratch": 32}
    (line,) = [s for s in results.what_to_train.sentences if "px" in s]
    assert "32 px is chosen on validation AUC" in line and "never on test" in line
    assert "the highest test point estimate is at 64 px" in line and "best" not in line


def test_no_size_is_chosen_without_validation_predictions(tmp_path: Path) -> None:
    test = make_patients(16, seed=3)
    runs = {s: write_run(tmp_path / f"size-{s}", arm="scratch", test=test, val=None, seed=s) for s in (32, 48)}
    points = size_points("scratch", runs, EvaluationSettings(n_bootstrap=20), 0)
    assert not any(p.chosen for p in points) and all(p.val_auc is None and p.vs_chosen is None for p in points)


@pytest.mark.parametrize("mode", ["holdout", "cross-validated"])
def test_interval_width_sentences_state_measured_widths_and_expected_inputs(tmp_path: Path, mode: str) -> None:
    """This mode's interval widths are the measured ones; the other mode's width is called expected and shows the
    1/√n formula with its inputs (the split's own test_fraction, not a hard-coded default)."""
    dataset_dir, splits, runs = write_comparison(tmp_path, arms=("scratch", "imagenet"), mode=mode)
    results = _results(tmp_path, runs, dataset_dir, splits, mode=mode)
    note = results.evaluation.notes[0]
    for arm in results.completed_arms:
        auc = arm.patient_metrics.roc_auc
        assert f"{arm.name} {auc.ci_high - auc.ci_low:.2f}" in note
    ev = results.evaluation
    assert "Expected, not measured" in note and "default 15%" not in note
    if mode == "holdout":
        n, total = ev.n_test_patients, ev.n_labelled_patients
        assert f"√({total}/{n}) = {(total / n) ** 0.5:.1f}× narrower" in note
    else:
        fraction = ev.holdout_test_fraction
        assert fraction == 0.15  # report_fixtures' splits.json
        assert (
            f"test_fraction = {fraction:g}" in note
            and f"√(1/{fraction:g}) = {(1 / fraction) ** 0.5:.1f}× wider" in note
        )
        assert "ignore the variation between fold models" in note
