"""Shipping's work that can run beside the next piece: writing files, and quantizing the compressed variant.

Shipping writes files of about 100 MB (each package's model.pt, each bundle's TorchScript model.ts). Handing the
bytes, once made, to one background thread lets the kernel's copying into the page cache and the fsync run beside
the next piece of work (reading and hashing the next run's weights, tracing). The compressed variant's quantization
starts there too as soon as its full package is made, beside the packaging of the arms after it. The thread runs
its work in the order it was handed over, so a later write may use an earlier file (the bundle's hard link to
model.pt).

A timing waits for all of it first (wait_for_background, called by tasks.packaging.deploy_cost.time_model), so no
latency or throughput figure is measured while anything else runs.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_LOCK = threading.Lock()
_EXECUTOR: ThreadPoolExecutor | None = None
_PENDING: list[Future[Any]] = []


def in_background(work: Callable[[], T]) -> Future[T]:
    """Run `work` (nothing timed, nothing the caller changes meanwhile) in this process's background thread, after
    the work handed over before it; its future holds the result or the error."""
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shipping-background")
        future = _EXECUTOR.submit(work)
        _PENDING.append(future)
    return future


def wait_for_background() -> None:
    """Wait until all work handed to the background thread so far has finished (errors stay in the futures)."""
    with _LOCK:
        pending = list(_PENDING)
        _PENDING.clear()
    wait(pending)


class BackgroundWrites:
    """The file writes of one piece of shipping (a package and its bundle), run in the background thread; result()
    waits for them and raises the first failure, so that the piece they belong to is the one that fails."""

    def __init__(self) -> None:
        self._futures: list[Future[None]] = []

    def submit(self, write: Callable[[], None]) -> None:
        """Write files in the background (in_background): bytes already made, nothing the caller reads before
        result()."""
        self._futures.append(in_background(write))

    def result(self) -> None:
        """Wait until every write submitted here has finished; raise the first one's error, if any failed."""
        for future in self._futures:
            future.result()
