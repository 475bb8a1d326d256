"""`ctcompare COMMAND --help` is user documentation, printed without importing torch or Prefect."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from flows.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
# Words of the code, not of a user: file paths of the project, exception class names.
DEVELOPER_WORDS = re.compile(r"flows/|tasks/|data_schemas|\.py\b|[A-Z][a-z]+Error\b")


def test_every_command_help_is_user_text_and_imports_neither_torch_nor_prefect() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
    entry = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"  # as the console script runs it
    for command in COMMANDS:
        result = subprocess.run([sys.executable, "-X", "importtime", "-c", entry, command, "--help"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        assert imported and not {name for name in imported if name.split(".")[0] in ("torch", "prefect")}, command
        assert f"usage: ctcompare {command}" in result.stdout
        assert not DEVELOPER_WORDS.search(result.stdout), (command, DEVELOPER_WORDS.search(result.stdout))
        description = result.stdout.split("\n\n", 2)[1]
        assert not description.startswith(("positional arguments", "options")), f"{command} --help has no description"


def test_a_deployments_flow_run_names_the_parameters_as_its_form_shows(monkeypatch) -> None:
    from flows.parameters import as_seen

    message = "--weights: no file; unknown setting 'x' in --set; change it with --set image_size=112 in /tmp/a--b."
    assert as_seen(message) == message  # a terminal's words outside a deployment's flow run
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "3f1c2a4e-0000-4000-8000-000000000000")
    assert as_seen(message) == ("weights: no file; unknown setting 'x' in settings; change it with "
                                'settings {"image_size": "112"} in /tmp/a--b.')


def test_every_argument_of_every_command_says_what_it_is() -> None:
    """No option or positional argument of a command is printed bare, without a line of help."""
    import argparse

    from flows.cli import build_parser

    for command in COMMANDS:
        subparsers = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
        bare = [action.dest for action in subparsers.choices[command]._actions
                if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
        assert not bare, (command, bare)
