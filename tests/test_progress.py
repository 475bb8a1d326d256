"""Progress: a bar with rate and time left on a terminal, a few log lines elsewhere."""

from __future__ import annotations

import importlib
import io

from tasks.common.progress import progress


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_about_ten_log_lines() -> None:
    lines: list[str] = []
    with progress(1000, "decoded", "file", lines.append, stream=io.StringIO()) as update:
        for _ in range(100):
            update(10)
    assert 10 <= len(lines) <= 11, lines
    assert lines[-1].startswith("decoded 1000/1000 files (") and "files/s" in lines[-1] and "s left" in lines[-1]


def test_on_a_terminal_progress_is_a_bar_with_rate_and_time_left() -> None:
    terminal, lines = FakeTerminal(), []
    with progress(40, "decoded", "file", lines.append, stream=terminal) as update:
        for _ in range(4):
            update(10)
    assert lines == []  # no log lines under a bar
    final = terminal.getvalue().split("\r")[-1]
    assert "40/40" in final and "file/s" in final and "100%" in final, final


def test_time_only_progress_logs_when_slow_and_not_at_the_end(monkeypatch) -> None:
    """log_fraction=None (a training epoch, whose own line follows): a line only once LOG_EVERY_S has passed."""
    # the module itself: the package attribute tasks.common.progress is the function it re-exports
    progress_module = importlib.import_module("tasks.common.progress")

    clock = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    lines: list[str] = []
    with progress(100, "epoch 1/3", "image", lines.append, stream=io.StringIO(), log_fraction=None) as update:
        for _ in range(9):  # 90% of the work in no time: no line
            update(10)
        assert lines == []
        clock[0] += progress_module.LOG_EVERY_S + 1  # a slow batch
        update(5)
        update(5)  # the end: no extra line
    assert len(lines) == 1 and lines[0].startswith("epoch 1/3 95/100 images ("), lines


def test_a_comparisons_time_left_is_the_predictions_from_the_cost_stage_on() -> None:
    """Ten minutes into a comparison predicted to take at most an hour, the cost stage done: its progress artifact
    says about fifty minutes are left (the prediction), not the pace of one step in a fraction of a second."""
    import asyncio
    import time

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from data_schemas.cost import StageTime, WallTimeEstimate
    from flows.compare_stages import ComparisonProgress

    estimate = WallTimeEstimate(seconds_min=1800.0, seconds_max=3600.0, formula="T = sum of stages",
                                stages=[StageTime(stage="training scratch", seconds_min=1800.0, seconds_max=3600.0,
                                                  basis="by hand")])

    @flow(name="comparison-progress")
    def comparison(predicted: bool) -> str:
        from prefect.context import get_run_context

        stages = ComparisonProgress(2)
        if predicted:
            stages.expect(estimate, started_at=time.time() - 600)
        stages.advance("cost estimated")
        return str(get_run_context().flow_run.id)

    async def description(flow_run_id: str) -> str:
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        [bar] = [a for a in artifacts if a.type == "progress"]
        return bar.description or ""

    with_prediction = asyncio.run(description(comparison(True)))
    assert with_prediction.startswith("comparison: cost estimated (1/6 steps); about 49:5"), with_prediction
    without = asyncio.run(description(comparison(False)))
    # without a prediction: the pace of a step done in moments, a few seconds at most
    assert without.startswith("comparison: cost estimated (1/6 steps)") and "about 49:" not in without, without
