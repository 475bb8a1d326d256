"""Which Prefect API a command talks to, decided before Prefect is imported (its settings are read at import).

PREFECT_API_URL when the user set it; else the project's own server when one answers (`make server` writes its
address to PREFECT_HOME/SERVER_FILE), so that runs show up in its UI and no temporary server is started; else
Prefect's temporary (ephemeral) API, which the command announces in one line on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.error
import urllib.request
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
    # The ephemeral API can take longer than Prefect's 20 s default to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


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


class _TemporaryServerNote(logging.Filter):
    """Prints the fallback note once, as Prefect logs that it starts its temporary server (not before: a refused
    argument or a command with nothing to do starts no server and gets no note)."""

    def __init__(self, note: str) -> None:
        super().__init__()
        self.note: str | None = note

    def filter(self, record: logging.LogRecord) -> bool:
        if self.note and record.getMessage().startswith("Starting temporary server"):
            print(self.note, file=sys.stderr, flush=True)
            self.note = None
        return True


def announce_temporary_server(note: str) -> None:
    """Have `note` printed on stderr when Prefect starts its temporary API server (it logs that on "prefect")."""
    logging.getLogger("prefect").addFilter(_TemporaryServerNote(note))


def check_train_deployment(name: str | None) -> None:
    """ValueError (one sentence) unless `name` ('flow/deployment') is a deployment on the Prefect server this command
    talks to: one API call. A temporary server (none running) holds no deployment, so it is refused without one."""
    if not name:
        return
    if name.count("/") != 1 or not all(name.split("/")):
        raise ValueError(f"--train-deployment {name!r} is not a deployment name; give FLOW/DEPLOYMENT, e.g. train/arm.")
    api_url = os.environ.get("PREFECT_API_URL")
    if not api_url:
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
