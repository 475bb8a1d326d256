#!/usr/bin/env bash
# Operate ctcompare the Prefect way on one machine: a local server, the process work pool + deployments, a worker.
#
#   scripts/prefect_local.sh server    # the Prefect server (API + UI) on 127.0.0.1:$CTCOMPARE_PREFECT_PORT (4200)
#                                      # AND the report server (`ctcompare serve`) over $CTCOMPARE_REPORTS_ROOT
#                                      # (out/reports) on 127.0.0.1:$CTCOMPARE_REPORTS_PORT (8765); Ctrl-C stops both
#   scripts/prefect_local.sh deploy    # create work pool ctcompare-local (type process) and `prefect deploy --all`
#   scripts/prefect_local.sh worker    # a process worker on ctcompare-local (runs one flow run at a time)
#   scripts/prefect_local.sh env       # print the environment the others use (eval "$(... env)" to reuse it)
#   scripts/prefect_local.sh serve     # the report server alone
#
# Report links: the worker exports CTCOMPARE_REPORTS_ROOT (out/reports) and CTCOMPARE_REPORT_BASE_URL (the report
# server's address), so a comparison that writes under out/reports links its report as
# http://127.0.0.1:8765/<folder>/report.html, the same address whether or not the report server runs at that
# moment: links of earlier runs open again once `make server` runs. To link a shared web location that publishes
# out/reports instead, set CTCOMPARE_REPORT_BASE_URL=https://host/path/ for the worker.
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
CTCOMPARE_REPORTS_ROOT="${CTCOMPARE_REPORTS_ROOT:-$ROOT/out/reports}"
CTCOMPARE_REPORTS_PORT="${CTCOMPARE_REPORTS_PORT:-8765}"
CTCOMPARE_WORKER_LIMIT="${CTCOMPARE_WORKER_LIMIT:-1}"
if [[ -z "${PREFECT:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/prefect" ]]; then PREFECT="$ROOT/.venv/bin/prefect"; else PREFECT="prefect"; fi
fi
if [[ -z "${CTCOMPARE:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/ctcompare" ]]; then CTCOMPARE="$ROOT/.venv/bin/ctcompare"; else CTCOMPARE="ctcompare"; fi
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
        # Stream flow-run logs to watchers (off by default in Prefect): `prefect deployment run ... --watch` then
        # shows the run's log lines, down to its last one, the report's address.
        export PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="${PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED:-true}"
        export PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="${PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED:-true}"
        mkdir -p "$CTCOMPARE_REPORTS_ROOT"
        # Both run in the background of this script, which stops both when either ends, on Ctrl-C and on SIGTERM.
        "$CTCOMPARE" serve "$CTCOMPARE_REPORTS_ROOT" --port "$CTCOMPARE_REPORTS_PORT" &
        serve_pid=$!
        "$PREFECT" server start --host 127.0.0.1 --port "$CTCOMPARE_PREFECT_PORT" "$@" &
        server_pid=$!
        stop_both() {
            trap - INT TERM
            kill -TERM "$server_pid" "$serve_pid" 2>/dev/null || true
            wait "$server_pid" "$serve_pid" 2>/dev/null || true
        }
        trap 'stop_both; exit 130' INT
        trap 'stop_both; exit 143' TERM
        # A stale file is harmless: ctcompare checks /health before using it.
        printf '{"api_url": "http://127.0.0.1:%s/api", "pid": %s}\n' "$CTCOMPARE_PREFECT_PORT" "$server_pid" \
            > "$PREFECT_HOME/ctcompare-server.json"
        echo "Prefect UI and API: http://127.0.0.1:${CTCOMPARE_PREFECT_PORT} (PREFECT_HOME=$PREFECT_HOME)"
        echo "Reports: http://127.0.0.1:${CTCOMPARE_REPORTS_PORT}/ ($CTCOMPARE_REPORTS_ROOT). Ctrl-C stops both."
        status=0
        wait -n "$server_pid" "$serve_pid" || status=$?
        echo "prefect_local.sh: one of the two servers stopped (exit $status); stopping the other." >&2
        stop_both
        exit "$status"
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
        # Prefect's own hints after each deployment (start a generic worker, run it by hand) are left out, each from
        # its "To ..." line through its "$ prefect ..." command (lines unwrapped, whatever the width): the worker
        # this project needs is `make worker`, said once at the end.
        env -u CTCOMPARE_ROOT PREFECT_CLI_WRAP_LINES=false \
            "$PREFECT" --no-prompt deploy --prefect-file "$ROOT/prefect.yaml" "$@" \
            | awk '/^To (execute|schedule)/ {skip = 1; next} skip && /^[[:space:]]*\$ prefect / {skip = 0; next}
                   skip {next} /^[[:space:]]*$/ {if (blank) next; blank = 1; print; next} {blank = 0; print}'
        echo "Deployed. Start a worker with:  make worker   (the runs wait in the pool until one runs)"
        ;;
    worker)
        wait_for_api
        # The flow-run processes inherit this environment; the pull step in prefect.yaml moves them to $CTCOMPARE_ROOT.
        # Report links: http:// addresses on the report server of `make server` (see the top of this file).
        export CTCOMPARE_REPORTS_ROOT
        export CTCOMPARE_REPORT_BASE_URL="${CTCOMPARE_REPORT_BASE_URL:-http://127.0.0.1:${CTCOMPARE_REPORTS_PORT}/}"
        exec "$PREFECT" worker start --pool "$CTCOMPARE_WORK_POOL" --type process --limit "$CTCOMPARE_WORKER_LIMIT" "$@"
        ;;
    serve)
        mkdir -p "$CTCOMPARE_REPORTS_ROOT"
        exec "$CTCOMPARE" serve "$CTCOMPARE_REPORTS_ROOT" --port "$CTCOMPARE_REPORTS_PORT" "$@"
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
