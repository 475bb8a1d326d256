"""flows.run_logs.send_run_logs_now: a flow run's lines reach the API at once, and nothing else is stopped."""

from __future__ import annotations

import logging

import pytest
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.events import emit_event
from prefect.runtime import flow_run

from flows.run_logs import send_run_logs_now

LINE = "the line that must be in the API before the run ends"


@flow
def flow_that_sends_its_last_line_at_once() -> list[str]:
    """The run's lines as the API holds them right after send_run_logs_now, while the run is still running."""
    for number in range(300):  # events still queued when the lines are sent
        emit_event(event="ctcompare.test.queued", resource={"prefect.resource.id": f"ctcompare.test.{number}"})
    get_run_logger().warning(LINE)  # the tests log WARNING and above
    send_run_logs_now()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    return [log.message for log in logs]


def test_the_lines_are_sent_at_once_and_the_events_worker_is_left_running(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        in_the_api = flow_that_sends_its_last_line_at_once()
    assert LINE in in_the_api
    # draining the events worker too (as APILogHandler.flush does) warned about the events still queued
    warnings = [record.getMessage() for record in caplog.records if "Still processing items" in record.getMessage()]
    assert not warnings, warnings
