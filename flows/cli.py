"""The `ctcompare` console script: one sub-command per Prefect flow.

Each flow module named in COMMANDS exposes `register(subparsers)`, which adds its sub-commands and sets
`handler=<function(args) -> int>`. Only the module of the command being run is imported (the others pull in
torch and friends for nothing); `ctcompare --help`, `--version` and a bad command never import Prefect.

Which Prefect API a command talks to, decided before Prefect is imported (its settings are read at import):
PREFECT_API_URL when the user set it; else the project's own server when one answers (`make server` writes its
address to PREFECT_HOME/SERVER_FILE), so that runs show up in its UI and no temporary server is started; else
Prefect's temporary (ephemeral) API, which the command announces in one line on stderr.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

# command -> (module that registers it, one-line help for the top-level listing)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("flows.synth", "write a synthetic chest-CT demo cohort (DICOM + labels.csv)"),
    "ingest": ("flows.ingest_command", "DICOM folder -> pseudonymized tensor dataset"),
    "cost": ("flows.cost", "estimate FLOPs, memory and training time of each arm before training"),
    "train": ("flows.train", "train one arm (scratch, imagenet, imagenet-linear) on an ingested dataset"),
    "predict": ("flows.predict", "run a model package on new DICOM files (same recipe, threshold, patient level)"),
    "compare": ("flows.compare", "the whole comparison: ingest, cost, train every arm, report"),
    "demo": ("flows.compare", "synthetic demo cohort + the whole comparison (cpu profile)"),
    "serve": ("flows.serve", "serve report folders read-only over HTTP on loopback"),
}


# Written by `scripts/prefect_local.sh server` (`make server`) into PREFECT_HOME: {"api_url": ..., "pid": ...}.
SERVER_FILE = "ctcompare-server.json"
SERVER_HEALTH_TIMEOUT_S = 1.0


def configure_local_state(base: Path | None = None) -> None:
    """Keep Prefect's home and matplotlib's cache inside the working folder unless the user chose otherwise."""
    base = Path(base or Path.cwd() / ".ctcompare")
    base.mkdir(parents=True, exist_ok=True)  # Prefect creates its home folder but not the parents
    os.environ.setdefault("PREFECT_HOME", str(base / "prefect"))
    os.environ.setdefault("MPLCONFIGDIR", str(base / "matplotlib"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API can take longer than Prefect's 20 s default to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


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


def package_version() -> str:
    """The installed ctcompare version (package metadata), or a note that it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ctcompare")
    except PackageNotFoundError:
        return "unknown (not installed)"


def arm_list(values: list[str] | None) -> list[str]:
    """--arms as given on the command line: 'scratch imagenet' and 'scratch,imagenet' both work."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


class UsageError(Exception):
    """A bad argument: reported as one sentence before any work starts."""


# An OSError that means "this folder cannot take more bytes" -> what the user can do; reported as one sentence.
UNWRITABLE_ADVICE: dict[int, str] = {
    errno.ENOSPC: "the disk holding {path} is full; free space on it and re-run: finished work is kept.",
    errno.EDQUOT: "the disk quota for {path} is used up; free space or raise the quota and re-run: finished work is kept.",
    errno.EROFS: "{path} is on a read-only file system; give an output folder on a writable disk and re-run.",
    errno.EACCES: "{path} cannot be written (permission denied); give a writable output folder or fix its permissions and re-run.",
    errno.EPERM: "{path} cannot be written (operation not permitted); give a writable output folder and re-run.",
}
# Commands whose --out is checked for writing before any work (ingest checks its own, with its other arguments).
OUT_CHECKED_COMMANDS = ("train", "compare", "demo")


def unwritable_cause(error: BaseException) -> OSError | None:
    """The disk-full, quota, read-only or permission OSError in error or what it was raised from or during
    (__cause__, __context__: Prefect re-raises a task's exception, tasks wrap theirs); None when there is none."""
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in UNWRITABLE_ADVICE:
            return current
        pending += [current.__cause__, current.__context__]
    return None


def unwritable_sentence(error: OSError) -> str:
    """One sentence naming the path an unwritable-output error is about and what to do."""
    path = error.filename if error.filename is not None else "the output folder"
    return UNWRITABLE_ADVICE[error.errno].format(path=path)


def check_output_writable(out: Path) -> None:
    """UsageError when `out` (or, before it exists, its nearest existing parent) cannot be written; creates nothing."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder.")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("/"))
    try:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied", str(parent))
        tempfile.TemporaryFile(dir=parent).close()  # the real test (read-only mounts, immutable folders, root)
    except OSError:
        raise UsageError(f"--out {out} cannot be written (checked {parent}); give a writable folder.") from None


class _NoTracebackForUnwritable(logging.Filter):
    """Drops the traceback from Prefect's log lines about a full or read-only disk: its one-line message stays, and
    the command ends with the one sentence that says what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and unwritable_cause(exc) is not None:
            record.exc_info, record.exc_text = None, None
        return True


def quiet_unwritable_tracebacks() -> None:
    """Install _NoTracebackForUnwritable on the loggers of Prefect's flow and task runs (console and API alike)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForUnwritable())


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command` fully defined (its module imported), or a light listing of every command."""
    parser = argparse.ArgumentParser(
        prog="ctcompare",
        description="ResNet-50 from scratch vs ImageNet weights on DICOM CT: ingest, cost, train, compare.",
    )
    parser.add_argument("--version", action="version", version=f"ctcompare {package_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(subparsers)
    else:
        for name, (_, help_text) in COMMANDS.items():
            subparsers.add_parser(name, help=help_text)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The sub-command named in argv (the first word that is not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


_command_started_at: float | None = None


def command_started_at() -> float | None:
    """When this `ctcompare` command's process started (time.time() seconds), None when not run by the console
    script (a deployment's flow run, a test calling a flow): a comparison's wall-time prediction counts from it."""
    return _command_started_at


def _process_start_time() -> float:
    """This process's start (interpreter start-up and imports included), from the OS."""
    import psutil

    return psutil.Process().create_time()


def main(argv: list[str] | None = None) -> int:
    global _command_started_at
    _command_started_at = _process_start_time()
    configure_local_state()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    # Before the command's module (and with it Prefect) is imported: Prefect reads its settings at import.
    api_note = choose_prefect_api() if command in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if api_note:
        announce_temporary_server(api_note)
    try:
        if args.command in OUT_CHECKED_COMMANDS:
            check_output_writable(Path(args.out))
    except UsageError as error:
        print(f"ctcompare {args.command}: {error}", file=sys.stderr)
        return 2
    from flows.lifeline import start_lifeline

    start_lifeline()  # the temporary API server and the pool workers end with this command, even on kill -9
    quiet_unwritable_tracebacks()
    try:
        return int(args.handler(args) or 0)
    except UsageError as error:
        print(f"ctcompare {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctcompare {args.command}: interrupted; finished work is kept and a re-run resumes.", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a full or read-only disk, however deep: one sentence, not a traceback
        unwritable = unwritable_cause(error)
        if unwritable is not None:
            print(f"ctcompare {args.command}: {unwritable_sentence(unwritable)}", file=sys.stderr)
            return 1
        if isinstance(error, ValueError) and str(error):  # refused input found during the work (e.g. labels vs headers)
            print(f"ctcompare {args.command}: {str(error).splitlines()[0]}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    # `python -m flows.cli` runs this file as __main__; the commands import flows.cli, a second copy with its own
    # UsageError class. Run that copy's main, so that the UsageError they raise is the one caught there.
    from flows.cli import main as imported_main

    sys.exit(imported_main())
