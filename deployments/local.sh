#!/usr/bin/env bash
# The whole deployment path on one machine, from nothing: a local Prefect server, the process
# work pool, toa's block types, the `synthesize` deployment from prefect.yaml, a worker, and a
# deployment run watched to the end.
#
#   deployments/local.sh [all] [RUN ARGS...]   up, run, then down (also on Ctrl-C or failure)
#   deployments/local.sh up                    start everything and leave it running
#   deployments/local.sh run [RUN ARGS...]     `prefect deployment run toa/synthesize --watch RUN ARGS`
#   deployments/local.sh down                  stop the worker and the server
#
# RUN ARGS are passed to `prefect deployment run`, e.g. --param n=4 --param limit=8
#   --param 'overrides={"reward.block": "my-rm"}'.  Exit status: 0 when the flow run Completed.
#
# Settings (environment):
#   TOA_DEPLOY_DIR    state folder: PREFECT_HOME (server database), logs, pids, env   [${TMPDIR:-/tmp}/toa-deploy]
#   TOA_PREFECT_PORT  port of the Prefect server (UI and API on 127.0.0.1)           [4200]
#   TOA_VENV          virtual environment with toa installed (the worker's python)   [<repo>/.venv]
#   TOA_POOL          process work pool name (must match prefect.yaml)                [toa-process]
# After `up`, `source "$TOA_DEPLOY_DIR/env"` points the prefect CLI at this server.
set -euo pipefail

PROJECT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${TOA_DEPLOY_DIR:-${TMPDIR:-/tmp}/toa-deploy}
PORT=${TOA_PREFECT_PORT:-4200}
VENV=${TOA_VENV:-$PROJECT/.venv}
POOL=${TOA_POOL:-toa-process}
PREFECT="$VENV/bin/prefect"

mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
export PREFECT_HOME="$STATE/prefect-home"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_CLI_PROMPT=false
# The worker asks for due runs every 2 s (default 10 s): a retried run starts promptly.
export PREFECT_WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-2}
# prefect.yaml's pull step runs flows from this checkout.
export TOA_PROJECT_DIR="$PROJECT"

log() { echo "[toa-deploy] $*" >&2; }

# Is the server healthy? (the venv's python, not curl: nothing beyond the venv is needed)
healthy() {
  "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "$PREFECT_API_URL/health" >/dev/null 2>&1
}

# Start a command in its own session (its pid is its process group) with its log and pid file.
spawn() {
  local name=$1; shift
  setsid "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
}

# Stop a process group started by spawn: signal, wait up to GRACE seconds, then SIGKILL.
stop() {
  local name=$1 sig=$2 grace=$3 pid
  [ -f "$STATE/$name.pid" ] || return 0
  pid=$(cat "$STATE/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping $name (pid $pid)"
    kill "-$sig" -- "-$pid" 2>/dev/null || true
    for _ in $(seq $((grace * 10))); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$STATE/$name.pid"
}

wait_for_server() {
  local deadline=$((SECONDS + ${TOA_SERVER_START_TIMEOUT:-180}))
  until healthy; do
    if ! kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null; then
      log "Prefect server exited; last lines of $STATE/server.log:"; tail -n 30 "$STATE/server.log" >&2; return 1
    fi
    if [ $SECONDS -ge $deadline ]; then log "Prefect server not healthy in time"; return 1; fi
    sleep 0.5
  done
}

up() {
  [ -x "$PREFECT" ] || { log "no prefect in $VENV (run scripts/install.sh or set TOA_VENV)"; exit 2; }
  if healthy; then
    log "a Prefect server already answers on port $PORT: using it"
  else
    log "starting Prefect server on 127.0.0.1:$PORT (PREFECT_HOME=$PREFECT_HOME)"
    spawn server "$PREFECT" server start --host 127.0.0.1 --port "$PORT"
    wait_for_server
  fi
  "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1 || "$PREFECT" work-pool create "$POOL" --type process
  "$PREFECT" block register -m toa.blocks
  (cd "$PROJECT" && "$PREFECT" deploy --all)
  stop worker INT 5
  spawn worker "$PREFECT" worker start --pool "$POOL"
  printf 'export PREFECT_HOME=%q PREFECT_API_URL=%q\n' "$PREFECT_HOME" "$PREFECT_API_URL" >"$STATE/env"
  log "up: UI at http://127.0.0.1:$PORT  (source $STATE/env for the prefect CLI)"
}

run() {
  "$PREFECT" deployment run toa/synthesize --watch "$@"
}

down() {
  # Measured: the worker lingers for over a minute after SIGINT (and ignores SIGTERM for a
  # while); 5 s lets it say goodbye, then the group (with any flow run in it) is killed.
  stop worker INT 5
  stop server TERM 30  # the server exits within seconds of SIGTERM
}

cmd=${1:-all}
case "$cmd" in
  up) up ;;
  run) shift; run "$@" ;;
  down) down ;;
  all|--*)
    [ "$cmd" = all ] && shift
    trap down EXIT
    trap 'exit 130' INT TERM  # exit runs the EXIT trap: down once
    up
    run "$@"
    ;;
  *) echo "usage: $0 [all|up|run|down] [prefect deployment run args...]" >&2; exit 2 ;;
esac
