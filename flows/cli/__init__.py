"""The `ctcompare` console script: one sub-command per stage, dispatched here.

Each module named in COMMANDS (flows/cli/<command>.py) exposes `register(subparsers)`, which adds its parser and sets
`handler=<function(args) -> int>`; it checks its arguments, imports its flow only once they pass, and hands the flow
what it validated. Only the module of the command being run is imported, and it imports neither Prefect nor torch
until its handler runs: `ctcompare --help`, `COMMAND --help`, `--version` and a bad argument start nothing.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys
from pathlib import Path

from data_schemas.files import printable_path
from flows.cli.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NO_ARM,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    UsageError,
    quiet_unwritable_tracebacks,
    unwritable_cause,
    unwritable_sentence,
)
from flows.cli.prefect_api import (
    SERVER_FILE,
    choose_prefect_api,
    configure_local_state,
    make_local_state,
    on_this_api,
    project_server_url,
    start_temporary_server,
    temporary_server_failure,
)

__all__ = [
    "COMMANDS", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_NO_ARM", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE",
    "SERVER_FILE", "UsageError", "build_parser", "configure_local_state", "main", "package_version",
    "project_server_url", "unwritable_cause", "unwritable_sentence",
]

# command -> (module that registers it, one-line help for the top-level listing)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("flows.cli.synth", "write a synthetic chest-CT demo cohort (DICOM + labels.csv)"),
    "ingest": ("flows.cli.ingest", "DICOM folder -> pseudonymized tensor dataset"),
    "cost": ("flows.cli.cost", "estimate FLOPs, memory and training time of each arm before training"),
    "train": ("flows.cli.train", "train one arm (scratch, imagenet, imagenet-linear) on an ingested dataset"),
    "predict": ("flows.cli.predict", "run a model package on new DICOM files (same recipe, threshold, patient level)"),
    "compare": ("flows.cli.compare", "the whole comparison: ingest, cost, train every arm, report"),
    "demo": ("flows.cli.demo", "synthetic demo cohort + the whole comparison (cpu profile)"),
    "serve": ("flows.cli.serve", "serve the reports under a folder read-only over HTTP on loopback"),
}
COMMANDS_WITHOUT_FLOWS = ("serve",)  # they never talk to a Prefect API
# Commands whose --out is checked for writing before any work (ingest checks its own, with its other arguments).
OUT_CHECKED_COMMANDS = ("train", "compare", "demo")


def package_version() -> str:
    """The installed ctcompare version (package metadata), or a note that it is not installed."""
    from tasks.common.environment import ctcompare_version

    return ctcompare_version()


class _PrintVersion(argparse.Action):
    """`--version`: the version is looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"ctcompare {package_version()}")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command` fully defined (its module imported), or a light listing of every command."""
    parser = argparse.ArgumentParser(
        prog="ctcompare",
        description="ResNet-50 from scratch vs ImageNet weights on DICOM CT: ingest, cost, train, compare.",
    )
    parser.add_argument("--version", action=_PrintVersion)
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


def _refused(command: str, error: UsageError) -> int:
    print(f"ctcompare {command}: {error}", file=sys.stderr)
    return EXIT_USAGE


def _exit_without_collecting() -> None:
    """Turn the garbage collector off for the interpreter's teardown, whose collection passes over every object of
    every imported module (Prefect, pydantic) are a large share of a short command such as a re-run. The command's
    files are closed by then, and the atexit handlers registered before this one (logging's among them) still run
    after it."""
    gc.freeze()
    gc.disable()


def main(argv: list[str] | None = None) -> int:
    """Run one `ctcompare` command; returns its exit code (flows.cli.errors)."""
    from flows.lifeline import mark_command_start

    mark_command_start()
    atexit.unregister(_exit_without_collecting)  # once, however often main runs in one process
    atexit.register(_exit_without_collecting)
    configure_local_state(create=False)  # named now (Prefect reads it at import), made once the arguments parse
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    # Before the command's module (and with it Prefect) is imported: Prefect reads its settings at import.
    api_note = choose_prefect_api() if command in COMMANDS and command not in COMMANDS_WITHOUT_FLOWS else None
    args = build_parser(command).parse_args(argv)  # --help and --version end here, having written nothing
    try:
        make_local_state()
    except OSError as error:
        return _refused(args.command, UsageError(
            f"cannot make {printable_path(os.environ['PREFECT_HOME'])} for Prefect's state "
            f"({error.strerror or error}); "
            "run from a folder you can write, or set PREFECT_HOME."))
    if args.command in OUT_CHECKED_COMMANDS:
        from flows.cli.checks import check_output_writable

        try:
            check_output_writable(Path(args.out))
        except UsageError as error:
            return _refused(args.command, error)
    from flows.lifeline import start_lifeline

    start_lifeline()  # the temporary API server and the pool workers end with this command, even on kill -9
    if api_note:  # no server answers: start the temporary one now, beside the command's imports and checks
        start_temporary_server(api_note)
    quiet_unwritable_tracebacks()
    try:
        with on_this_api():
            return int(args.handler(args) or EXIT_OK)
    except UsageError as error:
        return _refused(args.command, error)
    except KeyboardInterrupt:
        print(f"ctcompare {args.command}: interrupted; finished work is kept and a re-run resumes.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - a full or read-only disk, however deep: one sentence, not a traceback
        unwritable = unwritable_cause(error)
        if unwritable is not None:
            print(f"ctcompare {args.command}: {unwritable_sentence(unwritable)}", file=sys.stderr)
            return EXIT_FAILED
        server_failure = temporary_server_failure(error)
        if server_failure is not None:
            print(f"ctcompare {args.command}: {server_failure}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(error, ValueError) and str(error):  # refused input found during the work (e.g. labels vs headers)
            print(f"ctcompare {args.command}: {str(error).splitlines()[0]}", file=sys.stderr)
            return EXIT_FAILED
        raise
