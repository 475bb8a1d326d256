#!/usr/bin/env bash
# Operate ctcompare the Prefect way on one machine: a local server, the process work pool + deployments, a worker.
#
#   scripts/prefect_local.sh server    # Prefect server (API + UI) on http://127.0.0.1:$CTCOMPARE_PREFECT_PORT (4200)
#   scripts/prefect_local.sh deploy    # create work pool ctcompare-local (type process) and `prefect deploy --all`
#   scripts/prefect_local.sh worker    # a process worker on ctcompare-local (runs one flow run at a time)
#   scripts/prefect_local.sh env       # print the environment the others use (eval "$(... env)" to reuse it)
#   scripts/prefect_local.sh serve     # the reports folder ($CTCOMPARE_REPORTS_ROOT, out/reports) read-only over HTTP
#                                      # on http://127.0.0.1:$CTCOMPARE_REPORTS_PORT (8765): report links in the UI open
#
# Report links: while `serve` runs, the comparison's link artifact is an http:// address on it. To link a shared web
# location instead (one that publishes the reports folder), set CTCOMPARE_REPORT_BASE_URL=https://host/path/ for the
# worker; without either, links are file:// paths, which browsers refuse to open from the UI.
#
# All state stays in the checkout: PREFECT_HOME=<checkout>/.ctcompare/prefect (server database, results of cached
# tasks), MPLCONFIGDIR=<checkout>/.ctcompare/matplotlib. Every variable below may be set beforehand to override it.
# `server` records its address in $PREFECT_HOME/ctcompare-server.json: every `ctcompare` command started with the
# same PREFECT_HOME (from the checkout, by default) uses that server while it answers, so its runs show in the UI.
# `deploy` passes extra arguments to `prefect deploy` instead of --all (e.g. `deploy --name nightly`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CTCOMPARE_ROOT="${CTCOMPARE_ROOT:-$ROOT}"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.ctcompare/prefect}"
export MPLCONFIGDIR="${MPLCONFIGDIR:-$ROOT/.ctcompare/matplotlib}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
CTCOMPARE_PREFECT_PORT="${CTCOMPARE_PREFECT_PORT:-4200}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:${CTCOMPARE_PREFECT_PORT}/api}"
CTCOMPARE_WORK_POOL="${CTCOMPARE_WORK_POOL:-ctcompare-local}"
CTCOMPARE_WORKER_LIMIT="${CTCOMPARE_WORKER_LIMIT:-1}"
if [[ -z "${PREFECT:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/prefect" ]]; then PREFECT="$ROOT/.venv/bin/prefect"; else PREFECT="prefect"; fi
fi
mkdir -p "$PREFECT_HOME" "$MPLCONFIGDIR"

wait_for_api() {
    local tries=0
    until python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$PREFECT_API_URL" 2>/dev/null; do
        tries=$((tries + 1))
        if (( tries > 60 )); then
            echo "prefect_local.sh: no Prefect API answers at $PREFECT_API_URL; start it with 'make server'." >&2
            exit 1
        fi
        sleep 1
    done
}

command="${1:-}"
shift || true
case "$command" in
    server)
        # The server itself needs no API URL; the UI talks to the API it serves.
        unset PREFECT_API_URL
        # `exec` keeps this PID for the server. A stale file is harmless: ctcompare checks /health before using it.
        printf '{"api_url": "http://127.0.0.1:%s/api", "pid": %s}\n' "$CTCOMPARE_PREFECT_PORT" "$$" \
            > "$PREFECT_HOME/ctcompare-server.json"
        echo "Prefect UI and API: http://127.0.0.1:${CTCOMPARE_PREFECT_PORT} (PREFECT_HOME=$PREFECT_HOME)"
        exec "$PREFECT" server start --host 127.0.0.1 --port "$CTCOMPARE_PREFECT_PORT" "$@"
        ;;
    deploy)
        wait_for_api
        cd "$ROOT"
        if "$PREFECT" --no-prompt work-pool inspect "$CTCOMPARE_WORK_POOL" >/dev/null 2>&1; then
            echo "Work pool $CTCOMPARE_WORK_POOL exists."
        else
            # (A worker started meanwhile may have created it: then the create fails and the pool is there.)
            "$PREFECT" --no-prompt work-pool create "$CTCOMPARE_WORK_POOL" --type process || \
                "$PREFECT" --no-prompt work-pool inspect "$CTCOMPARE_WORK_POOL" >/dev/null
        fi
        if (( $# == 0 )); then set -- --all; fi
        # CTCOMPARE_ROOT is left out on purpose: prefect.yaml's pull step keeps the placeholder {{ $CTCOMPARE_ROOT }}
        # and each worker fills it in from its own environment at run time (no path of this machine is stored).
        exec env -u CTCOMPARE_ROOT "$PREFECT" --no-prompt deploy --prefect-file "$ROOT/prefect.yaml" "$@"
        ;;
    worker)
        wait_for_api
        # The flow-run processes inherit this environment; the pull step in prefect.yaml moves them to $CTCOMPARE_ROOT.
        exec "$PREFECT" worker start --pool "$CTCOMPARE_WORK_POOL" --type process --limit "$CTCOMPARE_WORKER_LIMIT" "$@"
        ;;
    serve)
        # Deployments write their reports under out/reports of the checkout (prefect.yaml); serve that folder.
        CTCOMPARE_REPORTS_ROOT="${CTCOMPARE_REPORTS_ROOT:-$ROOT/out/reports}"
        mkdir -p "$CTCOMPARE_REPORTS_ROOT"
        if [[ -x "$ROOT/.venv/bin/ctcompare" ]]; then CTCOMPARE="$ROOT/.venv/bin/ctcompare"; else CTCOMPARE="ctcompare"; fi
        exec "$CTCOMPARE" serve "$CTCOMPARE_REPORTS_ROOT" --port "${CTCOMPARE_REPORTS_PORT:-8765}" "$@"
        ;;
    env)
        for name in CTCOMPARE_ROOT PREFECT_HOME MPLCONFIGDIR PREFECT_SERVER_ANALYTICS_ENABLED PREFECT_API_URL; do
            printf 'export %s=%q\n' "$name" "${!name}"
        done
        ;;
    *)
        echo "usage: scripts/prefect_local.sh server|deploy|worker|env|serve [extra arguments]" >&2
        exit 2
        ;;
esac
