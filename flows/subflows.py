"""Running a flow as a subflow of the flow run that calls it, without a heartbeat thread of its own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings


@contextlib.contextmanager
def as_subflow() -> Iterator[None]:
    """Flows called inside the block start no heartbeat thread (PREFECT_FLOWS_HEARTBEAT_FREQUENCY unset there).

    Why: Prefect 3 gives every flow run a heartbeat thread that sleeps in whole seconds, and a flow run ends only once
    that thread has woken and stopped, so a subflow run took up to a second more than its work (a trivial subflow:
    1.1-1.2 s with the thread, 0.18 s without). The calling flow run keeps its heartbeat, which covers the process
    both run in: a crash that stops the subflow stops it too.
    """
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
