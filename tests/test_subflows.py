"""A subflow run inside flows.subflows.as_subflow starts no heartbeat thread of its own; its caller keeps its own."""

from __future__ import annotations

import threading

from prefect import flow
from prefect.settings import get_current_settings

from flows.subflows import as_subflow


def heartbeat_threads() -> int:
    """Prefect's flow-run heartbeat threads alive now (each runs the engine's `heartbeat_loop`)."""
    return sum("heartbeat_loop" in repr(getattr(thread, "_args", ())) for thread in threading.enumerate())


@flow
def child_flow() -> tuple[int | None, int]:
    return get_current_settings().flows.heartbeat_frequency, heartbeat_threads()


@flow
def parent_flow() -> dict[str, object]:
    seen: dict[str, object] = {"parent": heartbeat_threads()}
    with as_subflow():
        seen["as_subflow"] = child_flow()
    seen["plain"] = child_flow()
    seen["after"] = get_current_settings().flows.heartbeat_frequency
    return seen


def test_a_subflow_inside_as_subflow_has_no_heartbeat_and_its_caller_keeps_one() -> None:
    seen = parent_flow()
    assert seen["parent"] == 1  # the calling flow run's own heartbeat
    assert seen["as_subflow"] == (None, 1)  # no second thread: only the caller's is alive
    default = seen["after"]
    assert isinstance(default, int) and seen["plain"] == (default, 2)  # outside the block, Prefect's default again
