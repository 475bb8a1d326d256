"""Choosing where a flow's parallel tasks run: threads feeding a local decode pool, or an existing Dask cluster."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.ingest.decode_pool import DecodePool, ProgressCallback, decode_pool

# Chunk tasks in flight at once on the local runner. Each only hands its files to the decode pool and waits, so a
# few threads keep every worker busy; more would only add Prefect API traffic on the cores that decode.
LOCAL_CHUNK_THREADS = 4


@contextlib.contextmanager
def _reporting_to_this_api() -> Iterator[None]:
    """Point processes started from here (Dask workers) at this flow's API.

    In ephemeral mode (no PREFECT_API_URL) each worker process would otherwise start a temporary API server
    of its own (seconds each); pointing them at the flow's own temporary server avoids that.
    """
    if PREFECT_API_URL.value():
        yield
        return
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


@contextlib.contextmanager
def chunk_task_runner(workers: int, decode_batch: Callable[..., dict[str, Any]], dask_address: str | None = None,
                      on_progress: ProgressCallback | None = None) -> Iterator[tuple[TaskRunner, DecodePool | None]]:
    """Enter the runner for decode chunks, with the decode pool the chunk tasks hand their files to: a Dask runner
    on `dask_address` if given (no pool: each chunk decodes on its Dask worker), else local.

    Local: the chunk tasks run in threads of this process (no Prefect engine in worker processes), and hand their
    files to a decode pool of `workers` processes running decode_batch (1: decoded in those threads), which calls
    on_progress(n_files) after each batch.
    """
    if dask_address:
        from prefect_dask import DaskTaskRunner

        with _reporting_to_this_api(), DaskTaskRunner(address=dask_address) as runner:
            yield runner, None
        return
    with decode_pool(workers, decode_batch, on_progress) as pool, \
            ThreadPoolTaskRunner(max_workers=LOCAL_CHUNK_THREADS) as runner:
        yield runner, pool
