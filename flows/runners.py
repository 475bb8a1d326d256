"""Choosing where a flow's parallel tasks run: local processes, or an existing Dask cluster."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner


def make_task_runner(workers: int | None = None, dask_address: str | None = None) -> TaskRunner:
    """A Dask runner on `dask_address` if given; else a process pool of `workers` (default: all cores).

    workers=1 runs tasks in a thread of the flow's own process (no pool start-up cost).
    """
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return ThreadPoolTaskRunner(max_workers=1)
    return ProcessPoolTaskRunner(max_workers=workers)


@contextlib.contextmanager
def running_task_runner(workers: int | None = None, dask_address: str | None = None) -> Iterator[TaskRunner]:
    """Enter a task runner whose worker processes report to this flow's API.

    In ephemeral mode (no PREFECT_API_URL) each worker process would otherwise start a temporary API server
    of its own (seconds each); pointing them at the flow's own temporary server avoids that.
    """
    runner = make_task_runner(workers, dask_address)
    settings = contextlib.nullcontext()
    if not PREFECT_API_URL.value() and not isinstance(runner, ThreadPoolTaskRunner):
        with get_client(sync_client=True) as client:
            api_url = str(client.api_url).rstrip("/")
        settings = temporary_settings(updates={PREFECT_API_URL: api_url})
    with settings, runner:
        yield runner
