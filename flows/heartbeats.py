"""Flow runs without a heartbeat thread, where no server could ever use their heartbeats."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.context import SettingsContext, get_settings_context


@contextlib.contextmanager
def no_heartbeats() -> Iterator[None]:
    """Flow runs started inside the block start no heartbeat thread (PREFECT_FLOWS_HEARTBEAT_FREQUENCY unset there).

    A heartbeat lets the API server notice a flow run whose process died. Prefect 3 sends it from a thread that
    sleeps in whole seconds, and a flow run ends only once that thread has woken and stopped, so each flow run took up
    to a second more than its work (a trivial subflow: 1.1-1.2 s with the thread, 0.18 s without). Used for
    - subflows: the calling flow run keeps its heartbeat, and both run in the same process;
    - the flows of a command on its own temporary API server (flows.cli.prefect_api): that server ends with the
      command, so no server is left to notice a heartbeat missing.

    The block's settings are the current ones with that one field changed, as prefect.settings.temporary_settings
    gives, but copied instead of validated again from the environment (that took 40-150 ms per subflow).
    """
    context = get_settings_context()
    settings = context.settings
    if settings.flows.heartbeat_frequency is None:  # already off
        yield
        return
    flows = settings.flows.model_copy(update={"heartbeat_frequency": None})
    with SettingsContext(profile=context.profile, settings=settings.model_copy(update={"flows": flows})):
        yield
