"""Failing early, in one sentence, and showing progress: labels checked against the headers before decoding, a
one-class training part refused before training, a full or read-only output in one line, task run names that say
which run, progress bars for training and feature extraction (real Prefect, torch and pydicom)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib
import io
import logging
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch

from data_schemas.files import read_model_json
from data_schemas.plan import build_run_plan, read_plan, write_plan
from data_schemas.training import CHECKPOINT_FILE, RunSummary, resolve_train_config
from tasks.common.runtime import choose_runtime
from tasks.ingest.dataset_store import load_dataset, write_dataset
from tasks.splits import parts_for_fold, read_splits
from tasks.training.train import train_arm
from tests.ship_fixtures import one_run_plan
from tests.test_progress import FakeTerminal
from tests.test_train import _cli, make_synthetic_dataset


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    make_synthetic_dataset(root)
    return root


@pytest.fixture(scope="module")
def one_abnormal_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training tests' synthetic dataset with a single abnormal patient, one the smoke split puts outside the
    training part: the training part then holds normal images only."""
    from tasks.splits import ensure_splits

    base = tmp_path_factory.mktemp("two-class")
    make_synthetic_dataset(base)
    dataset = load_dataset(base)
    settings = build_run_plan(profile="smoke", arms=["scratch"], seed=0, layout="single-arm").split
    for abnormal in sorted({r.patient_key for r in dataset.manifest if r.label == "abnormal"}):
        rows = [
            r.model_copy(update={"label": "abnormal" if r.patient_key == abnormal else "normal"})
            for r in dataset.manifest
        ]
        card = dataset.card.model_copy(update={"label_distribution": dict(Counter(r.label for r in rows))})
        root = tmp_path_factory.mktemp("one-abnormal")
        card = write_dataset(root, dataset.images, rows, card)
        split, _ = ensure_splits(manifest_rows=rows, images=dataset.images, dataset_hash=card.content_hash,
                                 splits_path=root / "probe-splits.csv", settings=settings)
        if {r.label for r in parts_for_fold(split, 0, settings)["train"]} == {"normal"}:
            return root
    raise AssertionError("no single abnormal patient falls outside the training part")


# ------------------------------------------------------------------------------------- a part with one class


def test_a_training_part_with_one_class_is_refused_before_training_and_recorded_as_failed(
    one_abnormal_dataset, tmp_path, capsys
):
    from tasks.evaluation.evaluate import read_arm

    run_dir = tmp_path / "runs" / "scratch"
    plan_path = one_run_plan(run_dir, "scratch")
    with pytest.raises(ValueError, match=r"^the training part of this run holds images of one class only \(\d+ normal, "
                                         r"0 abnormal images\)"):
        train_arm(dataset_dir=one_abnormal_dataset, plan_path=plan_path, run=".")
    rows, _ = read_splits(tmp_path / "runs" / "splits.csv")
    n_train = len(parts_for_fold(rows, 0, read_plan(plan_path).split)["train"])
    summary = read_model_json(run_dir / "status.json", RunSummary)
    assert summary.status == "failed"
    assert summary.reason.startswith(f"the training part of this run holds images of one class only ({n_train} normal, "
                                     "0 abnormal images)")
    assert not (run_dir / CHECKPOINT_FILE).exists() and not (run_dir / "metrics.csv").exists()  # no epoch ran

    # the comparison reads it as a failed arm with that reason (not "completed")
    arm, pooled, _ = read_arm("scratch", [run_dir], read_plan(plan_path).evaluation, None, 0)
    assert arm.status == "failed" and arm.reason == summary.reason and pooled is None

    # and `ctcompare train` says it in one line, exit 1
    capsys.readouterr()
    code = _cli(["train", str(one_abnormal_dataset), "--arm", "scratch", "--out", str(run_dir), "--profile", "smoke"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("ctcompare train: the ") and "one class only" in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


# ---------------------------------------------------------------------------------------------- task run names


async def _task_run_names(flow_run_id, expected: int, wait_s: float = 60.0) -> list[str]:
    """The flow run's task run names, sorted, once `expected` of them have reached the API (task runs arrive as
    events, shortly after the flow run returned) or after `wait_s`, whichever comes first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + wait_s
    async with get_client() as client:
        while True:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if len(runs) >= expected or time.monotonic() > deadline:
                return sorted(run.name for run in runs)
            await asyncio.sleep(0.5)


def test_task_run_names_say_which_run(dataset_dir, tmp_path, monkeypatch):
    """Every planned run of a comparison (main, outer folds, fractions, sizes) gets its own task run name. The name
    is given from the task's parameters before its body runs, so the body is a stand-in that stops at once."""
    from prefect import flow
    from prefect.runtime import flow_run

    import tasks.training.train as train_module
    from tasks.training.train import train_arm_task

    def stand_in(**kwargs: object) -> None:
        raise ValueError("not trained in this test")

    monkeypatch.setattr(train_module, "train_arm", stand_in)

    plan = build_run_plan(profile="smoke", arms=["scratch", "resnet18:imagenet"], seed=0, folds=2, fractions=[0.25],
                          sizes=[48])
    plan_path = write_plan(tmp_path, plan)

    @flow
    def every_run() -> str:
        for planned in plan.runs:
            train_arm_task(dataset_dir=dataset_dir, plan_path=plan_path, run=planned.run_dir, return_state=True)
        return str(flow_run.id)

    names = asyncio.run(_task_run_names(every_run(), expected=len(plan.runs)))
    assert names == sorted([
        "train-scratch-main", "train-scratch-fold1", "train-scratch-fraction0.25", "train-scratch-size48",
        "train-resnet18-imagenet-main", "train-resnet18-imagenet-fold1", "train-resnet18-imagenet-fraction0.25",
        "train-resnet18-imagenet-size48",
    ])


# ---------------------------------------------------------------------------------------------------- progress


@pytest.fixture(scope="module")
def small_setup():
    """A ResNet-18 trained from scratch on 8 images of 32 px in batches of 4 (the loop is the same for every model)."""
    from tasks.training.loop import make_setup

    config = resolve_train_config("smoke", "resnet18:scratch", {"batch_size": "4"})
    y = torch.arange(8) % 2
    setup = make_setup(config=config, runtime=choose_runtime(config), backbone=None, seed=0, y_train=y,
                       arm="resnet18:scratch")
    return setup, torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)), y


def test_training_epoch_and_evaluation_show_a_bar_on_a_terminal(small_setup, monkeypatch):
    # a bar redraws at most every 0.1 s: a fast test loop would show only its start; draw every update
    monkeypatch.setattr(importlib.import_module("tasks.common.progress"), "BAR_MIN_INTERVAL_S", 0.0)
    from tasks.training.loop import FitData, _evaluate, train_one_epoch

    setup, x, y = small_setup
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    result = train_one_epoch(setup, x, y, epoch=0, progress="scratch epoch 1/2")
    shown = terminal.getvalue()
    assert result.images == 8
    # the bar is drawn as batches finish (the finished bar is then erased: leave=False under the epoch's log line)
    assert "scratch epoch 1/2" in shown and "4/8" in shown and "image/s" in shown, shown
    assert "<" in shown  # tqdm's elapsed<time left

    terminal.seek(0), terminal.truncate()
    data = FitData(x_train=x, y_train=y, x_val=x[:6], y_val=y[:6], x_train_eval=x[:4], y_train_eval=y[:4])
    evaluation = _evaluate(setup, data, "scratch epoch 1/2 evaluation")
    assert evaluation["val_loss"] is not None and re.search(r"\b[1-9]/10\b", terminal.getvalue()), terminal.getvalue()


def test_training_off_a_terminal_adds_no_log_lines_to_a_short_epoch(small_setup, monkeypatch, caplog):
    from tasks.training.loop import train_one_epoch

    setup, x, y = small_setup
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level("INFO", logger="ctcompare.train"):
        train_one_epoch(setup, x, y, epoch=1, progress="scratch epoch 2/2")
    assert [r for r in caplog.records if "epoch 2/2" in r.getMessage()] == []  # the epoch's own line is enough


def test_feature_extraction_shows_a_bar_on_a_terminal(resnet50_weights_file, monkeypatch):
    # a bar redraws at most every 0.1 s: a fast test loop would show only its start; draw every update
    monkeypatch.setattr(importlib.import_module("tasks.common.progress"), "BAR_MIN_INTERVAL_S", 0.0)
    from tasks.training.linear_probe import extract_multi_depth_features
    from tasks.training.loop import batch_progress
    from tasks.training.models import feature_extractor
    from tasks.training.weights import resolve_imagenet_weights

    backbone, _ = resolve_imagenet_weights(resnet50_weights_file, allow_download=False)
    model = feature_extractor(backbone, model="resnet50")
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with batch_progress(6, "imagenet-linear features") as count_images:
        features = extract_multi_depth_features(model, torch.rand(6, 1, 32, 32), ["layer4"], batch_size=4,
                                                device=torch.device("cpu"), on_batch=count_images)
    assert features["layer4"].shape == (6, 2048)
    shown = terminal.getvalue()
    assert "imagenet-linear features" in shown and "4/6" in shown and "image/s" in shown, shown


# ------------------------------------------------------------------------------ full or read-only output: one line


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[Path]:
    """folder made unwritable: mode 0555 for a normal user; for root, whom modes do not stop, the immutable flag."""
    folder.mkdir(parents=True, exist_ok=True)
    as_root = os.geteuid() == 0
    subprocess.run(["chattr", "+i", str(folder)], check=True) if as_root else folder.chmod(0o555)
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True) if as_root else folder.chmod(0o755)


def _one_line_no_traceback(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert not any("Traceback" in line for line in lines), err
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("inside", [False, True], ids=["out-is-read-only", "out-inside-read-only"])
def test_read_only_output_is_refused_before_work_in_one_line(inside, dataset_dir, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    with read_only_folder(tmp_path / "locked") as locked:
        out = locked / "out" if inside else locked
        for command in (["train", str(dataset_dir), "--arm", "scratch", "--profile", "smoke"],
                        ["compare", str(dataset_dir), "--profile", "smoke", "--arms", "scratch"]):
            capsys.readouterr()
            code = main(command + ["--out", str(out)])
            line = _one_line_no_traceback(capsys.readouterr().err)
            assert code == 2
            assert line == (f"ctcompare {command[0]}: --out {out} cannot be written (checked {locked}); give a "
                            "writable folder.")
        assert list(locked.iterdir()) == []  # nothing created


def test_full_disk_during_training_is_one_sentence(dataset_dir, tmp_path, monkeypatch, capsys, caplog):
    """The disk fills up while the run writes its files (inside the Prefect task): no retry, no traceback, one
    sentence naming the file and what to do, exit 1."""
    import tasks.training.train as train_module
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    attempts: list[Path] = []

    def full_disk(run_dir: Path, config: object) -> None:
        attempts.append(run_dir)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(run_dir) / "config.json"))

    monkeypatch.setattr(train_module, "write_config", full_disk)
    run_dir = tmp_path / "runs" / "scratch"
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        code = main(["train", str(dataset_dir), "--arm", "scratch", "--out", str(run_dir), "--profile", "smoke"])
    err = capsys.readouterr().err
    assert code == 1 and len(attempts) == 1  # not retried: a retry would fill the same disk
    assert "Traceback" not in err, err
    # Prefect's own lines about it keep their one-line message but carry no traceback
    prefect_lines = [r for r in caplog.records if r.name.startswith("prefect") and "No space left" in r.getMessage()]
    assert prefect_lines and not any(r.exc_info for r in prefect_lines)
    last = err.strip().splitlines()[-1]
    assert last == (f"ctcompare train: the disk holding {run_dir / 'config.json'} is full; free space on it and "
                    "re-run: "
                    "finished work is kept.")
    assert err.count("free space on it") == 1


def test_unwritable_cause_is_found_through_wrapping_exceptions():
    from flows.cli import unwritable_cause

    full = OSError(errno.ENOSPC, "No space left on device", "/data/x.npy")
    try:
        try:
            raise full
        except OSError as error:
            raise RuntimeError("task failed") from error
    except RuntimeError as wrapped:
        assert unwritable_cause(wrapped) is full
    try:
        try:
            raise full
        except OSError:
            raise ValueError("while handling")  # implicit context, as a re-raise inside an except block
    except ValueError as wrapped:
        assert unwritable_cause(wrapped) is full
    assert unwritable_cause(OSError(errno.ENOENT, "No such file")) is None


# ------------------------------------------------------------------------------- labels checked before decoding


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory: pytest.TempPathFactory):
    from tasks.demo.synth import synthesize_cohort

    return synthesize_cohort(
        tmp_path_factory.mktemp("cohort"), patients=6, slices_per_patient=2, seed=11, matrix_sizes=(64,)
    )


def _write_labels(path: Path, column: str, rows: list[tuple[str, str]]) -> Path:
    path.write_text(f"{column},label\n" + "".join(f"{key},{label}\n" for key, label in rows))
    return path


def test_header_keys_are_the_keys_ingest_matches(small_cohort):
    """The header-only pass reads every key column exactly as the full decode does."""
    from tasks.ingest.dicom_io import read_ct_file
    from tasks.ingest.discover import discover_files
    from tasks.ingest.labels import KEY_ELEMENTS, header_key_record

    sources, _ = discover_files(small_cohort.dicom_dir)
    assert len(sources) == 12
    for source in sources:
        decoded = read_ct_file(Path(source.path), source.relative_path).record
        for column in (*KEY_ELEMENTS, "path"):
            record = header_key_record(source, column)
            assert record is not None and getattr(record, column if column != "path" else "relative_path") == \
                getattr(decoded, column if column != "path" else "relative_path")


def test_labels_matching_no_file_are_refused_before_any_decode(small_cohort, tmp_path, capsys):
    from flows.cli.errors import UsageError
    from flows.cli.ingest import register
    from flows.ingest import ingest_flow
    from tasks.ingest.errors import IngestError

    unknown = [(f"MRN{9_000_000 + i}", "normal" if i % 2 else "abnormal") for i in range(5)]
    labels = _write_labels(tmp_path / "labels.csv", "patient_id", unknown)
    out = tmp_path / "dataset"
    with pytest.raises(IngestError) as refused:
        ingest_flow(src_dir=str(small_cohort.dicom_dir), out_dir=str(out), labels=str(labels), size=32)
    sentence = str(refused.value)
    assert sentence == ("no patient_id in labels file labels.csv matches any of the 12 file(s) found: its 5 label(s) "
                        "were "
                        "checked against the headers, before decoding; check that the key column holds the values "
                        "stored "
                        "in the DICOM headers.")
    assert not any(key in sentence for key, _ in unknown)
    assert not list(out.rglob("*.npz")) and not (out / "dataset.json").exists()  # nothing was decoded

    # `ctcompare ingest` refuses it before Prefect starts, in the same sentence
    parser = argparse.ArgumentParser(prog="ctcompare")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["ingest", str(small_cohort.dicom_dir), "--out", str(out), "--labels", str(labels), "--size", "32"]
    )
    capsys.readouterr()
    with pytest.raises(UsageError) as usage:  # the dispatcher prints it as one line, exit 2
        args.handler(args)
    assert str(usage.value) == sentence


def test_labels_matching_some_files_log_one_line_of_counts(small_cohort, tmp_path):
    from tasks.ingest.dicom_io import read_ct_file
    from tasks.ingest.discover import discover_files
    from tasks.ingest.labels import check_labels_match_headers, read_labels

    sources, _ = discover_files(small_cohort.dicom_dir)
    patient_ids = sorted({read_ct_file(Path(s.path), s.relative_path).record.patient_id for s in sources})
    assert len(patient_ids) == 6
    rows = [(patient_ids[0], "normal"), (patient_ids[1], "abnormal"), ("MRN0000000", "normal")]
    lines: list[str] = []
    match = check_labels_match_headers(
        read_labels(_write_labels(tmp_path / "some.csv", "patient_id", rows)), sources, lines.append
    )
    assert (match.n_matched_files, match.n_matched_labels, match.n_files, match.n_labels) == (4, 2, 12, 3)
    assert lines == ["Labels: 4 of 12 file(s) have a patient_id in some.csv (2 of 3 label(s) used); the others stay "
                     "unlabelled."]
    assert not any(pid in lines[0] for pid in patient_ids)

    every = [(pid, "normal" if i % 2 else "abnormal") for i, pid in enumerate(patient_ids)]
    lines.clear()
    check_labels_match_headers(
        read_labels(_write_labels(tmp_path / "all.csv", "patient_id", every)), sources, lines.append
    )
    assert lines == []  # every file labelled: nothing to say

    by_path = [(s.relative_path, "normal" if i else "abnormal") for i, s in enumerate(sources[:3])]
    by_path.append(("elsewhere/x.dcm", "abnormal"))
    match = check_labels_match_headers(
        read_labels(_write_labels(tmp_path / "path.csv", "path", by_path)), sources, lines.append
    )
    assert (match.n_matched_files, match.n_labels) == (3, 4)


def test_the_labels_check_reads_the_headers_on_the_decode_pool_with_the_same_counts(small_cohort, tmp_path):
    from tasks.ingest.decode import decode_files
    from tasks.ingest.decode_pool import decode_pool
    from tasks.ingest.discover import discover_files
    from tasks.ingest.labels import header_keys, match_labels_to_headers, read_labels

    sources, _ = discover_files(small_cohort.dicom_dir)
    keys = header_keys(sources, "patient_id")
    labels = read_labels(
        _write_labels(
            tmp_path / "some.csv", "patient_id", [(sorted(set(keys))[0], "normal"), ("MRN0000000", "abnormal")]
        )
    )
    in_process = match_labels_to_headers(labels, sources)
    with decode_pool(2, decode_files) as pool:
        assert pool.map_batches(partial(header_keys, key_column="patient_id"), sources, batch=5) == keys  # in order
        on_pool = match_labels_to_headers(labels, sources, pool)
    assert on_pool == in_process and (on_pool.n_matched_files, on_pool.n_matched_labels) == (2, 1)
