"""Writing shipped files while the work that follows goes on.

Shipping writes files of about 100 MB (each package's model.pt, each bundle's TorchScript model.ts). Handing the
bytes, once made, to one writing thread lets the kernel's copying into the page cache and the fsync run beside the
next piece of work (reading and hashing the next run's weights, tracing, quantizing). Files are written in the
order they were submitted, so a later write may use an earlier file (the bundle's hard link to model.pt).

A timing waits for every pending write first (wait_for_writes, called by tasks.packaging.deploy_cost.time_model), so
no latency or throughput figure is measured while a file is being written.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable

_LOCK = threading.Lock()
_EXECUTOR: ThreadPoolExecutor | None = None
_PENDING: list[Future[None]] = []


def _executor() -> ThreadPoolExecutor:
    """The one writing thread of this process, started on first use."""
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-writes")
        return _EXECUTOR


class BackgroundWrites:
    """The writes of one piece of shipping (a package and its bundle), run in the writing thread in submission order;
    result() waits for them and raises the first failure, so that the piece they belong to is the one that fails."""

    def __init__(self) -> None:
        self._futures: list[Future[None]] = []

    def submit(self, write: Callable[[], None]) -> None:
        """Run `write` (file writing only: no timing, nothing the caller reads before result()) in the writing
        thread."""
        future = _executor().submit(write)
        self._futures.append(future)
        with _LOCK:
            _PENDING.append(future)

    def result(self) -> None:
        """Wait until every write submitted here has finished; raise the first one's error, if any failed."""
        for future in self._futures:
            future.result()


def wait_for_writes() -> None:
    """Wait until every file submitted to the writing thread so far has been written (failures are raised by their
    BackgroundWrites.result, not here)."""
    with _LOCK:
        pending = list(_PENDING)
        _PENDING.clear()
    wait(pending)
