"""Servers that tests start as processes of their own: a free port, waiting until they answer, stopping them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_answer(process: subprocess.Popen, answers: Callable[[], bool], timeout_s: float,
                    poll_s: float = 0.2) -> bool | None:
    """Poll `answers()` (an HTTP error counts as no answer) until it is true: True; False once `process` has exited;
    None when timeout_s has passed. The caller says what each outcome means."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            if answers():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    return None


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM; a second SIGTERM (a worker may ignore its first); SIGKILL; then anything left in its group."""
    for sig in (signal.SIGTERM, signal.SIGTERM):
        if process.poll() is not None:
            break
        try:
            process.send_signal(sig)
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    if process.poll() is None:
        process.kill()
        process.wait(timeout=grace_s)
    # A process started as the leader of its own session: its group id is its PID (no such group otherwise).
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
