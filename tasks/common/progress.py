"""Progress of long loops: a tqdm bar (items per second, time left) on a terminal, a few log lines elsewhere."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# Off a terminal: one log line per this fraction of the work, and at least one per LOG_EVERY_S seconds of it.
LOG_FRACTION = 0.1
LOG_EVERY_S = 30.0
# A bar redraws at most this often (tqdm's default): fast loops do not spend their time drawing.
BAR_MIN_INTERVAL_S = 0.1


class LogProgress:
    """Progress as log lines (for a file or a pipe, where a bar would be one unreadable line).

    Args:
        total: number of items expected.
        description: what is being counted, e.g. "decoded".
        unit: name of one item, e.g. "file".
        log: where a line goes (a logger's info method).
        log_fraction: one line per this share of the work and one at the end; None for lines by time alone
            (for loops that log their own summary when done, such as a training epoch).
    """

    def __init__(self, total: int, description: str, unit: str, log: Callable[[str], None],
                 log_fraction: float | None = LOG_FRACTION) -> None:
        self.total, self.description, self.unit, self.log = total, description, unit, log
        self.done = 0
        self.started = self.last_logged = time.monotonic()
        self.log_fraction = log_fraction
        self.next_fraction = log_fraction if log_fraction is not None else math.inf

    def update(self, n: int) -> None:
        """Count n more items; log a line when a share more of the work, or LOG_EVERY_S seconds, have passed."""
        self.done += n
        now = time.monotonic()
        fraction = self.done / self.total if self.total else 1.0
        finished = self.done >= self.total and self.log_fraction is not None
        if fraction >= self.next_fraction or now - self.last_logged >= LOG_EVERY_S or finished:
            elapsed = max(now - self.started, 1e-9)
            rate = self.done / elapsed
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            self.log(f"{self.description} {self.done}/{self.total} {self.unit}s ({rate:.0f} {self.unit}s/s, "
                     f"{max(left, 0.0):.0f} s left)")
            self.last_logged = now
            while self.log_fraction is not None and self.next_fraction <= fraction:
                self.next_fraction += self.log_fraction

    def close(self) -> None:
        """Nothing to release (the last update already logged the total)."""


def _terminal_columns(stream: object) -> int:
    """Width of the terminal behind stream (0 when unknown, e.g. a pseudo-terminal nobody sized)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return 0


@contextmanager
def progress(total: int, description: str, unit: str, log: Callable[[str], None], stream: object | None = None,
             *, log_fraction: float | None = LOG_FRACTION, leave: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield a thread-safe `update(n)`: a tqdm bar when `stream` (default stderr) is a terminal, log lines otherwise.

    While the bar is shown, console log lines are printed above it (tqdm.write) instead of through it. log_fraction:
    see LogProgress; leave False erases the finished bar (for a bar per epoch under the loop's own log lines).
    """
    stream = stream if stream is not None else sys.stderr
    lock = threading.Lock()
    redirect: contextlib.AbstractContextManager = contextlib.nullcontext()
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        columns = _terminal_columns(stream)
        reporter: tqdm | LogProgress = tqdm(total=total, desc=description, unit=unit, file=stream, smoothing=0.1,
                                            dynamic_ncols=columns > 0, ncols=None if columns > 0 else 100, leave=leave,
                                            mininterval=BAR_MIN_INTERVAL_S)
        redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
    else:
        reporter = LogProgress(total, description, unit, log, log_fraction)

    def update(n: int) -> None:
        with lock:
            reporter.update(n)

    try:
        with redirect:
            yield update
    finally:
        reporter.close()


class RunProgress:
    """A Prefect progress artifact of the current flow or task run (the bar on its page in the UI), with a line
    saying what is done and about how long is left.

    Outside a run, or when the API does not answer, it does nothing: progress shown is never worth a failed run.
    Updates are sent at most every UPDATE_EVERY_S seconds, and always at the end.

    Args:
        description: what the bar measures at the start, e.g. "train-scratch-main: starting".
    """

    UPDATE_EVERY_S = 2.0

    def __init__(self, description: str) -> None:
        self.started = time.monotonic()
        self.last_sent = -math.inf
        self.lock = threading.Lock()
        self.artifact_id: Any = None
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import FlowRunContext, TaskRunContext

            if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
                self.artifact_id = create_progress_artifact(progress=0.0, description=description)
        except Exception as error:  # noqa: BLE001 - see the class doc
            logging.getLogger(__name__).debug("No progress artifact: %s", error)

    def update(self, done: float, total: float, what: str, left_s: float | None = None) -> None:
        """done of total finished: the bar at done/total, the line `what` with the time left: left_s when given (a
        prediction), else at the pace so far."""
        share = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
        now = time.monotonic()
        if self.artifact_id is None or (share < 1.0 and now - self.last_sent < self.UPDATE_EVERY_S):
            return
        self.last_sent = now
        elapsed = now - self.started
        left = elapsed * (1.0 - share) / share if 0.0 < share < 1.0 else 0.0
        left = left_s if left_s is not None and share < 1.0 else left
        try:
            from prefect.artifacts import update_progress_artifact
            from tqdm import tqdm

            line = f"{what}; about {tqdm.format_interval(left)} left" if left >= 1.0 else what
            update_progress_artifact(self.artifact_id, progress=100.0 * share, description=line)
        except Exception as error:  # noqa: BLE001 - see the class doc
            logging.getLogger(__name__).debug("Progress artifact not updated: %s", error)

    def counting(self, total: int, what: str, also: Callable[[int], None] | None = None) -> Callable[[int], None]:
        """A thread-safe `count(n)` that moves the bar by n of total items (and calls `also(n)`); `what` may name
        {done} and {total}."""
        done = 0

        def count(n: int) -> None:
            nonlocal done
            if also is not None:
                also(n)
            with self.lock:
                done += n
                self.update(done, total, what.format(done=done, total=total))

        return count
