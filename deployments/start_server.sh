#!/usr/bin/env bash
# Start a Prefect server (SQLite database under $PREFECT_HOME) in the background and wait
# until its API answers. Logs and pid: $YOKAI_RUN_DIR/server.{log,pid}.
#
#   deployments/start_server.sh                      # 127.0.0.1:4200
#   YOKAI_PREFECT_HOST=0.0.0.0 deployments/start_server.sh   # reachable by workers on other machines
#
# Then: export PREFECT_API_URL=http://<this host>:4200/api on every machine; the UI is at
# http://<this host>:4200.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

pidfile="$YOKAI_RUN_DIR/server.pid"
if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "Prefect server already running (pid $(cat "$pidfile")); API $PREFECT_API_URL"
    exit 0
fi

# A server bound to 0.0.0.0 must still be reached through a real address by the UI.
if [[ "$YOKAI_PREFECT_HOST" == "0.0.0.0" && -z "${PREFECT_UI_API_URL:-}" ]]; then
    export PREFECT_UI_API_URL="http://$(hostname -f):$YOKAI_PREFECT_PORT/api"
fi

# setsid: the server gets its own process group, so stop_all.sh can stop it and its children.
setsid "$PREFECT" server start --host "$YOKAI_PREFECT_HOST" --port "$YOKAI_PREFECT_PORT" \
    >>"$YOKAI_RUN_DIR/server.log" 2>&1 < /dev/null &
echo $! > "$pidfile"

health="http://127.0.0.1:$YOKAI_PREFECT_PORT/api/health"
[[ "$YOKAI_PREFECT_HOST" != "0.0.0.0" ]] && health="http://$YOKAI_PREFECT_HOST:$YOKAI_PREFECT_PORT/api/health"
for _ in $(seq 1 "${YOKAI_SERVER_WAIT_S:-120}"); do
    if python3 -c "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('$health', timeout=2).read().strip() == b'true' else 1)" 2>/dev/null; then
        echo "Prefect server up (pid $(cat "$pidfile")): UI http://$YOKAI_PREFECT_HOST:$YOKAI_PREFECT_PORT  API $PREFECT_API_URL"
        exit 0
    fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "Prefect server exited; last log lines:" >&2
        tail -n 30 "$YOKAI_RUN_DIR/server.log" >&2
        rm -f "$pidfile"
        exit 1
    fi
    sleep 1
done
echo "Prefect server did not answer $health in time; see $YOKAI_RUN_DIR/server.log" >&2
exit 1
