"""A real local Prefect stack for tests: `prefect server` with the report server, the deployments from prefect.yaml
and a process worker.

Everything is started through scripts/prefect_local.sh (the same commands `make server`, `make deploy` and
`make worker` run), each in its own session, with an explicit environment: a temporary PREFECT_HOME, a free
loopback port, and no PREFECT_* setting inherited from the test process (whose session Prefect API is not used
here). `stop()` ends every process it started by its PID (SIGTERM twice, then SIGKILL), and then whatever is
left in those processes' groups (flow-run processes started by the worker).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.prefect_db import seed_database
from tests.processes import free_port, stop_process, wait_for_answer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prefect_local.sh"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
UUID_LINE = re.compile(r"UUID:\s*([0-9a-f-]{36})")


def prefect_executable() -> str:
    """The `prefect` command of the checkout's .venv, else the one beside the running Python, else from PATH."""
    for candidate in (ROOT / ".venv" / "bin" / "prefect", Path(sys.executable).parent / "prefect"):
        if candidate.exists():
            return str(candidate)
    return "prefect"


def ctcompare_executable() -> str:
    """The `ctcompare` console script beside the running Python (imports this checkout's code via PYTHONPATH)."""
    for candidate in (ROOT / ".venv" / "bin" / "ctcompare", Path(sys.executable).parent / "ctcompare"):
        if candidate.exists():
            return str(candidate)
    return "ctcompare"


class PrefectStack:
    """One Prefect server (+ optionally a worker) under `state_dir`; use as a context manager or call stop()."""

    def __init__(self, state_dir: Path, port: int | None = None, pool: str = "ctcompare-local") -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        seed_database(self.state_dir / "prefect")  # the server's database, migrated once per test session
        self.port = port or free_port()
        self.pool = pool
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        # `server` also starts the report server (ctcompare serve) over reports_root, as `make server` does
        self.reports_root = self.state_dir / "reports"
        self.reports_port = free_port()
        self.reports_url = f"http://127.0.0.1:{self.reports_port}/"
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.deploy_output = ""
        base = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        self.env = {
            **base,
            "CTCOMPARE_ROOT": str(ROOT),
            "CTCOMPARE_PREFECT_PORT": str(self.port),
            "CTCOMPARE_WORK_POOL": pool,
            "CTCOMPARE_REPORTS_ROOT": str(self.reports_root),
            "CTCOMPARE_REPORTS_PORT": str(self.reports_port),
            "CTCOMPARE": ctcompare_executable(),
            "PREFECT_HOME": str(self.state_dir / "prefect"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            # Two slots: a comparison that hands its arms to `train/arm` waits on them while they run.
            "CTCOMPARE_WORKER_LIMIT": "2",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "MPLCONFIGDIR": str(self.state_dir / "matplotlib"),
            "TORCH_HOME": str(self.state_dir / "torch"),
            "PREFECT": prefect_executable(),
        }
        self.client = httpx.Client(base_url=self.api_url, timeout=30)

    # -- processes -----------------------------------------------------------------------------------------------
    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = self.state_dir / f"{name}.log"
        handle = open(log, "wb")
        process = subprocess.Popen(
            [str(SCRIPT), *args], cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        handle.close()
        self.processes[name], self.logs[name] = process, log
        return process

    def log_tail(self, name: str, lines: int = 60) -> str:
        path = self.logs.get(name)
        if path is None or not path.exists():
            return f"(no {name} log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def start_server(self, timeout_s: float = 180) -> None:
        """`scripts/prefect_local.sh server`: the Prefect server and the report server; returns once both answer."""
        server = self._start("server", "server")
        answered = wait_for_answer(server, lambda: self.client.get("/health").status_code == 200
                                   and bool(httpx.get(self.reports_url, timeout=5).status_code), timeout_s, poll_s=0.5)
        if answered is False:
            raise RuntimeError(f"prefect server exited with {server.returncode}:\n{self.log_tail('server')}")
        if answered is None:
            raise RuntimeError(f"prefect server did not answer within {timeout_s:.0f} s:\n{self.log_tail('server')}")

    def deploy(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """`scripts/prefect_local.sh deploy [ARGS]`: the work pool, then `prefect deploy --all` (or ARGS), its output
        kept in deploy_output. At 80 columns, the width a pipe gets without a terminal's."""
        result = self.cli(str(SCRIPT), "deploy", *args, timeout_s=timeout_s, columns=80)
        if result.returncode != 0:
            raise RuntimeError(f"deploy failed ({result.returncode}):\n{result.stdout[-4000:]}")
        self.deploy_output = result.stdout
        return result

    def start_worker(self) -> None:
        self._start("worker", "worker")

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            stop_process(self.processes[name])
        self.client.close()

    def __enter__(self) -> PrefectStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- commands and the API ------------------------------------------------------------------------------------
    def cli(self, *argv: str, timeout_s: float = 120, columns: int = 200) -> subprocess.CompletedProcess:
        """Run a command with the stack's environment (stdout and stderr together in .stdout)."""
        return subprocess.run(
            list(argv), cwd=ROOT, env={**self.env, "COLUMNS": str(columns)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
        )

    def user_env(self) -> dict[str, str]:
        """A user's shell in the checkout: the stack's PREFECT_HOME, but no PREFECT_API_URL (found, not given)."""
        env = {key: value for key, value in self.env.items() if key != "PREFECT_API_URL"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
        return env

    def prefect(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return self.cli(self.env["PREFECT"], *args, timeout_s=timeout_s)

    def run_deployment(self, name: str, parameters: dict[str, str]) -> tuple[subprocess.CompletedProcess, str | None]:
        """`prefect deployment run NAME --param k=v ...`; returns the result and the new flow run's id (or None)."""
        argv = ["deployment", "run", name]
        for key, value in parameters.items():
            argv += ["--param", f"{key}={value}"]
        result = self.prefect(*argv)
        match = UUID_LINE.search(result.stdout)
        return result, match.group(1) if match else None

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = self.client.post(path, json=body)
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> Any:
        response = self.client.get(path)
        response.raise_for_status()
        return response.json()

    def wait_for_flow_run(self, flow_run_id: str, timeout_s: float = 300) -> dict[str, Any]:
        """Poll the flow run until it is in a terminal state; fails with the worker's log on a timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            flow_run = self.get(f"/flow_runs/{flow_run_id}")
            state = (flow_run.get("state") or {}).get("type")
            if state in TERMINAL_STATES:
                return flow_run
            worker = self.processes.get("worker")
            if worker is not None and worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}:\n{self.log_tail('worker')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {state} after {timeout_s:.0f} "
                                   f"s:\n{self.log_tail('worker')}")
            time.sleep(1)

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        return self.post(
            "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
        )

    def final_task_runs(self, flow_run_id: str, name_prefix: str = "", timeout_s: float = 60) -> list[dict[str, Any]]:
        """The flow run's task runs once all are in a terminal state (task states reach the API as events, a bit
        after the flow run itself finished)."""
        deadline = time.monotonic() + timeout_s
        while True:
            runs = [t for t in self.task_runs(flow_run_id) if t["name"].startswith(name_prefix)]
            if runs and all((t.get("state") or {}).get("type") in TERMINAL_STATES for t in runs):
                return runs
            if time.monotonic() > deadline:
                return runs
            time.sleep(1)

    def artifacts(self, flow_run_id: str) -> list[dict[str, Any]]:
        return self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})

    def log_messages(self, flow_run_id: str) -> list[str]:
        messages: list[str] = []
        while True:
            rows = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC",
                                              "limit": 200, "offset": len(messages)})
            messages += [row["message"] for row in rows]
            if len(rows) < 200:
                return messages

    def wait_for_log(self, flow_run_id: str, text: str, level: int = 0, timeout_s: float = 60) -> list[str]:
        """The run's messages at `level` or above once one holds `text` (log lines reach the API in batches, a bit
        after the run's state); all of them, without it, after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}, "level": {"ge_": level}},
                                              "sort": "TIMESTAMP_ASC"})
            messages = [row["message"] for row in rows]
            if any(text in message for message in messages) or time.monotonic() > deadline:
                return messages
            time.sleep(1)

    def flow_runs_of(self, deployment: str) -> list[dict[str, Any]]:
        flow_name, deployment_name = deployment.split("/", 1)
        return self.post("/flow_runs/filter", {
            "flows": {"name": {"any_": [flow_name]}}, "deployments": {"name": {"any_": [deployment_name]}},
        })

    def deployment(self, name: str) -> dict[str, Any]:
        flow_name, deployment_name = name.split("/", 1)
        return self.get(f"/deployments/name/{flow_name}/{deployment_name}")
