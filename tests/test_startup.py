"""Start-up and shut-down: no Prefect for commands without a flow; a temporary server when no project server answers
(tests/test_deployments.py: a running project server is used); no orphans after kill -9."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.cli import SERVER_FILE
from tests.prefect_db import DEFAULT_DATABASE, seed_database
from tests.prefect_server import ROOT

PROBE = """
import sys
from flows.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print("PREFECT_IMPORTED" if "prefect" in sys.modules else "PREFECT_NOT_IMPORTED", code)
"""


def _plain_env(prefect_home: Path) -> dict[str, str]:
    """The environment of a user's shell: no PREFECT_API_URL, this checkout on the path, state in prefect_home."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), PYTHONPATH=str(ROOT))
    seed_database(prefect_home)  # a temporary server's database, migrated once per test session
    return env


@pytest.mark.parametrize("argv", [["--help"], ["--version"], [], ["bogus"], ["--bogus-option"], ["ingest", "--help"],
                                  ["ingest", "src", "--out", "dataset", "--size", "big"], ["ingest", "src"]])
def test_commands_that_run_no_flow_never_import_prefect(argv: list[str], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                            cwd=tmp_path, env=_plain_env(tmp_path / "prefect"), timeout=60)
    imported, code = result.stdout.split()[-2:]
    assert imported == "PREFECT_NOT_IMPORTED", result.stdout + result.stderr
    assert code == ("0" if argv[-1:] in (["--help"], ["--version"]) else "2")
    if argv == ["--version"]:
        assert result.stdout.startswith("ctcompare ")


def _temporary_servers_of(prefect_home: Path) -> list[str]:
    """The command lines of live uvicorn processes (Prefect's temporary API server) whose PREFECT_HOME is this one."""
    found = []
    for process in psutil.process_iter():
        try:
            if "uvicorn" in _cmdline(process) and process.environ().get("PREFECT_HOME") == str(prefect_home):
                found.append(_cmdline(process))
        except psutil.Error:
            continue
    return found


def test_a_refused_argument_is_one_line_and_leaves_no_server(tmp_path: Path) -> None:
    # ingest checks its arguments once its flow is imported: by then the temporary server is starting (beside the
    # imports); the refusal is still its one sentence, with no note about that server, which ends with the command.
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env=_plain_env(tmp_path / "prefect"), timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"ctcompare ingest: source folder {tmp_path / 'missing'} does not exist or "
                                          "is not a folder."]
    assert _temporary_servers_of(tmp_path / "prefect") == []


def test_a_temporary_server_that_cannot_start_ends_the_command_in_one_sentence(tmp_path: Path) -> None:
    # Its database folder does not exist: the server exits at start-up, and the command says so once its flow fails.
    env = {**_plain_env(tmp_path / "prefect"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'prefect.db'}",
           "PREFECT_CLIENT_MAX_RETRIES": "0"}  # the client's retries only delay the same end
    result = subprocess.run([sys.executable, "-m", "flows.cli", "synth", str(tmp_path / "cohort"), "--patients", "2"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=180)
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("ctcompare synth: Prefect's temporary API server stopped (exit code "), result.stderr
    assert not (tmp_path / "cohort").exists()  # nothing was run
    assert _temporary_servers_of(tmp_path / "prefect") == []


SECRET_ON_A_TEMPORARY_SERVER = """
import asyncio
from flows.cli.prefect_api import start_temporary_server
start_temporary_server("")
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client

async def block_types():
    async with get_client() as client:
        return [block_type.slug for block_type in await client.read_block_types()]

print("BLOCK TYPES AT START", len(asyncio.run(block_types())))
Secret(value="archive-password").save("archive-login")
print("READ BACK", Secret.load("archive-login").get())
"""


def test_a_secret_block_saved_on_a_temporary_server_reads_back(tmp_path: Path) -> None:
    # The temporary server registers no block types at its start (the collections it would import to decide cost
    # 0.6-0.75 s of CPU): a block registers its own type when saved, so a DICOMweb login kept in a Secret block still
    # works, in a database where no block type was ever registered.
    env = _plain_env(tmp_path / "prefect")
    with sqlite3.connect(tmp_path / "prefect" / DEFAULT_DATABASE) as database:
        database.execute("DELETE FROM block_schema")
        database.execute("DELETE FROM block_type")
    result = subprocess.run([sys.executable, "-c", SECRET_ON_A_TEMPORARY_SERVER], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "BLOCK TYPES AT START 0" in result.stdout, result.stdout
    assert "READ BACK archive-password" in result.stdout, result.stdout
    assert _temporary_servers_of(tmp_path / "prefect") == []


def test_block_registration_at_a_temporary_servers_start_follows_the_users_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.settings import Settings

    from flows.cli.prefect_api import TEMPORARY_SERVER_DEFAULTS, temporary_server_environment

    names = [name for aliases in TEMPORARY_SERVER_DEFAULTS for name in aliases]
    for name in names:
        monkeypatch.delenv(name, raising=False)

    def what_the_server_reads(env: dict[str, str]) -> tuple[bool, bool]:
        with monkeypatch.context() as server:
            for name in names:
                server.delenv(name, raising=False)
                if name in env:
                    server.setenv(name, env[name])
            settings = Settings().server
            return settings.register_blocks_on_start, settings.memoize_block_auto_registration

    assert what_the_server_reads(temporary_server_environment()) == (False, False)
    monkeypatch.setenv("PREFECT_API_BLOCKS_REGISTER_ON_START", "true")  # the user's own value, under its older name
    assert what_the_server_reads(temporary_server_environment()) == (True, False)


def test_a_stale_server_file_is_not_used(tmp_path: Path) -> None:
    from flows.cli import project_server_url
    from tests.processes import free_port

    (tmp_path / SERVER_FILE).write_text(json.dumps({"api_url": f"http://127.0.0.1:{free_port()}/api", "pid": 1}))
    assert project_server_url(tmp_path) is None
    (tmp_path / SERVER_FILE).write_text("not json")
    assert project_server_url(tmp_path) is None


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


@pytest.mark.timeout(300)
def test_kill_9_of_an_ingest_leaves_no_worker_or_temporary_server(tmp_path: Path) -> None:
    from tasks.demo.synth import synthesize_cohort

    cohort = synthesize_cohort(tmp_path / "cohort", patients=12, slices_per_patient=4, seed=0)
    out = tmp_path / "dataset"
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "wb") as stderr:
        command = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "ingest",
                str(cohort.dicom_dir),
                "--out",
                str(out),
                "--size",
                "64",
                "--workers",
                "2",
            ],
            cwd=tmp_path,
            env=_plain_env(tmp_path / "prefect"),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        # Wait until the pool is decoding: the first decoded files land in the private cache.
        deadline = time.monotonic() + 240
        while not any((out / "private").glob("cache/*/*/*.npz")):
            assert command.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.05)
        children = _descendants(command.pid)
        command.kill()
        command.wait()
    finally:
        if command.poll() is None:
            command.kill()
    cmdlines = [_cmdline(child) for child in children]
    assert any("uvicorn" in line for line in cmdlines), cmdlines  # Prefect 3's temporary API server
    assert sum("flows.cli ingest" in line for line in cmdlines) >= 2, cmdlines  # the decode workers (forked)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [_cmdline(process) for process in alive]
    # No project server in this PREFECT_HOME: the command said, in one line, that it used a temporary one.
    first_line = stderr_path.read_text().splitlines()[0]
    assert first_line.startswith("ctcompare: no project Prefect server answers") and "temporary" in first_line
