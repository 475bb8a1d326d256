"""The local decode pool: plain worker processes that decode DICOM files for the ingest flow's chunk tasks.

Why not Prefect's ProcessPoolTaskRunner: it spawns fresh interpreters that each import Prefect, torch and pydicom
(seconds of CPU each, on the same cores that should decode) and run the Prefect task engine, with its API traffic,
inside every worker. Here the chunk tasks stay Prefect tasks (visible, cached, retried) run by threads of the flow's
process, and hand their files, in small batches, to this pool. Its workers are forked from the flow's process, so
they start in milliseconds with the decode code already imported. Forking a process that has threads is safe here
because a worker only decodes: it never touches Prefect, its client or its event loop; logging and import locks are
re-initialised by Python after a fork, and the worker's torch is set to one thread before any work, as PyTorch's own
DataLoader workers do (OpenMP must not be entered in a forked child). Each worker runs one compute thread
(parallelism comes from the processes, so torch/OpenMP threads would only fight over the cores), talks to no API,
and exits as soon as the process that opened the pool is gone (checked every WATCH_S seconds), even after a kill -9
of that process.

On a Dask worker there is no pool: `decode_chunk` decodes in its own process.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from data_schemas.dataset import WindowSpec
    from tasks.ingest.assemble import CachedFile, SourceFile

# Files per job sent to a worker: small enough for balance and a smooth progress bar, large enough that the
# per-job inter-process cost (a few hundred microseconds) stays negligible against ~3-10 ms of decoding per file.
BATCH_FILES = 8
WATCH_S = 0.5

ProgressCallback = Callable[[int], None]
T = TypeVar("T")
R = TypeVar("R")


def _owner_is_alive(owner_pid: int, owner_started: float) -> bool:
    """True while the process that opened the pool runs (same PID and start time: a re-used PID does not count)."""
    import psutil

    try:
        return psutil.Process(owner_pid).create_time() == owner_started
    except psutil.Error:
        return False


def _exit_when_owner_dies(owner_pid: int, owner_started: float) -> None:
    """Loop of a worker's watchdog thread: end the worker at once when its owner is gone."""
    while _owner_is_alive(owner_pid, owner_started):
        time.sleep(WATCH_S)
    os._exit(1)


def init_decode_worker(owner_pid: int, owner_started: float) -> None:
    """Pool worker set-up: one compute thread, and exit when the owning process dies (however it dies)."""
    limit_compute_threads()
    threading.Thread(target=_exit_when_owner_dies, args=(owner_pid, owner_started), daemon=True,
                     name="ctcompare-owner-watch").start()


def limit_compute_threads() -> None:
    """One torch (OpenMP) thread in this process: the decode runs one file per process at a time."""
    import torch

    torch.set_num_threads(1)


def _decode_batch(sources: list[SourceFile], cache_dir: str, size: int, window: WindowSpec) -> dict[str, CachedFile]:
    """What a worker runs per job: decode files into the cache (see tasks.ingest.assemble.decode_files); returns what the
    assembly needs of the files it decoded (records, image hashes, HU samples), so the flow need not re-read them."""
    from tasks.ingest.assemble import decode_files

    return decode_files(sources, cache_dir, size, window)


class DecodePool:
    """A process pool for decoding, forked from the calling process.

    Args:
        workers: number of worker processes; with 1 the files are decoded in the calling thread (no processes).
        on_progress: called in the opening process with the number of files each finished batch held.
    """

    def __init__(self, workers: int, on_progress: ProgressCallback | None = None) -> None:
        self.workers = max(1, workers)
        self.on_progress = on_progress
        self._decoded: dict[str, CachedFile] = {}  # by content hash, until the flow takes them
        self._decoded_lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        if self.workers > 1:
            import psutil

            me = psutil.Process()
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("fork"), initializer=init_decode_worker,
                initargs=(me.pid, me.create_time()),
            )
            # Fork every worker now, from this thread (which outlives the pool), before the batches queue.
            for _ in range(self.workers):
                self._executor.submit(int)

    def decode(self, sources: list[SourceFile], cache_dir: str, size: int, window: WindowSpec) -> None:
        """Decode `sources` into the cache (on the workers, or here with one worker); what the files decoded now
        hold for the assembly is kept until take_decoded."""
        batches = [sources[start:start + BATCH_FILES] for start in range(0, len(sources), BATCH_FILES)]
        if self._executor is None:
            for batch in batches:
                self._keep(_decode_batch(batch, cache_dir, size, window))
                self._report(len(batch))
            return
        futures: dict[Future[dict[str, CachedFile]], int] = {
            self._executor.submit(_decode_batch, batch, cache_dir, size, window): len(batch) for batch in batches
        }
        for future in as_completed(futures):
            self._keep(future.result())
            self._report(futures[future])

    def map_batches(self, function: Callable[[list[T]], list[R]], items: list[T], batch: int = BATCH_FILES * 8) -> list[R]:
        """function over `items` in batches of `batch`, on the workers (in order), or here with one worker; the
        results concatenated. `function` must be a module-level function (or a partial of one): it is pickled."""
        batches = [items[start:start + batch] for start in range(0, len(items), batch)]
        if self._executor is None:
            return [result for part in batches for result in function(part)]
        return [result for part in self._executor.map(function, batches) for result in part]

    def _keep(self, decoded: dict[str, CachedFile]) -> None:
        with self._decoded_lock:
            self._decoded.update(decoded)

    def take_decoded(self, content_sha256: str) -> CachedFile | None:
        """What the file with this content hash holds for the assembly if this pool decoded it and nobody took it
        yet (None otherwise: read it from the cache)."""
        with self._decoded_lock:
            return self._decoded.pop(content_sha256, None)

    def _report(self, n_files: int) -> None:
        if self.on_progress is not None:
            self.on_progress(n_files)

    def close(self) -> None:
        """Stop the workers (queued batches are cancelled)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


_current_pool: DecodePool | None = None


def current_decode_pool() -> DecodePool | None:
    """The pool opened by `decode_pool` in this process, if any (None on a Dask worker)."""
    return _current_pool


@contextmanager
def decode_pool(workers: int, on_progress: ProgressCallback | None = None) -> Iterator[DecodePool]:
    """Open a DecodePool for the chunk tasks of this process, and close it afterwards."""
    global _current_pool
    pool = DecodePool(workers, on_progress)
    _current_pool = pool
    try:
        yield pool
    finally:
        _current_pool = None
        pool.close()
