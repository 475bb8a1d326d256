"""Score per module of the last mutmut run (mutants/<module>.py.meta), or a seeded sample of mutant names.

    python scripts/mutation_scores.py [MODULE ...]            score table (all scoped modules when none given)
    python scripts/mutation_scores.py --sample N [MODULE ...]  N mutant names per module, seeded (for a quick run)
    python scripts/mutation_scores.py --only NAME ...          score table over these mutants only (a sample)
    python scripts/mutation_scores.py --unsettled NAME ...     those of these mutants not yet killed (to re-run after
                                                               adding tests: a killed mutant stays killed)
    python scripts/mutation_scores.py --modules                the scoped module names

Score = killed / checked, where killed includes a timeout (the mutant made the tests hang) and checked is every
mutant mutmut ran; "no tests" (no selected test reaches the code) counts as not killed.
"""

from __future__ import annotations

import json
import random
import sys
import tomllib
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parent.parent
KILLED = {"killed", "timeout", "caught by type check"}


def scoped_modules() -> list[str]:
    """The modules (evaluation.statistics, splits, ...) listed in pyproject's [tool.mutmut] only_mutate, dotted
    below tasks/."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return [
        Path(path).relative_to("tasks").with_suffix("").as_posix().replace("/", ".") for path in config["only_mutate"]
    ]


def module_of(mutant: str) -> str:
    """tasks.evaluation.statistics.x_roc_auc__mutmut_3 -> evaluation.statistics."""
    return ".".join(mutant.split(".")[1:-1])


def exit_codes(module: str) -> dict[str, int | None]:
    """Mutant name -> the exit code of its tests (None: not run yet)."""
    meta = ROOT / "mutants" / "tasks" / f"{module.replace('.', '/')}.py.meta"
    if not meta.is_file():
        return {}
    return json.loads(meta.read_text())["exit_code_by_key"]


def score_line(module: str, only: set[str] | None = None) -> str:
    """One line: module, killed/checked, score, and the other outcomes (over the mutants in `only` when given)."""
    codes = {name: code for name, code in exit_codes(module).items() if only is None or name in only}
    statuses = Counter(status_by_exit_code[code] for code in codes.values())
    total = sum(statuses.values())
    checked = total - statuses["not checked"]
    killed = sum(statuses[s] for s in KILLED)
    score = f"{100.0 * killed / checked:5.1f}%" if checked else "  n/a "
    others = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()) if s not in KILLED and s != "not checked")
    return (f"tasks/{module.replace('.', '/') + '.py':28s} {killed:5d} / {checked:5d} killed  {score}  (of {total} "
            f"mutants; {others or 'none other'})")


def main(argv: list[str]) -> int:
    """Print the score table, or a sample of mutant names with --sample N."""
    if argv[:1] == ["--modules"]:
        print(*scoped_modules())
        return 0
    if argv[:1] == ["--unsettled"]:
        for name in argv[1:]:
            code = exit_codes(module_of(name)).get(name)
            if code is None or status_by_exit_code[code] not in KILLED:
                print(name)
        return 0
    if argv[:1] == ["--only"]:
        only = set(argv[1:])
        modules = sorted({module_of(name) for name in only})
        print(f"mutation score over a sample of {len(only)} mutants (mutmut; `mutmut show NAME` shows one)")
        for module in modules:
            print(score_line(module, only))
        return 0
    sample = None
    if argv[:1] == ["--sample"]:
        sample, argv = int(argv[1]), argv[2:]
    modules = argv or scoped_modules()
    if sample is not None:
        for module in modules:
            # A seeded shuffle per module, cut at N: a smaller sample is a prefix of a larger one.
            names = sorted(exit_codes(module))
            random.Random(f"20261130-{module}").shuffle(names)
            print("\n".join(sorted(names[:sample])))
        return 0
    print("mutation score per module (mutmut; `mutmut results` lists survivors, `mutmut show NAME` shows one)")
    for module in modules:
        print(score_line(module))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
