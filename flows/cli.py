"""The `ctcompare` console script: one sub-command per Prefect flow.

Each flow module named in COMMANDS exposes `register(subparsers)`, which adds its sub-commands and sets
`handler=<function(args) -> int>`. Only the module of the command being run is imported (the others pull in
torch and friends for nothing); `ctcompare --help` lists COMMANDS without importing any. Flows run against
PREFECT_API_URL when it is set (and show up in that server's UI), and in Prefect's ephemeral mode otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# command -> (module that registers it, one-line help for the top-level listing)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("flows.synth", "write a synthetic chest-CT demo cohort (DICOM + labels.csv)"),
    "ingest": ("flows.ingest", "DICOM folder -> pseudonymized tensor dataset"),
    "cost": ("flows.cost", "estimate FLOPs, memory and training time of each arm before training"),
    "train": ("flows.train", "train one arm (scratch, imagenet, imagenet-linear) on an ingested dataset"),
    "predict": ("flows.predict", "run a model package on new DICOM files (same recipe, threshold, patient level)"),
    "compare": ("flows.compare", "the whole comparison: ingest, cost, train every arm, report"),
    "demo": ("flows.compare", "synthetic demo cohort + the whole comparison (cpu profile)"),
    "serve": ("flows.serve", "serve report folders read-only over HTTP on loopback"),
}


def configure_local_state(base: Path | None = None) -> None:
    """Keep Prefect's home and matplotlib's cache inside the working folder unless the user chose otherwise."""
    base = Path(base or Path.cwd() / ".ctcompare")
    base.mkdir(parents=True, exist_ok=True)  # Prefect creates its home folder but not the parents
    os.environ.setdefault("PREFECT_HOME", str(base / "prefect"))
    os.environ.setdefault("MPLCONFIGDIR", str(base / "matplotlib"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API can take longer than Prefect's 20 s default to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def arm_list(values: list[str] | None) -> list[str]:
    """--arms as given on the command line: 'scratch imagenet' and 'scratch,imagenet' both work."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


class UsageError(Exception):
    """A bad argument: reported as one sentence before any work starts."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command` fully defined (its module imported), or a light listing of every command."""
    parser = argparse.ArgumentParser(
        prog="ctcompare",
        description="ResNet-50 from scratch vs ImageNet weights on DICOM CT: ingest, cost, train, compare.",
    )
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


def main(argv: list[str] | None = None) -> int:
    configure_local_state()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UsageError as error:
        print(f"ctcompare {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctcompare {args.command}: interrupted; finished work is kept and a re-run resumes.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
