"""Flow runs without a heartbeat thread, where no server could ever use their heartbeats."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings


@contextlib.contextmanager
def no_heartbeats() -> Iterator[None]:
    """Flow runs started inside the block start no heartbeat thread (PREFECT_FLOWS_HEARTBEAT_FREQUENCY unset there).

    A heartbeat lets the API server notice a flow run whose process died. Prefect 3 sends it from a thread that
    sleeps in whole seconds, and a flow run ends only once that thread has woken and stopped, so each flow run took up
    to a second more than its work (a trivial subflow: 1.1-1.2 s with the thread, 0.18 s without). Used for
    - subflows: the calling flow run keeps its heartbeat, and both run in the same process;
    - the flows of a command on its own temporary API server (flows.cli.prefect_api): that server ends with the
      command, so no server is left to notice a heartbeat missing.
    """
    if get_current_settings().flows.heartbeat_frequency is None:  # already off: making new settings takes ~70 ms
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
