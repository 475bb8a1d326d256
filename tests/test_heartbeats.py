"""A subflow run inside flows.heartbeats.no_heartbeats starts no heartbeat thread; the calling run keeps its own."""

from __future__ import annotations

import threading

from prefect import flow
from prefect.settings import get_current_settings

from flows.heartbeats import no_heartbeats


def heartbeat_threads() -> int:
    """Prefect's flow-run heartbeat threads alive now (each runs the engine's `heartbeat_loop`)."""
    return sum("heartbeat_loop" in repr(getattr(thread, "_args", ())) for thread in threading.enumerate())


@flow
def child_flow() -> tuple[int | None, int]:
    return get_current_settings().flows.heartbeat_frequency, heartbeat_threads()


def other_settings() -> dict[str, object]:
    """Every setting but the heartbeat's, as plain values."""
    values = get_current_settings().model_dump(mode="json")
    values["flows"].pop("heartbeat_frequency")
    return values


@flow
def parent_flow() -> dict[str, object]:
    seen: dict[str, object] = {"parent": heartbeat_threads()}
    outside = other_settings()
    with no_heartbeats():
        seen["no_heartbeats"] = child_flow()
        seen["others_kept"] = other_settings() == outside and outside["api"]["url"] is not None
    seen["plain"] = child_flow()
    seen["after"] = get_current_settings().flows.heartbeat_frequency
    return seen


def test_a_subflow_inside_no_heartbeats_has_no_heartbeat_and_its_caller_keeps_one() -> None:
    seen = parent_flow()
    assert seen["parent"] == 1  # the calling flow run's own heartbeat
    assert seen["no_heartbeats"] == (None, 1)  # no second thread: only the caller's is alive
    assert seen["others_kept"] is True  # the API address and every other setting as outside the block
    default = seen["after"]
    assert isinstance(default, int) and seen["plain"] == (default, 2)  # outside the block, Prefect's default again
