"""The `ctcompare` console script: command listing, per-command parsers, and the installed entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import COMMANDS, build_parser, main


def test_listing_names_every_command_without_importing_flows(capsys: pytest.CaptureFixture[str]) -> None:
    code = subprocess.run(
        [sys.executable, "-c", "import sys, flows.cli as c; c.build_parser(None); print(sorted(m for m in sys.modules "
                               "if m.startswith(('torch', 'flows.', 'tasks.'))))"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert code.stdout.strip() == ("['flows.cli', 'flows.cli.errors', 'flows.cli.prefect_api', 'tasks.common', "
                                   "'tasks.common.paths', 'tasks.common.progress']")
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_has_its_full_parser(command: str) -> None:
    parser = build_parser(command)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([command, "--help"])
    assert stop.value.code == 0


def test_every_command_parser_is_built_without_prefect_or_torch() -> None:
    probe = ("import sys; from flows.cli import COMMANDS, build_parser; [build_parser(c) for c in COMMANDS]; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'prefect', 'pydicom'}))")
    code = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert code.stdout.strip() == "[]"


def test_unknown_command_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["bogus"])
    assert stop.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
