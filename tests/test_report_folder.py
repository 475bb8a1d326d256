"""A report folder has one writer, and a comparison delivers what it says: the write lock, and arms whose model
package is missing or failed its own check counted as not completed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.compare import (
    NO_PACKAGE,
    PARTIAL_STATE_NAME,
    arm_outcomes,
    final_state,
    not_completed,
    outcome_headline,
)
from flows.report_folder import report_write_lock
from tests.report_fixtures import make_example_results

ROOT = Path(__file__).resolve().parents[1]

# A second process asking for the lock, waiting a fraction of a second instead of REPORT_LOCK_TIMEOUT_S.
SECOND_WRITER = """
import sys
from pathlib import Path
import flows.report_folder as report_folder
report_folder.REPORT_LOCK_TIMEOUT_S = 0.2
try:
    with report_folder.report_write_lock(Path(sys.argv[1])):
        print("acquired")
except report_folder.ReportBusyError as error:
    print(error)
"""


def _second_writer(report_dir: Path) -> str:
    result = subprocess.run([sys.executable, "-c", SECOND_WRITER, str(report_dir)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_a_second_writer_is_refused_in_one_sentence_while_the_first_holds_the_folder(tmp_path: Path) -> None:
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    with report_write_lock(report_dir):
        with report_write_lock(report_dir):  # the command line and then the flow, in one process
            refusal = _second_writer(report_dir)
    assert refusal.startswith(f"report folder {report_dir} is being written by another comparison (waited 0.2 s)")
    assert len(refusal.splitlines()) == 1
    assert _second_writer(report_dir) == "acquired"  # released when the first is done


def test_a_completed_arm_without_its_package_is_not_counted_completed() -> None:
    results = make_example_results(with_folds=False, with_data_efficiency=False)
    packaged = results.model_copy(update={"arms": [
        arm.model_copy(update={"package_dir": f"runs/{arm.name}/main/package"}) for arm in results.arms
    ]})
    assert all(outcome == "completed" for outcome in arm_outcomes(packaged).values())
    assert outcome_headline(packaged, arm_outcomes(packaged)) == packaged.recommendation.headline

    # scratch's package failed its own hash check: ship_arms logged it and left the arm without a package
    unshipped = packaged.model_copy(update={"arms": [
        arm.model_copy(update={"package_dir": None}) if arm.name == "scratch" else arm for arm in packaged.arms
    ]})
    outcomes = arm_outcomes(unshipped)
    assert outcomes["scratch"] == NO_PACKAGE and outcomes["imagenet"] == "completed"
    headline = outcome_headline(unshipped, outcomes)
    assert headline.startswith(unshipped.recommendation.headline) and "No model package for scratch" in headline
    summary = {"recommendation": headline, "arms": outcomes, "link": "http://127.0.0.1:8765/r/report.html"}
    state = final_state(unshipped, summary)
    assert state.name == PARTIAL_STATE_NAME and not_completed(summary) == ["scratch (no package)"]
    assert state.message.endswith("Report: http://127.0.0.1:8765/r/report.html")


# Holds a report folder's lock until its stdin closes; says "held" once it has it.
HOLDER = """
import sys
from pathlib import Path
from flows.report_folder import report_write_lock
with report_write_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_compare_into_a_folder_another_comparison_writes_is_refused_before_prefect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import flows.report_folder
    from flows.cli import main

    source = tmp_path / "dataset"
    source.mkdir()
    (source / "dataset.json").write_text("{}")  # a dataset folder: the source check looks no further
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(report_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(flows.report_folder, "REPORT_LOCK_TIMEOUT_S", 0.2)
        code = main(["compare", str(source), "--out", str(report_dir), "--profile", "smoke", "--arms", "scratch"])
    finally:
        holder.communicate("", timeout=60)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "is being written by another comparison" in lines[0], captured.err
    assert sorted(path.name for path in report_dir.iterdir()) == [".write.lock"]  # no plan.json, no runs
