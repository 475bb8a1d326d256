"""Which Prefect API a command talks to, decided before Prefect is imported (its settings are read at import).

PREFECT_API_URL when the user set it; else the project's own server when one answers (`make server` writes its
address to PREFECT_HOME/SERVER_FILE), so that runs show up in its UI and no temporary server is started; else
Prefect's temporary (ephemeral) API server, which the command starts at once (start_temporary_server) and announces
in one line on stderr.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# Written by `scripts/prefect_local.sh server` (`make server`) into PREFECT_HOME: {"api_url": ..., "pid": ...}.
SERVER_FILE = "ctcompare-server.json"
SERVER_HEALTH_TIMEOUT_S = 1.0


def configure_local_state(base: Path | None = None, *, create: bool = True) -> None:
    """Keep Prefect's home and matplotlib's cache inside the working folder unless the user chose otherwise; with
    create=False the folder is only named (`--help` and `--version` write nothing), make_local_state makes it."""
    base = Path(base or Path.cwd() / ".ctcompare")
    if create:
        base.mkdir(parents=True, exist_ok=True)  # Prefect creates its home folder but not the parents
    os.environ.setdefault("PREFECT_HOME", str(base / "prefect"))
    os.environ.setdefault("MPLCONFIGDIR", str(base / "matplotlib"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def make_local_state() -> None:
    """Create the folder configure_local_state named for Prefect's home (Prefect creates its home, not the parents);
    OSError when the working folder cannot be written."""
    Path(os.environ["PREFECT_HOME"]).parent.mkdir(parents=True, exist_ok=True)


def project_server_url(prefect_home: Path) -> str | None:
    """The API address of the project's own Prefect server when its file names one and it answers /health."""
    try:
        api_url = str(json.loads((prefect_home / SERVER_FILE).read_text())["api_url"]).rstrip("/")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=SERVER_HEALTH_TIMEOUT_S) as response:
            return api_url if response.status == 200 else None
    except (OSError, ValueError, urllib.error.URLError):
        return None


def choose_prefect_api() -> str | None:
    """Point PREFECT_API_URL at the project's server if one runs; else return the note for a temporary server.

    Does nothing once Prefect is imported (an embedding program or a test harness has chosen already) or when the
    user set PREFECT_API_URL.
    """
    if "prefect" in sys.modules or os.environ.get("PREFECT_API_URL"):
        return None
    prefect_home = Path(os.environ["PREFECT_HOME"])
    api_url = project_server_url(prefect_home)
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
        return None
    server_file = prefect_home / SERVER_FILE
    why = "the one recorded in" if server_file.exists() else "none recorded in"
    return (
        f"ctcompare: no project Prefect server answers ({why} {server_file}); using a temporary one, "
        "so this run will not appear in the UI (start one with `make server`)."
    )


# What Prefect 3 sets for the temporary server it starts itself (prefect.server.api.server.SubprocessASGIServer): no UI,
# ephemeral mode.
TEMPORARY_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
# The temporary server does not register block types at its start, unless the user's environment sets that under any
# of the names Prefect reads it by: to decide whether any changed, Prefect imports every installed Prefect collection
# (prefect-dask, and with it dask.distributed), 0.6-0.75 s of its 5-6 s start on a 2-core machine
# (docs/benchmarks-rerun.md). Nothing is lost: a block registers its own type when it is saved (Block.save), and the
# project server (`make server`, with the UI's block catalogue) still registers them all when it starts.
TEMPORARY_SERVER_DEFAULTS = {
    ("PREFECT_SERVER_REGISTER_BLOCKS_ON_START", "PREFECT_API_BLOCKS_REGISTER_ON_START"): "false",
    ("PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION", "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION"): "false",
}
TEMPORARY_SERVER_STOP_S = 5.0  # Prefect's own wait for its temporary server to stop, before a kill

_temporary_server: subprocess.Popen | None = None
_temporary_note = ""


def temporary_server_environment() -> dict[str, str]:
    """The temporary server's environment: this command's, TEMPORARY_SERVER_ENV, and each of TEMPORARY_SERVER_DEFAULTS
    that the command's environment sets under none of its names."""
    env = {**os.environ, **TEMPORARY_SERVER_ENV}
    for names, value in TEMPORARY_SERVER_DEFAULTS.items():
        if not any(name in os.environ for name in names):
            env[names[0]] = value
    return env


def start_temporary_server(note: str) -> str:
    """Start Prefect's temporary API server for this command now, point this process (and the processes it starts)
    at it with PREFECT_API_URL, and return the API address; `note` is printed when a flow first runs (on_this_api).

    It is the server Prefect itself would start (uvicorn serving prefect.server.api.server:create_app, the UI off,
    ephemeral mode, the database in PREFECT_HOME; block types not registered at start: TEMPORARY_SERVER_DEFAULTS),
    but Prefect starts it only when a flow first calls its API, after importing that server module into the command
    (about 2 s) and then waiting 5-7 s for it. Started here, before the command imports its flow and checks its
    arguments, its start runs beside that work. The listening socket is bound here and handed to the server (uvicorn
    --fd): a request sent before the server is ready waits in the socket's queue instead of failing. Call before
    Prefect is imported (it reads PREFECT_API_URL at import); the server ends with the command (at exit, or through
    flows.lifeline after a kill -9).
    """
    global _temporary_server, _temporary_note
    _temporary_note = note
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listening.bind(("127.0.0.1", 0))
        listening.listen(socket.SOMAXCONN)
        port = listening.getsockname()[1]
        _temporary_server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--fd", str(listening.fileno()), "--log-level", "error", "--lifespan", "on"],
            env=temporary_server_environment(), stdin=subprocess.DEVNULL, pass_fds=(listening.fileno(),))
    finally:
        listening.close()  # the server holds its own copy
    atexit.register(stop_temporary_server)
    api_url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = api_url
    return api_url


class _FirstFlowRunNote(logging.Filter):
    """Prints the temporary-server note once, as the command's first flow run logs its first line (not before: a
    refused argument or a command with nothing to do gets its one sentence and no note)."""

    def __init__(self, note: str) -> None:
        super().__init__()
        self.note: str | None = note

    def filter(self, record: logging.LogRecord) -> bool:
        if self.note:
            print(self.note, file=sys.stderr, flush=True)
            self.note = None
        return True


@contextlib.contextmanager
def on_this_api() -> Iterator[None]:
    """The command's work inside the block. On its temporary server: the note printed at the first flow run's first
    log line, and flow runs without heartbeats (flows.heartbeats.no_heartbeats), since that server ends with the
    command and no server is left to notice one missing. Otherwise nothing changes. Enter once the API is chosen
    (it imports Prefect)."""
    if _temporary_server is None:
        yield
        return
    from flows.heartbeats import no_heartbeats
    from flows.run_logs import FLOW_RUN_LOGGER

    note = _FirstFlowRunNote(_temporary_note)
    logging.getLogger(FLOW_RUN_LOGGER).addFilter(note)
    try:
        with no_heartbeats():
            yield
    finally:
        logging.getLogger(FLOW_RUN_LOGGER).removeFilter(note)


def _api_unreachable(error: BaseException) -> bool:
    """Whether `error`, or one it came from, is a failed connection to the API (httpx/httpcore, or the OS's)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError) or type(current).__module__.split(".")[0] in ("httpx", "httpcore"):
            return True
        current = current.__cause__ or current.__context__
    return False


def temporary_server_failure(error: BaseException, wait_s: float = 10.0) -> str | None:
    """One sentence when this command's temporary server has stopped on its own and `error` (what the work raised)
    came from that, else None. A server that fails at start-up resets the connections waiting for it a moment before
    it exits: after an unreachable API, wait up to wait_s for the exit."""
    server = _temporary_server
    if server is None:
        return None
    if server.poll() is None and _api_unreachable(error):
        try:
            server.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return None
    if server.poll() is None:
        return None
    return (f"Prefect's temporary API server stopped (exit code {server.returncode}; its own errors are "
            "above), so nothing was run; fix what they name, or start a project server with `make server`.")


def stop_temporary_server() -> None:
    """Stop this command's temporary server as Prefect stops its own: SIGTERM, then SIGKILL after
    TEMPORARY_SERVER_STOP_S."""
    global _temporary_server
    server, _temporary_server = _temporary_server, None
    if server is None or server.poll() is not None:
        return
    server.terminate()
    try:
        server.wait(timeout=TEMPORARY_SERVER_STOP_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def check_train_deployment(name: str | None) -> None:
    """ValueError (one sentence) unless `name` ('flow/deployment') is a deployment on the Prefect server this command
    talks to: one API call. A temporary server (none running) holds no deployment, so it is refused without one."""
    if not name:
        return
    if name.count("/") != 1 or not all(name.split("/")):
        raise ValueError(f"--train-deployment {name!r} is not a deployment name; give FLOW/DEPLOYMENT, e.g. train/arm.")
    api_url = os.environ.get("PREFECT_API_URL")
    if not api_url or _temporary_server is not None:
        raise ValueError(f"--train-deployment {name} needs the Prefect server it is registered on, and none answers; "
                         "start it (make server) or set PREFECT_API_URL.")
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise ValueError(f"--train-deployment {name} is not a deployment on the Prefect server at {api_url}; "
                         "'prefect deployment ls' lists them.") from None
    except Exception as error:  # noqa: BLE001 - unreachable, refused, timed out: the server cannot run it either
        raise ValueError(f"--train-deployment {name}: the Prefect server at {api_url} did not answer "
                         f"({type(error).__name__}).") from None
