"""The test session's Prefect API: one real server for every test process, and a migrated database for every other
server a test starts.

The pytest process that hands out the tests (or the only one, without xdist) starts one Prefect API server on a free
loopback port before the test processes exist, and stops it at the end; every test process sends its flow runs there,
as a team's processes share one project server. The server is the same one Prefect's `prefect_test_harness` starts
(uvicorn on `prefect.server.api.server:create_app`, ephemeral mode, no UI) on a throw-away SQLite database.

Once it answers, a snapshot of its database (every migration applied, block types registered) becomes the session's
template: each server a test starts itself (tests/prefect_server.py, test_startup) opens a copy, and so starts like a
user's second `make server`, where the migrations find nothing to do.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.processes import free_port, stop_process, wait_for_answer

TEMPLATE_ENV = "CTCOMPARE_TESTS_PREFECT_DB"  # where the template is, for the test processes and their children
READY_ENV = "CTCOMPARE_TESTS_PREFECT_READY"  # the starter writes the server's API URL here, or why it did not start
DEFAULT_DATABASE = "prefect.db"  # the file of Prefect's default connection URL, in PREFECT_HOME
START_TIMEOUT_S = 600  # a migration on a fresh database while the test processes import torch: a minute or more
PORT_ATTEMPTS = 3  # a free port can be taken by another process before the server binds it: try another


class SessionPrefectAPI:
    """One Prefect API server for the whole test session, started in the background by `start()`.

    Args:
        state_dir: a fresh folder for the server's database, its log, the template and the ready file.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.database = self.state_dir / "prefect-session.db"
        self.template = self.state_dir / "prefect-template.db"
        self.ready_file = self.state_dir / "ready"
        self.log = self.state_dir / "server.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._starting = threading.Thread(target=self._start_and_snapshot, name="prefect-session-api", daemon=True)

    def environment(self) -> dict[str, str]:
        """What a test process needs to find the server (once it answers) and the template."""
        return {READY_ENV: str(self.ready_file), TEMPLATE_ENV: str(self.template)}

    def start(self) -> None:
        """Start the server and return at once; `wait_until_ready` (in the test processes) waits for it."""
        self._starting.start()

    def _start_and_snapshot(self) -> None:
        try:
            url = self._serve()
            partial = self.template.with_name("prefect-template.partial.db")
            with sqlite3.connect(self.database) as source, sqlite3.connect(partial) as copy:
                source.backup(copy)  # a consistent copy of a live database (its write-ahead log included)
            partial.rename(self.template)
            self._announce(url)
        except Exception as error:  # the test processes read this sentence instead of waiting in vain
            self._announce(f"the session's Prefect API did not start: {error} (log: {self.log})")

    def _announce(self, text: str) -> None:
        """Write the ready file whole (the test processes poll for it)."""
        partial = self.ready_file.with_name("ready.partial")
        partial.write_text(text)
        partial.rename(self.ready_file)

    def _serve(self) -> str:
        """Start the server on a free loopback port (another one if that is taken first); its API URL."""
        env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
        env.update({
            "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.database}",
        })
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = free_port()
            with open(self.log, "ab") as log:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                     "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            url = f"http://127.0.0.1:{port}/api"
            answered = wait_for_answer(
                self._process, lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, START_TIMEOUT_S)
            if answered:
                return url
            if answered is None:
                raise TimeoutError(f"no answer from {url} within {START_TIMEOUT_S} s")
            if attempt == PORT_ATTEMPTS:
                raise RuntimeError(f"the server exited with code {self._process.returncode}")
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the server (tests.processes.stop_process), then remove its folder."""
        self._starting.join(timeout=START_TIMEOUT_S)
        if self._process is not None:
            stop_process(self._process)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def wait_until_ready() -> str | None:
    """The session server's API URL once it answers (None when this session has none); raises with the starter's
    sentence if it could not start."""
    ready = os.environ.get(READY_ENV)
    if not ready:
        return None
    deadline = time.monotonic() + START_TIMEOUT_S
    while not Path(ready).is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the session's Prefect API was not ready within {START_TIMEOUT_S} s ({ready})")
        time.sleep(0.2)
    status = Path(ready).read_text()
    if not status.startswith("http"):
        raise RuntimeError(status)
    return status


def seed_database(directory: Path, name: str = DEFAULT_DATABASE) -> None:
    """Copy the session's template (TEMPLATE_ENV) to directory/name unless a database is there already; without a
    template, nothing (the server then migrates a fresh database itself)."""
    template = os.environ.get(TEMPLATE_ENV)
    target = Path(directory) / name
    if template and Path(template).is_file() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, target)
