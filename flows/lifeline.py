"""Children die with their parent: a watchdog that ends what a `ctcompare` command started once the command is gone.

A command killed with SIGKILL cannot clean up, and its children (Prefect's temporary API server, a `uvicorn`
subprocess the command starts when no project server runs, and the decode pool's worker processes) would be
re-parented and live on. The
command starts this module as a small separate process (standard library and psutil only, no Prefect, no torch).
It notes the command's descendants every POLL_S seconds; once the command has exited, however it exited, it sends
SIGTERM to each noted process that is still running, then SIGKILL after GRACE_S. Processes are matched by PID *and*
start time, so a PID re-used by an unrelated process is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 3.0

_started: subprocess.Popen | None = None
_command_started_at: float | None = None


def mark_command_start() -> None:
    """Record that this process runs a `ctcompare` command, and when the process started (interpreter start-up and
    imports included, from the OS)."""
    import psutil

    global _command_started_at
    _command_started_at = psutil.Process().create_time()


def command_started_at() -> float | None:
    """When this process's `ctcompare` command started (time.time() seconds); None when no console script runs it
    (a deployment's flow run, a test calling a flow): a comparison's wall-time prediction counts from it."""
    return _command_started_at


def start_lifeline() -> subprocess.Popen:
    """Start (once per process) the watchdog that ends this process's descendants when this process ends."""
    global _started
    if _started is None or _started.poll() is not None:
        _started = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
        )
    return _started


def _descendants(parent_pid: int) -> dict[int, float]:
    """PID -> start time of every live descendant of parent_pid, this watchdog excluded."""
    import psutil

    try:
        children = psutil.Process(parent_pid).children(recursive=True)
    except psutil.Error:
        return {}
    noted = {}
    for child in children:
        try:
            noted[child.pid] = child.create_time()
        except psutil.Error:
            continue
    noted.pop(os.getpid(), None)
    return noted


def _end(noted: dict[int, float], grace_s: float) -> None:
    """SIGTERM every noted process still running (same PID and start time), then SIGKILL what is left after grace_s."""
    import psutil

    alive = []
    for pid, created in noted.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created:
                process.terminate()
                alive.append(process)
        except psutil.Error:
            continue
    _, still_running = psutil.wait_procs(alive, timeout=grace_s)
    for process in still_running:
        try:
            process.kill()
        except psutil.Error:
            continue


def watch(parent_pid: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> None:
    """Note parent_pid's descendants until it is gone (this process is then re-parented), then end them."""
    # Ctrl-C and a SIGTERM to the whole process group reach the watchdog too: it must outlive the command to clean up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    noted: dict[int, float] = {}
    while os.getppid() == parent_pid:
        noted.update(_descendants(parent_pid))
        time.sleep(poll_s)
    _end(noted, grace_s)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
