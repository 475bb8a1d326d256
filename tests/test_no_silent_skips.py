"""No silent skips: a test that cannot run for a reason the project controls must fail, not skip.

A missing module, a renamed flow, an absent fixture file are the project's own doing: they must show up red.
Only a reason outside the project (say an operating system feature) may skip, and it is listed here with why.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SKIP_NAMES = {"skip", "skipif", "importorskip", "xfail", "skipTest", "skipUnless", "skipIf", "SkipTest"}
# "file.py:line source" -> why the reason lies outside the project.
ALLOWED_SKIPS: dict[str, str] = {
    "pacs/conftest.py:22 pytest.skip(reason)": "Orthanc is a Debian package that only root can install (`make "
                                               "orthanc`);"
    " under CI (CI=true) the PACS tests fail instead of skipping",
}


def skip_sites(source: str) -> list[int]:
    """Line numbers where source skips or expects failure: pytest.skip/importorskip/xfail, mark.skip(if), unittest
    skips."""
    tree = ast.parse(source)
    # A bare name counts only when imported from pytest or unittest (`from pytest import skip`); a variable called
    # `skip` elsewhere is not a skip.
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").split(".")[0] in {"pytest", "_pytest", "unittest"}
                for alias in node.names if alias.name in SKIP_NAMES}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in SKIP_NAMES:
            lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id in imported:
            lines.append(node.lineno)
    return sorted(set(lines))


def test_the_scanner_finds_every_way_of_skipping() -> None:
    source = (
        "import pytest, unittest\nfrom pytest import skip as later\nskip = ('imagenet',)\n"
        "pytest.importorskip('flows.compare')\n"
        "@pytest.mark.skipif(True, reason='x')\n"
        "def test_a(): pytest.skip('later')\n"
        "@pytest.mark.xfail\n"
        "def test_b(): raise unittest.SkipTest('no')\n"
        "def test_c(): assert 'x' not in skip\n"
        "def test_d(): later('soon')\n"
    )
    assert skip_sites(source) == [4, 5, 6, 7, 8, 10]


def test_no_test_skips_for_a_reason_the_project_controls() -> None:
    found = {}
    for path in sorted(TESTS.rglob("*.py")):
        if path.resolve() == Path(__file__).resolve():
            continue
        lines = path.read_text().splitlines()
        for line in skip_sites(path.read_text()):
            found[f"{path.relative_to(TESTS)}:{line} {lines[line - 1].strip()}"] = path
    unexplained = sorted(site for site in found if site not in ALLOWED_SKIPS)
    assert not unexplained, (
        "tests that skip instead of failing (make them fail, or list a reason outside the project in ALLOWED_SKIPS): "
        + "; ".join(unexplained)
    )
