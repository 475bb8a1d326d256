"""Progress of long loops: a tqdm bar (items per second, time left) on a terminal, a few log lines elsewhere."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Off a terminal: one log line per this fraction of the work, and at least one per LOG_EVERY_S seconds of it.
LOG_FRACTION = 0.1
LOG_EVERY_S = 30.0


class LogProgress:
    """Progress as log lines (for a file or a pipe, where a bar would be one unreadable line).

    Args:
        total: number of items expected.
        description: what is being counted, e.g. "decoded".
        unit: name of one item, e.g. "file".
        log: where a line goes (a logger's info method).
    """

    def __init__(self, total: int, description: str, unit: str, log: Callable[[str], None]) -> None:
        self.total, self.description, self.unit, self.log = total, description, unit, log
        self.done = 0
        self.started = self.last_logged = time.monotonic()
        self.next_fraction = LOG_FRACTION

    def update(self, n: int) -> None:
        """Count n more items; log a line when a tenth more of the work, or LOG_EVERY_S seconds, have passed."""
        self.done += n
        now = time.monotonic()
        fraction = self.done / self.total if self.total else 1.0
        if fraction >= self.next_fraction or now - self.last_logged >= LOG_EVERY_S or self.done >= self.total:
            elapsed = max(now - self.started, 1e-9)
            rate = self.done / elapsed
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            self.log(f"{self.description} {self.done}/{self.total} {self.unit}s ({rate:.0f} {self.unit}s/s, "
                     f"{max(left, 0.0):.0f} s left)")
            self.last_logged = now
            while self.next_fraction <= fraction:
                self.next_fraction += LOG_FRACTION

    def close(self) -> None:
        """Nothing to release (the last update already logged the total)."""


def _terminal_columns(stream: object) -> int:
    """Width of the terminal behind stream (0 when unknown, e.g. a pseudo-terminal nobody sized)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return 0


@contextmanager
def progress(total: int, description: str, unit: str, log: Callable[[str], None],
             stream: object | None = None) -> Iterator[Callable[[int], None]]:
    """Yield a thread-safe `update(n)`: a tqdm bar when `stream` (default stderr) is a terminal, log lines otherwise.

    While the bar is shown, console log lines are printed above it (tqdm.write) instead of through it.
    """
    stream = stream if stream is not None else sys.stderr
    lock = threading.Lock()
    redirect: contextlib.AbstractContextManager = contextlib.nullcontext()
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        columns = _terminal_columns(stream)
        reporter: tqdm | LogProgress = tqdm(total=total, desc=description, unit=unit, file=stream, smoothing=0.1,
                                            dynamic_ncols=columns > 0, ncols=None if columns > 0 else 100)
        redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
    else:
        reporter = LogProgress(total, description, unit, log)

    def update(n: int) -> None:
        with lock:
            reporter.update(n)

    try:
        with redirect:
            yield update
    finally:
        reporter.close()
