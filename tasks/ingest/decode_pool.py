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

A decoder can kill the process it runs in (gdcm aborts on some corrupt JPEG 2000 codestreams; a segfault, the OOM
killer): no file's decode runs in the flow's process, and a death costs only the file that caused it. Each decode
is bracketed by a marker file in the cache (tasks.ingest.decode.decode_files), so after a worker dies the files
it and its terminated siblings were decoding are known; each is decoded again alone, in a process of its own, and a
file that kills that process too is quarantined as `decoder_crashed` (in the cache, so no later run decodes it
again: tasks.ingest.decode.decode_isolating_crashes). The pool is replaced and the other files go on.

This module knows processes, not files: the pool is given the function its workers run per batch, and the flow hands
the pool to the tasks that use it. On a Dask worker there is no pool: `decode_chunk` decodes in forked children of
the Dask worker's process, with the same isolation.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

# Files per job sent to a worker: small enough for balance and a smooth progress bar, large enough that the
# per-job inter-process cost stays small against the decoding of the batch.
BATCH_FILES = 8
# Files per forked child where there is no pool (one worker, a Dask worker): a fork per batch costs a few
# milliseconds, so batches are larger there.
CHILD_BATCH_FILES = 32
WATCH_S = 0.5
# Held while a pipe is made and a process forked, so that no child inherits another child's pipe (its reader would
# then wait for the wrong process to exit).
_FORK_LOCK = threading.Lock()

ProgressCallback = Callable[[int], None]
T = TypeVar("T")
R = TypeVar("R")
Decoded = TypeVar("Decoded")  # what the decode function returns per file, by content hash


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
    """Decode process set-up: one compute thread, native stderr silenced, and exit when the owning process dies
    (however it dies)."""
    limit_compute_threads()
    silence_native_stderr()
    threading.Thread(target=_exit_when_owner_dies, args=(owner_pid, owner_started), daemon=True,
                     name="ctcompare-owner-watch").start()


def silence_native_stderr() -> None:
    """Send what C decoders write straight to stderr (OpenJPEG's 'Stream too short', a C++ terminate message) to
    /dev/null, and dump no Python stack on a fatal signal (faulthandler): a decode process reports everything
    through its result (a file's quarantine reason says how its decode failed, or how its process died), so one
    broken file gives one line, not a stream of decoder noise."""
    faulthandler.disable()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def limit_compute_threads() -> None:
    """One torch (OpenMP) thread in this process: the decode runs one file per process at a time."""
    import torch

    torch.set_num_threads(1)


def import_before_forking() -> None:
    """Import torch in this process before forking decode processes: each would import it in its set-up
    (limit_compute_threads), and forked children share the parent's copy instead of each loading it again."""
    import torch  # noqa: F401


class DecoderProcessDied(RuntimeError):
    """A process decoding files died (signal, abort, OOM kill) before it could answer.

    Args:
        how: how it ended, e.g. 'killed by SIGABRT'.
    """

    def __init__(self, how: str) -> None:
        super().__init__(f"a decoding process died ({how})")
        self.how = how


def how_it_ended(status: int) -> str:
    """A waitpid status in words: the signal's name, or the exit code."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"killed by {name}; out of memory?" if -code == signal.SIGKILL else f"killed by {name}"


def _child_main(write_fd: int, owner: tuple[int, float], function: Callable[..., R], args: tuple) -> None:
    """A forked child's work: function(*args), its result or exception pickled into the pipe; never returns."""
    code = 0
    try:
        init_decode_worker(*owner)
        try:
            payload = pickle.dumps((True, function(*args)))
        except BaseException as error:  # handed to the parent, which raises it
            try:
                payload = pickle.dumps((False, error))
            except Exception:
                payload = pickle.dumps((False, RuntimeError(f"{type(error).__name__}: {error}")))
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(payload)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def run_in_child(function: Callable[..., R], *args: object) -> R:
    """function(*args) in a forked child of this process: its result, or its exception raised here.

    Raises:
        DecoderProcessDied: the child died without answering (abort, segfault, OOM kill).
    """
    import psutil

    import_before_forking()
    owner = (os.getpid(), psutil.Process().create_time())
    with _FORK_LOCK:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child_main(write_fd, owner, function, args)
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not payload:
        raise DecoderProcessDied(how_it_ended(status))
    succeeded, value = pickle.loads(payload)
    if succeeded:
        return value
    raise value


class DecodePool(Generic[Decoded]):
    """A process pool for decoding, forked from the calling process, replaced when a decoder kills a worker.

    Args:
        workers: number of worker processes; with 1 there is no pool (executor None): the caller decodes each
            batch in a forked child (tasks.ingest.decode.decode_in_children).
        decode_batch: what a worker runs per batch, `decode_batch(files, *arguments)` -> {content hash: what the
            assembly needs of each file decoded now} (tasks.ingest.decode.decode_files); a module-level function,
            since it is pickled to the workers.
        on_progress: called in the opening process with the number of files each finished batch held.
    """

    def __init__(self, workers: int, decode_batch: Callable[..., dict[str, Decoded]],
                 on_progress: ProgressCallback | None = None) -> None:
        self.workers = max(1, workers)
        self.decode_batch = decode_batch
        self.on_progress = on_progress
        self._decoded: dict[str, Decoded] = {}  # by content hash, until the flow takes them
        self._decoded_lock = threading.Lock()
        self._executor_lock = threading.Lock()
        self._closed = False
        self._executor: ProcessPoolExecutor | None = self._start_executor() if self.workers > 1 else None

    @property
    def executor(self) -> ProcessPoolExecutor | None:
        """The worker processes now (replaced after a worker died); None with one worker."""
        return self._executor

    def _start_executor(self) -> ProcessPoolExecutor:
        """A pool of forked workers, all forked now, from this thread, before any batch queues."""
        import psutil

        import_before_forking()
        me = psutil.Process()
        with _FORK_LOCK:
            executor = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("fork"),
                initializer=init_decode_worker, initargs=(me.pid, me.create_time()),
            )
            for _ in range(self.workers):
                executor.submit(int)
        return executor

    def _replace_broken(self, broken: ProcessPoolExecutor) -> None:
        """Start a new pool in place of a broken one (once, whichever thread sees it broken first)."""
        with self._executor_lock:
            if self._executor is not broken or self._closed:
                return
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._start_executor()

    def decode_on_workers(self, sources: list[Any], arguments: tuple, reported: list[int]) -> dict[str, Decoded]:
        """decode_batch(batch, *arguments) over `sources` in batches on the pool's workers, what they hold kept
        (take_decoded) and counted into reported[0]; raises DecoderProcessDied (after keeping what the finished
        batches hold) when a worker died, and replaces the pool."""
        executor = self._executor
        assert executor is not None
        futures: dict[Future[dict[str, Decoded]], int] = {}
        died = False
        for start in range(0, len(sources), BATCH_FILES):
            batch = sources[start:start + BATCH_FILES]
            try:
                futures[executor.submit(self.decode_batch, batch, *arguments)] = len(batch)
            except (BrokenProcessPool, RuntimeError):  # broken (or replaced) since this call began
                died = True
                break
        for future in as_completed(futures):
            try:
                self.keep(future.result())
            except BrokenProcessPool:
                died = True
                continue
            reported[0] += futures[future]
            self.report(futures[future])
        if died:
            if self._closed:
                raise RuntimeError("the decode pool was closed while files were being decoded")
            self._replace_broken(executor)
            raise DecoderProcessDied("a pool worker died")
        return {}

    def map_batches(self, function: Callable[[list[T]], list[R]], items: list[T],
                    batch: int = BATCH_FILES * 8) -> list[R]:
        """function over `items` in batches of `batch`, on the workers (in order), or here with one worker; the
        results concatenated. `function` must be a module-level function (or a partial of one): it is pickled."""
        batches = [items[start:start + batch] for start in range(0, len(items), batch)]
        executor = self._executor
        if executor is None:
            return [result for part in batches for result in function(part)]
        return [result for part in executor.map(function, batches) for result in part]

    def keep(self, decoded: dict[str, Decoded]) -> None:
        """Hold what files decoded now hold for the assembly, until take_decoded."""
        with self._decoded_lock:
            self._decoded.update(decoded)

    def take_decoded(self, content_sha256: str) -> Decoded | None:
        """What the file with this content hash holds for the assembly if this pool decoded it and nobody took it
        yet (None otherwise: read it from the cache)."""
        with self._decoded_lock:
            return self._decoded.pop(content_sha256, None)

    def report(self, n_files: int) -> None:
        """Tell on_progress that n_files more files are done."""
        if self.on_progress is not None:
            self.on_progress(n_files)

    def close(self) -> None:
        """Stop the workers (queued batches are cancelled)."""
        with self._executor_lock:
            self._closed = True
            executor = self._executor
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


@contextmanager
def decode_pool(workers: int, decode_batch: Callable[..., dict[str, Decoded]],
                on_progress: ProgressCallback | None = None) -> Iterator[DecodePool[Decoded]]:
    """A DecodePool running decode_batch, for the chunk tasks of this process; closed afterwards."""
    pool = DecodePool(workers, decode_batch, on_progress)
    try:
        yield pool
    finally:
        pool.close()
