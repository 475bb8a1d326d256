"""What a flow run's log lines and states say in the Prefect UI and in `prefect deployment run --watch`.

The task engine's own lines ("Finished in state Completed()") carry the task run's name only as a field that the
terminal's formatter prints; the UI's log list and the `--watch` stream show the bare message, so ten such lines
in a row name nothing. tidy_run_logs() makes every task-run line sent to the API start with its task run's
name (train-scratch-main: Finished in state Completed()); the terminal's lines are left as they were.

A flow run that ends in a state its flow chose and explained (refused before any work, "Partial", "Skipped") is not
a crash, yet a deployment's flow-run process then logs "Engine execution exited with unexpected exception" with a
traceback of Prefect's engine, which says nothing the state's message does not: tidy_run_logs() drops that line for
those outcomes, and only for them.
"""

from __future__ import annotations

import logging
import threading

from prefect.states import Failed, State

TASK_RUN_LOGGER, FLOW_RUN_LOGGER = "prefect.task_runs", "prefect.flow_runs"
ENGINE_EXIT_LINE = "Engine execution exited with unexpected exception"  # Prefect's, with a traceback
SEND_LOGS_WAIT_S = 5.0  # what APILogHandler.flush waits for the log worker
_CHOSEN_OUTCOMES: list[type[BaseException]] = []  # a flow's own outcome errors (flows.compare.ComparisonNotComplete)


class InputRefused(ValueError):
    """An input of a flow run refused before any work; the message is the one sentence that says why."""


class TaskNamingFormatter(logging.Formatter):
    """'%(message)s', prefixed with the record's task run name when it has one and the message does not start
    with it."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        name = getattr(record, "task_run_name", None)
        return f"{name}: {text}" if name and not text.startswith(str(name)) else text


class _OutcomeWithoutTraceback(logging.Filter):
    """Drops the engine's traceback line of a flow run that ended in a state its flow chose and explained in its
    message: refused (InputRefused), "Partial" or "Skipped" (Cancelled type: CancelledRun; Failed type with data:
    FailedRun), no arm completed. A crash keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.exceptions import CancelledRun, FailedRun

        error = record.exc_info[1] if record.exc_info else None
        chosen = (InputRefused, CancelledRun, FailedRun, *_CHOSEN_OUTCOMES)
        return not (record.getMessage().startswith(ENGINE_EXIT_LINE) and isinstance(error, chosen))


def tidy_run_logs(*outcomes: type[BaseException]) -> None:
    """Name task runs in their API log lines, and keep the log of a run that ended as its flow chose (refused,
    partial, skipped, or with one of `outcomes`) to its sentence, without the engine's traceback (once per process;
    each flow calls it first)."""
    from prefect.logging.handlers import APILogHandler

    _CHOSEN_OUTCOMES.extend(outcome for outcome in outcomes if outcome not in _CHOSEN_OUTCOMES)
    for handler in logging.getLogger(TASK_RUN_LOGGER).handlers:
        if isinstance(handler, APILogHandler) and not isinstance(handler.formatter, TaskNamingFormatter):
            handler.setFormatter(TaskNamingFormatter())
    flow_runs = logging.getLogger(FLOW_RUN_LOGGER)
    if not any(isinstance(f, _OutcomeWithoutTraceback) for f in flow_runs.filters):
        flow_runs.addFilter(_OutcomeWithoutTraceback())


def send_run_logs_now() -> None:
    """Send the lines logged so far to the API at once, not with the next batch: `prefect deployment run --watch`
    stops at the run's final state, so a line meant to end its output must be there before that state.

    Only the log worker is drained. APILogHandler.flush drains every one of Prefect's queue services of the process
    (they share one registry), the events worker too, which then warned "EventsWorker - Still processing items: N
    items remaining..." whenever events were still queued."""
    from prefect.logging.handlers import APILogHandler, APILogWorker

    if any(isinstance(handler, APILogHandler) for handler in logging.getLogger(FLOW_RUN_LOGGER).handlers):
        # At most SEND_LOGS_WAIT_S, as the handler's flush waits (an API that stopped answering must not hold the run);
        # a later line starts a new worker.
        draining = threading.Thread(target=APILogWorker.instance().drain, name="send-run-logs", daemon=True)
        draining.start()
        draining.join(timeout=SEND_LOGS_WAIT_S)


def refused(sentence: str) -> State:
    """The state of a flow run refused before any work: Failed, with the sentence as its message and no traceback
    in the log (a raised error would print one); a direct call of the flow raises InputRefused (a ValueError)."""
    return Failed(message=sentence, data=InputRefused(sentence))
