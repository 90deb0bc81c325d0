#!/usr/bin/env bash
# Stop the workers, then the server, that deployments/start_*.sh started on this machine.
# Workers go first: a worker whose server is already gone hangs on SIGTERM retrying the API.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

shopt -s nullglob
for pidfile in "$YOKAI_RUN_DIR"/worker-*.pid; do
    echo "stopping $(basename "$pidfile" .pid) (pid $(cat "$pidfile"))"
    yokai_stop_pidfile "$pidfile" "${YOKAI_WORKER_STOP_S:-15}"
done
if [[ -f "$YOKAI_RUN_DIR/server.pid" ]]; then
    echo "stopping Prefect server (pid $(cat "$YOKAI_RUN_DIR/server.pid"))"
    yokai_stop_pidfile "$YOKAI_RUN_DIR/server.pid" "${YOKAI_SERVER_STOP_S:-30}"
fi
