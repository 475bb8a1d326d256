"""The `ctcompare` console script: one sub-command per Prefect flow.

Each flow module in COMMAND_MODULES exposes `register(subparsers)`, which adds its sub-command and sets
`handler=<function(args) -> int>`. Flows run against PREFECT_API_URL when it is set (and show up in that
server's UI), and in Prefect's ephemeral mode otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

COMMAND_MODULES = (
    "flows.synth",
    "flows.ingest",
    "flows.cost",
    "flows.train",
    "flows.compare",
)


def configure_local_state(base: Path | None = None) -> None:
    """Keep Prefect's home and matplotlib's cache inside the working folder unless the user chose otherwise."""
    base = Path(base or Path.cwd() / ".ctcompare")
    base.mkdir(parents=True, exist_ok=True)  # Prefect creates its home folder but not the parents
    os.environ.setdefault("PREFECT_HOME", str(base / "prefect"))
    os.environ.setdefault("MPLCONFIGDIR", str(base / "matplotlib"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API can take longer than Prefect's 20 s default to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


class UsageError(Exception):
    """A bad argument: reported as one sentence before any work starts."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctcompare",
        description="ResNet-50 from scratch vs ImageNet weights on DICOM CT: ingest, cost, train, compare.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_local_state()
    parser = build_parser()
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
