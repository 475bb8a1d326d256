#!/usr/bin/env bash
# Mutation testing of the modules where a wrong number goes unnoticed (not part of CI; docs/mutation-testing.md).
#   scripts/mutation.sh                          every module in pyproject.toml [tool.mutmut] only_mutate
#   scripts/mutation.sh ingest.preprocess evaluation.statistics    only these modules (tasks/<package>/<name>.py)
#   MUTATION_SAMPLE=100 scripts/mutation.sh evaluation.statistics   a seeded sample of 100 mutants per module
#   MUTATION_RERUN=unkilled MUTATION_SAMPLE=100 ...      after adding tests: run only the sample's mutants not yet
#                                                        killed (a killed mutant stays killed), score the whole sample
# Then prints the score per module. Survivors: `mutmut results`; one mutant's diff: `mutmut show NAME`.
# mutmut runs, for each mutant, only the selected tests that reach the mutated function (mapped in a first pass).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Unit tests only, without a Prefect server start per mutant; one thread per test process: the machine is shared.
export CTCOMPARE_TESTS_NO_PREFECT_HARNESS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
NICE="${MUTATION_NICE:-19}"
JOBS="${MUTATION_JOBS:-2}"
SAMPLE="${MUTATION_SAMPLE:-}"

modules=("$@")
if [[ ${#modules[@]} -eq 0 ]]; then
    read -r -a modules <<< "$("$PY" scripts/mutation_scores.py --modules)"
fi
for module in "${modules[@]}"; do
    [[ -f "tasks/${module//.//}.py" ]] || { echo "no module tasks/${module//.//}.py; the scoped modules are in pyproject.toml [tool.mutmut] only_mutate" >&2; exit 2; }
done

mutmut() { nice -n "$NICE" "$PY" -m mutmut run --max-children "$JOBS" "$@"; }
if [[ -n "$SAMPLE" ]]; then
    # The sample is drawn from the generated mutants: generate them first (a pattern that names no mutant).
    [[ -f "mutants/tasks/${modules[0]//.//}.py.meta" ]] || mutmut "tasks.${modules[0]}.x__generate_only__*" || true
    mapfile -t names < <("$PY" scripts/mutation_scores.py --sample "$SAMPLE" "${modules[@]}")
    run_names=("${names[@]}")
    if [[ "${MUTATION_RERUN:-}" == unkilled ]]; then
        mapfile -t run_names < <("$PY" scripts/mutation_scores.py --unsettled "${names[@]}")
    fi
    [[ ${#run_names[@]} -eq 0 ]] || mutmut "${run_names[@]}" || true
    "$PY" scripts/mutation_scores.py --only "${names[@]}"
else
    patterns=()
    for module in "${modules[@]}"; do patterns+=("tasks.$module.*"); done
    mutmut "${patterns[@]}" || true
    "$PY" scripts/mutation_scores.py "${modules[@]}"
fi
