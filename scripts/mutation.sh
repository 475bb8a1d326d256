#!/usr/bin/env bash
# Mutation testing of the modules where a wrong number goes unnoticed (not part of CI; see README "Mutation testing").
#   scripts/mutation.sh                      every module in [tool.mutmut] only_mutate
#   scripts/mutation.sh preprocess statistics   only these modules (tasks/<name>.py)
# Prints mutmut's progress, then the score per module; surviving mutants: `mutmut results`, `mutmut show <name>`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Unit tests only (no Prefect server start per mutant); one thread each: the machine is shared.
export CTCOMPARE_TESTS_NO_PREFECT_HARNESS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
NICE="${MUTATION_NICE:-19}"
JOBS="${MUTATION_JOBS:-2}"

patterns=()
for module in "$@"; do
    [[ -f "tasks/$module.py" ]] || { echo "no module tasks/$module.py; scoped modules are listed in pyproject.toml [tool.mutmut]" >&2; exit 2; }
    patterns+=("tasks.$module.*")
done

nice -n "$NICE" "$PY" -m mutmut run --max-children "$JOBS" "${patterns[@]}" || true
"$PY" scripts/mutation_scores.py "$@"
