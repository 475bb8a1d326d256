"""Argument checks that several commands share: the output folder, lists of arms and numbers, `--set` pairs.

Each raises UsageError with one sentence before any work starts; none imports Prefect or torch.
"""

from __future__ import annotations

import socket
from pathlib import Path

from data_schemas.plan import ALL_SETTING_KEYS, check_arms
from flows.cli.errors import UsageError
from tasks.common.paths import check_folder_writable, nearest_existing, refuse_non_folder

DASK_CONNECT_TIMEOUT_S = 3.0


def check_output_writable(out: Path, option: str = "--out") -> None:
    """UsageError when `out` (or, before it exists, its nearest existing parent) cannot be written; creates nothing."""
    out = out.resolve()
    try:
        refuse_non_folder(out, option)
        check_folder_writable(out)
    except ValueError as error:
        raise UsageError(str(error)) from None
    except OSError:
        raise UsageError(f"{option} {out} cannot be written (checked {nearest_existing(out)}); "
                         "give a writable folder.") from None


def arm_list(values: list[str] | None) -> list[str]:
    """--arms as given on the command line ('scratch imagenet' and 'scratch,imagenet' both work), each by its
    canonical name (the choices the flow's form offers: 'resnet50:scratch' is 'scratch'); [] without --arms.
    UsageError for an unknown or repeated arm, or --arms with no arm in it (','), listing the choices."""
    if values is None:
        return []
    try:
        return check_arms([item.strip() for value in values for item in value.split(",") if item.strip()])
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_dask_address(address: str | None, timeout_s: float = DASK_CONNECT_TIMEOUT_S) -> None:
    """UsageError (one sentence) unless a Dask scheduler's address ('tcp://host:port' or 'host:port') accepts a
    connection within timeout_s: one connect, so an unreachable cluster is refused at once, not after a long wait."""
    if not address:
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--dask-address {address!r} is not a scheduler address; give tcp://HOST:PORT.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(f"--dask-address {address} does not answer ({reason}, after at most {timeout_s:g} s); start "
                         "the scheduler or leave --dask-address out to decode here.") from None


def comma_numbers(text: str | None, kind: type, option: str) -> list | None:
    """'0.1,0.5' -> sorted distinct numbers; the bounds are the flow's (check_flow_parameters)."""
    if not text:
        return None
    try:
        values = sorted({kind(item) for item in text.split(",") if item.strip()})
    except ValueError:
        noun = "whole numbers" if kind is int else "numbers"
        raise UsageError(f"{option} takes comma-separated {noun}, got {text!r}.") from None
    if not values:
        raise UsageError(f"{option} takes comma-separated numbers, got {text!r}.")
    return values


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """`--set key=value` pairs -> dict; UsageError for a malformed pair or an unknown key."""
    overrides: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got '{pair}'.")
        if key not in ALL_SETTING_KEYS:
            raise UsageError(f"unknown setting '{key}' in --set; known settings: {', '.join(ALL_SETTING_KEYS)}.")
        overrides[key] = value.strip()
    return overrides
